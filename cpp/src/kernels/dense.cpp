// Dense layers: argument checks, weight packing and the choice of ISA variant and thread
// split. The arithmetic lives in kernels/cpu/dense.cpp (one copy per ISA).
//
// BLAS: none, by measurement. On the development machine (AMD EPYC Zen 4, one thread,
// AVX2 path) against OpenBLAS 0.3.34 sgemm (its AVX-512 SkylakeX kernels, from the
// scipy-openblas32 wheel), speedup = OpenBLAS time / ours, ours including bias + relu:
//   512x512:     M=1 1.34, M=8 1.61, M=64 1.11, M=256 1.06, M=1024 1.05, M=4096 1.05
//   1024x1024:   M=256 1.06, M=2048 1.04        4096x4096: M=1 3.3, M=16 1.51
//   768x3072:    M=128 1.06, M=1024 0.96        3072x768:  M=128 1.01, M=1024 0.97
//   2048x2048:   M=256 0.99, M=512 0.97, M=1024 0.96, M=2048 0.98
//   1024x4096:   M=1024 0.97                    4096x2048: M=1024 0.93
// So the crossover is near M = 256-512 for layers of ~2M weights and more: past it
// OpenBLAS leads by 2-7%. (bench/bench_dense.py measures the same against numpy's
// OpenBLAS.) Packing B once at load time spares the packing OpenBLAS redoes per call,
// which decides small and mid sizes; its lead at large ones is probably its larger tiles
// (AVX-512 has 32 registers to AVX2's 16).
// Not taken: OpenBLAS needs W unpacked, i.e. a second copy of every large weight (one
// layer serves M = 1 as well as M = 1024), plus a runtime library and an epilogue pass
// per GEMM block, for a few percent at batch sizes beyond what a server usually forms.
#include "conveyor/dense.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "conveyor/cpu_features.h"
#include "conveyor/error.h"
#include "conveyor/thread_pool.h"
#include "dense_internal.h"

namespace conveyor {

namespace {

using kernels::kPanelWidth;
using kernels::kRowGrain;

constexpr const char* kActivationNames[] = {"none", "relu", "gelu_erf", "gelu_tanh", "sigmoid", "tanh"};
constexpr size_t kAlignment = 64;
// Multiply-adds each thread should get before another is worth waking: handing work to a
// pool worker measured ~20-25 us on the development VM (M=8, 512x512: 41 us on one
// thread, 48 us on two), so each thread gets at least ~40 us of work (2M multiply-adds).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 21;

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidInput, "[dense] " + message);
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

void check_dims(int64_t K, int64_t N) {
  if (K < 1 || N < 1) {
    invalid("W must have at least one row and one column, got [" + std::to_string(K) + ", " +
            std::to_string(N) + "]");
  }
}

// Copies a [K, N] row-major matrix into panel layout, zero-filling the last panel's padding.
template <class T>
void pack_panels(const T* W, int64_t K, int64_t N, T* panels) {
  const int64_t panel_count = (N + kPanelWidth - 1) / kPanelWidth;
  for (int64_t panel = 0; panel < panel_count; ++panel) {
    const int64_t col0 = panel * kPanelWidth, cols = std::min(kPanelWidth, N - col0);
    T* dst = panels + panel * K * kPanelWidth;
    for (int64_t k = 0; k < K; ++k, dst += kPanelWidth) {
      std::memcpy(dst, W + k * N + col0, static_cast<size_t>(cols) * sizeof(T));
      std::memset(dst + cols, 0, static_cast<size_t>(kPanelWidth - cols) * sizeof(T));
    }
  }
}

template <class T>
void unpack_panels(const T* panels, int64_t K, int64_t N, T* W) {
  const int64_t panel_count = (N + kPanelWidth - 1) / kPanelWidth;
  for (int64_t panel = 0; panel < panel_count; ++panel) {
    const int64_t col0 = panel * kPanelWidth, cols = std::min(kPanelWidth, N - col0);
    const T* src = panels + panel * K * kPanelWidth;
    for (int64_t k = 0; k < K; ++k, src += kPanelWidth) {
      std::memcpy(W + k * N + col0, src, static_cast<size_t>(cols) * sizeof(T));
    }
  }
}

using RectFn = void (*)(const kernels::DenseProblem&, int64_t, int64_t, int64_t, int64_t);
using DequantizeFn = void (*)(const int8_t*, int64_t, const float*, float*, int64_t, int64_t);

RectFn rect_variant() {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  if (active_cpu_isa() == CpuIsa::kAvx2) return kernels::avx2::dense_rect;
#endif
  return kernels::baseline::dense_rect;
}

DequantizeFn dequantize_variant() {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  if (active_cpu_isa() == CpuIsa::kAvx2) return kernels::avx2::dequantize_rows;
#endif
  return kernels::baseline::dequantize_rows;
}

int useful_threads(int threads, int64_t macs) {
  if (threads < 1) invalid("threads must be >= 1, got " + std::to_string(threads));
  return static_cast<int>(std::clamp<int64_t>(macs / kMinMacsPerThread, 1, threads));
}

// Runs fn over [0, units) in chunks that the threads pull from a shared counter, instead
// of each taking a fixed share: the caller starts at once while a pool worker is still
// waking (20-50 us on the development VM), and a descheduled thread holds up only the
// chunk it is on. Up to 16 chunks per thread, each of at least min_chunk units.
// Measured (M=64, 512x512, two threads): 1.77x over one thread, against 1.62-1.69x with
// fixed halves.
template <class Fn>
void share_out(int64_t units, int64_t min_chunk, int threads, const Fn& fn) {
  const int64_t chunks = std::clamp<int64_t>(units / min_chunk, threads, int64_t{16} * threads);
  const int64_t chunk = (units + chunks - 1) / chunks;
  std::atomic<int64_t> next{0};
  parallel_for(threads, threads, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < units; begin = next.fetch_add(chunk)) {
      fn(begin, std::min(units, begin + chunk));
    }
  });
}

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

