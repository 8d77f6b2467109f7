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

// Factors the symmetric matrix in a's lower triangle (k x k, row-major) in place into L
// with S = L L^T (a's upper triangle is left as it was); false when S is not positive
// definite (a pivot is not > 0, or not finite). Right-looking: each column's update of
// the rows below it is a contiguous multiply-subtract, which the compiler vectorises.
// `column` holds k values.
bool cholesky_in_place(std::vector<double>& a, int64_t k, std::vector<double>& column) {
  for (int64_t j = 0; j < k; ++j) {
    const double pivot = a[j * k + j];
    if (!(pivot > 0) || !std::isfinite(pivot)) return false;
    const double diagonal = std::sqrt(pivot);
    a[j * k + j] = diagonal;
    for (int64_t i = j + 1; i < k; ++i) column[i] = a[i * k + j] /= diagonal;
    for (int64_t i = j + 1; i < k; ++i) {
      const double l_ij = column[i];
      double* row = a.data() + i * k;
      for (int64_t m = j + 1; m <= i; ++m) row[m] -= l_ij * column[m];
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
  std::vector<double> a(static_cast<size_t>(k * k)), column(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) a[i * k + j] = 0.5 * (precision[i * k + j] + precision[j * k + i]);
  }
  form.squares = cholesky_in_place(a, k, column);
  // U[i][j]: L^T, or the symmetric part's upper triangle with doubled off-diagonal
  // entries; zero below the diagonal and past k.
  const auto upper = [&](int64_t i, int64_t j) {
    if (j < i || j >= k) return 0.0;
    if (form.squares) return a[j * k + i];
    return i == j ? precision[i * k + i] : precision[i * k + j] + precision[j * k + i];
  };
  const int64_t kp = form.padded_k;
  form.triangle.reserve(static_cast<size_t>(kp * (kp + kFormBlock) / 2));
  for (int64_t b = 0; b < kp; b += kFormBlock) {
    for (int64_t j = b; j < kp; j += kFormBlock) {
      for (int64_t u = 0; u < kFormBlock; ++u) {
        for (int64_t c = 0; c < kFormBlock; ++c) form.triangle.push_back(upper(b + u, j + c));
      }
    }
  }
  return form;
}

}  // namespace conveyor::kernels
