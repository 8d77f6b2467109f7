#include "conveyor/mirror.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <utility>

#include "conveyor/batcher.h"

namespace conveyor {

namespace {

using Clock = std::chrono::steady_clock;

bool readable(DType dtype) noexcept {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kBytes:
      return false;
    default:
      return true;
  }
}

double value_at(const Tensor& t, int64_t i) noexcept {
  const void* p = t.data;
  switch (t.dtype) {
    case DType::kBool: return static_cast<const bool*>(p)[i] ? 1.0 : 0.0;
    case DType::kUInt8: return static_cast<const uint8_t*>(p)[i];
    case DType::kUInt16: return static_cast<const uint16_t*>(p)[i];
    case DType::kUInt32: return static_cast<const uint32_t*>(p)[i];
    case DType::kUInt64: return static_cast<double>(static_cast<const uint64_t*>(p)[i]);
    case DType::kInt8: return static_cast<const int8_t*>(p)[i];
    case DType::kInt16: return static_cast<const int16_t*>(p)[i];
    case DType::kInt32: return static_cast<const int32_t*>(p)[i];
    case DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<const double*>(p)[i];
    default: return 0.0;  // not readable(): never asked
  }
}

// The compared values of one row of `t` (the whole tensor when `row` < 0), appended to
// `out`; false (nothing appended) when the dtype cannot be read as numbers.
bool row_values(const Tensor& t, int64_t row, MirrorCompare compare, std::vector<double>* out) {
  if (!readable(t.dtype) || t.data == nullptr) return false;
  const int64_t count = row < 0 ? t.shape.numel() : t.shape.row_numel();
  if (count <= 0) return false;
  const int64_t first = row < 0 ? 0 : row * count;
  switch (compare) {
    case MirrorCompare::kFirstValue:
      out->push_back(value_at(t, first));
      return true;
    case MirrorCompare::kArgmax: {
      const int row_dims = row < 0 ? t.shape.ndim() : t.shape.ndim() - 1;
      const int64_t width = row_dims > 0 ? t.shape[t.shape.ndim() - 1] : 1;
      if (width <= 0) return false;
      for (int64_t group = first; group < first + count; group += width) {
        int64_t best = 0;
        double best_value = value_at(t, group);
        for (int64_t k = 1; k < width; ++k) {
          const double v = value_at(t, group + k);
          if (v > best_value) best = k, best_value = v;
        }
        out->push_back(static_cast<double>(best));
      }
      return true;
    }
    case MirrorCompare::kValues:
      for (int64_t k = first; k < first + count; ++k) out->push_back(value_at(t, k));
      return true;
    case MirrorCompare::kNone:
      return false;
  }
  return false;
}

}  // namespace

struct MirrorState {
  explicit MirrorState(const MirrorOptions& o) : options(o) {}

  const MirrorOptions options;
  mutable std::mutex mu;
  mutable std::condition_variable idle_cv;
  MirrorStats stats;   // guarded by mu
  MirrorPairs unread;  // guarded by mu
  // What answered copies held (the champion's and the challenger's outputs, BYTES owners),
  // released by drain(): its caller holds the GIL, which releasing a Python-owned tensor
  // would otherwise take on a batcher thread, twice per batch. Past kMaxReleased the
  // copy releases them itself.
  std::vector<std::shared_ptr<const void>> released;  // guarded by mu
  static constexpr size_t kMaxReleased = 4096;
};

namespace {

// What the copies of one champion batch share: the champion's outputs and what their
// inputs point at, alive until the last of them is answered. (No reference to the
// state: the state's `released` may hold the group.)
struct CopyGroup {
  std::shared_ptr<const BatchOutputs> champion;
  std::vector<Tensor> keep_alive;
  Clock::time_point submitted;
};

// Receives the challenger's answer to one copied request and pairs its rows.
class CopySink final : public CompletionSink {
 public:
  CopySink(std::shared_ptr<MirrorState> state, std::shared_ptr<CopyGroup> group, const MirroredRequest& request)
      : state_(std::move(state)), group_(std::move(group)), request_(request) {}

  void deliver(std::vector<Completion>&& completions) override {
    const int64_t elapsed =
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - group_->submitted).count();
    for (Completion& c : completions) record(c, elapsed);
    release(completions);
  }

 private:
  // Hands what the copy held to drain()'s caller when there is room; else it goes here,
  // after the state's lock (owners may take the GIL).
  void release(std::vector<Completion>& completions) noexcept {
    std::vector<std::shared_ptr<const void>> held;
    try {
      held.reserve(1 + completions.size());
      held.push_back(std::move(group_));
      for (Completion& c : completions) {
        if (c.outputs) held.push_back(std::move(c.outputs));
      }
      std::lock_guard<std::mutex> lock(state_->mu);
      auto& released = state_->released;
      if (released.size() + held.size() <= MirrorState::kMaxReleased) {
        released.insert(released.end(), std::make_move_iterator(held.begin()), std::make_move_iterator(held.end()));
        held.clear();
      }
    } catch (const std::bad_alloc&) {
      // No room to hand them over: released here.
    }
    group_.reset();
  }

