// Monitor plain data: names, reference checks, window states (merge, bytes).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "conveyor/error.h"
#include "conveyor/monitor.h"

namespace conveyor::monitor {

static_assert(std::endian::native == std::endian::little, "window state bytes are written little-endian");

namespace {

[[noreturn]] void invalid(const std::string& what) { throw Error(ErrorCode::kInvalidInput, "[monitor] " + what); }

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr uint32_t kStateMagic = 0x53575643;  // "CVWS"
constexpr uint32_t kStateVersion = 1;
constexpr size_t kMaxBins = 65534;  // observe() keeps bin indices in 16 bits

uint64_t fnv1a(uint64_t hash, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) hash = (hash ^ p[i]) * 0x100000001b3ULL;
  return hash;
}
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;

double shift_of(const FeatureReference& f) { return std::isfinite(f.mean) ? f.mean : 0.0; }

std::string feature_label(size_t i) { return "reference feature " + std::to_string(i); }

void check_feature(const FeatureReference& f, size_t i) {
  const std::string where = feature_label(i);
  if (f.edges.size() + 1 > kMaxBins) {
    invalid(where + " has " + std::to_string(f.edges.size() + 1) + " bins; at most " + std::to_string(kMaxBins));
  }
  for (size_t j = 0; j < f.edges.size(); ++j) {
    if (!std::isfinite(f.edges[j])) invalid(where + ": edge " + std::to_string(j) + " is not finite");
    if (j > 0 && !(f.edges[j - 1] < f.edges[j])) {
      invalid(where + (f.kind == FeatureKind::kNumeric ? ": edges must be strictly ascending (edge "
                                                       : ": categories must be sorted and distinct (value ") +
              std::to_string(j) + ")");
    }
  }
  if (f.probabilities.size() != f.edges.size() + 1) {
    invalid(where + " needs " + std::to_string(f.edges.size() + 1) + " probabilities (one per bin), got " +
            std::to_string(f.probabilities.size()));
  }
  double total = 0;
  for (double p : f.probabilities) {
    if (!(p >= 0 && p <= 1)) invalid(where + ": probabilities must lie in [0, 1]");
    total += p;
  }
  if (std::abs(total - 1.0) > 1e-6) invalid(where + ": probabilities sum to " + std::to_string(total) + ", not 1");
}

}  // namespace

// ---- names --------------------------------------------------------------------------

Source source_from_name(std::string_view name) {
  if (name == "input") return Source::kInput;
  if (name == "output") return Source::kOutput;
  invalid("unknown feature source '" + std::string(name) + "': expected input or output");
}

Derive derive_from_name(std::string_view name) {
  for (auto d : {Derive::kValue, Derive::kPredictedClass, Derive::kConfidence, Derive::kConfidenceFromLogits}) {
    if (name == derive_name(d)) return d;
  }
  invalid("unknown derive '" + std::string(name) +
          "': expected value, predicted_class, confidence or confidence_from_logits");
}

FeatureKind feature_kind_from_name(std::string_view name) {
  if (name == "numeric") return FeatureKind::kNumeric;
  if (name == "categorical") return FeatureKind::kCategorical;
  invalid("unknown feature kind '" + std::string(name) + "': expected numeric or categorical");
}

WindowKind window_kind_from_name(std::string_view name) {
  if (name == "rows") return WindowKind::kRows;
  if (name == "time") return WindowKind::kTime;
  invalid("unknown window kind '" + std::string(name) + "': expected rows or time");
}

drift::Correction correction_from_name(std::string_view name) {
  if (name == "benjamini-hochberg") return drift::Correction::kBenjaminiHochberg;
  if (name == "bonferroni") return drift::Correction::kBonferroni;
  if (name == "none") return drift::Correction::kNone;
  invalid("unknown correction '" + std::string(name) + "': expected benjamini-hochberg, bonferroni or none");
}

const char* source_name(Source source) noexcept { return source == Source::kInput ? "input" : "output"; }

const char* derive_name(Derive derive) noexcept {
  switch (derive) {
    case Derive::kValue: return "value";
    case Derive::kPredictedClass: return "predicted_class";
    case Derive::kConfidence: return "confidence";
    case Derive::kConfidenceFromLogits: return "confidence_from_logits";
  }
  return "?";
}

const char* feature_kind_name(FeatureKind kind) noexcept {
  return kind == FeatureKind::kNumeric ? "numeric" : "categorical";
}

const char* status_name(Status status) noexcept {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kWarn: return "warn";
    case Status::kAlert: return "alert";
  }
  return "?";
}

// ---- reference ----------------------------------------------------------------------

