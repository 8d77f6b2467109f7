// Private to the CUDA kernels: host-side launch plumbing (launch.cpp) and the device
// helpers the .cu files share (reductions, the total order used for ranking).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "conveyor/cuda_kernels.h"
#include "conveyor/error.h"
#include "conveyor/memory_pool.h"

namespace conveyor::kernels::cuda::detail {

// ---- host side (launch.cpp) ----------------------------------------------------------------

[[noreturn]] void invalid(const std::string& message);  // Error(kInvalidInput, "[kernels] " + message)

// Makes launch.device current on the calling thread for one call and restores the
// caller's device afterwards. Throws Error(kUnavailable) when no device is visible and
// Error(kInvalidInput) for a device index that names none.
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
  int target_;
};

inline cudaStream_t stream_of(const Launch& launch) { return static_cast<cudaStream_t>(launch.stream); }

// After a launch: turns a launch error (bad configuration, no kernel image for this
// GPU) into Error(kInternal) naming the kernel. Asynchronous faults surface later, on
// the stream, as with any CUDA work.
void check_launch(const char* kernel);
// Any other runtime call.
void check_cuda(cudaError_t rc, const char* call);

// The process-wide pool of device memory the kernels draw scratch space and packed
// weights from, created on first use (one per device).
std::shared_ptr<MemoryPool> device_pool(int device);

// Scratch memory for work queued on one stream of one device, from the device's memory
// pool, kept between calls for the few streams used most recently (kScratchStreamsPerDevice
// in launch.cpp bounds it). It grows on demand; a grow first waits for the work that used
// the old block, which only happens the first few times.
// The lease holds the stream's scratch lock: hold it from before the first launch that
// uses the memory until the last one is queued, so no other thread can grow it meanwhile;
// its end records an event on the stream, which later waits (grow, eviction) rely on.
// Precondition: launch.device is current.
struct StreamScratch;
class ScratchLease {
 public:
  ScratchLease(const Launch& launch, size_t nbytes);
  ~ScratchLease();
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  void* data() const noexcept { return data_; }

 private:
  // Declared before lock_, so the lock is released before the entry can be destroyed.
  std::shared_ptr<StreamScratch> entry_;
  std::unique_lock<std::mutex> lock_;
  cudaStream_t stream_ = nullptr;
  void* data_ = nullptr;
};

// y[r, c] = act(y[r, c] + bias[c]) over a row-major [rows, cols] matrix, in place; bias
// may be null. The pass after a GEMM whose epilogue cuBLASLt cannot do (elementwise.cu).
void apply_epilogue(float* y, int64_t rows, int64_t cols, const float* bias, Activation act, cudaStream_t stream);

// softmax_topk for k > kMaxRegisterTopK: sorts every row on the device (topk_sort.cu).
// Arguments already validated; the device is current.
inline constexpr int64_t kMaxRegisterTopK = 32;
void softmax_topk_sorted(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                         const Launch& launch);

// Rows handled per launch by the row kernels, to keep blockIdx.x within its limit.
inline constexpr int64_t kMaxGridX = 2147483647;

// Threads per block for a row of `cols` floats: about 16 elements per thread, between one
// warp and 512 threads. Shared by softmax and softmax_topk so their row statistics are
// computed identically (their values then agree bit for bit).
inline int row_block_threads(int64_t cols) {
  int threads = 32;
  while (threads < 512 && int64_t{threads} * 16 < cols) threads *= 2;
  return threads;
}

// ---- device side ------------------------------------------------------------------------------

#ifdef __CUDACC__