  void record(const Completion& c, int64_t elapsed) {
    MirrorState& state = *state_;
    const MirrorOptions& o = state.options;
    const auto rows = static_cast<uint64_t>(request_.rows);
    const bool ok = c.code == ErrorCode::kOk && c.outputs != nullptr;
    const bool comparing = ok && o.compare != MirrorCompare::kNone;
    std::vector<double> mine, theirs;
    std::vector<uint8_t> compared;
    std::vector<double> mine_first, theirs_first;
    uint64_t incomparable = 0;
    if (comparing) {
      const BatchOutputs& champion = *group_->champion;
      const Tensor& a = champion.tensors[static_cast<size_t>(o.champion_output)];
      const Tensor& b = c.outputs->tensors[static_cast<size_t>(o.challenger_output)];
      for (int64_t k = 0; k < request_.rows; ++k) {
        const size_t mine_at = mine.size(), theirs_at = theirs.size();
        const bool same = row_values(a, champion.rows > 0 ? request_.row_offset + k : -1, o.compare, &mine) &&
                          row_values(b, c.rows >= 0 ? c.row_offset + k : -1, o.compare, &theirs) &&
                          mine.size() - mine_at == theirs.size() - theirs_at;
        if (!same) {
          mine.resize(mine_at);
          theirs.resize(theirs_at);
          ++incomparable;
        } else {
          mine_first.push_back(mine[mine_at]);
          theirs_first.push_back(theirs[theirs_at]);
        }
        compared.push_back(same ? 1 : 0);
      }
    }
    std::lock_guard<std::mutex> lock(state.mu);
    MirrorStats& s = state.stats;
    s.in_flight_rows -= rows;
    if (!ok) {
      s.failed_rows += rows;
    } else {
      s.paired_rows += rows;
      s.incomparable_rows += incomparable;
      MirrorPairs& u = state.unread;
      if (u.tags.size() + rows > o.max_unread_rows) {
        s.unrecorded_rows += rows;
      } else {
        u.tags.insert(u.tags.end(), rows, request_.tag);
        u.champion_ns.insert(u.champion_ns.end(), rows, request_.total_ns);
        // The champion's queue wait, then the copy's own batch: its wait in the challenger's
        // queue (gathered, or behind other copies at idle priority) is the mirror's, not the version's.
        const int64_t own = c.queued_ns >= 0 && c.queued_ns <= elapsed ? elapsed - c.queued_ns : elapsed;
        u.challenger_ns.insert(u.challenger_ns.end(), rows, request_.queue_ns + own);
        if (comparing) {
          u.compared.insert(u.compared.end(), compared.begin(), compared.end());
        } else {
          u.compared.insert(u.compared.end(), rows, uint8_t{0});
        }
        u.champion_first.insert(u.champion_first.end(), mine_first.begin(), mine_first.end());
        u.challenger_first.insert(u.challenger_first.end(), theirs_first.begin(), theirs_first.end());
        u.champion_values.insert(u.champion_values.end(), mine.begin(), mine.end());
        u.challenger_values.insert(u.challenger_values.end(), theirs.begin(), theirs.end());
      }
    }
    if (s.in_flight_rows == 0) state.idle_cv.notify_all();
  }

  const std::shared_ptr<MirrorState> state_;
  std::shared_ptr<CopyGroup> group_;
  const MirroredRequest request_;
};

// Rows [offset, offset + rows) of a batch tensor, sharing its memory and owner.
Tensor row_slice(const Tensor& t, int64_t offset, int64_t rows) {
  Tensor view = t;
  view.shape[0] = rows;
  view.data = static_cast<char*>(t.data) + static_cast<size_t>(offset) * t.row_nbytes();
  return view;
}

}  // namespace

Mirror::Mirror(std::shared_ptr<Batcher> challenger, MirrorOptions options)
    : challenger_(std::move(challenger)), options_(options), state_(std::make_shared<MirrorState>(options)) {
  if (!challenger_) throw Error(ErrorCode::kInvalidInput, "[mirror] a challenger batcher is required");
  if (options_.slots == 0) throw Error(ErrorCode::kInvalidInput, "[mirror] slots must be at least 1");
  if (options_.max_unread_rows == 0) {
    throw Error(ErrorCode::kInvalidInput, "[mirror] max_unread_rows must be at least 1");
  }
  if (options_.compare != MirrorCompare::kNone) {
    const auto outputs = static_cast<int>(challenger_->options().outputs.size());
    if (options_.champion_output < 0) {
      throw Error(ErrorCode::kInvalidInput, "[mirror] champion_output must be an output index to compare");
    }
    if (options_.challenger_output < 0 || options_.challenger_output >= outputs) {
      throw Error(ErrorCode::kInvalidInput, "[mirror] challenger_output " + std::to_string(options_.challenger_output) +
                                                " is not one of the challenger's " + std::to_string(outputs) +
                                                " outputs");
    }
  }
}

