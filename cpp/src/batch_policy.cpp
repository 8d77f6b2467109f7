#include "conveyor/batch_policy.h"

#include <algorithm>

namespace conveyor {

namespace {

// Trims a full candidate list to the preferred size it reaches (see the header's rules).
size_t preferred_prefix(const std::vector<int64_t>& prefix_rows, const std::vector<int64_t>& preferred) {
  const int64_t largest = preferred.back();
  size_t fallback = 0;
  for (size_t i = prefix_rows.size(); i-- > 0;) {
    const int64_t rows = prefix_rows[i];
    if (rows > largest) continue;
    if (std::binary_search(preferred.begin(), preferred.end(), rows)) return i + 1;
    if (fallback == 0) fallback = i + 1;
  }
  return fallback == 0 ? 1 : fallback;
}

}  // namespace

BatchDecision decide_batch(const QueueSnapshot& queue, TimePoint now, const BatchPolicy& policy) {
  BatchDecision decision;
  const bool batching = policy.max_batch_size > 0;
  const int64_t max_rows = batching ? policy.max_batch_size : 1;

  bool have_first = false;
  bool closed = false;  // a compatible request did not fit: the batch cannot grow
  uint64_t shape_key = 0;
  TimePoint oldest = kNoDeadline;
  TimePoint earliest_deadline = kNoDeadline;
  std::vector<int64_t> prefix_rows;  // rows after each selected request

  for (size_t level = 0; level < queue.level_count() && !closed; ++level) {
    const size_t n = queue.size(level);
    for (size_t i = 0; i < n; ++i) {
      const PendingView& v = queue.at(level, i);
      const QueuePos pos{static_cast<uint32_t>(level), static_cast<uint32_t>(i)};
      if (v.deadline <= now) {
        decision.expired.push_back(pos);
        continue;
      }
      if (!have_first) {
        have_first = true;
        shape_key = v.shape_key;
      } else if (v.shape_key != shape_key) {
        continue;
      }
      const int64_t rows_here = batching ? v.rows : 1;
      if (decision.rows + rows_here > max_rows) {
        closed = true;
        break;
      }
      decision.selected.push_back(pos);
      decision.rows += rows_here;
      prefix_rows.push_back(decision.rows);
      oldest = std::min(oldest, v.enqueue_time);
      earliest_deadline = std::min(earliest_deadline, v.deadline);
      if (decision.rows == max_rows) {
        closed = true;
        break;
      }
    }
  }

  if (decision.selected.empty()) {
    decision.kind = BatchDecision::Kind::kIdle;
    return decision;
  }
  const bool delay_over = policy.max_queue_delay.count() <= 0 || now - oldest >= policy.max_queue_delay;
  const auto& preferred = policy.preferred_batch_sizes;
  const bool preferred_reached = !preferred.empty() && decision.rows >= preferred.back();

  if (closed || delay_over || !batching) {
    decision.kind = BatchDecision::Kind::kDispatch;
  } else if (preferred_reached) {
    const size_t keep = preferred_prefix(prefix_rows, preferred);
    decision.selected.resize(keep);
    decision.rows = prefix_rows[keep - 1];
    decision.kind = BatchDecision::Kind::kDispatch;
  } else {
    decision.kind = BatchDecision::Kind::kWait;
    decision.wake_at = std::min(oldest + policy.max_queue_delay, earliest_deadline);
    decision.selected.clear();
    decision.rows = 0;
  }
  return decision;
}

}  // namespace conveyor
