// The load generator's schedule, recorder, engine and the in-process targets.
#include "conveyor/loadgen.h"

#include <sys/prctl.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <limits>
#include <thread>

#include "conveyor/router.h"

namespace conveyor::loadgen {

namespace {

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The first bytes of `text`, cut at a UTF-8 character boundary.
std::string truncated(std::string_view text) {
  if (text.size() <= kMaxErrorTextBytes) return std::string(text);
  size_t end = kMaxErrorTextBytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return std::string(text.substr(0, end)) + "...";
}

std::string seconds_text(int64_t ns) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g s", static_cast<double>(ns) / 1e9);
  return buffer;
}

// The generator thread sleeps with 1 ns of timer slack while it runs (the default 50 us
// would make every wake-up late); restored on exit, as the thread is the caller's.
class TimerSlack {
 public:
  TimerSlack() : previous_(prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) { prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); }
  ~TimerSlack() {
    if (previous_ > 0) prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(previous_), 0, 0, 0);
  }

 private:
  const int previous_;
};

// Sleeps until `spin_ns` before the due time, then spins to it: the sleep leaves the CPU to
// the target; the spin absorbs the wake-up latency of the sleep.
void wait_until_due(const Recorder& recorder, int64_t due_ns, int64_t spin_ns) {
  const int64_t wake_ns = due_ns - spin_ns;
  if (recorder.now_ns() < wake_ns) {
    // libstdc++'s steady_clock is CLOCK_MONOTONIC, so its epoch offsets are that clock's values.
    const int64_t absolute =
        std::chrono::duration_cast<std::chrono::nanoseconds>(recorder.start().time_since_epoch()).count() + wake_ns;
    timespec at{static_cast<time_t>(absolute / 1'000'000'000), static_cast<long>(absolute % 1'000'000'000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr) == EINTR) {
    }
  }
  while (recorder.now_ns() < due_ns) cpu_relax();
}

void check_samples(const Target& target) {
  if (target.sample_count() == 0) throw Error(ErrorCode::kInvalidInput, "[loadgen] the target has no sample to send");
}

// Per-query results from the recorder once the run is over, and the error counts for the
// queries that were never sent or never answered.
void collect(RunResult& result, Recorder& recorder, size_t issued, const std::string& unsent_reason,
             int64_t timeout_ns) {
  const size_t n = recorder.queries();
  result.completed_ns.assign(n, -1);
  result.ok.assign(n, 0);
  uint64_t unanswered = 0;
  int64_t last_ns = -1;
  for (size_t q = 0; q < issued; ++q) {
    if (!recorder.answered(q)) {
      ++unanswered;
      continue;
    }
    result.completed_ns[q] = recorder.completed_ns(q);
    result.ok[q] = recorder.failed(q) ? 0 : 1;
    last_ns = std::max(last_ns, result.completed_ns[q]);
  }
  result.errors = recorder.errors();
  if (unanswered) result.errors["no answer within the timeout (" + seconds_text(timeout_ns) + ")"] += unanswered;
  if (issued < n) result.errors[unsent_reason] += n - issued;
  const int64_t first_ns = n ? result.scheduled_ns[0] : 0;
  result.duration_ns = last_ns >= first_ns && n ? last_ns - first_ns : 0;
}

}  // namespace

// ---- schedule ------------------------------------------------------------------------

std::vector<int64_t> poisson_schedule(double rate_qps, int64_t count, uint64_t seed) {
  if (!(rate_qps > 0) || !std::isfinite(rate_qps)) {
    throw Error(ErrorCode::kInvalidInput,
                "[loadgen] the arrival rate must be a positive finite number of queries per second, got " +
                    std::to_string(rate_qps));
  }
  if (count < 0) {
    throw Error(ErrorCode::kInvalidInput, "[loadgen] the query count must be >= 0, got " + std::to_string(count));
  }
  std::vector<int64_t> offsets(static_cast<size_t>(count), 0);
  if (count < 2) return offsets;
  // Exponential gaps -log(u), u uniform in (0, 1] from splitmix64's 53 high bits.
  std::vector<double> cumulative(static_cast<size_t>(count), 0.0);
  uint64_t state = seed;
  for (int64_t i = 1; i < count; ++i) {
    state += router::kSplitmixIncrement;
    const double u = static_cast<double>((router::mix64(state) >> 11) + 1) * 0x1.0p-53;
    cumulative[i] = cumulative[i - 1] - std::log(u);
  }
  const double span_ns = static_cast<double>(count - 1) / rate_qps * 1e9;
  if (span_ns > static_cast<double>(std::numeric_limits<int64_t>::max() / 2)) {
    throw Error(ErrorCode::kInvalidInput, "[loadgen] the schedule of " + std::to_string(count) + " queries at " +
                                              std::to_string(rate_qps) + " queries/s spans too long a time");
  }
  const double scale = span_ns / cumulative.back();
  for (int64_t i = 1; i < count; ++i) offsets[i] = std::llround(cumulative[i] * scale);
  return offsets;
}

