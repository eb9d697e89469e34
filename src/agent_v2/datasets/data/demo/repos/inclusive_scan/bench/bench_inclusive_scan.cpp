#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "inclusive_scan.hpp"

namespace {

void BM_InclusiveScan(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    std::mt19937 rng(7);
    std::uniform_int_distribution<std::int32_t> dist(-1000, 1000);
    std::vector<std::int32_t> in(n);
    for (std::int32_t& value : in) {
        value = dist(rng);
    }
    std::vector<std::int32_t> out(n);
    for (auto _ : state) {
        demo::inclusive_scan(in.data(), out.data(), n);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}

}  // namespace

// 2^15 integers (128 KiB per array) stay in the L2 cache.
BENCHMARK(BM_InclusiveScan)->Arg(1 << 15);
