// Argument checks and the thread split shared by the dispatch of conveyor/kernels.h
// (kernels/image.cpp, kernels/activations.cpp). Compiled once, never per ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "conveyor/error.h"

namespace conveyor::kernels {

[[noreturn]] inline void invalid(const char* kernel, const std::string& what) {
  throw Error(ErrorCode::kInvalidInput, std::string("[kernels] ") + kernel + ": " + what);
}

inline void check_threads(const char* kernel, int threads) {
  if (threads < 1) invalid(kernel, "threads must be >= 1, got " + std::to_string(threads));
}

// Whether two byte ranges share a byte (empty ranges and null pointers share none).
inline bool overlaps(const void* a, const void* b, size_t a_bytes, size_t b_bytes) {
  if (!a || !b || a_bytes == 0 || b_bytes == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

// Elements one thread should get before another is worth waking: a wake-up and join
// cost a few microseconds, about what 16k elements of these kernels take.
inline constexpr int64_t kMinElementsPerThread = int64_t{1} << 14;

// Threads for `units` units of `elements_per_unit` elements: at most `threads`, one per
// unit, and few enough that each gets kMinElementsPerThread.
inline int useful_threads(int threads, int64_t units, int64_t elements_per_unit) {
  const int64_t by_work = std::max<int64_t>(1, units * elements_per_unit / kMinElementsPerThread);
  return static_cast<int>(std::min<int64_t>({threads, units, by_work}));
}

}  // namespace conveyor::kernels
