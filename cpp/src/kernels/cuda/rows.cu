// Row kernels over the last axis: softmax, softmax_topk (k <= 32), argmax, layer_norm.
//
// One block per row, row_block_threads(cols) threads (about 16 elements each), so short
// rows waste little and long rows still spread over the block. Each thread folds its
// share of the row into a small state (running max and sum, its own top k, its best
// key) and the block merges the states with warp shuffles and one round through shared
// memory. Ranking uses element_key (common.cuh): one 64-bit compare orders by value,
// NaN above +inf, then by lower index, exactly as kernels.h specifies.
#include <algorithm>
#include <string>

#include "common.cuh"

namespace conveyor::kernels::cuda {

namespace {

using detail::block_allreduce;
using detail::check_launch;
using detail::element_key;
using detail::for_each_in_row;
using detail::invalid;
using detail::key_float;
using detail::key_index;
using detail::MaxSum;
using detail::transform_row;

constexpr int kMaxRowThreads = 512;

// The running max and sum of the whole row, in every thread. softmax and softmax_topk
// both get their statistics here, in the same order, so they agree.
__device__ __forceinline__ MaxSum row_max_sum(const float* row, uint32_t cols, MaxSum* partials) {
  MaxSum acc{-INFINITY, 0.0f};
  for_each_in_row(row, cols, [&](float v, uint32_t) { detail::max_sum_add(acc, v); });
  return block_allreduce(acc, detail::MergeMaxSum{}, partials);
}

__global__ void __launch_bounds__(kMaxRowThreads)
    softmax_kernel(const float* x, float* out, uint32_t cols, int64_t first_row) {
  __shared__ MaxSum partials[32];
  const int64_t r = first_row + blockIdx.x;
  const float* row = x + r * cols;
  const MaxSum stats = row_max_sum(row, cols, partials);
  transform_row(row, out + r * cols, cols, [&](float v, uint32_t) { return expf(v - stats.max) / stats.sum; });
}

// The k best keys of the row, best first, with the row's max and sum. Each thread keeps
// its own K best in registers (a sorted list; the unrolled insertion keeps every index a
// compile-time constant, so the list never spills to local memory); then k rounds of a
// block-wide max pick the next best head and its owner pops it.
template <int K>
__global__ void __launch_bounds__(kMaxRowThreads)
    softmax_topk_kernel(const float* x, uint32_t cols, int k, float* values, int64_t* indices, int64_t first_row) {
  __shared__ MaxSum stat_partials[32];
  __shared__ uint64_t key_partials[32];
  const int64_t r = first_row + blockIdx.x;
  const float* row = x + r * cols;

  uint64_t top[K];
#pragma unroll
  for (int j = 0; j < K; ++j) top[j] = 0;
  // The list's smallest value as a float: most elements fall below it, and one float
  // compare skips building their key. -inf while the list has room (its last key is 0).
  float floor_value = -INFINITY;
  MaxSum acc{-INFINITY, 0.0f};
  for_each_in_row(row, cols, [&](float v, uint32_t i) {
    detail::max_sum_add(acc, v);
    if (!(v >= floor_value) && v == v) return;  // below the list (NaN always goes on to rank)
    const uint64_t key = element_key(v, i);
    if (key > top[K - 1]) {
      top[K - 1] = key;
#pragma unroll
      for (int j = K - 1; j > 0; --j) {
        if (top[j] > top[j - 1]) {
          const uint64_t t = top[j];
          top[j] = top[j - 1];
          top[j - 1] = t;
        }
      }
      // A NaN floor lets only NaN in from here on, which is the order: NaN ranks highest.
      if (top[K - 1] != 0) floor_value = key_float(top[K - 1]);
    }
  });
  const MaxSum stats = block_allreduce(acc, detail::MergeMaxSum{}, stat_partials);

  // Keys are unique within a row and k <= cols, so each round's best is a real element
  // held by exactly one thread.
  for (int j = 0; j < k; ++j) {
    const uint64_t best = block_allreduce(top[0], detail::MaxU64{}, key_partials);
    if (top[0] == best) {
#pragma unroll
      for (int i = 0; i < K - 1; ++i) top[i] = top[i + 1];
      top[K - 1] = 0;
    }
    if (threadIdx.x == 0) {
      values[r * k + j] = expf(key_float(best) - stats.max) / stats.sum;
      indices[r * k + j] = key_index(best);
    }
  }
}

__global__ void __launch_bounds__(kMaxRowThreads)
    argmax_kernel(const float* __restrict__ x, uint32_t cols, int64_t* __restrict__ out, int64_t first_row) {
  __shared__ uint64_t partials[32];
  const int64_t r = first_row + blockIdx.x;
  uint64_t best = 0;
  for_each_in_row(x + r * cols, cols, [&](float v, uint32_t i) {
    const uint64_t key = element_key(v, i);
    best = key > best ? key : best;
  });
  best = block_allreduce(best, detail::MaxU64{}, partials);
  if (threadIdx.x == 0) out[r] = key_index(best);
}

// Two-pass statistics (mean, then the mean squared deviation): the second pass reads the
// row from cache, and the result does not suffer the cancellation of E[x^2] - E[x]^2.
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_kernel(const float* x, uint32_t cols, const float* gamma, const float* beta, float epsilon,
                      float* out, int64_t first_row) {
  __shared__ float partials[32];
  const int64_t r = first_row + blockIdx.x;
  const float* row = x + r * cols;
  float sum = 0.0f;
  for_each_in_row(row, cols, [&](float v, uint32_t) { sum += v; });
  const float mean = block_allreduce(sum, detail::SumF{}, partials) / static_cast<float>(cols);
  float squares = 0.0f;
  for_each_in_row(row, cols, [&](float v, uint32_t) {
    const float d = v - mean;
    squares = fmaf(d, d, squares);
  });
  const float variance = block_allreduce(squares, detail::SumF{}, partials) / static_cast<float>(cols);
  const float inv_std = 1.0f / sqrtf(variance + epsilon);
  transform_row(row, out + r * cols, cols, [&](float v, uint32_t i) {
    const float g = gamma ? __ldg(gamma + i) : 1.0f;
    const float b = beta ? __ldg(beta + i) : 0.0f;
    return fmaf((v - mean) * inv_std, g, b);
  });
}

void check_rows(const char* kernel, int64_t rows, int64_t cols) {
  if (rows < 0) invalid(std::string(kernel) + ": rows must be >= 0, got " + std::to_string(rows));
  if (cols < 1) invalid(std::string(kernel) + ": cols must be >= 1, got " + std::to_string(cols));
  if (cols > kMaxCols) {
    invalid(std::string(kernel) + ": cols must be at most 2^31 - 1 on CUDA, got " + std::to_string(cols));
  }
}

// Launches `launch_rows(first_row, count, threads)` over all rows in grid-sized pieces.
template <typename LaunchRows>
void for_row_chunks(int64_t rows, int64_t cols, LaunchRows&& launch_rows) {
  const int threads = detail::row_block_threads(cols);
  for (int64_t first = 0; first < rows; first += detail::kMaxGridX) {
    launch_rows(first, static_cast<unsigned>(std::min(rows - first, detail::kMaxGridX)), threads);
  }
}

template <int K>
void launch_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                 cudaStream_t stream) {
  for_row_chunks(rows, cols, [&](int64_t first, unsigned blocks, int threads) {
    softmax_topk_kernel<K><<<blocks, threads, 0, stream>>>(x, static_cast<uint32_t>(cols), static_cast<int>(k),
                                                             values, indices, first);
    check_launch("softmax_topk");
  });
}

}  // namespace

