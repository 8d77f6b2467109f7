// The caching pool behind every MemoryKind, and the host upstream allocator.
//
// Bookkeeping lives here, device hooks behind UpstreamAllocator. One mutex guards the
// free lists and counters; it is held for a free-list pop or push and a few additions,
// never across an upstream call (mmap, cudaMalloc, cudaHostAlloc can take milliseconds).
#include "conveyor/memory_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "memory_upstream.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace conveyor {

namespace {

// ---- AddressSanitizer ----------------------------------------------------------------
// A cached block is freed memory as far as its last user is concerned: under ASan it is
// poisoned while it sits on a free list, so a read or write through a stale pointer (a
// numpy view that outlived its owner, say) is reported instead of silently hitting the
// cache. Device memory has no shadow: only host-side kinds are poisoned.
#if defined(__SANITIZE_ADDRESS__)
void poison_cached(MemoryKind kind, void* data, size_t nbytes) noexcept {
  if (kind != MemoryKind::kCuda) ASAN_POISON_MEMORY_REGION(data, nbytes);
}
void unpoison_cached(MemoryKind kind, void* data, size_t nbytes) noexcept {
  if (kind != MemoryKind::kCuda) ASAN_UNPOISON_MEMORY_REGION(data, nbytes);
}
#else
void poison_cached(MemoryKind, void*, size_t) noexcept {}
void unpoison_cached(MemoryKind, void*, size_t) noexcept {}
#endif

using memory_detail::UpstreamAllocator;
using memory_detail::UpstreamError;

// ---- size classes ------------------------------------------------------------------
// 64-byte steps up to 512 bytes, then four classes per doubling on the geometric series
// 512 * 2^(j/4): every power of two is a class (power-of-two tensors waste nothing), and
// a class is at most 2^(1/4) (18.9%) above any request it serves.
constexpr size_t kSmallStepBytes = 64;
constexpr size_t kSmallLimitBytes = 512;
constexpr int kSmallClasses = 8;
constexpr int kFirstGeometricLog2 = 9;  // log2(kSmallLimitBytes)
constexpr int kLargestClassLog2 = 48;   // 256 TiB: beyond any machine, so no request is "too big" in practice
constexpr int kClassesPerDoubling = 4;
constexpr int kNumClasses =
    kSmallClasses + kClassesPerDoubling * (kLargestClassLog2 - kFirstGeometricLog2);
constexpr size_t kLargestClassBytes = size_t{1} << kLargestClassLog2;

constexpr uint64_t ceil_to_u64(double x) {
  const auto t = static_cast<uint64_t>(x);
  return static_cast<double>(t) < x ? t + 1 : t;
}

constexpr std::array<uint64_t, kNumClasses> build_class_sizes() {
  std::array<uint64_t, kNumClasses> sizes{};
  for (int i = 0; i < kSmallClasses; ++i) sizes[i] = kSmallStepBytes * (i + 1);
  // 2^(1/4), 2^(2/4), 2^(3/4); doubles are exact enough: a rounding slip moves a class by a byte.
  constexpr double kSteps[3] = {1.1892071150027210, 1.4142135623730951, 1.6817928305074290};
  int n = kSmallClasses;
  for (int log2 = kFirstGeometricLog2; log2 < kLargestClassLog2; ++log2) {
    const auto base = static_cast<double>(uint64_t{1} << log2);
    for (double step : kSteps) sizes[n++] = ceil_to_u64(base * step);
    sizes[n++] = uint64_t{1} << (log2 + 1);
  }
  return sizes;
}

constexpr std::array<uint64_t, kNumClasses> kClassBytes = build_class_sizes();
static_assert(kClassBytes[kSmallClasses - 1] == kSmallLimitBytes);
static_assert(kClassBytes[kSmallClasses] == 609 && kClassBytes[kSmallClasses + 3] == 1024);
static_assert(kClassBytes[kNumClasses - 1] == kLargestClassBytes);

// Precondition: nbytes <= kLargestClassBytes.
inline int class_index(size_t nbytes) noexcept {
  if (nbytes <= kSmallLimitBytes) return nbytes == 0 ? 0 : static_cast<int>((nbytes - 1) / kSmallStepBytes);
  // 2^log2 < nbytes <= 2^(log2 + 1); that doubling's four classes start at `first`.
  const int log2 = static_cast<int>(std::bit_width(nbytes - 1)) - 1;
  const int first = kSmallClasses + kClassesPerDoubling * (log2 - kFirstGeometricLog2);
  return first + (nbytes > kClassBytes[first]) + (nbytes > kClassBytes[first + 1]) +
         (nbytes > kClassBytes[first + 2]);
}

// ---- host upstream -----------------------------------------------------------------
constexpr size_t kHostAlignment = 64;           // a cache line; every SIMD width we compile for
constexpr size_t kHugePageBytes = size_t{2} << 20;  // x86-64 and 4K-page arm64 transparent huge pages

size_t page_bytes() noexcept {
  static const size_t bytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return bytes;
}

constexpr uintptr_t round_up(uintptr_t value, uintptr_t multiple) noexcept {
  return (value + multiple - 1) / multiple * multiple;
}

// Small blocks from the C allocator; blocks of 2 MiB and more mapped directly, 2 MiB
// aligned and advised for huge pages, so a fresh large block faults in 2 MiB at a time and
// its release goes straight back to the kernel instead of fragmenting the C heap.
class HostUpstream final : public UpstreamAllocator {
 public:
  void* allocate(size_t nbytes, UpstreamError* error) noexcept override {
    if (nbytes >= kHugePageBytes) return map_aligned(nbytes, error);
    void* data = nullptr;
    const int rc = posix_memalign(&data, kHostAlignment, nbytes);
    if (rc != 0) {
      *error = {"posix_memalign", std::strerror(rc)};
      return nullptr;
    }
    return data;
  }

