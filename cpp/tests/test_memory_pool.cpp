#include <atomic>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "conveyor/memory_pool.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace conveyor {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The message of the conveyor::Error that fn throws, or "" when it throws none.
template <typename Fn>
std::string error_message(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::shared_ptr<MemoryPool> host_pool(uint64_t limit_bytes = 0) {
  return MemoryPool::create(MemoryKind::kHost, 0, limit_bytes);
}

TEST_CASE("size classes: 64-byte steps up to 512, then within 2^(1/4) of the request") {
  CHECK_EQ(MemoryPool::size_class(0), 64u);
  CHECK_EQ(MemoryPool::size_class(1), 64u);
  CHECK_EQ(MemoryPool::size_class(64), 64u);
  CHECK_EQ(MemoryPool::size_class(65), 128u);
  CHECK_EQ(MemoryPool::size_class(512), 512u);
  size_t previous = 0;
  double worst_overhead = 0;
  // Every size up to 64 KiB, then a sweep with a prime stride up to 64 GiB.
  for (size_t n = 0; n < (size_t{1} << 36); n += (n < 65536 ? 1 : n / 97 + 1)) {
    const size_t cls = MemoryPool::size_class(n);
    CHECK(cls >= n);
    CHECK(cls >= previous);  // monotonic
    if (n <= 512) CHECK_EQ(cls % 64, 0u);
    if (n > 512) worst_overhead = std::max(worst_overhead, double(cls) / double(n) - 1.0);
    previous = cls;
  }
  CHECK(worst_overhead <= 0.1893);
  CHECK(worst_overhead > 0.15);  // four classes per doubling, not more
  // Powers of two are classes of their own: such tensors waste nothing.
  for (int log2 = 6; log2 <= 48; ++log2) CHECK_EQ(MemoryPool::size_class(size_t{1} << log2), size_t{1} << log2);
  CHECK_EQ(MemoryPool::size_class(1025), 1218u);
  CHECK_EQ(MemoryPool::size_class((size_t{1} << 48) + 1), 0u);  // beyond the largest class
}

TEST_CASE("blocks: size class, alignment, zero bytes") {
  auto pool = host_pool();
  auto empty = pool->allocate(0);
  CHECK(empty->data != nullptr);
  CHECK_EQ(empty->size, 64u);
  for (size_t n : {size_t{1}, size_t{100}, size_t{4096}, size_t{100000}, kMiB}) {
    auto block = pool->allocate(n);
    CHECK_EQ(block->size, MemoryPool::size_class(n));
    CHECK_EQ(reinterpret_cast<uintptr_t>(block->data) % 64, 0u);
    std::memset(block->data, 0xab, block->size);  // the whole class is usable
  }
  for (size_t n : {2 * kMiB, 3 * kMiB + 5, 64 * kMiB}) {
    auto block = pool->allocate(n);
    CHECK_EQ(reinterpret_cast<uintptr_t>(block->data) % (2 * kMiB), 0u);
    std::memset(block->data, 0xcd, block->size);
  }
  CHECK(pool->kind() == MemoryKind::kHost);
  CHECK(pool->device() == (Device{DeviceKind::kCPU, 0}));
}

TEST_CASE("stats add up: in use + cached = reserved") {
  auto pool = host_pool();
  std::vector<std::shared_ptr<Block>> blocks;
  uint64_t expected_in_use = 0;
  for (size_t n : {size_t{10}, size_t{700}, size_t{5000}, size_t{70000}, 3 * kMiB}) {
    blocks.push_back(pool->allocate(n));
    expected_in_use += MemoryPool::size_class(n);
  }
  PoolStats s = pool->stats();
  CHECK_EQ(s.bytes_in_use, expected_in_use);
  CHECK_EQ(s.bytes_reserved, expected_in_use);
  CHECK_EQ(s.peak_bytes_in_use, expected_in_use);
  CHECK_EQ(s.misses, 5u);
  CHECK_EQ(s.hits, 0u);
  CHECK_EQ(s.upstream_allocs, 5u);
  CHECK_EQ(s.limit_bytes, 0u);

  uint64_t cached = 0;
  for (int i : {1, 3}) {
    cached += blocks[i]->size;
    blocks[i].reset();
  }
  s = pool->stats();
  CHECK_EQ(s.bytes_in_use + cached, s.bytes_reserved);
  CHECK_EQ(s.peak_bytes_in_use, expected_in_use);
  CHECK_EQ(s.upstream_frees, 0u);
}

TEST_CASE("reuse: a freed block serves the next request of its class") {
  auto pool = host_pool();
  void* first = nullptr;
  for (int i = 0; i < 1000; ++i) {
    auto block = pool->allocate(1000 + i % 10);  // one class: 1000..1009 -> 1024
    if (i == 0) first = block->data;
    CHECK(block->data == first);
  }
  PoolStats s = pool->stats();
  CHECK_EQ(s.upstream_allocs, 1u);
  CHECK_EQ(s.misses, 1u);
  CHECK_EQ(s.hits, 999u);
  CHECK_EQ(s.bytes_in_use, 0u);
  CHECK_EQ(s.bytes_reserved, 1024u);
}

TEST_CASE("under AddressSanitizer a cached block is poisoned until it is handed out again") {
#if defined(__SANITIZE_ADDRESS__)
  auto pool = host_pool();
  for (size_t nbytes : {size_t{100}, size_t{5000}, 3 * kMiB}) {  // C heap and mmap-backed classes
    void* data = nullptr;
    {
      auto block = pool->allocate(nbytes);
      data = block->data;
      CHECK(__asan_region_is_poisoned(data, nbytes) == nullptr);
      std::memset(data, 1, nbytes);
    }
    // Cached: any byte read through a stale pointer would be reported.
    CHECK(__asan_address_is_poisoned(data));
    CHECK(__asan_address_is_poisoned(static_cast<char*>(data) + nbytes - 1));
    auto again = pool->allocate(nbytes);
    CHECK(again->data == data);
    CHECK(__asan_region_is_poisoned(again->data, nbytes) == nullptr);
  }
  // Trimmed blocks go back upstream unpoisoned (the C heap and munmap own them again).
  { auto block = pool->allocate(200); }
  CHECK(pool->trim() > 0);
#endif
}

TEST_CASE("limit: flush the cache, retry, then out of memory with numbers") {
  auto pool = host_pool(4 * kMiB);
  pool->allocate(2 * kMiB).reset();  // cached: 2 MiB reserved, none in use
  auto b = pool->allocate(kMiB);
  auto c = pool->allocate(kMiB);
  CHECK_EQ(pool->stats().bytes_reserved, 4 * kMiB);
  auto d = pool->allocate(kMiB);  // over the limit until the cached 2 MiB go back upstream
  PoolStats s = pool->stats();
  CHECK_EQ(s.upstream_frees, 1u);
  CHECK_EQ(s.bytes_reserved, 3 * kMiB);
  CHECK_EQ(s.bytes_in_use, 3 * kMiB);
  CHECK_EQ(s.limit_bytes, 4 * kMiB);

  std::string message;
  CHECK_THROWS_CODE(pool->allocate(kMiB + 1), ErrorCode::kOutOfMemory);
  message = error_message([&] { pool->allocate(kMiB + 1); });
  CHECK(contains(message, "[memory] out of memory on cpu"));
  CHECK(contains(message, "requested 1048577 bytes (size class 1246975)"));
  CHECK(contains(message, "3145728 in use"));
  CHECK(contains(message, "limit 4194304"));
  // The failure changed nothing: the pool still serves what fits.
  CHECK_EQ(pool->stats().bytes_reserved, 3 * kMiB);
  auto e = pool->allocate(kMiB);
  CHECK_EQ(pool->stats().bytes_in_use, 4 * kMiB);
  // A request larger than the limit itself fails the same way.
  CHECK_THROWS_CODE(host_pool(kMiB)->allocate(2 * kMiB), ErrorCode::kOutOfMemory);
}

TEST_CASE("upstream failure and oversized requests are kOutOfMemory") {
  auto pool = host_pool();
  // 2^48 bytes exceeds the user address space (47 bits), so mmap refuses it.
  const std::string message = error_message([&] { pool->allocate(size_t{1} << 48); });
  CHECK(contains(message, "[memory] out of memory on cpu: requested 281474976710656 bytes"));
  CHECK(contains(message, "mmap failed"));
  CHECK(contains(message, "no limit"));
  CHECK_THROWS_CODE(pool->allocate((size_t{1} << 48) + 1), ErrorCode::kOutOfMemory);
  PoolStats s = pool->stats();
  CHECK_EQ(s.bytes_reserved, 0u);
  CHECK_EQ(s.upstream_allocs, 0u);
  CHECK_EQ(s.misses, 0u);
}

TEST_CASE("trim releases cached blocks only and returns their bytes") {
  auto pool = host_pool();
  auto kept = pool->allocate(3000);
  pool->allocate(100).reset();
  pool->allocate(5 * kMiB).reset();
  const uint64_t cached = MemoryPool::size_class(100) + MemoryPool::size_class(5 * kMiB);
  CHECK_EQ(pool->trim(), cached);
  PoolStats s = pool->stats();
  CHECK_EQ(s.bytes_reserved, kept->size);
  CHECK_EQ(s.bytes_in_use, kept->size);
  CHECK_EQ(s.upstream_frees, 2u);
  CHECK_EQ(pool->trim(), 0u);
  kept.reset();
  CHECK_EQ(pool->trim(), MemoryPool::size_class(3000));
  CHECK_EQ(pool->stats().bytes_reserved, 0u);
}

TEST_CASE("reset_peak starts the peak again from what is in use") {
  auto pool = host_pool();
  auto a = pool->allocate(kMiB);
  pool->allocate(4 * kMiB).reset();
  CHECK_EQ(pool->stats().peak_bytes_in_use, 5 * kMiB);
  pool->reset_peak();
  CHECK_EQ(pool->stats().peak_bytes_in_use, kMiB);
  auto b = pool->allocate(1024);
  CHECK_EQ(pool->stats().peak_bytes_in_use, kMiB + 1024);
}

TEST_CASE("blocks outlive the last outside reference to their pool") {
  std::weak_ptr<MemoryPool> weak;
  std::shared_ptr<Block> small, large;
  {
    auto pool = host_pool();
    weak = pool;
    small = pool->allocate(200);
    large = pool->allocate(3 * kMiB);
    pool->allocate(300).reset();  // a cached block, released when the pool goes
  }
  CHECK(!weak.expired());
  std::memset(small->data, 1, small->size);
  std::memset(large->data, 2, large->size);
  CHECK_EQ(weak.lock()->stats().bytes_in_use, small->size + large->size);
  small.reset();
  CHECK(!weak.expired());
  large.reset();
  CHECK(weak.expired());  // the last block took the pool (and its cache) with it
}

TEST_CASE("pooled tensors keep their block") {
  auto pool = host_pool();
  Tensor t = make_pooled_tensor(pool, DType::kFloat32, Shape{4, 100});
  CHECK(t.data != nullptr);
  CHECK(t.owner != nullptr);
  CHECK(t.device == (Device{DeviceKind::kCPU, 0}));
  CHECK_EQ(pool->stats().bytes_in_use, MemoryPool::size_class(1600));
  Tensor copy = t;
  t = Tensor{};
  CHECK_EQ(pool->stats().bytes_in_use, MemoryPool::size_class(1600));
  copy = Tensor{};
  CHECK_EQ(pool->stats().bytes_in_use, 0u);
}

TEST_CASE("default_host is one process-wide pool without a limit") {
  auto a = MemoryPool::default_host();
  auto b = MemoryPool::default_host();
  CHECK(a == b);
  CHECK(a->kind() == MemoryKind::kHost);
  CHECK_EQ(a->stats().limit_bytes, 0u);
  auto block = a->allocate(123);
  CHECK(block->data != nullptr);
}

TEST_CASE("CUDA kinds: unavailable without CUDA or a GPU, working with one") {
  if (!cuda_built()) CHECK_EQ(cuda_device_count(), 0);
  if (cuda_device_count() == 0) {
    CHECK_THROWS_CODE(MemoryPool::create(MemoryKind::kCuda, 0), ErrorCode::kUnavailable);
    CHECK_THROWS_CODE(MemoryPool::create(MemoryKind::kPinnedHost), ErrorCode::kUnavailable);
    const std::string message = error_message([] { MemoryPool::create(MemoryKind::kCuda, 1); });
    CHECK(contains(message, "[memory]"));
    CHECK(contains(message, "cuda:1"));
    if (!cuda_built()) CHECK(contains(message, "CUDA support was not built"));
    return;
  }
  for (MemoryKind kind : {MemoryKind::kPinnedHost, MemoryKind::kCuda}) {
    auto pool = MemoryPool::create(kind, 0, 64 * kMiB);
    pool->allocate(kMiB).reset();
    auto block = pool->allocate(kMiB);
    PoolStats s = pool->stats();
    CHECK_EQ(s.hits, 1u);
    CHECK_EQ(s.upstream_allocs, 1u);
    CHECK_EQ(pool->trim(), 0u);
    block.reset();
    CHECK_EQ(pool->trim(), kMiB);
    CHECK_THROWS_CODE(pool->allocate(65 * kMiB), ErrorCode::kOutOfMemory);
  }
  CHECK_THROWS_CODE(MemoryPool::create(MemoryKind::kCuda, cuda_device_count()), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(MemoryPool::create(MemoryKind::kCuda, -1), ErrorCode::kInvalidInput);
}

TEST_CASE("threads: 8 x 20000 allocations and frees with exact accounting") {
  constexpr int kThreads = 8;
  constexpr int kOpsPerThread = 20000;
  auto pool = host_pool();
  std::atomic<int> corrupted{0};
  std::atomic<uint64_t> allocations{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1234 + t);
      std::vector<std::pair<std::shared_ptr<Block>, uint32_t>> held;
      for (int op = 0; op < kOpsPerThread; ++op) {
        if (held.size() < 16 && (held.empty() || rng() % 2 == 0)) {
          const size_t sizes[] = {0, 48, 200, 1000, 4096, 70000, 3 * kMiB};
          auto block = pool->allocate(sizes[rng() % 7]);
          allocations.fetch_add(1, std::memory_order_relaxed);
          // Stamp the first word: a block handed to two owners at once shows up as a
          // mismatch at release.
          const uint32_t stamp = static_cast<uint32_t>(t) << 24 | static_cast<uint32_t>(op);
          std::memcpy(block->data, &stamp, sizeof(stamp));
          held.emplace_back(std::move(block), stamp);
        } else {
          const size_t victim = rng() % held.size();
          uint32_t seen = 0;
          std::memcpy(&seen, held[victim].first->data, sizeof(seen));
          if (seen != held[victim].second) corrupted.fetch_add(1);
          held[victim] = std::move(held.back());
          held.pop_back();
        }
        if (op % 5000 == 4999 && t == 0) pool->trim();  // trims race with everything else
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK_EQ(corrupted.load(), 0);
  PoolStats s = pool->stats();
  CHECK_EQ(s.bytes_in_use, 0u);
  CHECK_EQ(s.hits + s.misses, allocations.load());
  CHECK(s.hits > s.misses);
  CHECK_EQ(s.misses, s.upstream_allocs);
  const uint64_t cached = pool->trim();
  CHECK_EQ(cached, s.bytes_reserved);
  s = pool->stats();
  CHECK_EQ(s.bytes_reserved, 0u);
  CHECK_EQ(s.upstream_allocs, s.upstream_frees);
}

}  // namespace
}  // namespace conveyor
