// Dense micro-kernels, compiled once per ISA (CMakeLists.txt, "CPU kernels"): AVX2+FMA
// (8 lanes), the x86-64 baseline SSE2 (4 lanes), and plain scalar code elsewhere. One
// source serves all three through the small vector layer below.
//
// Shape of the computation (see PackedDense for the weight layout):
//   for each block of rows whose K slice of x fits L2
//     for each K slice (<= 512; one slice when the rows fit one tile)
//       for each 16-column panel (its K slice, <= 32 KiB, stays in L1 for the tiles below)
//         for each tile of <= kMaxRows rows
//           accumulate the tile in registers over the slice, then, on the last slice,
//           apply scale, bias and activation to the registers and store the tile once.
// Outputs are written only from registers: the epilogue costs no pass over y.
//
// Only the anonymous namespace and this variant's namespace hold code here, and no
// std:: templates are instantiated: an inline function emitted by both variants would be
// merged by the linker, and the AVX2 copy could then run on a CPU without AVX2.
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "kernels/dense_internal.h"

namespace conveyor::kernels::CONVEYOR_KERNEL_ISA {

namespace {

// ---- vector layer -----------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
using VecI = __m256i;
constexpr int kLanes = 8;
// 6 rows x 2 vectors = 12 accumulators, + 2 weight vectors + 1 broadcast: 15 of 16 ymm.
constexpr int kMaxRows = 6;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float v) { return _mm256_set1_ps(v); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
inline Vec vand(Vec a, Vec b) { return _mm256_and_ps(a, b); }
inline Vec vandnot(Vec a, Vec b) { return _mm256_andnot_ps(a, b); }  // ~a & b
inline Vec vor(Vec a, Vec b) { return _mm256_or_ps(a, b); }
inline Vec vless(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }  // lane mask
inline Vec vselect(Vec mask, Vec a, Vec b) { return _mm256_blendv_ps(b, a, mask); }
inline VecI vround_to_int(Vec a) { return _mm256_cvtps_epi32(a); }  // nearest (default MXCSR)
inline Vec vint_to_float(VecI a) { return _mm256_cvtepi32_ps(a); }
// 2^n for integer n in [-126, 127], built directly in the exponent field.
inline Vec vpow2(VecI n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
inline Vec vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__SSE2__)
using Vec = __m128;
using VecI = __m128i;
constexpr int kLanes = 4;
// 3 rows x 4 vectors = 12 accumulators of 16 xmm.
constexpr int kMaxRows = 3;
inline Vec vzero() { return _mm_setzero_ps(); }
inline Vec vset(float v) { return _mm_set1_ps(v); }
inline Vec vbroadcast(const float* p) { return _mm_load1_ps(p); }
inline Vec vload(const float* p) { return _mm_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm_mul_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm_div_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm_min_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline Vec vand(Vec a, Vec b) { return _mm_and_ps(a, b); }
inline Vec vandnot(Vec a, Vec b) { return _mm_andnot_ps(a, b); }
inline Vec vor(Vec a, Vec b) { return _mm_or_ps(a, b); }
inline Vec vless(Vec a, Vec b) { return _mm_cmplt_ps(a, b); }
inline Vec vselect(Vec mask, Vec a, Vec b) { return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)); }
inline VecI vround_to_int(Vec a) { return _mm_cvtps_epi32(a); }
inline Vec vint_to_float(VecI a) { return _mm_cvtepi32_ps(a); }
inline Vec vpow2(VecI n) { return _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23)); }
// SSE2 has no sign-extending byte load: duplicate each byte into a whole lane, then an
// arithmetic shift brings the sign down.
inline Vec vload_i8(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, sizeof four);
  __m128i b = _mm_cvtsi32_si128(four);
  b = _mm_unpacklo_epi8(b, b);
  b = _mm_unpacklo_epi16(b, b);
  return _mm_cvtepi32_ps(_mm_srai_epi32(b, 24));
}
#else
// Portable scalar lanes (non-x86 builds); the compiler may vectorize the unrolled loops.
using Vec = float;
using VecI = int32_t;
constexpr int kLanes = 1;
constexpr int kMaxRows = 2;
inline Vec vzero() { return 0.0f; }
inline Vec vset(float v) { return v; }
inline Vec vbroadcast(const float* p) { return *p; }
inline Vec vload(const float* p) { return *p; }
inline void vstore(float* p, Vec v) { *p = v; }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline Vec vsub(Vec a, Vec b) { return a - b; }
inline Vec vmul(Vec a, Vec b) { return a * b; }
inline Vec vdiv(Vec a, Vec b) { return a / b; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
inline Vec vmin(Vec a, Vec b) { return a < b ? a : b; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec vless(Vec a, Vec b) { return a < b ? 1.0f : 0.0f; }
inline Vec vselect(Vec mask, Vec a, Vec b) { return mask != 0.0f ? a : b; }
inline VecI vround_to_int(Vec a) { return static_cast<VecI>(a < 0 ? a - 0.5f : a + 0.5f); }
inline Vec vint_to_float(VecI a) { return static_cast<float>(a); }
inline Vec vpow2(VecI n) {
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline Vec vload_i8(const int8_t* p) { return static_cast<float>(*p); }
#endif

constexpr int kVecs = static_cast<int>(kPanelWidth) / kLanes;  // vectors per panel row
static_assert(kRowGrain % kMaxRows == 0, "thread chunks must hold whole row blocks");

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

#if defined(__SSE2__)
inline Vec vabs(Vec a) { return vandnot(vset(-0.0f), a); }
inline Vec vcopysign(Vec magnitude, Vec sign) {
  const Vec sign_bit = vset(-0.0f);
  return vor(vandnot(sign_bit, magnitude), vand(sign_bit, sign));
}
#else
inline Vec vabs(Vec a) { return a < 0 ? -a : a; }
inline Vec vcopysign(Vec magnitude, Vec sign) { return sign < 0 ? -magnitude : magnitude; }
#endif

// ---- activations on registers --------------------------------------------------------------
// e^x, relative error ~1e-7 over the float range. x = n ln2 + r with |r| <= ln2/2, then
// e^r by its Taylor series to degree 7 (truncation < 5e-9) times 2^n. The clamp keeps
// n in [-126, 127] so 2^n is a normal float: e^x underflows to ~1e-38, never to a NaN.
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, vset(-87.3f)), vset(88.3f));
  const VecI n = vround_to_int(vmul(x, vset(1.44269504088896341f)));
  const Vec nf = vint_to_float(n);
  // ln2 split in two: n * ln2_hi is exact (ln2_hi has 16 significant bits, n at most 8).
  Vec r = vfma(nf, vset(-0.693145751953125f), x);
  r = vfma(nf, vset(-1.4286068202862268e-06f), r);
  Vec p = vset(1.0f / 5040);
  p = vfma(p, r, vset(1.0f / 720));
  p = vfma(p, r, vset(1.0f / 120));
  p = vfma(p, r, vset(1.0f / 24));
  p = vfma(p, r, vset(1.0f / 6));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.0f));
  p = vfma(p, r, vset(1.0f));
  return vmul(p, vpow2(n));
}

