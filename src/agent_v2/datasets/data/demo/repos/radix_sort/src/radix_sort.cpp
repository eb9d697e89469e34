#include "radix_sort.hpp"

#include <vector>

namespace demo {

// Least-significant-bit-first radix sort with one bit per pass: each of the 32
// passes moves the keys whose bit is 0 to the front and those whose bit is 1 to
// the back, keeping their order (the "split" primitive of GPU radix sorts).
void radix_sort(std::uint32_t* keys, std::size_t n) {
    std::vector<std::uint32_t> buffer(n);
    for (int bit = 0; bit < 32; ++bit) {
        std::size_t zeros = 0;
        for (std::size_t i = 0; i < n; ++i) {
            zeros += ((keys[i] >> bit) & 1u) == 0;
        }
        std::size_t next_zero = 0;
        std::size_t next_one = zeros;
        for (std::size_t i = 0; i < n; ++i) {
            if (((keys[i] >> bit) & 1u) == 0) {
                buffer[next_zero++] = keys[i];
            } else {
                buffer[next_one++] = keys[i];
            }
        }
        for (std::size_t i = 0; i < n; ++i) {
            keys[i] = buffer[i];
        }
    }
}

}  // namespace demo
