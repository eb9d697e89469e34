#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "histogram.hpp"

namespace {

// The definition, written as directly as possible.
std::vector<std::uint32_t> expected_histogram(const std::vector<std::int32_t>& samples,
                                              std::int32_t lower, std::int32_t upper,
                                              int num_bins) {
    std::vector<std::uint32_t> bins(static_cast<std::size_t>(num_bins), 0);
    const std::int64_t range = static_cast<std::int64_t>(upper) - lower;
    for (std::int32_t sample : samples) {
        if (sample < lower || sample >= upper) {
            continue;
        }
        const std::int64_t bin = (static_cast<std::int64_t>(sample) - lower) * num_bins / range;
        bins[static_cast<std::size_t>(bin)] += 1;
    }
    return bins;
}

std::vector<std::uint32_t> run(const std::vector<std::int32_t>& samples, std::int32_t lower,
                               std::int32_t upper, int num_bins) {
    std::vector<std::uint32_t> bins(static_cast<std::size_t>(num_bins), 0);
    demo::histogram_even(samples.data(), samples.size(), lower, upper, num_bins, bins.data());
    return bins;
}

}  // namespace

TEST(HistogramEven, SmallKnownValues) {
    const std::vector<std::int32_t> samples = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    EXPECT_EQ(run(samples, 0, 10, 5), (std::vector<std::uint32_t>{2, 2, 2, 2, 2}));
}

TEST(HistogramEven, IgnoresSamplesOutsideTheRange) {
    const std::vector<std::int32_t> samples = {-5, -1, 0, 9, 10, 11, 100};
    EXPECT_EQ(run(samples, 0, 10, 2), (std::vector<std::uint32_t>{1, 1}));
}

TEST(HistogramEven, AddsToExistingCounts) {
    const std::vector<std::int32_t> samples = {1, 2, 3};
    std::vector<std::uint32_t> bins = {10, 20};
    demo::histogram_even(samples.data(), samples.size(), 0, 4, 2, bins.data());
    EXPECT_EQ(bins, (std::vector<std::uint32_t>{11, 22}));
}

TEST(HistogramEven, UnevenBinEdges) {
    // 7 values over 3 bins: the edges fall between integers.
    std::vector<std::int32_t> samples;
    for (std::int32_t s = -3; s < 4; ++s) {
        samples.push_back(s);
    }
    EXPECT_EQ(run(samples, -3, 4, 3), expected_histogram(samples, -3, 4, 3));
}

TEST(HistogramEven, MatchesDefinitionOnRandomSamples) {
    std::mt19937 rng(5);
    for (int num_bins : {1, 2, 3, 7, 64, 100, 256}) {
        for (auto [lower, upper] : {std::pair{0, 256}, std::pair{-1000, 1000},
                                    std::pair{INT32_MIN, INT32_MAX}}) {
            std::uniform_int_distribution<std::int32_t> dist(
                lower == INT32_MIN ? INT32_MIN : lower - 50,
                upper == INT32_MAX ? INT32_MAX : upper + 50);
            std::vector<std::int32_t> samples(10007);
            for (std::int32_t& sample : samples) {
                sample = dist(rng);
            }
            EXPECT_EQ(run(samples, lower, upper, num_bins),
                      expected_histogram(samples, lower, upper, num_bins))
                << "num_bins=" << num_bins << " lower=" << lower << " upper=" << upper;
        }
    }
}