inline Vec vsigmoid(Vec x) { return vdiv(vset(1.0f), vadd(vset(1.0f), vexp(vsub(vzero(), x)))); }

// tanh |x| = (1 - e) / (1 + e), e = e^(-2|x|): no cancellation once |x| >= 0.25 (1 - e > 0.39).
// Below that, the odd Taylor series to x^9 (relative truncation < 1e-8) keeps tanh's
// relative accuracy near zero, where 1 - e would cancel.
inline Vec vtanh(Vec x) {
  const Vec one = vset(1.0f);
  const Vec ax = vabs(x);
  const Vec e = vexp(vmul(ax, vset(-2.0f)));
  const Vec large = vdiv(vsub(one, e), vadd(one, e));
  const Vec x2 = vmul(ax, ax);
  Vec p = vset(62.0f / 2835);
  p = vfma(p, x2, vset(-17.0f / 315));
  p = vfma(p, x2, vset(2.0f / 15));
  p = vfma(p, x2, vset(-1.0f / 3));
  p = vfma(p, x2, one);
  const Vec small = vmul(p, ax);
  return vcopysign(vselect(vless(ax, vset(0.25f)), small, large), x);
}

// GELU, tanh form: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3);
// the sigmoid form has no cancellation for negative x.
inline Vec vgelu_tanh(Vec x) {
  const Vec x3 = vmul(vmul(x, x), x);
  const Vec two_u = vmul(vset(2.0f * 0.7978845608028654f), vfma(x3, vset(0.044715f), x));
  return vdiv(x, vadd(vset(1.0f), vexp(vsub(vzero(), two_u))));
}

