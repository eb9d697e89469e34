#include "inclusive_scan.hpp"

#include <vector>

namespace demo {

// A direct port of the work-efficient GPU scan (Blelloch): an up-sweep builds
// a tree of partial sums in place, a down-sweep turns it into an exclusive
// scan, and a last pass adds each input to make it inclusive. On a GPU each
// level is one step of many threads; here each level is one strided loop.
void inclusive_scan(const std::int32_t* in, std::int32_t* out, std::size_t n) {
    std::size_t size = 1;
    while (size < n) {
        size *= 2;
    }
    std::vector<std::uint32_t> tree(size, 0);
    for (std::size_t i = 0; i < n; ++i) {
        tree[i] = static_cast<std::uint32_t>(in[i]);
    }

    for (std::size_t stride = 1; stride < size; stride *= 2) {
        for (std::size_t i = 2 * stride - 1; i < size; i += 2 * stride) {
            tree[i] += tree[i - stride];
        }
    }

    tree[size - 1] = 0;
    for (std::size_t stride = size / 2; stride >= 1; stride /= 2) {
        for (std::size_t i = 2 * stride - 1; i < size; i += 2 * stride) {
            const std::uint32_t left = tree[i - stride];
            tree[i - stride] = tree[i];
            tree[i] += left;
        }
    }

    for (std::size_t i = 0; i < n; ++i) {
        out[i] = static_cast<std::int32_t>(tree[i] + static_cast<std::uint32_t>(in[i]));
    }
}

}  // namespace demo
