// The load generator: sends queries to a target on a schedule (open loop) or one after
// another (closed loop) and records, per query, when it was due, when it was sent and when
// its last answer arrived. `conveyor bench` drives it; nothing here knows about Python.
//
// Latency is counted from the time a query was DUE, not from when it was sent: a send
// delayed by a busy generator or a full target still counts its wait (no coordinated
// omission). The engine runs on the caller's thread; targets complete requests on their
// own threads (batcher instances, an HTTP receiver) through the run's Recorder.
//
// Ownership: a run's Recorder is shared by the engine and every request in flight, so a
// completion that arrives after its run ended (a timed-out request) writes into a closed
// recorder, never into freed memory. Targets outlive the runs that use them.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/graph.h"

namespace conveyor::loadgen {

using Clock = std::chrono::steady_clock;

inline constexpr int64_t kLateSendNs = 100'000;       // a send this far past its due time is late
inline constexpr size_t kMaxErrorTextBytes = 200;    // error texts are truncated to this for grouping

// `count` arrival offsets in ns from the run start for Poisson arrivals at `rate_qps`:
// ascending, the first at 0, exponential gaps from a seeded splitmix64 generator (the same
// numbers on every machine). The gaps are rescaled so that the schedule spans exactly
// (count - 1) / rate_qps seconds: a Poisson process conditioned on its count, so the offered
// rate of a run is the target itself, not the target +- 1/sqrt(count).
// Throws Error(kInvalidInput) for a rate that is not positive and finite or a negative count.
std::vector<int64_t> poisson_schedule(double rate_qps, int64_t count, uint64_t seed);

// Completions of one run, from any thread. The engine owns the per-query arrays; targets
// only call complete() (and the engine's own bookkeeping goes through note_sent()).
class Recorder {
 public:
  Recorder(size_t queries, int samples_per_query, Clock::time_point start);

  // One answered (or failed) request of `query`. Thread-safe, never blocks for long, never
  // throws; ignored once the run is closed. `error` is empty when ok.
  void complete(uint64_t query, bool ok, std::string_view error) noexcept;

  int64_t now_ns() const noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start_).count();
  }
  Clock::time_point start() const noexcept { return start_; }
  size_t queries() const noexcept { return queries_; }
  int samples_per_query() const noexcept { return samples_per_query_; }

  // Engine side (one thread). A request is outstanding from note_sent() to its complete().
  void note_sent(size_t requests) noexcept { outstanding_.fetch_add(static_cast<int64_t>(requests)); }
  int64_t outstanding() const noexcept { return outstanding_.load(); }
  // Blocks until fewer than `limit` requests are outstanding; false at `deadline_ns`.
  bool wait_outstanding_below(int64_t limit, int64_t deadline_ns);
  // Blocks until every request of `query` is answered; false at `deadline_ns`.
  bool wait_query(uint64_t query, int64_t deadline_ns);
  // Blocks until `queries` queries are fully answered; false at `deadline_ns`.
  bool wait_answered(int64_t queries, int64_t deadline_ns);
  // Stops taking completions; returns once no complete() call is still writing.
  void close() noexcept;

  // Read after close().
  bool answered(uint64_t query) const noexcept { return remaining_[query].load() <= 0; }
  bool failed(uint64_t query) const noexcept { return failed_[query].load() != 0; }
  int64_t completed_ns(uint64_t query) const noexcept { return completed_[query].load(); }
  std::map<std::string, uint64_t> errors() const;

 private:
  // Wakes the engine when it waits (the flag keeps the common path free of locks).
  void notify() noexcept;
  template <class Predicate>
  bool wait_until(int64_t deadline_ns, Predicate ready);

  const Clock::time_point start_;
  const size_t queries_;
  const int samples_per_query_;
  std::unique_ptr<std::atomic<int64_t>[]> completed_;  // latest answer per query, ns; -1 none
  std::unique_ptr<std::atomic<int32_t>[]> remaining_;  // requests of the query not answered yet
  std::unique_ptr<std::atomic<uint8_t>[]> failed_;     // 1: some request of the query failed
  std::atomic<int64_t> outstanding_{0};
  std::atomic<int64_t> answered_queries_{0};
  std::atomic<bool> closed_{false};
  std::atomic<int> writers_{0};  // complete() calls between their closed check and their last write
  std::atomic<bool> waiting_{false};
  std::mutex wait_mu_;
  std::condition_variable wait_cv_;
  mutable std::mutex errors_mu_;
  std::map<std::string, uint64_t> errors_;  // guarded by errors_mu_
};

