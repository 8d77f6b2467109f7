// The monitor's scoring kernels (kernels/monitor_scoring.h) against their references
// (kernels/reference/), on both ISA paths, and the monitor giving the same answers on both.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../src/kernels/monitor_scoring.h"
#include "../src/kernels/reference/reference.h"
#include "check.h"
#include "isa.h"
#include "conveyor/cpu_features.h"
#include "conveyor/error.h"
#include "conveyor/monitor.h"

using namespace conveyor;
using conveyor::test::for_each_isa;
using conveyor::test::isas;
using namespace conveyor::kernels;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Ascending distinct edges: a random walk with steps of 1..4 (integers: values can hit them exactly).
std::vector<double> ascending(std::mt19937& rng, int64_t n) {
  std::uniform_int_distribution<int> step(1, 4);
  std::vector<double> edges;
  double at = -2.0 * static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) edges.push_back(at += step(rng));
  return edges;
}

// Values around the edges: on them, a step off them, between them, beyond both ends, NaN, +-inf.
double some_value(std::mt19937& rng, const std::vector<double>& edges) {
  std::uniform_int_distribution<int> pick(0, 9);
  const double lo = edges.empty() ? -1 : edges.front() - 3, hi = edges.empty() ? 1 : edges.back() + 3;
  const double between = std::uniform_real_distribution<double>(lo, hi)(rng);
  const double edge = edges.empty() ? 0 : edges[std::uniform_int_distribution<size_t>(0, edges.size() - 1)(rng)];
  switch (pick(rng)) {
    case 0: return kNaN;
    case 1: return pick(rng) < 5 ? kInf : -kInf;
    case 2:
    case 3: return edge;
    case 4: return std::nextafter(edge, -kInf);
    case 5: return std::nextafter(edge, kInf);
    default: return between;
  }
}

// A random symmetric positive definite k x k matrix: A A^T + k I.
std::vector<double> spd_matrix(std::mt19937& rng, int64_t k) {
  std::normal_distribution<double> normal;
  std::vector<double> a(static_cast<size_t>(k * k)), p(static_cast<size_t>(k * k));
  for (double& x : a) x = normal(rng);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      double s = i == j ? static_cast<double>(k) : 0.0;
      for (int64_t m = 0; m < k; ++m) s += a[i * k + m] * a[j * k + m];
      p[i * k + j] = s;
    }
  }
  return p;
}

// sum |d_i P_ij d_j|: the scale the rounding of d^T P d is relative to.
double form_scale(const std::vector<double>& d, const std::vector<double>& p, int64_t k) {
  double s = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) s += std::fabs(d[i] * p[i * k + j] * d[j]);
  }
  return s;
}

// The packed form of p evaluated on both ISAs against the full form, for random rows.
void check_form(std::mt19937& rng, const std::vector<double>& p, int64_t k, bool expect_squares) {
  const PackedQuadraticForm form = pack_quadratic_form(p.data(), k);
  CHECK_EQ(form.squares, expect_squares);
  CHECK_EQ(form.padded_k % kFormBlock, 0);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<double> d(static_cast<size_t>(form.padded_k), 0.0);
    for (int64_t j = 0; j < k; ++j) d[j] = normal(rng);
    const double want = reference::quadratic_form(d.data(), p.data(), k);
    const double tolerance = 1e-12 * form_scale(d, p, k) * static_cast<double>(k);
    for_each_isa([&](CpuIsa isa) {
      const double got = form.evaluate(d.data());
      if (!(std::fabs(got - want) <= tolerance)) {
        testing::record_failure(__FILE__, __LINE__,
                                std::string(cpu_isa_name(isa)) + ": k=" + std::to_string(k) + " form " +
                                    std::to_string(got) + " != " + std::to_string(want));
      }
      if (form.squares) CHECK(got >= 0);
    });
  }
}

}  // namespace

TEST_CASE("monitor scoring: bin_chunk matches std::upper_bound and the category lookup on both ISAs") {
  std::mt19937 rng(41);
  const int64_t kEdgeCounts[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 19, 31, 32, 33, 34, 63, 64, 65, 100, 1000, 4099};
  const int64_t kRows[] = {1, 3, 17};
  for (int64_t rows : kRows) {
    // One feature of each edge count and kind, side by side in one chunk.
    std::vector<std::vector<double>> edges;
    std::vector<double> padded;
    std::vector<BinTable> tables;
    for (int64_t count : kEdgeCounts) {
      for (bool categorical : {false, true}) {
        edges.push_back(ascending(rng, count));
        BinTable t;
        t.edge_count = count;
        t.categorical = categorical;
        t.min = edges.back().empty() ? 0 : edges.back().front() - 1;
        t.max = edges.back().empty() ? 0 : edges.back().back() + 1;
        tables.push_back(t);
      }
    }
    for (const auto& e : edges) append_padded_edges(e, padded);
    const double* at = padded.data();
    for (BinTable& t : tables) {
      t.edges = at;
      at += padded_edge_count(t.edge_count);
    }
    const auto features = static_cast<int64_t>(tables.size());
    std::vector<double> values(static_cast<size_t>(features * rows));
    for (int64_t f = 0; f < features; ++f) {
      for (int64_t r = 0; r < rows; ++r) values[f * rows + r] = some_value(rng, edges[f]);
    }
    const size_t n = values.size();
    std::vector<uint16_t> want_bins(n, 0xffff);
    std::vector<uint8_t> want_states(n), want_flags(static_cast<size_t>(rows), 0);
    reference::bin_chunk(values.data(), rows, tables.data(), features, want_bins.data(), want_states.data(),
                         want_flags.data());
    for_each_isa([&](CpuIsa isa) {
      std::vector<uint16_t> bins(n, 0xffff);
      std::vector<uint8_t> states(n, 0xff), flags(static_cast<size_t>(rows), 0);
      monitor_kernels().bin_chunk(values.data(), rows, tables.data(), features, bins.data(), states.data(),
                                  flags.data());
      CHECK(states == want_states);
      CHECK(flags == want_flags);
      for (size_t i = 0; i < n; ++i) {
        if (want_states[i] < kValueNaN && bins[i] != want_bins[i]) {
          testing::record_failure(__FILE__, __LINE__,
                                  std::string(cpu_isa_name(isa)) + ": value " + std::to_string(values[i]) +
                                      " in bin " + std::to_string(bins[i]) + ", not " +
                                      std::to_string(want_bins[i]));
        }
      }
    });
  }
}

