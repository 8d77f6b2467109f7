// normalize_image: argument checks, folding mean/std/scale into one multiply-add per
// channel, the thread split and the choice of ISA variant. The arithmetic lives in
// kernels/cpu/image.cpp.
#include <cmath>
#include <string>
#include <vector>

#include "conveyor/cpu_features.h"
#include "conveyor/kernels.h"
#include "conveyor/thread_pool.h"
#include "cpu/image.h"
#include "kernel_args.h"

namespace conveyor::kernels {

namespace {

// Outputs at least this large are written with streaming stores: they would evict most
// of a core's cache share anyway, and skipping the read-for-ownership of every line
// saves a third of the memory traffic. Smaller ones stay cached for the model's first
// layer, which reads them next.
constexpr size_t kStreamingMinBytes = size_t{8} << 20;

NormalizePixelsFn variant() {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  if (active_cpu_isa() == CpuIsa::kAvx2) return avx2::normalize_pixels;
#endif
  return baseline::normalize_pixels;
}

void check_shape(const ImageShape& s) {
  if (s.batch < 0 || s.height < 0 || s.width < 0 || s.channels < 1) {
    invalid("normalize_image", "images must be [batch, height, width, channels] with channels >= 1, got [" +
                                   std::to_string(s.batch) + ", " + std::to_string(s.height) + ", " +
                                   std::to_string(s.width) + ", " + std::to_string(s.channels) + "]");
  }
}

void check_parameters(const float* mean, const float* std, float scale, int64_t channels) {
  if (!std::isfinite(scale)) invalid("normalize_image", "scale must be finite, got " + std::to_string(scale));
  if (!mean || !std) invalid("normalize_image", "mean and std are required (one value per channel)");
  for (int64_t c = 0; c < channels; ++c) {
    if (!std::isfinite(mean[c])) {
      invalid("normalize_image", "mean[" + std::to_string(c) + "] must be finite, got " + std::to_string(mean[c]));
    }
    if (!std::isfinite(std[c]) || std[c] == 0.0f) {
      invalid("normalize_image",
              "std[" + std::to_string(c) + "] must be finite and non-zero, got " + std::to_string(std[c]));
    }
  }
}

}  // namespace

void normalize_image(const uint8_t* images, const ImageShape& shape, const float* mean, const float* std,
                     float scale, void* out, DType out_dtype, ImageLayout out_layout, int threads) {
  check_shape(shape);
  check_threads("normalize_image", threads);
  if (out_dtype != DType::kFloat32 && out_dtype != DType::kFloat16) {
    invalid("normalize_image", std::string("out_dtype must be FP32 or FP16, got ") + dtype_name(out_dtype));
  }
  check_parameters(mean, std, scale, shape.channels);
  const int64_t pixels_per_image = shape.height * shape.width;
  const int64_t pixels = shape.batch * pixels_per_image;
  if (pixels == 0) return;
  if (!images || !out) invalid("normalize_image", "images and out must not be null");
  const size_t out_bytes = static_cast<size_t>(pixels * shape.channels) * dtype_size(out_dtype);
  if (overlaps(out, images, out_bytes, static_cast<size_t>(pixels * shape.channels))) {
    invalid("normalize_image", "out overlaps images");
  }
  // y = (x * scale - mean) / std = x * a + b, folded in double so a and b are correctly
  // rounded floats.
  std::vector<float> a(static_cast<size_t>(shape.channels)), b(a.size());
  for (size_t c = 0; c < a.size(); ++c) {
    a[c] = static_cast<float>(static_cast<double>(scale) / std[c]);
    b[c] = static_cast<float>(-static_cast<double>(mean[c]) / std[c]);
  }
  NormalizeJob job;
  job.images = images;
  job.pixels_per_image = pixels_per_image;
  job.channels = shape.channels;
  job.a = a.data();
  job.b = b.data();
  job.out = out;
  job.out_float16 = out_dtype == DType::kFloat16;
  job.layout = out_layout;
  job.streaming = out_bytes >= kStreamingMinBytes;
  // Image rows are the unit of work, so a batch of one still spreads over the threads.
  const int64_t rows = shape.batch * shape.height, row_elements = shape.width * shape.channels;
  const NormalizePixelsFn fn = variant();
  parallel_for(rows, useful_threads(threads, rows, row_elements), [&](int64_t begin, int64_t end) {
    fn(job, begin * shape.width, end * shape.width);
  });
}

}  // namespace conveyor::kernels
