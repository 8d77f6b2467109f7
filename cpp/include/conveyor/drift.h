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
// bin costs a bounded amount instead of infinity (eps = 0: +inf when one side of a bin is
// empty and the other not). 0 for an empty window.
double psi(const double* ref_p, const uint64_t* counts, size_t bins, double eps);

// Jensen-Shannon distance (square root of the JS divergence, base-2 logarithms: 0..1)
// between the reference and the window proportions, unsmoothed (0 ln 0 = 0). 0 for an
// empty window.
double js_distance(const double* ref_p, const uint64_t* counts, size_t bins);

struct KsResult {
  double statistic = 0;    // D_b: max |F_ref - F_window| over the bin edges
  double error_bound = 0;  // D_b <= D <= D_b + error_bound, D the exact two-sample statistic
  double p_value = 1;      // asymptotic Kolmogorov, effective n = n m / (n + m)
};
// Two-sample Kolmogorov-Smirnov from the binned CDFs; ref_rows (m) is the number of
// reference rows the probabilities came from (0: treat the reference as exact, n_eff = n).
//
// Statistic: F at the edges is the mass of the bins below (F(edge-), what a sample CDF
// takes just left of the edge), so D_b never exceeds the exact D of the raw samples.
// Error bound: with d the difference F_ref - F_window at bin i's left edge and p, q the
// bin's reference and window masses, inside the bin the difference stays within
// [d - q, d + p], so D <= max over bins of max(d + p, q - d) = D_b + error_bound. This is
// the sharpest bound the bins allow, and never more than the max over bins of max(p, q).
// p-value: Q_KS((sqrt(n_eff) + 0.12 + 0.11 / sqrt(n_eff)) * D_b), Stephens' small-sample
// form of the asymptotic Kolmogorov distribution, n the window rows. D_b, being the
// statistic of a coarser view of the data, makes the p-value conservative (never smaller
// than the one the exact D would give with the same formula).
// Empty window: {0, 0, 1}.
KsResult ks_binned(const double* ref_p, const uint64_t* counts, size_t bins, uint64_t ref_rows);

// First Wasserstein distance between the binned distributions, divided by `scale` (the
// reference standard deviation; <= 0 or not finite means 1). `edges` holds bins - 1
// values. Mass inside a bin is taken at the bin's midpoint; the open outer bins are closed
// at `lo` and `hi` (the smaller of the reference and window minima, the larger of the
// maxima; a value that is not finite or lies inside the edges is replaced by the outer
// edge). Moving each sample's mass to the midpoints costs at most half a bin width per
// unit of mass, so against the exact distance W of the raw samples (all within [lo, hi]):
// |W_b - W| <= sum over bins of (p + q) * width / 2, in units of `scale`.
// 0 for an empty window or one bin.
double wasserstein_binned(const double* edges, const double* ref_p, const uint64_t* counts, size_t bins,
                          double lo, double hi, double scale);

struct ChiSquaredResult {
  double statistic = 0;
  double dof = 0;
  double p_value = 1;
};
// Pearson goodness of fit of the window counts against the reference probabilities
// (expected = n * (p + eps) / (1 + bins * eps)); dof = bins - 1; p-value chi2_sf.
// Empty window: statistic 0, p-value 1; one bin: p-value 1 (nothing can differ); eps = 0
// and rows in a bin of zero reference mass: statistic +inf, p-value 0.
ChiSquaredResult chi_squared(const double* ref_p, const uint64_t* counts, size_t bins, double eps);

// Survival functions of the limiting distributions (NaN in, NaN out). Relative error, by
// 40-digit references: ~1e-14 for results above 1e-10, growing with the depth of the tail
// (the rounding of a large exponent) to at most ~3e-13 at 1e-300.
// P(K > x), K the Kolmogorov distribution: 1 for x <= 0; below x = 0.82, one minus the
// theta-function form of the CDF, sqrt(2 pi) / x * sum exp(-(2k-1)^2 pi^2 / (8 x^2));
// above, the alternating series 2 sum (-1)^(k-1) exp(-2 k^2 x^2).
double kolmogorov_sf(double x);
// P(X > x), X chi-squared with dof > 0 degrees of freedom (NaN for dof <= 0): the
// regularized upper incomplete gamma Q(dof / 2, x / 2), by its series (x < a + 1) or
// continued fraction (otherwise), with x^a e^-x / Gamma(a) computed without cancellation
// for large dof.
double chi2_sf(double x, double dof);

enum class Correction : uint8_t { kNone, kBonferroni, kBenjaminiHochberg };

// Adjusted p-values for n tests (NaN entries are skipped and stay NaN; m counts the
// others). Bonferroni: min(1, p * m). BH: step-up q-values, monotone, capped at 1, the
// same values as scipy.stats.false_discovery_control(method='bh'). `scratch` holds n
// size_t; `adjusted` may be `p`.
void adjust_p_values(const double* p, size_t n, Correction correction, double* adjusted, size_t* scratch);

}  // namespace conveyor::drift