// GELU, erf form: x * Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)). erf on |z| by
// Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7): erf|z| = 1 - t P(t) e^(-z^2),
// t = 1 / (1 + 0.3275911 |z|). With h = 0.5 t P(t) e^(-z^2), Phi = 1 - h for x >= 0 and
// Phi = h for x < 0, so the left tail is computed directly, not as 1 - (almost 1).
inline Vec vgelu_erf(Vec x) {
  const Vec z = vmul(vabs(x), vset(0.7071067811865475f));
  const Vec t = vdiv(vset(1.0f), vfma(z, vset(0.3275911f), vset(1.0f)));
  Vec p = vset(1.061405429f);
  p = vfma(p, t, vset(-1.453152027f));
  p = vfma(p, t, vset(1.421413741f));
  p = vfma(p, t, vset(-0.284496736f));
  p = vfma(p, t, vset(0.254829592f));
  const Vec h = vmul(vmul(vset(0.5f), vmul(p, t)), vexp(vsub(vzero(), vmul(z, z))));
  const Vec phi = vselect(vless(x, vzero()), h, vsub(vset(1.0f), h));
  return vmul(x, phi);
}

template <Activation A>
inline Vec activate(Vec v) {
  if constexpr (A == Activation::kRelu) return vmax(v, vzero());
  if constexpr (A == Activation::kGeluErf) return vgelu_erf(v);
  if constexpr (A == Activation::kGeluTanh) return vgelu_tanh(v);
  if constexpr (A == Activation::kSigmoid) return vsigmoid(v);
  if constexpr (A == Activation::kTanh) return vtanh(v);
  return v;
}

// ---- weight panels -------------------------------------------------------------------------
// Weight rows a one- or two-row tile prefetches ahead of its loads. Such tiles stream the
// panel once at full speed and are bound by cache bandwidth (M = 1: each weight is used
// once); requesting lines a little early measured ~10% faster than the hardware
// prefetcher alone. Prefetches never fault, so running past the panel's end is harmless.
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kCacheLine = 64;

// A panel slice: row k of the slice is kPanelWidth consecutive weights.
template <class T>
struct Panel {
  // float weights arrive no faster than the FMAs use them when few rows share each; int8
  // ones are bound by their conversion instead.
  static constexpr bool kBandwidthBound = sizeof(T) == sizeof(float);
  const T* data;
  Vec load(int64_t k, int v) const {
    if constexpr (sizeof(T) == 1) return vload_i8(data + k * kPanelWidth + v * kLanes);
    else return vload(data + k * kPanelWidth + v * kLanes);
  }
  // Requests the cache lines of rows [k, k + rows) plus kPrefetchRows.
  void prefetch(int64_t k, int64_t rows) const {
    const char* begin = reinterpret_cast<const char*>(data + (k + kPrefetchRows) * kPanelWidth);
    for (int64_t offset = 0; offset < rows * kPanelWidth * static_cast<int64_t>(sizeof(T)); offset += kCacheLine) {
      __builtin_prefetch(begin + offset);
    }
  }
};
using F32Panel = Panel<float>;
using I8Panel = Panel<int8_t>;  // converted in registers; scales come in the epilogue

// ---- the micro-tile ------------------------------------------------------------------------
// Independent accumulator sets: an FMA has ~4 cycles of latency and two issue per cycle,
// so about 8 independent chains keep the units busy. Tiles of few rows (M = 1, 2) have
// fewer chains, so they split K into S partial sums.
template <int R>
constexpr int k_split() {
  constexpr int chains = R * kVecs;
  return chains >= 8 ? 1 : 8 / chains;
}

