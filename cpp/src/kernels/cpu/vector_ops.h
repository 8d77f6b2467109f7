// Native-width float vectors for the CPU kernels: 4 lanes (SSE2, the x86-64 baseline)
// or 8 lanes (AVX2+FMA), whichever the file is being compiled for. Other targets get 4
// lanes of portable vector-extension code (the compiler maps it to NEON and the like).
//
// Included only by cpp/src/kernels/cpu/*.cpp, which are compiled once per ISA. Every
// definition lives in namespace conveyor::kernels::CONVEYOR_KERNEL_ISA: same-named
// inline functions with different bodies in the two variants would break the
// one-definition rule, and the linker could then run AVX2 code on a baseline CPU.
// Arithmetic uses GCC/Clang vector extensions (operators and ?: on vectors), so one
// source serves both widths; vectors wider than the native registers are avoided
// because GCC splits them into poor scalar code.
//
// The same rule keeps std:: templates and inline functions (std::vector, std::min,
// std::sqrt, std::bit_cast, ...) out of these files: unoptimised builds emit them as
// weak symbols in both variants, the linker keeps one copy, and the AVX2 copy may then
// serve the baseline path. Builtins (__builtin_*) and intrinsics emit no symbols.
#pragma once

#ifndef CONVEYOR_KERNEL_ISA
#error "cpu kernels are compiled with CONVEYOR_KERNEL_ISA set (see the CPU kernels section of CMakeLists.txt)"
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <cstddef>
#include <cstdint>

namespace conveyor::kernels::CONVEYOR_KERNEL_ISA {

#ifdef __AVX2__
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));

// std::bit_cast without the std:: template instance (see above).
template <class To, class From>
inline To bits_as(From x) {
  return __builtin_bit_cast(To, x);
}

inline vfloat splat(float x) { return vfloat{} + x; }

inline vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof v); }

// The first n (< kLanes) lanes from p, the others `fill`.
inline vfloat load_partial(const float* p, int64_t n, float fill) {
  vfloat v = splat(fill);
  __builtin_memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}

inline int64_t min_index(int64_t a, int64_t b) { return a < b ? a : b; }

// An uninitialised heap array owned by one scope (std::vector's stand-in, see above).
template <class T>
class ScratchArray {
 public:
  explicit ScratchArray(int64_t n) : data_(new T[static_cast<size_t>(n)]) {}
  ~ScratchArray() { delete[] data_; }
  ScratchArray(const ScratchArray&) = delete;
  ScratchArray& operator=(const ScratchArray&) = delete;
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
  T* data() { return data_; }

 private:
  T* data_;
};

// a where a > b, else b: a NaN in `a` loses, so running maxima skip NaN. (maxps has
// exactly these semantics; the ?: form compiles to a compare and a blend instead.)
inline vfloat max_skip_nan(vfloat a, vfloat b) {
#if defined(__AVX2__)
  return bits_as<vfloat>(_mm256_max_ps(bits_as<__m256>(a), bits_as<__m256>(b)));
#elif defined(__SSE2__)
  return bits_as<vfloat>(_mm_max_ps(bits_as<__m128>(a), bits_as<__m128>(b)));
#else
  return a > b ? a : b;
#endif
}

// Bit i set when lane i of mask is set.
inline int lane_bits(vint mask) {
#if defined(__AVX2__)
  return _mm256_movemask_ps(bits_as<__m256>(mask));
#elif defined(__SSE2__)
  return _mm_movemask_ps(bits_as<__m128>(mask));
#else
  int bits = 0;
  for (int i = 0; i < kLanes; ++i) bits |= (mask[i] < 0) << i;
  return bits;
#endif
}

inline bool any_lane(vint mask) { return lane_bits(mask) != 0; }

// Lane sums in a fixed order, so a row's result does not depend on anything but its data.
inline float sum_lanes(vfloat v) {
  float s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

// The largest lane in every lane (NaN-free input).
inline vfloat broadcast_max(vfloat v) {
#if defined(__AVX2__)
  __m256 m = bits_as<__m256>(v);
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  return bits_as<vfloat>(m);
#elif defined(__SSE2__)
  __m128 m = bits_as<__m128>(v);
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  return bits_as<vfloat>(m);
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return splat(m);
#endif
}

inline float max_lanes_skip_nan(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// x * a + b, fused (one rounding) where the ISA has FMA, for one value and for vectors.
// Explicit rather than left to the compiler's contraction, which depends on the
// optimisation level: code that must give the same bits in its vector body and its
// scalar tail uses these.
inline float madd(float x, float a, float b) {
#ifdef __FMA__
  return __builtin_fmaf(x, a, b);
#else
  return x * a + b;
#endif
}

inline vfloat madd(vfloat x, vfloat a, vfloat b) {
#if defined(__FMA__) && defined(__AVX2__)
  return bits_as<vfloat>(_mm256_fmadd_ps(bits_as<__m256>(x), bits_as<__m256>(a), bits_as<__m256>(b)));
#else
  return x * a + b;
#endif
}

// exp(x) for x <= 0 (callers pass x - max), within ~2 ulp: x = n ln2 + r with
// |r| <= ln2/2, e^r as 1 + r + r^2 q(r) with q a degree-4 polynomial fitted for relative
// error (6.7e-8 in float arithmetic), and 2^n put straight into the exponent bits.
// Below -87.33 the result is 0 (the true value is under 2^-126, the smallest normal
// float). NaN gives NaN: the clamp keeps a NaN x and the final compare is false for it.
// Precondition: x <= 0 or NaN; above 88 the exponent field would overflow.
inline vfloat exp_nonpositive(vfloat x) {
  const float kLow = -87.33f;
  // 1.5 * 2^23: adding it rounds to an integer, which lands in the low mantissa bits.
  const float kRoundMagic = 12582912.0f;
  const vfloat c = max_skip_nan(splat(kLow), x);  // kLow unless x is larger (or NaN)
  const vfloat t = c * 1.44269504088896341f + kRoundMagic;
  const vfloat n = t - kRoundMagic;
  // ln2 split in two so that n * ln2_hi is exact: r keeps its low bits.
  vfloat r = c - n * 0.693359375f;
  r = r - n * -2.12194440054690583e-4f;
  vfloat q = splat(1.3814614e-3f);
  q = q * r + 8.3687101e-3f;
  q = q * r + 4.1668389e-2f;
  q = q * r + 1.6666521e-1f;
  q = q * r + 4.9999994e-1f;
  const vfloat e_r = q * (r * r) + r + 1.0f;
  // t's bits are those of kRoundMagic plus n (two's complement), and kRoundMagic's low 9
  // bits are zero: shifted left by 23 only n + 127 remains, in the exponent field: 2^n.
  const vint two_to_n = (bits_as<vint>(t) + 127) << 23;
  const vfloat y = e_r * bits_as<vfloat>(two_to_n);
  return x < kLow ? splat(0.0f) : y;
}

}  // namespace conveyor::kernels::CONVEYOR_KERNEL_ISA
