// Inclusive prefix sum over a flat array (modelled on a GPU primitives
// library's device-wide inclusive scan).
#pragma once

#include <cstddef>
#include <cstdint>

namespace demo {

// Writes out[i] = in[0] + ... + in[i] for every i < n, with 32-bit
// wrap-around arithmetic. `in` and `out` may be the same array.
void inclusive_scan(const std::int32_t* in, std::int32_t* out, std::size_t n);

}  // namespace demo
