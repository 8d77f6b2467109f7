// Drift statistics (conveyor/drift.h) on cases worked out by hand, closed forms of the
// limiting distributions, edge cases (empty window, a bin of zero reference mass, one
// bin, all mass in one bin) and concurrent callers (run under TSan).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <thread>
#include <vector>

#include "check.h"
#include "conveyor/drift.h"

using namespace conveyor::drift;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kPi = 3.14159265358979323846;

// |got - want| <= tol * max(1, |want|), reported with both values.
#define CHECK_NEAR(got, want, tol)                                                              \
  do {                                                                                          \
    const double near_got_ = (got), near_want_ = (want);                                        \
    if (!(std::fabs(near_got_ - near_want_) <= (tol) * std::fmax(1.0, std::fabs(near_want_)))) { \
      std::ostringstream near_os_;                                                              \
      near_os_.precision(17);                                                                   \
      near_os_ << "CHECK_NEAR(" #got ", " #want "): " << near_got_ << " vs " << near_want_;     \
      ::conveyor::testing::record_failure(__FILE__, __LINE__, near_os_.str());                  \
    }                                                                                           \
  } while (0)

// Relative closeness, for values far below 1.
#define CHECK_REL(got, want, tol)                                                             \
  do {                                                                                        \
    const double rel_got_ = (got), rel_want_ = (want);                                        \
    if (!(std::fabs(rel_got_ - rel_want_) <= (tol) * std::fabs(rel_want_))) {                 \
      std::ostringstream rel_os_;                                                             \
      rel_os_.precision(17);                                                                  \
      rel_os_ << "CHECK_REL(" #got ", " #want "): " << rel_got_ << " vs " << rel_want_;       \
      ::conveyor::testing::record_failure(__FILE__, __LINE__, rel_os_.str());                 \
    }                                                                                         \
  } while (0)

const std::vector<double> kUniform4 = {0.25, 0.25, 0.25, 0.25};
const std::vector<uint64_t> kRising4 = {10, 20, 30, 40};

// P(K > x) by brute force from either series, for comparison.
double kolmogorov_alternating(double x) {
  double sum = 0;
  for (int k = 1; k <= 200; ++k) sum += (k % 2 ? 2.0 : -2.0) * std::exp(-2.0 * k * k * x * x);
  return sum;
}
double kolmogorov_theta(double x) {
  double sum = 0;
  for (int k = 1; k <= 200; ++k) sum += std::exp(-(2.0 * k - 1) * (2.0 * k - 1) * kPi * kPi / (8 * x * x));
  return 1 - std::sqrt(2 * kPi) / x * sum;
}

// P(chi2(2k) > x) = e^(-x/2) sum_{j < k} (x/2)^j / j!.
double chi2_sf_even(double x, int k) {
  double term = 1, sum = 0;
  for (int j = 0; j < k; ++j) {
    sum += term;
    term *= 0.5 * x / (j + 1);
  }
  return std::exp(-0.5 * x) * sum;
}

}  // namespace

TEST_CASE("drift psi: hand-computed values, smoothing and the empty window") {
  // q = (1/4, 3/4) against p = (1/2, 1/2): (1/4 - 1/2) ln(1/2) + (3/4 - 1/2) ln(3/2) = ln(3) / 4.
  const double half[] = {0.5, 0.5};
  const uint64_t one_three[] = {1, 3};
  CHECK_NEAR(psi(half, one_three, 2, 0.0), std::log(3.0) / 4, 1e-15);
  const uint64_t same[] = {7, 7};
  CHECK_EQ(psi(half, same, 2, 0.01), 0.0);
  const uint64_t empty[] = {0, 0};
  CHECK_EQ(psi(half, empty, 2, 0.01), 0.0);
  // An empty window bin: infinite without smoothing, bounded with it.
  const uint64_t zero_four[] = {0, 4};
  CHECK_EQ(psi(half, zero_four, 2, 0.0), kInf);
  const double q0 = 0.01 / 1.02, q1 = 1.01 / 1.02;
  CHECK_NEAR(psi(half, zero_four, 2, 0.01), (q0 - 0.5) * std::log(q0 / 0.5) + (q1 - 0.5) * std::log(q1 / 0.5), 1e-15);
  // A bin of zero reference mass that the window does not use costs nothing, even unsmoothed.
  const double with_hole[] = {0.5, 0.0, 0.5};
  const uint64_t avoiding[] = {3, 0, 3};
  CHECK_EQ(psi(with_hole, avoiding, 3, 0.0), 0.0);
  const uint64_t into_hole[] = {3, 1, 2};
  CHECK_EQ(psi(with_hole, into_hole, 3, 0.0), kInf);
  CHECK(std::isfinite(psi(with_hole, into_hole, 3, 1e-4)));
  // One bin: the distributions cannot differ.
  const double whole[] = {1.0};
  const uint64_t some[] = {12};
  CHECK_EQ(psi(whole, some, 1, 1e-4), 0.0);
}