// ---- recorder ------------------------------------------------------------------------

Recorder::Recorder(size_t queries, int samples_per_query, Clock::time_point start)
    : start_(start),
      queries_(queries),
      samples_per_query_(samples_per_query),
      completed_(new std::atomic<int64_t>[queries]),
      remaining_(new std::atomic<int32_t>[queries]),
      failed_(new std::atomic<uint8_t>[queries]) {
  for (size_t q = 0; q < queries; ++q) {
    completed_[q].store(-1, std::memory_order_relaxed);
    remaining_[q].store(samples_per_query, std::memory_order_relaxed);
    failed_[q].store(0, std::memory_order_relaxed);
  }
}

void Recorder::complete(uint64_t query, bool ok, std::string_view error) noexcept {
  const int64_t now = now_ns();
  writers_.fetch_add(1);
  if (closed_.load() || query >= queries_) {
    writers_.fetch_sub(1);
    return;
  }
  if (!ok) {
    failed_[query].store(1);
    try {
      std::lock_guard<std::mutex> lock(errors_mu_);
      ++errors_[truncated(error.empty() ? "failed without a message" : error)];
    } catch (...) {  // out of memory: the failure still counts through failed_
    }
  }
  int64_t previous = completed_[query].load(std::memory_order_relaxed);
  while (previous < now && !completed_[query].compare_exchange_weak(previous, now)) {
  }
  if (remaining_[query].fetch_sub(1) == 1) answered_queries_.fetch_add(1);
  outstanding_.fetch_sub(1);
  writers_.fetch_sub(1);
  notify();
}

void Recorder::notify() noexcept {
  // Pairs with wait_until: it sets waiting_ before testing its predicate, we change the
  // state before reading waiting_ (all sequentially consistent), so no wake-up is lost.
  if (waiting_.load()) {
    std::lock_guard<std::mutex> lock(wait_mu_);
    wait_cv_.notify_all();
  }
}

template <class Predicate>
bool Recorder::wait_until(int64_t deadline_ns, Predicate ready) {
  if (ready()) return true;
  std::unique_lock<std::mutex> lock(wait_mu_);
  waiting_.store(true);
  bool result = true;
  while (!ready()) {
    const int64_t left = deadline_ns - now_ns();
    if (left <= 0) {
      result = ready();
      break;
    }
    wait_cv_.wait_for(lock, std::chrono::nanoseconds(left));
  }
  waiting_.store(false);
  return result;
}

bool Recorder::wait_outstanding_below(int64_t limit, int64_t deadline_ns) {
  return wait_until(deadline_ns, [&] { return outstanding_.load() < limit; });
}

bool Recorder::wait_query(uint64_t query, int64_t deadline_ns) {
  return wait_until(deadline_ns, [&] { return remaining_[query].load() <= 0; });
}

bool Recorder::wait_answered(int64_t queries, int64_t deadline_ns) {
  return wait_until(deadline_ns, [&] { return answered_queries_.load() >= queries; });
}

void Recorder::close() noexcept {
  closed_.store(true);
  while (writers_.load() != 0) std::this_thread::yield();
}

std::map<std::string, uint64_t> Recorder::errors() const {
  std::lock_guard<std::mutex> lock(errors_mu_);
  return errors_;
}

// ---- engine --------------------------------------------------------------------------

