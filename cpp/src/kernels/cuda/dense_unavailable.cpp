// CUDA builds whose configure step found no cuBLASLt header: the other CUDA kernels are
// there, dense refuses with the reason and the fix.
#include "conveyor/cuda_kernels.h"
#include "conveyor/error.h"

namespace conveyor::kernels::cuda {

namespace {

[[noreturn]] void unavailable() {
  throw Error(ErrorCode::kUnavailable,
              "[dense] the CUDA dense path (cuBLASLt) was not built into this copy of Conveyor: its header "
              "cublasLt.h was not found at build time; install the nvidia-cublas wheel (or a CUDA toolkit with "
              "cuBLAS), or point CONVEYOR_CUBLAS_ROOT at it, and rebuild");
}

}  // namespace

std::shared_ptr<const CudaDense> pack_dense(const float*, int64_t, int64_t, const float*, Activation, int) {
  unavailable();
}

std::shared_ptr<const CudaDense> pack_dense_int8(const int8_t*, int64_t, int64_t, const float*, const float*,
                                                 Activation, int) {
  unavailable();
}

bool cublaslt_built() noexcept { return false; }
std::string cublaslt_soname() { return ""; }
void add_cublaslt_candidates(const std::vector<std::string>&) {}
std::string load_cublaslt() { unavailable(); }
int cublaslt_version() noexcept { return 0; }

}  // namespace conveyor::kernels::cuda
