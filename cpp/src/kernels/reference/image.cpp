// Reference normalize_image: the formula as written, one element at a time.
#include <cmath>

#include "reference.h"

namespace conveyor::kernels::reference {

uint16_t float_to_half(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (std::isnan(x)) return sign | 0x7e00;
  const double a = std::fabs(static_cast<double>(x));
  // Rounding happens in double, where every step below is exact but the final rounding
  // (std::nearbyint: the default mode, to nearest even).
  if (a < std::ldexp(1.0, -14)) {  // subnormal: a multiple of 2^-24 (0x400 is the smallest normal)
    return sign | static_cast<uint16_t>(std::nearbyint(a * std::ldexp(1.0, 24)));
  }
  int exponent = 0;
  std::frexp(a, &exponent);  // a = f * 2^exponent with f in [0.5, 1)
  --exponent;                // a = m * 2^exponent with m in [1, 2)
  double mantissa = std::nearbyint((std::ldexp(a, -exponent) - 1.0) * 1024.0);
  if (mantissa == 1024.0) {  // rounded up to the next power of two
    mantissa = 0.0;
    ++exponent;
  }
  if (exponent > 15) return sign | 0x7c00;  // beyond 65504: infinity
  return sign | static_cast<uint16_t>(((exponent + 15) << 10) | static_cast<int>(mantissa));
}

void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout) {
  const int64_t n = shape.batch, h = shape.height, w = shape.width, c = shape.channels;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t x = 0; x < w; ++x) {
        for (int64_t ch = 0; ch < c; ++ch) {
          const float value = static_cast<float>(images[((i * h + y) * w + x) * c + ch]);
          const float scaled = value * scale;
          const float normalized = (scaled - mean[ch]) / std[ch];
          const int64_t at = out_layout == ImageLayout::kNHWC ? ((i * h + y) * w + x) * c + ch
                                                              : ((i * c + ch) * h + y) * w + x;
          if (out_dtype == DType::kFloat16) {
            static_cast<uint16_t*>(out)[at] = float_to_half(normalized);
          } else {
            static_cast<float*>(out)[at] = normalized;
          }
        }
      }
    }
  }
}

}  // namespace conveyor::kernels::reference
