// Monitor: reading features out of batch tensors, binning, the two rings, the executor.
#include "conveyor/monitor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "conveyor/error.h"
#include "kernels/monitor_scoring.h"
#include "monitor_values.h"

namespace conveyor::monitor {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw Error(ErrorCode::kInvalidInput, "[monitor] " + what); }

using values::as_double;
using values::derive_row;
using values::with_type;

// Per value state in a chunk, as the binning kernel writes it; non-finite states last.
constexpr uint8_t kOutOfRange = kernels::kValueOutOfRange;
constexpr uint8_t kIsNaN = kernels::kValueNaN;
constexpr uint8_t kIsInf = kernels::kValueInf;
static_assert(kernels::kValueInRange < kIsNaN && kOutOfRange < kIsNaN && kIsNaN < kIsInf);
static_assert(kernels::kRowOutOfRange == kFlagOutOfRange && kernels::kRowNonFinite == kFlagNonFinite,
              "the binning kernel sets the monitor's row flags");
static_assert(Monitor::kMaxFeatures % kernels::kFormBlock == 0, "a chunk's diff holds a padded Mahalanobis row");

int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

const Tensor& tensor_of(const FeatureSpec& f, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs) {
  return (f.source == Source::kInput ? inputs : outputs)[static_cast<size_t>(f.tensor)];
}

}  // namespace

int64_t wall_clock_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// One chunk of rows, feature-major: value (f, r) at [f * rows + r]. Lives on observe()'s
// stack (no allocation); its arrays are filled before they are read.
struct Monitor::Chunk {
  static constexpr size_t kValues = 4096;
  int64_t rows = 0;
  double value[kValues];
  uint16_t bin[kValues];
  uint8_t state[kValues];
  uint8_t flags[kValues];                    // per row
  double diff[Monitor::kMaxFeatures];        // Mahalanobis: value - mean, zero-padded
};

// A reference laid out for the scoring kernels (kernels/monitor_scoring.h); immutable,
// shared by the observers that started with it.
struct Monitor::Scoring {
  std::vector<double> edges;              // every feature's padded edges, back to back
  std::vector<kernels::BinTable> tables;  // per feature, pointing into edges
  std::vector<int> mahalanobis_features;
  std::vector<double> mahalanobis_mean;
  kernels::PackedQuadraticForm mahalanobis;  // k = 0: no score
  double outlier_threshold_sq = 0;

  explicit Scoring(const Reference& reference)
      : mahalanobis_features(reference.mahalanobis_features),
        mahalanobis_mean(reference.mahalanobis_mean),
        mahalanobis(kernels::pack_quadratic_form(reference.precision.data(),
                                                 static_cast<int64_t>(reference.mahalanobis_features.size()))),
        outlier_threshold_sq(reference.outlier_threshold * reference.outlier_threshold) {
    size_t total = 0;
    for (const FeatureReference& f : reference.features) {
      total += static_cast<size_t>(kernels::padded_edge_count(static_cast<int64_t>(f.edges.size())));
    }
    edges.reserve(total);
    for (const FeatureReference& f : reference.features) kernels::append_padded_edges(f.edges, edges);
    const double* at = edges.data();
    for (const FeatureReference& f : reference.features) {
      const auto count = static_cast<int64_t>(f.edges.size());
      tables.push_back({at, count, f.kind == FeatureKind::kCategorical, f.min, f.max});
      at += kernels::padded_edge_count(count);
    }
  }

  size_t memory_bytes() const {
    return sizeof(*this) + edges.capacity() * sizeof(double) + tables.capacity() * sizeof(kernels::BinTable) +
           mahalanobis_features.capacity() * sizeof(int) + mahalanobis_mean.capacity() * sizeof(double) +
           mahalanobis.triangle.capacity() * sizeof(double);
  }
};

// The features grouped by the tensor they read, so observe() checks each tensor and
// switches on its dtype once, not once a feature.
struct Monitor::ReadPlan {
  struct Column {
    size_t feature;
    int64_t column;
  };
  struct Group {
    Source source;
    int tensor;
    int64_t row_width_needed = 1;  // elements a row must hold: 1 + the largest column read
    std::vector<Column> columns;   // the Derive::kValue features reading this tensor
  };
  std::vector<Group> groups;     // one per tensor some feature reads, in first-use order
  std::vector<size_t> derived;   // the features with another Derive, in feature order

