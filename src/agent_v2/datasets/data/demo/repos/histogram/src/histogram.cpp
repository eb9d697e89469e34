#include "histogram.hpp"

namespace demo {

// For each sample, walk the bins from the first until the sample lies below
// the upper edge of the bin: simple, but num_bins / 2 steps per sample.
void histogram_even(const std::int32_t* samples, std::size_t n, std::int32_t lower,
                    std::int32_t upper, int num_bins, std::uint32_t* bins) {
    const std::int64_t range = static_cast<std::int64_t>(upper) - lower;
    for (std::size_t i = 0; i < n; ++i) {
        const std::int64_t offset = static_cast<std::int64_t>(samples[i]) - lower;
        if (offset < 0 || offset >= range) {
            continue;
        }
        // Bin b ends where offset * num_bins reaches (b + 1) * range.
        for (int b = 0; b < num_bins; ++b) {
            if (offset * num_bins < (b + 1) * range) {
                bins[b] += 1;
                break;
            }
        }
    }
}

}  // namespace demo
