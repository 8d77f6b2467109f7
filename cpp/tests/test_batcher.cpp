// The batcher with real threads; the test command runs these under ThreadSanitizer.
// Synchronisation is explicit (gates and latches), never sleeps.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <sched.h>
#include <vector>

#include "allocation_hooks.h"
#include "check.h"
#include "gate.h"
#include "conveyor/batcher.h"

using namespace conveyor;
using conveyor::testing::Gate;

namespace {


BatcherOptions options(int64_t max_batch, int64_t delay_us = 0) {
  BatcherOptions o;
  o.model_name = "test";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.max_batch_size = max_batch;
  o.max_queue_delay_us = delay_us;
  return o;
}

// y = 2x + 1 over a pooled output.
std::vector<Tensor> twice_plus_one(const Batch& batch) {
  const Tensor& x = batch.inputs[0];
  Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
  const auto* in = static_cast<const float*>(x.data);
  auto* out = static_cast<float*>(y.data);
  for (int64_t i = 0; i < x.shape.numel(); ++i) out[i] = 2 * in[i] + 1;
  return {y};
}

Tensor borrow(std::vector<float>& data, int64_t rows) {
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{rows, 2};
  t.data = data.data();
  return t;
}

float value_at(const Completion& c, int64_t row, int col) {
  const auto* p = static_cast<const float*>(c.outputs->tensors[0].data);
  return p[(c.row_offset + row) * 2 + col];
}

// `threads` callers, each inferring `per_thread` rows (thread, i) of y = 2x + 1 and counting
// failed requests and answers that are not their own.
void infer_from_threads(Batcher& b, int threads, int per_thread, std::atomic<int>& wrong, std::atomic<int>& errors) {
  std::vector<std::thread> callers;
  for (int t = 0; t < threads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        std::vector<float> x = {float(t), float(i)};
        Completion c = b.infer({borrow(x, 1)});
        if (c.code != ErrorCode::kOk) {
          ++errors;
        } else if (value_at(c, 0, 0) != 2.0f * t + 1 || value_at(c, 0, 1) != 2.0f * i + 1) {
          ++wrong;
        }
      }
    });
  }
  for (auto& th : callers) th.join();
}

}  // namespace

TEST_CASE("batcher: a request gets its own rows of the batch output") {
  Batcher b(options(8), twice_plus_one, nullptr);
  std::vector<float> x = {1, 2, 3, 4};
  Completion c = b.infer({borrow(x, 2)});
  CHECK(c.code == ErrorCode::kOk);
  CHECK_EQ(c.rows, 2);
  CHECK_EQ(value_at(c, 0, 0), 3.0f);
  CHECK_EQ(value_at(c, 1, 1), 9.0f);
}

TEST_CASE("batcher: many threads, every request answered once with its own answer") {
  constexpr int kThreads = 16, kPerThread = 300;
  BatcherOptions o = options(32, 200);
  o.instance_count = 2;
  Batcher b(o, twice_plus_one, nullptr);
  std::atomic<int> wrong{0}, errors{0};
  infer_from_threads(b, kThreads, kPerThread, wrong, errors);
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(errors.load(), 0);
  BatcherStats s = b.stats();
  CHECK_EQ(s.requests, uint64_t{kThreads * kPerThread});
  CHECK_EQ(s.succeeded, uint64_t{kThreads * kPerThread});
  CHECK_EQ(s.batched_rows, uint64_t{kThreads * kPerThread});
  CHECK_EQ(s.in_flight, uint64_t{0});
  uint64_t from_histogram = 0;
  for (size_t size = 0; size < s.batch_size_counts.size(); ++size) from_histogram += size * s.batch_size_counts[size];
  CHECK_EQ(from_histogram, s.batched_rows);
  CHECK_EQ(s.queue.count, s.succeeded);
}

