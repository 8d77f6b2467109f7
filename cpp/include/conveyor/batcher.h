// The dynamic batcher: one per loaded model version.
//
// Requests wait in bounded per-priority queues; `instance_count` execution threads each
// take a batch when free (decide_batch: max batch size, queue delay, preferred sizes,
// shape compatibility), gather its inputs once into pooled batch tensors, run the
// executor, and complete every request with a view of the batch outputs. A separate
// deadline thread answers queued requests whose deadline passes with DeadlineExceeded
// at that moment, even while every instance is busy.
//
// Interface discipline: submit(), cancel(), stop() and stats() may be called from any
// thread. An input's memory must stay alive and unchanged until the request's
// completion is dropped: either the submitter guarantees it, or the input tensor's
// owner holds it, in which case the batcher keeps that owner with the request and
// hands it back inside the Completion (request_inputs), so it is released by whoever
// drops the completion, never by a batcher thread. The batcher also holds a shared
// reference to each request's sink until the request is delivered. The executor runs
// on instance threads; it must not call back into this batcher's stop().
//
// Lock order: the GIL (in the bindings) before mu_, never the reverse: nothing holds
// mu_ while waiting for the GIL, and no Python-owned tensor is dropped while mu_ is
// held. mu_ before any leaf lock (memory pool, completion queue, monitor). mirror_mu_
// only guards the mirror pointer, taken without mu_; set_mirror must be called without
// the GIL (the old mirror may be the last owner of a batcher whose threads need it).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "conveyor/batch_policy.h"
#include "conveyor/completion.h"
#include "conveyor/memory_pool.h"
#include "conveyor/mirror.h"
#include "conveyor/stats.h"
#include "conveyor/tensor.h"

namespace conveyor {

struct TensorSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> dims;  // without the batch dimension when batching; -1 = any
};

struct BatcherOptions {
  std::string model_name;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  int64_t max_batch_size = 0;  // 0: the model does not batch (inputs carry no batch dim)
  int64_t max_queue_delay_us = 0;
  std::vector<int64_t> preferred_batch_sizes;
  size_t max_queue_size = 1024;   // queued requests; a full queue rejects with kQueueFull
  int priority_levels = 0;        // 0: one level; else levels 1 (highest) .. priority_levels
  int default_priority_level = 0; // 0: the lowest level
  int64_t default_timeout_us = 0; // 0: requests have no deadline unless they ask for one
  int instance_count = 1;
  // Pin instance i's thread to the i-th CPU (round robin) of those the process may use when
  // the batcher is made; with one compute thread per instance that is the model's compute too.
  bool pin_instances = false;
  // In background mode (set_background), how long the oldest request waits for company
  // when max_queue_delay_us is shorter: a shadow's copies arrive a champion batch at a
  // time, and gathering them into fewer, larger batches spares the machine a wake-up and a
  // batch's fixed cost per copy.
  int64_t background_gather_us = 1000;
};

// What the executor sees: batch inputs in the model's input order.
struct Batch {
  const std::vector<Tensor>& inputs;
  int64_t rows;  // total rows (1 for a model that does not batch)
  int instance;  // which execution instance runs it, 0-based
};

// Runs one batch and returns its outputs in the model's output order. Throwing fails
// every request of the batch (an Error keeps its code; anything else becomes
// kModelExecution); the batcher and the other batches go on.
using Executor = std::function<std::vector<Tensor>(const Batch&)>;

struct BatcherStats {
  uint64_t requests = 0;        // accepted by submit()
  uint64_t succeeded = 0;
  uint64_t failed = 0;          // executor or gather errors
  uint64_t rejected = 0;        // refused at submit (queue full, invalid input, stopped)
  uint64_t expired = 0;         // deadline passed while queued
  uint64_t cancelled = 0;
  uint64_t batches = 0;
  uint64_t batched_rows = 0;
  uint64_t queue_depth = 0;     // queued now
  uint64_t in_flight = 0;       // accepted and not yet completed
  uint64_t undelivered = 0;     // completions a sink could not take even as failures (out of memory)
  int64_t last_inference_ns = 0;  // system-clock time of the last completed batch
  // Index = rows in the batch. Per size: batches, and summed compute phases in ns.
  std::vector<uint64_t> batch_size_counts;
  std::vector<uint64_t> batch_input_ns, batch_infer_ns, batch_output_ns;
  // Per request: time queued, and the compute phases of the batch it ran in.
  DurationHistogram::Snapshot queue, compute_input, compute_infer, compute_output, total;
};

