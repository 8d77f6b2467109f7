// The kernels of conveyor/kernels.h against their references (kernels/reference/), on
// both ISA paths and several thread counts; run under both sanitizers.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../src/kernels/reference/reference.h"
#include "check.h"
#include "isa.h"
#include "conveyor/cpu_features.h"
#include "conveyor/error.h"
#include "conveyor/kernels.h"

using namespace conveyor;
using conveyor::test::for_each_isa;
using conveyor::test::isas;
using namespace conveyor::kernels;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> random_floats(std::mt19937& rng, size_t n, float scale = 4.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Few distinct values: many ties.
std::vector<float> tied_floats(std::mt19937& rng, size_t n) {
  std::uniform_int_distribution<int> dist(-2, 2);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(dist(rng));
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Elements where |got - want| > atol + rtol * |want|; NaN must meet NaN.
int count_far(const std::vector<float>& got, const std::vector<float>& want, float rtol, float atol) {
  int far = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i]) || std::isnan(got[i])) {
      far += std::isnan(want[i]) != std::isnan(got[i]);
    } else if (!(std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]))) {
      ++far;
    }
  }
  return far;
}

float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float magnitude = exponent == 0    ? std::ldexp(static_cast<float>(mantissa), -24)
                    : exponent == 31 ? (mantissa ? kNaN : kInf)
                                     : std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  return (h & 0x8000) ? -magnitude : magnitude;
}

const int64_t kColsToTry[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 100, 1000, 1027};
const int kThreadsToTry[] = {1, 2, 3, 8};

}  // namespace

TEST_CASE("kernels: softmax matches the reference, in place too, for any thread count") {
  std::mt19937 rng(1);
  for_each_isa([&](CpuIsa) {
    for (int64_t rows : {1, 3, 37}) {
      for (int64_t cols : kColsToTry) {
        const auto x = random_floats(rng, static_cast<size_t>(rows * cols));
        std::vector<float> want(x.size()), got(x.size()), again(x.size());
        reference::softmax(x.data(), rows, cols, want.data());
        softmax(x.data(), rows, cols, got.data(), 1);
        CHECK_EQ(count_far(got, want, 1e-5f, 1e-7f), 0);
        for (int threads : kThreadsToTry) {
          softmax(x.data(), rows, cols, again.data(), threads);
          CHECK(same_bits(again, got));
        }
        std::vector<float> in_place = x;
        softmax(in_place.data(), rows, cols, in_place.data(), 2);
        CHECK(same_bits(in_place, got));
      }
    }
  });
}

TEST_CASE("kernels: softmax of NaN, infinities and extreme rows") {
  for_each_isa([&](CpuIsa) {
    const std::vector<float> x = {1.0f, kNaN, 2.0f, 3.0f,           // NaN: the whole row is NaN
                                  -kInf, 0.0f, -kInf, 0.0f,         // -inf: probability 0
                                  kInf, 0.0f, 1.0f, 2.0f,           // +inf: inf - inf is NaN (numpy too)
                                  -1000.0f, 0.0f, -200.0f, -90.0f}; // far below the max: 0
    std::vector<float> got(x.size()), want(x.size());
    softmax(x.data(), 4, 4, got.data(), 1);
    reference::softmax(x.data(), 4, 4, want.data());
    CHECK_EQ(count_far(got, want, 1e-6f, 1e-30f), 0);
    for (int j = 0; j < 4; ++j) CHECK(std::isnan(got[static_cast<size_t>(j)]));
    CHECK_EQ(got[4], 0.0f);
    CHECK_EQ(got[5], 0.5f);
    CHECK_EQ(got[13], 1.0f);
    CHECK_EQ(got[12], 0.0f);
  });
}

