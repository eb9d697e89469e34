#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "inclusive_scan.hpp"

namespace {

std::vector<std::int32_t> random_values(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<std::int32_t> dist(-1000, 1000);
    std::vector<std::int32_t> values(n);
    for (std::int32_t& value : values) {
        value = dist(rng);
    }
    return values;
}

std::vector<std::int32_t> expected_scan(const std::vector<std::int32_t>& values) {
    std::vector<std::int32_t> result(values.size());
    std::uint32_t running = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
        running += static_cast<std::uint32_t>(values[i]);
        result[i] = static_cast<std::int32_t>(running);
    }
    return result;
}

}  // namespace

TEST(InclusiveScan, EmptyInputWritesNothing) {
    std::int32_t sentinel = 17;
    demo::inclusive_scan(nullptr, &sentinel, 0);
    EXPECT_EQ(sentinel, 17);
}

TEST(InclusiveScan, SmallKnownValues) {
    const std::vector<std::int32_t> in = {3, 1, 4, 1, 5, 9, 2, 6};
    std::vector<std::int32_t> out(in.size());
    demo::inclusive_scan(in.data(), out.data(), in.size());
    EXPECT_EQ(out, (std::vector<std::int32_t>{3, 4, 8, 9, 14, 23, 25, 31}));
}

TEST(InclusiveScan, MatchesSequentialScanForManySizes) {
    for (std::size_t n : {1u, 2u, 3u, 7u, 8u, 9u, 31u, 64u, 1000u, 4099u, 65536u}) {
        const std::vector<std::int32_t> in = random_values(n, 11 + n);
        std::vector<std::int32_t> out(n);
        demo::inclusive_scan(in.data(), out.data(), n);
        EXPECT_EQ(out, expected_scan(in)) << "n=" << n;
    }
}

TEST(InclusiveScan, InPlace) {
    std::vector<std::int32_t> values = random_values(5000, 3);
    const std::vector<std::int32_t> expected = expected_scan(values);
    demo::inclusive_scan(values.data(), values.data(), values.size());
    EXPECT_EQ(values, expected);
}

TEST(InclusiveScan, WrapsAroundLikeUnsigned) {
    const std::vector<std::int32_t> in = {INT32_MAX, 1, 1};
    std::vector<std::int32_t> out(in.size());
    demo::inclusive_scan(in.data(), out.data(), in.size());
    EXPECT_EQ(out, (std::vector<std::int32_t>{INT32_MAX, INT32_MIN, INT32_MIN + 1}));
}