RunResult run_open_loop(Target& target, const std::vector<int64_t>& schedule_ns,
                        const std::vector<int64_t>& sample_indices, const OpenLoopOptions& options) {
  check_samples(target);
  const size_t n = schedule_ns.size();
  const auto samples = static_cast<int64_t>(target.sample_count());
  for (size_t i = 0; i < n; ++i) {
    if (schedule_ns[i] < 0 || (i && schedule_ns[i] < schedule_ns[i - 1])) {
      throw Error(ErrorCode::kInvalidInput, "[loadgen] the schedule must be ascending offsets >= 0; entry " +
                                                std::to_string(i) + " is " + std::to_string(schedule_ns[i]));
    }
  }
  if (!sample_indices.empty() && sample_indices.size() != n) {
    throw Error(ErrorCode::kInvalidInput, "[loadgen] sample_indices has " + std::to_string(sample_indices.size()) +
                                              " entries for a schedule of " + std::to_string(n) + " queries");
  }
  for (size_t i = 0; i < sample_indices.size(); ++i) {
    if (sample_indices[i] < 0 || sample_indices[i] >= samples) {
      throw Error(ErrorCode::kInvalidInput, "[loadgen] sample_indices[" + std::to_string(i) + "] = " +
                                                std::to_string(sample_indices[i]) + " is not a sample (0.." +
                                                std::to_string(samples - 1) + ")");
    }
  }
  if (options.max_outstanding < 1 || options.timeout_ns < 1 || options.spin_ns < 0) {
    throw Error(ErrorCode::kInvalidInput, "[loadgen] max_outstanding and the timeout must be >= 1, the spin >= 0");
  }
  int64_t limit = options.max_outstanding;
  if (target.capacity() > 0) limit = std::min<int64_t>(limit, static_cast<int64_t>(target.capacity()));

  RunResult result;
  result.scheduled_ns = schedule_ns;
  result.sent_ns.assign(n, -1);
  TimerSlack slack;
  auto recorder = std::make_shared<Recorder>(n, 1, Clock::now());
  size_t issued = 0;
  int64_t last_send_end = n ? schedule_ns[0] : 0;
  for (; issued < n; ++issued) {
    const int64_t due = schedule_ns[issued];
    wait_until_due(*recorder, due, options.spin_ns);
    if (recorder->outstanding() >= limit &&
        !recorder->wait_outstanding_below(limit, recorder->now_ns() + options.timeout_ns)) {
      break;
    }
    const int64_t begin = recorder->now_ns();
    result.sent_ns[issued] = begin;
    recorder->note_sent(1);
    target.send(recorder, issued, sample_indices.empty() ? issued % samples : sample_indices[issued]);
    last_send_end = recorder->now_ns();
    result.busy_ns += last_send_end - begin;
    if (begin - due > kLateSendNs) ++result.late_sends;
  }
  result.active_ns = n ? last_send_end - schedule_ns[0] : 0;
  const bool all = recorder->wait_answered(static_cast<int64_t>(issued), recorder->now_ns() + options.timeout_ns);
  recorder->close();
  if (!all) target.abandon();
  collect(result, *recorder, issued,
          "not sent: no free slot within the timeout (" + seconds_text(options.timeout_ns) + ")", options.timeout_ns);
  return result;
}