  explicit ReadPlan(const std::vector<FeatureSpec>& features) {
    for (size_t fi = 0; fi < features.size(); ++fi) {
      const FeatureSpec& f = features[fi];
      auto group = std::find_if(groups.begin(), groups.end(),
                                [&](const Group& g) { return g.source == f.source && g.tensor == f.tensor; });
      if (group == groups.end()) group = groups.insert(groups.end(), Group{f.source, f.tensor, 1, {}});
      if (f.derive == Derive::kValue) {
        group->columns.push_back({fi, f.column});
        group->row_width_needed = std::max(group->row_width_needed, f.column + 1);
      } else {
        derived.push_back(fi);
      }
    }
  }
};

Monitor::Monitor(MonitorOptions options)
    : options_(std::move(options)),
      rows_per_sub_window_(options_.sub_windows > 0 ? options_.window_rows / options_.sub_windows : 0),
      sub_window_ns_(options_.sub_windows > 0
                         ? static_cast<int64_t>(options_.window_seconds * 1e9 / options_.sub_windows)
                         : 0) {
  const size_t n = options_.features.size();
  if (n == 0) invalid("features: a monitor needs at least one feature");
  if (n > kMaxFeatures) {
    invalid("features: " + std::to_string(n) + " features, at most " + std::to_string(kMaxFeatures));
  }
  for (const FeatureSpec& f : options_.features) {
    if (f.tensor < 0) invalid("feature '" + f.name + "': tensor index must be >= 0");
    if (f.column < 0) invalid("feature '" + f.name + "': column must be >= 0");
    if (f.derive == Derive::kPredictedClass && f.kind != FeatureKind::kCategorical) {
      invalid("feature '" + f.name + "': a predicted class is categorical");
    }
  }
  if (options_.sub_windows < 1) invalid("sub_windows must be >= 1, got " + std::to_string(options_.sub_windows));
  if (options_.window_rows < options_.sub_windows || options_.window_rows % options_.sub_windows != 0) {
    invalid("window_rows (" + std::to_string(options_.window_rows) + ") must be a positive multiple of sub_windows (" +
            std::to_string(options_.sub_windows) + ")");
  }
  if (!(options_.window_seconds > 0) || sub_window_ns_ < 1 || !std::isfinite(options_.window_seconds)) {
    invalid("window_seconds must be > 0 (and at least 1 ns per sub-window), got " +
            std::to_string(options_.window_seconds));
  }
  if (options_.reference_rows < 0) {
    invalid("reference_rows must be >= 0, got " + std::to_string(options_.reference_rows));
  }
  live_rows_.assign(static_cast<size_t>(options_.reference_rows) * n, 0.0);
  plan_ = std::make_unique<const ReadPlan>(options_.features);
}

Monitor::~Monitor() = default;

void Monitor::set_reference(std::shared_ptr<const Reference> reference) {
  if (!reference || reference->layout == 0) invalid("set_reference needs a reference made by make_reference");
  const size_t n = options_.features.size();
  if (reference->features.size() != n) {
    invalid("the reference has " + std::to_string(reference->features.size()) + " features, the monitor " +
            std::to_string(n));
  }
  for (size_t i = 0; i < n; ++i) {
    if (reference->features[i].kind != options_.features[i].kind) {
      invalid("feature '" + options_.features[i].name + "' is " + feature_kind_name(options_.features[i].kind) +
              " but its reference is " + feature_kind_name(reference->features[i].kind));
    }
  }
  if (reference->mahalanobis_features.size() > kMaxFeatures) {
    invalid("the reference scores " + std::to_string(reference->mahalanobis_features.size()) +
            " Mahalanobis features, at most " + std::to_string(kMaxFeatures));
  }
  auto scoring = std::make_shared<const Scoring>(*reference);
  Rings fresh;
  const WindowState empty = WindowState::for_reference(*reference);
  fresh.rows_slots.assign(static_cast<size_t>(options_.sub_windows), empty);
  fresh.time_slots.assign(static_cast<size_t>(options_.sub_windows), empty);
  fresh.time_epoch.assign(static_cast<size_t>(options_.sub_windows), std::numeric_limits<int64_t>::min());
  fresh.pending = empty;
  std::vector<double> released;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::swap(rings_, fresh);
    reference_ = std::move(reference);
    scoring_.swap(scoring);
    ++generation_;
    latest_epoch_ = std::numeric_limits<int64_t>::min();
    released.swap(live_rows_);  // the live reference is no longer needed
  }
}  // the old rings, scoring and buffer are freed here, outside the lock

