#include <benchmark/benchmark.h>

#include <cstddef>
#include <random>
#include <vector>

#include "reduce.hpp"

namespace {

void BM_ReduceSum(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    std::mt19937 rng(7);
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    std::vector<double> values(n);
    for (double& value : values) {
        value = dist(rng);
    }
    for (auto _ : state) {
        benchmark::DoNotOptimize(demo::reduce_sum(values.data(), n));
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}

}  // namespace

// 2^15 doubles (256 KiB) stay in the L2 cache: the kernel, not memory, is measured.
BENCHMARK(BM_ReduceSum)->Arg(1 << 15);