TEST_CASE("kernels: softmax_topk matches the reference, ties to the lower index") {
  std::mt19937 rng(2);
  for_each_isa([&](CpuIsa) {
    for (int64_t cols : kColsToTry) {
      for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{5}, cols / 2, cols - 1, cols}) {
        if (k < 1 || k > cols) continue;
        for (bool ties : {false, true}) {
          const int64_t rows = 13;
          const auto x = ties ? tied_floats(rng, static_cast<size_t>(rows * cols))
                              : random_floats(rng, static_cast<size_t>(rows * cols));
          const size_t n = static_cast<size_t>(rows * k);
          std::vector<float> values(n), want_values(n), probabilities(x.size());
          std::vector<int64_t> indices(n), want_indices(n);
          reference::softmax_topk(x.data(), rows, cols, k, want_values.data(), want_indices.data());
          for (int threads : kThreadsToTry) {
            softmax_topk(x.data(), rows, cols, k, values.data(), indices.data(), threads);
            CHECK(indices == want_indices);
            CHECK_EQ(count_far(values, want_values, 1e-5f, 1e-7f), 0);
          }
          // Bit for bit the fused softmax at those indices.
          softmax(x.data(), rows, cols, probabilities.data(), 1);
          int differ = 0;
          for (size_t i = 0; i < n; ++i) {
            const float p = probabilities[static_cast<size_t>(i / static_cast<size_t>(k) * cols) +
                                          static_cast<size_t>(indices[i])];
            differ += std::memcmp(&p, &values[i], sizeof p) != 0;
          }
          CHECK_EQ(differ, 0);
        }
      }
    }
  });
}

TEST_CASE("kernels: softmax_topk and argmax rank NaN first, then +inf") {
  for_each_isa([&](CpuIsa) {
    const std::vector<float> x = {1.0f, kInf, kNaN, 5.0f, kNaN, kInf, -kInf, 2.0f, 2.0f};
    std::vector<float> values(4);
    std::vector<int64_t> indices(4);
    softmax_topk(x.data(), 1, 9, 4, values.data(), indices.data(), 1);
    CHECK((indices == std::vector<int64_t>{2, 4, 1, 5}));
    for (float v : values) CHECK(std::isnan(v));
    int64_t arg = -1;
    argmax(x.data(), 1, 9, &arg, 1);
    CHECK_EQ(arg, int64_t{2});
    argmax(x.data() + 5, 1, 4, &arg, 1);  // inf -inf 2 2
    CHECK_EQ(arg, int64_t{0});
    const std::vector<float> lows = {-kInf, -kInf, -kInf};
    argmax(lows.data(), 1, 3, &arg, 1);
    CHECK_EQ(arg, int64_t{0});
  });
}

TEST_CASE("kernels: argmax matches the reference (first of equal maxima)") {
  std::mt19937 rng(3);
  for_each_isa([&](CpuIsa) {
    for (int64_t cols : kColsToTry) {
      for (bool ties : {false, true}) {
        const int64_t rows = 29;
        auto x = ties ? tied_floats(rng, static_cast<size_t>(rows * cols))
                      : random_floats(rng, static_cast<size_t>(rows * cols));
        if (cols > 3) x[static_cast<size_t>(cols + 2)] = kNaN;  // row 1 has a NaN
        std::vector<int64_t> want(static_cast<size_t>(rows)), got(want.size());
        reference::argmax(x.data(), rows, cols, want.data());
        for (int threads : kThreadsToTry) {
          argmax(x.data(), rows, cols, got.data(), threads);
          CHECK(got == want);
        }
      }
    }
  });
}

TEST_CASE("kernels: layer_norm matches the reference, with and without gamma/beta") {
  std::mt19937 rng(4);
  for_each_isa([&](CpuIsa) {
    for (int64_t cols : kColsToTry) {
      const int64_t rows = 11;
      auto x = random_floats(rng, static_cast<size_t>(rows * cols));
      for (size_t i = 0; i < static_cast<size_t>(cols); ++i) x[i] += 1000.0f;  // row 0: |mean| >> std
      const auto gamma = random_floats(rng, static_cast<size_t>(cols), 1.0f);
      const auto beta = random_floats(rng, static_cast<size_t>(cols), 1.0f);
      for (bool affine : {true, false}) {
        const float* g = affine ? gamma.data() : nullptr;
        const float* b = affine ? beta.data() : nullptr;
        std::vector<float> want(x.size()), got(x.size()), again(x.size());
        reference::layer_norm(x.data(), rows, cols, g, b, 1e-5f, want.data());
        layer_norm(x.data(), rows, cols, g, b, 1e-5f, got.data(), 1);
        CHECK_EQ(count_far(got, want, 1e-4f, 2e-4f), 0);
        for (int threads : kThreadsToTry) {
          layer_norm(x.data(), rows, cols, g, b, 1e-5f, again.data(), threads);
          CHECK(same_bits(again, got));
        }
        std::vector<float> in_place = x;
        layer_norm(in_place.data(), rows, cols, g, b, 1e-5f, in_place.data(), 3);
        CHECK(same_bits(in_place, got));
      }
    }
  });
}

