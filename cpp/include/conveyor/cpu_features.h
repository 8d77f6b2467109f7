// Which instruction set the CPU kernels run with.
//
// Every CPU kernel source is compiled twice (cpp/src/kernels/cpu/): for the x86-64
// baseline and for AVX2+FMA. The choice is made once at run time from what the CPU
// supports (never -march=native: a wheel must run on any x86-64 machine). Tests and
// benchmarks may force the baseline path to check that both paths agree.
#pragma once

#include <string>

namespace conveyor {

enum class CpuIsa { kBaseline, kAvx2 };

// What this CPU supports (cached after the first call).
bool cpu_has_avx2_fma() noexcept;
// The ISA the kernels use now: the best supported one, unless forced (below) or
// limited by the CONVEYOR_CPU_ISA environment variable ("baseline" or "avx2").
CpuIsa active_cpu_isa() noexcept;
// Forces an ISA; throws Error(kInvalidInput) for one this CPU or build lacks.
void force_cpu_isa(CpuIsa isa);
// Back to the automatic choice.
void reset_cpu_isa() noexcept;
const char* cpu_isa_name(CpuIsa isa) noexcept;
// Whether this build compiled the AVX2 variants (x86-64 builds only).
bool avx2_variants_built() noexcept;

}  // namespace conveyor
