#include <gtest/gtest.h>

#include <cstddef>
#include <random>
#include <vector>

#include "adjacent_difference.hpp"

namespace {

std::vector<float> random_values(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
    std::vector<float> values(n);
    for (float& value : values) {
        value = dist(rng);
    }
    return values;
}

// Each output is one subtraction of two inputs, so results are exact: no tolerance.
std::vector<float> expected_difference(const std::vector<float>& in) {
    std::vector<float> out(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) {
        out[i] = i == 0 ? in[0] : in[i] - in[i - 1];
    }
    return out;
}

}  // namespace

TEST(AdjacentDifference, EmptyInputWritesNothing) {
    float sentinel = 1.5f;
    demo::adjacent_difference(nullptr, &sentinel, 0);
    EXPECT_EQ(sentinel, 1.5f);
}

TEST(AdjacentDifference, SmallKnownValues) {
    const std::vector<float> in = {1.0f, 4.0f, 9.0f, 16.0f, 25.0f};
    std::vector<float> out(in.size());
    demo::adjacent_difference(in.data(), out.data(), in.size());
    EXPECT_EQ(out, (std::vector<float>{1.0f, 3.0f, 5.0f, 7.0f, 9.0f}));
}

TEST(AdjacentDifference, MatchesDefinitionForManySizes) {
    for (std::size_t n : {1u, 2u, 3u, 4u, 5u, 7u, 8u, 9u, 15u, 16u, 17u, 1000u, 4099u}) {
        const std::vector<float> in = random_values(n, 21 + n);
        std::vector<float> out(n);
        demo::adjacent_difference(in.data(), out.data(), n);
        EXPECT_EQ(out, expected_difference(in)) << "n=" << n;
    }
}

TEST(AdjacentDifference, InPlace) {
    for (std::size_t n : {1u, 5u, 16u, 33u, 5000u}) {
        std::vector<float> values = random_values(n, 4 + n);
        const std::vector<float> expected = expected_difference(values);
        demo::adjacent_difference(values.data(), values.data(), n);
        EXPECT_EQ(values, expected) << "n=" << n;
    }
}

TEST(AdjacentDifference, LeavesTheInputUnchanged) {
    const std::vector<float> in = random_values(100, 8);
    const std::vector<float> copy = in;
    std::vector<float> out(in.size());
    demo::adjacent_difference(in.data(), out.data(), in.size());
    EXPECT_EQ(in, copy);
}