TEST_CASE("batcher: a queued request's deadline fires while every instance is busy") {
  Gate gate;
  Batcher b(options(1), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x1 = {1, 1}, x2 = {2, 2};
  auto busy = std::make_shared<CompletionQueue>();
  b.submit({borrow(x1, 1)}, busy);
  gate.wait_entered(1);  // the only instance is now blocked
  Completion late = b.infer({borrow(x2, 1)}, 0, /*timeout_us=*/1000);
  CHECK(late.code == ErrorCode::kDeadlineExceeded);
  CHECK(late.message.find("deadline") != std::string::npos);
  gate.open();
  b.stop(true);
  auto done = busy->drain();
  CHECK_EQ(done.size(), size_t{1});
  CHECK(done[0][0].code == ErrorCode::kOk);
  CHECK_EQ(b.stats().expired, uint64_t{1});
}

// The deadline thread sleeps until the earliest deadline; a batch that takes that request
// erases its deadline meanwhile. Under AddressSanitizer, waiting on a reference to the
// erased entry's time is a heap-use-after-free when the thread wakes for the next one.
TEST_CASE("batcher: a request served before its deadline, then another with a deadline") {
  Gate gate;
  Batcher b(options(1), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {1, 1};
  auto served = std::make_shared<CompletionQueue>();
  b.submit({borrow(x, 1)}, served);
  gate.wait_entered(1);  // the only instance is blocked: what follows stays queued
  b.submit({borrow(x, 1)}, served, 0, /*timeout_us=*/60'000'000);
  // Expiring this one leaves the deadline thread waiting for the 60 s deadline above.
  CHECK(b.infer({borrow(x, 1)}, 0, /*timeout_us=*/1).code == ErrorCode::kDeadlineExceeded);
  gate.open();  // the instance takes the 60 s request, erasing its deadline
  Completion next = b.infer({borrow(x, 1)}, 0, /*timeout_us=*/60'000'000);  // wakes the deadline thread
  CHECK(next.code == ErrorCode::kOk);
  b.stop(true);
  auto done = served->drain();
  size_t answered = 0;
  for (const auto& group : done) {
    for (const Completion& c : group) answered += c.code == ErrorCode::kOk;
  }
  CHECK_EQ(answered, size_t{2});
}

TEST_CASE("batcher: a full queue rejects at once with QueueFull") {
  Gate gate;
  BatcherOptions o = options(1);
  o.max_queue_size = 2;
  Batcher b(o, [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {0, 0};
  auto q = std::make_shared<CompletionQueue>();
  b.submit({borrow(x, 1)}, q);
  gate.wait_entered(1);
  b.submit({borrow(x, 1)}, q);
  b.submit({borrow(x, 1)}, q);
  CHECK_THROWS_CODE(b.submit({borrow(x, 1)}, q), ErrorCode::kQueueFull);
  CHECK_EQ(b.stats().rejected, uint64_t{1});
  gate.open();
  b.stop(true);
  size_t ok = 0;
  for (auto& group : q->drain()) {
    for (auto& c : group) ok += c.code == ErrorCode::kOk;
  }
  CHECK_EQ(ok, size_t{3});
}

TEST_CASE("batcher: a higher priority level is served first") {
  Gate gate;
  std::mutex mu;
  std::vector<float> order;
  BatcherOptions o = options(1);
  o.priority_levels = 2;
  Batcher b(o, [&](const Batch& batch) {
    gate.pass();
    std::lock_guard<std::mutex> lock(mu);
    order.push_back(static_cast<const float*>(batch.inputs[0].data)[0]);
    return twice_plus_one(batch);
  }, nullptr);
  std::vector<float> first = {0, 0}, low1 = {1, 0}, low2 = {2, 0}, high = {3, 0};
  auto q = std::make_shared<CompletionQueue>();
  b.submit({borrow(first, 1)}, q);
  gate.wait_entered(1);
  b.submit({borrow(low1, 1)}, q, 2);
  b.submit({borrow(low2, 1)}, q);  // default level: the lowest
  b.submit({borrow(high, 1)}, q, 1);
  CHECK_THROWS_CODE(b.submit({borrow(high, 1)}, q, 3), ErrorCode::kInvalidInput);
  gate.open();
  b.stop(true);
  CHECK(order == std::vector<float>({0, 3, 1, 2}));
}

TEST_CASE("batcher: cancel drops a queued request and completes it as cancelled") {
  Gate gate;
  Batcher b(options(1), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {0, 0};
  auto q = std::make_shared<CompletionQueue>();
  uint64_t running = b.submit({borrow(x, 1)}, q);
  gate.wait_entered(1);
  uint64_t queued = b.submit({borrow(x, 1)}, q);
  CHECK(b.cancel(queued));
  CHECK(!b.cancel(queued));
  CHECK(!b.cancel(running));
  gate.open();
  b.stop(true);
  int cancelled = 0, ok = 0;
  for (auto& group : q->drain()) {
    for (auto& c : group) {
      cancelled += c.code == ErrorCode::kCancelled && c.request_id == queued;
      ok += c.code == ErrorCode::kOk && c.request_id == running;
    }
  }
  CHECK_EQ(cancelled, 1);
  CHECK_EQ(ok, 1);
  CHECK_EQ(b.stats().cancelled, uint64_t{1});
}

TEST_CASE("batcher: a model that throws fails only its own batch") {
  Batcher b(options(1), [](const Batch& batch) {
    if (static_cast<const float*>(batch.inputs[0].data)[0] < 0) throw std::runtime_error("negative input");
    return twice_plus_one(batch);
  }, nullptr);
  std::vector<float> bad = {-1, 0}, good = {1, 0};
  Completion c = b.infer({borrow(bad, 1)});
  CHECK(c.code == ErrorCode::kModelExecution);
  CHECK(c.message.find("negative input") != std::string::npos);
  c = b.infer({borrow(good, 1)});
  CHECK(c.code == ErrorCode::kOk);
  CHECK_EQ(value_at(c, 0, 0), 3.0f);
  CHECK_EQ(b.stats().failed, uint64_t{1});
}

TEST_CASE("batcher: outputs that break the contract fail the batch with a message") {
  Batcher b(options(4), [](const Batch&) {
    return std::vector<Tensor>{make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, Shape{7, 2})};
  }, nullptr);
  std::vector<float> x = {1, 2};
  Completion c = b.infer({borrow(x, 1)});
  CHECK(c.code == ErrorCode::kModelExecution);
  CHECK(c.message.find("batch of 1 rows") != std::string::npos);
}

TEST_CASE("batcher: stop drains what was accepted, then rejects") {
  Gate gate;
  Batcher b(options(2), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {0, 0};
  auto q = std::make_shared<CompletionQueue>();
  for (int i = 0; i < 7; ++i) b.submit({borrow(x, 1)}, q);
  gate.wait_entered(1);
  std::thread stopper([&] { b.stop(true); });
  gate.open();
  stopper.join();
  size_t ok = 0;
  for (auto& group : q->drain()) {
    for (auto& c : group) ok += c.code == ErrorCode::kOk;
  }
  CHECK_EQ(ok, size_t{7});
  CHECK_THROWS_CODE(b.submit({borrow(x, 1)}, q), ErrorCode::kUnavailable);
}

TEST_CASE("batcher: stop without draining answers queued requests as unavailable") {
  Gate gate;
  Batcher b(options(1), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {0, 0};
  auto q = std::make_shared<CompletionQueue>();
  for (int i = 0; i < 3; ++i) b.submit({borrow(x, 1)}, q);
  gate.wait_entered(1);
  std::thread stopper([&] { b.stop(false); });
  // The two queued requests are answered before the running batch is let go.
  while (q->pending() < 2) std::this_thread::yield();
  gate.open();
  stopper.join();
  int unavailable = 0, ok = 0;
  for (auto& group : q->drain()) {
    for (auto& c : group) {
      unavailable += c.code == ErrorCode::kUnavailable;
      ok += c.code == ErrorCode::kOk;
    }
  }
  CHECK_EQ(unavailable, 2);
  CHECK_EQ(ok, 1);
}

TEST_CASE("batcher: bad inputs are rejected with what was expected") {
  Batcher b(options(4), twice_plus_one, nullptr);
  std::vector<float> x(10 * 3);
  auto q = std::make_shared<CompletionQueue>();
  Tensor wrong_shape = borrow(x, 1);
  wrong_shape.shape = Shape{1, 3};
  try {
    b.submit({wrong_shape}, q);
    CHECK(false);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kInvalidInput);
    CHECK(std::string(e.what()).find("expected shape [-1, 2]") != std::string::npos);
    CHECK(std::string(e.what()).find("got [1, 3]") != std::string::npos);
  }
  Tensor wrong_dtype = borrow(x, 1);
  wrong_dtype.dtype = DType::kInt32;
  CHECK_THROWS_CODE(b.submit({wrong_dtype}, q), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(b.submit({borrow(x, 5)}, q), ErrorCode::kInvalidInput);  // over max_batch_size
  CHECK_THROWS_CODE(b.submit({}, q), ErrorCode::kInvalidInput);
  CHECK_EQ(b.stats().rejected, uint64_t{4});
}

TEST_CASE("batcher: a completion queue hands over a whole batch in one delivery") {
  Gate gate;
  Batcher b(options(8, 0), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {5, 6};
  auto q = std::make_shared<CompletionQueue>();
  b.submit({borrow(x, 1)}, q);
  gate.wait_entered(1);
  for (int i = 0; i < 5; ++i) b.submit({borrow(x, 1)}, q);  // queued behind the busy instance
  gate.open();
  b.stop(true);
  auto groups = q->drain();
  CHECK_EQ(groups.size(), size_t{2});  // the first request alone, then the five together
  if (groups.size() == 2) CHECK_EQ(groups[1].size(), size_t{5});
  CHECK_EQ(q->pending(), size_t{0});
}

TEST_CASE("batcher: a request lent alone runs on its own inputs; otherwise the batch gets a copy") {
  std::mutex mu;
  std::vector<const void*> seen;  // the batch input each batch ran on
  auto recording = [&](const Batch& batch) {
    {
      std::lock_guard<std::mutex> lock(mu);
      seen.push_back(batch.inputs[0].data);
    }
    return twice_plus_one(batch);
  };
  auto run_alone = [](Batcher& b, Tensor t, bool lent) {
    auto waiter = std::make_shared<CompletionWaiter>();
    b.submit({std::move(t)}, waiter, 0, -1, 0, lent);
    return waiter->wait().code;
  };
  for (int64_t max_batch : {8, 0}) {  // a batching model, and one that does not batch
    Batcher b(options(max_batch), recording, nullptr);
    std::vector<float> x = {1, 2}, spare(3, 0.0f);
    Tensor lent = borrow(x, 1);
    if (max_batch == 0) lent.shape = Shape{2};
    Tensor unowned = lent;
    lent.owner = std::shared_ptr<void>(x.data(), [](void*) {});  // the test keeps x alive
    Tensor odd = lent;
    odd.data = reinterpret_cast<char*>(spare.data()) + 1;  // not aligned for FP32
    CHECK(run_alone(b, lent, true) == ErrorCode::kOk);      // in place
    CHECK(run_alone(b, odd, true) == ErrorCode::kOk);       // copied: misaligned
    CHECK(run_alone(b, lent, false) == ErrorCode::kOk);     // copied: not lent
    CHECK(run_alone(b, unowned, true) == ErrorCode::kOk);   // copied: nothing would keep it alive
    std::lock_guard<std::mutex> lock(mu);
    CHECK_EQ(seen.size(), size_t{4});
    if (seen.size() == 4) {
      CHECK(seen[0] == x.data());
      CHECK(seen[1] != odd.data);
      CHECK(seen[2] != x.data());
      CHECK(seen[3] != x.data());
    }
    seen.clear();
  }
  // Two lent requests in one batch are gathered into a copy.
  Gate held;
  Batcher b(options(8), [&](const Batch& batch) {
    held.pass();
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back(batch.inputs[0].data);
    return twice_plus_one(batch);
  }, nullptr);
  std::vector<float> x = {1, 2}, y = {3, 4};
  auto q = std::make_shared<CompletionQueue>();
  b.submit({borrow(x, 1)}, q);
  held.wait_entered(1);  // the instance is busy: the next two wait together
  b.submit({borrow(x, 1)}, q, 0, -1, 0, true);
  b.submit({borrow(y, 1)}, q, 0, -1, 0, true);
  held.open();
  b.stop(true);
  std::lock_guard<std::mutex> lock(mu);
  CHECK_EQ(seen.size(), size_t{2});
  if (seen.size() == 2) CHECK((seen[1] != x.data() && seen[1] != y.data()));
}

namespace {

// A sink that records what reaches it; `throws` makes its next deliveries throw bad_alloc.
class RecordingSink final : public CompletionSink {
 public:
  explicit RecordingSink(std::shared_ptr<std::vector<Completion>> received, int throws = 0)
      : received_(std::move(received)), throws_(throws) {}
  void deliver(std::vector<Completion>&& completions) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (throws_ > 0) {
      --throws_;
      throw std::bad_alloc();
    }
    for (Completion& c : completions) received_->push_back(std::move(c));
  }

 private:
  std::mutex mu_;
  std::shared_ptr<std::vector<Completion>> received_;
  int throws_;
};

}  // namespace

TEST_CASE("batcher: holds a request's sink and input owner until delivery, whatever the submitter drops") {
  Gate gate;
  Batcher b(options(4), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  auto received = std::make_shared<std::vector<Completion>>();
  std::weak_ptr<CompletionSink> sink_alive;
  std::weak_ptr<void> input_alive;
  {
    auto data = std::make_shared<std::vector<float>>(std::vector<float>{1, 2});
    Tensor x = borrow(*data, 1);
    x.owner = data;  // the owner keeps the memory alive, as the bindings' Python owners do
    input_alive = data;
    auto sink = std::make_shared<RecordingSink>(received);
    sink_alive = sink;
    b.submit({x}, sink);
    gate.wait_entered(1);
  }  // the submitter's references are gone while the batch runs
  CHECK(!sink_alive.expired());
  CHECK(!input_alive.expired());
  gate.open();
  b.stop(true);
  CHECK(sink_alive.expired());  // released once delivered
  CHECK_EQ(received->size(), size_t{1});
  const Completion& c = received->front();
  CHECK(c.code == ErrorCode::kOk);
  CHECK_EQ(value_at(c, 0, 1), 5.0f);
  // The input's owner came back with the completion: it dies with it, on the receiver's side.
  CHECK(!input_alive.expired());
  CHECK_EQ(c.request_inputs.size(), size_t{1});
  received->clear();
  CHECK(input_alive.expired());
}

TEST_CASE("batcher: a failed or cancelled request hands its inputs back with the completion too") {
  Gate gate;
  Batcher b(options(1), [&](const Batch& batch) { gate.pass(); return twice_plus_one(batch); }, nullptr);
  auto received = std::make_shared<std::vector<Completion>>();
  auto sink = std::make_shared<RecordingSink>(received);
  std::vector<float> running = {1, 1};
  b.submit({borrow(running, 1)}, sink);
  gate.wait_entered(1);
  auto data = std::make_shared<std::vector<float>>(std::vector<float>{2, 2});
  Tensor x = borrow(*data, 1);
  x.owner = data;
  const uint64_t queued = b.submit({x}, sink);
  std::weak_ptr<void> input_alive = data;
  data.reset();
  x.owner.reset();
  CHECK(b.cancel(queued));
  gate.open();
  b.stop(true);
  CHECK_EQ(received->size(), size_t{2});
  bool saw_cancelled = false;
  for (const Completion& c : *received) {
    if (c.request_id != queued) continue;
    saw_cancelled = c.code == ErrorCode::kCancelled && c.request_inputs.size() == 1;
  }
  CHECK(saw_cancelled);
  CHECK(!input_alive.expired());
  received->clear();
  CHECK(input_alive.expired());
}

TEST_CASE("batcher: a sink that cannot take a batch gets its requests again as OutOfMemory failures") {
  Batcher b(options(4), twice_plus_one, nullptr);
  auto received = std::make_shared<std::vector<Completion>>();
  auto sink = std::make_shared<RecordingSink>(received, /*throws=*/1);
  std::vector<float> x = {1, 2};
  const uint64_t id = b.submit({borrow(x, 1)}, sink);
  b.stop(true);
  CHECK_EQ(received->size(), size_t{1});
  CHECK_EQ(received->front().request_id, id);
  CHECK(received->front().code == ErrorCode::kOutOfMemory);
  CHECK(received->front().outputs == nullptr);
  CHECK_EQ(b.stats().undelivered, uint64_t{0});

  // A sink that keeps failing loses the completion: counted, and the batcher goes on.
  Batcher again(options(4), twice_plus_one, nullptr);
  auto lost = std::make_shared<std::vector<Completion>>();
  again.submit({borrow(x, 1)}, std::make_shared<RecordingSink>(lost, /*throws=*/2));
  Completion after = again.infer({borrow(x, 1)});
  CHECK(after.code == ErrorCode::kOk);
  again.stop(true);
  CHECK(lost->empty());
  CHECK_EQ(again.stats().undelivered, uint64_t{1});
}

TEST_CASE("batcher: running out of memory after the executor returns fails that batch, not the instance") {
  std::atomic<int> calls{0};
  Batcher b(options(4),
            [&](const Batch& batch) {
              std::vector<Tensor> outputs = twice_plus_one(batch);
              // The first batch: the batcher's next allocation (completing it) fails.
              if (calls.fetch_add(1) == 0) conveyor::testing::fail_next_allocations_on_this_thread(1);
              return outputs;
            },
            nullptr);
  std::vector<float> x = {1, 2};
  Completion failed = b.infer({borrow(x, 1)});
  CHECK(failed.code == ErrorCode::kOutOfMemory);
  CHECK(failed.message.find("could not complete the batch") != std::string::npos);
  Completion ok = b.infer({borrow(x, 1)});
  CHECK(ok.code == ErrorCode::kOk);
  CHECK_EQ(value_at(ok, 0, 1), 5.0f);
  BatcherStats s = b.stats();
  CHECK_EQ(s.failed, uint64_t{1});
  CHECK_EQ(s.succeeded, uint64_t{1});
  CHECK_EQ(s.in_flight, uint64_t{0});
}


TEST_CASE("batcher: cancel, deadlines and stop racing dispatch answer every request exactly once") {
  constexpr int kThreads = 6, kPerThread = 400;
  BatcherOptions o = options(8, 100);
  o.instance_count = 2;
  o.max_queue_size = 100000;
  Batcher b(o, twice_plus_one, nullptr);
  auto received = std::make_shared<std::vector<Completion>>();
  auto sink = std::make_shared<RecordingSink>(received);
  std::atomic<int> accepted{0}, refused{0};
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  std::vector<std::vector<float>> data(kThreads, std::vector<float>{1, 2});
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ++started;
      for (int i = 0; i < kPerThread; ++i) {
        try {
          // Every third request has a deadline short enough to expire while queued.
          const uint64_t id = b.submit({borrow(data[t], 1)}, sink, 0, i % 3 == 0 ? 1 : 0);
          ++accepted;
          if (i % 5 == 0) b.cancel(id);  // queued or already running: either answer is fine
        } catch (const Error& e) {
          CHECK(e.code() == ErrorCode::kUnavailable);  // stop() won the race
          ++refused;
        }
      }
    });
  }
  while (started.load() < kThreads) std::this_thread::yield();
  b.stop(true);
  for (auto& th : threads) th.join();
  CHECK_EQ(accepted.load() + refused.load(), kThreads * kPerThread);
  CHECK_EQ(received->size(), static_cast<size_t>(accepted.load()));
  std::vector<uint64_t> ids;
  for (const Completion& c : *received) {
    ids.push_back(c.request_id);
    const bool known = c.code == ErrorCode::kOk || c.code == ErrorCode::kCancelled ||
                       c.code == ErrorCode::kDeadlineExceeded;
    CHECK(known);
    if (c.code == ErrorCode::kOk) CHECK_EQ(value_at(c, 0, 1), 5.0f);
  }
  std::sort(ids.begin(), ids.end());
  CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());  // no request answered twice
  BatcherStats s = b.stats();
  CHECK_EQ(s.succeeded + s.cancelled + s.expired, static_cast<uint64_t>(accepted.load()));
  CHECK_EQ(s.in_flight, uint64_t{0});
}

namespace {

// What each batch saw: the scheduling class and the thread that ran it.
struct BatchThreads {
  std::mutex mu;
  std::vector<int> policies;
  std::vector<std::thread::id> threads;
  void record() {
    std::lock_guard<std::mutex> lock(mu);
    policies.push_back(sched_getscheduler(0));
    threads.push_back(std::this_thread::get_id());
  }
};

}  // namespace

TEST_CASE("batcher: background mode runs batches in the idle class; leaving it runs them on new normal threads") {
  BatchThreads seen;
  Batcher b(options(4), [&](const Batch& batch) { seen.record(); return twice_plus_one(batch); }, nullptr);
  std::vector<float> x = {1, 2};
  CHECK(b.infer({borrow(x, 1)}).code == ErrorCode::kOk);
  const bool idle_class = b.set_background(true);
  CHECK(b.set_background(true) == idle_class);  // already on: nothing changes
  CHECK(b.infer({borrow(x, 1)}).code == ErrorCode::kOk);
  b.set_background(false);
  Completion last = b.infer({borrow(x, 1)});
  CHECK(last.code == ErrorCode::kOk);
  CHECK_EQ(value_at(last, 0, 1), 5.0f);
  CHECK_EQ(seen.policies.size(), size_t{3});
  if (seen.policies.size() != 3) return;
  CHECK_EQ(seen.policies[0], SCHED_OTHER);
  CHECK_EQ(seen.policies[1], idle_class ? SCHED_IDLE : SCHED_OTHER);
  CHECK_EQ(seen.policies[2], SCHED_OTHER);
  CHECK(seen.threads[0] == seen.threads[1]);  // entering: the same thread switches
  CHECK(seen.threads[2] != seen.threads[1]);  // leaving: a new thread took over
}

TEST_CASE("batcher: leaving background mode mid-batch: the new thread waits, an instance never runs two batches") {
  Gate gate;
  std::atomic<int> running{0}, most{0}, batches{0};
  Batcher b(options(1), [&](const Batch& batch) {
    const int now = ++running;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {}
    if (++batches == 1) gate.pass();
    --running;
    return twice_plus_one(batch);
  }, nullptr);
  auto w1 = std::make_shared<CompletionWaiter>(), w2 = std::make_shared<CompletionWaiter>(),
       w3 = std::make_shared<CompletionWaiter>();
  std::vector<float> x1 = {1, 1}, x2 = {2, 2}, x3 = {3, 3};
  b.submit({borrow(x1, 1)}, w1);
  gate.wait_entered(1);  // batch 1 runs, held
  b.set_background(true);
  b.submit({borrow(x2, 1)}, w2);  // queued behind it
  b.set_background(false);        // returns at once; the replacement waits for the instance
  b.submit({borrow(x3, 1)}, w3);
  gate.open();
  Completion c1 = w1->wait(), c2 = w2->wait(), c3 = w3->wait();
  CHECK(c1.code == ErrorCode::kOk);
  CHECK(c2.code == ErrorCode::kOk);
  CHECK(c3.code == ErrorCode::kOk);
  CHECK_EQ(value_at(c3, 0, 0), 7.0f);
  CHECK_EQ(most.load(), 1);
  CHECK_EQ(batches.load(), 3);
}

TEST_CASE("batcher: background mode toggled under load answers every request once; stop joins every thread") {
  constexpr int kThreads = 6, kPerThread = 150, kToggles = 40;
  BatcherOptions o = options(8);
  o.instance_count = 2;
  Batcher b(o, twice_plus_one, nullptr);
  std::atomic<int> wrong{0}, errors{0};
  std::atomic<bool> done{false};
  std::thread toggler([&] {
    for (int i = 0; i < kToggles && !done.load(); ++i) b.set_background(i % 2 == 0);
  });
  infer_from_threads(b, kThreads, kPerThread, wrong, errors);
  done = true;
  toggler.join();
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(errors.load(), 0);
  CHECK_EQ(b.stats().succeeded, uint64_t{kThreads * kPerThread});
  b.stop();
  b.set_background(true);  // after stop: nothing changes, no thread is started
  b.set_background(false);
}

TEST_CASE("batcher: background mode gathers requests into one batch until it is full, or the batcher drains") {
  BatcherOptions o = options(4);
  o.background_gather_us = int64_t{3600} * 1000 * 1000;  // an hour: only a full batch or draining ends it
  std::mutex mu;
  std::vector<int64_t> sizes;
  Batcher b(o, [&](const Batch& batch) {
    std::lock_guard<std::mutex> lock(mu);
    sizes.push_back(batch.rows);
    return twice_plus_one(batch);
  }, nullptr);
  b.set_background(true);
  std::vector<std::shared_ptr<CompletionWaiter>> waiters;
  std::vector<float> x = {1, 2};
  for (int i = 0; i < 5; ++i) {
    waiters.push_back(std::make_shared<CompletionWaiter>());
    b.submit({borrow(x, 1)}, waiters.back());
  }
  // The first four fill a batch at once; the fifth waits for company until the batcher
  // leaves background mode.
  for (int i = 0; i < 4; ++i) CHECK(waiters[i]->wait().code == ErrorCode::kOk);
  CHECK_EQ(b.stats().succeeded, uint64_t{4});
  b.set_background(false);
  Completion fifth = waiters[4]->wait();
  CHECK(fifth.code == ErrorCode::kOk);
  CHECK(fifth.queued_ns >= 0);
  // Back in background mode, a lone request waits until the batcher stops, draining.
  b.set_background(true);
  auto lone = std::make_shared<CompletionWaiter>();
  b.submit({borrow(x, 1)}, lone);
  b.stop(true);
  CHECK(lone->wait().code == ErrorCode::kOk);
  std::lock_guard<std::mutex> lock(mu);
  CHECK_EQ(sizes.size(), size_t{3});
  if (sizes.size() == 3) {
    CHECK_EQ(sizes[0], int64_t{4});
    CHECK_EQ(sizes[1], int64_t{1});
    CHECK_EQ(sizes[2], int64_t{1});
  }
}

TEST_CASE("batcher: submit_each queues a round together, refuses an invalid request alone, fills the queue in order") {
  Gate gate;
  std::atomic<int> batches{0};
  std::vector<int64_t> sizes;
  std::mutex sizes_mu;
  BatcherOptions o = options(8);
  o.max_queue_size = 3;
  Batcher b(o, [&](const Batch& batch) {
    if (++batches == 1) gate.pass();  // the first batch is held: the rest queue behind it
    {
      std::lock_guard<std::mutex> lock(sizes_mu);
      sizes.push_back(batch.rows);
    }
    return twice_plus_one(batch);
  }, nullptr);
  std::vector<float> held = {0, 0};
  auto held_waiter = std::make_shared<CompletionWaiter>();
  b.submit({borrow(held, 1)}, held_waiter);
  gate.wait_entered(1);

  std::vector<std::vector<float>> rows = {{1, 1}, {2, 2}, {3, 3}, {4, 4}, {5, 5}};
  std::vector<std::shared_ptr<CompletionWaiter>> waiters;
  std::vector<Batcher::Queued> round;
  for (size_t i = 0; i < rows.size(); ++i) {
    waiters.push_back(std::make_shared<CompletionWaiter>());
    Tensor t = borrow(rows[i], 1);
    if (i == 1) t.dtype = DType::kInt32;  // invalid: refused alone
    round.push_back({{t}, waiters.back(), 0, -1});
  }
  std::vector<Batcher::Outcome> outcomes = b.submit_each(std::move(round));
  CHECK_EQ(outcomes.size(), size_t{5});
  CHECK(outcomes[0].id != 0);
  CHECK(outcomes[1].id == 0 && outcomes[1].code == ErrorCode::kInvalidInput);
  CHECK(outcomes[2].id != 0);
  CHECK(outcomes[3].id != 0);  // the queue holds 3: requests 0, 2 and 3
  CHECK(outcomes[4].id == 0 && outcomes[4].code == ErrorCode::kQueueFull);
  CHECK(outcomes[1].message.find("expected datatype FP32") != std::string::npos);
  gate.open();
  CHECK(held_waiter->wait().code == ErrorCode::kOk);
  for (size_t i : {size_t{0}, size_t{2}, size_t{3}}) {
    Completion c = waiters[i]->wait();
    CHECK(c.code == ErrorCode::kOk);
    CHECK_EQ(value_at(c, 0, 0), 2 * rows[i][0] + 1);
  }
  b.stop();
  std::lock_guard<std::mutex> lock(sizes_mu);
  CHECK_EQ(sizes.size(), size_t{2});  // the held batch, then the whole round in one batch
  if (sizes.size() == 2) CHECK_EQ(sizes[1], int64_t{3});
  const BatcherStats stats = b.stats();
  CHECK_EQ(stats.rejected, uint64_t{2});
  CHECK_EQ(stats.succeeded, uint64_t{4});
}