std::shared_ptr<const Reference> make_reference(Reference r) {
  if (r.features.empty()) invalid("a reference needs at least one feature");
  for (size_t i = 0; i < r.features.size(); ++i) check_feature(r.features[i], i);
  const size_t k = r.mahalanobis_features.size();
  for (size_t j = 0; j < k; ++j) {
    const int f = r.mahalanobis_features[j];
    if (f < 0 || static_cast<size_t>(f) >= r.features.size()) {
      invalid("Mahalanobis feature index " + std::to_string(f) + " is not a feature (0.." +
              std::to_string(r.features.size() - 1) + ")");
    }
    if (r.features[f].kind != FeatureKind::kNumeric) {
      invalid("Mahalanobis feature " + std::to_string(f) + " is categorical; only numeric features can be scored");
    }
  }
  if (r.mahalanobis_mean.size() != k || r.precision.size() != k * k) {
    invalid("Mahalanobis over " + std::to_string(k) + " features needs a mean of " + std::to_string(k) +
            " and a precision matrix of " + std::to_string(k * k) + " values, got " +
            std::to_string(r.mahalanobis_mean.size()) + " and " + std::to_string(r.precision.size()));
  }
  for (double v : r.mahalanobis_mean) {
    if (!std::isfinite(v)) invalid("the Mahalanobis mean holds a non-finite value");
  }
  for (double v : r.precision) {
    if (!std::isfinite(v)) invalid("the precision matrix holds a non-finite value");
  }
  if (k > 0 && !(r.outlier_threshold >= 0)) invalid("outlier_threshold must be >= 0 (+inf: no outliers)");

  uint64_t h = fnv1a(kFnvOffset, "cvref1", 6);
  const uint64_t n = r.features.size();
  h = fnv1a(h, &n, sizeof n);
  for (const FeatureReference& f : r.features) {
    const uint64_t edges = f.edges.size();
    const double shift = shift_of(f);
    h = fnv1a(h, &f.kind, sizeof f.kind);
    h = fnv1a(h, &edges, sizeof edges);
    h = fnv1a(h, f.edges.data(), edges * sizeof(double));
    h = fnv1a(h, &shift, sizeof shift);
  }
  r.layout = h == 0 ? 1 : h;
  return std::make_shared<const Reference>(std::move(r));
}

// ---- window state -------------------------------------------------------------------

WindowState WindowState::for_reference(const Reference& reference) {
  WindowState s;
  const size_t n = reference.features.size();
  s.layout = reference.layout;
  s.shift.resize(n);
  s.features.resize(n);
  s.bin_offset.resize(n + 1);
  uint32_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    s.shift[i] = shift_of(reference.features[i]);
    s.bin_offset[i] = offset;
    offset += static_cast<uint32_t>(reference.bins(i));
  }
  s.bin_offset[n] = offset;
  s.bin_counts.assign(offset, 0);
  s.clear();
  return s;
}

double WindowState::mean(size_t f) const noexcept {
  const FeatureStats& s = features[f];
  if (s.count == 0) return std::numeric_limits<double>::quiet_NaN();
  return shift[f] + s.sum / static_cast<double>(s.count);
}

double WindowState::std(size_t f) const noexcept {
  const FeatureStats& s = features[f];
  if (s.count == 0) return std::numeric_limits<double>::quiet_NaN();
  const double n = static_cast<double>(s.count);
  const double var = (s.sum_sq - s.sum * s.sum / n) / n;
  return std::sqrt(std::max(var, 0.0));
}

void WindowState::clear() noexcept {
  rows = outlier_rows = out_of_range_rows = nonfinite_rows = 0;
  start_ns = end_ns = 0;
  for (FeatureStats& f : features) {
    f = FeatureStats{};
    f.min = kInf;
    f.max = -kInf;
  }
  std::fill(bin_counts.begin(), bin_counts.end(), uint64_t{0});
}

void WindowState::merge(const WindowState& other) {
  if (other.layout == 0 && other.features.empty()) return;
  if (layout == 0 && features.empty()) {
    *this = other;
    return;
  }
  if (layout != other.layout || features.size() != other.features.size() ||
      bin_counts.size() != other.bin_counts.size()) {
    invalid("cannot merge window states of different references (layouts " + std::to_string(layout) + " and " +
            std::to_string(other.layout) + "): merge only states of monitors sharing one reference");
  }
  if (other.rows > 0) {
    start_ns = rows > 0 ? std::min(start_ns, other.start_ns) : other.start_ns;
    end_ns = rows > 0 ? std::max(end_ns, other.end_ns) : other.end_ns;
  }
  rows += other.rows;
  outlier_rows += other.outlier_rows;
  out_of_range_rows += other.out_of_range_rows;
  nonfinite_rows += other.nonfinite_rows;
  for (size_t i = 0; i < features.size(); ++i) {
    FeatureStats& a = features[i];
    const FeatureStats& b = other.features[i];
    a.count += b.count;
    a.nan += b.nan;
    a.inf += b.inf;
    a.out_of_range += b.out_of_range;
    a.sum += b.sum;
    a.sum_sq += b.sum_sq;
    a.min = std::min(a.min, b.min);
    a.max = std::max(a.max, b.max);
  }
  for (size_t i = 0; i < bin_counts.size(); ++i) bin_counts[i] += other.bin_counts[i];
}

namespace {

class ByteWriter {
 public:
  template <typename T>
  void put(const T& v) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &v, sizeof(T));
  }
  std::string out;
};

