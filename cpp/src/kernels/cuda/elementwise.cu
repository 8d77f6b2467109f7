// Streaming kernels: normalize_image, int8 dequantization and the bias / activation pass
// that follows a GEMM whose epilogue cuBLASLt cannot do. Each reads and writes
// every byte once, so each is written for bandwidth: wide coalesced accesses and no
// per-element integer division.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "common.cuh"

namespace conveyor::kernels::cuda {

namespace {

using detail::check_launch;
using detail::invalid;

// out = x * a[c] + b[c]; a = scale / std, b = -mean / std (kernels.h's formula).
struct ChannelCoefficients {
  float a[kMaxImageChannels];
  float b[kMaxImageChannels];
};

template <typename Out>
__device__ __forceinline__ Out convert_out(float v);
template <>
__device__ __forceinline__ float convert_out<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half convert_out<__half>(float v) {
  return __float2half_rn(v);
}

// Four consecutive outputs with one store when aligned: 16 bytes (float) or 8 (half).
__device__ __forceinline__ void store4(float* dst, float v0, float v1, float v2, float v3) {
  *reinterpret_cast<float4*>(dst) = make_float4(v0, v1, v2, v3);
}
__device__ __forceinline__ void store4(__half* dst, float v0, float v1, float v2, float v3) {
  // Bits assembled in registers: taking the address of a __half2 would spill it.
  const auto bits = [](float v) { return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v))); };
  *reinterpret_cast<uint2*>(dst) = make_uint2(bits(v0) | (bits(v1) << 16), bits(v2) | (bits(v3) << 16));
}

// ---- NHWC -> NCHW -----------------------------------------------------------------------------
//
// One block per tile of kTilePixels consecutive pixels of one image. The tile's bytes
// (pixels * C, contiguous in NHWC) are staged in shared memory with 16-byte loads; then
// thread t writes pixels [4t, 4t + 4) of every channel plane, one 4-wide store each, so
// a warp writes 32 * 16 contiguous bytes of a plane per store. Shared-memory reads: a
// thread reads bytes 4C apart, so lanes touch words C apart: conflict-free for odd C.
constexpr int kTileThreads = 256;
constexpr int kTilePixels = 4 * kTileThreads;

template <typename Out>
__global__ void __launch_bounds__(kTileThreads)
    normalize_nchw_kernel(const uint8_t* __restrict__ images, Out* __restrict__ out, int64_t plane,
                          int64_t tiles_per_image, int64_t first_tile, int channels, ChannelCoefficients co) {
  extern __shared__ __align__(16) uint8_t tile[];
  const int64_t tile_index = first_tile + blockIdx.x;
  const int64_t image = tile_index / tiles_per_image;
  const int64_t p0 = (tile_index - image * tiles_per_image) * kTilePixels;
  const int pixels = static_cast<int>(plane - p0 < kTilePixels ? plane - p0 : kTilePixels);
  const uint8_t* src = images + (image * plane + p0) * channels;
  const int bytes = pixels * channels;

  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && bytes % 16 == 0) {
    const uint4* src16 = reinterpret_cast<const uint4*>(src);
    uint4* tile16 = reinterpret_cast<uint4*>(tile);
    for (int i = threadIdx.x; i < bytes / 16; i += kTileThreads) tile16[i] = __ldg(src16 + i);
  } else {
    for (int i = threadIdx.x; i < bytes; i += kTileThreads) tile[i] = __ldg(src + i);
  }
  __syncthreads();

  const int q = 4 * threadIdx.x;  // first of this thread's four pixels within the tile
  if (q >= pixels) return;
  const uint8_t* px = tile + q * channels;
  for (int c = 0; c < channels; ++c) {
    const float a = co.a[c], b = co.b[c];
    Out* dst = out + (image * channels + c) * plane + p0 + q;
    if (q + 4 <= pixels && (reinterpret_cast<uintptr_t>(dst) % (4 * sizeof(Out))) == 0) {
      store4(dst, fmaf(float(px[c]), a, b), fmaf(float(px[channels + c]), a, b),
             fmaf(float(px[2 * channels + c]), a, b), fmaf(float(px[3 * channels + c]), a, b));
    } else {
      for (int j = 0; j < 4 && q + j < pixels; ++j) dst[j] = convert_out<Out>(fmaf(float(px[j * channels + c]), a, b));
    }
  }
}

