#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "radix_sort.hpp"

namespace {

std::vector<std::uint32_t> random_keys(std::size_t n, unsigned seed, std::uint32_t max_key) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<std::uint32_t> dist(0, max_key);
    std::vector<std::uint32_t> keys(n);
    for (std::uint32_t& key : keys) {
        key = dist(rng);
    }
    return keys;
}

void expect_sorts(std::vector<std::uint32_t> keys) {
    std::vector<std::uint32_t> expected = keys;
    std::sort(expected.begin(), expected.end());
    demo::radix_sort(keys.data(), keys.size());
    EXPECT_EQ(keys, expected) << "n=" << keys.size();
}

}  // namespace

TEST(RadixSort, EmptyAndSingle) {
    demo::radix_sort(nullptr, 0);
    std::uint32_t key = 42;
    demo::radix_sort(&key, 1);
    EXPECT_EQ(key, 42u);
}

TEST(RadixSort, SmallKnownValues) {
    std::vector<std::uint32_t> keys = {5, 3, 0xFFFFFFFFu, 0, 3, 1u << 31, 7};
    demo::radix_sort(keys.data(), keys.size());
    EXPECT_EQ(keys, (std::vector<std::uint32_t>{0, 3, 3, 5, 7, 1u << 31, 0xFFFFFFFFu}));
}

TEST(RadixSort, RandomKeysOfManySizes) {
    for (std::size_t n : {2u, 3u, 10u, 255u, 256u, 257u, 1000u, 65537u}) {
        expect_sorts(random_keys(n, 9 + n, 0xFFFFFFFFu));
    }
}

TEST(RadixSort, ManyDuplicatesAndSmallKeys) {
    expect_sorts(random_keys(10000, 1, 15));
    expect_sorts(random_keys(10000, 2, 300));
}

TEST(RadixSort, SortedAndReversedInput) {
    std::vector<std::uint32_t> keys(5000);
    for (std::size_t i = 0; i < keys.size(); ++i) {
        keys[i] = static_cast<std::uint32_t>(i * 2654435761u);
    }
    std::sort(keys.begin(), keys.end());
    expect_sorts(keys);
    std::reverse(keys.begin(), keys.end());
    expect_sorts(keys);
}
