// Hot-path counters: lock-free histograms of durations, read only when someone asks
// (Runtime.model_stats, a Prometheus scrape). Writers never block or allocate.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

namespace conveyor {

// Log-linear histogram of nanosecond durations: 16 sub-buckets per power of two, so a
// percentile read from it is within 1/16 (6.25%) of the true value.
class DurationHistogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr int kSub = 1 << kSubBits;
  static constexpr int kBuckets = (64 - kSubBits + 1) * kSub;

  // Adds `weight` observations of `ns` (a batch records once for all its requests).
  void record(uint64_t ns, uint64_t weight = 1) noexcept;

  struct Snapshot {
    uint64_t count = 0;
    uint64_t sum_ns = 0;
    std::vector<uint64_t> buckets;  // kBuckets counts
    // The q-quantile (0 <= q <= 1) in ns: the upper bound of the bucket holding it.
    uint64_t percentile(double q) const noexcept;
  };
  Snapshot snapshot() const;

  static int bucket_of(uint64_t ns) noexcept;
  static uint64_t bucket_upper_bound(int bucket) noexcept;

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> sum_ns_{0};
};

}  // namespace conveyor