  void release(void* data, size_t nbytes) noexcept override {
    if (nbytes >= kHugePageBytes) {
      munmap(data, round_up(nbytes, page_bytes()));
    } else {
      std::free(data);
    }
  }

 private:
  static void* map_aligned(size_t nbytes, UpstreamError* error) noexcept {
    const size_t length = round_up(nbytes, page_bytes());
    // Over-map by one huge page, then unmap the unaligned head and the tail.
    const size_t span = length + kHugePageBytes;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      *error = {"mmap", std::strerror(errno)};
      return nullptr;
    }
    const auto begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up(begin, kHugePageBytes);
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t tail = aligned + length;
    if (begin + span > tail) munmap(reinterpret_cast<void*>(tail), begin + span - tail);
    // Advisory only: where transparent huge pages are off the block is as valid, just
    // slower to fault in.
    madvise(reinterpret_cast<void*>(aligned), length, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(aligned);
  }
};

// ---- the pool ----------------------------------------------------------------------
class CachingPool;

// What allocate() hands out. Holds its pool, so the pool outlives every block.
struct PooledBlock final : Block {
  PooledBlock(std::shared_ptr<CachingPool> owner, void* block_data, int block_class);
  ~PooledBlock();
  PooledBlock(const PooledBlock&) = delete;
  PooledBlock& operator=(const PooledBlock&) = delete;

  std::shared_ptr<CachingPool> pool;
  int class_index;
};

class CachingPool final : public MemoryPool {
 public:
  CachingPool(MemoryKind kind, int device_index, uint64_t limit_bytes,
              std::unique_ptr<UpstreamAllocator> upstream)
      : kind_(kind),
        device_index_(device_index),
        label_(memory_detail::device_label(kind, device_index)),
        upstream_(std::move(upstream)) {
    stats_.limit_bytes = limit_bytes;
  }

  // No lock: the last reference is going, and every block holds one, so nothing is in use.
  ~CachingPool() override {
    for (int i = 0; i < kNumClasses; ++i) {
      for (void* data : cached_[i]) release_upstream(data, kClassBytes[i]);
    }
  }

  std::shared_ptr<Block> allocate(size_t nbytes) override;
  uint64_t trim() override;

  PoolStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

  MemoryKind kind() const noexcept override { return kind_; }

  Device device() const noexcept override {
    switch (kind_) {
      case MemoryKind::kHost: return Device{DeviceKind::kCPU, 0};
      case MemoryKind::kPinnedHost: return Device{DeviceKind::kCUDAHost, 0};
      case MemoryKind::kCuda: break;
    }
    return Device{DeviceKind::kCUDA, device_index_};
  }

  // Called by ~PooledBlock: the block goes back on its class's free list.
  void give_back(void* data, int class_index) noexcept;

 private:
  enum class Claim { kCached, kReserved, kOverLimit };

  // Under the lock: pops a cached block of the class into *data (a hit), or else reserves
  // the class's bytes against the limit for an upstream call (a miss in the making).
  Claim claim(int class_index, void** data);
  // Hands a cached (poisoned) block back to the upstream allocator.
  void release_upstream(void* data, size_t nbytes) noexcept {
    unpoison_cached(kind_, data, nbytes);
    upstream_->release(data, nbytes);
  }
  // Goes upstream for a reserved class; on failure gives the reservation back.
  void* allocate_reserved(int class_index, UpstreamError* error);
  [[noreturn]] void throw_out_of_memory(size_t nbytes, int class_index, bool over_limit,
                                        const UpstreamError& error) const;

  const MemoryKind kind_;
  const int device_index_;
  const std::string label_;  // "cpu", "cuda_host", "cuda:N" for messages
  const std::unique_ptr<UpstreamAllocator> upstream_;

  mutable std::mutex mu_;
  std::array<std::vector<void*>, kNumClasses> cached_;  // guarded by mu_
  PoolStats stats_;                                     // guarded by mu_; limit_bytes is fixed
};

PooledBlock::PooledBlock(std::shared_ptr<CachingPool> owner, void* block_data, int block_class)
    : pool(std::move(owner)), class_index(block_class) {
  data = block_data;
  size = kClassBytes[block_class];
}

PooledBlock::~PooledBlock() { pool->give_back(data, class_index); }

CachingPool::Claim CachingPool::claim(int class_index, void** data) {
  const uint64_t bytes = kClassBytes[class_index];
  std::lock_guard<std::mutex> lock(mu_);
  auto& free_list = cached_[class_index];
  if (!free_list.empty()) {
    *data = free_list.back();
    free_list.pop_back();
    unpoison_cached(kind_, *data, bytes);
    ++stats_.hits;
    stats_.bytes_in_use += bytes;
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return Claim::kCached;
  }
  if (stats_.limit_bytes != 0 && stats_.bytes_reserved + bytes > stats_.limit_bytes) {
    return Claim::kOverLimit;
  }
  // Counted as reserved before the upstream call so racing threads cannot overshoot the limit.
  stats_.bytes_reserved += bytes;
  return Claim::kReserved;
}

void* CachingPool::allocate_reserved(int class_index, UpstreamError* error) {
  const uint64_t bytes = kClassBytes[class_index];
  void* data = upstream_->allocate(bytes, error);
  std::lock_guard<std::mutex> lock(mu_);
  if (data == nullptr) {
    stats_.bytes_reserved -= bytes;
    return nullptr;
  }
  ++stats_.misses;
  ++stats_.upstream_allocs;
  stats_.bytes_in_use += bytes;
  stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
  return data;
}

std::shared_ptr<Block> CachingPool::allocate(size_t nbytes) {
  if (nbytes > kLargestClassBytes) {
    throw Error(ErrorCode::kOutOfMemory,
                "[memory] out of memory on " + label_ + ": requested " + std::to_string(nbytes) +
                    " bytes, more than the largest block (" + std::to_string(kLargestClassBytes) +
                    " bytes)");
  }
  const int index = class_index(nbytes);
  void* data = nullptr;
  UpstreamError error;
  bool over_limit = false;
  // Two rounds: the second runs after the cache was flushed upstream, since cached blocks
  // of other classes may be what stands between this request and the limit (or the
  // device's free memory).
  for (int round = 0; round < 2 && data == nullptr; ++round) {
    if (round == 1) trim();
    const Claim claimed = claim(index, &data);
    over_limit = claimed == Claim::kOverLimit;
    if (claimed == Claim::kReserved) data = allocate_reserved(index, &error);
  }
  if (data == nullptr) throw_out_of_memory(nbytes, index, over_limit, error);
  try {
    return std::make_shared<PooledBlock>(
        std::static_pointer_cast<CachingPool>(shared_from_this()), data, index);
  } catch (...) {
    give_back(data, index);
    throw;
  }
}

void CachingPool::give_back(void* data, int class_index) noexcept {
  const uint64_t bytes = kClassBytes[class_index];
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_in_use -= bytes;
    try {
      cached_[class_index].push_back(data);
      poison_cached(kind_, data, bytes);
      return;
    } catch (...) {
      // No room to remember the block (bad_alloc): release it instead of caching it.
      stats_.bytes_reserved -= bytes;
      ++stats_.upstream_frees;
    }
  }
  upstream_->release(data, bytes);
}

