#include "conveyor/batcher.h"

#include "conveyor/gather.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>
#include <system_error>

#include <pthread.h>
#include <sched.h>

namespace conveyor {

namespace {

int64_t elapsed_ns(TimePoint from, TimePoint to) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

std::string dims_string(const std::vector<int64_t>& dims, bool batch_dim) {
  std::string s = "[";
  if (batch_dim) s += dims.empty() ? "-1" : "-1, ";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// FNV-1a over every non-batch dimension of every input. Equal keys are treated as
// batchable; gather_rows() re-checks the shapes, so a collision fails a batch, never memory.
uint64_t hash_dims(const std::vector<Tensor>& inputs, int first_dim) {
  uint64_t h = 1469598103934665603ull;
  for (const auto& t : inputs) {
    for (int d = first_dim; d <= t.shape.ndim(); ++d) {
      const uint64_t v = d < t.shape.ndim() ? static_cast<uint64_t>(t.shape[d]) : ~uint64_t{0};
      h = (h ^ v) * 1099511628211ull;
    }
  }
  return h;
}

BatchPolicy make_policy(const BatcherOptions& o) {
  BatchPolicy p;
  p.max_batch_size = o.max_batch_size;
  p.max_queue_delay = std::chrono::microseconds(o.max_queue_delay_us);
  p.preferred_batch_sizes = o.preferred_batch_sizes;
  std::sort(p.preferred_batch_sizes.begin(), p.preferred_batch_sizes.end());
  return p;
}

// Moves the calling thread into the idle scheduling class; false where there is none
// (not Linux) or it is refused (a seccomp policy, for one).
bool enter_idle_class() {
#if defined(__linux__)
  sched_param param{};
  param.sched_priority = 0;
  return pthread_setschedparam(pthread_self(), SCHED_IDLE, &param) == 0;
#else
  return false;
#endif
}

// The CPUs this process may run on, in order (empty where that cannot be read).
std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
    }
  }
#endif
  return cpus;
}

// Pins the calling thread to one CPU; false where it cannot (then it runs anywhere allowed).
bool pin_to_cpu(int cpu) {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
#else
  (void)cpu;
  return false;
#endif
}

// Whether a thread of this process may enter the idle class, asked once of a throwaway thread.
bool idle_class_available() {
  static const bool available = [] {
    bool ok = false;
    try {
      std::thread probe([&ok] { ok = enter_idle_class(); });
      probe.join();
    } catch (const std::system_error&) {
      return false;
    }
    return ok;
  }();
  return available;
}

// Request ids are unique in the process, so one completion queue can serve many models.
std::atomic<uint64_t> g_next_request_id{1};

}  // namespace

struct Batcher::Counters {
  explicit Counters(size_t sizes)
      : batch_count(new std::atomic<uint64_t>[sizes]()),
        input_ns(new std::atomic<uint64_t>[sizes]()),
        infer_ns(new std::atomic<uint64_t>[sizes]()),
        output_ns(new std::atomic<uint64_t>[sizes]()),
        size_slots(sizes) {}

  std::atomic<uint64_t> requests{0}, succeeded{0}, failed{0}, rejected{0}, expired{0}, cancelled{0};
  std::atomic<uint64_t> batches{0}, batched_rows{0}, in_flight{0}, undelivered{0};
  std::atomic<int64_t> last_inference_ns{0};
  std::unique_ptr<std::atomic<uint64_t>[]> batch_count, input_ns, infer_ns, output_ns;
  size_t size_slots;
  DurationHistogram queue, compute_input, compute_infer, compute_output, total;
};

class Batcher::Snapshot final : public QueueSnapshot {
 public:
  explicit Snapshot(const std::vector<std::deque<Entry>>& levels) : levels_(levels) {}
  size_t level_count() const override { return levels_.size(); }
  size_t size(size_t level) const override { return levels_[level].size(); }
  const PendingView& at(size_t level, size_t index) const override { return levels_[level][index].view; }

 private:
  const std::vector<std::deque<Entry>>& levels_;
};

Batcher::Batcher(BatcherOptions options, Executor executor, std::shared_ptr<MemoryPool> pool)
    : options_(std::move(options)),
      policy_(make_policy(options_)),
      executor_(std::move(executor)),
      pool_(pool ? std::move(pool) : MemoryPool::default_host()) {
  const std::string where = "[batcher] model '" + options_.model_name + "': ";
  if (options_.max_batch_size < 0) throw Error(ErrorCode::kInvalidInput, where + "max_batch_size must be >= 0");
  if (options_.instance_count < 1) throw Error(ErrorCode::kInvalidInput, where + "instance_count must be >= 1");
  if (options_.max_queue_size < 1) throw Error(ErrorCode::kInvalidInput, where + "max_queue_size must be >= 1");
  if (options_.priority_levels < 0 || options_.default_priority_level < 0 ||
      options_.default_priority_level > options_.priority_levels) {
    throw Error(ErrorCode::kInvalidInput, where + "default_priority_level must be in [0, priority_levels]");
  }
  for (int64_t size : options_.preferred_batch_sizes) {
    if (size < 1 || size > options_.max_batch_size) {
      throw Error(ErrorCode::kInvalidInput,
                  where + "preferred batch size " + std::to_string(size) + " is outside [1, max_batch_size]");
    }
  }
  if (!executor_) throw Error(ErrorCode::kInvalidInput, where + "no executor given");
  levels_.resize(std::max(1, options_.priority_levels));
  counters_ = std::make_unique<Counters>(static_cast<size_t>(std::max<int64_t>(options_.max_batch_size, 1)) + 1);
  if (options_.pin_instances) instance_cpus_ = allowed_cpus();
  instance_busy_.assign(static_cast<size_t>(options_.instance_count), 0);
  handoff_.resize(static_cast<size_t>(options_.instance_count));
  for (int i = 0; i < options_.instance_count; ++i) {
    instances_.emplace_back([this, i] { instance_loop(i, 0); });
  }
  deadline_thread_ = std::thread([this] { deadline_loop(); });
}

