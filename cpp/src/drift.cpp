#include "conveyor/drift.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace conveyor::drift {

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // ln(sqrt(2 pi))
constexpr double kSqrt2Pi = 2.50662827463100050242;
constexpr double kRoundoff = std::numeric_limits<double>::epsilon();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// Below this the Kolmogorov survival function is 1 - (theta-function CDF); above it the
// alternating series. Both converge in a handful of terms on their side of it.
constexpr double kKolmogorovCutover = 0.82;
// Iteration cap of the incomplete-gamma series and continued fraction: both need
// O(sqrt(a)) terms near x = a, so this covers a (dof / 2) far beyond 1e9.
constexpr int kMaxGammaTerms = 1'000'000;

uint64_t total_count(const uint64_t* counts, size_t bins) {
  uint64_t n = 0;
  for (size_t i = 0; i < bins; ++i) n += counts[i];
  return n;
}

// ln Gamma(a) - [(a - 1/2) ln a - a + ln sqrt(2 pi)] for a >= 10 (Stirling series; the
// first omitted term is below 1e-16 there).
double stirling_correction(double a) {
  const double r = 1.0 / a;
  const double r2 = r * r;
  return r * (1.0 / 12 + r2 * (-1.0 / 360 + r2 * (1.0 / 1260 + r2 * (-1.0 / 1680 +
         r2 * (1.0 / 1188 + r2 * (-691.0 / 360360 + r2 * (1.0 / 156)))))));
}

// ln Gamma(a) for a > 0: Stirling after shifting a up to >= 10 (no global state, unlike
// lgamma's signgam, so any thread may call it).
double log_gamma(double a) {
  double product = 1;
  while (a < 10) {
    product *= a;
    a += 1;
  }
  return (a - 0.5) * std::log(a) - a + kLogSqrt2Pi + stirling_correction(a) - std::log(product);
}

// ln(1 + d) - d without the cancellation of the direct form near d = 0: with
// y = d / (2 + d), ln(1 + d) = 2 atanh(y) = 2 (y + y^3/3 + ...), and 2y - d = -d^2 / (2 + d).
double log1p_minus(double d) {
  if (std::fabs(d) >= 0.5) return std::log1p(d) - d;
  const double y = d / (2 + d);
  const double y2 = y * y;
  double power = y * y2, tail = 0;
  for (int k = 3; k < 200; k += 2) {
    const double term = power / k;
    tail += term;
    if (std::fabs(term) <= 0.5 * kRoundoff * std::fabs(tail)) break;
    power *= y2;
  }
  return -d * d / (2 + d) + 2 * tail;
}

// x^a e^-x / Gamma(a), the factor shared by the incomplete gamma series and fraction.
// For large a the exponent is written as a * (ln(x/a) - x/a + 1), which stays exact where
// a ln x, x and ln Gamma(a) are each large and nearly cancel.
double gamma_prefactor(double a, double x) {
  if (a < 10) {
    // e^-x on its own keeps the rounding of the large exponent out of the result (while
    // e^-x itself is a normal double).
    const double log_rest = a * std::log(x) - log_gamma(a);
    return x < 708 ? std::exp(-x) * std::exp(log_rest) : std::exp(log_rest - x);
  }
  return std::sqrt(a / (2 * kPi)) * std::exp(a * log1p_minus((x - a) / a) - stirling_correction(a));
}

// Regularized upper incomplete gamma Q(a, x) for a > 0, x > 0.
double upper_gamma_q(double a, double x) {
  if (x < a + 1) {
    // P(a, x) = x^a e^-x / Gamma(a + 1) * sum_n x^n / ((a + 1) ... (a + n)); here Q >= ~0.08,
    // so 1 - P loses nothing that matters.
    double term = 1, sum = 1;
    for (int n = 1; n < kMaxGammaTerms; ++n) {
      term *= x / (a + n);
      sum += term;
      if (term <= 0.5 * kRoundoff * sum) break;
    }
    const double p = gamma_prefactor(a, x) * sum / a;
    return std::max(0.0, 1 - p);
  }
  // Q(a, x) = x^a e^-x / Gamma(a) * 1 / (x + 1 - a - 1 (1 - a) / (x + 3 - a - 2 (2 - a) / ...)),
  // evaluated with the modified Lentz method.
  constexpr double kTiny = 1e-300;
  double b = x + 1 - a;
  double c = 1 / kTiny;
  double d = 1 / b;
  double h = d;
  for (int i = 1; i < kMaxGammaTerms; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = b + an / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1) <= kRoundoff) break;
  }
  return gamma_prefactor(a, x) * h;
}

}  // namespace

