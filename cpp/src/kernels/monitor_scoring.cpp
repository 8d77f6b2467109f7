// The monitor's scoring: the choice of ISA variant and the per-reference layouts
// (padded edges, the packed quadratic form). The arithmetic lives in
// kernels/cpu/monitor_scoring.cpp.
#include "monitor_scoring.h"

#include <cmath>
#include <limits>

#include "conveyor/cpu_features.h"

namespace conveyor::kernels {

namespace {

int64_t round_up(int64_t n, int64_t block) { return (n + block - 1) / block * block; }

// L with S = L L^T for the symmetric part S of the k x k matrix p (row-major), into l
// (k x k, lower triangle written); false when S is not positive definite (a pivot is not
// > 0, or not finite).
bool cholesky(const double* p, int64_t k, std::vector<double>& l) {
  const auto sym = [&](int64_t i, int64_t j) { return 0.5 * (p[i * k + j] + p[j * k + i]); };
  for (int64_t j = 0; j < k; ++j) {
    double pivot = sym(j, j);
    for (int64_t m = 0; m < j; ++m) pivot -= l[j * k + m] * l[j * k + m];
    if (!(pivot > 0) || !std::isfinite(pivot)) return false;
    const double diagonal = std::sqrt(pivot);
    l[j * k + j] = diagonal;
    for (int64_t i = j + 1; i < k; ++i) {
      double s = sym(i, j);
      for (int64_t m = 0; m < j; ++m) s -= l[i * k + m] * l[j * k + m];
      l[i * k + j] = s / diagonal;
    }
  }
  return true;
}

}  // namespace

const MonitorKernels& monitor_kernels() noexcept {
#ifdef CONVEYOR_HAVE_AVX2_VARIANTS
  if (active_cpu_isa() == CpuIsa::kAvx2) return avx2::monitor_kernels();
#endif
  return baseline::monitor_kernels();
}

int64_t padded_edge_count(int64_t edge_count) noexcept { return round_up(edge_count, kEdgeBlock) + kEdgeBlock; }

void append_padded_edges(const std::vector<double>& edges, std::vector<double>& out) {
  const int64_t n = static_cast<int64_t>(edges.size());
  out.insert(out.end(), edges.begin(), edges.end());
  out.insert(out.end(), static_cast<size_t>(padded_edge_count(n) - n), std::numeric_limits<double>::infinity());
}

double PackedQuadraticForm::evaluate(const double* padded_d) const noexcept {
  return monitor_kernels().triangular_form(padded_d, triangle.data(), padded_k, squares);
}

PackedQuadraticForm pack_quadratic_form(const double* precision, int64_t k) {
  PackedQuadraticForm form;
  form.k = k;
  form.padded_k = round_up(k, kFormBlock);
  const int64_t kp = form.padded_k;
  std::vector<double> upper(static_cast<size_t>(kp * kp), 0.0);  // U, row-major, zero padding
  std::vector<double> l(static_cast<size_t>(k * k), 0.0);
  form.squares = cholesky(precision, k, l);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j) {
      upper[i * kp + j] = form.squares ? l[j * k + i]
                          : i == j     ? precision[i * k + i]
                                       : precision[i * k + j] + precision[j * k + i];
    }
  }
  form.triangle.reserve(static_cast<size_t>(kp * (kp + kFormBlock) / 2));
  for (int64_t b = 0; b < kp; b += kFormBlock) {
    for (int64_t j = b; j < kp; j += kFormBlock) {
      for (int64_t u = 0; u < kFormBlock; ++u) {
        for (int64_t c = 0; c < kFormBlock; ++c) form.triangle.push_back(upper[(b + u) * kp + j + c]);
      }
    }
  }
  return form;
}

}  // namespace conveyor::kernels