Batcher::~Batcher() { stop(true); }

int Batcher::resolve_level(int priority) const {
  const int levels = std::max(options_.priority_levels, 1);
  if (priority == 0) {
    return (options_.default_priority_level == 0 ? levels : options_.default_priority_level) - 1;
  }
  if (priority < 0 || priority > levels) {
    throw Error(ErrorCode::kInvalidInput,
                "[batcher] model '" + options_.model_name + "': priority " + std::to_string(priority) +
                    " is outside [1, " + std::to_string(levels) + "] (1 is the highest; 0 takes the default)");
  }
  return priority - 1;
}

void Batcher::validate(const std::vector<Tensor>& inputs, int64_t* rows, uint64_t* shape_key) const {
  const std::string where = "[batcher] model '" + options_.model_name + "': ";
  if (inputs.size() != options_.inputs.size()) {
    throw Error(ErrorCode::kInvalidInput, where + "expected " + std::to_string(options_.inputs.size()) +
                                              " inputs, got " + std::to_string(inputs.size()));
  }
  const bool batching = options_.max_batch_size > 0;
  const int first_dim = batching ? 1 : 0;
  *rows = 1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    const TensorSpec& spec = options_.inputs[i];
    if (t.dtype != spec.dtype) {
      throw Error(ErrorCode::kInvalidInput, where + "input '" + spec.name + "' expected datatype " +
                                                dtype_name(spec.dtype) + ", got " + dtype_name(t.dtype));
    }
    bool ok = t.shape.ndim() == static_cast<int>(spec.dims.size()) + first_dim;
    for (size_t d = 0; ok && d < spec.dims.size(); ++d) {
      const int64_t got = t.shape[static_cast<int>(d) + first_dim];
      ok = got >= 0 && (spec.dims[d] < 0 || spec.dims[d] == got);
    }
    if (!ok) {
      throw Error(ErrorCode::kInvalidInput,
                  where + "input '" + spec.name + "' expected shape " + dims_string(spec.dims, batching) +
                      (batching ? " (batch dimension first)" : "") + ", got " + t.shape.to_string());
    }
    if (batching) {
      const int64_t n = t.shape[0];
      if (i == 0) *rows = n;
      if (n != *rows) {
        throw Error(ErrorCode::kInvalidInput, where + "inputs disagree on the batch dimension: '" +
                                                  options_.inputs[0].name + "' has " + std::to_string(*rows) +
                                                  " rows, '" + spec.name + "' has " + std::to_string(n));
      }
    }
  }
  if (batching && (*rows < 1 || *rows > options_.max_batch_size)) {
    throw Error(ErrorCode::kInvalidInput, where + "batch of " + std::to_string(*rows) +
                                              " rows is outside [1, max_batch_size=" +
                                              std::to_string(options_.max_batch_size) + "]");
  }
  *shape_key = hash_dims(inputs, first_dim);
}

Batcher::Entry Batcher::prepare(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority,
                               int64_t timeout_us, uint64_t mirror_tag, bool inputs_lent, int* level) {
  if (!sink) {
    throw Error(ErrorCode::kInvalidInput, "[batcher] model '" + options_.model_name + "': submit needs a completion sink");
  }
  int64_t rows = 1;
  uint64_t shape_key = 0;
  validate(inputs, &rows, &shape_key);
  *level = resolve_level(priority);
  const int64_t timeout = timeout_us < 0 ? options_.default_timeout_us : timeout_us;
  const TimePoint now = Clock::now();
  Entry entry;
  entry.view.rows = rows;
  entry.view.shape_key = shape_key;
  entry.view.enqueue_time = now;
  entry.view.deadline = timeout > 0 ? now + std::chrono::microseconds(timeout) : kNoDeadline;
  entry.request.inputs = std::move(inputs);
  entry.request.rows = rows;
  entry.request.enqueue_time = now;
  entry.request.deadline = entry.view.deadline;
  entry.request.sink = std::move(sink);
  entry.request.mirror_tag = mirror_tag;
  entry.request.inputs_lent = inputs_lent;
  return entry;
}