TEST_CASE("drift js: identical, disjoint and a hand-computed pair") {
  const double half[] = {0.5, 0.5};
  const uint64_t same[] = {4, 4};
  CHECK_EQ(js_distance(half, same, 2), 0.0);
  const uint64_t empty[] = {0, 0};
  CHECK_EQ(js_distance(half, empty, 2), 0.0);
  const double left[] = {1.0, 0.0};
  const uint64_t right[] = {0, 5};
  CHECK_NEAR(js_distance(left, right, 2), 1.0, 1e-15);
  // p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): KL(p||m) = ln(4/3), KL(q||m) = ln(4/3) / 2,
  // so the divergence is (3/4) log2(4/3).
  const uint64_t even[] = {1, 1};
  CHECK_NEAR(js_distance(left, even, 2), std::sqrt(0.75 * std::log2(4.0 / 3.0)), 1e-15);
  const double whole[] = {1.0};
  const uint64_t some[] = {3};
  CHECK_EQ(js_distance(whole, some, 1), 0.0);
}

TEST_CASE("drift ks: statistic, sharp error bound and p-value") {
  // Reference CDF at the edges 1/4, 1/2, 3/4; window 1/10, 3/10, 6/10.
  KsResult r = ks_binned(kUniform4.data(), kRising4.data(), 4, 100);
  CHECK_NEAR(r.statistic, 0.2, 1e-15);
  // Bins' max(d + p, q - d): 0.25, 0.40, 0.45, 0.40 -> D <= 0.45.
  CHECK_NEAR(r.error_bound, 0.25, 1e-15);
  const double n_eff = 100.0 * 100.0 / 200.0;
  const double lambda = (std::sqrt(n_eff) + 0.12 + 0.11 / std::sqrt(n_eff)) * 0.2;
  CHECK_NEAR(r.p_value, kolmogorov_alternating(lambda), 1e-14);
  // ref_rows 0: an exact reference, n_eff = n.
  const KsResult exact = ks_binned(kUniform4.data(), kRising4.data(), 4, 0);
  CHECK_NEAR(exact.p_value, kolmogorov_alternating((10 + 0.12 + 0.011) * 0.2), 1e-14);
  CHECK(exact.p_value < r.p_value);

  // Empty window.
  const uint64_t empty[] = {0, 0, 0, 0};
  r = ks_binned(kUniform4.data(), empty, 4, 100);
  CHECK_EQ(r.statistic, 0.0);
  CHECK_EQ(r.error_bound, 0.0);
  CHECK_EQ(r.p_value, 1.0);

  // All window mass in the last bin: D_b = 3/4, and the exact D may reach 1.
  const uint64_t top[] = {0, 0, 0, 7};
  r = ks_binned(kUniform4.data(), top, 4, 1000);
  CHECK_NEAR(r.statistic, 0.75, 1e-15);
  CHECK_NEAR(r.error_bound, 0.25, 1e-15);
  CHECK(r.p_value < 0.01);

  // Window entirely in a bin of zero reference mass: D is exactly 1/2, the bound is 0.
  const double with_hole[] = {0.5, 0.0, 0.5};
  const uint64_t in_hole[] = {0, 4, 0};
  r = ks_binned(with_hole, in_hole, 3, 0);
  CHECK_NEAR(r.statistic, 0.5, 1e-15);
  CHECK_NEAR(r.error_bound, 0.0, 1e-15);

  // One bin: nothing is known inside it, so D_b = 0 with a bound of 1.
  const double whole[] = {1.0};
  const uint64_t some[] = {9};
  r = ks_binned(whole, some, 1, 50);
  CHECK_EQ(r.statistic, 0.0);
  CHECK_NEAR(r.error_bound, 1.0, 1e-15);
  CHECK_EQ(r.p_value, 1.0);

  // The bound never exceeds the coarser max-bin-mass bound.
  const double skewed[] = {0.1, 0.2, 0.3, 0.4};
  const uint64_t window[] = {5, 0, 9, 2};
  r = ks_binned(skewed, window, 4, 10);
  CHECK(r.error_bound <= 0.4 + 1e-15);
  CHECK(r.error_bound >= 0);
}

