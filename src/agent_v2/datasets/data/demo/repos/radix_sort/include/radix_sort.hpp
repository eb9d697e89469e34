// Radix sort of unsigned 32-bit keys (modelled on a GPU primitives library's
// device-wide radix sort).
#pragma once

#include <cstddef>
#include <cstdint>

namespace demo {

// Sorts keys[0..n) in ascending order, in place.
void radix_sort(std::uint32_t* keys, std::size_t n);

}  // namespace demo
