// The batch-level shadow copy (conveyor/mirror.h) with real batcher threads; the test
// command runs it under ThreadSanitizer and AddressSanitizer. Synchronisation is explicit
// (gates, wait_idle), never sleeps.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "check.h"
#include "gate.h"
#include "conveyor/batcher.h"
#include "conveyor/mirror.h"

using namespace conveyor;
using conveyor::testing::Gate;

namespace {


BatcherOptions options(int64_t max_batch, int64_t delay_us = 0) {
  BatcherOptions o;
  o.model_name = "shadowed";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.max_batch_size = max_batch;
  o.max_queue_delay_us = delay_us;
  return o;
}

// y = a * x + b, elementwise, into a pooled output.
Executor affine(float a, float b) {
  return [a, b](const Batch& batch) {
    const Tensor& x = batch.inputs[0];
    Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
    const auto* in = static_cast<const float*>(x.data);
    auto* out = static_cast<float*>(y.data);
    for (int64_t i = 0; i < x.shape.numel(); ++i) out[i] = a * in[i] + b;
    return std::vector<Tensor>{y};
  };
}

Tensor owned_rows(std::vector<float> values) {
  auto data = std::make_shared<std::vector<float>>(std::move(values));
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{static_cast<int64_t>(data->size() / 2), 2};
  t.data = data->data();
  t.owner = data;
  return t;
}

std::shared_ptr<Batcher> batcher(BatcherOptions o, Executor e) {
  return std::make_shared<Batcher>(std::move(o), std::move(e), nullptr);
}

MirrorOptions compare_values(size_t slots = 1024) {
  MirrorOptions o;
  o.slots = slots;
  o.champion_output = 0;
  o.challenger_output = 0;
  o.compare = MirrorCompare::kValues;
  return o;
}

}  // namespace

TEST_CASE("mirror: tagged requests are copied and paired row by row, untagged ones are not") {
  auto champion = batcher(options(8), affine(1, 0));
  auto challenger = batcher(options(8), affine(1, 0.5f));
  auto mirror = std::make_shared<Mirror>(challenger, compare_values());
  champion->set_mirror(mirror);
  auto q = std::make_shared<CompletionQueue>();
  champion->submit({owned_rows({1, 2, 3, 4})}, q, 0, -1, /*mirror_tag=*/7);
  champion->submit({owned_rows({5, 6})}, q, 0, -1, /*mirror_tag=*/0);
  champion->stop(true);
  CHECK(mirror->wait_idle(-1));
  MirrorPairs p = mirror->drain();
  CHECK_EQ(p.tags.size(), size_t{2});  // the tagged request's two rows
  CHECK_EQ(p.tags[0], uint64_t{7});
  CHECK_EQ(p.champion_values.size(), size_t{4});
  for (size_t i = 0; i < p.champion_values.size(); ++i) {
    CHECK_EQ(p.challenger_values[i] - p.champion_values[i], 0.5);
  }
  CHECK_EQ(p.champion_values[0], 1.0);
  CHECK_EQ(p.champion_values[3], 4.0);
  MirrorStats s = mirror->stats();
  CHECK_EQ(s.sent_rows, uint64_t{2});
  CHECK_EQ(s.paired_rows, uint64_t{2});
  CHECK_EQ(s.in_flight_rows, uint64_t{0});
  CHECK_EQ(challenger->stats().requests, uint64_t{1});  // one copy per copied request
  CHECK(mirror->drain().tags.empty());
}

TEST_CASE("mirror: submit_each keeps each request's mirror tag and the id reserved for it") {
  auto champion = batcher(options(8), affine(1, 0));
  auto challenger = batcher(options(8), affine(1, 0.5f));
  auto mirror = std::make_shared<Mirror>(challenger, compare_values());
  champion->set_mirror(mirror);
  auto q = std::make_shared<CompletionQueue>();
  const uint64_t reserved = Batcher::reserve_request_id();
  std::vector<Batcher::Queued> round;
  round.push_back({{owned_rows({1, 2})}, q, 0, -1, /*mirror_tag=*/9, reserved});
  round.push_back({{owned_rows({3, 4})}, q, 0, -1, /*mirror_tag=*/0, /*id=*/0});
  const std::vector<Batcher::Outcome> outcomes = champion->submit_each(std::move(round));
  CHECK_EQ(outcomes[0].id, reserved);
  CHECK(outcomes[1].id != 0);
  CHECK(outcomes[1].id != reserved);
  champion->stop(true);
  std::vector<uint64_t> completed;
  for (auto& group : q->drain()) {
    for (Completion& c : group) completed.push_back(c.request_id);
  }
  CHECK_EQ(completed.size(), size_t{2});
  CHECK(std::find(completed.begin(), completed.end(), reserved) != completed.end());
  CHECK(mirror->wait_idle(-1));
  MirrorPairs p = mirror->drain();
  CHECK_EQ(p.tags.size(), size_t{1});  // the tagged request's row only
  if (!p.tags.empty()) CHECK_EQ(p.tags[0], uint64_t{9});
}

