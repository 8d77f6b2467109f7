// CPU-only builds: the CUDA memory kinds exist in the API but refuse to be created, so
// callers need no #ifdef and learn at run time what is missing.
#include "conveyor/error.h"
#include "memory_upstream.h"

namespace conveyor {

bool cuda_built() noexcept { return false; }

int cuda_device_count() noexcept { return 0; }

namespace memory_detail {

std::unique_ptr<UpstreamAllocator> make_cuda_upstream(MemoryKind kind, int device_index) {
  throw Error(ErrorCode::kUnavailable,
              "[memory] CUDA support was not built into this copy of Conveyor, so there is no '" +
                  device_label(kind, device_index) +
                  "' memory: rebuild with a CUDA toolkit installed (CONVEYOR_CUDA=ON)");
}

}  // namespace memory_detail

}  // namespace conveyor
