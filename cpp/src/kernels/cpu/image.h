// The per-ISA pixel kernel behind conveyor/kernels.h's normalize_image. cpu/image.cpp
// is compiled once per ISA; the dispatch (kernels/image.cpp) validates arguments,
// folds mean/std/scale into a[c], b[c] and splits the pixels over threads.
#pragma once

#include <cstdint>

#include "conveyor/kernels.h"

namespace conveyor::kernels {

struct NormalizeJob {
  const uint8_t* images = nullptr;  // [batch, pixels_per_image, channels]
  int64_t pixels_per_image = 0;     // height * width
  int64_t channels = 0;
  const float* a = nullptr;  // y = x * a[c] + b[c]
  const float* b = nullptr;
  void* out = nullptr;
  bool out_float16 = false;  // else float32
  ImageLayout layout = ImageLayout::kNCHW;
  bool streaming = false;  // non-temporal stores where the destination alignment allows
};

// Normalizes pixels [pixel_begin, pixel_end) counted over the whole batch; the range may
// span images and start anywhere. Ranges of concurrent calls must not overlap.
using NormalizePixelsFn = void (*)(const NormalizeJob& job, int64_t pixel_begin, int64_t pixel_end);

namespace baseline {
void normalize_pixels(const NormalizeJob& job, int64_t pixel_begin, int64_t pixel_end);
}
namespace avx2 {
void normalize_pixels(const NormalizeJob& job, int64_t pixel_begin, int64_t pixel_end);
}

}  // namespace conveyor::kernels
