// softmax, softmax_topk, argmax, layer_norm: argument checks, the thread split and the
// choice of ISA variant. The arithmetic lives in kernels/cpu/activations.cpp.
#include <algorithm>
#include <string>
#include <vector>

#include "conveyor/cpu_features.h"
#include "conveyor/error.h"
#include "conveyor/kernels.h"
#include "conveyor/thread_pool.h"
#include "cpu/activations.h"
#include "kernel_args.h"

namespace conveyor::kernels {

namespace {

const ActivationKernels& variant() {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  if (active_cpu_isa() == CpuIsa::kAvx2) return avx2::activation_kernels();
#endif
  return baseline::activation_kernels();
}

// Checks what every row kernel needs; returns false when there is nothing to compute.
bool check_rows(const char* kernel, const float* x, int64_t rows, int64_t cols, int threads) {
  if (rows < 0 || cols < 0) {
    invalid(kernel, "x must have a non-negative shape, got rows=" + std::to_string(rows) +
                        ", cols=" + std::to_string(cols));
  }
  check_threads(kernel, threads);
  if (rows == 0 || cols == 0) return false;
  if (x == nullptr) invalid(kernel, "x is null");
  return true;
}

size_t float_bytes(int64_t n) { return static_cast<size_t>(n) * sizeof(float); }

}  // namespace

void softmax(const float* x, int64_t rows, int64_t cols, float* out, int threads) {
  if (!check_rows("softmax", x, rows, cols, threads)) return;
  if (out != x && overlaps(out, x, float_bytes(rows * cols), float_bytes(rows * cols))) {
    invalid("softmax", "out overlaps x: pass out=x for in place, or a separate array");
  }
  const auto fn = variant().softmax;
  parallel_for(rows, useful_threads(threads, rows, cols), [&](int64_t begin, int64_t end) {
    fn(x, cols, out, begin, end);
  });
}

void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                  int threads) {
  if (k < 1 || k > cols) {
    invalid("softmax_topk", "k must be in [1, " + std::to_string(cols) + "] (the last axis of x), got " +
                                std::to_string(k));
  }
  if (!check_rows("softmax_topk", x, rows, cols, threads)) return;
  const size_t x_bytes = float_bytes(rows * cols), top_bytes = float_bytes(rows * k);
  const size_t index_bytes = static_cast<size_t>(rows * k) * sizeof(int64_t);
  if (overlaps(values, x, top_bytes, x_bytes)) invalid("softmax_topk", "values overlaps x");
  if (overlaps(indices, x, index_bytes, x_bytes)) invalid("softmax_topk", "indices overlaps x");
  if (overlaps(values, indices, top_bytes, index_bytes)) invalid("softmax_topk", "values overlaps indices");
  const auto fn = variant().softmax_topk;
  parallel_for(rows, useful_threads(threads, rows, cols), [&](int64_t begin, int64_t end) {
    fn(x, cols, k, values, indices, begin, end);
  });
}

void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out, int threads) {
  if (cols == 0 && rows > 0) invalid("argmax", "x has an empty last axis: there is no maximum");
  if (!check_rows("argmax", x, rows, cols, threads)) return;
  if (overlaps(out, x, static_cast<size_t>(rows) * sizeof(int64_t), float_bytes(rows * cols))) {
    invalid("argmax", "out overlaps x");
  }
  const auto fn = variant().argmax;
  parallel_for(rows, useful_threads(threads, rows, cols), [&](int64_t begin, int64_t end) {
    fn(x, cols, out, begin, end);
  });
}

void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out, int threads) {
  if (!(epsilon >= 0.0f) || epsilon == __builtin_inff()) {
    invalid("layer_norm", "epsilon must be finite and >= 0, got " + std::to_string(epsilon));
  }
  if (cols == 0 && rows > 0) invalid("layer_norm", "x has an empty last axis: there is nothing to normalize");
  if (!check_rows("layer_norm", x, rows, cols, threads)) return;
  const size_t bytes = float_bytes(rows * cols);
  if (out != x && overlaps(out, x, bytes, bytes)) {
    invalid("layer_norm", "out overlaps x: pass out=x for in place, or a separate array");
  }
  if (overlaps(out, gamma, bytes, float_bytes(cols))) invalid("layer_norm", "out overlaps gamma");
  if (overlaps(out, beta, bytes, float_bytes(cols))) invalid("layer_norm", "out overlaps beta");
  // The variants always scale and shift: ones and zeros stand in for a missing gamma/beta.
  std::vector<float> ones, zeros;
  if (!gamma) ones.assign(static_cast<size_t>(cols), 1.0f), gamma = ones.data();
  if (!beta) zeros.assign(static_cast<size_t>(cols), 0.0f), beta = zeros.data();
  const auto fn = variant().layer_norm;
  parallel_for(rows, useful_threads(threads, rows, cols), [&](int64_t begin, int64_t end) {
    fn(x, cols, gamma, beta, epsilon, out, begin, end);
  });
}

}  // namespace conveyor::kernels