// Where requests go. send() must not block for long and must lead to exactly one
// recorder->complete(query, ...) per call, on any thread (possibly before it returns),
// also when sending fails.
class Target {
 public:
  virtual ~Target() = default;
  virtual void send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) = 0;
  virtual size_t sample_count() const noexcept = 0;
  // Requests the target can hold at once (HTTP: its connections); 0 = no bound of its own.
  virtual size_t capacity() const noexcept { return 0; }
  // Called after a run that ended with requests unanswered: give them up so the next run
  // starts with the target's full capacity.
  virtual void abandon() noexcept {}
};

struct OpenLoopOptions {
  int64_t max_outstanding = 65536;      // at most this many requests in flight; more wait
  int64_t timeout_ns = 60'000'000'000;  // the wait for a free slot, and for answers after the last send
  // Sleep until this long before a due time, then spin. The sleep wakes 5-10 us late (1 ns of
  // timer slack); 10 us of spin puts the median send on time at a fraction of the CPU of more.
  int64_t spin_ns = 10'000;
};

struct RunResult {
  std::vector<int64_t> scheduled_ns, sent_ns, completed_ns;  // per query; -1: never sent / answered
  std::vector<uint8_t> ok;
  int samples_per_query = 1;
  int64_t duration_ns = 0;   // first due time to last answer
  int64_t busy_ns = 0;       // the generator thread's own work (sending, bookkeeping)
  int64_t active_ns = 0;     // the generator thread's time from the first due time to its last send
  uint64_t late_sends = 0;   // sends more than kLateSendNs after their due time
  std::map<std::string, uint64_t> errors;  // error text -> requests (or queries never sent/answered)

  double generator_overhead() const noexcept {
    return active_ns > 0 ? static_cast<double>(busy_ns) / static_cast<double>(active_ns) : 0.0;
  }
};

// Sends query i (sample `sample_indices[i]`, or i % sample_count when empty) at
// schedule_ns[i] after the start. `schedule_ns` must be ascending and non-negative.
RunResult run_open_loop(Target& target, const std::vector<int64_t>& schedule_ns,
                        const std::vector<int64_t>& sample_indices, const OpenLoopOptions& options);

// `queries` queries one after another, each of `samples_per_query` requests sent together
// (sample (q * samples_per_query + j) % sample_count); the next is issued once every request
// of the previous one is answered. A query unanswered after `timeout_ns` ends the run: it and
// the queries never issued are recorded as not answered.
RunResult run_closed_loop(Target& target, size_t queries, int samples_per_query, int64_t timeout_ns);

// Submits straight to a model version's batcher, or to a model graph. Each sample is the
// request's inputs in the model's input order; their owners keep the memory alive (and are
// only copied per request).
class BatcherTarget final : public Target {
 public:
  // Throws Error(kInvalidInput) when there is no sample.
  BatcherTarget(std::shared_ptr<Batcher> batcher, std::vector<std::vector<Tensor>> samples);
  BatcherTarget(std::shared_ptr<Graph> graph, std::vector<std::vector<Tensor>> samples);
  void send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) override;
  size_t sample_count() const noexcept override { return samples_.size(); }
  // The queue bound (a graph's: its requests in flight): a full queue would reject, so the
  // generator waits instead.
  size_t capacity() const noexcept override {
    return batcher_ ? batcher_->options().max_queue_size : graph_->options().max_in_flight;
  }

 private:
  const std::shared_ptr<Batcher> batcher_;
  const std::shared_ptr<Graph> graph_;
  const std::vector<std::vector<Tensor>> samples_;
};

// One request's completion as a value, for clients that answer from elsewhere: the first
// complete() reaches the recorder, later ones are ignored, and a ticket dropped without an
// answer fails its request (so a lost callback cannot hang the run).
class RequestTicket {
 public:
  RequestTicket(std::shared_ptr<Recorder> recorder, uint64_t query) : recorder_(std::move(recorder)), query_(query) {}
  ~RequestTicket();
  RequestTicket(const RequestTicket&) = delete;
  RequestTicket& operator=(const RequestTicket&) = delete;
  void complete(bool ok, std::string_view error) noexcept;