TEST_CASE("drift wasserstein: midpoints, outer bins, scale and one bin") {
  const double edges[] = {1, 2, 3};
  // Midpoints 0.5, 1.5, 2.5, 3.5; |F_ref - F_window| = 0.15, 0.2, 0.15, each over a unit step.
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, 0, 4, 1), 0.5, 1e-15);
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, 0, 4, 2), 0.25, 1e-15);
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, 0, 4, 0), 0.5, 1e-15);
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, 0, 4, -kInf), 0.5, 1e-15);
  // lo inside the first edge or not finite: the outer bin is closed at the edge (midpoint 1).
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, 1.5, 4, 1), 0.425, 1e-15);
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), kRising4.data(), 4, -kInf, 4, 1), 0.425, 1e-15);
  // All window mass in the last bin: 0.25 + 0.5 + 0.75.
  const uint64_t top[] = {0, 0, 0, 7};
  CHECK_NEAR(wasserstein_binned(edges, kUniform4.data(), top, 4, 0, 4, 1), 1.5, 1e-15);
  // A point mass moved from the first to the last of three bins: midpoints -0.5 and 1.5.
  const double first[] = {1, 0, 0};
  const uint64_t last[] = {0, 0, 5};
  const double two_edges[] = {0, 1};
  CHECK_NEAR(wasserstein_binned(two_edges, first, last, 3, -1, 2, 1), 2.0, 1e-15);
  const uint64_t empty[] = {0, 0, 0, 0};
  CHECK_EQ(wasserstein_binned(edges, kUniform4.data(), empty, 4, 0, 4, 1), 0.0);
  const double whole[] = {1.0};
  const uint64_t some[] = {9};
  CHECK_EQ(wasserstein_binned(nullptr, whole, some, 1, -3, 3, 1), 0.0);
}

TEST_CASE("drift chi-squared: statistic, dof and closed-form p-values") {
  // Three equal bins: dof 2, where P(X > x) = exp(-x / 2).
  const double third[] = {1.0 / 3, 1.0 / 3, 1.0 / 3};
  const uint64_t counts[] = {10, 20, 30};
  ChiSquaredResult r = chi_squared(third, counts, 3, 0.0);
  CHECK_NEAR(r.statistic, (100.0 + 0 + 100) / 20, 1e-13);
  CHECK_EQ(r.dof, 2.0);
  CHECK_REL(r.p_value, std::exp(-5.0), 1e-13);
  r = chi_squared(kUniform4.data(), kRising4.data(), 4, 0.0);
  CHECK_NEAR(r.statistic, 20.0, 1e-13);
  CHECK_EQ(r.dof, 3.0);
  // dof 3: erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2).
  CHECK_REL(r.p_value, std::erfc(std::sqrt(10.0)) + std::sqrt(40.0 / kPi) * std::exp(-10.0), 1e-13);
  // Smoothed expected counts: n (p + eps) / (1 + bins eps).
  const double with_hole[] = {0.5, 0.0, 0.5};
  const uint64_t into_hole[] = {3, 1, 2};
  r = chi_squared(with_hole, into_hole, 3, 0.01);
  const double e_full = 6 * 0.51 / 1.03, e_hole = 6 * 0.01 / 1.03;
  CHECK_NEAR(r.statistic, (3 - e_full) * (3 - e_full) / e_full + (1 - e_hole) * (1 - e_hole) / e_hole +
                              (2 - e_full) * (2 - e_full) / e_full, 1e-12);
  r = chi_squared(with_hole, into_hole, 3, 0.0);
  CHECK_EQ(r.statistic, kInf);
  CHECK_EQ(r.p_value, 0.0);
  const uint64_t avoiding[] = {3, 0, 3};
  r = chi_squared(with_hole, avoiding, 3, 0.0);
  CHECK_EQ(r.statistic, 0.0);
  CHECK_EQ(r.p_value, 1.0);
  // Empty window and one bin.
  const uint64_t empty[] = {0, 0, 0};
  r = chi_squared(third, empty, 3, 1e-4);
  CHECK_EQ(r.statistic, 0.0);
  CHECK_EQ(r.dof, 2.0);
  CHECK_EQ(r.p_value, 1.0);
  const double whole[] = {1.0};
  const uint64_t some[] = {9};
  r = chi_squared(whole, some, 1, 1e-4);
  CHECK_EQ(r.dof, 0.0);
  CHECK_EQ(r.p_value, 1.0);
}