void check_tensor(const Tensor& t, const char* what, DType dtype, int ndim) {
  if (t.device.kind == DeviceKind::kCUDA) invalid(std::string(what) + " must be a CPU tensor, got a CUDA one");
  if (t.dtype != dtype) {
    invalid(std::string(what) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  }
  if (t.shape.ndim() != ndim) {
    invalid(std::string(what) + " must have " + std::to_string(ndim) + " dimension(s), got shape " +
            t.shape.to_string());
  }
  if (t.data == nullptr && t.shape.numel() > 0) invalid(std::string(what) + " has no data");
}

const float* optional_vector(const Tensor* t, const char* what, int64_t n) {
  if (t == nullptr) return nullptr;
  check_tensor(*t, what, DType::kFloat32, 1);
  if ((*t).shape[0] != n) {
    invalid(std::string(what) + " must have shape [" + std::to_string(n) + "] (W's columns), got " +
            t->shape.to_string());
  }
  return static_cast<const float*>(t->data);
}

}  // namespace

float* kernels::dense_scratch(int64_t floats) {
  struct Scratch {
    std::unique_ptr<float, decltype(&std::free)> data{nullptr, &std::free};
    int64_t floats = 0;
  };
  thread_local Scratch scratch;
  if (scratch.floats < floats) {
    const size_t bytes = round_up(static_cast<size_t>(floats) * sizeof(float), kAlignment);
    scratch.data.reset(static_cast<float*>(std::aligned_alloc(kAlignment, bytes)));
    scratch.floats = scratch.data ? floats : 0;
    if (!scratch.data) throw Error(ErrorCode::kOutOfMemory, "[dense] no memory for " + std::to_string(bytes) + " bytes of scratch");
  }
  return scratch.data.get();
}

const char* activation_name(Activation act) noexcept { return kActivationNames[static_cast<int>(act)]; }

