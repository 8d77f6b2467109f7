// Live monitoring inside the batch: per-feature statistics of every row a model serves,
// kept in two rings of sub-windows, and the drift evaluation of a window against a
// reference.
//
// A Monitor reads the configured features of each row (flattened input or output columns,
// or values derived from a classifier output), bins them on the reference's bins, keeps
// counts, shifted sums, min/max, NaN/inf and out-of-range counts per sub-window, scores
// each row's Mahalanobis distance, and writes one flag byte per row. It sits in the batch
// as an executor wrapper (monitor_executor), so it runs on the instance threads without
// Python. Without a reference it only copies the first rows' feature values into a
// preallocated buffer (the live reference) until enough are collected.
//
// Thread safety: observe() may be called from several threads at once; window(),
// set_reference() and the counters from any thread. One mutex guards the rings: observe()
// holds it only to add a chunk's already-binned values, window() only to sum the slots.
// Allocation: construction and set_reference() preallocate everything; observe() never
// allocates.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/drift.h"
#include "conveyor/memory_pool.h"
#include "conveyor/tensor.h"

namespace conveyor::monitor {

enum class Source : uint8_t { kInput, kOutput };
// kValue: the flat column of the row; the others reduce the whole row of a classifier
// output: kPredictedClass = argmax (first maximum), kConfidence = max,
// kConfidenceFromLogits = max softmax. A row holding NaN/inf derives NaN.
enum class Derive : uint8_t { kValue, kPredictedClass, kConfidence, kConfidenceFromLogits };
enum class FeatureKind : uint8_t { kNumeric, kCategorical };
enum class WindowKind : uint8_t { kRows, kTime };
enum class Status : uint8_t { kOk, kWarn, kAlert };

// Names as written in configs and by the bindings; each throws Error(kInvalidInput)
// naming the accepted values.
Source source_from_name(std::string_view name);
Derive derive_from_name(std::string_view name);  // value | predicted_class | confidence | confidence_from_logits
FeatureKind feature_kind_from_name(std::string_view name);  // numeric | categorical
WindowKind window_kind_from_name(std::string_view name);    // rows | time
drift::Correction correction_from_name(std::string_view name);  // benjamini-hochberg | bonferroni | none
const char* source_name(Source source) noexcept;
const char* derive_name(Derive derive) noexcept;
const char* feature_kind_name(FeatureKind kind) noexcept;
const char* status_name(Status status) noexcept;

struct FeatureSpec {
  std::string name;  // "x[3]", "probs:class", ... (feature naming of the monitor spec)
  Source source = Source::kInput;
  int tensor = 0;       // index of the input (or output) in the model's order
  int64_t column = 0;   // flat element within the row (kValue only), C order
  Derive derive = Derive::kValue;
  FeatureKind kind = FeatureKind::kNumeric;
};

// One feature's reference distribution. Numeric: `edges` holds the ascending inner bin
// edges (bins = edges + 1; bin i is [edges[i-1], edges[i]), the outer bins open).
// Categorical: `edges` holds the sorted distinct category values; bin i is category i and
// the last bin (index edges.size()) collects every other value.
struct FeatureReference {
  FeatureKind kind = FeatureKind::kNumeric;
  std::vector<double> edges;
  std::vector<double> probabilities;  // one per bin, summing to 1
  double mean = 0, std = 0, min = 0, max = 0;  // of the finite reference values (NaN: none)
};

// The immutable reference a Monitor bins against; make it with make_reference().
struct Reference {
  std::vector<FeatureReference> features;  // in the monitor's feature order
  uint64_t rows = 0;                       // reference rows the probabilities came from
  // Mahalanobis distance over a subset of numeric features (empty: none): their indices,
  // mean vector and precision matrix (k x k, row-major); rows farther than
  // outlier_threshold (a distance, not its square) are outliers.
  std::vector<int> mahalanobis_features;
  std::vector<double> mahalanobis_mean;
  std::vector<double> precision;
  double outlier_threshold = 0;
  // Fingerprint of the bin layout and sum shifts, set by make_reference: window states
  // of references with equal layouts can be merged and evaluated against each other.
  uint64_t layout = 0;

