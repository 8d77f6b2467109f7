// The contract between the dense dispatch (kernels/dense.cpp, compiled once) and its ISA
// variants (kernels/cpu/dense.cpp, compiled per ISA into conveyor::kernels::<isa>).
#pragma once

#include <cstdint>

#include "conveyor/dense.h"

namespace conveyor::kernels {

inline constexpr int64_t kPanelWidth = PackedDense::kPanelWidth;
// Row-block granularity the dispatch splits M by (a multiple of every variant's rows per
// micro-tile), so thread chunks never cut a tile short.
inline constexpr int64_t kRowGrain = 6;
// Longest K slice one micro-tile accumulates before its partial sums go to y: one
// panel slice (512 x 16 floats = 32 KiB) then fits the L1 cache, and the int8 path's
// per-slice float buffer lives on the stack.
inline constexpr int64_t kMaxBlockK = 512;

// One call's operands, shapes already validated. x [M, K] and y [M, N] are row-major.
struct DenseProblem {
  const float* x = nullptr;
  float* y = nullptr;
  int64_t M = 0, K = 0, N = 0;
  const float* panels_f32 = nullptr;  // exactly one of the two is set (PackedDense layout)
  const int8_t* panels_i8 = nullptr;
  const float* bias = nullptr;   // padded to whole panels, never null
  const float* scale = nullptr;  // padded; int8 only
  Activation act = Activation::kNone;
};

// Scratch memory for the variants (packed rows of x): at least `floats` floats, 64-byte
// aligned, owned by the calling thread and valid until its next call. Grows, never shrinks.
// Throws Error(kOutOfMemory).
float* dense_scratch(int64_t floats);

// Computes y[m0:m1, panel0*16 : min(panel1*16, N)] in full (every K slice, epilogue included).
// Distinct (rows, panels) rectangles may run concurrently.
#define CONVEYOR_DENSE_VARIANT_DECLS                                                          \
  void dense_rect(const DenseProblem& p, int64_t m0, int64_t m1, int64_t panel0, int64_t panel1); \
  /* out[k, n] = Wq[k, n] * scale[n] for rows [k0, k1) of a [K, N] matrix. */                 \
  void dequantize_rows(const int8_t* Wq, int64_t N, const float* scale, float* out, int64_t k0, \
                       int64_t k1);

namespace baseline {
CONVEYOR_DENSE_VARIANT_DECLS
}
namespace avx2 {
CONVEYOR_DENSE_VARIANT_DECLS
}

#undef CONVEYOR_DENSE_VARIANT_DECLS

}  // namespace conveyor::kernels
