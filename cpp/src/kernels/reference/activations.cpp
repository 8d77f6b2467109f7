// Reference softmax, softmax_topk, argmax and layer_norm: textbook formulas per row,
// exps and sums in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "reference.h"

namespace conveyor::kernels::reference {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

bool has_nan(const float* row, int64_t cols) {
  return std::any_of(row, row + cols, [](float v) { return std::isnan(v); });
}

void softmax_row(const float* row, int64_t cols, float* out) {
  if (has_nan(row, cols)) {
    std::fill(out, out + cols, kNaN);
    return;
  }
  const double max = cols > 0 ? *std::max_element(row, row + cols) : 0.0;
  std::vector<double> e(static_cast<size_t>(cols));
  double sum = 0.0;
  for (int64_t j = 0; j < cols; ++j) sum += e[static_cast<size_t>(j)] = std::exp(row[j] - max);
  for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<float>(e[static_cast<size_t>(j)] / sum);
}

// Larger first, NaN above everything, the lower index first among equals.
bool ranks_before(const float* row, int64_t a, int64_t b) {
  const float va = row[a], vb = row[b];
  if (std::isnan(va) != std::isnan(vb)) return std::isnan(va);
  if (!std::isnan(va) && va != vb) return va > vb;
  return a < b;
}

}  // namespace

void softmax(const float* x, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r) softmax_row(x + r * cols, cols, out + r * cols);
}

void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices) {
  std::vector<float> probabilities(static_cast<size_t>(cols));
  std::vector<int64_t> order(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    softmax_row(row, cols, probabilities.data());
    std::iota(order.begin(), order.end(), int64_t{0});
    std::sort(order.begin(), order.end(), [row](int64_t a, int64_t b) { return ranks_before(row, a, b); });
    for (int64_t j = 0; j < k; ++j) {
      indices[r * k + j] = order[static_cast<size_t>(j)];
      values[r * k + j] = probabilities[static_cast<size_t>(order[static_cast<size_t>(j)])];
    }
  }
}

void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    int64_t best = 0;
    for (int64_t j = 1; j < cols; ++j) {
      if (ranks_before(row, j, best)) best = j;
    }
    out[r] = best;
  }
}

void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    double mean = 0.0;
    for (int64_t j = 0; j < cols; ++j) mean += row[j];
    mean /= static_cast<double>(cols);
    double var = 0.0;
    for (int64_t j = 0; j < cols; ++j) var += (row[j] - mean) * (row[j] - mean);
    var /= static_cast<double>(cols);
    const double inv_std = 1.0 / std::sqrt(var + epsilon);
    for (int64_t j = 0; j < cols; ++j) {
      const double g = gamma ? gamma[j] : 1.0, b = beta ? beta[j] : 0.0;
      out[r * cols + j] = static_cast<float>((row[j] - mean) * inv_std * g + b);
    }
  }
}

}  // namespace conveyor::kernels::reference