  size_t bins(size_t feature) const noexcept { return features[feature].edges.size() + 1; }
};

// Checks a reference (edges ascending and finite, categories sorted and distinct, one
// probability per bin, Mahalanobis shapes, at most 65534 bins a feature) and returns it
// immutable with its layout set. Throws Error(kInvalidInput) naming the feature and fault.
std::shared_ptr<const Reference> make_reference(Reference reference);

// Per feature statistics of a window; min/max are +inf/-inf while count is 0. Sums are
// taken around `shift` (the reference mean), so the variance stays exact for values far
// from 0 and two states over the same reference add up.
struct FeatureStats {
  uint64_t count = 0;         // finite values (binned)
  uint64_t nan = 0;           // NaN values
  uint64_t inf = 0;           // +-infinite values
  uint64_t out_of_range = 0;  // numeric: < reference min or > reference max; categorical: not a reference category
  double sum = 0;             // sum of (value - shift) over finite values
  double sum_sq = 0;          // sum of (value - shift)^2
  double min = 0, max = 0;
};

// The statistics of one window: plain data, mergeable, serialisable.
struct WindowState {
  uint64_t rows = 0;
  uint64_t outlier_rows = 0;       // Mahalanobis distance above the threshold
  uint64_t out_of_range_rows = 0;  // some feature out of range
  uint64_t nonfinite_rows = 0;     // some feature NaN or infinite
  int64_t start_ns = 0, end_ns = 0;  // times of the first and last observation (rows > 0)
  uint64_t layout = 0;               // the reference's layout; 0: an empty default state
  std::vector<double> shift;         // per feature
  std::vector<FeatureStats> features;
  std::vector<uint32_t> bin_offset;  // features + 1 entries into bin_counts
  std::vector<uint64_t> bin_counts;

  // A zeroed state laid out for `reference`.
  static WindowState for_reference(const Reference& reference);

  size_t feature_count() const noexcept { return features.size(); }
  size_t bins(size_t feature) const noexcept { return bin_offset[feature + 1] - bin_offset[feature]; }
  const uint64_t* counts(size_t feature) const noexcept { return bin_counts.data() + bin_offset[feature]; }
  double mean(size_t feature) const noexcept;  // NaN when count is 0
  double std(size_t feature) const noexcept;   // population (ddof 0); NaN when count is 0

  // Zeroes the statistics, keeping the layout (no allocation).
  void clear() noexcept;
  // Adds `other` (the union of both windows' rows). An empty default state adopts the
  // other's layout. Throws Error(kInvalidInput) when the layouts differ.
  void merge(const WindowState& other);
  // Versioned, checksummed little-endian bytes; from_bytes throws Error(kInvalidInput)
  // saying what is wrong with bytes that are not a state written by to_bytes.
  std::string to_bytes() const;
  static WindowState from_bytes(std::string_view bytes);
};

struct MonitorOptions {
  std::vector<FeatureSpec> features;
  int64_t window_rows = 1000;     // the rows ring holds sub_windows sub-windows of window_rows / sub_windows rows
  int sub_windows = 10;           // in both rings
  double window_seconds = 10.0;   // the time ring: sub_windows sub-windows of window_seconds / sub_windows
  int64_t reference_rows = 10000; // live reference rows collected while no reference is set
};

// Bits of the per-row flag byte.
inline constexpr uint8_t kFlagOutOfRange = 1;  // some feature outside the reference range
inline constexpr uint8_t kFlagNonFinite = 2;   // some feature NaN or infinite
inline constexpr uint8_t kFlagOutlier = 4;     // Mahalanobis distance above the threshold

// Nanoseconds since the Unix epoch (system clock): the `now` monitor_executor passes.
int64_t wall_clock_ns() noexcept;

class Monitor {
 public:
  // At most this many features (observe() keeps one chunk of values on its stack).
  static constexpr size_t kMaxFeatures = 1024;

  // Validates the options (Error(kInvalidInput) naming the field) and preallocates the
  // live-reference buffer.
  explicit Monitor(MonitorOptions options);
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  ~Monitor();

  // Replaces the reference (checked against the features: count and kinds, at most
  // kMaxFeatures Mahalanobis features) and starts both rings afresh; preallocates their
  // storage and lays the reference out for scoring (padded edges, the precision matrix
  // factored: O(k^3) for k Mahalanobis features). Rows being observed meanwhile are
  // binned against the reference they started with and then dropped from the new rings.
  void set_reference(std::shared_ptr<const Reference> reference);
  std::shared_ptr<const Reference> reference() const;

  // Observes `rows` rows: every tensor's first `rows`-th share of elements is one row
  // (a model without a batch dimension passes rows = 1 and whole tensors). `now_ns` is on
  // any clock the caller keeps using (the time ring's sub-windows are now_ns /
  // (window_seconds / sub_windows)); a time earlier than one seen before counts as that one.
  // row_flags (may be null) receives one flag byte per row; 0 while there is no reference.
  // Throws Error(kInvalidInput) when a feature's column is not in the tensors (nothing is
  // counted then). Never allocates.
  void observe(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows,
               int64_t now_ns, uint8_t* row_flags);

  // The sum of a ring's sub-windows: kRows, the last window_rows rows at most (the
  // current sub-window partly filled); kTime, the sub-windows of the last window_seconds
  // up to `now_ns`. Before a reference is set: an empty default state.
  WindowState window(WindowKind kind, int64_t now_ns) const;

  bool reference_ready() const;
  int64_t collected_rows() const;
  // The collected live-reference rows, row-major [collected_rows, features]; empty once a
  // reference is set (set_reference frees the buffer).
  std::vector<double> reference_rows() const;