namespace {

struct ImageCase {
  ImageShape shape;
  DType dtype;
  ImageLayout layout;
  size_t out_offset_bytes;  // shifts the output off its alignment (peeling for streaming stores)
};

std::vector<float> run_normalize(const ImageCase& c, const std::vector<uint8_t>& x, const float* mean,
                                 const float* std, float scale, int threads, bool use_reference) {
  const size_t n = x.size(), elem = dtype_size(c.dtype);
  std::vector<uint8_t> buffer(n * elem + c.out_offset_bytes + 64);
  // 64-byte aligned base, then the requested offset.
  const auto base = reinterpret_cast<uintptr_t>(buffer.data());
  uint8_t* out = buffer.data() + ((64 - base % 64) % 64) + c.out_offset_bytes;
  if (use_reference) {
    reference::normalize_image(x.data(), c.shape, mean, std, scale, out, c.dtype, c.layout);
  } else {
    normalize_image(x.data(), c.shape, mean, std, scale, out, c.dtype, c.layout, threads);
  }
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) {
    if (c.dtype == DType::kFloat16) {
      uint16_t h;
      std::memcpy(&h, out + i * 2, 2);
      values[i] = half_to_float(h);
    } else {
      std::memcpy(&values[i], out + i * 4, 4);
    }
  }
  return values;
}

}  // namespace

TEST_CASE("kernels: normalize_image matches the reference for every layout, dtype and channel count") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  const float mean[] = {0.485f, 0.456f, 0.406f, 0.5f, 0.1f}, std[] = {0.229f, 0.224f, 0.225f, 0.25f, 0.3f};
  std::vector<ImageCase> cases;
  for (int64_t channels : {1, 3, 4, 5}) {
    for (ImageShape shape : {ImageShape{1, 1, 1, 0}, ImageShape{1, 7, 5, 0}, ImageShape{3, 13, 17, 0},
                             ImageShape{2, 16, 24, 0}}) {
      shape.channels = channels;
      for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
        for (ImageLayout layout : {ImageLayout::kNCHW, ImageLayout::kNHWC}) cases.push_back({shape, dtype, layout, 0});
      }
    }
  }
  // Large enough for streaming stores, with aligned and shifted outputs.
  for (size_t offset : {0, 4, 8, 2}) {
    for (ImageLayout layout : {ImageLayout::kNCHW, ImageLayout::kNHWC}) {
      const DType dtype = offset == 2 ? DType::kFloat16 : DType::kFloat32;
      cases.push_back({ImageShape{4, 384, 512, 3}, dtype, layout, offset});
    }
  }
  cases.push_back({ImageShape{2, 37, 41, 3}, DType::kFloat32, ImageLayout::kNCHW, 4});
  for_each_isa([&](CpuIsa) {
    for (const auto& c : cases) {
      std::vector<uint8_t> x(static_cast<size_t>(c.shape.batch * c.shape.height * c.shape.width * c.shape.channels));
      for (auto& v : x) v = static_cast<uint8_t>(byte(rng));
      const auto want = run_normalize(c, x, mean, std, 1.0f / 255, 1, true);
      const auto got = run_normalize(c, x, mean, std, 1.0f / 255, 1, false);
      // float16: one unit in the last place of a value near 2.6 is 2^-9.
      const float rtol = c.dtype == DType::kFloat16 ? 1e-3f : 2e-6f;
      CHECK_EQ(count_far(got, want, rtol, 2e-6f), 0);
      for (int threads : {2, 3, 8}) CHECK(same_bits(run_normalize(c, x, mean, std, 1.0f / 255, threads, false), got));
    }
  });
}

