// Host-side plumbing shared by the CUDA kernels: argument errors, the current device for
// one call, launch checks and per-stream scratch memory from the device's pool.
#include <map>
#include <utility>

#include "common.cuh"

namespace conveyor::kernels::cuda::detail {

void invalid(const std::string& message) { throw Error(ErrorCode::kInvalidInput, "[kernels] " + message); }

namespace {

// The count cannot change while the process runs, so it is read once.
int visible_device_count() {
  static const int count = cuda_device_count();
  return count;
}

}  // namespace

DeviceScope::DeviceScope(int device) : target_(device) {
  const int count = visible_device_count();
  if (count == 0) {
    throw Error(ErrorCode::kUnavailable,
                "[kernels] no CUDA device is visible, so the CUDA kernels cannot run (they need an NVIDIA GPU "
                "and driver; check nvidia-smi and CUDA_VISIBLE_DEVICES), or pass numpy arrays to run on the CPU");
  }
  if (device < 0 || device >= count) {
    invalid("no CUDA device " + std::to_string(device) + ": " + std::to_string(count) + " visible");
  }
  if (cudaGetDevice(&previous_) != cudaSuccess) {
    cudaGetLastError();
    previous_ = -1;
  }
  if (previous_ != target_) check_cuda(cudaSetDevice(target_), "cudaSetDevice");
}

DeviceScope::~DeviceScope() {
  if (previous_ >= 0 && previous_ != target_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
}

void check_launch(const char* kernel) {
  const cudaError_t rc = cudaGetLastError();
  if (rc != cudaSuccess) {
    throw Error(ErrorCode::kInternal, std::string("[kernels] launching ") + kernel + " failed: " +
                                          cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) + ")");
  }
}

void check_cuda(cudaError_t rc, const char* call) {
  if (rc == cudaSuccess) return;
  cudaGetLastError();  // a non-sticky error must not resurface at the next launch check
  const ErrorCode code = rc == cudaErrorMemoryAllocation ? ErrorCode::kOutOfMemory : ErrorCode::kInternal;
  throw Error(code, std::string("[kernels] ") + call + " failed: " + cudaGetErrorName(rc) + " (" +
                        cudaGetErrorString(rc) + ")");
}

// ---- scratch -----------------------------------------------------------------------------------

namespace {

struct StreamScratch {
  std::mutex mutex;
  std::shared_ptr<Block> block;  // guarded by mutex
};

struct ScratchRegistry {
  std::mutex mutex;  // guards the maps, not the entries
  std::map<int, std::shared_ptr<MemoryPool>> pools;
  std::map<std::pair<int, void*>, std::unique_ptr<StreamScratch>> entries;
};

ScratchRegistry& registry() {
  static ScratchRegistry* instance = new ScratchRegistry;  // never destroyed: blocks outlive exit order
  return *instance;
}

}  // namespace

std::shared_ptr<MemoryPool> device_pool(int device) {
  ScratchRegistry& reg = registry();
  std::lock_guard<std::mutex> guard(reg.mutex);
  auto& slot = reg.pools[device];
  if (!slot) slot = MemoryPool::create(MemoryKind::kCuda, device);
  return slot;
}

ScratchLease::ScratchLease(const Launch& launch, size_t nbytes) {
  ScratchRegistry& reg = registry();
  StreamScratch* entry = nullptr;
  const std::shared_ptr<MemoryPool> pool = device_pool(launch.device);
  {
    std::lock_guard<std::mutex> guard(reg.mutex);
    auto& e = reg.entries[{launch.device, launch.stream}];
    if (!e) e = std::make_unique<StreamScratch>();
    entry = e.get();  // entries are never erased, so the pointer stays valid
  }
  lock_ = std::unique_lock<std::mutex>(entry->mutex);
  if (!entry->block || entry->block->size < nbytes) {
    if (entry->block) {
      // Work already queued on this stream may still use the old block; once it is
      // returned the pool may hand it to another stream.
      check_cuda(cudaStreamSynchronize(stream_of(launch)), "cudaStreamSynchronize");
      entry->block.reset();
    }
    entry->block = pool->allocate(nbytes);
  }
  data_ = entry->block->data;
}

}  // namespace conveyor::kernels::cuda::detail

namespace conveyor::kernels::cuda {

// CONVEYOR_CUDA_ARCHITECTURES is CMake's list, defined for this file by the build.
std::string compiled_architectures() {
#ifdef CONVEYOR_CUDA_ARCHITECTURES
  return CONVEYOR_CUDA_ARCHITECTURES;
#else
  return "";
#endif
}

}  // namespace conveyor::kernels::cuda
