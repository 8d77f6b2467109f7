// normalize_image for one ISA (see vector_ops.h): uint8 NHWC pixels to float32 or
// float16, NCHW or NHWC, as y = x * a[c] + b[c] in one pass over the input.
//
// The work is bound by memory bandwidth on large batches (4 output bytes per input
// byte), so the hot paths keep the instruction count per pixel small: NHWC output is a
// straight conversion against a repeating per-lane pattern of a and b; NCHW output
// with three channels splits the channels with one byte shuffle per channel (AVX2) or
// four float shuffles (SSE2); other channel counts go through a small interleaved tile.
#include "kernels/cpu/image.h"

#include "kernels/cpu/vector_ops.h"

#if defined(__AVX2__) && !defined(__F16C__)
#error "the avx2 kernels are compiled with -mf16c (see CMakeLists.txt)"
#endif

namespace conveyor::kernels::CONVEYOR_KERNEL_ISA {

namespace {

// kLanes uint8 values as floats (reads exactly kLanes bytes).
inline vfloat u8_to_float(const uint8_t* p) {
#if defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return bits_as<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
#elif defined(__SSE2__)
  int32_t word;
  __builtin_memcpy(&word, p, sizeof word);
  const __m128i zero = _mm_setzero_si128();
  const __m128i ints = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(word), zero), zero);
  return bits_as<vfloat>(_mm_cvtepi32_ps(ints));
#else
  typedef uint8_t vbyte __attribute__((vector_size(kLanes)));
  vbyte bytes;
  __builtin_memcpy(&bytes, p, sizeof bytes);
  return __builtin_convertvector(__builtin_convertvector(bytes, vint), vfloat);
#endif
}

// ---- float16 (IEEE binary16 bits, round to nearest even) -------------------------------
typedef uint16_t vhalf __attribute__((vector_size(kLanes * 2)));

