#include "conveyor/stats.h"

#include <bit>

namespace conveyor {

int DurationHistogram::bucket_of(uint64_t ns) noexcept {
  if (ns < static_cast<uint64_t>(kSub)) return static_cast<int>(ns);
  const int exponent = 63 - std::countl_zero(ns);  // >= kSubBits
  const int shift = exponent - kSubBits;
  const int sub = static_cast<int>((ns >> shift) & (kSub - 1));
  return (shift + 1) * kSub + sub;
}

uint64_t DurationHistogram::bucket_upper_bound(int bucket) noexcept {
  if (bucket < kSub) return static_cast<uint64_t>(bucket);
  const int shift = bucket / kSub - 1;
  const uint64_t sub = static_cast<uint64_t>(bucket % kSub);
  const uint64_t base = (static_cast<uint64_t>(kSub) + sub) << shift;
  return base + ((uint64_t{1} << shift) - 1);
}

void DurationHistogram::record(uint64_t ns, uint64_t weight) noexcept {
  counts_[bucket_of(ns)].fetch_add(weight, std::memory_order_relaxed);
  sum_ns_.fetch_add(ns * weight, std::memory_order_relaxed);
}

DurationHistogram::Snapshot DurationHistogram::snapshot() const {
  Snapshot s;
  s.buckets.resize(kBuckets);
  uint64_t total = 0;
  for (int i = 0; i < kBuckets; ++i) {
    s.buckets[i] = counts_[i].load(std::memory_order_relaxed);
    total += s.buckets[i];
  }
  // Count from the buckets so count and percentiles agree under concurrent writers.
  s.count = total;
  s.sum_ns = sum_ns_.load(std::memory_order_relaxed);
  return s;
}

uint64_t DurationHistogram::Snapshot::percentile(double q) const noexcept {
  if (count == 0) return 0;
  if (q < 0) q = 0;
  if (q > 1) q = 1;
  uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(count - 1)) + 1;
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets[i];
    if (seen >= rank) return bucket_upper_bound(i);
  }
  return bucket_upper_bound(kBuckets - 1);
}

}  // namespace conveyor
