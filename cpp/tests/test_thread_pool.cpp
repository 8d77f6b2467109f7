// parallel_for: every index exactly once, errors surface on the caller; run under TSan.
#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "conveyor/cpu_features.h"
#include "conveyor/error.h"
#include "conveyor/thread_pool.h"

using namespace conveyor;

TEST_CASE("thread pool: every index is visited exactly once") {
  for (int threads : {1, 2, 3, 8}) {
    for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{1000}}) {
      std::vector<std::atomic<int>> visits(static_cast<size_t>(n));
      parallel_for(n, threads, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) visits[static_cast<size_t>(i)].fetch_add(1);
      });
      int wrong = 0;
      for (auto& v : visits) wrong += v.load() != 1;
      CHECK_EQ(wrong, 0);
    }
  }
  CHECK(thread_pool_size() >= 1);
}

TEST_CASE("thread pool: concurrent callers and errors") {
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      for (int round = 0; round < 50; ++round) {
        parallel_for(100, 3, [&](int64_t begin, int64_t end) { total.fetch_add(end - begin); });
      }
    });
  }
  for (auto& c : callers) c.join();
  CHECK_EQ(total.load(), int64_t{4 * 50 * 100});
  bool thrown = false;
  try {
    parallel_for(10, 4, [](int64_t begin, int64_t) {
      if (begin > 0) throw std::runtime_error("chunk failed");
    });
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  CHECK(thrown);
}

TEST_CASE("cpu features: the baseline can always be forced") {
  force_cpu_isa(CpuIsa::kBaseline);
  CHECK(active_cpu_isa() == CpuIsa::kBaseline);
  reset_cpu_isa();
  if (!cpu_has_avx2_fma() || !avx2_variants_built()) {
    CHECK_THROWS_CODE(force_cpu_isa(CpuIsa::kAvx2), ErrorCode::kInvalidInput);
  }
}
