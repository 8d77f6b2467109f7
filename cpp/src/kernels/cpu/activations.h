// The per-ISA row kernels behind conveyor/kernels.h's softmax, softmax_topk, argmax and
// layer_norm. cpu/activations.cpp is compiled once per ISA; the dispatch
// (kernels/activations.cpp) validates arguments, splits rows over threads and calls
// the table of the active ISA. Each function handles rows [row_begin, row_end).
#pragma once

#include <cstdint>

namespace conveyor::kernels {

struct ActivationKernels {
  void (*softmax)(const float* x, int64_t cols, float* out, int64_t row_begin, int64_t row_end);
  void (*softmax_topk)(const float* x, int64_t cols, int64_t k, float* values, int64_t* indices,
                       int64_t row_begin, int64_t row_end);
  void (*argmax)(const float* x, int64_t cols, int64_t* out, int64_t row_begin, int64_t row_end);
  // gamma and beta are never null here (the dispatch substitutes ones and zeros).
  void (*layer_norm)(const float* x, int64_t cols, const float* gamma, const float* beta, float epsilon,
                     float* out, int64_t row_begin, int64_t row_end);
};

namespace baseline {
const ActivationKernels& activation_kernels() noexcept;
}
namespace avx2 {
const ActivationKernels& activation_kernels() noexcept;
}

}  // namespace conveyor::kernels