TEST_CASE("mirror: argmax and first-value readings give classes per row") {
  auto champion = batcher(options(8), affine(1, 0));
  auto challenger = batcher(options(8), affine(-1, 0));  // flips the larger of the two
  MirrorOptions o = compare_values();
  o.compare = MirrorCompare::kArgmax;
  auto mirror = std::make_shared<Mirror>(challenger, o);
  champion->set_mirror(mirror);
  CHECK(champion->infer({owned_rows({1, 2, 4, 3})}).code == ErrorCode::kOk);
  champion->submit({owned_rows({1, 2})}, std::make_shared<CompletionQueue>(), 0, -1, 3);
  champion->stop(true);
  mirror->wait_idle(-1);
  MirrorPairs p = mirror->drain();
  CHECK_EQ(p.champion_first.size(), size_t{1});
  CHECK_EQ(p.champion_first[0], 1.0);
  CHECK_EQ(p.challenger_first[0], 0.0);
}

TEST_CASE("mirror: a slow challenger never holds the champion; copies past the slots are dropped") {
  Gate gate;
  auto champion = batcher(options(1), affine(1, 0));
  auto challenger = batcher(options(1), [&](const Batch& b) { gate.pass(); return affine(2, 0)(b); });
  auto mirror = std::make_shared<Mirror>(challenger, compare_values(/*slots=*/2));
  champion->set_mirror(mirror);
  constexpr int kRequests = 20;
  auto q = std::make_shared<CompletionQueue>();
  for (int i = 0; i < kRequests; ++i) {
    champion->submit({owned_rows({float(i), 0})}, q, 0, -1, uint64_t(i + 1));
  }
  champion->stop(true);  // every champion request answered with the challenger still gated
  size_t answered = 0;
  for (auto& group : q->drain()) answered += group.size();
  CHECK_EQ(answered, size_t{kRequests});
  MirrorStats held = mirror->stats();
  CHECK_EQ(held.sent_rows, uint64_t{2});
  CHECK_EQ(held.dropped_rows, uint64_t{kRequests - 2});
  CHECK_EQ(held.in_flight_rows, uint64_t{2});
  gate.open();
  CHECK(mirror->wait_idle(-1));
  CHECK_EQ(mirror->stats().paired_rows, uint64_t{2});
}

TEST_CASE("mirror: a challenger that fails or is stopped counts failures") {
  auto champion = batcher(options(4), affine(1, 0));
  auto failing = batcher(options(4), [](const Batch&) -> std::vector<Tensor> { throw std::runtime_error("boom"); });
  auto mirror = std::make_shared<Mirror>(failing, compare_values());
  champion->set_mirror(mirror);
  auto q = std::make_shared<CompletionQueue>();
  champion->submit({owned_rows({1, 2})}, q, 0, -1, 1);
  champion->stop(true);
  mirror->wait_idle(-1);
  CHECK_EQ(mirror->stats().failed_rows, uint64_t{1});
  CHECK(mirror->drain().tags.empty());

  auto champion2 = batcher(options(4), affine(1, 0));
  auto stopped = batcher(options(4), affine(1, 0));
  stopped->stop(true);
  auto mirror2 = std::make_shared<Mirror>(stopped, compare_values());
  champion2->set_mirror(mirror2);
  champion2->submit({owned_rows({1, 2})}, q, 0, -1, 1);
  champion2->stop(true);
  MirrorStats s = mirror2->stats();
  CHECK_EQ(s.failed_rows, uint64_t{1});
  CHECK_EQ(s.in_flight_rows, uint64_t{0});
}

