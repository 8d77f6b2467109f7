// Private to the memory pool: the upstream allocators a CachingPool draws from.
// memory_pool.cpp holds the host one; cuda_allocator.cpp (CUDA builds) or cuda_stub.cpp
// (CPU-only builds) provides the CUDA kinds, so no other file needs an #ifdef.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "conveyor/memory_pool.h"

namespace conveyor::memory_detail {

// Why an upstream call failed, as static strings (no allocation on the failure path):
// call is the function that failed ("mmap", "cudaMalloc"), reason its own words.
struct UpstreamError {
  const char* call = "";
  const char* reason = "";
};

// One device's raw allocator. The pool serialises nothing around it: both methods may
// be called from several threads at once, and neither is called with the pool's lock held.
class UpstreamAllocator {
 public:
  virtual ~UpstreamAllocator() = default;
  // nullptr on failure, with the reason in *error.
  virtual void* allocate(size_t nbytes, UpstreamError* error) noexcept = 0;
  // nbytes is the value given to the allocate() call that returned data.
  virtual void release(void* data, size_t nbytes) noexcept = 0;
};

// The allocator for kPinnedHost or kCuda on device_index. Throws Error(kUnavailable) when
// CUDA support was not built or no device is usable at run time, and Error(kInvalidInput)
// when device_index names no visible device.
std::unique_ptr<UpstreamAllocator> make_cuda_upstream(MemoryKind kind, int device_index);

// "cpu", "cuda_host" or "cuda:N": the spelling Python uses for the device.
std::string device_label(MemoryKind kind, int device_index);

}  // namespace conveyor::memory_detail
