#include "adjacent_difference.hpp"

#include <vector>

namespace demo {

void adjacent_difference(const float* in, float* out, std::size_t n) {
    // Work from a copy of the input so that an in-place call still reads the
    // original values.
    const std::vector<float> original(in, in + n);
    for (std::size_t i = 0; i < n; ++i) {
        out[i] = i == 0 ? original[0] : original[i] - original[i - 1];
    }
}

}  // namespace demo
