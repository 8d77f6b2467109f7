// Reading one monitored value out of a batch tensor of any numeric dtype, as a double.
// Internal to the monitor (cpp/src): header-only so the per-dtype loops inline.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "conveyor/monitor.h"
#include "conveyor/tensor.h"

namespace conveyor::monitor::values {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Half {
  uint16_t bits;
};
struct BHalf {
  uint16_t bits;
};

template <typename T>
inline double as_double(T v) {
  return static_cast<double>(v);
}
inline double as_double(Half h) {
  const int exponent = (h.bits >> 10) & 0x1f;
  const int mantissa = h.bits & 0x3ff;
  double v;
  if (exponent == 0) {
    v = std::ldexp(static_cast<double>(mantissa), -24);
  } else if (exponent == 31) {
    v = mantissa ? kNaN : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(static_cast<double>(mantissa + 1024), exponent - 25);
  }
  return (h.bits & 0x8000) ? -v : v;
}
inline double as_double(BHalf b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Calls fn(T{}) with the C++ type of a (checked, non-BYTES) dtype.
template <typename Fn>
void with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBool:
    case DType::kUInt8: fn(uint8_t{}); return;
    case DType::kUInt16: fn(uint16_t{}); return;
    case DType::kUInt32: fn(uint32_t{}); return;
    case DType::kUInt64: fn(uint64_t{}); return;
    case DType::kInt8: fn(int8_t{}); return;
    case DType::kInt16: fn(int16_t{}); return;
    case DType::kInt32: fn(int32_t{}); return;
    case DType::kInt64: fn(int64_t{}); return;
    case DType::kFloat16: fn(Half{}); return;
    case DType::kBFloat16: fn(BHalf{}); return;
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat64: fn(double{}); return;
    case DType::kBytes: return;
  }
}

// The value a derived feature takes for one row of `width` elements (NaN when the row
// holds NaN or infinity).
template <typename T>
inline double derive_row(const T* row, int64_t width, Derive derive) {
  double best = as_double(row[0]);
  int64_t arg = 0;
  bool finite = std::isfinite(best);
  for (int64_t j = 1; j < width; ++j) {
    const double v = as_double(row[j]);
    finite = finite && std::isfinite(v);
    if (v > best) {
      best = v;
      arg = j;
    }
  }
  if (!finite) return kNaN;
  switch (derive) {
    case Derive::kPredictedClass: return static_cast<double>(arg);
    case Derive::kConfidence: return best;
    case Derive::kConfidenceFromLogits: {
      double sum = 0;
      for (int64_t j = 0; j < width; ++j) sum += std::exp(as_double(row[j]) - best);
      return 1.0 / sum;
    }
    case Derive::kValue: break;
  }
  return kNaN;
}

}  // namespace conveyor::monitor::values
