#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include "reduce.hpp"

namespace {

std::vector<double> random_values(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    std::vector<double> values(n);
    for (double& value : values) {
        value = dist(rng);
    }
    return values;
}

long double exact_sum(const std::vector<double>& values) {
    long double sum = 0.0L;
    for (double value : values) {
        sum += value;
    }
    return sum;
}

}  // namespace

TEST(Reduce, EmptyIsZero) {
    EXPECT_EQ(demo::reduce_sum(nullptr, 0), 0.0);
}

TEST(Reduce, SingleElement) {
    const double value = 3.5;
    EXPECT_EQ(demo::reduce_sum(&value, 1), 3.5);
}

TEST(Reduce, SmallIntegersAreExact) {
    for (std::size_t n = 1; n <= 100; ++n) {
        std::vector<double> values(n);
        for (std::size_t i = 0; i < n; ++i) {
            values[i] = static_cast<double>(i + 1);
        }
        EXPECT_EQ(demo::reduce_sum(values.data(), n), n * (n + 1) / 2.0) << "n=" << n;
    }
}

TEST(Reduce, RandomValuesWithinTolerance) {
    for (std::size_t n : {7u, 64u, 1000u, 4097u, 100003u}) {
        const std::vector<double> values = random_values(n, 42 + n);
        const double expected = static_cast<double>(exact_sum(values));
        EXPECT_NEAR(demo::reduce_sum(values.data(), n), expected, 1e-9 * n) << "n=" << n;
    }
}