// ---- NHWC -> NHWC -----------------------------------------------------------------------------
//
// Elementwise over the flat tensor; element i has channel i % C. Thread t of the grid
// handles groups of 4 elements g = t, t + stride, ...: a 4-byte load and a 4-wide store
// per group (both coalesced across the warp). The channel of a group's first element
// advances by a fixed step per iteration, so it is carried, not divided for.
template <typename Out, bool kAligned>
__global__ void normalize_nhwc_kernel(const uint8_t* __restrict__ images, Out* __restrict__ out, int64_t total,
                                      int channels, ChannelCoefficients co) {
  const int64_t groups = total / 4;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t g = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  int c = static_cast<int>((4 * g) % channels);
  const int step = static_cast<int>((4 * stride) % channels);
  for (; g < groups; g += stride) {
    const int c1 = c + 1 < channels ? c + 1 : c + 1 - channels;
    const int c2 = c1 + 1 < channels ? c1 + 1 : c1 + 1 - channels;
    const int c3 = c2 + 1 < channels ? c2 + 1 : c2 + 1 - channels;
    if constexpr (kAligned) {
      const uchar4 v = __ldg(reinterpret_cast<const uchar4*>(images) + g);
      store4(out + 4 * g, fmaf(float(v.x), co.a[c], co.b[c]), fmaf(float(v.y), co.a[c1], co.b[c1]),
             fmaf(float(v.z), co.a[c2], co.b[c2]), fmaf(float(v.w), co.a[c3], co.b[c3]));
    } else {
      const uint8_t* s = images + 4 * g;
      Out* d = out + 4 * g;
      d[0] = convert_out<Out>(fmaf(float(s[0]), co.a[c], co.b[c]));
      d[1] = convert_out<Out>(fmaf(float(s[1]), co.a[c1], co.b[c1]));
      d[2] = convert_out<Out>(fmaf(float(s[2]), co.a[c2], co.b[c2]));
      d[3] = convert_out<Out>(fmaf(float(s[3]), co.a[c3], co.b[c3]));
    }
    c += step;
    if (c >= channels) c -= channels;
  }
  // The last total % 4 elements, by the grid's first thread.
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int64_t i = groups * 4; i < total; ++i) {
      const int ci = static_cast<int>(i % channels);
      out[i] = convert_out<Out>(fmaf(float(images[i]), co.a[ci], co.b[ci]));
    }
  }
}

// Blocks for a grid-stride kernel: enough to fill the device several times over, fewer
// for small inputs (each thread then does one group).
int grid_for(int64_t work_items, int threads) {
  constexpr int64_t kMaxBlocks = 132 * 32;  // a few waves on the largest parts; the loop covers the rest
  const int64_t blocks = (work_items + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <typename Out>
void launch_normalize(const uint8_t* images, const ImageShape& s, const ChannelCoefficients& co, Out* out,
                      ImageLayout layout, cudaStream_t stream) {
  const int channels = static_cast<int>(s.channels);
  if (layout == ImageLayout::kNCHW) {
    const int64_t plane = s.height * s.width;
    const int64_t tiles_per_image = (plane + kTilePixels - 1) / kTilePixels;
    const int64_t tiles = s.batch * tiles_per_image;
    const size_t smem = static_cast<size_t>(kTilePixels) * channels;
    for (int64_t first = 0; first < tiles; first += detail::kMaxGridX) {
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(tiles - first, detail::kMaxGridX));
      normalize_nchw_kernel<Out><<<blocks, kTileThreads, smem, stream>>>(images, out, plane, tiles_per_image,
                                                                         first, channels, co);
      check_launch("normalize_image (NCHW)");
    }
    return;
  }
  const int64_t total = s.batch * s.height * s.width * s.channels;
  constexpr int kThreads = 256;
  const int blocks = grid_for(total / 4 + 1, kThreads);
  const bool aligned = reinterpret_cast<uintptr_t>(images) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % (4 * sizeof(Out)) == 0;
  if (aligned) {
    normalize_nhwc_kernel<Out, true><<<blocks, kThreads, 0, stream>>>(images, out, total, channels, co);
  } else {
    normalize_nhwc_kernel<Out, false><<<blocks, kThreads, 0, stream>>>(images, out, total, channels, co);
  }
  check_launch("normalize_image (NHWC)");
}

// ---- dequantization ---------------------------------------------------------------------------

// out[k, n] = Wq[k, n] * scale[n]: blocks walk rows (y) and column chunks (x), so the
// column, and with it the scale, needs no division.
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ Wq, int64_t K, int64_t N,
                                       const float* __restrict__ scale, float* __restrict__ out) {
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    for (int64_t n = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; n < N; n += int64_t{gridDim.x} * blockDim.x) {
      out[k * N + n] = float(Wq[k * N + n]) * __ldg(scale + n);
    }
  }
}

// ---- the epilogue pass after a GEMM -------------------------------------------------------------

__device__ __forceinline__ float activate(Activation act, float v) {
  switch (act) {
    case Activation::kRelu: return fmaxf(v, 0.0f);
    case Activation::kGeluErf: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + tanhf(inner));
    }
    case Activation::kSigmoid: return 1.0f / (1.0f + expf(-v));
    case Activation::kTanh: return tanhf(v);
    case Activation::kNone: break;
  }
  return v;
}

