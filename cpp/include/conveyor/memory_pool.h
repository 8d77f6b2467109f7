// Size-class caching allocator, one per device kind.
//
// Requests are rounded up to a size class (four classes per doubling above 512 bytes,
// 64-byte steps below); a freed block goes back to its class's cache and is handed to
// the next request of that class without touching the upstream allocator. Host blocks
// are 64-byte aligned; host blocks of 2 MiB and more are 2 MiB aligned and advised for
// transparent huge pages. Pinned-host and CUDA blocks come from the CUDA runtime and
// exist only in builds with CUDA; without it those kinds throw kUnavailable with
// "CUDA support was not built".
//
// Thread safety: every public method may be called from any thread.
// Ownership: a Block keeps its pool alive; the pool outlives every block it handed out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "conveyor/tensor.h"

namespace conveyor {

enum class MemoryKind : uint8_t { kHost, kPinnedHost, kCuda };

struct PoolStats {
  uint64_t bytes_in_use = 0;       // size-class bytes of blocks handed out and not returned
  uint64_t bytes_reserved = 0;     // bytes held from upstream: in use plus cached
  uint64_t peak_bytes_in_use = 0;  // since creation or the last reset_peak()
  uint64_t hits = 0;               // allocations served from the cache
  uint64_t misses = 0;             // allocations that went upstream
  uint64_t upstream_allocs = 0;
  uint64_t upstream_frees = 0;
  uint64_t limit_bytes = 0;        // 0: no limit
};

class MemoryPool;

// One allocation. Destroying the last shared_ptr to it returns it to its pool.
struct Block {
  void* data = nullptr;
  size_t size = 0;  // the size class: at least the requested bytes
};

class MemoryPool : public std::enable_shared_from_this<MemoryPool> {
 public:
  // limit_bytes == 0 means no limit. device_index is ignored for kHost.
  static std::shared_ptr<MemoryPool> create(MemoryKind kind, int device_index = 0,
                                            uint64_t limit_bytes = 0);
  // The process-wide host pool the batchers use unless given another.
  static std::shared_ptr<MemoryPool> default_host();

  virtual ~MemoryPool() = default;

  // A block of at least nbytes (nbytes == 0 gives a valid minimum-size block).
  // Over the limit: flush the cache, retry once, then throw Error(kOutOfMemory) whose
  // message gives the bytes requested, in use and the limit.
  virtual std::shared_ptr<Block> allocate(size_t nbytes) = 0;

  // Releases every cached (not in use) block upstream; returns the bytes released.
  virtual uint64_t trim() = 0;
  virtual PoolStats stats() const = 0;
  virtual void reset_peak() = 0;

  virtual MemoryKind kind() const noexcept = 0;
  virtual Device device() const noexcept = 0;

  // The size class a request of nbytes is rounded up to (exposed for tests); 0 when
  // nbytes exceeds the largest class (2^48 bytes), which allocate() refuses.
  static size_t size_class(size_t nbytes) noexcept;
};

// An owner for a Tensor over a pooled block: the tensor keeps the block alive.
inline Tensor make_pooled_tensor(const std::shared_ptr<MemoryPool>& pool, DType dtype,
                                 const Shape& shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  t.device = pool->device();
  auto block = pool->allocate(t.nbytes());
  t.data = block->data;
  t.owner = std::move(block);
  return t;
}

bool cuda_built() noexcept;
// Number of CUDA devices visible at run time (0 without CUDA support or without a GPU).
int cuda_device_count() noexcept;

}  // namespace conveyor