// x rows as the tile reads them: straight from x (row r, step k at a + r * lda + k), or
// packed for this tile (at a + k * R + r: one forward stream, see pack_rows).
struct XRows {
  const float* a;
  int64_t lda;  // ignored when packed
};

// One step k of partial sum s: part[s] += x[:, k] (outer) w[k, :].
template <int R, int S, bool kPackedX, class P>
inline void step(const XRows& x, const P& b, int64_t k, int s, Vec (&part)[S][R][kVecs]) {
  Vec w[kVecs];
#pragma GCC unroll 16
  for (int v = 0; v < kVecs; ++v) w[v] = b.load(k, v);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const Vec xr = vbroadcast(kPackedX ? x.a + k * R + r : x.a + r * x.lda + k);
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) part[s][r][v] = vfma(xr, w[v], part[s][r][v]);
  }
}

// acc = x[0:R, 0:kc] @ panel[0:kc, :].
template <int R, bool kPackedX, class P>
inline void accumulate(const XRows& x, const P& b, int64_t kc, Vec (&acc)[R][kVecs]) {
  constexpr int S = k_split<R>();
  Vec part[S][R][kVecs];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) part[s][r][v] = vzero();

  int64_t k = 0;
  if constexpr (S > 1 && P::kBandwidthBound && !kPackedX) {
    // Partial sum s takes the s-th contiguous chunk of K, all S in lockstep: S streams
    // through the panel measured 12-17% faster than one (M = 1, 2: such a tile is bound
    // by cache bandwidth, each weight being used once or twice).
    const int64_t chunk = kc / S;
    for (; k < chunk; ++k) {
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) {
        b.prefetch(k + s * chunk, 1);
        step<R, S, kPackedX>(x, b, k + s * chunk, s, part);
      }
    }
    k = S * chunk;
  } else {
    // Consecutive k to consecutive partial sums.
    for (; k + S <= kc; k += S) {
      if constexpr (R <= 2) b.prefetch(k, S);
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) step<R, S, kPackedX>(x, b, k + s, s, part);
    }
  }
  for (; k < kc; ++k) step<R, S, kPackedX>(x, b, k, 0, part);

#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) {
      Vec sum = part[0][r][v];
#pragma GCC unroll 16
      for (int s = 1; s < S; ++s) sum = vadd(sum, part[s][r][v]);
      acc[r][v] = sum;
    }
}

// Where a tile's sums go, and what happens to them on the way.
struct Epilogue {
  float* y;            // the tile's top-left output
  int64_t ldy;         // y's row stride
  int64_t cols;        // valid columns of this panel (< kPanelWidth only for the last one)
  const float* bias;   // at the panel's first column (zeros without a bias)
  const float* scale;  // int8 per-column scales at the panel's first column, else null
  bool add_to_y;       // y holds the partial sums of earlier K slices
  bool final;          // the last K slice: apply scale, bias and activation
};

template <int R, Activation A>
inline void store_tile(Vec (&acc)[R][kVecs], const Epilogue& e) {
  Vec bias[kVecs], scale[kVecs];
#pragma GCC unroll 16
  for (int v = 0; v < kVecs; ++v) {
    bias[v] = vload(e.bias + v * kLanes);
    scale[v] = e.scale ? vload(e.scale + v * kLanes) : vset(1.0f);
  }
  const bool partial = e.cols < kPanelWidth;
  for (int r = 0; r < R; ++r) {
    float* row = e.y + r * e.ldy;
    // A partial panel goes through a stack row so no store passes the end of y's row.
    float staged[kPanelWidth];
    float* dst = row;
    if (partial) {
      dst = staged;
      std::memset(staged, 0, sizeof staged);
      if (e.add_to_y) std::memcpy(staged, row, static_cast<size_t>(e.cols) * sizeof(float));
    }
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) {
      Vec s = acc[r][v];
      if (e.add_to_y) s = vadd(s, vload(dst + v * kLanes));
      if (e.final) s = activate<A>(vfma(s, scale[v], bias[v]));
      vstore(dst + v * kLanes, s);
    }
    if (partial) std::memcpy(row, staged, static_cast<size_t>(e.cols) * sizeof(float));
  }
}