TEST_CASE("monitor scoring: the packed quadratic form matches d^T P d on both ISAs") {
  std::mt19937 rng(42);
  for (int64_t k : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 50, 63}) {
    check_form(rng, spd_matrix(rng, k), k, true);  // the Cholesky form
    // Not symmetric: the form sees only the symmetric part, whose factor is the same.
    std::vector<double> p = spd_matrix(rng, k);
    for (int64_t i = 0; i + 1 < k; ++i) {
      p[i * k + i + 1] += 0.25;
      p[(i + 1) * k + i] -= 0.25;
    }
    check_form(rng, p, k, true);
    // Indefinite: no factor, the folded triangle.
    std::vector<double> q = spd_matrix(rng, k);
    q[(k - 1) * k + (k - 1)] = -1e3 * static_cast<double>(k);
    check_form(rng, q, k, false);
  }
  check_form(rng, std::vector<double>(9, 0.0), 3, false);  // zero: no positive pivot
}

TEST_CASE("monitor scoring: the monitor gives the same flags and windows on both ISAs") {
  // 12 numeric features of 20 bins, one categorical, Mahalanobis over the numeric ones with
  // a threshold some rows exceed; rows of random values with NaN and out-of-range ones.
  std::mt19937 rng(43);
  std::normal_distribution<double> normal;
  const int64_t numeric = 12, features = numeric + 1, rows = 300;
  monitor::Reference r;
  r.rows = 1000;
  for (int64_t f = 0; f < numeric; ++f) {
    monitor::FeatureReference fr;
    for (int b = 1; b < 20; ++b) fr.edges.push_back(-2.0 + 0.2 * b + 0.01 * static_cast<double>(f));
    fr.probabilities.assign(20, 0.05);
    fr.min = -2.5;
    fr.max = 2.5;
    r.features.push_back(fr);
    r.mahalanobis_features.push_back(static_cast<int>(f));
    r.mahalanobis_mean.push_back(0.1 * static_cast<double>(f));
  }
  monitor::FeatureReference cat;
  cat.kind = monitor::FeatureKind::kCategorical;
  cat.edges = {0, 1, 2};
  cat.probabilities = {0.25, 0.25, 0.25, 0.25};
  r.features.push_back(cat);
  r.precision = spd_matrix(rng, numeric);
  for (double& x : r.precision) x /= static_cast<double>(numeric);
  r.outlier_threshold = 9.0;
  const auto reference = monitor::make_reference(r);

  std::vector<double> values(static_cast<size_t>(rows * features));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t f = 0; f < numeric; ++f) values[i * features + f] = 1.5 * normal(rng);
    values[i * features + numeric] = static_cast<double>(i % 5);
    if (i % 37 == 0) values[i * features + i % numeric] = kNaN;
  }
  Tensor t;
  t.dtype = DType::kFloat64;
  t.shape = Shape{rows, features};
  t.data = values.data();
  monitor::MonitorOptions o;
  for (int64_t f = 0; f < features; ++f) {
    monitor::FeatureSpec s;
    s.name = "x";
    s.column = f;
    s.kind = f < numeric ? monitor::FeatureKind::kNumeric : monitor::FeatureKind::kCategorical;
    o.features.push_back(s);
  }
  std::vector<std::vector<uint8_t>> flags;
  std::vector<monitor::WindowState> windows;
  for_each_isa([&](CpuIsa) {
    monitor::Monitor m(o);
    m.set_reference(reference);
    flags.emplace_back(static_cast<size_t>(rows));
    m.observe({t}, {}, rows, 0, flags.back().data());
    windows.push_back(m.window(monitor::WindowKind::kRows, 0));
  });
  // The outliers by the full form d^T P d.
  int outliers = 0;
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> d(static_cast<size_t>(numeric));
    bool finite = true;
    for (int64_t f = 0; f < numeric; ++f) {
      d[f] = values[i * features + f] - r.mahalanobis_mean[f];
      finite = finite && std::isfinite(d[f]);
    }
    const bool outlier = finite && reference::quadratic_form(d.data(), r.precision.data(), numeric) > 81.0;
    outliers += outlier;
    CHECK_EQ((flags[0][i] & monitor::kFlagOutlier) != 0, outlier);
  }
  CHECK(outliers > 0 && outliers < rows / 2);
  for (size_t i = 1; i < flags.size(); ++i) {
    CHECK(flags[i] == flags[0]);
    CHECK(windows[i].bin_counts == windows[0].bin_counts);
    CHECK_EQ(windows[i].outlier_rows, windows[0].outlier_rows);
  }
}