std::shared_ptr<const Reference> Monitor::reference() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reference_;
}

bool Monitor::reference_ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reference_ != nullptr;
}

int64_t Monitor::collected_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return collected_;
}

std::vector<double> Monitor::reference_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = std::min(static_cast<size_t>(collected_) * options_.features.size(), live_rows_.size());
  return std::vector<double>(live_rows_.begin(), live_rows_.begin() + static_cast<std::ptrdiff_t>(n));
}

size_t Monitor::memory_bytes_locked() const {
  size_t bytes = sizeof(*this) + live_rows_.capacity() * sizeof(double) +
                 rings_.time_epoch.capacity() * sizeof(int64_t) + (scoring_ ? scoring_->memory_bytes() : 0);
  const auto state_bytes = [](const WindowState& s) {
    return s.shift.capacity() * sizeof(double) + s.features.capacity() * sizeof(FeatureStats) +
           s.bin_offset.capacity() * sizeof(uint32_t) + s.bin_counts.capacity() * sizeof(uint64_t);
  };
  for (const auto* ring : {&rings_.rows_slots, &rings_.time_slots}) {
    bytes += ring->capacity() * sizeof(WindowState);
    for (const WindowState& s : *ring) bytes += state_bytes(s);
  }
  return bytes + state_bytes(rings_.pending);
}

size_t Monitor::memory_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return memory_bytes_locked();
}

void Monitor::check_tensors(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                            int64_t rows) const {
  // Each tensor once; check_features finds (and names) the first feature that does not fit.
  for (const ReadPlan::Group& g : plan_->groups) {
    const std::vector<Tensor>& tensors = g.source == Source::kInput ? inputs : outputs;
    if (static_cast<size_t>(g.tensor) >= tensors.size()) return check_features(inputs, outputs, rows);
    const Tensor& t = tensors[static_cast<size_t>(g.tensor)];
    const int64_t numel = t.shape.numel();
    if (t.dtype == DType::kBytes || t.device.kind == DeviceKind::kCUDA || numel % rows != 0 ||
        numel / rows < g.row_width_needed) {
      return check_features(inputs, outputs, rows);
    }
  }
}

void Monitor::check_features(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                             int64_t rows) const {
  for (const FeatureSpec& f : options_.features) {
    const std::vector<Tensor>& tensors = f.source == Source::kInput ? inputs : outputs;
    const char* what = source_name(f.source);
    if (static_cast<size_t>(f.tensor) >= tensors.size()) {
      invalid("feature '" + f.name + "' reads " + what + " " + std::to_string(f.tensor) + ", but the batch has " +
              std::to_string(tensors.size()) + " " + what + "s");
    }
    const Tensor& t = tensors[static_cast<size_t>(f.tensor)];
    if (t.dtype == DType::kBytes || t.device.kind == DeviceKind::kCUDA) {
      invalid("feature '" + f.name + "' reads " + what + " " + std::to_string(f.tensor) + " of " +
              dtype_name(t.dtype) + (t.device.kind == DeviceKind::kCUDA ? " on a CUDA device" : "") +
              ": only numeric tensors in host memory can be monitored");
    }
    const int64_t numel = t.shape.numel();
    if (numel % rows != 0 || numel / rows < 1) {
      invalid("feature '" + f.name + "' reads " + what + " " + std::to_string(f.tensor) + " of shape " +
              t.shape.to_string() + ", which does not split into " + std::to_string(rows) + " rows");
    }
    if (f.derive == Derive::kValue && f.column >= numel / rows) {
      invalid("feature '" + f.name + "' reads column " + std::to_string(f.column) + " of " + what + " " +
              std::to_string(f.tensor) + ", whose rows hold " + std::to_string(numel / rows) + " elements (shape " +
              t.shape.to_string() + ")");
    }
  }
}