class Batcher {
 public:
  // Throws Error(kInvalidInput) for inconsistent options. Starts the threads.
  Batcher(BatcherOptions options, Executor executor, std::shared_ptr<MemoryPool> pool);
  ~Batcher();  // stop(true)
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues a request; returns its id (unique in the process). priority: 0 = the default level, else 1..levels.
  // timeout_us: < 0 the default timeout, 0 none, > 0 a deadline that far from now.
  // mirror_tag: nonzero to copy the request to the attached Mirror (a rollout's shadow)
  // once its batch has run; the tag comes back with the pair. Without a mirror it is ignored.
  // inputs_lent: the submitter lends the inputs' memory to the batch: nothing else reads or
  // writes it until the request completes, and the model may write into it. A request
  // that runs alone in its batch then runs on its inputs where they lie, with no copy,
  // when they are host memory aligned for their datatype (see gather()).
  // Throws kInvalidInput (names, dtypes, shapes, batch size), kQueueFull, kUnavailable.
  uint64_t submit(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority = 0,
                  int64_t timeout_us = -1, uint64_t mirror_tag = 0, bool inputs_lent = false);
  // One request of a group submitted at once (submit_group).
  struct Submission {
    std::vector<Tensor> inputs;
    std::shared_ptr<CompletionSink> sink;
  };
  // Queues every request of `group` at the default priority and timeout, under one lock
  // and with one wake-up, or none of them: throws as submit() does (counting all of
  // them rejected) when one is invalid or the queue has no room for all.
  void submit_group(std::vector<Submission> group);
  // One request of submit_each: its own priority, timeout and mirror tag (as submit takes
  // them), and the id it gets: 0 for a new one, or one reserve_request_id() returned (a
  // submitter that holds requests back to queue them together hands out their ids first).
  struct Queued {
    std::vector<Tensor> inputs;
    std::shared_ptr<CompletionSink> sink;
    int priority = 0;
    int64_t timeout_us = -1;
    uint64_t mirror_tag = 0;
    uint64_t id = 0;
    bool inputs_lent = false;  // as submit() takes it
  };
  // A request id no request has: for Queued::id. Ids are unique in the process.
  static uint64_t reserve_request_id() noexcept;
  // What submit_each did with one request: queued (id > 0), or refused (code, message).
  struct Outcome {
    uint64_t id = 0;
    ErrorCode code = ErrorCode::kOk;
    std::string message;
  };
  // Queues requests that arrived together (a front end's read round) with one lock and
  // one wake-up, so that a waiting instance sees them all and batches them. Unlike
  // submit_group each is judged alone: an invalid request is refused without keeping
  // the others out, and when the queue has room for only some, the first ones are queued
  // and the rest refused with kQueueFull. Never throws for a request's sake.
  std::vector<Outcome> submit_each(std::vector<Queued> requests);
  // How many requests a submitter holding them back (to queue a round together) should
  // queue without waiting for the round's end: half of the largest batch (1 for a model
  // that does not batch), so that an instance starts on them while the rest arrive.
  size_t round_flush_size() const noexcept;
  // submit() and block until the completion arrives.
  Completion infer(std::vector<Tensor> inputs, int priority = 0, int64_t timeout_us = -1);
  // Drops a queued request and completes it with kCancelled; false when it is no longer
  // queued (running or done: its completion comes as usual).
  bool cancel(uint64_t request_id);
  // Stops accepting. drain: finish everything queued first; else complete what is
  // queued with kUnavailable. Joins the threads; idempotent.
  void stop(bool drain = true);

  BatcherStats stats() const;
  const BatcherOptions& options() const noexcept { return options_; }

  // Attaches the mirror tagged requests are copied to (null: none). A batch already
  // running keeps the mirror it took: its copies are in that mirror's in-flight rows
  // until answered (wait for them with its wait_idle). The mirror's challenger must not
  // be this batcher.
  void set_mirror(std::shared_ptr<Mirror> mirror);

  // Background mode, for a challenger that only answers a rollout's shadow copies: its
  // instance threads run in the OS's idle scheduling class (Linux SCHED_IDLE), so they
  // take only CPU time no other thread of the machine wants and never delay the
  // champion, and its requests are gathered for up to background_gather_us (a batching
  // model's; a submit wakes an instance only to start that wait, for a full batch or for
  // a deadline; see BatcherOptions::background_gather_us). Each thread switches before its
  // next batch. Leaving it starts new instance
  // threads at the caller's priority (an unprivileged thread may enter the idle class
  // but not leave it); each takes over its instance once the thread it replaces has
  // finished its batch, so an instance never runs two batches at once. Returns whether
  // this machine has the idle class (false: the threads keep their priority). Does
  // nothing once stop() has begun. Throws kInternal when replacement threads cannot be
  // started (the old ones keep serving, in the idle class).
  bool set_background(bool background);

 private:
  struct Request {
    uint64_t id = 0;
    std::vector<Tensor> inputs;
    int64_t rows = 1;
    TimePoint enqueue_time{};
    TimePoint deadline = kNoDeadline;
    std::shared_ptr<CompletionSink> sink;
    std::multimap<TimePoint, uint64_t>::iterator deadline_it;
    bool has_deadline = false;
    uint64_t mirror_tag = 0;
    bool inputs_lent = false;  // see submit()
  };
  struct Entry {
    PendingView view;
    Request request;
  };
  class Snapshot;

