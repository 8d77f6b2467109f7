// Plain reference implementations of the kernels in conveyor/kernels.h: the same
// arguments (no thread count), one obvious loop per formula, std::exp and the textbook
// two-step formulas, sums in double. They define what the fused kernels compute; the
// C++ and Python tests compare the fused kernels against them. Never on a hot path.
#pragma once

#include <cstdint>

#include "../cpu/monitor_scoring.h"
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

// The monitor's scoring (kernels/cpu/monitor_scoring.h): bin_chunk with std::upper_bound
// over the edges (padding unread), and the full quadratic form d^T P d of a k x k
// row-major P, summed in double in row order.
void bin_chunk(const double* values, int64_t rows, const BinTable* tables, int64_t features, uint16_t* bins,
               uint8_t* states, uint8_t* row_flags);
double quadratic_form(const double* d, const double* precision, int64_t k);

}  // namespace conveyor::kernels::reference