void softmax(const float* x, int64_t rows, int64_t cols, float* out, const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  check_rows("softmax", rows, cols);
  if (rows == 0) return;
  if (x == nullptr || out == nullptr) invalid("softmax: x and out must not be null");
  for_row_chunks(rows, cols, [&](int64_t first, unsigned blocks, int threads) {
    softmax_kernel<<<blocks, threads, 0, detail::stream_of(launch)>>>(x, out, static_cast<uint32_t>(cols), first);
    check_launch("softmax");
  });
}

void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                  const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  check_rows("softmax_topk", rows, cols);
  if (k < 1 || k > cols) {
    invalid("softmax_topk: k must be between 1 and cols (" + std::to_string(cols) + "), got " + std::to_string(k));
  }
  if (rows == 0) return;
  if (x == nullptr || values == nullptr || indices == nullptr) {
    invalid("softmax_topk: x, values and indices must not be null");
  }
  const cudaStream_t stream = detail::stream_of(launch);
  // The register list is the next power of two up from k: a few instantiations cover
  // every k up to 32, and a list longer than k only costs a few compares.
  if (k <= 1) return launch_topk<1>(x, rows, cols, k, values, indices, stream);
  if (k <= 2) return launch_topk<2>(x, rows, cols, k, values, indices, stream);
  if (k <= 4) return launch_topk<4>(x, rows, cols, k, values, indices, stream);
  if (k <= 8) return launch_topk<8>(x, rows, cols, k, values, indices, stream);
  if (k <= 16) return launch_topk<16>(x, rows, cols, k, values, indices, stream);
  if (k <= detail::kMaxRegisterTopK) return launch_topk<32>(x, rows, cols, k, values, indices, stream);
  detail::softmax_topk_sorted(x, rows, cols, k, values, indices, launch);
}

void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out, const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  check_rows("argmax", rows, cols);
  if (rows == 0) return;
  if (x == nullptr || out == nullptr) invalid("argmax: x and out must not be null");
  for_row_chunks(rows, cols, [&](int64_t first, unsigned blocks, int threads) {
    argmax_kernel<<<blocks, threads, 0, detail::stream_of(launch)>>>(x, static_cast<uint32_t>(cols), out, first);
    check_launch("argmax");
  });
}

void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out, const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  check_rows("layer_norm", rows, cols);
  if (!(epsilon >= 0.0f)) invalid("layer_norm: epsilon must be >= 0, got " + std::to_string(epsilon));
  if (rows == 0) return;
  if (x == nullptr || out == nullptr) invalid("layer_norm: x and out must not be null");
  for_row_chunks(rows, cols, [&](int64_t first, unsigned blocks, int threads) {
    layer_norm_kernel<<<blocks, threads, 0, detail::stream_of(launch)>>>(x, static_cast<uint32_t>(cols), gamma, beta,
                                                                         epsilon, out, first);
    check_launch("layer_norm");
  });
}

}  // namespace conveyor::kernels::cuda
