// Adjacent difference, "subtract left" (modelled on a GPU primitives library's
// device-wide adjacent difference).
#pragma once

#include <cstddef>

namespace demo {

// Writes out[0] = in[0] and out[i] = in[i] - in[i - 1] for 0 < i < n.
// `in` and `out` are either the same array (in place) or do not overlap.
void adjacent_difference(const float* in, float* out, std::size_t n);

}  // namespace demo
