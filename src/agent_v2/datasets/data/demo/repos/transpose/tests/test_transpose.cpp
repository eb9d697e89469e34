#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#include "transpose.hpp"

namespace {

// Entry (i, j) of a rows x cols matrix holds a value that names its position.
std::vector<float> numbered_matrix(std::size_t rows, std::size_t cols) {
    std::vector<float> matrix(rows * cols);
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t j = 0; j < cols; ++j) {
            matrix[i * cols + j] = static_cast<float>(i * 10000 + j);
        }
    }
    return matrix;
}

// The transpose of numbered_matrix(rows, cols): entry (j, i) holds i * 10000 + j.
std::vector<float> expected_transpose(std::size_t rows, std::size_t cols) {
    std::vector<float> matrix(rows * cols);
    for (std::size_t j = 0; j < cols; ++j) {
        for (std::size_t i = 0; i < rows; ++i) {
            matrix[j * rows + i] = static_cast<float>(i * 10000 + j);
        }
    }
    return matrix;
}

void expect_transposes(std::size_t rows, std::size_t cols) {
    const std::vector<float> in = numbered_matrix(rows, cols);
    std::vector<float> out(rows * cols, -1.0f);
    demo::transpose(in.data(), out.data(), rows, cols);
    EXPECT_EQ(out, expected_transpose(rows, cols)) << rows << " x " << cols;
}

}  // namespace

TEST(Transpose, EmptyMatrices) {
    demo::transpose(nullptr, nullptr, 0, 0);
    demo::transpose(nullptr, nullptr, 0, 5);
    demo::transpose(nullptr, nullptr, 5, 0);
}

TEST(Transpose, SmallKnownValues) {
    const std::vector<float> in = {1, 2, 3, 4, 5, 6};  // 2 x 3
    std::vector<float> out(6);
    demo::transpose(in.data(), out.data(), 2, 3);
    EXPECT_EQ(out, (std::vector<float>{1, 4, 2, 5, 3, 6}));
}

TEST(Transpose, SquareMatrices) {
    for (std::size_t n : {1u, 2u, 3u, 4u, 5u, 8u, 16u, 17u, 31u, 32u, 33u, 100u, 256u}) {
        expect_transposes(n, n);
    }
}

TEST(Transpose, RectangularMatrices) {
    expect_transposes(1, 100);
    expect_transposes(100, 1);
    expect_transposes(3, 5);
    expect_transposes(7, 45);
    expect_transposes(64, 33);
    expect_transposes(129, 250);
}

TEST(Transpose, TwiceIsIdentity) {
    const std::vector<float> in = numbered_matrix(77, 130);
    std::vector<float> once(in.size());
    std::vector<float> twice(in.size());
    demo::transpose(in.data(), once.data(), 77, 130);
    demo::transpose(once.data(), twice.data(), 130, 77);
    EXPECT_EQ(twice, in);
}