void Monitor::read_chunk(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows,
                         int64_t first, Chunk& chunk) const {
  const int64_t n = chunk.rows;
  for (const ReadPlan::Group& g : plan_->groups) {
    if (g.columns.empty()) continue;
    const Tensor& t = (g.source == Source::kInput ? inputs : outputs)[static_cast<size_t>(g.tensor)];
    const int64_t width = t.shape.numel() / rows;
    with_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* base = static_cast<const T*>(t.data) + first * width;
      if (n == 1) {  // one row (batch-1 requests): one value a feature, no row loop to set up
        for (const ReadPlan::Column& c : g.columns) chunk.value[c.feature] = as_double(base[c.column]);
        return;
      }
      for (const ReadPlan::Column& c : g.columns) {
        double* out = chunk.value + c.feature * static_cast<size_t>(n);
        const T* p = base + c.column;
        for (int64_t r = 0; r < n; ++r) out[r] = as_double(p[r * width]);
      }
    });
  }
  for (size_t fi : plan_->derived) {
    const FeatureSpec& f = options_.features[fi];
    const Tensor& t = tensor_of(f, inputs, outputs);
    const int64_t width = t.shape.numel() / rows;
    double* out = chunk.value + fi * static_cast<size_t>(n);
    with_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* base = static_cast<const T*>(t.data) + first * width;
      for (int64_t r = 0; r < n; ++r) out[r] = derive_row(base + r * width, width, f.derive);
    });
  }
}

void Monitor::score_chunk(const Scoring& scoring, Chunk& chunk) {
  const int64_t n = chunk.rows;
  std::memset(chunk.flags, 0, static_cast<size_t>(n));
  const kernels::MonitorKernels& kernels = kernels::monitor_kernels();
  kernels.bin_chunk(chunk.value, n, scoring.tables.data(), static_cast<int64_t>(scoring.tables.size()), chunk.bin,
                    chunk.state, chunk.flags);
  const kernels::PackedQuadraticForm& form = scoring.mahalanobis;
  const auto k = static_cast<size_t>(form.k);
  if (k == 0) return;
  const double* mean = scoring.mahalanobis_mean.data();
  const int* index = scoring.mahalanobis_features.data();
  double* diff = chunk.diff;
  std::fill(diff + k, diff + form.padded_k, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    bool finite = true;
    for (size_t j = 0; j < k; ++j) {
      diff[j] = chunk.value[static_cast<size_t>(index[j]) * static_cast<size_t>(n) + r] - mean[j];
      finite = finite && std::isfinite(diff[j]);
    }
    if (!finite) continue;
    const double distance_sq = kernels.triangular_form(diff, form.triangle.data(), form.padded_k, form.squares);
    if (distance_sq > scoring.outlier_threshold_sq) chunk.flags[r] |= kFlagOutlier;
  }
}

