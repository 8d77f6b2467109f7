// evaluate(): the drift statistics of a window against its reference, and the verdict.
#include <cmath>
#include <limits>
#include <string>

#include "conveyor/drift.h"
#include "conveyor/error.h"
#include "conveyor/monitor.h"

namespace conveyor::monitor {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw Error(ErrorCode::kInvalidInput, "[monitor] " + what); }

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void check_options(const DriftOptions& o) {
  if (!(o.psi_warn >= 0) || !(o.psi_alert >= o.psi_warn)) {
    invalid("psi_warn and psi_alert need 0 <= psi_warn <= psi_alert, got " + std::to_string(o.psi_warn) + " and " +
            std::to_string(o.psi_alert));
  }
  if (!(o.alpha > 0 && o.alpha < 1)) invalid("alpha must lie in (0, 1), got " + std::to_string(o.alpha));
  if (!(o.eps > 0 && o.eps < 1)) invalid("eps must lie in (0, 1), got " + std::to_string(o.eps));
}

}  // namespace

DriftReport evaluate(const Reference& reference, const WindowState& state, const DriftOptions& options) {
  check_options(options);
  const size_t n = reference.features.size();
  if (state.layout != reference.layout || state.feature_count() != n) {
    invalid("the window state was not made over this reference (layouts " + std::to_string(state.layout) + " and " +
            std::to_string(reference.layout) + "): evaluate a state against the reference its monitor used");
  }
  DriftReport report;
  for (auto* v : {&report.psi, &report.js, &report.ks, &report.ks_error_bound, &report.wasserstein, &report.chi2,
                  &report.p_value, &report.adjusted_p_value, &report.missing_ratio, &report.out_of_range_ratio,
                  &report.mean, &report.std, &report.min, &report.max}) {
    v->assign(n, kNaN);
  }
  report.count.assign(n, 0);
  report.status.assign(n, Status::kOk);
  std::vector<size_t> scratch(n);
  report.rows = state.rows;
  report.outlier_rows = state.outlier_rows;
  report.out_of_range_rows = state.out_of_range_rows;
  report.nonfinite_rows = state.nonfinite_rows;
  const double rows = static_cast<double>(state.rows);
  report.outlier_rate = state.rows ? static_cast<double>(state.outlier_rows) / rows : kNaN;

  for (size_t i = 0; i < n; ++i) {
    const FeatureReference& ref = reference.features[i];
    const FeatureStats& f = state.features[i];
    report.count[i] = f.count;
    if (state.rows) {
      report.missing_ratio[i] = static_cast<double>(f.nan + f.inf) / rows;
      report.out_of_range_ratio[i] = static_cast<double>(f.out_of_range) / rows;
    }
    if (f.count == 0) continue;  // nothing to compare: statistics stay NaN, status ok
    report.mean[i] = state.mean(i);
    report.std[i] = state.std(i);
    report.min[i] = f.min;
    report.max[i] = f.max;
    const double* p = ref.probabilities.data();
    const uint64_t* counts = state.counts(i);
    const size_t bins = reference.bins(i);
    report.psi[i] = drift::psi(p, counts, bins, options.eps);
    report.js[i] = drift::js_distance(p, counts, bins);
    if (ref.kind == FeatureKind::kNumeric) {
      const drift::KsResult ks = drift::ks_binned(p, counts, bins, reference.rows);
      report.ks[i] = ks.statistic;
      report.ks_error_bound[i] = ks.error_bound;
      report.p_value[i] = ks.p_value;
      report.wasserstein[i] = drift::wasserstein_binned(ref.edges.data(), p, counts, bins, std::fmin(ref.min, f.min),
                                                        std::fmax(ref.max, f.max), ref.std);
    } else {
      const drift::ChiSquaredResult chi = drift::chi_squared(p, counts, bins, options.eps);
      report.chi2[i] = chi.statistic;
      report.p_value[i] = chi.p_value;
    }
  }

  drift::adjust_p_values(report.p_value.data(), n, options.correction, report.adjusted_p_value.data(),
                         scratch.data());
  for (size_t i = 0; i < n; ++i) {
    const double psi = report.psi[i];
    if (report.adjusted_p_value[i] < options.alpha || psi >= options.psi_alert) {
      report.status[i] = Status::kAlert;
      report.alert = true;
    } else if (psi >= options.psi_warn) {
      report.status[i] = Status::kWarn;
    }
  }
  return report;
}

}  // namespace conveyor::monitor