Activation activation_from_name(std::string_view name) {
  for (int i = 0; i < static_cast<int>(std::size(kActivationNames)); ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  invalid("activation must be one of none, relu, gelu_erf, gelu_tanh, sigmoid, tanh; got '" +
          std::string(name) + "'");
}

// ---- PackedDense -----------------------------------------------------------------------------

void PackedDense::allocate(int64_t K, int64_t N, bool int8) {
  const size_t padded_n = static_cast<size_t>(panel_count() * kPanelWidth);
  const size_t panel_bytes = round_up(static_cast<size_t>(K) * padded_n * (int8 ? 1 : sizeof(float)), kAlignment);
  const size_t vector_bytes = round_up(padded_n * sizeof(float), kAlignment);
  const size_t total = panel_bytes + vector_bytes * (int8 ? 2 : 1);
  void* block = std::aligned_alloc(kAlignment, total);
  if (block == nullptr) {
    throw Error(ErrorCode::kOutOfMemory,
                "[dense] packing a [" + std::to_string(K) + ", " + std::to_string(N) + "] weight needs " +
                    std::to_string(total) + " bytes");
  }
  storage_ = std::shared_ptr<void>(block, std::free);
  nbytes_ = total;
  auto* base = static_cast<char*>(block);
  if (int8) {
    panels_i8_ = reinterpret_cast<int8_t*>(base);
    scale_ = reinterpret_cast<float*>(base + panel_bytes + vector_bytes);
  } else {
    panels_f32_ = reinterpret_cast<float*>(base);
  }
  bias_ = reinterpret_cast<float*>(base + panel_bytes);
}

void PackedDense::unpack_f32(float* W) const {
  if (panels_f32_) return unpack_panels(panels_f32_, in_features_, out_features_, W);
  unpack_panels(panels_i8_, in_features_, out_features_, reinterpret_cast<int8_t*>(W));
  // Dequantize in place, back to front: byte i lies below float i's bytes, so each byte is
  // read before anything overwrites it.
  const int64_t K = in_features_, N = out_features_;
  const auto* q = reinterpret_cast<const int8_t*>(W);
  for (int64_t i = K * N - 1; i >= 0; --i) W[i] = static_cast<float>(q[i]) * scale_[i % N];
}

void PackedDense::unpack_int8(int8_t* Wq) const {
  if (!panels_i8_) invalid("unpack_int8 needs an int8 pack; this one holds float32 weights");
  unpack_panels(panels_i8_, in_features_, out_features_, Wq);
}

std::shared_ptr<const PackedDense> pack_dense(const float* W, int64_t K, int64_t N, const float* bias,
                                              Activation act) {
  check_dims(K, N);
  if (W == nullptr) invalid("W is null");
  std::shared_ptr<PackedDense> packed(new PackedDense());
  packed->in_features_ = K;
  packed->out_features_ = N;
  packed->activation_ = act;
  packed->has_bias_ = bias != nullptr;
  packed->allocate(K, N, /*int8=*/false);
  pack_panels(W, K, N, packed->panels_f32_);
  const int64_t padded_n = packed->panel_count() * kPanelWidth;
  std::fill(packed->bias_, packed->bias_ + padded_n, 0.0f);
  if (bias) std::copy(bias, bias + N, packed->bias_);
  return packed;
}

std::shared_ptr<const PackedDense> pack_dense_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale,
                                                   const float* bias, Activation act) {
  check_dims(K, N);
  if (Wq == nullptr) invalid("Wq is null");
  if (scale == nullptr) invalid("scale is null: int8 weights need one float scale per output column");
  std::shared_ptr<PackedDense> packed(new PackedDense());
  packed->in_features_ = K;
  packed->out_features_ = N;
  packed->activation_ = act;
  packed->has_bias_ = bias != nullptr;
  packed->allocate(K, N, /*int8=*/true);
  pack_panels(Wq, K, N, packed->panels_i8_);
  const int64_t padded_n = packed->panel_count() * kPanelWidth;
  std::fill(packed->bias_, packed->bias_ + padded_n, 0.0f);
  if (bias) std::copy(bias, bias + N, packed->bias_);
  std::fill(packed->scale_, packed->scale_ + padded_n, 0.0f);
  std::copy(scale, scale + N, packed->scale_);
  return packed;
}

std::shared_ptr<const PackedDense> pack_dense(const Tensor& W, const Tensor* bias, Activation act) {
  check_tensor(W, "W", DType::kFloat32, 2);
  const int64_t K = W.shape[0], N = W.shape[1];
  check_dims(K, N);
  return pack_dense(static_cast<const float*>(W.data), K, N, optional_vector(bias, "bias", N), act);
}

std::shared_ptr<const PackedDense> pack_dense_int8(const Tensor& Wq, const Tensor& scale, const Tensor* bias,
                                                   Activation act) {
  check_tensor(Wq, "Wq", DType::kInt8, 2);
  const int64_t K = Wq.shape[0], N = Wq.shape[1];
  check_dims(K, N);
  const float* scale_data = optional_vector(&scale, "scale", N);
  return pack_dense_int8(static_cast<const int8_t*>(Wq.data), K, N, scale_data,
                         optional_vector(bias, "bias", N), act);
}