uint64_t CachingPool::trim() {
  std::array<std::vector<void*>, kNumClasses> taken;
  uint64_t released = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    taken.swap(cached_);  // swaps buffers only: no allocation under the lock
    for (int i = 0; i < kNumClasses; ++i) {
      released += kClassBytes[i] * taken[i].size();
      stats_.upstream_frees += taken[i].size();
    }
    stats_.bytes_reserved -= released;
  }
  for (int i = 0; i < kNumClasses; ++i) {
    for (void* data : taken[i]) release_upstream(data, kClassBytes[i]);
  }
  return released;
}

void CachingPool::throw_out_of_memory(size_t nbytes, int class_index, bool over_limit,
                                      const UpstreamError& error) const {
  const PoolStats now = stats();
  std::string message = "[memory] out of memory on " + label_ + ": requested " +
                        std::to_string(nbytes) + " bytes (size class " +
                        std::to_string(kClassBytes[class_index]) + "), " +
                        std::to_string(now.bytes_in_use) + " in use, ";
  if (over_limit) {
    message += "limit " + std::to_string(now.limit_bytes) + "; raise limit_bytes or free tensors";
  } else {
    message += std::to_string(now.bytes_reserved) + " reserved, " +
               (now.limit_bytes ? "limit " + std::to_string(now.limit_bytes) : std::string("no limit")) +
               "; " + error.call + " failed: " + error.reason + "; free tensors or use smaller batches";
  }
  throw Error(ErrorCode::kOutOfMemory, message);
}

}  // namespace

namespace memory_detail {

std::string device_label(MemoryKind kind, int device_index) {
  switch (kind) {
    case MemoryKind::kHost: return "cpu";
    case MemoryKind::kPinnedHost: return "cuda_host";
    case MemoryKind::kCuda: break;
  }
  return "cuda:" + std::to_string(device_index);
}

}  // namespace memory_detail

size_t MemoryPool::size_class(size_t nbytes) noexcept {
  return nbytes > kLargestClassBytes ? 0 : kClassBytes[class_index(nbytes)];
}

std::shared_ptr<MemoryPool> MemoryPool::create(MemoryKind kind, int device_index, uint64_t limit_bytes) {
  if (kind == MemoryKind::kHost) {
    return std::make_shared<CachingPool>(kind, 0, limit_bytes, std::make_unique<HostUpstream>());
  }
  auto upstream = memory_detail::make_cuda_upstream(kind, device_index);
  if (kind == MemoryKind::kPinnedHost) device_index = 0;
  return std::make_shared<CachingPool>(kind, device_index, limit_bytes, std::move(upstream));
}

std::shared_ptr<MemoryPool> MemoryPool::default_host() {
  // Never destroyed: blocks it handed out may be released by threads still running at exit.
  static const auto* pool = new std::shared_ptr<MemoryPool>(create(MemoryKind::kHost));
  return *pool;
}

}  // namespace conveyor