  uint64_t rows_observed() const noexcept { return rows_observed_.load(std::memory_order_relaxed); }
  uint64_t anomalous_rows() const noexcept { return anomalous_rows_.load(std::memory_order_relaxed); }
  // observe() calls that monitor_executor caught an error from (their rows went unobserved).
  uint64_t failed_batches() const noexcept { return failed_batches_.load(std::memory_order_relaxed); }
  void count_failed_batch() noexcept { failed_batches_.fetch_add(1, std::memory_order_relaxed); }

  // Bytes held: ring storage, the live-reference buffer, the reference's scoring layout,
  // the object itself.
  size_t memory_bytes() const;
  const MonitorOptions& options() const noexcept { return options_; }

 private:
  struct Chunk;
  struct ReadPlan;  // the features grouped by the tensor they read (monitor.cpp)
  struct Scoring;   // a reference laid out for the scoring kernels (monitor.cpp)
  struct Rings {
    std::vector<WindowState> rows_slots, time_slots;
    std::vector<int64_t> time_epoch;  // the time sub-window each time slot holds
    size_t rows_slot = 0;             // the rows ring's current slot
    // Rows observed since the last fold: they belong to both current sub-windows (the
    // rows ring's and the time ring's latest), which receive them together when either
    // moves on. Observing a row updates one state instead of two.
    WindowState pending;
  };

  void check_tensors(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows) const;
  void check_features(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows) const;
  void read_chunk(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows,
                  int64_t first, Chunk& chunk) const;
  static void score_chunk(const Scoring& scoring, Chunk& chunk);
  void add_chunk(const Chunk& chunk, int64_t now_ns);     // mu_ held
  void fold_pending();                                    // mu_ held
  void collect_chunk(const Chunk& chunk);                 // mu_ held
  size_t memory_bytes_locked() const;                     // mu_ held

  const MonitorOptions options_;
  const int64_t rows_per_sub_window_;
  const int64_t sub_window_ns_;
  std::unique_ptr<const ReadPlan> plan_;  // built by the constructor, then read-only

  mutable std::mutex mu_;
  std::shared_ptr<const Reference> reference_;  // guarded by mu_
  std::shared_ptr<const Scoring> scoring_;      // guarded by mu_: reference_'s layout, set with it
  uint64_t generation_ = 0;                     // guarded by mu_: bumped by set_reference
  Rings rings_;                                 // guarded by mu_
  // guarded by mu_: the latest time sub-window observed
  int64_t latest_epoch_ = std::numeric_limits<int64_t>::min();
  std::vector<double> live_rows_;  // guarded by mu_: [reference_rows, features]; freed by set_reference
  int64_t collected_ = 0;          // guarded by mu_

  std::atomic<uint64_t> rows_observed_{0};
  std::atomic<uint64_t> anomalous_rows_{0};
  std::atomic<uint64_t> failed_batches_{0};
};

struct DriftOptions {
  double psi_warn = 0.1;
  double psi_alert = 0.25;
  double alpha = 0.05;
  drift::Correction correction = drift::Correction::kBenjaminiHochberg;
  double eps = 1e-4;  // smoothing of empty bins (PSI, chi-squared)
};

// Drift of one window against its reference, one entry per feature in every vector; a
// statistic that does not apply (ks for a categorical feature, chi2 for a numeric one,
// anything for a feature without finite values in the window) is NaN.
struct DriftReport {
  std::vector<double> psi, js, ks, ks_error_bound, wasserstein, chi2, p_value, adjusted_p_value;
  std::vector<double> missing_ratio;       // NaN/inf values / window rows
  std::vector<double> out_of_range_ratio;  // out-of-range values / window rows
  std::vector<double> mean, std, min, max; // of the window's finite values
  std::vector<uint64_t> count;             // finite values in the window
  std::vector<Status> status;
  bool alert = false;  // some feature alerts
  uint64_t rows = 0, outlier_rows = 0, out_of_range_rows = 0, nonfinite_rows = 0;
  double outlier_rate = 0;  // outlier_rows / rows; NaN for an empty window
};

// The verdict rules: status alert when adjusted p < alpha or psi >= psi_alert, warn when
// psi >= psi_warn, else ok; the model alerts when a feature does. p-values: binned KS
// (numeric) or chi-squared (categorical), adjusted across all features. Throws
// Error(kInvalidInput) for options out of range or a state of another layout.
DriftReport evaluate(const Reference& reference, const WindowState& state, const DriftOptions& options = {});

// The executor running `inner`, then monitor->observe(batch inputs, its outputs, rows,
// wall_clock_ns()), returning inner's outputs plus one more: the UINT8 row flags, shape
// [rows, 1] when `batching` (the model has a batch dimension), else [1], from `pool`.
// The batcher's output specs must end with that output: ("__monitor_flags", UINT8, [1]).
// An observe() error does not fail the batch: its flags are 0 and the monitor counts a
// failed batch.
Executor monitor_executor(std::shared_ptr<Monitor> monitor, Executor inner, bool batching,
                          std::shared_ptr<MemoryPool> pool);

}  // namespace conveyor::monitor