#if defined(__AVX2__)
inline uint16_t to_half(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
inline vhalf to_half(vfloat v) {
  return bits_as<vhalf>(_mm256_cvtps_ph(bits_as<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
}
#else
// Without F16C: integer arithmetic on the float's bits, the same for one value and for
// a vector of them (I is int32_t or vint, F float or vfloat).
template <class I, class F>
I half_bits(F x) {
  const I bits = bits_as<I>(x);
  const I sign = (bits >> 16) & 0x8000;
  const I magnitude = bits & 0x7fffffff;
  // Normal range: rebias the exponent (127 -> 15), round the 13 dropped mantissa bits to
  // nearest even (+0xfff, +1 more when the kept part is odd); a carry may bump the
  // exponent, up to infinity for 65520 and above.
  const I normal = (magnitude - ((127 - 15) << 23) + 0xfff + ((magnitude >> 13) & 1)) >> 13;
  // Below 2^-14 the result is subnormal: adding 0.5f moves the half's 2^-24 unit to the
  // float's last mantissa place, so the float addition rounds to nearest even for us.
  const I subnormal = bits_as<I>(bits_as<F>(magnitude) + 0.5f) - 0x3f000000;
  I half = magnitude < 0x38800000 ? subnormal : normal;
  half = magnitude >= 0x47800000 ? I{} + 0x7c00 : half;  // 65536 and above: infinity
  half = magnitude > 0x7f800000 ? I{} + 0x7e00 : half;   // NaN: a quiet NaN
  return half | sign;
}

inline uint16_t to_half(float x) { return static_cast<uint16_t>(half_bits<int32_t>(x)); }
inline vhalf to_half(vfloat v) {
#if defined(__SSE2__)
  // Sign-extend the 16-bit results so the signed saturating pack keeps them as they are.
  const __m128i bits = bits_as<__m128i>(half_bits<vint>(v));
  const __m128i packed = _mm_packs_epi32(_mm_srai_epi32(_mm_slli_epi32(bits, 16), 16), _mm_setzero_si128());
  return bits_as<vhalf>(_mm_cvtsi128_si64(packed));
#else
  return __builtin_convertvector(half_bits<vint>(v), vhalf);
#endif
}
#endif

// Stores for one output type: kLanes values at once or one. Streaming (non-temporal)
// stores need dst aligned to kVectorBytes; targets without them store normally.
template <class Out, bool kStream>
struct Writer {
  static constexpr int64_t kVectorBytes = kLanes * static_cast<int64_t>(sizeof(Out));

  static void one(Out* dst, float y) {
    if constexpr (sizeof(Out) == 4) {
      *dst = y;
    } else {
      *dst = to_half(y);
    }
  }

  static void vec(Out* dst, vfloat y) {
    if constexpr (sizeof(Out) == 4) {
#if defined(__AVX2__)
      if constexpr (kStream) return _mm256_stream_ps(dst, bits_as<__m256>(y));
#elif defined(__SSE2__)
      if constexpr (kStream) return _mm_stream_ps(dst, bits_as<__m128>(y));
#endif
      store(dst, y);
    } else {
      const vhalf half = to_half(y);
#if defined(__AVX2__)
      if constexpr (kStream) return _mm_stream_si128(reinterpret_cast<__m128i*>(dst), bits_as<__m128i>(half));
#elif defined(__SSE2__)
      if constexpr (kStream) return _mm_stream_si64(reinterpret_cast<long long*>(dst), bits_as<long long>(half));
#endif
      __builtin_memcpy(dst, &half, sizeof half);
    }
  }
};

// The smallest number of pixels (< kLanes) after which `dst + pixels * step` elements is
// aligned for streaming stores; -1 when no such count exists.
template <class Out>
int64_t pixels_to_alignment(const Out* dst, int64_t step) {
  const int64_t align = Writer<Out, true>::kVectorBytes;
  for (int64_t j = 0; j < kLanes; ++j) {
    if (reinterpret_cast<uintptr_t>(dst + j * step) % align == 0) return j;
  }
  return -1;
}

// a and b repeated over kLanes pixels: vector q of a block of kLanes pixels (kLanes * C
// interleaved values, starting at a pixel) is x * a_lanes[q] + b_lanes[q].
struct ChannelPattern {
  ScratchArray<vfloat> a_lanes, b_lanes;

  ChannelPattern(const float* a, const float* b, int64_t channels) : a_lanes(channels), b_lanes(channels) {
    for (int64_t q = 0; q < channels; ++q) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const int64_t c = (q * kLanes + lane) % channels;
        a_lanes[q][lane] = a[c];
        b_lanes[q][lane] = b[c];
      }
    }
  }
};

// ---- NHWC output: interleaved in, interleaved out ------------------------------------

// kChannels > 0 fixes the channel count at compile time (keeps the pattern in registers).
template <class Out, bool kStream, int kChannels>
void interleaved_vector(const uint8_t* src, Out* dst, int64_t pixels, int64_t channels,
                        const ChannelPattern& pattern) {
  const int64_t c_count = kChannels > 0 ? kChannels : channels;
  const int64_t block = kLanes * c_count;
  const int64_t n = pixels * c_count;
  for (int64_t e = 0; e + block <= n; e += block) {
    for (int64_t q = 0; q < c_count; ++q) {
      const vfloat y = madd(u8_to_float(src + e + q * kLanes), pattern.a_lanes[q], pattern.b_lanes[q]);
      Writer<Out, kStream>::vec(dst + e + q * kLanes, y);
    }
  }
}

template <class Out>
void interleaved_scalar(const uint8_t* src, Out* dst, int64_t pixels, int64_t channels, const float* a,
                        const float* b) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t e = p * channels + c;
      Writer<Out, false>::one(dst + e, madd(static_cast<float>(src[e]), a[c], b[c]));
    }
  }
}

template <class Out, bool kStream>
void interleaved(const uint8_t* src, Out* dst, int64_t pixels, int64_t channels, const float* a,
                 const float* b, const ChannelPattern& pattern) {
  const int64_t vector_pixels = pixels / kLanes * kLanes;
  if (channels == 3) {
    interleaved_vector<Out, kStream, 3>(src, dst, vector_pixels, channels, pattern);
  } else {
    interleaved_vector<Out, kStream, 0>(src, dst, vector_pixels, channels, pattern);
  }
  const int64_t done = vector_pixels * channels;
  interleaved_scalar(src + done, dst + done, pixels - vector_pixels, channels, a, b);
}

template <class Out>
void interleaved_span(const uint8_t* src, Out* dst, int64_t pixels, int64_t channels, const float* a,
                      const float* b, const ChannelPattern& pattern, bool streaming) {
  const int64_t head = streaming ? pixels_to_alignment(dst, channels) : -1;
  if (head < 0 || head >= pixels) {
    interleaved<Out, false>(src, dst, pixels, channels, a, b, pattern);
    return;
  }
  interleaved_scalar(src, dst, head, channels, a, b);
  interleaved<Out, true>(src + head * channels, dst + head * channels, pixels - head, channels, a, b, pattern);
}

// ---- NCHW output, three channels --------------------------------------------------------