TEST_CASE("mirror: a copy the challenger's full queue refuses is dropped, not failed") {
  Gate gate;
  auto champion = batcher(options(1), affine(1, 0));
  BatcherOptions c = options(1);
  c.max_queue_size = 1;
  auto challenger = batcher(c, [&](const Batch& b) { gate.pass(); return affine(2, 0)(b); });
  auto mirror = std::make_shared<Mirror>(challenger, compare_values());
  champion->set_mirror(mirror);
  auto q = std::make_shared<CompletionQueue>();
  auto answered = [&](size_t want) {
    size_t got = 0;
    while (got < want) {
      for (auto& group : q->drain()) got += group.size();
      if (got < want) std::this_thread::yield();
    }
  };
  champion->submit({owned_rows({1, 1})}, q, 0, -1, 1);
  gate.wait_entered(1);  // the first copy runs, held at the gate
  champion->submit({owned_rows({2, 2})}, q, 0, -1, 2);
  answered(2);
  // Copies are offered once their champion answers are delivered: wait for the second
  // to be sent (it waits in the challenger's queue, which is then full).
  while (mirror->stats().sent_rows < 2) std::this_thread::yield();
  champion->submit({owned_rows({3, 3})}, q, 0, -1, 3);
  answered(1);
  champion->stop(true);  // its worker has offered the third copy
  MirrorStats s = mirror->stats();
  CHECK_EQ(s.dropped_rows, uint64_t{1});
  CHECK_EQ(s.failed_rows, uint64_t{0});
  CHECK_EQ(challenger->stats().rejected, uint64_t{1});
  gate.open();
  mirror->wait_idle(-1);
  CHECK_EQ(mirror->stats().paired_rows, uint64_t{2});
}

TEST_CASE("mirror: rows of requests larger than the challenger's max_batch_size fail, the rest are copied") {
  auto champion = batcher(options(8, 100000), affine(1, 0));
  auto challenger = batcher(options(2), affine(1, 0));
  auto mirror = std::make_shared<Mirror>(challenger, compare_values());
  champion->set_mirror(mirror);
  auto q = std::make_shared<CompletionQueue>();
  champion->submit({owned_rows({1, 1, 2, 2, 3, 3})}, q, 0, -1, 1);  // 3 rows: too many for the challenger
  champion->submit({owned_rows({4, 4})}, q, 0, -1, 2);
  champion->stop(true);
  mirror->wait_idle(-1);
  MirrorStats s = mirror->stats();
  CHECK_EQ(s.failed_rows + s.paired_rows, uint64_t{4});
  CHECK_EQ(s.failed_rows, uint64_t{3});
}

TEST_CASE("mirror: many threads submitting while the mirror is swapped: every copy accounted once") {
  BatcherOptions o = options(16, 200);
  o.instance_count = 2;
  o.max_queue_size = 4096;
  auto champion = batcher(o, affine(1, 0));
  BatcherOptions c = options(16, 200);
  c.max_queue_size = 4096;
  auto challenger = batcher(c, affine(1, 1));
  auto first = std::make_shared<Mirror>(challenger, compare_values(1 << 20));
  auto second = std::make_shared<Mirror>(challenger, compare_values(1 << 20));
  champion->set_mirror(first);
  constexpr int kThreads = 6, kPerThread = 200;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto q = std::make_shared<CompletionQueue>();
      for (int i = 0; i < kPerThread; ++i) champion->submit({owned_rows({float(t), float(i)})}, q, 0, -1, 1);
      size_t done = 0;
      while (done < size_t{kPerThread}) {
        for (auto& group : q->drain()) {
          for (auto& c : group) errors += c.code != ErrorCode::kOk;
          done += group.size();
        }
        if (done < size_t{kPerThread}) std::this_thread::yield();
      }
    });
  }
  champion->set_mirror(second);
  champion->set_mirror(nullptr);
  champion->set_mirror(first);
  for (auto& th : threads) th.join();
  champion->stop(true);
  first->wait_idle(-1);
  second->wait_idle(-1);
  CHECK_EQ(errors.load(), 0);
  uint64_t offered = 0, paired = 0;
  for (const auto& m : {first, second}) {
    MirrorStats s = m->stats();
    CHECK_EQ(s.offered_rows, s.sent_rows);
    CHECK_EQ(s.sent_rows, s.paired_rows);
    offered += s.offered_rows;
    paired += m->drain().tags.size();
  }
  CHECK_EQ(paired, offered);
  CHECK(offered <= uint64_t{kThreads * kPerThread});
}

TEST_CASE("mirror: bad options are refused with what is wrong") {
  auto challenger = batcher(options(4), affine(1, 0));
  MirrorOptions o = compare_values();
  o.slots = 0;
  CHECK_THROWS_CODE(Mirror(challenger, o), ErrorCode::kInvalidInput);
  o = compare_values();
  o.challenger_output = 3;
  CHECK_THROWS_CODE(Mirror(challenger, o), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(challenger->set_mirror(std::make_shared<Mirror>(challenger, compare_values())),
                    ErrorCode::kInvalidInput);
}