void Batcher::enqueue(std::vector<Entry>& entries, const std::vector<int>& levels, std::vector<uint64_t>* ids,
                      bool count_refusal) {
  const size_t n = entries.size();
  bool earlier_deadline = false;
  bool wake = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_) {
      if (count_refusal) counters_->rejected.fetch_add(n, std::memory_order_relaxed);
      throw Error(ErrorCode::kUnavailable, "[batcher] model '" + options_.model_name +
                                               "' is stopping and accepts no new requests");
    }
    if (queued_ + n > options_.max_queue_size) {
      if (count_refusal) counters_->rejected.fetch_add(n, std::memory_order_relaxed);
      throw Error(ErrorCode::kQueueFull,
                  "[batcher] model '" + options_.model_name + "': queue full (" + std::to_string(queued_) +
                      " requests queued, max_queue_size " + std::to_string(options_.max_queue_size) +
                      "); retry later or raise dynamic_batching.max_queue_size");
    }
    for (size_t i = 0; i < n; ++i) {
      Entry& entry = entries[i];
      const uint64_t id = entry.request.id != 0 ? entry.request.id : reserve_request_id();
      if (ids != nullptr) ids->push_back(id);
      entry.request.id = id;
      if (entry.view.deadline != kNoDeadline) {
        earlier_deadline = earlier_deadline || deadlines_.empty() || entry.view.deadline < deadlines_.begin()->first;
        entry.request.deadline_it = deadlines_.emplace(entry.view.deadline, id);
        entry.request.has_deadline = true;
      }
      levels_[levels[i]].push_back(std::move(entry));
    }
    // Gathering (background mode): a waiting instance already wakes when the oldest
    // request's gather time is over; it is woken sooner only to start that wait (the queue
    // was empty), for a full batch, or for a deadline that comes before it.
    wake = !background_ || options_.max_batch_size <= 0 || queued_ == 0 || earlier_deadline ||
           queued_ + n >= static_cast<size_t>(options_.max_batch_size);
    queued_ += n;
    counters_->requests.fetch_add(n, std::memory_order_relaxed);
    counters_->in_flight.fetch_add(n, std::memory_order_relaxed);
  }
  if (wake) {
    if (n > 1) {
      work_cv_.notify_all();
    } else {
      work_cv_.notify_one();
    }
  }
  if (earlier_deadline) deadline_cv_.notify_one();
}

uint64_t Batcher::reserve_request_id() noexcept {
  return g_next_request_id.fetch_add(1, std::memory_order_relaxed);
}

uint64_t Batcher::submit(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority,
                         int64_t timeout_us, uint64_t mirror_tag, bool inputs_lent) {
  std::vector<Entry> entries(1);
  std::vector<int> levels(1);
  try {
    entries[0] = prepare(std::move(inputs), std::move(sink), priority, timeout_us, mirror_tag, inputs_lent, &levels[0]);
  } catch (const Error&) {
    counters_->rejected.fetch_add(1, std::memory_order_relaxed);
    throw;
  }
  std::vector<uint64_t> ids;
  ids.reserve(1);
  enqueue(entries, levels, &ids);
  return ids[0];
}

void Batcher::submit_group(std::vector<Submission> group) {
  if (group.empty()) return;
  std::vector<Entry> entries;
  std::vector<int> levels(group.size());
  try {
    entries.reserve(group.size());
    for (size_t i = 0; i < group.size(); ++i) {
      entries.push_back(prepare(std::move(group[i].inputs), std::move(group[i].sink), 0, -1, 0, false, &levels[i]));
    }
  } catch (const Error&) {
    counters_->rejected.fetch_add(group.size(), std::memory_order_relaxed);
    throw;
  }
  enqueue(entries, levels, nullptr);
}

std::vector<Batcher::Outcome> Batcher::submit_each(std::vector<Queued> requests) {
  std::vector<Outcome> outcomes(requests.size());
  std::vector<Entry> entries;
  std::vector<int> levels;
  std::vector<size_t> positions;  // entries[k] is requests[positions[k]]
  entries.reserve(requests.size());
  levels.reserve(requests.size());
  positions.reserve(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    Queued& q = requests[i];
    int level = 0;
    try {
      entries.push_back(
          prepare(std::move(q.inputs), std::move(q.sink), q.priority, q.timeout_us, q.mirror_tag, q.inputs_lent, &level));
      entries.back().request.id = q.id;
    } catch (const Error& e) {
      counters_->rejected.fetch_add(1, std::memory_order_relaxed);
      outcomes[i] = {0, e.code(), e.what()};
      continue;
    }
    levels.push_back(level);
    positions.push_back(i);
  }
  if (entries.empty()) return outcomes;
  std::vector<uint64_t> ids;
  ids.reserve(entries.size());
  try {
    enqueue(entries, levels, &ids, /*count_refusal=*/false);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kQueueFull || entries.size() == 1) {
      counters_->rejected.fetch_add(entries.size(), std::memory_order_relaxed);
      for (size_t i : positions) outcomes[i] = {0, e.code(), e.what()};
      return outcomes;
    }
    // Room for only some: one at a time, in order, until the queue is full.
    for (size_t k = 0; k < entries.size(); ++k) {
      std::vector<Entry> one(1);
      one[0] = std::move(entries[k]);
      std::vector<int> level{levels[k]};
      try {
        enqueue(one, level, &ids);
        outcomes[positions[k]].id = ids.back();
      } catch (const Error& each) {
        outcomes[positions[k]] = {0, each.code(), each.what()};
      }
    }
    return outcomes;
  }
  for (size_t k = 0; k < positions.size(); ++k) outcomes[positions[k]].id = ids[k];
  return outcomes;
}

