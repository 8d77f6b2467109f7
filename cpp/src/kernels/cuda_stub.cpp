// CPU-only builds: the CUDA kernels' entry points exist and refuse with the reason, so
// callers (the bindings, the native backend) need no #ifdef and learn at run time what
// is missing.
#include "conveyor/cuda_kernels.h"
#include "conveyor/error.h"

namespace conveyor::kernels::cuda {

namespace {

[[noreturn]] void not_built(const char* kernel) {
  throw Error(ErrorCode::kUnavailable,
              std::string("[kernels] CUDA support was not built into this copy of Conveyor, so ") + kernel +
                  " cannot run on a GPU: rebuild with a CUDA toolkit installed (CONVEYOR_CUDA=ON), or pass numpy "
                  "arrays to run on the CPU");
}

}  // namespace

void normalize_image(const uint8_t*, const ImageShape&, const float*, const float*, float, void*, DType, ImageLayout,
                     const Launch&) {
  not_built("normalize_image");
}

void softmax(const float*, int64_t, int64_t, float*, const Launch&) { not_built("softmax"); }

void softmax_topk(const float*, int64_t, int64_t, int64_t, float*, int64_t*, const Launch&) {
  not_built("softmax_topk");
}

void argmax(const float*, int64_t, int64_t, int64_t*, const Launch&) { not_built("argmax"); }

void layer_norm(const float*, int64_t, int64_t, const float*, const float*, float, float*, const Launch&) {
  not_built("layer_norm");
}

void dequantize_int8(const int8_t*, int64_t, int64_t, const float*, float*, const Launch&) {
  not_built("dequantize_int8");
}

std::shared_ptr<const CudaDense> pack_dense(const float*, int64_t, int64_t, const float*, Activation, int) {
  not_built("dense");
}

std::shared_ptr<const CudaDense> pack_dense_int8(const int8_t*, int64_t, int64_t, const float*, const float*,
                                                 Activation, int) {
  not_built("dense");
}

bool cublaslt_built() noexcept { return false; }
std::string cublaslt_soname() { return ""; }
void add_cublaslt_candidates(const std::vector<std::string>&) {}
std::string load_cublaslt() { not_built("dense"); }
int cublaslt_version() noexcept { return 0; }
std::string compiled_architectures() { return ""; }

}  // namespace conveyor::kernels::cuda
