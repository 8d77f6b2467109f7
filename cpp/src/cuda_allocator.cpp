// CUDA builds: the upstream allocators for pinned host memory (cudaHostAlloc) and device
// memory (cudaMalloc). Linked against the static CUDA runtime, so a machine without a
// driver or GPU still loads the library: there cudaGetDeviceCount fails and creating a
// CUDA pool throws kUnavailable.
//
// Stream ordering is the owners' business: a CUDA block is reused as soon as its last
// owner drops it, so owners synchronise the streams that used it before letting it go.
#include <cuda_runtime_api.h>

#include <string>

#include "conveyor/error.h"
#include "memory_upstream.h"

namespace conveyor {

namespace {

using memory_detail::UpstreamAllocator;
using memory_detail::UpstreamError;

// Without a driver or GPU cudaGetDeviceCount fails rather than reporting 0; the error is
// what the user needs to see, so it is kept.
cudaError_t visible_devices(int* count) noexcept {
  *count = 0;
  const cudaError_t rc = cudaGetDeviceCount(count);
  if (rc != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clears the error so later, unrelated calls do not report it
  }
  return rc;
}

// Makes device_index current on the calling thread for one upstream call, then restores
// the caller's device: the pool never changes which device a caller's thread works on.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device_index) noexcept : target_(device_index) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != target_) status_ = cudaSetDevice(target_);
  }
  ~ScopedDevice() {
    if (previous_ >= 0 && previous_ != target_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  cudaError_t status() const noexcept { return status_; }

 private:
  int target_;
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

class PinnedHostUpstream final : public UpstreamAllocator {
 public:
  void* allocate(size_t nbytes, UpstreamError* error) noexcept override {
    void* data = nullptr;
    // Portable: the pages are pinned for every device's context, not only the current one.
    const cudaError_t rc = cudaHostAlloc(&data, nbytes, cudaHostAllocPortable);
    if (rc != cudaSuccess) {
      cudaGetLastError();
      *error = {"cudaHostAlloc", cudaGetErrorString(rc)};
      return nullptr;
    }
    return data;
  }

  // Errors ignored: at process exit the runtime may already be unloading, and a failed
  // free leaves nothing the pool could do about it.
  void release(void* data, size_t) noexcept override {
    if (cudaFreeHost(data) != cudaSuccess) cudaGetLastError();
  }
};

class DeviceUpstream final : public UpstreamAllocator {
 public:
  explicit DeviceUpstream(int device_index) : device_index_(device_index) {}

  void* allocate(size_t nbytes, UpstreamError* error) noexcept override {
    ScopedDevice scoped(device_index_);
    if (scoped.status() != cudaSuccess) {
      cudaGetLastError();
      *error = {"cudaSetDevice", cudaGetErrorString(scoped.status())};
      return nullptr;
    }
    void* data = nullptr;
    const cudaError_t rc = cudaMalloc(&data, nbytes);
    if (rc != cudaSuccess) {
      cudaGetLastError();  // out of memory is not sticky: clear it for the retry
      *error = {"cudaMalloc", cudaGetErrorString(rc)};
      return nullptr;
    }
    return data;
  }

  // Errors ignored, as for pinned memory.
  void release(void* data, size_t) noexcept override {
    ScopedDevice scoped(device_index_);
    if (cudaFree(data) != cudaSuccess) cudaGetLastError();
  }

 private:
  const int device_index_;
};

}  // namespace

bool cuda_built() noexcept { return true; }

int cuda_device_count() noexcept {
  int count = 0;
  visible_devices(&count);
  return count;
}

namespace memory_detail {

std::unique_ptr<UpstreamAllocator> make_cuda_upstream(MemoryKind kind, int device_index) {
  if (kind == MemoryKind::kCuda && device_index < 0) {
    throw Error(ErrorCode::kInvalidInput,
                "[memory] CUDA device index must be >= 0, got " + std::to_string(device_index));
  }
  const std::string label = device_label(kind, device_index);
  int count = 0;
  const cudaError_t rc = visible_devices(&count);
  if (rc != cudaSuccess || count == 0) {
    const std::string why = rc != cudaSuccess
                                ? std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(rc)
                                : std::string("no CUDA device is visible");
    throw Error(ErrorCode::kUnavailable,
                "[memory] cannot use '" + label + "' memory: " + why +
                    " (it needs an NVIDIA GPU and driver; check nvidia-smi and CUDA_VISIBLE_DEVICES)");
  }
  if (kind == MemoryKind::kPinnedHost) return std::make_unique<PinnedHostUpstream>();
  if (device_index >= count) {
    throw Error(ErrorCode::kInvalidInput,
                "[memory] no CUDA device '" + label + "': " + std::to_string(count) +
                    " visible (cuda:0 to cuda:" + std::to_string(count - 1) + ")");
  }
  return std::make_unique<DeviceUpstream>(device_index);
}

}  // namespace memory_detail

}  // namespace conveyor
