// Plain reference implementations of the kernels in conveyor/kernels.h: the same
// arguments (no thread count), one obvious loop per formula, std::exp and the textbook
// two-step formulas, sums in double. They define what the fused kernels compute; the
// C++ and Python tests compare the fused kernels against them. Never on a hot path.
#pragma once

#include <cstdint>

#include "conveyor/kernels.h"

namespace conveyor::kernels::reference {

// out[c] = (x * scale - mean[c]) / std[c], evaluated in that order in float.
void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout);

void softmax(const float* x, int64_t rows, int64_t cols, float* out);

// Sorts every index of the row (larger first, NaN first, lower index first among equals)
// and keeps the first k; values are the row's softmax at those indices.
void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices);

void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out);

void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out);

// IEEE binary16 bits of x, rounded to nearest even (the reference for float16 outputs).
uint16_t float_to_half(float x);

}  // namespace conveyor::kernels::reference