size_t Batcher::round_flush_size() const noexcept {
  return static_cast<size_t>(std::max<int64_t>(1, options_.max_batch_size / 2));
}

std::vector<Batcher::Outcome> submit_round(std::vector<std::pair<Batcher*, Batcher::Queued>> round) {
  std::vector<Batcher::Outcome> outcomes(round.size());
  std::vector<char> taken(round.size(), 0);
  for (size_t first = 0; first < round.size(); ++first) {
    if (taken[first]) continue;
    Batcher* batcher = round[first].first;
    std::vector<size_t> positions;  // the round's requests for this batcher, in order
    std::vector<Batcher::Queued> group;
    for (size_t i = first; i < round.size(); ++i) {
      if (taken[i] || round[i].first != batcher) continue;
      taken[i] = 1;
      positions.push_back(i);
      group.push_back(std::move(round[i].second));
    }
    std::vector<Batcher::Outcome> answered = batcher->submit_each(std::move(group));
    for (size_t k = 0; k < positions.size(); ++k) outcomes[positions[k]] = std::move(answered[k]);
  }
  return outcomes;
}

Completion Batcher::infer(std::vector<Tensor> inputs, int priority, int64_t timeout_us) {
  auto waiter = std::make_shared<CompletionWaiter>();
  submit(std::move(inputs), waiter, priority, timeout_us);
  return waiter->wait();
}

std::pair<std::vector<Batcher::Request>, std::vector<Batcher::Request>> Batcher::take(
    const std::vector<QueuePos>& first, const std::vector<QueuePos>& second) {
  std::pair<std::vector<Request>, std::vector<Request>> out;
  std::vector<std::vector<uint32_t>> marked(levels_.size());
  auto extract = [&](const std::vector<QueuePos>& positions, std::vector<Request>& into) {
    into.reserve(positions.size());
    for (const QueuePos& p : positions) {
      Request& r = levels_[p.level][p.index].request;
      if (r.has_deadline) deadlines_.erase(r.deadline_it);
      into.push_back(std::move(r));
      marked[p.level].push_back(p.index);
    }
  };
  extract(first, out.first);
  extract(second, out.second);
  for (size_t level = 0; level < marked.size(); ++level) {
    auto& idx = marked[level];
    if (idx.empty()) continue;
    std::sort(idx.begin(), idx.end());
    auto& queue = levels_[level];
    if (idx.back() + 1 == idx.size()) {  // a prefix: the common case
      queue.erase(queue.begin(), queue.begin() + static_cast<std::ptrdiff_t>(idx.size()));
    } else {
      std::deque<Entry> kept;
      for (uint32_t i = 0, m = 0; i < queue.size(); ++i) {
        if (m < idx.size() && idx[m] == i) {
          ++m;
        } else {
          kept.push_back(std::move(queue[i]));
        }
      }
      queue.swap(kept);
    }
    queued_ -= idx.size();
  }
  return out;
}

std::vector<Batcher::Request> Batcher::take_expired(TimePoint now) {
  std::vector<QueuePos> expired;
  for (size_t level = 0; level < levels_.size(); ++level) {
    for (size_t i = 0; i < levels_[level].size(); ++i) {
      if (levels_[level][i].view.deadline <= now) {
        expired.push_back({static_cast<uint32_t>(level), static_cast<uint32_t>(i)});
      }
    }
  }
  return take(expired, {}).first;
}

bool Batcher::take_instance(std::unique_lock<std::mutex>& lock, int instance, uint64_t generation) {
  const size_t i = static_cast<size_t>(instance);
  // Superseded before it took over (left and entered background mode again), or abandoned:
  // it never serves, and the thread that does serve joins it.
  const auto never = [&] { return generation == abandoned_generation_ || generation < generation_; };
  handoff_cv_.wait(lock, [&] { return never() || (generation == generation_ && !instance_busy_[i]); });
  if (never()) return false;
  instance_busy_[i] = 1;
  std::vector<std::thread> previous = std::move(handoff_[i]);
  handoff_[i].clear();
  if (!previous.empty()) {  // each has left its loop, or is about to: only their return is left
    lock.unlock();
    for (auto& t : previous) t.join();
    lock.lock();
  }
  return true;
}

void Batcher::release_instance(int instance) {
  instance_busy_[static_cast<size_t>(instance)] = 0;
  handoff_cv_.notify_all();
}

