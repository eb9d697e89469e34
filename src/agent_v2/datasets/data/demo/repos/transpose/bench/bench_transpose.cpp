#include <benchmark/benchmark.h>

#include <cstddef>
#include <vector>

#include "transpose.hpp"

namespace {

void BM_Transpose(benchmark::State& state) {
    const auto rows = static_cast<std::size_t>(state.range(0));
    const auto cols = static_cast<std::size_t>(state.range(1));
    std::vector<float> in(rows * cols);
    for (std::size_t k = 0; k < in.size(); ++k) {
        in[k] = static_cast<float>(k);
    }
    std::vector<float> out(rows * cols);
    for (auto _ : state) {
        demo::transpose(in.data(), out.data(), rows, cols);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(rows * cols));
}

}  // namespace

// A 256 x 256 matrix (256 KiB per array) stays in the L2 cache; its
// power-of-two row length makes column-wise access collide in the L1 cache.
BENCHMARK(BM_Transpose)->Args({256, 256});