RunResult run_closed_loop(Target& target, size_t queries, int samples_per_query, int64_t timeout_ns) {
  check_samples(target);
  if (samples_per_query < 1 || timeout_ns < 1) {
    throw Error(ErrorCode::kInvalidInput, "[loadgen] samples_per_query and the timeout must be >= 1");
  }
  if (target.capacity() > 0 && static_cast<size_t>(samples_per_query) > target.capacity()) {
    throw Error(ErrorCode::kInvalidInput,
                "[loadgen] a query of " + std::to_string(samples_per_query) + " samples is sent at once, but the " +
                    "target holds " + std::to_string(target.capacity()) +
                    " requests at a time: give it at least as many connections as samples per query");
  }
  const size_t samples = target.sample_count();
  RunResult result;
  result.samples_per_query = samples_per_query;
  result.scheduled_ns.assign(queries, -1);
  result.sent_ns.assign(queries, -1);
  auto recorder = std::make_shared<Recorder>(queries, samples_per_query, Clock::now());
  size_t issued = 0;
  while (issued < queries) {
    const uint64_t q = issued++;
    // Due when the generator comes to it, right after the previous answer: its wake-up is
    // not the target's latency.
    const int64_t due = recorder->now_ns();
    result.scheduled_ns[q] = due;
    result.sent_ns[q] = due;
    recorder->note_sent(static_cast<size_t>(samples_per_query));
    for (int j = 0; j < samples_per_query; ++j) {
      target.send(recorder, q, (q * static_cast<uint64_t>(samples_per_query) + j) % samples);
    }
    result.busy_ns += recorder->now_ns() - due;
    if (!recorder->wait_query(q, recorder->now_ns() + timeout_ns)) break;
  }
  result.active_ns = queries ? recorder->now_ns() - result.scheduled_ns[0] : 0;
  const bool all = recorder->wait_answered(static_cast<int64_t>(issued), recorder->now_ns());
  recorder->close();
  if (!all) target.abandon();
  collect(result, *recorder, issued, "not sent: an earlier query was not answered within the timeout", timeout_ns);
  return result;
}

// ---- in-process targets -----------------------------------------------------------------

namespace {

// One request's sink: completes its query in the recorder. One per request, so the
// completion needs no lookup from batcher id to query (it may arrive before submit returns).
class RequestSink final : public CompletionSink {
 public:
  RequestSink(std::shared_ptr<Recorder> recorder, uint64_t query) : recorder_(std::move(recorder)), query_(query) {}
  void deliver(std::vector<Completion>&& completions) override {
    for (const Completion& c : completions) {
      if (c.code == ErrorCode::kOk) {
        recorder_->complete(query_, true, {});
      } else {
        recorder_->complete(query_, false, std::string(error_code_name(c.code)) + ": " + c.message);
      }
    }
  }

 private:
  const std::shared_ptr<Recorder> recorder_;
  const uint64_t query_;
};

}  // namespace

BatcherTarget::BatcherTarget(std::shared_ptr<Batcher> batcher, std::vector<std::vector<Tensor>> samples)
    : batcher_(std::move(batcher)), samples_(std::move(samples)) {
  if (!batcher_) throw Error(ErrorCode::kInvalidInput, "[loadgen] the in-process target needs a batcher");
  if (samples_.empty()) throw Error(ErrorCode::kInvalidInput, "[loadgen] the in-process target needs at least one sample");
}

BatcherTarget::BatcherTarget(std::shared_ptr<Graph> graph, std::vector<std::vector<Tensor>> samples)
    : graph_(std::move(graph)), samples_(std::move(samples)) {
  if (!graph_) throw Error(ErrorCode::kInvalidInput, "[loadgen] the in-process target needs a graph");
  if (samples_.empty()) throw Error(ErrorCode::kInvalidInput, "[loadgen] the in-process target needs at least one sample");
}

void BatcherTarget::send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) {
  try {
    // The copy shares each sample's owner: the batcher keeps it alive until the completion.
    auto sink = std::make_shared<RequestSink>(recorder, query);
    if (batcher_) batcher_->submit(samples_[sample], std::move(sink)); else graph_->submit(samples_[sample], std::move(sink));
  } catch (const Error& e) {
    recorder->complete(query, false, std::string(error_code_name(e.code())) + ": " + e.what());
  } catch (const std::exception& e) {
    recorder->complete(query, false, e.what());
  }
}

CallbackTarget::CallbackTarget(SendFunction send, size_t samples, size_t capacity)
    : send_(std::move(send)), samples_(samples), capacity_(capacity) {
  if (!send_) throw Error(ErrorCode::kInvalidInput, "[loadgen] the callback target needs a send function");
}

RequestTicket::~RequestTicket() { complete(false, "the client dropped the request without an answer"); }

void RequestTicket::complete(bool ok, std::string_view error) noexcept {
  if (!done_.exchange(true)) recorder_->complete(query_, ok, error);
}

void CallbackTarget::send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) {
  auto ticket = std::make_shared<RequestTicket>(recorder, query);
  try {
    send_(ticket, sample);
  } catch (const std::exception& e) {
    ticket->complete(false, e.what());
  }
}

}  // namespace conveyor::loadgen