double psi(const double* ref_p, const uint64_t* counts, size_t bins, double eps) {
  const uint64_t n = total_count(counts, bins);
  if (n == 0) return 0;
  const double inv_n = 1.0 / static_cast<double>(n);
  const double norm = 1.0 / (1 + static_cast<double>(bins) * eps);
  double sum = 0;
  for (size_t i = 0; i < bins; ++i) {
    const double p = (ref_p[i] + eps) * norm;
    const double q = (static_cast<double>(counts[i]) * inv_n + eps) * norm;
    if (q != p) sum += (q - p) * std::log(q / p);  // also skips 0 * ln(0 / 0) when eps = 0
  }
  return sum;
}

double js_distance(const double* ref_p, const uint64_t* counts, size_t bins) {
  const uint64_t n = total_count(counts, bins);
  if (n == 0) return 0;
  const double inv_n = 1.0 / static_cast<double>(n);
  double sum = 0;  // sum of p ln(p / m) + q ln(q / m), natural logarithms
  for (size_t i = 0; i < bins; ++i) {
    const double p = ref_p[i];
    const double q = static_cast<double>(counts[i]) * inv_n;
    if (p == q) continue;  // both terms are 0
    const double inv_m = 2 / (p + q);  // 1 / m, m = (p + q) / 2: one division for both terms
    if (p > 0) sum += p * std::log(p * inv_m);
    if (q > 0) sum += q * std::log(q * inv_m);
  }
  const double divergence = std::clamp(0.5 * sum / kLn2, 0.0, 1.0);
  return std::sqrt(divergence);
}

KsResult ks_binned(const double* ref_p, const uint64_t* counts, size_t bins, uint64_t ref_rows) {
  KsResult result;
  const uint64_t n = total_count(counts, bins);
  if (n == 0) return result;
  const double inv_n = 1.0 / static_cast<double>(n);
  double ref_cdf = 0;        // reference mass of the bins before bin i
  uint64_t window_rows = 0;  // window rows in the bins before bin i
  double statistic = 0, upper = 0;
  for (size_t i = 0; i < bins; ++i) {
    // diff: F_ref - F_window at bin i's left edge (0 below the first bin).
    const double diff = ref_cdf - static_cast<double>(window_rows) * inv_n;
    statistic = std::max(statistic, std::fabs(diff));
    const double p = ref_p[i];
    const double q = static_cast<double>(counts[i]) * inv_n;
    // Inside bin i the difference stays within [diff - q, diff + p]: the sharpest bound
    // the bins allow (each end is reached when one sample's mass all precedes the other's).
    upper = std::max(upper, std::max(diff + p, q - diff));
    ref_cdf += p;
    window_rows += counts[i];
  }
  result.statistic = statistic;
  result.error_bound = std::max(0.0, upper - statistic);
  const double n_window = static_cast<double>(n);
  const double n_eff =
      ref_rows == 0 ? n_window : n_window * static_cast<double>(ref_rows) / (n_window + static_cast<double>(ref_rows));
  const double root = std::sqrt(n_eff);
  result.p_value = kolmogorov_sf((root + 0.12 + 0.11 / root) * statistic);
  return result;
}

double wasserstein_binned(const double* edges, const double* ref_p, const uint64_t* counts, size_t bins, double lo,
                          double hi, double scale) {
  const uint64_t n = total_count(counts, bins);
  if (n == 0 || bins < 2) return 0;
  const double first = edges[0], last = edges[bins - 2];
  if (!(std::isfinite(lo) && lo <= first)) lo = first;
  if (!(std::isfinite(hi) && hi >= last)) hi = last;
  if (!(scale > 0) || !std::isfinite(scale)) scale = 1;
  const double inv_n = 1.0 / static_cast<double>(n);
  // Point masses at the bin midpoints x_i; W1 = sum_i |F_ref(i) - F_window(i)| (x_{i+1} - x_i),
  // and x_{i+1} - x_i = (right edge of bin i+1 - left edge of bin i) / 2.
  double ref_cdf = 0, distance = 0;
  uint64_t window_rows = 0;
  for (size_t i = 0; i + 1 < bins; ++i) {
    ref_cdf += ref_p[i];
    window_rows += counts[i];
    const double left = i == 0 ? lo : edges[i - 1];
    const double right = i + 2 == bins ? hi : edges[i + 1];
    distance += std::fabs(ref_cdf - static_cast<double>(window_rows) * inv_n) * 0.5 * (right - left);
  }
  return distance / scale;
}