TEST_CASE("drift chi2_sf: closed forms across dof and into the far tail") {
  for (double x : {1e-6, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 700.0, 1400.0}) {
    CHECK_REL(chi2_sf(x, 2), std::exp(-0.5 * x), 1e-14);
    CHECK_REL(chi2_sf(x, 1), std::erfc(std::sqrt(0.5 * x)), 1e-13);
    for (int k : {2, 5, 10, 20}) CHECK_REL(chi2_sf(x, 2 * k), chi2_sf_even(x, k), 1e-13);
  }
  // Large dof near and far from the mean (2k degrees of freedom, series computed in log space).
  for (int k : {200, 1000}) {
    for (double ratio : {0.8, 1.0, 1.1, 1.5, 2.0}) {
      const double x = ratio * 2 * k;
      double log_term = -0.5 * x, log_sum = -kInf;  // log of e^(-x/2) sum_{j<k} (x/2)^j / j!
      for (int j = 0; j < k; ++j) {
        const double hi = std::fmax(log_sum, log_term), lo = std::fmin(log_sum, log_term);
        log_sum = hi + std::log1p(std::exp(lo - hi));
        log_term += std::log(0.5 * x / (j + 1));
      }
      CHECK_REL(chi2_sf(x, 2 * k), std::exp(log_sum), 1e-11);
    }
  }
  CHECK_EQ(chi2_sf(0, 3), 1.0);
  CHECK_EQ(chi2_sf(-1, 3), 1.0);
  CHECK_EQ(chi2_sf(kInf, 3), 0.0);
  CHECK(std::isnan(chi2_sf(kNaN, 3)));
  CHECK(std::isnan(chi2_sf(1, 0)));
  CHECK(std::isnan(chi2_sf(1, -2)));
  CHECK_EQ(chi2_sf(1e6, 3), 0.0);
}

TEST_CASE("drift kolmogorov_sf: both series, known values, limits") {
  for (double x = 0.05; x < 6; x += 0.0137) {
    CHECK_NEAR(kolmogorov_sf(x), x < 0.82 ? kolmogorov_theta(x) : kolmogorov_alternating(x), 1e-15);
    if (x > 0.3) CHECK_NEAR(kolmogorov_theta(x), kolmogorov_alternating(x), 1e-14);  // the two forms agree
  }
  for (double x : {1.0, 2.0, 5.0, 10.0, 19.0}) CHECK_REL(kolmogorov_sf(x), kolmogorov_alternating(x), 1e-13);
  CHECK_NEAR(kolmogorov_sf(0.5), 0.9639452436648751, 1e-15);
  CHECK_NEAR(kolmogorov_sf(1.0), 0.26999967167735456, 1e-15);
  CHECK_REL(kolmogorov_sf(3.0), 3.045995948942526e-08, 1e-13);
  CHECK_EQ(kolmogorov_sf(0.0), 1.0);
  CHECK_EQ(kolmogorov_sf(-1.0), 1.0);
  CHECK_EQ(kolmogorov_sf(1e-3), 1.0);
  CHECK_EQ(kolmogorov_sf(40.0), 0.0);
  CHECK_EQ(kolmogorov_sf(kInf), 0.0);
  CHECK(std::isnan(kolmogorov_sf(kNaN)));
}