  void validate(const std::vector<Tensor>& inputs, int64_t* rows, uint64_t* shape_key) const;
  // A validated queue entry (throws kInvalidInput); its level goes to *level.
  Entry prepare(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority, int64_t timeout_us,
                uint64_t mirror_tag, bool inputs_lent, int* level);
  // Queues the entries (ids assigned, in order, to *ids when given) or throws kUnavailable / kQueueFull,
  // counting them rejected unless !count_refusal (the caller tries again or counts them itself).
  void enqueue(std::vector<Entry>& entries, const std::vector<int>& levels, std::vector<uint64_t>* ids,
               bool count_refusal = true);
  int resolve_level(int priority) const;
  // Removes the requests at `first` and then at `second` (positions of one snapshot)
  // from the queue, in the order given. mu_ held.
  std::pair<std::vector<Request>, std::vector<Request>> take(const std::vector<QueuePos>& first,
                                                             const std::vector<QueuePos>& second);
  std::vector<Request> take_expired(TimePoint now);  // mu_ held
  // Serves instance `instance` as thread generation `generation` (see set_background).
  void instance_loop(int instance, uint64_t generation);
  // Waits (mu_ held) until this generation owns the instance; false: it never will.
  bool take_instance(std::unique_lock<std::mutex>& lock, int instance, uint64_t generation);
  void release_instance(int instance);  // mu_ held
  void deadline_loop();
  void run_batch(int instance, std::vector<Request> batch, int64_t rows);
  std::vector<Tensor> gather(const std::vector<Request>& batch);
  std::vector<Tensor> execute(int instance, const std::vector<Tensor>& inputs, int64_t rows);
  // Completes every request with an error carrying `message`.
  void fail(std::vector<Request> requests, ErrorCode code, const std::string& message) noexcept;
  void expire(std::vector<Request> requests) noexcept;
  // One deliver() per sink. A sink that throws gets its requests again as failures
  // (kOutOfMemory, outputs released); one that throws again loses them, counted in
  // stats().undelivered. Never throws: no exception leaves a batcher thread.
  void deliver_grouped(std::vector<std::pair<std::shared_ptr<CompletionSink>, Completion>> done) noexcept;
  // A succeeded batch's shadow copies: the mirror attached when it ran, its tagged
  // requests, what their BYTES rows point into, and the rows the mirror reserved for
  // them (0: nothing to send). Reserved before the batch's requests are completed (they
  // still hold their inputs, and wait_idle counts the copies), sent after.
  struct MirrorOffer {
    std::shared_ptr<Mirror> mirror;
    std::vector<MirroredRequest> requests;
    std::vector<Tensor> keep_alive;
    uint64_t reserved = 0;
  };
  MirrorOffer reserve_copies(const std::vector<Request>& batch, const std::shared_ptr<const BatchOutputs>& outputs,
                             TimePoint started, TimePoint ready) noexcept;

  const BatcherOptions options_;
  const BatchPolicy policy_;
  const Executor executor_;
  const std::shared_ptr<MemoryPool> pool_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;      // instances: new work or a wake-up time
  std::condition_variable deadline_cv_;  // deadline thread: an earlier deadline or stop
  std::vector<std::deque<Entry>> levels_;         // guarded by mu_
  std::multimap<TimePoint, uint64_t> deadlines_;  // guarded by mu_: queued requests' deadlines
  size_t queued_ = 0;                             // guarded by mu_
  bool accepting_ = true;                         // guarded by mu_
  bool draining_ = false;                         // guarded by mu_: dispatch without delay
  bool stopped_ = false;                          // guarded by mu_: threads must exit

  // Background mode (set_background), guarded by mu_. Instance threads belong to a
  // generation; a thread whose generation is no longer current leaves after its batch
  // and hands its instance, and its own std::thread to join, to its replacement.
  bool background_ = false;
  uint64_t generation_ = 0;       // the generation that serves
  uint64_t last_generation_ = 0;  // the newest started (generations are never reused)
  uint64_t abandoned_generation_ = UINT64_MAX;  // replacements that could not all start
  std::vector<char> instance_busy_;             // a thread is serving the instance
  std::vector<std::vector<std::thread>> handoff_;  // per instance: replaced threads, joined by the next to serve
  std::condition_variable handoff_cv_;          // an instance freed, or replacements abandoned

  std::vector<int> instance_cpus_;  // pin_instances: the CPU each instance's thread runs on
  std::vector<std::thread> instances_;  // modified only under mu_ while accepting_
  std::thread deadline_thread_;
  // Held while a batch is offered to the mirror, and to swap it: set_mirror returns only
  // when no instance uses the old one. Never held with mu_.
  std::mutex mirror_mu_;
  std::shared_ptr<Mirror> mirror_;  // guarded by mirror_mu_
  std::once_flag stop_once_;

  struct Counters;
  std::unique_ptr<Counters> counters_;
};

// Queues a round of requests bound for several batchers: each batcher's with one
// submit_each (one lock and one wake-up, so that they can form one batch), in the order
// given. Returns the requests' outcomes in that order. Each batcher must outlive the call.
std::vector<Batcher::Outcome> submit_round(std::vector<std::pair<Batcher*, Batcher::Queued>> round);

}  // namespace conveyor
