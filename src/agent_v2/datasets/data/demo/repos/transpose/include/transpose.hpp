// Matrix transpose (modelled on the transpose sample kernels that come with
// GPU primitives libraries).
#pragma once

#include <cstddef>

namespace demo {

// `in` is a rows x cols matrix in row-major order; writes its transpose, a
// cols x rows matrix in row-major order, to `out`: out[j * rows + i] =
// in[i * cols + j]. The two arrays do not overlap.
void transpose(const float* in, float* out, std::size_t rows, std::size_t cols);

}  // namespace demo
