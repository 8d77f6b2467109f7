// Test helper: run a body once per CPU kernel variant this build and machine have.
#pragma once

#include <vector>

#include "conveyor/cpu_features.h"

namespace conveyor::test {

// The variants to test: the baseline always, AVX2/FMA when built and supported.
inline std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> out = {CpuIsa::kBaseline};
  if (cpu_has_avx2_fma() && avx2_variants_built()) out.push_back(CpuIsa::kAvx2);
  return out;
}

// Runs body(isa) once per variant with that variant forced, then restores the default.
template <class Body>
void for_each_isa(Body body) {
  for (CpuIsa isa : isas()) {
    force_cpu_isa(isa);
    body(isa);
  }
  reset_cpu_isa();
}

}  // namespace conveyor::test
