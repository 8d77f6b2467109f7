#include "conveyor/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "conveyor/error.h"

namespace conveyor {

namespace {

constexpr int kAuto = -1;
std::atomic<int> g_forced{kAuto};

CpuIsa detect() noexcept {
  if (!cpu_has_avx2_fma() || !avx2_variants_built()) return CpuIsa::kBaseline;
  const char* limit = std::getenv("CONVEYOR_CPU_ISA");
  if (limit && std::strcmp(limit, "baseline") == 0) return CpuIsa::kBaseline;
  return CpuIsa::kAvx2;
}

}  // namespace

bool avx2_variants_built() noexcept {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  return true;
#else
  return false;
#endif
}

bool cpu_has_avx2_fma() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

CpuIsa active_cpu_isa() noexcept {
  static const CpuIsa detected = detect();
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced == kAuto ? detected : static_cast<CpuIsa>(forced);
}

void force_cpu_isa(CpuIsa isa) {
  if (isa == CpuIsa::kAvx2 && !(cpu_has_avx2_fma() && avx2_variants_built())) {
    throw Error(ErrorCode::kInvalidInput,
                "[kernels] cannot force the avx2 path: this CPU or build has no AVX2+FMA variants");
  }
  g_forced.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void reset_cpu_isa() noexcept { g_forced.store(kAuto, std::memory_order_relaxed); }

const char* cpu_isa_name(CpuIsa isa) noexcept { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

}  // namespace conveyor
