// The rollout routing decision: the hash's fixed values (shared with the Python
// reference), shares per weight, monotone canary steps, shadow sampling, validation.
#include <cstdint>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "check.h"
#include "conveyor/error.h"
#include "conveyor/router.h"

using namespace conveyor;
using namespace conveyor::router;

namespace {

// The bound of `percent` of the points (floor), as router.py computes it for whole percents.
uint64_t bound(uint64_t percent) { return static_cast<uint64_t>((static_cast<unsigned __int128>(kPointLimit) * percent) / 100); }

RouteTable canary(uint64_t challenger_percent, uint64_t salt_basis = kFnvOffsetBasis) {
  return RouteTable{{bound(challenger_percent), kPointLimit}, 0, salt_basis, true};
}

std::string key(int i) { return "user-" + std::to_string(i); }

}  // namespace

TEST_CASE("router: FNV-1a and the key draw keep their published and fixed values") {
  CHECK_EQ(fnv1a64("a"), 0xAF63DC4C8601EC8Cull);
  CHECK_EQ(fnv1a64("foobar"), 0x85944171F73967E8ull);
  // Also asserted by tests/test_rollout_router.py: C++ and Python hash alike.
  CHECK_EQ(key_draw("", kFnvOffsetBasis), 0xF52A15E9A9B5E89Bull);
}

TEST_CASE("router: a key keeps its arm, and shares follow the weights") {
  Router router(canary(10), 1);
  int on_challenger = 0;
  for (int i = 0; i < 20000; ++i) {
    const std::string k = key(i);
    const uint32_t first = router.decide(k.data(), k.size());
    CHECK_EQ(router.decide(k.data(), k.size()), first);
    on_challenger += first == 0 ? 1 : 0;
  }
  // 99.99% binomial band of 10% of 20000 is about 2000 +- 160.
  CHECK(on_challenger > 1840 && on_challenger < 2160);
}

TEST_CASE("router: raising the challenger's weight only moves keys to it") {
  std::unordered_set<int> before;
  for (uint64_t percent : {1, 10, 25, 60, 100}) {
    Router router(canary(percent), 1);
    std::unordered_set<int> now;
    for (int i = 0; i < 5000; ++i) {
      const std::string k = key(i);
      if (router.decide(k.data(), k.size()) / 2 == 0) now.insert(i);
    }
    for (int i : before) CHECK(now.count(i) == 1);
    before = std::move(now);
  }
  CHECK_EQ(before.size(), size_t{5000});
}

TEST_CASE("router: without a key, draws are random by weight and repeat with the seed") {
  Router a(canary(30), 99), b(canary(30), 99);
  int on_challenger = 0;
  for (int i = 0; i < 20000; ++i) {
    const uint32_t decision = a.decide(nullptr, 0);
    CHECK_EQ(b.decide("", 0), decision);  // an empty key is no key
    on_challenger += decision == 0 ? 1 : 0;
  }
  CHECK(on_challenger > 5800 && on_challenger < 6200);
}

TEST_CASE("router: not sticky ignores the key") {
  RouteTable table = canary(50);
  table.sticky = false;
  Router router(table, 5);
  std::unordered_set<uint32_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(router.decide("same", 4));
  CHECK_EQ(seen.size(), size_t{2});
}

TEST_CASE("router: shadow share, and an arm at 0 or 100 percent") {
  RouteTable table{{kPointLimit}, bound(40), kFnvOffsetBasis, true};
  Router router(table, 3);
  int copied = 0;
  for (int i = 0; i < 20000; ++i) {
    const uint32_t decision = router.decide(nullptr, 0);
    CHECK_EQ(decision / 2, 0u);
    copied += static_cast<int>(decision & 1);
  }
  CHECK(copied > 7800 && copied < 8200);
  Router none(canary(0), 4), all(canary(100), 4);
  for (int i = 0; i < 2000; ++i) {
    CHECK_EQ(none.decide(nullptr, 0), 2u);
    CHECK_EQ(all.decide(nullptr, 0), 0u);
  }
}

TEST_CASE("router: concurrent callers get distinct random draws") {
  Router router(canary(50), 0);
  std::vector<std::vector<uint64_t>> draws(4);
  std::vector<std::thread> threads;
  for (auto& mine : draws) {
    threads.emplace_back([&router, &mine] {
      for (int i = 0; i < 10000; ++i) mine.push_back(router.next_random());
    });
  }
  for (auto& thread : threads) thread.join();
  std::unordered_set<uint64_t> distinct;
  for (const auto& mine : draws) distinct.insert(mine.begin(), mine.end());
  CHECK_EQ(distinct.size(), size_t{40000});
}

TEST_CASE("router: bad tables are refused") {
  auto build = [](RouteTable table) { Router router(std::move(table), 0); };
  const RouteTable no_arms{{}, 0, 0, true};
  const RouteTable descending{{bound(50), bound(20), kPointLimit}, 0, 0, true};
  const RouteTable short_of_100{{bound(50)}, 0, 0, true};
  const RouteTable shadow_over_100{{kPointLimit}, kPointLimit + 1, 0, true};
  CHECK_THROWS_CODE(build(no_arms), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(build(descending), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(build(short_of_100), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(build(shadow_over_100), ErrorCode::kInvalidInput);
}
