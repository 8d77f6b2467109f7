// How finished requests reach their callers.
//
// A worker thread finishes a whole batch at once and hands each sink the completions
// of its requests in ONE deliver() call: an asyncio event loop wakes once per batch,
// not once per request. Outputs are shared by the batch: each completion names its
// rows of the batch outputs, so nothing is copied on the way out.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "conveyor/error.h"
#include "conveyor/tensor.h"

namespace conveyor {

// The outputs of one executed batch, kept alive by every completion that views them.
struct BatchOutputs {
  std::vector<Tensor> tensors;  // in the model's output order, batch dimension first
  int64_t rows = 0;             // rows in the batch (0 for a model that does not batch)
};

struct Completion {
  uint64_t request_id = 0;
  ErrorCode code = ErrorCode::kOk;
  std::string message;                          // set when code != kOk
  std::shared_ptr<const BatchOutputs> outputs;  // set when code == kOk
  int64_t queued_ns = -1;                       // when code == kOk: enqueued -> its batch started
  int64_t row_offset = 0;                       // this request's first row in the batch
  int64_t rows = -1;                            // its rows; -1: all of it (no batch dim)
  // The request's inputs, handed back with its completion: whatever their owners keep
  // alive (the caller's arrays, and through them BYTES elements a batch output may still
  // point at) lives until the receiver drops the completion, on the receiver's thread.
  std::vector<Tensor> request_inputs;
};

// Receives completions. The batcher holds a shared reference to the sink of every
// request it has accepted until that request is delivered, so a sink lives at least
// that long whatever its other owners do.
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  // Called on a worker thread, without core locks held, once per batch (or per group
  // of requests that failed together) with all of this sink's completions. Must not
  // block for long. May throw (std::bad_alloc): then none of `completions` was
  // delivered, and the caller still owns them.
  virtual void deliver(std::vector<Completion>&& completions) = 0;
};

// For event loops: completions wait in a queue and an eventfd becomes readable while
// there are some, so a loop can watch it (loop.add_reader) and drain() in one call.
class CompletionQueue final : public CompletionSink {
 public:
  CompletionQueue();
  ~CompletionQueue() override;
  CompletionQueue(const CompletionQueue&) = delete;
  CompletionQueue& operator=(const CompletionQueue&) = delete;

  void deliver(std::vector<Completion>&& completions) override;
  // Everything delivered so far, one vector per deliver() call; clears the eventfd.
  std::vector<std::vector<Completion>> drain();
  int fd() const noexcept { return event_fd_; }
  // Completions delivered and not drained yet.
  size_t pending() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::vector<Completion>> ready_;  // guarded by mu_
  size_t ready_count_ = 0;                      // guarded by mu_
  bool signalled_ = false;                      // guarded by mu_: the eventfd holds a token
  int event_fd_ = -1;
};

// For one blocking caller: wait() returns the request's completion.
class CompletionWaiter final : public CompletionSink {
 public:
  void deliver(std::vector<Completion>&& completions) override;
  Completion wait();

 private:
  // An atomic, not a mutex and condition variable: a condition variable's waiter takes
  // the mutex back marked contended, so each hand-over cost up to three more futex calls
  // (measured with strace on the idle round trip). Waiting on the atomic spins briefly,
  // then sleeps on a futex; notifying makes a system call only when someone sleeps.
  Completion result_;         // written by deliver() before done_ is set, read after
  std::atomic<int> done_{0};  // 1 once result_ is set
};

}  // namespace conveyor
