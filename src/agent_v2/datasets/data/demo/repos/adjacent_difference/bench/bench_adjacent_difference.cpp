#include <benchmark/benchmark.h>

#include <cstddef>
#include <random>
#include <vector>

#include "adjacent_difference.hpp"

namespace {

void BM_AdjacentDifference(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
    std::vector<float> in(n);
    for (float& value : in) {
        value = dist(rng);
    }
    std::vector<float> out(n);
    for (auto _ : state) {
        demo::adjacent_difference(in.data(), out.data(), n);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}

}  // namespace

// 2^14 floats (64 KiB per array) stay in the L2 cache.
BENCHMARK(BM_AdjacentDifference)->Arg(1 << 14);
