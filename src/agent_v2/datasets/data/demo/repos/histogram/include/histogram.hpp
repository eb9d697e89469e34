// Histogram with equal-width bins (modelled on a GPU primitives library's
// device-wide "histogram even").
#pragma once

#include <cstddef>
#include <cstdint>

namespace demo {

// Adds to bins[0..num_bins) the counts of samples[0..n) in num_bins equal-width
// bins over [lower, upper): sample s falls in bin
// (s - lower) * num_bins / (upper - lower), computed exactly (integer division).
// Samples outside [lower, upper) are not counted. Requires lower < upper and
// num_bins >= 1. The bins are not cleared first.
void histogram_even(const std::int32_t* samples, std::size_t n, std::int32_t lower,
                    std::int32_t upper, int num_bins, std::uint32_t* bins);

}  // namespace demo
