// Dense (fully connected) layers on the CPU: y = act(x @ W + b), float32.
//
// Weights are packed once, at load time, into the layout the kernels stream (column
// panels, see PackedDense); every call then runs one GEMM whose epilogue (bias, per-
// channel scale, activation) is applied to the accumulator registers before the single
// store of each output tile. int8 weights with per-output-channel float scales
// ("dequantize_dense") use the same entry point: the packed object knows its type.
//
// Everything here is callable without Python and without holding any lock: a packed
// weight is immutable, so one PackedDense serves any number of concurrent calls.
// Errors: Error(kInvalidInput) naming the argument ("[dense] ...").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "conveyor/tensor.h"

namespace conveyor {

enum class Activation : uint8_t { kNone, kRelu, kGeluErf, kGeluTanh, kSigmoid, kTanh };

// "none", "relu", "gelu_erf", "gelu_tanh", "sigmoid", "tanh".
const char* activation_name(Activation act) noexcept;
// Inverse of activation_name; throws Error(kInvalidInput) listing the accepted names.
Activation activation_from_name(std::string_view name);

// A dense layer's weights in kernel layout, plus its bias and activation.
//
// Layout: the N output columns are cut into panels of kPanelWidth (16) columns (the last
// one zero-padded); each panel stores its K x 16 block row by row, contiguous, panel
// after panel from a 64-byte aligned start, so a micro-kernel reads one panel (and M = 1
// the whole weight) as a single forward stream. The bias (zeros when absent) and the
// scales are padded to whole panels too. Both ISA variants read this same layout: forcing
// the ISA after packing is fine.
class PackedDense {
 public:
  static constexpr int64_t kPanelWidth = 16;

  int64_t in_features() const noexcept { return in_features_; }    // K
  int64_t out_features() const noexcept { return out_features_; }  // N
  Activation activation() const noexcept { return activation_; }
  bool has_bias() const noexcept { return has_bias_; }
  // int8 weights with per-output-channel scales: W = Wq * scale[n].
  bool quantized() const noexcept { return panels_i8_ != nullptr; }
  int64_t panel_count() const noexcept { return (out_features_ + kPanelWidth - 1) / kPanelWidth; }
  // Bytes held (panels, bias, scales).
  size_t nbytes() const noexcept { return nbytes_; }

  // Kernel-side views. Exactly one of the panel pointers is non-null. bias_padded() is
  // never null (zeros without a bias); scale_padded() is null unless quantized().
  const float* panels_f32() const noexcept { return panels_f32_; }
  const int8_t* panels_i8() const noexcept { return panels_i8_; }
  const float* bias_padded() const noexcept { return bias_; }
  const float* scale_padded() const noexcept { return scale_; }

  // Writes the weights back in [K, N] row-major order (the inverse of packing), e.g. to
  // upload them to another device. float: W; int8: Wq (unpack_int8) — unpack_f32 on a
  // quantized pack writes the dequantized Wq * scale instead.
  void unpack_f32(float* W) const;
  void unpack_int8(int8_t* Wq) const;  // throws Error(kInvalidInput) unless quantized()

 private:
  PackedDense() = default;
  friend std::shared_ptr<const PackedDense> pack_dense(const float*, int64_t, int64_t, const float*,
                                                       Activation);
  friend std::shared_ptr<const PackedDense> pack_dense_int8(const int8_t*, int64_t, int64_t,
                                                            const float*, const float*, Activation);
  void allocate(int64_t K, int64_t N, bool int8);

  int64_t in_features_ = 0;
  int64_t out_features_ = 0;
  Activation activation_ = Activation::kNone;
  bool has_bias_ = false;
  size_t nbytes_ = 0;
  std::shared_ptr<void> storage_;  // one aligned block; the pointers below point into it
  float* panels_f32_ = nullptr;
  int8_t* panels_i8_ = nullptr;
  float* bias_ = nullptr;
  float* scale_ = nullptr;
};

// Packs W [K, N] row-major (and bias [N], or null). K, N >= 1.
std::shared_ptr<const PackedDense> pack_dense(const float* W, int64_t K, int64_t N, const float* bias,
                                              Activation act);
// Packs int8 Wq [K, N] row-major with per-output-channel scale [N] (non-null), bias [N] or null.
std::shared_ptr<const PackedDense> pack_dense_int8(const int8_t* Wq, int64_t K, int64_t N,
                                                   const float* scale, const float* bias,
                                                   Activation act);

// The same on tensors (CPU, contiguous): checks dtypes (FP32 / INT8), ranks and sizes and
// names the offending argument ("W", "bias", "scale").
std::shared_ptr<const PackedDense> pack_dense(const Tensor& W, const Tensor* bias, Activation act);
std::shared_ptr<const PackedDense> pack_dense_int8(const Tensor& Wq, const Tensor& scale,
                                                   const Tensor* bias, Activation act);

// y [M, N] = act(x [M, K] @ W + b), both row-major and contiguous; y must not overlap x.
// Works on float and int8 packs alike. M == 0 is a no-op. `threads` (>= 1) bounds the
// threads used (the calling thread plus shared-pool workers, thread_pool.h); small
// problems use fewer.
void dense(const float* x, int64_t M, const PackedDense& packed, float* y, int threads);
// The same on tensors: checks dtype (FP32), device (CPU), shapes ([M, K] and [M, N]).
void dense(const Tensor& x, const PackedDense& packed, Tensor& out, int threads);
// dense() restricted to int8 packs: throws Error(kInvalidInput) for a float pack.
void dequantize_dense(const float* x, int64_t M, const PackedDense& packed, float* y, int threads);

// Dequantizes int8 Wq [K, N] with per-column scales into out [K, N] = Wq * scale[n]
// (row-major), at streaming bandwidth. For callers that need a float weight.
void dequantize_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale, float* out,
                     int threads);
void dequantize_int8(const Tensor& Wq, const Tensor& scale, Tensor& out, int threads);

namespace reference {

// Plain loops, the definition the kernels are tested against: the dot products are
// accumulated in double and the activations use <cmath> (std::erf, std::tanh), so their
// error is far below the kernels' float32 accumulation error. W is [K, N] row-major;
// scale (int8 only) and bias may be null.
void dense(const float* x, int64_t M, int64_t K, int64_t N, const float* W, const float* bias,
           Activation act, float* y);
void dequantize_dense(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* Wq,
                      const float* scale, const float* bias, Activation act, float* y);
// The activation alone, in double.
double activate(Activation act, double v) noexcept;

}  // namespace reference

}  // namespace conveyor