class ByteReader {
 public:
  explicit ByteReader(std::string_view bytes) : bytes_(bytes) {}
  template <typename T>
  T get() {
    if (bytes_.size() - at_ < sizeof(T)) invalid("window state bytes end early (at byte " + std::to_string(at_) + ")");
    T v;
    std::memcpy(&v, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  size_t at() const { return at_; }

 private:
  std::string_view bytes_;
  size_t at_ = 0;
};

// Header fields before the per-feature records, and the size of one record.
constexpr size_t kHeaderBytes = 4 + 4 + 8 + 8 + 4 * 8 + 2 * 8 + 8;
constexpr size_t kFeatureBytes = 8 + 4 * 8 + 4 * 8 + 4;

}  // namespace

std::string WindowState::to_bytes() const {
  ByteWriter w;
  w.out.reserve(kHeaderBytes + features.size() * kFeatureBytes + bin_counts.size() * 8 + 8);
  w.put(kStateMagic);
  w.put(kStateVersion);
  w.put(static_cast<uint64_t>(features.size()));
  w.put(static_cast<uint64_t>(bin_counts.size()));
  w.put(rows);
  w.put(outlier_rows);
  w.put(out_of_range_rows);
  w.put(nonfinite_rows);
  w.put(start_ns);
  w.put(end_ns);
  w.put(layout);
  for (size_t i = 0; i < features.size(); ++i) {
    const FeatureStats& f = features[i];
    w.put(shift[i]);
    w.put(f.count);
    w.put(f.nan);
    w.put(f.inf);
    w.put(f.out_of_range);
    w.put(f.sum);
    w.put(f.sum_sq);
    w.put(f.min);
    w.put(f.max);
    w.put(static_cast<uint32_t>(bins(i)));
  }
  for (uint64_t c : bin_counts) w.put(c);
  w.put(fnv1a(kFnvOffset, w.out.data(), w.out.size()));
  return std::move(w.out);
}

WindowState WindowState::from_bytes(std::string_view bytes) {
  ByteReader r(bytes);
  if (r.get<uint32_t>() != kStateMagic) invalid("these bytes are not a window state (wrong magic number)");
  const uint32_t version = r.get<uint32_t>();
  if (version != kStateVersion) {
    invalid("window state version " + std::to_string(version) + " is not supported (this build reads version " +
            std::to_string(kStateVersion) + ")");
  }
  const uint64_t n = r.get<uint64_t>();
  const uint64_t total_bins = r.get<uint64_t>();
  if (n > Monitor::kMaxFeatures || total_bins > n * kMaxBins) {
    invalid("window state claims " + std::to_string(n) + " features and " + std::to_string(total_bins) +
            " bins, beyond what a monitor holds");
  }
  const size_t expected = kHeaderBytes + n * kFeatureBytes + total_bins * 8 + 8;
  if (bytes.size() != expected) {
    invalid("window state of " + std::to_string(n) + " features and " + std::to_string(total_bins) + " bins needs " +
            std::to_string(expected) + " bytes, got " + std::to_string(bytes.size()));
  }
  uint64_t stored_sum;
  std::memcpy(&stored_sum, bytes.data() + expected - 8, 8);
  if (fnv1a(kFnvOffset, bytes.data(), expected - 8) != stored_sum) {
    invalid("window state bytes are corrupt (checksum mismatch)");
  }
  WindowState s;
  s.rows = r.get<uint64_t>();
  s.outlier_rows = r.get<uint64_t>();
  s.out_of_range_rows = r.get<uint64_t>();
  s.nonfinite_rows = r.get<uint64_t>();
  s.start_ns = r.get<int64_t>();
  s.end_ns = r.get<int64_t>();
  s.layout = r.get<uint64_t>();
  s.shift.resize(n);
  s.features.resize(n);
  s.bin_offset.resize(n + 1);
  uint64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    FeatureStats& f = s.features[i];
    s.shift[i] = r.get<double>();
    f.count = r.get<uint64_t>();
    f.nan = r.get<uint64_t>();
    f.inf = r.get<uint64_t>();
    f.out_of_range = r.get<uint64_t>();
    f.sum = r.get<double>();
    f.sum_sq = r.get<double>();
    f.min = r.get<double>();
    f.max = r.get<double>();
    s.bin_offset[i] = static_cast<uint32_t>(offset);
    offset += r.get<uint32_t>();
  }
  if (offset != total_bins) invalid("window state bins per feature do not add up to its bin count");
  s.bin_offset[n] = static_cast<uint32_t>(offset);
  s.bin_counts.resize(total_bins);
  for (uint64_t& c : s.bin_counts) c = r.get<uint64_t>();
  for (size_t i = 0; i < n; ++i) {
    uint64_t binned = 0;
    for (size_t b = 0; b < s.bins(i); ++b) binned += s.counts(i)[b];
    const FeatureStats& f = s.features[i];
    if (binned != f.count || f.count + f.nan + f.inf != s.rows) {
      invalid("window state feature " + std::to_string(i) + " is inconsistent (bin counts " + std::to_string(binned) +
              ", count " + std::to_string(f.count) + ", rows " + std::to_string(s.rows) + ")");
    }
  }
  if (n > 0 && s.layout == 0) invalid("window state has features but no reference layout");
  return s;
}

}  // namespace conveyor::monitor