ChiSquaredResult chi_squared(const double* ref_p, const uint64_t* counts, size_t bins, double eps) {
  ChiSquaredResult result;
  result.dof = bins > 0 ? static_cast<double>(bins - 1) : 0;
  const uint64_t n = total_count(counts, bins);
  if (n == 0) return result;
  const double scale = static_cast<double>(n) / (1 + static_cast<double>(bins) * eps);
  double statistic = 0;
  for (size_t i = 0; i < bins; ++i) {
    const double expected = (ref_p[i] + eps) * scale;
    const double diff = static_cast<double>(counts[i]) - expected;
    if (diff != 0) statistic += diff * diff / expected;  // expected 0 with rows: +inf
  }
  result.statistic = statistic;
  // One bin: the window cannot differ from the reference, the test has nothing to reject.
  result.p_value = result.dof > 0 ? chi2_sf(statistic, result.dof) : 1;
  return result;
}

double kolmogorov_sf(double x) {
  if (std::isnan(x)) return kNaN;
  if (x <= 0) return 1;
  if (x < kKolmogorovCutover) {
    // P(K <= x) = sqrt(2 pi) / x * sum_{k >= 1} exp(-(2k - 1)^2 pi^2 / (8 x^2)); consecutive
    // terms differ by the factor exp(-8 k t), t = pi^2 / (8 x^2).
    const double t = kPi * kPi / (8 * x * x);
    double term = std::exp(-t);
    if (term == 0) return 1;
    const double v = std::exp(-8 * t);
    double factor = v, sum = 0;
    for (int k = 1; k < 50 && term > 0.5 * kRoundoff * sum; ++k) {
      sum += term;
      term *= factor;
      factor *= v;
    }
    return 1 - kSqrt2Pi / x * sum;
  }
  // P(K > x) = 2 sum_{k >= 1} (-1)^(k-1) exp(-2 k^2 x^2); consecutive terms differ by the
  // factor u^(2k + 1), u = exp(-2 x^2).
  const double u = std::exp(-2 * x * x);
  const double u2 = u * u;
  double term = u, factor = u * u2, sum = 0, sign = 1;
  for (int k = 1; k < 50 && term > 0.5 * kRoundoff * sum; ++k) {
    sum += sign * term;
    sign = -sign;
    term *= factor;
    factor *= u2;
  }
  return std::clamp(2 * sum, 0.0, 1.0);
}

double chi2_sf(double x, double dof) {
  if (std::isnan(x) || !(dof > 0)) return kNaN;
  if (x <= 0) return 1;
  if (std::isinf(x)) return 0;
  if (std::isinf(dof)) return 1;
  return upper_gamma_q(0.5 * dof, 0.5 * x);
}

void adjust_p_values(const double* p, size_t n, Correction correction, double* adjusted, size_t* scratch) {
  size_t tests = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isnan(p[i])) scratch[tests++] = i;
  }
  const double m = static_cast<double>(tests);
  switch (correction) {
    case Correction::kNone:
      for (size_t i = 0; i < n; ++i) adjusted[i] = p[i];  // a loop: adjusted may be p
      return;
    case Correction::kBonferroni:
      for (size_t i = 0; i < n; ++i) adjusted[i] = std::isnan(p[i]) ? p[i] : std::clamp(p[i] * m, 0.0, 1.0);
      return;
    case Correction::kBenjaminiHochberg:
      break;
  }
  // Step-up: q_(k) = min over j >= k of p_(j) * m / j, with p_(1) <= ... <= p_(m). The order
  // of tied p-values does not change the result. Written as p * (m / k), in that order,
  // to give the same bits as scipy.stats.false_discovery_control.
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(p[i])) adjusted[i] = p[i];
  }
  std::sort(scratch, scratch + tests, [p](size_t a, size_t b) { return p[a] < p[b]; });
  for (size_t k = 0; k < tests; ++k) {
    const size_t i = scratch[k];
    adjusted[i] = p[i] * (m / static_cast<double>(k + 1));
  }
  double running_min = std::numeric_limits<double>::infinity();
  for (size_t k = tests; k-- > 0;) {
    const size_t i = scratch[k];
    running_min = std::min(running_min, adjusted[i]);
    adjusted[i] = std::clamp(running_min, 0.0, 1.0);
  }
}

}  // namespace conveyor::drift
