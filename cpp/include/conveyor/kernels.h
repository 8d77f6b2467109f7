// Fused CPU kernels for pre- and post-processing around a model.
//
// Each kernel reads caller-owned inputs and writes caller-owned outputs (raw pointers,
// C-contiguous, row-major); none allocates its outputs. Work is split over the batch
// (rows or image rows) on up to `threads` threads of the shared pool (thread_pool.h);
// results do not depend on the thread count. The instruction set (x86-64 baseline or
// AVX2+FMA) is chosen per call from active_cpu_isa() (cpu_features.h); the two paths
// agree to a few float ulps, not bit for bit (FMA rounds once where the baseline
// rounds twice). Plain reference implementations of every kernel live in
// cpp/src/kernels/reference/ and are what the tests compare against.
//
// Errors: Error(kInvalidInput) naming the argument for a bad size, k, threads, or
// outputs that overlap the inputs in a way the kernel does not allow (below).
#pragma once

#include <cstdint>

#include "conveyor/tensor.h"

namespace conveyor::kernels {

enum class ImageLayout : uint8_t { kNCHW, kNHWC };

struct ImageShape {
  int64_t batch = 0, height = 0, width = 0, channels = 0;
};

// images: uint8 [batch, height, width, channels] (NHWC). mean, std: `channels` floats.
// out: out_dtype (kFloat32 or kFloat16), [batch, channels, height, width] for kNCHW or
// [batch, height, width, channels] for kNHWC.
// out[c] = (x * scale - mean[c]) / std[c], computed in one pass as x * a[c] + b[c] with
// a = scale / std and b = -mean / std (so it differs from the two-step formula by float
// rounding only). float16 rounds to nearest even; beyond its range it is +-infinity.
// Large outputs are written with streaming stores (they bypass the cache: the output
// would evict everything else anyway). std[c] must be finite and non-zero.
// out must not overlap images.
void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout, int threads);

// Every function below treats x as `rows` rows of `cols` floats (the last axis).
//
// NaN: a row that contains NaN gives NaN for every softmax / layer_norm output of that
// row and NaN softmax_topk values; argmax and softmax_topk rank NaN above +infinity
// (numpy's order), so argmax returns the first NaN. Ties go to the lower index.

// out = exp(x - max(x)) / sum(exp(x - max(x))) per row. out may be x itself (in place);
// any other overlap is rejected. Values below 2^-126 before the division flush to zero.
void softmax(const float* x, int64_t rows, int64_t cols, float* out, int threads);

// The k largest logits of each row, best first (ties: lower index first), and their
// softmax probabilities, without materialising the probabilities of the whole row:
// one pass finds the max (and a lower bound on the k-th largest logit), a second sums
// exp(x - max) and meanwhile notes the few logits that reach the bound, from which the
// top k are chosen (exp is monotonic); only k more exps are needed. values equal
// softmax(x) at indices bit for bit on the same ISA. 1 <= k <= cols.
// values: float [rows, k]; indices: int64 [rows, k]; neither may overlap x or the other.
void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                  int threads);

// Index of the largest value per row (first one on ties; first NaN if any). cols >= 1.
// out: int64 [rows], must not overlap x.
void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out, int threads);

// out = (x - mean) / sqrt(var + epsilon) * gamma + beta per row, with the population
// variance (divided by cols), as ONNX LayerNormalization and torch.nn.LayerNorm.
// gamma, beta: `cols` floats each, or null for 1 and 0. epsilon >= 0, cols >= 1.
// out may be x itself (in place); any other overlap with x, gamma or beta is rejected.
void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out, int threads);

}  // namespace conveyor::kernels