// ---- dense -------------------------------------------------------------------------------------

void dense(const float* x, int64_t M, const PackedDense& packed, float* y, int threads) {
  if (M < 0) invalid("M must be >= 0, got " + std::to_string(M));
  const int64_t K = packed.in_features(), N = packed.out_features();
  threads = useful_threads(threads, M * K * N);
  if (M == 0) return;
  if (x == nullptr || y == nullptr) invalid("x and the output must not be null");
  if (overlaps(x, static_cast<size_t>(M * K) * sizeof(float), y, static_cast<size_t>(M * N) * sizeof(float))) {
    invalid("the output overlaps x: it needs its own memory");
  }
  kernels::DenseProblem p;
  p.x = x;
  p.y = y;
  p.M = M;
  p.K = K;
  p.N = N;
  p.panels_f32 = packed.panels_f32();
  p.panels_i8 = packed.panels_i8();
  p.bias = packed.bias_padded();
  p.scale = packed.scale_padded();
  p.act = packed.activation();

  const RectFn rect = rect_variant();
  const int64_t panels = packed.panel_count();
  const int64_t row_units = (M + kRowGrain - 1) / kRowGrain;
  if (threads == 1) return rect(p, 0, M, 0, panels);
  // Split the larger operand: every thread reads all of the other one, so splitting N
  // (panels) costs M*K + K*N/threads reads per thread and splitting M costs
  // M*K/threads + K*N. Small batches thus split the weight.
  const bool split_panels = (M < N || row_units < threads) && panels >= threads;
  if (split_panels) {
    share_out(panels, 1, threads, [&](int64_t begin, int64_t end) { rect(p, 0, M, begin, end); });
  } else {
    // Row chunks of 8+ tiles (48 rows), so that each reuses the panel slices it loads.
    share_out(row_units, 8, threads, [&](int64_t begin, int64_t end) {
      rect(p, begin * kRowGrain, std::min(M, end * kRowGrain), 0, panels);
    });
  }
}

void dense(const Tensor& x, const PackedDense& packed, Tensor& out, int threads) {
  check_tensor(x, "x", DType::kFloat32, 2);
  check_tensor(out, "out", DType::kFloat32, 2);
  const int64_t M = x.shape[0];
  if (x.shape[1] != packed.in_features()) {
    invalid("x must have shape [M, " + std::to_string(packed.in_features()) + "] (W's rows), got " +
            x.shape.to_string());
  }
  if (out.shape[0] != M || out.shape[1] != packed.out_features()) {
    invalid("out must have shape [" + std::to_string(M) + ", " + std::to_string(packed.out_features()) +
            "], got " + out.shape.to_string());
  }
  dense(static_cast<const float*>(x.data), M, packed, static_cast<float*>(out.data), threads);
}

void dequantize_dense(const float* x, int64_t M, const PackedDense& packed, float* y, int threads) {
  if (!packed.quantized()) invalid("dequantize_dense needs an int8 pack (pack_dense_int8); this one is float32");
  dense(x, M, packed, y, threads);
}

void dequantize_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale, float* out, int threads) {
  check_dims(K, N);
  if (Wq == nullptr || scale == nullptr || out == nullptr) invalid("Wq, scale and out must not be null");
  threads = useful_threads(threads, K * N / 8);
  const DequantizeFn rows = dequantize_variant();
  parallel_for(K, threads, [&](int64_t begin, int64_t end) { rows(Wq, N, scale, out, begin, end); });
}

void dequantize_int8(const Tensor& Wq, const Tensor& scale, Tensor& out, int threads) {
  check_tensor(Wq, "Wq", DType::kInt8, 2);
  const int64_t K = Wq.shape[0], N = Wq.shape[1];
  check_dims(K, N);
  const float* scale_data = optional_vector(&scale, "scale", N);
  check_tensor(out, "out", DType::kFloat32, 2);
  if (out.shape[0] != K || out.shape[1] != N) {
    invalid("out must have shape " + Wq.shape.to_string() + " (Wq's), got " + out.shape.to_string());
  }
  dequantize_int8(static_cast<const int8_t*>(Wq.data), K, N, scale_data, static_cast<float*>(out.data), threads);
}

}  // namespace conveyor