TEST_CASE("kernels: normalize_image float16 rounds to nearest even, overflows to infinity") {
  // With scale 1 and std a power of two, x * a + b is exact in float on every path, so the
  // float16 bits must equal the reference conversion exactly.
  std::vector<uint8_t> x(256 * 3);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i / 3);
  const ImageShape shape{1, 16, 16, 3};
  for (float power : {-20.0f, -12.0f, 0.0f, 7.0f, 9.0f, 20.0f}) {
    const float s = std::ldexp(1.0f, static_cast<int>(power));
    const float mean[] = {0.3f, 100.7f, -3.1f}, std[] = {s, s, s};
    for_each_isa([&](CpuIsa) {
      for (ImageLayout layout : {ImageLayout::kNCHW, ImageLayout::kNHWC}) {
        std::vector<uint16_t> got(x.size()), want(x.size());
        normalize_image(x.data(), shape, mean, std, 1.0f, got.data(), DType::kFloat16, layout, 1);
        reference::normalize_image(x.data(), shape, mean, std, 1.0f, want.data(), DType::kFloat16, layout);
        CHECK(got == want);
      }
    });
  }
  CHECK_EQ(reference::float_to_half(65519.0f), uint16_t{0x7bff});
  CHECK_EQ(reference::float_to_half(65520.0f), uint16_t{0x7c00});
  CHECK_EQ(reference::float_to_half(std::ldexp(1.0f, -25)), uint16_t{0});       // a tie: to even (0)
  CHECK_EQ(reference::float_to_half(std::ldexp(3.0f, -25)), uint16_t{2});       // a tie: to even (2)
  CHECK_EQ(reference::float_to_half(-1.0f), uint16_t{0xbc00});
}

TEST_CASE("kernels: bad arguments raise InvalidInput") {
  std::vector<float> x(12, 1.0f), out(12);
  std::vector<int64_t> indices(12);
  CHECK_THROWS_CODE(softmax(x.data(), 3, 4, out.data(), 0), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(softmax(x.data(), 3, 4, x.data() + 1, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(softmax_topk(x.data(), 3, 4, 0, out.data(), indices.data(), 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(softmax_topk(x.data(), 3, 4, 5, out.data(), indices.data(), 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(softmax_topk(x.data(), 3, 4, 2, x.data(), indices.data(), 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(argmax(x.data(), 3, 0, indices.data(), 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(layer_norm(x.data(), 3, 4, nullptr, nullptr, -1.0f, out.data(), 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(layer_norm(x.data(), 2, 4, nullptr, nullptr, 1e-5f, x.data() + 1, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(layer_norm(x.data(), 1, 4, out.data(), nullptr, 1e-5f, out.data(), 1), ErrorCode::kInvalidInput);
  std::vector<uint8_t> image(12);
  const float mean[] = {0.0f, 0.0f, 0.0f}, ok_std[] = {1.0f, 1.0f, 1.0f}, zero_std[] = {1.0f, 0.0f, 1.0f};
  const ImageShape shape{1, 2, 2, 3};
  CHECK_THROWS_CODE(normalize_image(image.data(), shape, mean, zero_std, 1.0f, out.data(), DType::kFloat32,
                                    ImageLayout::kNCHW, 1),
                    ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(normalize_image(image.data(), shape, mean, ok_std, 1.0f, out.data(), DType::kInt32,
                                    ImageLayout::kNCHW, 1),
                    ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(normalize_image(image.data(), shape, mean, ok_std, 1.0f, image.data(), DType::kFloat32,
                                    ImageLayout::kNCHW, 1),
                    ErrorCode::kInvalidInput);
  // Empty inputs are fine and touch nothing.
  softmax(nullptr, 0, 4, nullptr, 1);
  normalize_image(nullptr, ImageShape{0, 2, 2, 3}, mean, ok_std, 1.0f, nullptr, DType::kFloat32, ImageLayout::kNCHW, 1);
}