namespace {

// Adds one scored value (its state, bin and value) to a feature's statistics and bins.
inline void add_value(FeatureStats& f, uint64_t* counts, uint8_t state, uint16_t bin, double v, double shift) {
  if (state >= kIsNaN) {
    f.nan += state == kIsNaN;
    f.inf += state == kIsInf;
    return;
  }
  const double d = v - shift;
  ++counts[bin];
  ++f.count;
  f.out_of_range += state == kOutOfRange;
  f.sum += d;
  f.sum_sq += d * d;
  f.min = std::min(f.min, v);
  f.max = std::max(f.max, v);
}

// Adds rows [r0, r1) of a scored chunk to a window state.
void add_rows(WindowState& to, const double* value, const uint16_t* bin, const uint8_t* state, const uint8_t* flags,
              int64_t n, int64_t r0, int64_t r1, int64_t now_ns) {
  if (r1 <= r0) return;
  to.start_ns = to.rows == 0 ? now_ns : std::min(to.start_ns, now_ns);
  to.end_ns = to.rows == 0 ? now_ns : std::max(to.end_ns, now_ns);
  to.rows += static_cast<uint64_t>(r1 - r0);
  for (int64_t r = r0; r < r1; ++r) {
    to.out_of_range_rows += (flags[r] & kFlagOutOfRange) != 0;
    to.nonfinite_rows += (flags[r] & kFlagNonFinite) != 0;
    to.outlier_rows += (flags[r] & kFlagOutlier) != 0;
  }
  FeatureStats* stats = to.features.data();
  uint64_t* counts = to.bin_counts.data();
  const uint32_t* offset = to.bin_offset.data();
  const double* shift = to.shift.data();
  const size_t features = to.features.size();
  if (n == 1) {  // one row (batch-1 requests): a value a feature, added in place
    for (size_t fi = 0; fi < features; ++fi) {
      add_value(stats[fi], counts + offset[fi], state[fi], bin[fi], value[fi], shift[fi]);
    }
    return;
  }
  for (size_t fi = 0; fi < features; ++fi) {
    FeatureStats f = stats[fi];  // in registers over the run of rows
    const size_t at = fi * static_cast<size_t>(n);
    for (int64_t r = r0; r < r1; ++r) {
      add_value(f, counts + offset[fi], state[at + r], bin[at + r], value[at + r], shift[fi]);
    }
    stats[fi] = f;
  }
}

size_t ring_slot(int64_t epoch, int sub_windows) {
  return static_cast<size_t>(epoch - floor_div(epoch, sub_windows) * sub_windows);
}

}  // namespace

void Monitor::fold_pending() {
  WindowState& pending = rings_.pending;
  if (pending.rows == 0) return;
  rings_.time_slots[ring_slot(latest_epoch_, options_.sub_windows)].merge(pending);
  rings_.rows_slots[rings_.rows_slot].merge(pending);
  pending.clear();
}

void Monitor::add_chunk(const Chunk& c, int64_t now_ns) {
  const int64_t n = c.rows;
  const size_t subs = static_cast<size_t>(options_.sub_windows);
  // Time ring: the chunk's sub-window, never earlier than the latest one seen. Pending
  // rows go to the latest one before it changes.
  const int64_t epoch = std::max(floor_div(now_ns, sub_window_ns_), latest_epoch_);
  if (epoch != latest_epoch_) fold_pending();
  latest_epoch_ = epoch;
  const size_t slot = ring_slot(epoch, options_.sub_windows);
  if (rings_.time_epoch[slot] != epoch) {  // a sub-window of an earlier lap: start it afresh
    rings_.time_slots[slot].clear();
    rings_.time_epoch[slot] = epoch;
  }
  // Rows ring: fill the current sub-window (its rows and the pending ones), moving on
  // (and clearing) when it is full.
  WindowState& pending = rings_.pending;
  for (int64_t r = 0; r < n;) {
    int64_t filled = static_cast<int64_t>(rings_.rows_slots[rings_.rows_slot].rows + pending.rows);
    if (filled >= rows_per_sub_window_) {
      fold_pending();
      rings_.rows_slot = (rings_.rows_slot + 1) % subs;
      rings_.rows_slots[rings_.rows_slot].clear();
      filled = 0;
    }
    const int64_t take = std::min(n - r, rows_per_sub_window_ - filled);
    add_rows(pending, c.value, c.bin, c.state, c.flags, n, r, r + take, now_ns);
    r += take;
  }
}

void Monitor::collect_chunk(const Chunk& c) {
  const size_t features = options_.features.size();
  const int64_t take = std::min(c.rows, options_.reference_rows - collected_);
  for (int64_t r = 0; r < take; ++r) {
    double* row = live_rows_.data() + static_cast<size_t>(collected_ + r) * features;
    for (size_t fi = 0; fi < features; ++fi) row[fi] = c.value[fi * static_cast<size_t>(c.rows) + r];
  }
  collected_ += take;
}