void Batcher::instance_loop(int instance, uint64_t generation) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!take_instance(lock, instance, generation)) return;
  if (!instance_cpus_.empty()) {  // refused (the CPU left the process's set meanwhile): runs unpinned
    pin_to_cpu(instance_cpus_[static_cast<size_t>(instance) % instance_cpus_.size()]);
  }
  bool tried_idle = false;  // this thread has asked for the idle scheduling class
  for (;;) {
    if (generation != generation_ || (!accepting_ && queued_ == 0)) {
      release_instance(instance);
      return;
    }
    if (background_ && !tried_idle) {
      tried_idle = true;
      enter_idle_class();  // refused (no idle class here): the thread keeps its priority
    }
    const TimePoint now = Clock::now();
    BatchPolicy policy = policy_;
    if (background_) {
      policy.max_queue_delay = std::max<std::chrono::nanoseconds>(
          policy.max_queue_delay, std::chrono::microseconds(options_.background_gather_us));
    }
    if (draining_) policy.max_queue_delay = std::chrono::nanoseconds(0);
    BatchDecision decision = decide_batch(Snapshot(levels_), now, policy);
    if (decision.kind != BatchDecision::Kind::kDispatch && decision.expired.empty()) {
      if (decision.kind == BatchDecision::Kind::kWait) {
        work_cv_.wait_until(lock, decision.wake_at);
      } else {
        work_cv_.wait(lock);
      }
      continue;
    }
    auto [batch, expired] = take(decision.selected, decision.expired);
    const bool more = queued_ > 0;
    lock.unlock();
    if (more) work_cv_.notify_one();  // another free instance may take the rest
    if (!expired.empty()) expire(std::move(expired));
    if (!batch.empty()) run_batch(instance, std::move(batch), decision.rows);
    lock.lock();
  }
}

bool Batcher::set_background(bool background) {
  std::unique_lock<std::mutex> lock(mu_);
  if (background == background_ || !accepting_) return idle_class_available();
  if (background) {
    background_ = true;
    lock.unlock();
    work_cv_.notify_all();  // waiting threads switch before their next batch
    return idle_class_available();
  }
  // New threads at the caller's priority, one per instance, each waiting for its instance.
  const uint64_t next = ++last_generation_;
  std::vector<std::thread> fresh;
  try {
    for (int i = 0; i < options_.instance_count; ++i) {
      fresh.emplace_back([this, i, next] { instance_loop(i, next); });
    }
  } catch (const std::system_error& e) {
    abandoned_generation_ = next;  // the threads started so far leave without serving
    lock.unlock();
    handoff_cv_.notify_all();
    for (auto& t : fresh) t.join();
    throw Error(ErrorCode::kInternal, "[batcher] model '" + options_.model_name +
                                          "': could not start threads to leave background mode (" + e.what() +
                                          "); the instances keep running in the idle scheduling class");
  }
  generation_ = next;
  background_ = false;
  for (size_t i = 0; i < fresh.size(); ++i) {
    handoff_[i].push_back(std::move(instances_[i]));
    instances_[i] = std::move(fresh[i]);
  }
  lock.unlock();
  work_cv_.notify_all();     // the replaced threads leave after their batch
  handoff_cv_.notify_all();  // replacements superseded before they took over leave now
  return idle_class_available();
}

void Batcher::deadline_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopped_) {
    if (deadlines_.empty()) {
      deadline_cv_.wait(lock);
      continue;
    }
    const TimePoint now = Clock::now();
    // A copy: wait_until reads the time again after waking, when a batch may have erased
    // the entry (a reference to its key would then be a read of freed memory).
    const TimePoint earliest = deadlines_.begin()->first;
    if (earliest > now) {
      deadline_cv_.wait_until(lock, earliest);
      continue;
    }
    std::vector<Request> expired = take_expired(now);
    lock.unlock();
    expire(std::move(expired));
    lock.lock();
  }
}

namespace {

// Whether a lent input may serve as the batch's input where it lies: memory of the device
// the batch's inputs live on, aligned for its datatype (as numpy and the kernels take it),
// with an owner (the batch's inputs must keep their memory alive, as a Python model's
// arrays do).
bool runs_in_place(const Tensor& t, Device device) {
  const size_t size = dtype_size(t.dtype);
  return t.device == device && t.data != nullptr && t.owner != nullptr && size > 0 &&
         reinterpret_cast<uintptr_t>(t.data) % size == 0;
}

}  // namespace

std::vector<Tensor> Batcher::gather(const std::vector<Request>& batch) {
  std::vector<Tensor> out;
  out.reserve(options_.inputs.size());
  std::vector<const Tensor*> parts(batch.size());
  // A request alone in its batch whose submitter lent its inputs runs on them in place.
  const bool lent = batch.size() == 1 && batch.front().inputs_lent;
  for (size_t i = 0; i < options_.inputs.size(); ++i) {
    for (size_t r = 0; r < batch.size(); ++r) parts[r] = &batch[r].inputs[i];
    if (lent && runs_in_place(*parts[0], pool_->device())) {
      out.push_back(*parts[0]);  // shares the request's owner
    } else if (options_.max_batch_size > 0) {
      out.push_back(gather_rows(parts, *pool_));
    } else {  // one request, no batch dimension: a pooled copy of the whole tensor
      Tensor t = make_pooled_tensor(pool_, parts[0]->dtype, parts[0]->shape);
      if (t.nbytes()) std::memcpy(t.data, parts[0]->data, t.nbytes());
      out.push_back(std::move(t));
    }
  }
  return out;
}

