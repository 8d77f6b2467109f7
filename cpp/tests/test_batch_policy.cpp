// The batching decision is a pure function: these tests drive it with a fake clock.
#include "check.h"
#include "conveyor/batch_policy.h"

using namespace conveyor;
using std::chrono::microseconds;

namespace {

const TimePoint t0 = TimePoint{} + std::chrono::hours(1);

PendingView req(int64_t rows, int64_t enqueued_us, uint64_t shape = 0, TimePoint deadline = kNoDeadline) {
  return PendingView{rows, shape, t0 + microseconds(enqueued_us), deadline};
}

BatchPolicy policy(int64_t max_batch, int64_t delay_us, std::vector<int64_t> preferred = {}) {
  return BatchPolicy{max_batch, microseconds(delay_us), std::move(preferred)};
}

std::vector<QueuePos> positions(std::initializer_list<std::pair<uint32_t, uint32_t>> list) {
  std::vector<QueuePos> out;
  for (auto [l, i] : list) out.push_back({l, i});
  return out;
}

}  // namespace

TEST_CASE("policy: empty queue is idle") {
  auto d = decide_batch(PendingLevels(std::vector<std::vector<PendingView>>(1)), t0, policy(8, 100));
  CHECK(d.kind == BatchDecision::Kind::kIdle);
  CHECK(d.selected.empty());
}

TEST_CASE("policy: zero delay dispatches what is queued at once") {
  auto d = decide_batch(PendingLevels({{req(1, 0), req(2, 1)}}), t0 + microseconds(1), policy(8, 0));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 3);
  CHECK(d.selected == positions({{0, 0}, {0, 1}}));
}

TEST_CASE("policy: waits for company until the oldest request's delay ends") {
  PendingLevels q({{req(1, 0), req(1, 40)}});
  auto d = decide_batch(q, t0 + microseconds(50), policy(8, 100));
  CHECK(d.kind == BatchDecision::Kind::kWait);
  CHECK(d.wake_at == t0 + microseconds(100));
  CHECK(d.selected.empty());
  d = decide_batch(q, t0 + microseconds(100), policy(8, 100));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 2);
}

TEST_CASE("policy: a full batch goes at once, the rest stays queued") {
  PendingLevels q({{req(3, 0), req(3, 1), req(3, 2)}});
  auto d = decide_batch(q, t0 + microseconds(3), policy(8, 1000));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 6);  // the third request would make 9 > 8: the batch is closed
  CHECK(d.selected == positions({{0, 0}, {0, 1}}));
  PendingLevels exact({{req(4, 0), req(4, 1)}});
  d = decide_batch(exact, t0 + microseconds(2), policy(8, 1000));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 8);
}

TEST_CASE("policy: only requests of the same shape are batched, in service order") {
  PendingLevels q({{req(1, 0, 7), req(1, 1, 9), req(1, 2, 7)}});
  auto d = decide_batch(q, t0 + microseconds(500), policy(8, 100));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK(d.selected == positions({{0, 0}, {0, 2}}));
  CHECK_EQ(d.rows, 2);
}

TEST_CASE("policy: higher priority levels are served first") {
  PendingLevels q({{req(1, 50)}, {req(1, 0), req(1, 1)}});
  auto d = decide_batch(q, t0 + microseconds(60), policy(2, 0));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK(d.selected == positions({{0, 0}, {1, 0}}));
}

TEST_CASE("policy: reaching the largest preferred size dispatches that size") {
  PendingLevels q({{req(1, 0), req(1, 1), req(1, 2), req(1, 3), req(1, 4)}});
  auto d = decide_batch(q, t0 + microseconds(5), policy(16, 1000, {2, 4}));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 4);
  CHECK_EQ(d.selected.size(), size_t{4});
  // Below the largest preferred size it waits for the delay, then sends everything.
  PendingLevels small({{req(1, 0), req(1, 1), req(1, 2)}});
  d = decide_batch(small, t0 + microseconds(5), policy(16, 1000, {2, 4}));
  CHECK(d.kind == BatchDecision::Kind::kWait);
  d = decide_batch(small, t0 + microseconds(1000), policy(16, 1000, {2, 4}));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 3);
}

TEST_CASE("policy: preferred size not hit exactly takes the longest prefix below it") {
  PendingLevels q({{req(3, 0), req(3, 1), req(3, 2)}});
  auto d = decide_batch(q, t0 + microseconds(3), policy(16, 1000, {4, 8}));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK_EQ(d.rows, 6);
  CHECK_EQ(d.selected.size(), size_t{2});
}

TEST_CASE("policy: expired requests are reported and never selected") {
  PendingLevels q({{req(1, 0, 0, t0 + microseconds(10)), req(1, 1), req(1, 2, 0, t0 + microseconds(500))}});
  auto d = decide_batch(q, t0 + microseconds(20), policy(8, 1000));
  CHECK(d.expired == positions({{0, 0}}));
  CHECK(d.kind == BatchDecision::Kind::kWait);
  CHECK(d.wake_at == t0 + microseconds(500));  // the deadline comes before the delay ends
}

TEST_CASE("policy: a model that does not batch runs one request at a time") {
  PendingLevels q({{req(1, 0), req(1, 1)}});
  auto d = decide_batch(q, t0 + microseconds(1), policy(0, 1000));
  CHECK(d.kind == BatchDecision::Kind::kDispatch);
  CHECK(d.selected == positions({{0, 0}}));
  CHECK_EQ(d.rows, 1);
}

TEST_CASE("policy: the same snapshot and clock give the same decision") {
  PendingLevels q({{req(2, 0, 1), req(1, 5, 2), req(2, 9, 1)}, {req(1, 3, 1)}});
  auto a = decide_batch(q, t0 + microseconds(7), policy(4, 10, {4}));
  auto b = decide_batch(q, t0 + microseconds(7), policy(4, 10, {4}));
  CHECK(a.kind == b.kind);
  CHECK(a.selected == b.selected);
  CHECK(a.wake_at == b.wake_at);
}
