#include "transpose.hpp"

namespace demo {

// Read the input row by row; each write lands `rows` floats after the previous one.
void transpose(const float* in, float* out, std::size_t rows, std::size_t cols) {
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t j = 0; j < cols; ++j) {
            out[j * rows + i] = in[i * cols + j];
        }
    }
}

}  // namespace demo