std::vector<Tensor> Batcher::execute(int instance, const std::vector<Tensor>& inputs, int64_t rows) {
  std::vector<Tensor> outputs = executor_(Batch{inputs, rows, instance});
  auto where = [this] { return "model '" + options_.model_name + "' "; };  // built only for an error
  if (outputs.size() != options_.outputs.size()) {
    throw Error(ErrorCode::kModelExecution, where() + "returned " + std::to_string(outputs.size()) +
                                                " outputs, expected " + std::to_string(options_.outputs.size()));
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    const TensorSpec& spec = options_.outputs[i];
    const Tensor& t = outputs[i];
    if (t.dtype != spec.dtype) {
      throw Error(ErrorCode::kModelExecution, where() + "returned output '" + spec.name + "' as " +
                                                  dtype_name(t.dtype) + ", expected " + dtype_name(spec.dtype));
    }
    if (options_.max_batch_size > 0 && (t.shape.ndim() < 1 || t.shape[0] != rows)) {
      throw Error(ErrorCode::kModelExecution,
                  where() + "returned output '" + spec.name + "' of shape " + t.shape.to_string() +
                      " for a batch of " + std::to_string(rows) + " rows: the first dimension must be the batch");
    }
  }
  return outputs;
}

void Batcher::run_batch(int instance, std::vector<Request> batch, int64_t rows) {
  const TimePoint t0 = Clock::now();
  std::vector<Tensor> inputs, outputs;
  TimePoint t1 = t0;
  try {
    inputs = gather(batch);
    t1 = Clock::now();
    outputs = execute(instance, inputs, rows);
  } catch (const Error& e) {
    fail(std::move(batch), e.code() == ErrorCode::kOk ? ErrorCode::kModelExecution : e.code(), e.what());
    return;
  } catch (const std::exception& e) {
    fail(std::move(batch), ErrorCode::kModelExecution, "model '" + options_.model_name + "' failed: " + e.what());
    return;
  }
  const TimePoint t2 = Clock::now();

  const bool batching = options_.max_batch_size > 0;
  std::vector<std::pair<std::shared_ptr<CompletionSink>, Completion>> done;
  try {
    auto shared = std::make_shared<BatchOutputs>();
    shared->tensors = std::move(outputs);
    shared->rows = batching ? rows : 0;
    done.reserve(batch.size());
    int64_t offset = 0;
    for (Request& r : batch) {
      Completion completion;
      completion.request_id = r.id;
      completion.outputs = shared;
      completion.queued_ns = elapsed_ns(r.enqueue_time, t0);
      completion.row_offset = offset;
      completion.rows = batching ? r.rows : -1;
      offset += r.rows;
      done.emplace_back(r.sink, std::move(completion));
    }
  } catch (const std::exception& e) {
    // No memory to complete the batch: its requests fail, the instance goes on. Their
    // inputs are untouched (only moved below, once nothing can throw).
    done.clear();
    fail(std::move(batch), ErrorCode::kOutOfMemory,
         "[batcher] model '" + options_.model_name + "': could not complete the batch: " + e.what());
    return;
  }
  // Shadow copies are described now (the requests still hold their inputs) and offered
  // once the champion's requests are completed: waking the challenger must not delay them.
  const std::shared_ptr<const BatchOutputs> batch_outputs = done.front().second.outputs;
  MirrorOffer copies = reserve_copies(batch, batch_outputs, t0, t2);
  if (copies.reserved == 0) inputs.clear();  // hand the pooled batch inputs back before completing
  for (size_t i = 0; i < batch.size(); ++i) done[i].second.request_inputs = std::move(batch[i].inputs);
  Counters& c = *counters_;
  for (const Request& r : batch) c.queue.record(static_cast<uint64_t>(elapsed_ns(r.enqueue_time, t0)));
  const TimePoint t3 = Clock::now();
  const uint64_t n = batch.size();
  const size_t slot = static_cast<size_t>(std::min<int64_t>(batching ? rows : 1, c.size_slots - 1));
  c.batch_count[slot].fetch_add(1, std::memory_order_relaxed);
  c.input_ns[slot].fetch_add(elapsed_ns(t0, t1), std::memory_order_relaxed);
  c.infer_ns[slot].fetch_add(elapsed_ns(t1, t2), std::memory_order_relaxed);
  c.output_ns[slot].fetch_add(elapsed_ns(t2, t3), std::memory_order_relaxed);
  c.compute_input.record(elapsed_ns(t0, t1), n);
  c.compute_infer.record(elapsed_ns(t1, t2), n);
  c.compute_output.record(elapsed_ns(t2, t3), n);
  for (const Request& r : batch) c.total.record(static_cast<uint64_t>(elapsed_ns(r.enqueue_time, t3)));
  c.batches.fetch_add(1, std::memory_order_relaxed);
  c.batched_rows.fetch_add(static_cast<uint64_t>(batching ? rows : 1), std::memory_order_relaxed);
  c.succeeded.fetch_add(n, std::memory_order_relaxed);
  c.in_flight.fetch_sub(n, std::memory_order_relaxed);
  c.last_inference_ns.store(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count(),
      std::memory_order_relaxed);
  batch.clear();
  deliver_grouped(std::move(done));
  if (copies.reserved > 0) {
    copies.mirror->submit(copies.reserved, inputs, batching ? rows : 0, batch_outputs, copies.requests,
                          std::move(copies.keep_alive));
  }
}

