// Drift statistics between a reference distribution and a window of live values, both
// binned on the same bins (fixed from the reference: quantile edges for a numeric feature,
// the reference's categories for a categorical one). Pure functions: no allocation beyond
// what the caller passes, no state, callable from any thread.
//
// Conventions: `ref_p` holds the reference probability of each of `bins` bins (sums to 1);
// `counts` holds the window's row count per bin. A numeric feature's bins are separated by
// `bins - 1` ascending inner edges; bin 0 is (-inf, edges[0]), bin i is [edges[i-1],
// edges[i]), the last is [edges[bins-2], +inf).
#pragma once

#include <cstddef>
#include <cstdint>

namespace conveyor::drift {

// Population stability index: sum over bins of (q - p) * ln(q / p), with p the reference
// and q the window proportions, both smoothed as (x + eps) / (1 + bins * eps) so an empty
// bin costs a bounded amount instead of infinity. 0 for an empty window.
double psi(const double* ref_p, const uint64_t* counts, size_t bins, double eps);

// Jensen-Shannon distance (square root of the JS divergence, base-2 logarithms: 0..1)
// between the reference and the window proportions. 0 for an empty window.
double js_distance(const double* ref_p, const uint64_t* counts, size_t bins);

struct KsResult {
  double statistic = 0;    // D_b: max |F_ref - F_window| over the bin edges
  double error_bound = 0;  // D_b <= D <= D_b + error_bound, D the exact two-sample statistic
  double p_value = 1;      // asymptotic Kolmogorov, effective n = n m / (n + m)
};
// Two-sample Kolmogorov-Smirnov from the binned CDFs; ref_rows (m) is the number of
// reference rows the probabilities came from (0: treat the reference as exact, n_eff = n).
KsResult ks_binned(const double* ref_p, const uint64_t* counts, size_t bins, uint64_t ref_rows);

// First Wasserstein distance between the binned distributions, divided by `scale` (the
// reference standard deviation; <= 0 means 1). Mass inside a bin is taken at the bin's
// midpoint; the open outer bins are closed at `lo` and `hi` (the smaller of the reference
// and window minima, the larger of the maxima).
double wasserstein_binned(const double* edges, const double* ref_p, const uint64_t* counts, size_t bins,
                          double lo, double hi, double scale);

struct ChiSquaredResult {
  double statistic = 0;
  double dof = 0;
  double p_value = 1;
};
// Pearson goodness of fit of the window counts against the reference probabilities
// (expected = n * (p + eps) / (1 + bins * eps)); dof = bins - 1.
ChiSquaredResult chi_squared(const double* ref_p, const uint64_t* counts, size_t bins, double eps);

// Survival functions of the limiting distributions.
double kolmogorov_sf(double x);           // P(K > x), K the Kolmogorov distribution
double chi2_sf(double x, double dof);     // P(X > x), X chi-squared with dof degrees of freedom

enum class Correction : uint8_t { kNone, kBonferroni, kBenjaminiHochberg };

// Adjusted p-values for n tests (NaN entries are skipped and stay NaN; n_tests counts the
// others). BH: step-up q-values, monotone, capped at 1. `scratch` holds n size_t.
void adjust_p_values(const double* p, size_t n, Correction correction, double* adjusted, size_t* scratch);

}  // namespace conveyor::drift
