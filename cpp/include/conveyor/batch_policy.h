// The batching decision as a pure function of (queue snapshot, now, policy).
//
// No threads, no clocks, no locks: the batcher calls decide_batch() under its queue
// lock each time an execution instance is free, and the unit tests drive it with a
// fake clock. Same inputs, same decision.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <vector>

namespace conveyor {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;

inline constexpr TimePoint kNoDeadline = TimePoint::max();

// What the policy needs to know of one queued request.
struct PendingView {
  int64_t rows = 1;           // leading batch dimension of the request
  uint64_t shape_key = 0;     // equal keys: the non-batch dimensions agree (batchable together)
  TimePoint enqueue_time{};
  TimePoint deadline = kNoDeadline;
};

struct BatchPolicy {
  int64_t max_batch_size = 1;                    // rows per batch; 0: the model does not batch
  std::chrono::nanoseconds max_queue_delay{0};   // how long the oldest request may wait for company
  std::vector<int64_t> preferred_batch_sizes;    // ascending; empty: none
};

// A position in the queue: priority level (0 = served first) and index within it.
struct QueuePos {
  uint32_t level = 0;
  uint32_t index = 0;
  bool operator==(const QueuePos&) const = default;
};

struct BatchDecision {
  enum class Kind { kIdle, kWait, kDispatch };
  Kind kind = Kind::kIdle;
  std::vector<QueuePos> selected;  // kDispatch: the batch, in service order
  std::vector<QueuePos> expired;   // requests whose deadline has passed (any kind)
  int64_t rows = 0;                // kDispatch: total rows of the batch
  TimePoint wake_at = kNoDeadline; // kWait: when to decide again (delay end or a deadline)
};

// Read access to the queue, level by level; level 0 is served first, and each level is
// in arrival order. The batcher adapts its own queue; tests use PendingLevels.
class QueueSnapshot {
 public:
  virtual ~QueueSnapshot() = default;
  virtual size_t level_count() const = 0;
  virtual size_t size(size_t level) const = 0;
  virtual const PendingView& at(size_t level, size_t index) const = 0;
};

// A snapshot held by value, for tests and tools.
class PendingLevels final : public QueueSnapshot {
 public:
  explicit PendingLevels(std::vector<std::vector<PendingView>> levels) : levels_(std::move(levels)) {}
  size_t level_count() const override { return levels_.size(); }
  size_t size(size_t level) const override { return levels_[level].size(); }
  const PendingView& at(size_t level, size_t index) const override { return levels_[level][index]; }

 private:
  std::vector<std::vector<PendingView>> levels_;
};

// Rules:
//  - Requests whose deadline is <= now are reported in `expired` and never selected.
//  - The batch starts at the first live request in service order and takes, in service
//    order, the live requests with the same shape_key while they fit in max_batch_size
//    (the first compatible request that does not fit closes the batch: order is kept).
//  - Dispatch at once when the batch is full (max rows reached, or closed by a request
//    that does not fit), when max_queue_delay is zero, or when the rows reach the
//    largest preferred batch size (then the longest prefix whose rows are a preferred
//    size is taken, else the longest prefix not above the largest preferred size).
//  - Otherwise dispatch everything selected once the oldest selected request has
//    waited max_queue_delay; until then kWait with wake_at = that moment, or the
//    earliest deadline among the requests looked at, whichever comes first.
//  - A model that does not batch (max_batch_size 0) dispatches one request at a time.
BatchDecision decide_batch(const QueueSnapshot& queue, TimePoint now, const BatchPolicy& policy);

}  // namespace conveyor