void Batcher::set_mirror(std::shared_ptr<Mirror> mirror) {
  if (mirror && mirror->challenger().get() == this) {
    throw Error(ErrorCode::kInvalidInput, "[batcher] model '" + options_.model_name + "': a batcher cannot mirror to itself");
  }
  std::shared_ptr<Mirror> old;
  {
    std::lock_guard<std::mutex> lock(mirror_mu_);
    old = std::move(mirror_);
    mirror_ = std::move(mirror);
  }
}

Batcher::MirrorOffer Batcher::reserve_copies(const std::vector<Request>& batch,
                                             const std::shared_ptr<const BatchOutputs>& outputs, TimePoint started,
                                             TimePoint ready) noexcept {
  MirrorOffer offer;
  bool tagged = false;
  for (const Request& r : batch) tagged = tagged || r.mirror_tag != 0;
  if (!tagged) return offer;
  {
    std::lock_guard<std::mutex> lock(mirror_mu_);
    offer.mirror = mirror_;
  }
  if (!offer.mirror) return offer;
  const bool batching = options_.max_batch_size > 0;
  try {
    int64_t offset = 0;
    for (const Request& r : batch) {
      if (r.mirror_tag != 0) {
        offer.requests.push_back({batching ? offset : 0, batching ? r.rows : 1, r.mirror_tag,
                                  elapsed_ns(r.enqueue_time, started), elapsed_ns(r.enqueue_time, ready)});
        // BYTES rows point at objects the request's own inputs own.
        for (const Tensor& t : r.inputs) {
          if (t.dtype == DType::kBytes) offer.keep_alive.push_back(t);
        }
      }
      offset += r.rows;
    }
  } catch (const std::exception&) {
    return MirrorOffer{};  // no memory to describe the copies: the shadow loses them, the champion goes on
  }
  offer.reserved = offer.mirror->reserve(outputs, offer.requests);
  return offer;
}

void Batcher::fail(std::vector<Request> requests, ErrorCode code, const std::string& message) noexcept {
  if (requests.empty()) return;
  Counters& c = *counters_;
  auto count = [&](uint64_t n) {
    switch (code) {
      case ErrorCode::kDeadlineExceeded: c.expired.fetch_add(n, std::memory_order_relaxed); break;
      case ErrorCode::kCancelled: c.cancelled.fetch_add(n, std::memory_order_relaxed); break;
      default: c.failed.fetch_add(n, std::memory_order_relaxed); break;
    }
    c.in_flight.fetch_sub(n, std::memory_order_relaxed);
  };
  std::vector<std::pair<std::shared_ptr<CompletionSink>, Completion>> done;
  try {
    done.reserve(requests.size());
  } catch (const std::bad_alloc&) {
    // No room to list them together: one delivery per request, as memory allows.
    for (Request& r : requests) {
      std::vector<Request> one;
      try {
        one.reserve(1);
      } catch (const std::bad_alloc&) {
        count(1);
        c.undelivered.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      one.push_back(std::move(r));
      fail(std::move(one), code, message);
    }
    return;
  }
  count(requests.size());
  for (Request& r : requests) {  // nothing here allocates: room was reserved
    Completion completion;
    completion.request_id = r.id;
    completion.code = code;
    completion.request_inputs = std::move(r.inputs);
    done.emplace_back(std::move(r.sink), std::move(completion));
  }
  requests.clear();
  for (auto& entry : done) {
    try {
      entry.second.message = message;
    } catch (const std::bad_alloc&) {
      entry.second.message = "out of memory";  // fits the string's inline buffer: no allocation
    }
  }
  deliver_grouped(std::move(done));
}

void Batcher::expire(std::vector<Request> requests) noexcept {
  const TimePoint now = Clock::now();
  for (Request& r : requests) {
    const double waited_ms = static_cast<double>(elapsed_ns(r.enqueue_time, now)) / 1e6;
    const double timeout_ms = static_cast<double>(elapsed_ns(r.enqueue_time, r.deadline)) / 1e6;
    std::string message;
    try {
      char detail[160];
      std::snprintf(detail, sizeof(detail),
                    "': the request's deadline (timeout %.3f ms) passed after %.3f ms in the queue, before it could "
                    "run",
                    timeout_ms, waited_ms);
      message = "[batcher] model '" + options_.model_name + detail;
    } catch (const std::bad_alloc&) {
      message = "deadline passed";  // fits the string's inline buffer: no allocation
    }
    std::vector<Request> one;
    try {
      one.reserve(1);
    } catch (const std::bad_alloc&) {
      counters_->expired.fetch_add(1, std::memory_order_relaxed);
      counters_->in_flight.fetch_sub(1, std::memory_order_relaxed);
      counters_->undelivered.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    one.push_back(std::move(r));
    fail(std::move(one), ErrorCode::kDeadlineExceeded, message);
  }
}

void Batcher::deliver_grouped(std::vector<std::pair<std::shared_ptr<CompletionSink>, Completion>> done) noexcept {
  std::stable_sort(done.begin(), done.end(), [](const auto& a, const auto& b) {
    return std::less<CompletionSink*>()(a.first.get(), b.first.get());
  });
  for (size_t i = 0; i < done.size();) {
    CompletionSink* sink = done[i].first.get();
    const size_t first = i;
    while (i < done.size() && done[i].first.get() == sink) ++i;
    std::vector<Completion> group;
    try {
      group.reserve(i - first);
      for (size_t k = first; k < i; ++k) group.push_back(std::move(done[k].second));
      sink->deliver(std::move(group));
      continue;
    } catch (...) {
      // Out of memory (the only way a sink fails): try again with the outputs released
      // and a message that needs no allocation.
    }
    for (size_t k = first, g = 0; k < i; ++k, ++g) {
      Completion& c = g < group.size() ? group[g] : done[k].second;
      c.code = ErrorCode::kOutOfMemory;
      c.message = "out of memory";  // fits the string's inline buffer
      c.outputs.reset();
    }
    try {
      if (group.size() != i - first) {
        group.clear();
        group.reserve(i - first);
        for (size_t k = first; k < i; ++k) group.push_back(std::move(done[k].second));
      }
      sink->deliver(std::move(group));
    } catch (...) {
      counters_->undelivered.fetch_add(i - first, std::memory_order_relaxed);
      std::fprintf(stderr, "[batcher] model '%s': %zu completions lost: out of memory delivering them\n",
                   options_.model_name.c_str(), i - first);
    }
  }
}

bool Batcher::cancel(uint64_t request_id) {
  std::vector<Request> cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t level = 0; level < levels_.size() && cancelled.empty(); ++level) {
      for (size_t i = 0; i < levels_[level].size(); ++i) {
        if (levels_[level][i].request.id == request_id) {
          cancelled = take({{static_cast<uint32_t>(level), static_cast<uint32_t>(i)}}, {}).first;
          break;
        }
      }
    }
  }
  if (cancelled.empty()) return false;
  fail(std::move(cancelled), ErrorCode::kCancelled,
       "[batcher] model '" + options_.model_name + "': the request was cancelled by its caller");
  return true;
}