template <int R, bool kPackedX, class P>
void tile(const XRows& x, const P& b, int64_t kc, const Epilogue& e, Activation act) {
  // Partial sums of earlier K slices: request them now, they are added after the K loop.
  if (e.add_to_y) {
    for (int r = 0; r < R; ++r) __builtin_prefetch(e.y + r * e.ldy);
  }
  Vec acc[R][kVecs];
  accumulate<R, kPackedX>(x, b, kc, acc);
  if (!e.final) return store_tile<R, Activation::kNone>(acc, e);
  switch (act) {
    case Activation::kNone: return store_tile<R, Activation::kNone>(acc, e);
    case Activation::kRelu: return store_tile<R, Activation::kRelu>(acc, e);
    case Activation::kGeluErf: return store_tile<R, Activation::kGeluErf>(acc, e);
    case Activation::kGeluTanh: return store_tile<R, Activation::kGeluTanh>(acc, e);
    case Activation::kSigmoid: return store_tile<R, Activation::kSigmoid>(acc, e);
    case Activation::kTanh: return store_tile<R, Activation::kTanh>(acc, e);
  }
}

template <bool kPackedX, class P>
void tile_rows(int rows, const XRows& x, const P& b, int64_t kc, const Epilogue& e, Activation act) {
  switch (rows) {
    case 1: return tile<1, kPackedX>(x, b, kc, e, act);
    case 2: return tile<2, kPackedX>(x, b, kc, e, act);
    case 3: if constexpr (kMaxRows >= 3) return tile<3, kPackedX>(x, b, kc, e, act); break;
    case 4: if constexpr (kMaxRows >= 4) return tile<4, kPackedX>(x, b, kc, e, act); break;
    case 5: if constexpr (kMaxRows >= 5) return tile<5, kPackedX>(x, b, kc, e, act); break;
    case 6: if constexpr (kMaxRows >= 6) return tile<6, kPackedX>(x, b, kc, e, act); break;
  }
}

// Tile i of `blocks` balanced tiles over `rows` rows starts at row rows * i / blocks:
// 8 rows run as 4 + 4, not 6 + 2 (a short tile wastes most of its FMA slots).
inline int64_t tile_count(int64_t rows) { return (rows + kMaxRows - 1) / kMaxRows; }

// Copies x[m0:m1, k0:k0+kc] tile by tile into `packed` (tile of R rows: kc x R, element
// (k, r) at k * R + r), so each tile reads its rows as one forward stream. Read straight
// from x, R rows K floats apart can map to the same few L1 sets (K * 4 a multiple of
// 4 KiB puts all of them in one) and evict each other.
void pack_rows(const DenseProblem& p, int64_t m0, int64_t m1, int64_t k0, int64_t kc, float* packed) {
  const int64_t rows = m1 - m0, blocks = tile_count(rows);
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t begin = rows * i / blocks, end = rows * (i + 1) / blocks, r = end - begin;
    const float* src = p.x + (m0 + begin) * p.K + k0;
    float* dst = packed + begin * kc;
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t row = 0; row < r; ++row) dst[k * r + row] = src[row * p.K + k];
    }
  }
}

// Rows [m0, m1) against one panel slice, tile by tile. packed_x: those rows' slice as
// pack_rows left it, or null to read x directly.
template <class P>
void panel_rows(const DenseProblem& p, int64_t m0, int64_t m1, int64_t k0, int64_t kc, const float* packed_x,
                const P& b, Epilogue e) {
  const int64_t rows = m1 - m0, blocks = tile_count(rows);
  float* const y0 = e.y;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t begin = rows * i / blocks, end = rows * (i + 1) / blocks;
    e.y = y0 + begin * e.ldy;
    const int r = static_cast<int>(end - begin);
    if (packed_x) {
      tile_rows<true>(r, XRows{packed_x + begin * kc, 0}, b, kc, e, p.act);
    } else {
      tile_rows<false>(r, XRows{p.x + (m0 + begin) * p.K + k0, p.K}, b, kc, e, p.act);
    }
  }
}