TEST_CASE("drift adjust_p_values: BH, Bonferroni, none, NaN and in place") {
  const double p[] = {0.01, 0.04, 0.03, 0.005};
  double adjusted[4];
  size_t scratch[4];
  // Sorted: 0.005 * 4/1, 0.01 * 4/2, 0.03 * 4/3, 0.04 * 4/4 = 0.02, 0.02, 0.04, 0.04 (already monotone).
  adjust_p_values(p, 4, Correction::kBenjaminiHochberg, adjusted, scratch);
  CHECK_NEAR(adjusted[0], 0.02, 1e-17);
  CHECK_NEAR(adjusted[1], 0.04, 1e-17);
  CHECK_NEAR(adjusted[2], 0.04, 1e-17);
  CHECK_NEAR(adjusted[3], 0.02, 1e-17);
  adjust_p_values(p, 4, Correction::kBonferroni, adjusted, scratch);
  CHECK_NEAR(adjusted[0], 0.04, 1e-17);
  CHECK_NEAR(adjusted[1], 0.16, 1e-17);
  CHECK_NEAR(adjusted[2], 0.12, 1e-17);
  CHECK_NEAR(adjusted[3], 0.02, 1e-17);
  adjust_p_values(p, 4, Correction::kNone, adjusted, scratch);
  for (int i = 0; i < 4; ++i) CHECK_EQ(adjusted[i], p[i]);

  // The step-up minimum: 0.04 * 3/2 = 0.06 is lowered to 0.05 * 3/3.
  const double step[] = {0.05, 0.04, 0.001};
  double step_adjusted[3];
  adjust_p_values(step, 3, Correction::kBenjaminiHochberg, step_adjusted, scratch);
  CHECK_NEAR(step_adjusted[0], 0.05, 1e-17);
  CHECK_NEAR(step_adjusted[1], 0.05, 1e-17);
  CHECK_NEAR(step_adjusted[2], 0.003, 1e-17);

  // NaN entries are skipped: m = 2, Bonferroni caps at 1.
  double with_nan[] = {0.6, kNaN, 0.02, kNaN};
  adjust_p_values(with_nan, 4, Correction::kBonferroni, adjusted, scratch);
  CHECK_EQ(adjusted[0], 1.0);
  CHECK(std::isnan(adjusted[1]));
  CHECK_NEAR(adjusted[2], 0.04, 1e-17);
  CHECK(std::isnan(adjusted[3]));
  // In place.
  adjust_p_values(with_nan, 4, Correction::kBenjaminiHochberg, with_nan, scratch);
  CHECK_NEAR(with_nan[0], 0.6, 1e-17);
  CHECK(std::isnan(with_nan[1]));
  CHECK_NEAR(with_nan[2], 0.04, 1e-17);
  CHECK(std::isnan(with_nan[3]));

  // Ties give equal q-values whatever their order; no tests at all is fine.
  const double tied[] = {0.02, 0.01, 0.02, 0.02};
  adjust_p_values(tied, 4, Correction::kBenjaminiHochberg, adjusted, scratch);
  CHECK_EQ(adjusted[0], adjusted[2]);
  CHECK_EQ(adjusted[0], adjusted[3]);
  CHECK_NEAR(adjusted[0], 0.02, 1e-17);
  CHECK_NEAR(adjusted[1], 0.02, 1e-17);
  adjust_p_values(nullptr, 0, Correction::kBenjaminiHochberg, nullptr, nullptr);
}

TEST_CASE("drift: concurrent callers get the single-threaded answers") {
  const double ref[] = {0.1, 0.2, 0.3, 0.4};
  const uint64_t counts[] = {40, 30, 20, 10};
  const double edges[] = {-1, 0, 1};
  auto evaluate = [&] {
    const KsResult ks = ks_binned(ref, counts, 4, 500);
    const ChiSquaredResult chi = chi_squared(ref, counts, 4, 1e-4);
    return psi(ref, counts, 4, 1e-4) + js_distance(ref, counts, 4) + ks.p_value + chi.p_value +
           wasserstein_binned(edges, ref, counts, 4, -2, 2, 1) + chi2_sf(123.4, 77.5);
  };
  const double want = evaluate();
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) mismatches.fetch_add(evaluate() != want);
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK_EQ(mismatches.load(), 0);
}