void Batcher::stop(bool drain) {
  std::call_once(stop_once_, [this, drain] {
    std::vector<Request> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      accepting_ = false;
      draining_ = true;
      if (!drain) {
        std::vector<QueuePos> all;
        for (size_t level = 0; level < levels_.size(); ++level) {
          for (size_t i = 0; i < levels_[level].size(); ++i) {
            all.push_back({static_cast<uint32_t>(level), static_cast<uint32_t>(i)});
          }
        }
        dropped = take(all, {}).first;
      }
    }
    work_cv_.notify_all();
    fail(std::move(dropped), ErrorCode::kUnavailable,
         "[batcher] model '" + options_.model_name + "' was stopped before the request could run");
    for (auto& t : instances_) t.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    deadline_cv_.notify_all();
    deadline_thread_.join();
  });
}

BatcherStats Batcher::stats() const {
  BatcherStats s;
  const Counters& c = *counters_;
  s.requests = c.requests.load(std::memory_order_relaxed);
  s.succeeded = c.succeeded.load(std::memory_order_relaxed);
  s.failed = c.failed.load(std::memory_order_relaxed);
  s.rejected = c.rejected.load(std::memory_order_relaxed);
  s.expired = c.expired.load(std::memory_order_relaxed);
  s.cancelled = c.cancelled.load(std::memory_order_relaxed);
  s.batches = c.batches.load(std::memory_order_relaxed);
  s.batched_rows = c.batched_rows.load(std::memory_order_relaxed);
  s.in_flight = c.in_flight.load(std::memory_order_relaxed);
  s.undelivered = c.undelivered.load(std::memory_order_relaxed);
  s.last_inference_ns = c.last_inference_ns.load(std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queue_depth = queued_;
  }
  for (size_t i = 0; i < c.size_slots; ++i) {
    s.batch_size_counts.push_back(c.batch_count[i].load(std::memory_order_relaxed));
    s.batch_input_ns.push_back(c.input_ns[i].load(std::memory_order_relaxed));
    s.batch_infer_ns.push_back(c.infer_ns[i].load(std::memory_order_relaxed));
    s.batch_output_ns.push_back(c.output_ns[i].load(std::memory_order_relaxed));
  }
  s.queue = c.queue.snapshot();
  s.compute_input = c.compute_input.snapshot();
  s.compute_infer = c.compute_infer.snapshot();
  s.compute_output = c.compute_output.snapshot();
  s.total = c.total.snapshot();
  return s;
}

}  // namespace conveyor