#ifdef __AVX2__
// Bytes read per step of kLanes pixels (4 beyond the step's own 24).
constexpr int64_t kPlanarReadBytes = 28;

// Splits 8 interleaved pixels into one vector per channel. The step is loaded as two
// overlapping 16-byte halves (bytes 0-15 and 12-27), one per 128-bit lane, so a single
// in-lane byte shuffle per channel picks pixels 0-3 (low lane) and 4-7 (high lane) and
// zero-extends them to 32 bits at once.
class SplitRgb {
 public:
  SplitRgb() {
    for (int c = 0; c < 3; ++c) {
      alignas(32) int8_t pick[32];
      for (int i = 0; i < 32; ++i) pick[i] = -1;  // high bit set: the shuffle writes zero
      for (int lane = 0; lane < 2; ++lane) {
        for (int px = 0; px < 4; ++px) pick[lane * 16 + px * 4] = static_cast<int8_t>(c + 3 * px);
      }
      pick_[c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pick));
    }
  }

  void split(const uint8_t* src, vfloat (&channel)[3]) const {
    const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 12));
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
    for (int c = 0; c < 3; ++c) {
      channel[c] = bits_as<vfloat>(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(bytes, pick_[c])));
    }
  }

 private:
  __m256i pick_[3];
};
#elif defined(__SSE2__)
constexpr int64_t kPlanarReadBytes = 16;

// Splits 4 interleaved pixels (12 bytes; reads 16) into one vector per channel: widen to
// three float vectors r0 g0 b0 r1 | g1 b1 r2 g2 | b2 r3 g3 b3, then regroup with shuffles.
class SplitRgb {
 public:
  void split(const uint8_t* src, vfloat (&channel)[3]) const {
    const __m128i zero = _mm_setzero_si128();
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i low = _mm_unpacklo_epi8(bytes, zero), high = _mm_unpackhi_epi8(bytes, zero);
    const __m128 f0 = _mm_cvtepi32_ps(_mm_unpacklo_epi16(low, zero));
    const __m128 f1 = _mm_cvtepi32_ps(_mm_unpackhi_epi16(low, zero));
    const __m128 f2 = _mm_cvtepi32_ps(_mm_unpacklo_epi16(high, zero));
    const __m128 r23 = _mm_shuffle_ps(f1, f2, _MM_SHUFFLE(0, 1, 0, 2));        // r2 g1 r3 b2
    const __m128 r = _mm_shuffle_ps(f0, r23, _MM_SHUFFLE(2, 0, 3, 0));         // r0 r1 r2 r3
    const __m128 g01 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(0, 0, 1, 1));        // g0 g0 g1 g1
    const __m128 g23 = _mm_shuffle_ps(f1, f2, _MM_SHUFFLE(2, 2, 3, 3));        // g2 g2 g3 g3
    const __m128 g = _mm_shuffle_ps(g01, g23, _MM_SHUFFLE(2, 0, 2, 0));        // g0 g1 g2 g3
    const __m128 b01 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(1, 1, 2, 2));        // b0 b0 b1 b1
    const __m128 b23 = _mm_shuffle_ps(f2, f2, _MM_SHUFFLE(3, 3, 0, 0));        // b2 b2 b3 b3
    const __m128 b = _mm_shuffle_ps(b01, b23, _MM_SHUFFLE(2, 0, 2, 0));        // b0 b1 b2 b3
    channel[0] = bits_as<vfloat>(r);
    channel[1] = bits_as<vfloat>(g);
    channel[2] = bits_as<vfloat>(b);
  }
};
#else
constexpr int64_t kPlanarReadBytes = 3 * kLanes;

class SplitRgb {
 public:
  void split(const uint8_t* src, vfloat (&channel)[3]) const {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int c = 0; c < 3; ++c) channel[c][lane] = static_cast<float>(src[3 * lane + c]);
    }
  }
};
#endif

// planes[c] + p is channel c of pixel p. Returns the pixels done (a multiple of kLanes,
// leaving at least the bytes kPlanarReadBytes needs); the caller finishes the rest.
template <class Out, bool kStream>
int64_t planar_rgb_vector(const uint8_t* src, Out* const (&planes)[3], int64_t pixels, const float* a,
                          const float* b) {
  const SplitRgb splitter;
  const vfloat a0 = splat(a[0]), a1 = splat(a[1]), a2 = splat(a[2]);
  const vfloat b0 = splat(b[0]), b1 = splat(b[1]), b2 = splat(b[2]);
  int64_t p = 0;
  for (; 3 * p + kPlanarReadBytes <= 3 * pixels; p += kLanes) {
    vfloat channel[3];
    splitter.split(src + 3 * p, channel);
    Writer<Out, kStream>::vec(planes[0] + p, madd(channel[0], a0, b0));
    Writer<Out, kStream>::vec(planes[1] + p, madd(channel[1], a1, b1));
    Writer<Out, kStream>::vec(planes[2] + p, madd(channel[2], a2, b2));
  }
  return p;
}