// Maps a float onto uint32 so that unsigned order is the ranking order of kernels.h:
// NaN above +inf, and -0 equal to +0 (they compare equal as floats, so ties by index).
__device__ __forceinline__ uint32_t rank_key(float v) {
  if (v != v) return 0xFFFFFFFFu;
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of rank_key for non-NaN keys (NaN keys decode to a quiet NaN).
__device__ __forceinline__ float key_value(uint32_t key) {
  if (key == 0xFFFFFFFFu) return __uint_as_float(0x7FC00000u);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// One 64-bit key per element, unique within a row: larger value first, then lower index
// first. 0 ranks below every element and serves as "empty".
__device__ __forceinline__ uint64_t element_key(float v, uint32_t index) {
  return (uint64_t{rank_key(v)} << 32) | (0xFFFFFFFFu - index);
}
__device__ __forceinline__ uint32_t key_index(uint64_t key) { return 0xFFFFFFFFu - uint32_t(key & 0xFFFFFFFFu); }
__device__ __forceinline__ float key_float(uint64_t key) { return key_value(uint32_t(key >> 32)); }

// Running max and sum of exp(x - max) over part of a row (online softmax).
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ void max_sum_add(MaxSum& acc, float x) {
  if (x > acc.max) {
    acc.sum = acc.sum * expf(acc.max - x) + 1.0f;
    acc.max = x;
  } else {
    // -inf adds nothing, also to an all -inf prefix (where x - max would be NaN); NaN
    // falls through to expf and poisons the sum, as the row's outputs must be NaN.
    acc.sum += (x == -INFINITY) ? 0.0f : expf(x - acc.max);
  }
}

__device__ __forceinline__ MaxSum max_sum_merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, a.sum + b.sum};  // keeps a NaN sum
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

struct MergeMaxSum {
  __device__ MaxSum operator()(MaxSum a, MaxSum b) const { return max_sum_merge(a, b); }
};
struct MaxU64 {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};
struct SumF {
  __device__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xFFFFFFFFu, v, lane_mask); }
__device__ __forceinline__ uint64_t shfl_xor(uint64_t v, int lane_mask) {
  return __shfl_xor_sync(0xFFFFFFFFu, static_cast<unsigned long long>(v), lane_mask);
}
__device__ __forceinline__ MaxSum shfl_xor(MaxSum v, int lane_mask) {
  return {shfl_xor(v.max, lane_mask), shfl_xor(v.sum, lane_mask)};
}

// Every lane ends with op over the warp's 32 values.
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) v = op(v, shfl_xor(v, mask));
  return v;
}

// Every thread ends with op over the block's values. blockDim.x is a multiple of 32 (at
// most 1024); `partials` is shared memory for 32 values. Contains two barriers, so every
// thread of the block must call it; calls may follow one another directly.
template <typename T, typename Op>
__device__ T block_allreduce(T v, Op op, T* partials) {
  v = warp_allreduce(v, op);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  if (threadIdx.x % 32 == 0) partials[threadIdx.x / 32] = v;
  __syncthreads();
  T total = partials[0];
  for (int w = 1; w < warps; ++w) total = op(total, partials[w]);
  __syncthreads();  // partials may be reused by the next call
  return total;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Calls f(value, index) for this thread's share of a row of `cols` floats, with 16-byte
// loads when the row is 16-byte aligned (cols % 4 == 0 and an aligned base): consecutive
// threads read consecutive vectors, so every warp load is coalesced. Plain loads, not
// the read-only path: softmax and layer_norm may write the row they read (in place).
template <typename F>
__device__ __forceinline__ void for_each_in_row(const float* row, uint32_t cols, F&& f) {
  if (aligned16(row) && cols % 4 == 0) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const uint32_t vectors = cols / 4;
    for (uint32_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const float4 q = row4[v];
      f(q.x, 4 * v);
      f(q.y, 4 * v + 1);
      f(q.z, 4 * v + 2);
      f(q.w, 4 * v + 3);
    }
  } else {
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) f(row[i], i);
  }
}

// out[i] = f(in[i]) over this thread's share of a row; out may be in (each element is
// read and then written by the same thread).
template <typename F>
__device__ __forceinline__ void transform_row(const float* in, float* out, uint32_t cols, F&& f) {
  if (aligned16(in) && aligned16(out) && cols % 4 == 0) {
    const float4* in4 = reinterpret_cast<const float4*>(in);
    float4* out4 = reinterpret_cast<float4*>(out);
    const uint32_t vectors = cols / 4;
    for (uint32_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const float4 q = in4[v];
      out4[v] = make_float4(f(q.x, 4 * v), f(q.y, 4 * v + 1), f(q.z, 4 * v + 2), f(q.w, 4 * v + 3));
    }
  } else {
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) out[i] = f(in[i], i);
  }
}

#endif  // __CUDACC__

}  // namespace conveyor::kernels::cuda::detail
