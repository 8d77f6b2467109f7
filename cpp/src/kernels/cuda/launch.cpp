// Host-side plumbing shared by the CUDA kernels: argument errors, the current device for
// one call, launch checks and per-stream scratch memory from the device's pool.
#include <map>
#include <utility>

#include "common.cuh"
#include "stream_cache.h"

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

// One stream's scratch block and the event marking its last use on that stream. Shared by
// the cache and the leases in flight: an entry evicted while leased lives until its lease
// ends.
struct StreamScratch {
  std::mutex mutex;
  std::shared_ptr<Block> block;   // guarded by mutex
  cudaEvent_t last_use = nullptr;  // guarded by mutex; recorded on the stream as each lease ends

  StreamScratch() = default;
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;

  // Only the last owner gets here, so no lease holds the mutex. Work queued on the stream
  // may still use the block: wait for it before the pool can hand the block to another
  // stream. This waits on our event, never on the stream, which its owner may have
  // destroyed since.
  ~StreamScratch() {
    if (last_use == nullptr) return;
    if (cudaEventSynchronize(last_use) != cudaSuccess) {
      cudaGetLastError();
      // Unknown whether the device is done with the block: leak it rather than reuse it.
      new std::shared_ptr<Block>(std::move(block));
    }
    if (cudaEventDestroy(last_use) != cudaSuccess) cudaGetLastError();
  }
};

namespace {

// The streams per device whose scratch is kept between calls. A stream beyond them takes
// the place of the one used least recently, whose block goes back to the pool once the
// work that used it is done. Scratch held at once is therefore bounded by this many
// blocks per device (each the largest a call on that stream asked for: 32 MiB for the
// cuBLASLt workspace), however many streams a process makes and drops. A process that
// takes turns over more streams than this still works, at the cost of that wait and a
// fresh block from the pool when a stream comes back.
constexpr size_t kScratchStreamsPerDevice = 4;

struct ScratchRegistry {
  std::mutex mutex;  // guards the maps, not the entries
  std::map<int, std::shared_ptr<MemoryPool>> pools;
  StreamCache<StreamScratch> entries{kScratchStreamsPerDevice};
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

ScratchLease::ScratchLease(const Launch& launch, size_t nbytes) : stream_(stream_of(launch)) {
  ScratchRegistry& reg = registry();
  const std::shared_ptr<MemoryPool> pool = device_pool(launch.device);
  std::shared_ptr<StreamScratch> evicted;
  {
    std::lock_guard<std::mutex> guard(reg.mutex);
    auto acquired = reg.entries.acquire(launch.device, launch.stream, [] { return std::make_shared<StreamScratch>(); });
    entry_ = std::move(acquired.entry);
    evicted = std::move(acquired.evicted);
  }
  // Outside the registry lock: the last owner of an evicted entry waits for its stream's work.
  evicted.reset();
  lock_ = std::unique_lock<std::mutex>(entry_->mutex);
  if (entry_->last_use == nullptr) {
    check_cuda(cudaEventCreateWithFlags(&entry_->last_use, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
  if (!entry_->block || entry_->block->size < nbytes) {
    if (entry_->block) {
      // Work already queued on this stream may still use the old block; once it is
      // returned the pool may hand it to another stream.
      check_cuda(cudaEventSynchronize(entry_->last_use), "cudaEventSynchronize");
      entry_->block.reset();
    }
    entry_->block = pool->allocate(nbytes);
  }
  data_ = entry_->block->data;
}

ScratchLease::~ScratchLease() {
  // Every launch using the block is queued by now. If the event cannot be recorded, the
  // stream (still alive: its caller is using it) is waited for instead, so that nothing
  // relying on the event frees the block early.
  if (cudaEventRecord(entry_->last_use, stream_) != cudaSuccess) {
    cudaGetLastError();
    if (cudaStreamSynchronize(stream_) != cudaSuccess) cudaGetLastError();
  }
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
