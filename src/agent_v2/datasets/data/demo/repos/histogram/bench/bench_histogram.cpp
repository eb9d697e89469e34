#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "histogram.hpp"

namespace {

void BM_HistogramEven(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const int num_bins = static_cast<int>(state.range(1));
    std::mt19937 rng(7);
    std::uniform_int_distribution<std::int32_t> dist(0, 4095);
    std::vector<std::int32_t> samples(n);
    for (std::int32_t& sample : samples) {
        sample = dist(rng);
    }
    std::vector<std::uint32_t> bins(static_cast<std::size_t>(num_bins));
    for (auto _ : state) {
        demo::histogram_even(samples.data(), n, 0, 4096, num_bins, bins.data());
        benchmark::DoNotOptimize(bins.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}

}  // namespace

// 2^15 samples of 12-bit values (e.g. a camera image) into 64 bins.
BENCHMARK(BM_HistogramEven)->Args({1 << 15, 64});