// y[r, c] = act(y[r, c] + bias[c]) (bias may be null): blocks walk rows (y) and column
// chunks (x), so the bias index needs no division.
template <Activation kAct>
__global__ void epilogue_kernel(float* __restrict__ y, int64_t rows, int64_t cols, const float* __restrict__ bias) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* row = y + r * cols;
    for (int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; c < cols; c += int64_t{gridDim.x} * blockDim.x) {
      row[c] = activate(kAct, bias ? row[c] + __ldg(bias + c) : row[c]);
    }
  }
}

template <Activation kAct>
void launch_epilogue(float* y, int64_t rows, int64_t cols, const float* bias, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks_x = static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 64));
  const auto blocks_y = static_cast<unsigned>(std::min<int64_t>(rows, 65535));
  epilogue_kernel<kAct><<<dim3(blocks_x, blocks_y), kThreads, 0, stream>>>(y, rows, cols, bias);
}

}  // namespace

namespace detail {

void apply_epilogue(float* y, int64_t rows, int64_t cols, const float* bias, Activation act, cudaStream_t stream) {
  if (rows == 0 || cols == 0 || (bias == nullptr && act == Activation::kNone)) return;
  switch (act) {
    case Activation::kNone: launch_epilogue<Activation::kNone>(y, rows, cols, bias, stream); break;
    case Activation::kRelu: launch_epilogue<Activation::kRelu>(y, rows, cols, bias, stream); break;
    case Activation::kGeluErf: launch_epilogue<Activation::kGeluErf>(y, rows, cols, bias, stream); break;
    case Activation::kGeluTanh: launch_epilogue<Activation::kGeluTanh>(y, rows, cols, bias, stream); break;
    case Activation::kSigmoid: launch_epilogue<Activation::kSigmoid>(y, rows, cols, bias, stream); break;
    case Activation::kTanh: launch_epilogue<Activation::kTanh>(y, rows, cols, bias, stream); break;
  }
  check_launch("dense epilogue");
}

}  // namespace detail

void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout, const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  if (shape.batch < 0 || shape.height < 0 || shape.width < 0) {
    invalid("normalize_image: images shape must be non-negative, got [" + std::to_string(shape.batch) + ", " +
            std::to_string(shape.height) + ", " + std::to_string(shape.width) + ", " +
            std::to_string(shape.channels) + "]");
  }
  if (shape.channels < 1 || shape.channels > kMaxImageChannels) {
    invalid("normalize_image: channels must be 1 to " + std::to_string(kMaxImageChannels) + " on CUDA, got " +
            std::to_string(shape.channels));
  }
  if (out_dtype != DType::kFloat32 && out_dtype != DType::kFloat16) {
    invalid(std::string("normalize_image: out dtype must be FP32 or FP16, got ") + dtype_name(out_dtype));
  }
  if (mean == nullptr || std == nullptr) invalid("normalize_image: mean and std are required");
  if (!std::isfinite(scale)) invalid("normalize_image: scale must be finite");
  ChannelCoefficients co{};
  for (int64_t c = 0; c < shape.channels; ++c) {
    if (!std::isfinite(std[c]) || std[c] == 0.0f) {
      invalid("normalize_image: std[" + std::to_string(c) + "] must be finite and non-zero, got " +
              std::to_string(std[c]));
    }
    co.a[c] = scale / std[c];
    co.b[c] = -mean[c] / std[c];
  }
  const int64_t total = shape.batch * shape.height * shape.width;
  if (total == 0) return;
  if (images == nullptr || out == nullptr) invalid("normalize_image: images and out must not be null");
  if (out_dtype == DType::kFloat32) {
    launch_normalize(images, shape, co, static_cast<float*>(out), out_layout, detail::stream_of(launch));
  } else {
    launch_normalize(images, shape, co, static_cast<__half*>(out), out_layout, detail::stream_of(launch));
  }
}

void dequantize_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale, float* out, const Launch& launch) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope device(launch.device);
  if (K < 0 || N < 0) invalid("dequantize_int8: K and N must be >= 0");
  if (K == 0 || N == 0) return;
  if (Wq == nullptr || scale == nullptr || out == nullptr) invalid("dequantize_int8: Wq, scale and out are required");
  constexpr int kThreads = 256;
  const auto blocks_x = static_cast<unsigned>(std::min<int64_t>((N + kThreads - 1) / kThreads, 1024));
  const auto blocks_y = static_cast<unsigned>(std::min<int64_t>(K, 65535));
  dequantize_int8_kernel<<<dim3(blocks_x, blocks_y), kThreads, 0, detail::stream_of(launch)>>>(Wq, K, N, scale, out);
  check_launch("dequantize_int8");
}

}  // namespace conveyor::kernels::cuda
