// The fused kernels of conveyor/kernels.h and conveyor/dense.h on CUDA GPUs.
//
// Same arguments and semantics as the CPU kernels (NaN order, ties to the lower index,
// 1 <= k <= cols, in-place softmax and layer_norm), with the thread count replaced by a
// Launch: the device that owns every pointer and the stream the work is queued on. All
// pointers are device memory of that device (or managed memory), C-contiguous.
//
// Asynchrony: a call validates its arguments, queues its kernels on launch.stream and
// returns; nothing synchronises with the host. Inputs must stay alive and unchanged, and
// outputs unread, until the stream has run the work (the stream's usual contract).
//
// Builds without CUDA link cpp/src/kernels/cuda_stub.cpp instead, where every function
// throws Error(kUnavailable, "[kernels] CUDA support was not built ..."); builds with
// CUDA throw the same code when no device is visible at run time. Bad sizes throw
// Error(kInvalidInput) naming the argument; a failed launch throws Error(kInternal).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conveyor/dense.h"
#include "conveyor/kernels.h"
#include "conveyor/tensor.h"

namespace conveyor::kernels::cuda {

struct Launch {
  int device = 0;
  void* stream = nullptr;  // a cudaStream_t; null is the legacy default stream
};

// Channels normalize_image accepts on CUDA: the per-channel coefficients travel as
// kernel arguments.
inline constexpr int64_t kMaxImageChannels = 32;
// Longest row (cols) the row kernels accept: indices are carried in 32 bits on the GPU.
inline constexpr int64_t kMaxCols = (int64_t{1} << 31) - 1;

// mean and std (`channels` floats each) are host memory: they are folded into per-channel
// coefficients that travel with the launch.
void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout, const Launch& launch);

void softmax(const float* x, int64_t rows, int64_t cols, float* out, const Launch& launch);

// k <= 32 runs in one pass over x (the top k of each thread kept in registers, then
// merged across the block); larger k sorts each row on the device instead, using
// scratch memory from the device's pool.
void softmax_topk(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                  const Launch& launch);

void argmax(const float* x, int64_t rows, int64_t cols, int64_t* out, const Launch& launch);

void layer_norm(const float* x, int64_t rows, int64_t cols, const float* gamma, const float* beta, float epsilon,
                float* out, const Launch& launch);

// out [K, N] = Wq [K, N] * scale[n], row-major; scale holds N floats.
void dequantize_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale, float* out, const Launch& launch);

// ---- dense through cuBLASLt -------------------------------------------------------------
//
// A dense layer's weights on one device: W [K, N] (row-major float32; int8 packs are
// dequantized to float32 once, at pack time), the bias and the activation. cuBLASLt runs
// y = x @ W with the bias and relu / gelu_tanh in its epilogue; gelu_erf, sigmoid and
// tanh, which it lacks, take one more elementwise pass over y.
//
// Thread safety: immutable after packing except for a cache of cuBLASLt plans (one per
// batch size M) behind a lock; any number of threads may call forward() at once.
class CudaDense {
 public:
  virtual ~CudaDense() = default;

  int64_t in_features() const noexcept { return in_features_; }    // K
  int64_t out_features() const noexcept { return out_features_; }  // N
  Activation activation() const noexcept { return activation_; }
  bool has_bias() const noexcept { return has_bias_; }
  // Packed from int8 weights and scales (the weight it holds is their float product).
  bool quantized() const noexcept { return quantized_; }
  int device() const noexcept { return device_; }
  // Device bytes held (weights and bias).
  virtual size_t nbytes() const noexcept = 0;
  // The float32 weight [K, N] row-major and the bias [N] (null without one), on device().
  virtual const float* weight() const noexcept = 0;
  virtual const float* bias() const noexcept = 0;

  // y [M, N] = act(x [M, K] @ W + b), both on device(), queued on `stream`. M == 0 is a
  // no-op; y must not overlap x.
  virtual void forward(const float* x, int64_t M, float* y, void* stream) const = 0;

 protected:
  CudaDense(int64_t K, int64_t N, Activation act, bool has_bias, bool quantized, int device)
      : in_features_(K), out_features_(N), activation_(act), has_bias_(has_bias), quantized_(quantized),
        device_(device) {}

 private:
  int64_t in_features_;
  int64_t out_features_;
  Activation activation_;
  bool has_bias_;
  bool quantized_;
  int device_;
};

// Copies W [K, N] (row-major float32) and bias [N] (or null) to `device`. The sources may
// be host or device memory of any device (the copy is synchronous: this is load-time
// work). Throws Error(kUnavailable) when this build has no cuBLASLt GEMM path or
// libcublasLt cannot be loaded.
std::shared_ptr<const CudaDense> pack_dense(const float* W, int64_t K, int64_t N, const float* bias,
                                            Activation act, int device);
// The same for int8 Wq [K, N] with per-output-channel scale [N] (non-null): the weight is
// dequantized on the device to Wq * scale.
std::shared_ptr<const CudaDense> pack_dense_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale,
                                                 const float* bias, Activation act, int device);

// ---- build and run-time facts -------------------------------------------------------------

// Whether this build compiled the cuBLASLt GEMM path (its headers were found).
bool cublaslt_built() noexcept;
// The file name libcublasLt is loaded by ("libcublasLt.so.13"); empty without the path.
std::string cublaslt_soname();
// Adds files to try, first, when libcublasLt is loaded at the first dense call (a Python
// wheel's copy, say). Has no effect once the library is loaded.
void add_cublaslt_candidates(const std::vector<std::string>& paths);
// Loads libcublasLt now if not yet loaded; returns the path or name it was loaded from.
// Throws Error(kUnavailable) listing every place tried and why each failed.
std::string load_cublaslt();
// The loaded library's version (major * 10000 + minor * 100 + patch); 0 when not loaded.
int cublaslt_version() noexcept;
// The GPU architectures the kernels were compiled for ("80;90"), empty without CUDA.
std::string compiled_architectures();

}  // namespace conveyor::kernels::cuda