 private:
  const std::shared_ptr<Recorder> recorder_;
  const uint64_t query_;
  std::atomic<bool> done_{false};
};

// A target whose send() is a function (a client the core does not implement, e.g. gRPC
// driven from Python): it receives the request's ticket and the sample index, and completes
// the ticket when the answer comes. A function that throws fails the request.
class CallbackTarget final : public Target {
 public:
  using SendFunction = std::function<void(std::shared_ptr<RequestTicket> ticket, size_t sample)>;
  CallbackTarget(SendFunction send, size_t samples, size_t capacity);
  void send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) override;
  size_t sample_count() const noexcept override { return samples_; }
  size_t capacity() const noexcept override { return capacity_; }

 private:
  const SendFunction send_;
  const size_t samples_;
  const size_t capacity_;
};

// Reads one HTTP/1.1 response from a byte stream, however it is split: status line,
// headers, a Content-Length, chunked or read-until-close body. Keeps the first bytes of the
// body (the JSON header of a binary-extension answer) to tell success from an error.
class HttpResponseParser {
 public:
  enum class State { kNeedMore, kDone, kMalformed };
  static constexpr size_t kMaxHeaderBytes = 64 * 1024;
  static constexpr size_t kMaxKeptBodyBytes = 64 * 1024;

  // Consumes bytes; returns kDone once a whole response is read (`consumed` then says how
  // many of these bytes it took), kMalformed with error() set when the stream is not HTTP.
  State feed(const char* data, size_t size, size_t* consumed);
  // The peer closed the stream: completes a read-until-close body, else kMalformed.
  State feed_eof();
  void reset();

  int status() const noexcept { return status_; }
  bool keep_alive() const noexcept { return keep_alive_; }
  bool started() const noexcept { return started_; }
  const std::string& error() const noexcept { return error_; }
  // ok: a 2xx status and no "error" key in the (JSON part of the) body.
  bool ok() const;
  // For a response that is not ok: "HTTP <status>: <the body's error text>".
  std::string describe() const;

 private:
  enum class Phase { kHead, kBody, kChunkSize, kChunkData, kChunkDataEnd, kTrailers, kUntilClose, kDone };
  State fail(std::string message);
  State parse_head();
  void keep(const char* data, size_t size);
  bool take_line(const char*& p, const char* end, std::string* line);

  Phase phase_ = Phase::kHead;
  std::string head_;        // the status line and headers while they arrive
  std::string line_;        // a chunk-size or trailer line while it arrives
  std::string body_;        // the first kept bytes of the body
  size_t keep_limit_ = kMaxKeptBodyBytes;
  uint64_t remaining_ = 0;  // body or chunk bytes still to come
  int status_ = 0;
  bool keep_alive_ = true;
  bool started_ = false;
  std::string error_;
};

struct HttpTargetOptions {
  std::string host;                  // a name (resolved with getaddrinfo) or an address
  std::string port;
  std::vector<std::string> requests; // per sample: the whole request, request line to body
  size_t connections = 16;
  int64_t connect_timeout_ms = 5000;
};

// An HTTP/1.1 keep-alive client over `connections` sockets, one request in flight per
// socket (no pipelining), answers read by one epoll thread. A broken or closed connection
// fails the request on it (counted, never fatal) and is reopened for the next one.
class HttpTarget final : public Target {
 public:
  // Resolves the host and opens every connection; throws Error(kUnavailable) saying which
  // address could not be reached and why, Error(kInvalidInput) for bad options.
  explicit HttpTarget(HttpTargetOptions options);
  ~HttpTarget() override;
  HttpTarget(const HttpTarget&) = delete;
  HttpTarget& operator=(const HttpTarget&) = delete;

  void send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) override;
  size_t sample_count() const noexcept override;
  size_t capacity() const noexcept override;
  void abandon() noexcept override;
  // Connections opened after the first ones (reconnects), for tests and reports.
  uint64_t reconnects() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace conveyor::loadgen