template <class Out>
void planar_scalar(const uint8_t* src, Out* const* planes, int64_t begin, int64_t end, int64_t channels,
                   const float* a, const float* b) {
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c = 0; c < channels; ++c) {
      Writer<Out, false>::one(planes[c] + p, madd(static_cast<float>(src[p * channels + c]), a[c], b[c]));
    }
  }
}

template <class Out>
void planar_rgb_span(const uint8_t* src, Out* const (&planes)[3], int64_t plane_stride, int64_t pixels,
                     const float* a, const float* b, bool streaming) {
  int64_t head = streaming ? pixels_to_alignment(planes[0], 1) : -1;
  // The three planes align together only when the plane stride keeps the alignment.
  if (plane_stride * static_cast<int64_t>(sizeof(Out)) % Writer<Out, true>::kVectorBytes != 0) head = -1;
  int64_t done = 0;
  if (head >= 0 && head < pixels) {
    planar_scalar(src, planes, 0, head, 3, a, b);
    Out* const shifted[3] = {planes[0] + head, planes[1] + head, planes[2] + head};
    done = head + planar_rgb_vector<Out, true>(src + 3 * head, shifted, pixels - head, a, b);
  } else {
    done = planar_rgb_vector<Out, false>(src, planes, pixels, a, b);
  }
  planar_scalar(src, planes, done, pixels, 3, a, b);
}

// ---- NCHW output, any channel count ---------------------------------------------------

// Converts a tile of pixels to interleaved floats (the NHWC path), then scatters each
// channel to its plane; the tile stays in L1.
template <class Out>
void planar_tiled(const uint8_t* src, Out* dst, int64_t plane_stride, int64_t pixels, int64_t channels,
                  const float* a, const float* b, const ChannelPattern& pattern) {
  constexpr int64_t kTilePixels = 64;
  ScratchArray<float> tile(kTilePixels * channels);
  for (int64_t t0 = 0; t0 < pixels; t0 += kTilePixels) {
    const int64_t m = min_index(kTilePixels, pixels - t0);
    interleaved<float, false>(src + t0 * channels, tile.data(), m, channels, a, b, pattern);
    for (int64_t c = 0; c < channels; ++c) {
      Out* plane = dst + c * plane_stride + t0;
      for (int64_t j = 0; j < m; ++j) Writer<Out, false>::one(plane + j, tile[j * channels + c]);
    }
  }
}

template <class Out>
void normalize_typed(const NormalizeJob& job, int64_t pixel_begin, int64_t pixel_end) {
  const int64_t hw = job.pixels_per_image, channels = job.channels;
  const ChannelPattern pattern(job.a, job.b, channels);
  Out* out = static_cast<Out*>(job.out);
  // One span per image touched: spans start at any pixel, planes restart per image.
  for (int64_t p = pixel_begin; p < pixel_end;) {
    const int64_t image = p / hw, first = p - image * hw;
    const int64_t count = min_index(pixel_end - p, hw - first);
    const uint8_t* src = job.images + p * channels;
    if (job.layout == ImageLayout::kNHWC || channels == 1) {
      interleaved_span(src, out + p * channels, count, channels, job.a, job.b, pattern, job.streaming);
    } else if (channels == 3) {
      Out* base = out + image * 3 * hw + first;
      Out* const planes[3] = {base, base + hw, base + 2 * hw};
      planar_rgb_span(src, planes, hw, count, job.a, job.b, job.streaming);
    } else {
      planar_tiled(src, out + image * channels * hw + first, hw, count, channels, job.a, job.b, pattern);
    }
    p += count;
  }
#if defined(__SSE2__)
  // Streaming stores are weakly ordered: fence them before the caller hands the output on.
  if (job.streaming) _mm_sfence();
#endif
}

}  // namespace

void normalize_pixels(const NormalizeJob& job, int64_t pixel_begin, int64_t pixel_end) {
  if (job.out_float16) {
    normalize_typed<uint16_t>(job, pixel_begin, pixel_end);
  } else {
    normalize_typed<float>(job, pixel_begin, pixel_end);
  }
}

}  // namespace conveyor::kernels::CONVEYOR_KERNEL_ISA