void Monitor::observe(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs, int64_t rows,
                      int64_t now_ns, uint8_t* row_flags) {
  if (rows <= 0) return;
  check_tensors(inputs, outputs, rows);
  std::shared_ptr<const Scoring> scoring;
  uint64_t generation;
  bool collecting;
  {
    std::lock_guard<std::mutex> lock(mu_);
    scoring = scoring_;
    generation = generation_;
    collecting = !reference_ && collected_ < options_.reference_rows;
  }
  rows_observed_.fetch_add(static_cast<uint64_t>(rows), std::memory_order_relaxed);
  if (!scoring) {
    if (row_flags) std::memset(row_flags, 0, static_cast<size_t>(rows));
    if (!collecting) return;
  }
  const size_t features = options_.features.size();
  const int64_t per_chunk = static_cast<int64_t>(std::max<size_t>(1, Chunk::kValues / features));
  Chunk chunk;  // ~60 KiB of stack, filled before use
  uint64_t anomalous = 0;
  for (int64_t first = 0; first < rows; first += per_chunk) {
    chunk.rows = std::min(per_chunk, rows - first);
    read_chunk(inputs, outputs, rows, first, chunk);
    if (!scoring) {
      std::lock_guard<std::mutex> lock(mu_);
      if (generation != generation_ || collected_ >= options_.reference_rows) break;
      collect_chunk(chunk);
      continue;
    }
    score_chunk(*scoring, chunk);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (generation == generation_) add_chunk(chunk, now_ns);
    }
    for (int64_t r = 0; r < chunk.rows; ++r) anomalous += chunk.flags[r] != 0;
    if (row_flags) std::memcpy(row_flags + first, chunk.flags, static_cast<size_t>(chunk.rows));
  }
  if (anomalous) anomalous_rows_.fetch_add(anomalous, std::memory_order_relaxed);
}

WindowState Monitor::window(WindowKind kind, int64_t now_ns) const {
  std::shared_ptr<const Reference> reference = this->reference();
  while (reference) {
    WindowState out = WindowState::for_reference(*reference);  // allocated before locking
    std::lock_guard<std::mutex> lock(mu_);
    if (reference_ != reference) {
      reference = reference_;
      continue;
    }
    if (kind == WindowKind::kRows) {
      for (const WindowState& s : rings_.rows_slots) out.merge(s);
      out.merge(rings_.pending);  // part of the current sub-window
    } else {
      const int64_t epoch = std::max(floor_div(now_ns, sub_window_ns_), latest_epoch_);
      const auto in_window = [&](int64_t e) { return e <= epoch && e > epoch - options_.sub_windows; };
      for (size_t i = 0; i < rings_.time_slots.size(); ++i) {
        if (in_window(rings_.time_epoch[i])) out.merge(rings_.time_slots[i]);
      }
      if (in_window(latest_epoch_)) out.merge(rings_.pending);  // part of the latest sub-window
    }
    return out;
  }
  return WindowState{};
}

Executor monitor_executor(std::shared_ptr<Monitor> monitor, Executor inner, bool batching,
                          std::shared_ptr<MemoryPool> pool) {
  if (!monitor) invalid("monitor_executor needs a monitor");
  if (!pool) pool = MemoryPool::default_host();
  return [monitor = std::move(monitor), inner = std::move(inner), batching,
          pool = std::move(pool)](const Batch& batch) {
    std::vector<Tensor> outputs = inner(batch);
    const int64_t rows = batching ? batch.rows : 1;
    Tensor flags = make_pooled_tensor(pool, DType::kUInt8, batching ? Shape{rows, 1} : Shape{1});
    auto* bytes = static_cast<uint8_t*>(flags.data);
    try {
      monitor->observe(batch.inputs, outputs, rows, wall_clock_ns(), bytes);
    } catch (const Error&) {
      // A monitor that does not fit the batch must not fail the model's requests.
      std::memset(bytes, 0, static_cast<size_t>(rows));
      monitor->count_failed_batch();
    }
    outputs.push_back(std::move(flags));
    return outputs;
  };
}

}  // namespace conveyor::monitor