Mirror::~Mirror() = default;

void Mirror::offer(const std::vector<Tensor>& inputs, int64_t rows, const std::shared_ptr<const BatchOutputs>& outputs,
                   const std::vector<MirroredRequest>& requests, std::vector<Tensor> keep_alive) noexcept {
  submit(reserve(outputs, requests), inputs, rows, outputs, requests, std::move(keep_alive));
}

uint64_t Mirror::reserve(const std::shared_ptr<const BatchOutputs>& outputs,
                         const std::vector<MirroredRequest>& requests) noexcept {
  if (requests.empty()) return 0;
  if (options_.compare != MirrorCompare::kNone &&
      static_cast<size_t>(options_.champion_output) >= outputs->tensors.size()) {
    return 0;  // the compared output is not the champion's: the caller checks it when linking
  }
  const int64_t limit = challenger_->options().max_batch_size;
  uint64_t offered = 0, oversized = 0;
  for (const MirroredRequest& r : requests) {
    offered += static_cast<uint64_t>(r.rows);
    if (limit > 0 && r.rows > limit) oversized += static_cast<uint64_t>(r.rows);
  }
  const uint64_t wanted = offered - oversized;
  std::lock_guard<std::mutex> lock(state_->mu);
  MirrorStats& s = state_->stats;
  s.offered_rows += offered;
  s.failed_rows += oversized;  // more rows than the challenger's max_batch_size: it could not take them
  if (wanted == 0) return 0;
  if (s.in_flight_rows + wanted > options_.slots) {
    s.dropped_rows += wanted;
    return 0;
  }
  s.in_flight_rows += wanted;
  s.sent_rows += wanted;
  return wanted;
}

void Mirror::submit(uint64_t reserved, const std::vector<Tensor>& inputs, int64_t rows,
                    const std::shared_ptr<const BatchOutputs>& outputs, const std::vector<MirroredRequest>& requests,
                    std::vector<Tensor> keep_alive) noexcept {
  if (reserved == 0) return;
  const int64_t limit = challenger_->options().max_batch_size;
  ErrorCode refused = ErrorCode::kOk;
  try {
    auto group = std::make_shared<CopyGroup>();
    group->champion = outputs;
    group->keep_alive = std::move(keep_alive);
    group->submitted = Clock::now();
    std::vector<Batcher::Submission> copies;
    copies.reserve(requests.size());
    for (const MirroredRequest& r : requests) {
      if (limit > 0 && r.rows > limit) continue;
      Batcher::Submission copy;
      copy.inputs.reserve(inputs.size());
      for (const Tensor& t : inputs) copy.inputs.push_back(rows > 0 ? row_slice(t, r.row_offset, r.rows) : t);
      copy.sink = std::make_shared<CopySink>(state_, group, r);
      copies.push_back(std::move(copy));
    }
    challenger_->submit_group(std::move(copies));
    return;
  } catch (const Error& e) {
    refused = e.code();
  } catch (const std::exception&) {
    refused = ErrorCode::kOutOfMemory;
  }
  std::lock_guard<std::mutex> lock(state_->mu);
  MirrorStats& s = state_->stats;
  s.in_flight_rows -= reserved;
  s.sent_rows -= reserved;
  // A full queue is the challenger being too slow: dropped. Anything else (stopped,
  // inputs it does not take) is the copy failing.
  (refused == ErrorCode::kQueueFull ? s.dropped_rows : s.failed_rows) += reserved;
  if (s.in_flight_rows == 0) state_->idle_cv.notify_all();
}

MirrorPairs Mirror::drain() {
  MirrorPairs out;
  std::vector<std::shared_ptr<const void>> released;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    std::swap(out, state_->unread);
    std::swap(released, state_->released);
  }
  released.clear();  // here, on the caller's thread, after the lock
  return out;
}

bool Mirror::wait_idle(int64_t timeout_us) const {
  std::unique_lock<std::mutex> lock(state_->mu);
  auto idle = [this] { return state_->stats.in_flight_rows == 0; };
  if (timeout_us < 0) {
    state_->idle_cv.wait(lock, idle);
    return true;
  }
  return state_->idle_cv.wait_for(lock, std::chrono::microseconds(timeout_us), idle);
}

MirrorStats Mirror::stats() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->stats;
}

}  // namespace conveyor
