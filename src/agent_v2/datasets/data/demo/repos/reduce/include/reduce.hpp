// Sum reduction over a device-style flat array (modelled on a GPU primitives
// library's device-wide reduce).
#pragma once

#include <cstddef>

namespace demo {

// Returns the sum of data[0..n). The result may differ from a left-to-right
// sum by rounding only: callers compare with a relative tolerance.
double reduce_sum(const double* data, std::size_t n);

}  // namespace demo