// int8 slice -> float slice, for reuse by several row blocks.
void convert_slice(const int8_t* src, int64_t kc, float* dst) {
  for (int64_t i = 0; i < kc * kPanelWidth; i += kLanes) vstore(dst + i, vload_i8(src + i));
}

// Rows of x whose K slice stays in L2 (256 KiB of it) while every panel passes over them.
constexpr int64_t kRowBlockBytes = 256 * 1024;

}  // namespace

void dense_rect(const DenseProblem& p, int64_t m0, int64_t m1, int64_t panel0, int64_t panel1) {
  // One tile of rows reuses nothing: one K slice (partial sums would only add traffic on
  // y), x read in place. Several tiles share each panel slice from L1; with several K
  // slices their rows of x are also packed (pack_rows): rows of 1024+ floats alias in L1.
  const bool one_tile = m1 - m0 <= kMaxRows;
  const int64_t k_slices = one_tile ? 1 : (p.K + kMaxBlockK - 1) / kMaxBlockK;
  const int64_t max_kc = (p.K + k_slices - 1) / k_slices;
  int64_t row_block = kRowBlockBytes / (max_kc * static_cast<int64_t>(sizeof(float)));
  row_block = row_block < kRowGrain ? kRowGrain : row_block / kRowGrain * kRowGrain;
  float* const packed_x = k_slices > 1 ? dense_scratch(min64(row_block, m1 - m0) * max_kc) : nullptr;
  alignas(64) float slice[kMaxBlockK * kPanelWidth];  // an int8 slice dequantized once

  for (int64_t mb = m0; mb < m1; mb += row_block) {
    const int64_t me = min64(m1, mb + row_block);
    for (int64_t ks = 0; ks < k_slices; ++ks) {
      const int64_t k0 = p.K * ks / k_slices, k1 = p.K * (ks + 1) / k_slices;
      if (packed_x) pack_rows(p, mb, me, k0, k1 - k0, packed_x);
      for (int64_t panel = panel0; panel < panel1; ++panel) {
        const int64_t col0 = panel * kPanelWidth;
        const Epilogue e{p.y + mb * p.N + col0, p.N,       min64(kPanelWidth, p.N - col0),
                         p.bias + col0,         p.scale ? p.scale + col0 : nullptr,
                         ks > 0,                ks == k_slices - 1};
        const int64_t offset = (panel * p.K + k0) * kPanelWidth;
        if (p.panels_f32) {
          panel_rows(p, mb, me, k0, k1 - k0, packed_x, F32Panel{p.panels_f32 + offset}, e);
        } else if (m1 - m0 > 2 * kMaxRows) {
          // Three or more tiles read this int8 slice: convert it once. Up to two convert in
          // registers as they go (measured faster at M = 8 and 12: 43 vs 52 us, 57 vs 68 us
          // at 512x512; slower from M = 16).
          convert_slice(p.panels_i8 + offset, k1 - k0, slice);
          panel_rows(p, mb, me, k0, k1 - k0, packed_x, F32Panel{slice}, e);
        } else {
          panel_rows(p, mb, me, k0, k1 - k0, packed_x, I8Panel{p.panels_i8 + offset}, e);
        }
      }
    }
  }
}

void dequantize_rows(const int8_t* Wq, int64_t N, const float* scale, float* out, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const int8_t* src = Wq + k * N;
    float* dst = out + k * N;
    int64_t n = 0;
    for (; n + 4 * kLanes <= N; n += 4 * kLanes) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const int64_t i = n + u * kLanes;
        vstore(dst + i, vmul(vload_i8(src + i), vload(scale + i)));
      }
    }
    for (; n + kLanes <= N; n += kLanes) vstore(dst + n, vmul(vload_i8(src + n), vload(scale + n)));
    for (; n < N; ++n) dst[n] = static_cast<float>(src[n]) * scale[n];
  }
}

}  // namespace conveyor::kernels::CONVEYOR_KERNEL_ISA
