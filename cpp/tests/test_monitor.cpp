// The monitor: binning and counts against hand-computed values, both rings, merge,
// window-state bytes, flags, the executor, and concurrent observers under
// ThreadSanitizer (synchronised by joins and a start latch, never sleeps), evaluate().
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "allocation_hooks.h"
#include "conveyor/batcher.h"
#include "conveyor/monitor.h"

using namespace conveyor;
using namespace conveyor::monitor;

using conveyor::testing::this_thread_allocations;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kSecond = 1'000'000'000;

Tensor borrow(std::vector<double>& data, int64_t rows, int64_t cols) {
  Tensor t;
  t.dtype = DType::kFloat64;
  t.shape = Shape{rows, cols};
  t.data = data.data();
  return t;
}

FeatureSpec feature(const char* name, int64_t column, FeatureKind kind = FeatureKind::kNumeric) {
  FeatureSpec f;
  f.name = name;
  f.column = column;
  f.kind = kind;
  return f;
}

// x[0] numeric: edges 0, 1, 2 (4 bins), range [-1, 3], mean 1.
// x[1] categorical: categories 1, 2, 5 and the other bin.
std::shared_ptr<const Reference> two_feature_reference(bool mahalanobis = false) {
  Reference r;
  r.rows = 1000;
  FeatureReference num;
  num.edges = {0, 1, 2};
  num.probabilities = {0.25, 0.25, 0.25, 0.25};
  num.mean = 1;
  num.std = 1;
  num.min = -1;
  num.max = 3;
  FeatureReference cat;
  cat.kind = FeatureKind::kCategorical;
  cat.edges = {1, 2, 5};
  cat.probabilities = {0.3, 0.3, 0.3, 0.1};
  cat.mean = 2;
  cat.std = 1;
  cat.min = 1;
  cat.max = 5;
  r.features = {num, cat};
  if (mahalanobis) {  // x[0] alone, unit variance around 1: distance |x - 1|
    r.mahalanobis_features = {0};
    r.mahalanobis_mean = {1};
    r.precision = {1};
    r.outlier_threshold = 1.5;
  }
  return make_reference(std::move(r));
}

MonitorOptions two_feature_options(int64_t window_rows = 1000, int sub_windows = 10) {
  MonitorOptions o;
  o.features = {feature("x[0]", 0), feature("x[1]", 1, FeatureKind::kCategorical)};
  o.window_rows = window_rows;
  o.sub_windows = sub_windows;
  o.window_seconds = 1.0;
  o.reference_rows = 4;
  return o;
}

// Observes rows given as (x0, x1) pairs, one call.
std::vector<uint8_t> observe_pairs(Monitor& m, std::vector<double> pairs, int64_t now_ns = 0) {
  const int64_t rows = static_cast<int64_t>(pairs.size() / 2);
  std::vector<uint8_t> flags(static_cast<size_t>(rows), 0xff);
  m.observe({borrow(pairs, rows, 2)}, {}, rows, now_ns, flags.data());
  return flags;
}

