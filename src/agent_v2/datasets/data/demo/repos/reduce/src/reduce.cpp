#include "reduce.hpp"

namespace demo {

double reduce_sum(const double* data, std::size_t n) {
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        sum += data[i];
    }
    return sum;
}

}  // namespace demo