bool same_state(const WindowState& a, const WindowState& b) {
  if (a.rows != b.rows || a.outlier_rows != b.outlier_rows || a.out_of_range_rows != b.out_of_range_rows ||
      a.nonfinite_rows != b.nonfinite_rows || a.layout != b.layout || a.bin_counts != b.bin_counts ||
      a.features.size() != b.features.size()) {
    return false;
  }
  for (size_t i = 0; i < a.features.size(); ++i) {
    const FeatureStats &x = a.features[i], &y = b.features[i];
    if (x.count != y.count || x.nan != y.nan || x.inf != y.inf || x.out_of_range != y.out_of_range ||
        std::abs(x.sum - y.sum) > 1e-9 || std::abs(x.sum_sq - y.sum_sq) > 1e-9 || x.min != y.min || x.max != y.max) {
      return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("monitor: bins, counts, sums and flags match hand-computed values") {
  Monitor m(two_feature_options());
  m.set_reference(two_feature_reference());
  // x[0]: -0.5 -> bin 0; 0 -> bin 1 (edges belong to the bin on their right); 0.5 -> 1;
  // 1 -> 2; 2 -> 3; 5 -> 3 and out of range; NaN; inf.
  // x[1]: 1, 2, 5 -> categories 0..2; 7 -> the other bin and out of range.
  const std::vector<uint8_t> flags =
      observe_pairs(m, {-0.5, 1, 0, 2, 0.5, 5, 1, 7, 2, 1, 5, 2, kNaN, 5, kInf, 1});
  const WindowState s = m.window(WindowKind::kRows, 0);
  CHECK_EQ(s.rows, 8u);
  const uint64_t* x0 = s.counts(0);
  CHECK_EQ(x0[0], 1u);
  CHECK_EQ(x0[1], 2u);
  CHECK_EQ(x0[2], 1u);
  CHECK_EQ(x0[3], 2u);
  CHECK_EQ(s.features[0].count, 6u);
  CHECK_EQ(s.features[0].nan, 1u);
  CHECK_EQ(s.features[0].inf, 1u);
  CHECK_EQ(s.features[0].out_of_range, 1u);
  CHECK_EQ(s.features[0].min, -0.5);
  CHECK_EQ(s.features[0].max, 5.0);
  // Shift 1: sum of (x - 1) = -1.5 - 1 - 0.5 + 0 + 1 + 4 = 2.
  CHECK(std::abs(s.features[0].sum - 2.0) < 1e-12);
  CHECK(std::abs(s.mean(0) - 8.0 / 6.0) < 1e-12);
  const uint64_t* x1 = s.counts(1);
  CHECK_EQ(x1[0], 3u);  // 1, 1, 1
  CHECK_EQ(x1[1], 2u);  // 2, 2
  CHECK_EQ(x1[2], 2u);  // 5, 5
  CHECK_EQ(x1[3], 1u);  // 7
  CHECK_EQ(s.features[1].out_of_range, 1u);
  const std::vector<uint8_t> expected = {0, 0, 0, kFlagOutOfRange, 0, kFlagOutOfRange, kFlagNonFinite, kFlagNonFinite};
  CHECK(flags == expected);
  CHECK_EQ(s.out_of_range_rows, 2u);
  CHECK_EQ(s.nonfinite_rows, 2u);
  CHECK_EQ(m.rows_observed(), 8u);
  CHECK_EQ(m.anomalous_rows(), 4u);
}

TEST_CASE("monitor: a feature whose reference has no edges has one bin") {
  // A constant (or all-NaN) reference column leaves a numeric feature without edges, and a
  // categorical one without categories: every finite value lands in the one bin.
  Reference r;
  r.rows = 10;
  FeatureReference num;
  num.probabilities = {1};
  num.mean = num.min = num.max = 3;
  FeatureReference cat;
  cat.kind = FeatureKind::kCategorical;
  cat.probabilities = {1};
  cat.mean = cat.min = cat.max = kNaN;
  r.features = {num, cat};
  Monitor m(two_feature_options());
  m.set_reference(make_reference(std::move(r)));
  const std::vector<uint8_t> flags = observe_pairs(m, {3, 1, 4, 2, kNaN, 3});
  const WindowState s = m.window(WindowKind::kRows, 0);
  CHECK_EQ(s.counts(0)[0], 2u);
  CHECK_EQ(s.counts(1)[0], 3u);
  CHECK_EQ(s.features[0].out_of_range, 1u);  // 4 > the reference max 3
  CHECK_EQ(s.features[1].out_of_range, 3u);  // no category is known
  const std::vector<uint8_t> expected = {kFlagOutOfRange, kFlagOutOfRange, kFlagOutOfRange | kFlagNonFinite};
  CHECK(flags == expected);
}

TEST_CASE("monitor: Mahalanobis outliers are flagged, rows with NaN skipped") {
  Monitor m(two_feature_options());
  m.set_reference(two_feature_reference(true));
  const std::vector<uint8_t> flags = observe_pairs(m, {1, 1, 2.4, 1, 2.6, 1, -0.6, 1, kNaN, 1});
  const std::vector<uint8_t> expected = {0, 0, kFlagOutlier, kFlagOutlier, kFlagNonFinite};
  CHECK(flags == expected);
  CHECK_EQ(m.window(WindowKind::kRows, 0).outlier_rows, 2u);
}

TEST_CASE("monitor: the rows ring drops the oldest sub-window when a new one starts") {
  Monitor m(two_feature_options(4, 2));  // 2 rows a sub-window, 4 rows a window
  m.set_reference(two_feature_reference());
  for (double x : {0.5, 0.5, 1.5, 1.5}) observe_pairs(m, {x, 1});
  WindowState s = m.window(WindowKind::kRows, 0);
  CHECK_EQ(s.rows, 4u);
  CHECK_EQ(s.counts(0)[1], 2u);
  CHECK_EQ(s.counts(0)[2], 2u);
  // One batch crossing the boundary: row 5 clears sub-window 0, row 6 joins it.
  observe_pairs(m, {2.5, 1, 2.5, 1});
  s = m.window(WindowKind::kRows, 0);
  CHECK_EQ(s.rows, 4u);
  CHECK_EQ(s.counts(0)[1], 0u);
  CHECK_EQ(s.counts(0)[2], 2u);
  CHECK_EQ(s.counts(0)[3], 2u);
  observe_pairs(m, {-0.5, 1});  // a third sub-window: the 1.5s go
  s = m.window(WindowKind::kRows, 0);
  CHECK_EQ(s.rows, 3u);
  CHECK_EQ(s.counts(0)[0], 1u);
  CHECK_EQ(s.counts(0)[2], 0u);
  CHECK_EQ(s.counts(0)[3], 2u);
}

TEST_CASE("monitor: the time ring keeps the sub-windows of the last window_seconds") {
  Monitor m(two_feature_options());  // 1 s in 10 sub-windows of 100 ms
  m.set_reference(two_feature_reference());
  const int64_t ms = kSecond / 1000;
  observe_pairs(m, {0.5, 1}, 10 * kSecond);             // sub-window 100
  observe_pairs(m, {1.5, 1, 1.5, 1}, 10 * kSecond + 450 * ms);  // 104
  CHECK_EQ(m.window(WindowKind::kTime, 10 * kSecond + 500 * ms).rows, 3u);
  CHECK_EQ(m.window(WindowKind::kTime, 10 * kSecond + 999 * ms).rows, 3u);
  CHECK_EQ(m.window(WindowKind::kTime, 11 * kSecond).rows, 2u);  // 101..110: 100 has left
  CHECK_EQ(m.window(WindowKind::kTime, 11 * kSecond + 450 * ms).rows, 0u);
  // Sub-window 110 reuses slot 0 (sub-window 100's): cleared first.
  observe_pairs(m, {2.5, 1}, 11 * kSecond);
  WindowState s = m.window(WindowKind::kTime, 11 * kSecond);
  CHECK_EQ(s.rows, 3u);
  CHECK_EQ(s.counts(0)[1], 0u);
  CHECK_EQ(s.start_ns, 10 * kSecond + 450 * ms);
  CHECK_EQ(s.end_ns, 11 * kSecond);
  // A long gap: every slot is stale; an earlier time afterwards counts as the latest.
  observe_pairs(m, {-0.5, 1}, 50 * kSecond);
  observe_pairs(m, {-0.5, 1}, 49 * kSecond);
  s = m.window(WindowKind::kTime, 50 * kSecond);
  CHECK_EQ(s.rows, 2u);
  CHECK_EQ(s.counts(0)[0], 2u);
  // The rows ring saw everything.
  CHECK_EQ(m.window(WindowKind::kRows, 0).rows, 6u);
}

TEST_CASE("monitor: both rings hold exactly the rows a recount assigns them") {
  // Batches of 1..7 rows at times that mostly advance (by 0..250 ms, sometimes back):
  // after each, both windows against a recount of the rows each should hold. 8 rows in 4
  // sub-windows of 2 rows; 1 s in 4 sub-windows of 250 ms.
  MonitorOptions o = two_feature_options(8, 4);
  Monitor m(o);
  m.set_reference(two_feature_reference(true));
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> batch_rows(1, 7), step_ms(-50, 250), value(-2, 6);
  struct Row {
    double x0, x1;
    int64_t index, epoch, now_ns;
  };
  std::vector<Row> seen;
  const int64_t sub_window_ns = 250 * (kSecond / 1000);
  int64_t now = 5 * kSecond, latest_epoch = std::numeric_limits<int64_t>::min();
  for (int batch = 0; batch < 200; ++batch) {
    now += step_ms(rng) * (kSecond / 1000);
    latest_epoch = std::max(now / sub_window_ns, latest_epoch);
    std::vector<double> pairs;
    for (int r = batch_rows(rng); r > 0; --r) {
      const Row row{0.5 * value(rng), static_cast<double>(value(rng)), static_cast<int64_t>(seen.size()),
                    latest_epoch, now};
      pairs.push_back(row.x0);
      pairs.push_back(row.x1);
      seen.push_back(row);
    }
    observe_pairs(m, pairs, now);
    // Rows ring: the current (partial) sub-window of 2 rows and the 3 before it.
    const int64_t total = static_cast<int64_t>(seen.size());
    const int64_t first_kept = std::max<int64_t>(0, ((total - 1) / 2 - 3) * 2);
    // Time ring, asked at a time up to 400 ms on: the sub-windows (E - 4, E].
    const int64_t ask = now + static_cast<int64_t>(rng() % 400) * (kSecond / 1000);
    const int64_t ask_epoch = std::max(ask / sub_window_ns, latest_epoch);
    for (WindowKind kind : {WindowKind::kRows, WindowKind::kTime}) {
      const WindowState got = m.window(kind, ask);
      MonitorOptions all = o;
      all.window_rows = 1 << 20;  // the recount keeps every row it is given
      Monitor recount(all);
      recount.set_reference(two_feature_reference(true));
      uint64_t rows = 0;
      for (const Row& row : seen) {
        const bool kept = kind == WindowKind::kRows ? row.index >= first_kept
                                                    : row.epoch > ask_epoch - 4 && row.epoch <= ask_epoch;
        if (!kept) continue;
        observe_pairs(recount, {row.x0, row.x1}, row.now_ns);
        ++rows;
      }
      const WindowState want = recount.window(WindowKind::kRows, 0);
      CHECK_EQ(got.rows, rows);
      if (rows > 0) {
        CHECK_EQ(got.start_ns, want.start_ns);
        CHECK_EQ(got.end_ns, want.end_ns);
      }
      if (!same_state(got, want)) {
        CHECK_EQ(batch, -1);  // names the batch
        return;
      }
    }
  }
}

TEST_CASE("monitor: merged states equal one monitor observing the union") {
  Monitor a(two_feature_options()), b(two_feature_options()), all(two_feature_options());
  const auto ref = two_feature_reference(true);
  for (Monitor* m : {&a, &b, &all}) m->set_reference(ref);
  const std::vector<double> first = {-0.5, 1, 0.25, 2, 7, 5, kNaN, 9};
  const std::vector<double> second = {2.5, 2, 1.0, 1, kInf, 5};
  observe_pairs(a, first, 5);
  observe_pairs(b, second, 7);
  observe_pairs(all, first, 5);
  observe_pairs(all, second, 7);
  WindowState merged = a.window(WindowKind::kRows, 0);
  merged.merge(b.window(WindowKind::kRows, 0));
  const WindowState expected = all.window(WindowKind::kRows, 0);
  CHECK(same_state(merged, expected));
  CHECK_EQ(merged.start_ns, 5);
  CHECK_EQ(merged.end_ns, 7);
  WindowState empty;
  empty.merge(expected);
  CHECK(same_state(empty, expected));
  // Another reference's layout cannot be merged.
  Reference other = *ref;
  other.features[0].edges = {0, 1, 2.5};
  Monitor c(two_feature_options());
  c.set_reference(make_reference(std::move(other)));
  CHECK_THROWS_CODE(merged.merge(c.window(WindowKind::kRows, 0)), ErrorCode::kInvalidInput);
}

TEST_CASE("monitor: window state bytes round-trip; damaged bytes are refused") {
  Monitor m(two_feature_options());
  m.set_reference(two_feature_reference(true));
  observe_pairs(m, {-0.5, 1, 0.25, 2, 7, 5, kNaN, 9, 2.6, 1}, 42);
  const WindowState s = m.window(WindowKind::kRows, 0);
  const std::string bytes = s.to_bytes();
  const WindowState back = WindowState::from_bytes(bytes);
  CHECK(same_state(s, back));
  CHECK_EQ(back.start_ns, 42);
  CHECK(back.bin_offset == s.bin_offset);
  CHECK(back.shift == s.shift);
  for (size_t at : {size_t{0}, size_t{5}, bytes.size() / 2, bytes.size() - 1}) {
    std::string bad = bytes;
    bad[at] = static_cast<char>(bad[at] ^ 0x40);
    CHECK_THROWS_CODE(WindowState::from_bytes(bad), ErrorCode::kInvalidInput);
  }
  CHECK_THROWS_CODE(WindowState::from_bytes(bytes.substr(0, bytes.size() - 3)), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(WindowState::from_bytes(""), ErrorCode::kInvalidInput);
  CHECK(same_state(WindowState::from_bytes(WindowState{}.to_bytes()), WindowState{}));
}

TEST_CASE("monitor: without a reference the first rows are collected, then nothing") {
  Monitor m(two_feature_options());  // reference_rows = 4
  std::vector<uint8_t> flags = observe_pairs(m, {1, 2, 3, 4, 5, 6});
  CHECK(flags == std::vector<uint8_t>(3, 0));
  observe_pairs(m, {7, 8, 9, 10});
  CHECK_EQ(m.collected_rows(), 4);
  const std::vector<double> rows = m.reference_rows();
  CHECK(rows == (std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8}));
  CHECK_EQ(m.window(WindowKind::kRows, 0).rows, 0u);
  CHECK_EQ(m.rows_observed(), 5u);
  CHECK(!m.reference_ready());
  m.set_reference(two_feature_reference());
  CHECK(m.reference_ready());
}

TEST_CASE("monitor: derived classifier features and every numeric dtype") {
  MonitorOptions o;
  FeatureSpec cls = feature("probs:class", 0, FeatureKind::kCategorical);
  cls.source = Source::kOutput;
  cls.derive = Derive::kPredictedClass;
  FeatureSpec conf = feature("probs:confidence", 0);
  conf.source = Source::kOutput;
  conf.derive = Derive::kConfidence;
  FeatureSpec logit = conf;
  logit.derive = Derive::kConfidenceFromLogits;
  o.features = {cls, conf, logit};
  o.reference_rows = 8;
  Monitor m(o);
  std::vector<float> probs = {0.1f, 0.7f, 0.2f, 0.5f, 0.2f, 0.3f, 0.f, std::nanf(""), 1.f};
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{3, 3};
  t.data = probs.data();
  m.observe({}, {t}, 3, 0, nullptr);
  const std::vector<double> rows = m.reference_rows();
  CHECK_EQ(rows.size(), 9u);
  CHECK_EQ(rows[0], 1.0);
  CHECK(std::abs(rows[1] - 0.7) < 1e-6);
  const double softmax = 1.0 / (std::exp(0.1 - 0.7) + 1.0 + std::exp(0.2 - 0.7));
  CHECK(std::abs(rows[2] - softmax) < 1e-6);
  CHECK_EQ(rows[3], 0.0);
  CHECK(std::isnan(rows[6]) && std::isnan(rows[7]) && std::isnan(rows[8]));

  // One value column read from each dtype: fp16 1.5 = 0x3e00, bf16 -2 = 0xc000.
  MonitorOptions one;
  one.features = {feature("v", 0)};
  one.reference_rows = 16;
  Monitor d(one);
  const uint16_t half = 0x3e00, bhalf = 0xc000;
  const uint8_t truth = 1;
  const int64_t big = -7;
  const uint32_t u32 = 9;
  for (auto [dtype, ptr] : {std::pair<DType, const void*>{DType::kFloat16, &half}, {DType::kBFloat16, &bhalf},
                            {DType::kBool, &truth}, {DType::kInt64, &big}, {DType::kUInt32, &u32}}) {
    Tensor x;
    x.dtype = dtype;
    x.shape = Shape{1, 1};
    x.data = const_cast<void*>(ptr);
    d.observe({x}, {}, 1, 0, nullptr);
  }
  CHECK(d.reference_rows() == (std::vector<double>{1.5, -2, 1, -7, 9}));
}

TEST_CASE("monitor: features that do not fit the batch and bad options are refused") {
  Monitor m(two_feature_options());
  std::vector<double> one_column = {1, 2};
  CHECK_THROWS_CODE(m.observe({borrow(one_column, 2, 1)}, {}, 2, 0, nullptr), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(m.observe({}, {}, 2, 0, nullptr), ErrorCode::kInvalidInput);
  CHECK_EQ(m.rows_observed(), 0u);
  MonitorOptions bad = two_feature_options();
  bad.window_rows = 1001;
  CHECK_THROWS_CODE(Monitor{bad}, ErrorCode::kInvalidInput);
  bad = two_feature_options();
  bad.features.clear();
  CHECK_THROWS_CODE(Monitor{bad}, ErrorCode::kInvalidInput);
  bad = two_feature_options();
  bad.window_seconds = 0;
  CHECK_THROWS_CODE(Monitor{bad}, ErrorCode::kInvalidInput);
  Reference unsorted = *two_feature_reference();
  unsorted.features[0].edges = {0, 2, 1};
  CHECK_THROWS_CODE(make_reference(unsorted), ErrorCode::kInvalidInput);
  Reference wrong_kind = *two_feature_reference();
  wrong_kind.features[1].kind = FeatureKind::kNumeric;
  CHECK_THROWS_CODE(m.set_reference(make_reference(wrong_kind)), ErrorCode::kInvalidInput);
  // A row's Mahalanobis difference lives in observe()'s chunk: at most kMaxFeatures of them
  // (a feature may repeat).
  Reference too_many = *two_feature_reference();
  const size_t k = Monitor::kMaxFeatures + 1;
  too_many.mahalanobis_features.assign(k, 0);
  too_many.mahalanobis_mean.assign(k, 0.0);
  too_many.precision.assign(k * k, 0.0);
  CHECK_THROWS_CODE(m.set_reference(make_reference(too_many)), ErrorCode::kInvalidInput);
  CHECK(m.reference() == nullptr);
}

TEST_CASE("monitor: the executor appends one flag per row and keeps the model's outputs") {
  auto monitor = std::make_shared<Monitor>(two_feature_options());
  monitor->set_reference(two_feature_reference());
  BatcherOptions o;
  o.model_name = "monitored";
  o.inputs = {{"x", DType::kFloat64, {2}}};
  o.outputs = {{"y", DType::kFloat64, {2}}, {"__monitor_flags", DType::kUInt8, {1}}};
  o.max_batch_size = 8;
  Executor identity = [](const Batch& batch) { return std::vector<Tensor>{batch.inputs[0]}; };
  Batcher b(o, monitor_executor(monitor, identity, true, nullptr), nullptr);
  std::vector<double> x = {0.5, 1, 9, 2, kNaN, 5};
  Completion c = b.infer({borrow(x, 3, 2)});
  CHECK_EQ(static_cast<int>(c.code), 0);
  CHECK_EQ(c.outputs->tensors.size(), 2u);
  const Tensor& flags = c.outputs->tensors[1];
  CHECK(flags.dtype == DType::kUInt8 && flags.shape == (Shape{3, 1}));
  const auto* f = static_cast<const uint8_t*>(flags.data);
  CHECK_EQ(f[0], 0);
  CHECK_EQ(f[1], kFlagOutOfRange);
  CHECK_EQ(f[2], kFlagNonFinite);
  CHECK_EQ(static_cast<const double*>(c.outputs->tensors[0].data)[2], 9.0);
  CHECK_EQ(monitor->rows_observed(), 3u);
  // A batch the monitor cannot read still succeeds; the monitor counts it.
  auto narrow = std::make_shared<Monitor>(two_feature_options());
  BatcherOptions o1 = o;
  o1.inputs = {{"x", DType::kFloat64, {1}}};
  o1.outputs = {{"y", DType::kFloat64, {1}}, {"__monitor_flags", DType::kUInt8, {1}}};
  Batcher b1(o1, monitor_executor(narrow, identity, true, nullptr), nullptr);
  std::vector<double> x1 = {1};
  Completion c1 = b1.infer({borrow(x1, 1, 1)});
  CHECK_EQ(static_cast<int>(c1.code), 0);
  CHECK_EQ(narrow->failed_batches(), 1u);
}

TEST_CASE("monitor: concurrent observers and readers keep exact counts") {
  constexpr int kThreads = 4;
  constexpr int kBatches = 200;
  constexpr int64_t kRows = 16;
  auto monitor = std::make_shared<Monitor>(two_feature_options(kThreads * kBatches * kRows, 4));
  monitor->set_reference(two_feature_reference(true));
  std::atomic<int> ready{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<double> pairs;
      for (int64_t r = 0; r < kRows; ++r) {
        pairs.push_back(static_cast<double>(r % 4) - 0.5 + t * 0.01);  // bins 0..3, in range
        pairs.push_back(r % 2 ? 1.0 : 2.0);
      }
      std::vector<uint8_t> flags(kRows);
      ready.fetch_add(1);
      while (ready.load() < kThreads + 1) std::this_thread::yield();
      for (int i = 0; i < kBatches; ++i) {
        monitor->observe({borrow(pairs, kRows, 2)}, {}, kRows, i * kSecond / 100, flags.data());
      }
    });
  }
  std::thread reader([&] {
    ready.fetch_add(1);
    uint64_t last = 0;
    while (!done.load()) {
      const WindowState s = monitor->window(WindowKind::kRows, 0);
      CHECK(s.rows >= last);  // rows only accumulate: the window holds them all
      CHECK_EQ(s.features[0].count, s.rows);
      last = s.rows;
      const DriftReport report = evaluate(*monitor->reference(), s);
      CHECK_EQ(report.rows, s.rows);
      WindowState::from_bytes(monitor->window(WindowKind::kTime, kSecond).to_bytes());
    }
  });
  for (auto& t : threads) t.join();
  done.store(true);
  reader.join();
  const WindowState s = monitor->window(WindowKind::kRows, 0);
  const uint64_t total = kThreads * kBatches * kRows;
  CHECK_EQ(s.rows, total);
  CHECK_EQ(monitor->rows_observed(), total);
  for (int b = 0; b < 4; ++b) CHECK_EQ(s.counts(0)[b], total / 4);
  CHECK_EQ(s.counts(1)[0], total / 2);
  CHECK_EQ(s.counts(1)[1], total / 2);
}

TEST_CASE("monitor: evaluate gives NaN where a statistic does not apply and follows the verdict rules") {
  Monitor m(two_feature_options());
  const auto ref = two_feature_reference();
  m.set_reference(ref);
  DriftReport empty = evaluate(*ref, m.window(WindowKind::kRows, 0));
  CHECK(std::isnan(empty.psi[0]) && std::isnan(empty.p_value[1]) && std::isnan(empty.outlier_rate));
  CHECK(!empty.alert && empty.status[0] == Status::kOk);
  // x[0] matches its reference (25 rows a bin); x[1] never shows category 5 and adds 7s.
  std::vector<double> pairs;
  for (int i = 0; i < 100; ++i) {
    pairs.push_back(-0.5 + (i % 4));
    pairs.push_back(i % 3 == 0 ? 1.0 : i % 3 == 1 ? 2.0 : 7.0);
  }
  observe_pairs(m, pairs);
  const DriftReport r = evaluate(*ref, m.window(WindowKind::kRows, 0));
  CHECK(r.psi[0] < 1e-9 && r.ks[0] < 1e-12 && r.p_value[0] > 0.99);
  CHECK(std::isnan(r.chi2[0]) && !std::isnan(r.wasserstein[0]));
  CHECK(std::isnan(r.ks[1]) && std::isnan(r.wasserstein[1]) && r.chi2[1] > 50);
  CHECK(r.status[0] == Status::kOk && r.status[1] == Status::kAlert && r.alert);
  CHECK(std::abs(r.out_of_range_ratio[1] - 33.0 / 100) < 1e-12);
  CHECK_EQ(r.missing_ratio[0], 0.0);
  CHECK(std::abs(r.mean[0] - 1.0) < 1e-12);
  DriftOptions bad;
  bad.alpha = 0;
  CHECK_THROWS_CODE(evaluate(*ref, m.window(WindowKind::kRows, 0), bad), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(evaluate(*ref, WindowState{}), ErrorCode::kInvalidInput);
}

TEST_CASE("monitor: observe allocates nothing, collecting or binning") {
  MonitorOptions o = two_feature_options(8, 2);  // rotations every 4 rows
  o.reference_rows = 1000;
  Monitor m(o);
  std::vector<double> pairs;
  for (int i = 0; i < 64; ++i) {
    pairs.push_back(i % 7 - 2.0);
    pairs.push_back(i % 3 == 0 ? 1.0 : 9.0);
  }
  std::vector<uint8_t> flags(32);
  const std::vector<Tensor> inputs = {borrow(pairs, 32, 2)};
  const std::vector<Tensor> none;
  uint64_t before = this_thread_allocations();
  for (int i = 0; i < 20; ++i) m.observe(inputs, none, 32, i * kSecond / 4, flags.data());
  CHECK_EQ(this_thread_allocations() - before, 0u);
  m.set_reference(two_feature_reference(true));
  before = this_thread_allocations();
  for (int i = 0; i < 20; ++i) m.observe(inputs, none, 32, i * kSecond / 4, flags.data());
  CHECK_EQ(this_thread_allocations() - before, 0u);
  CHECK_EQ(m.window(WindowKind::kRows, 0).rows, 8u);
}
