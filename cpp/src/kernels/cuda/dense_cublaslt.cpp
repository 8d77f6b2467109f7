// dense on CUDA: y = act(x @ W + b) as one cuBLASLt matmul with a bias / activation
// epilogue (plus one elementwise pass for the activations cuBLASLt lacks).
//
// libcublasLt is opened with dlopen at first use, not linked: the module then imports,
// and every other kernel runs, where the library is missing; only its header is needed
// to build. The few entry points used are looked up once into a table of pointers typed
// from the header's own declarations.
//
// Layout: row-major x [M, K], W [K, N], y [M, N] are, read column-major, x^T [K, M],
// W^T [N, K] and y^T [N, M]; so y^T = W^T x^T is a plain no-transpose GEMM with
// A = W, B = x, D = y, and the bias (length N) runs along D's rows, as cuBLASLt's bias
// epilogue expects.
#include <cublasLt.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace conveyor::kernels::cuda {

namespace {

using detail::check_cuda;
using detail::invalid;

// ---- the library ---------------------------------------------------------------------------

struct Api {
  decltype(&cublasLtGetVersion) get_version = nullptr;
  decltype(&cublasLtGetStatusString) status_string = nullptr;
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
};

std::string soname() { return "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR); }

// Loaded once per process; a failure is kept and reported again until a new candidate
// is added. The handle is never closed: kernels and handles may be in use until exit.
class Library {
 public:
  static Library& instance() {
    static Library* library = new Library;  // never destroyed, like the dlopen handle
    return *library;
  }

  // The table, loading the library first if needed; throws Error(kUnavailable).
  const Api& api() {
    if (loaded_.load(std::memory_order_acquire)) return api_;
    std::lock_guard<std::mutex> guard(mutex_);
    if (!loaded_.load(std::memory_order_relaxed)) load_locked();
    return api_;
  }

  void add_candidates(const std::vector<std::string>& paths) {
    std::lock_guard<std::mutex> guard(mutex_);
    candidates_.insert(candidates_.end(), paths.begin(), paths.end());
  }

  std::string loaded_from() {
    api();
    std::lock_guard<std::mutex> guard(mutex_);
    return loaded_from_;
  }

  int version() const noexcept { return version_.load(std::memory_order_acquire); }

  // One cuBLASLt handle per device, created on first use with the device current.
  cublasLtHandle_t handle(int device) {
    const Api& lt = api();
    std::lock_guard<std::mutex> guard(mutex_);
    cublasLtHandle_t& h = handles_[device];
    if (h == nullptr) {
      const cublasStatus_t rc = lt.create(&h);
      if (rc != CUBLAS_STATUS_SUCCESS) {
        h = nullptr;
        throw Error(ErrorCode::kInternal, std::string("[dense] cublasLtCreate failed: ") + lt.status_string(rc));
      }
    }
    return h;
  }

 private:
  void load_locked() {
    std::vector<std::string> tried;
    if (const char* env = std::getenv("CONVEYOR_CUBLASLT_LIBRARY"); env != nullptr && *env != '\0') {
      if (try_open(env, &tried)) return;
    }
    // By name first: a copy already loaded by another library (CuPy's, say) is reused.
    if (try_open(soname(), &tried)) return;
    for (const std::string& path : candidates_) {
      if (try_open(path, &tried)) return;
    }
#ifdef CONVEYOR_CUBLASLT_BUILD_LIBRARY
    if (try_open(CONVEYOR_CUBLASLT_BUILD_LIBRARY, &tried)) return;
#endif
    std::string message = "[dense] cannot load cuBLASLt (" + soname() +
                          "), which the CUDA dense path needs: install the nvidia-cublas wheel matching CUDA " +
                          std::to_string(CUBLAS_VER_MAJOR) +
                          " or a CUDA toolkit with cuBLAS, or name the file in CONVEYOR_CUBLASLT_LIBRARY. Tried:";
    for (const std::string& t : tried) message += "\n  " + t;
    throw Error(ErrorCode::kUnavailable, message);
  }

  bool try_open(const std::string& path, std::vector<std::string>* tried) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      tried->push_back(path + ": " + (why ? why : "dlopen failed"));
      return false;
    }
    Api api;
    std::string missing;
    const auto bind = [&](auto& slot, const char* name) {
      slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(handle, name));
      if (slot == nullptr) missing += std::string(missing.empty() ? "" : ", ") + name;
    };
    bind(api.get_version, "cublasLtGetVersion");
    bind(api.status_string, "cublasLtGetStatusString");
    bind(api.create, "cublasLtCreate");
    bind(api.desc_create, "cublasLtMatmulDescCreate");
    bind(api.desc_destroy, "cublasLtMatmulDescDestroy");
    bind(api.desc_set, "cublasLtMatmulDescSetAttribute");
    bind(api.layout_create, "cublasLtMatrixLayoutCreate");
    bind(api.layout_destroy, "cublasLtMatrixLayoutDestroy");
    bind(api.pref_create, "cublasLtMatmulPreferenceCreate");
    bind(api.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    bind(api.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    bind(api.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    bind(api.matmul, "cublasLtMatmul");
    if (!missing.empty()) {
      tried->push_back(path + ": loaded, but it lacks " + missing);
      dlclose(handle);
      return false;
    }
    // The enums and structs come from the header this file was built with: a library of
    // another major version may lay them out differently.
    const int version = static_cast<int>(api.get_version());
    if (version / 10000 != CUBLAS_VER_MAJOR) {
      tried->push_back(path + ": version " + std::to_string(version) + ", but this build needs major version " +
                       std::to_string(CUBLAS_VER_MAJOR));
      dlclose(handle);
      return false;
    }
    api_ = api;
    loaded_from_ = path;
    version_.store(version, std::memory_order_release);
    loaded_.store(true, std::memory_order_release);
    return true;
  }

  std::mutex mutex_;
  std::atomic<bool> loaded_{false};
  std::atomic<int> version_{0};
  Api api_;                              // written once, before loaded_ is set
  std::string loaded_from_;              // guarded by mutex_
  std::vector<std::string> candidates_;  // guarded by mutex_
  std::map<int, cublasLtHandle_t> handles_;  // guarded by mutex_
};

void check_lt(const Api& lt, cublasStatus_t rc, const char* call) {
  if (rc != CUBLAS_STATUS_SUCCESS) {
    throw Error(ErrorCode::kInternal, std::string("[dense] ") + call + " failed: " + lt.status_string(rc));
  }
}

// ---- plans -------------------------------------------------------------------------------------

// cuBLASLt's split-K and stream-K kernels, which small-M problems favour, need a
// workspace; 32 MiB is the size cuBLAS itself reserves on Hopper.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

// The largest power of two (at most 256) that divides the address: an algorithm chosen
// for an alignment may assume it, so the alignment is part of a plan's key.
uint32_t alignment_of(const void* p) {
  auto a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 255u);
  return a == 0 ? 256u : (a & (~a + 1u));
}

// The ways to run the epilogue, best first: all of it in cuBLASLt's epilogue (for the
// activations it has), the bias there and the activation in a pass, or everything in a
// pass after a plain GEMM. A later one is used where the heuristic finds no algorithm
// for an earlier one (an epilogue unsupported for float32 on some GPU, say).
struct EpilogueChoice {
  cublasLtEpilogue_t epilogue;
  bool pass_bias;        // the bias is added by the pass after the GEMM
  bool pass_activation;  // the activation is applied by that pass
};

std::vector<EpilogueChoice> epilogue_choices(Activation act, bool bias) {
  std::vector<EpilogueChoice> choices;
  const bool pass = act != Activation::kNone;
  switch (act) {
    case Activation::kNone:
      choices.push_back({bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, false, false});
      break;
    case Activation::kRelu:
      choices.push_back({bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU, false, false});
      break;
    case Activation::kGeluTanh:  // cuBLASLt's GELU is the tanh approximation
      choices.push_back({bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU, false, false});
      break;
    default: break;  // gelu_erf, sigmoid, tanh: no epilogue of cuBLASLt's
  }
  if (bias) choices.push_back({CUBLASLT_EPILOGUE_BIAS, false, pass});
  choices.push_back({CUBLASLT_EPILOGUE_DEFAULT, bias, pass});
  return choices;
}

// One problem shape's descriptors and chosen algorithm. Read-only once built, so
// concurrent matmuls may share it.
struct Plan {
  const Api* lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;
  bool pass_bias = false;        // the epilogue pass after the matmul adds the bias
  bool pass_activation = false;  // and applies the activation

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (lt == nullptr) return;
    if (desc) lt->desc_destroy(desc);
    for (cublasLtMatrixLayout_t l : {a, b, d}) {
      if (l) lt->layout_destroy(l);
    }
  }
};

// (M, alignment of x, alignment of y)
using PlanKey = std::tuple<int64_t, uint32_t, uint32_t>;
// Distinct batch sizes are few in serving; past this many the cache starts over.
constexpr size_t kMaxPlans = 256;

class CublasLtDense final : public CudaDense {
 public:
  CublasLtDense(int64_t K, int64_t N, Activation act, bool has_bias, bool quantized, int device,
                cublasLtHandle_t handle, std::shared_ptr<Block> storage, const float* weight, const float* bias)
      : CudaDense(K, N, act, has_bias, quantized, device),
        handle_(handle),
        storage_(std::move(storage)),
        weight_(weight),
        bias_(bias) {}

  size_t nbytes() const noexcept override { return storage_->size; }
  const float* weight() const noexcept override { return weight_; }
  const float* bias() const noexcept override { return bias_; }

  void forward(const float* x, int64_t M, float* y, void* stream) const override {
    detail::DeviceScope scope(device());
    if (M < 0) invalid("dense: M must be >= 0, got " + std::to_string(M));
    if (M == 0) return;
    if (x == nullptr || y == nullptr) invalid("dense: x and y must not be null");
    const Api& lt = Library::instance().api();  // loaded before this layer was made
    const Plan& plan = plan_for(lt, M, alignment_of(x), alignment_of(y));
    const Launch launch{device(), stream};
    const float alpha = 1.0f, beta = 0.0f;
    void* workspace = nullptr;
    std::optional<detail::ScratchLease> scratch;
    if (plan.workspace_bytes > 0) {
      scratch.emplace(launch, kWorkspaceBytes);
      workspace = scratch->data();
    }
    check_lt(lt,
             lt.matmul(handle_, plan.desc, &alpha, weight_, plan.a, x, plan.b, &beta, y, plan.d, y, plan.d, &plan.algo,
                       workspace, plan.workspace_bytes, detail::stream_of(launch)),
             "cublasLtMatmul");
    if (plan.pass_bias || plan.pass_activation) {
      detail::apply_epilogue(y, M, out_features(), plan.pass_bias ? bias_ : nullptr,
                             plan.pass_activation ? activation() : Activation::kNone, detail::stream_of(launch));
    }
  }

 private:
  const Plan& plan_for(const Api& lt, int64_t M, uint32_t align_x, uint32_t align_y) const {
    std::lock_guard<std::mutex> guard(plans_mutex_);
    const PlanKey key{M, align_x, align_y};
    if (auto it = plans_.find(key); it != plans_.end()) return *it->second;
    // Plans handed out earlier may still be in use by other threads' calls: they are
    // retired, not destroyed, when the cache starts over.
    if (plans_.size() >= kMaxPlans) {
      for (auto& entry : plans_) retired_.push_back(std::move(entry.second));
      plans_.clear();
    }
    auto plan = std::make_unique<Plan>();
    plan->lt = &lt;
    bool built = false;
    for (const EpilogueChoice& choice : epilogue_choices(activation(), has_bias())) {
      if (build(lt, M, align_x, align_y, choice.epilogue, plan.get())) {
        plan->pass_bias = choice.pass_bias;
        plan->pass_activation = choice.pass_activation;
        built = true;
        break;
      }
    }
    if (!built) {
      throw Error(ErrorCode::kInternal, "[dense] cuBLASLt found no algorithm for a float32 GEMM of M=" +
                                            std::to_string(M) + ", K=" + std::to_string(in_features()) +
                                            ", N=" + std::to_string(out_features()));
    }
    const Plan& result = *plan;
    plans_.emplace(key, std::move(plan));
    return result;
  }

  // Fills plan's descriptors for one epilogue; false when the heuristic finds no algorithm.
  bool build(const Api& lt, int64_t M, uint32_t align_x, uint32_t align_y, cublasLtEpilogue_t epilogue,
             Plan* plan) const {
    const auto K = static_cast<uint64_t>(in_features());
    const auto N = static_cast<uint64_t>(out_features());
    const auto rows_m = static_cast<uint64_t>(M);
    if (plan->desc) lt.desc_destroy(plan->desc);
    for (cublasLtMatrixLayout_t* l : {&plan->a, &plan->b, &plan->d}) {
      if (*l) lt.layout_destroy(*l);
      *l = nullptr;
    }
    plan->desc = nullptr;
    check_lt(lt, lt.desc_create(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    check_lt(lt, lt.desc_set(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
             "cublasLtMatmulDescSetAttribute(EPILOGUE)");
    if (has_bias()) {
      const void* bias = bias_;
      check_lt(lt, lt.desc_set(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
               "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
    }
    check_lt(lt, lt.layout_create(&plan->a, CUDA_R_32F, N, K, N), "cublasLtMatrixLayoutCreate(W)");
    check_lt(lt, lt.layout_create(&plan->b, CUDA_R_32F, K, rows_m, K), "cublasLtMatrixLayoutCreate(x)");
    check_lt(lt, lt.layout_create(&plan->d, CUDA_R_32F, N, rows_m, N), "cublasLtMatrixLayoutCreate(y)");

    cublasLtMatmulPreference_t pref = nullptr;
    check_lt(lt, lt.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
    const uint64_t workspace = kWorkspaceBytes;
    const uint32_t align_w = alignment_of(weight_);
    lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
    lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w, sizeof(align_w));
    lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_x, sizeof(align_x));
    lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_y, sizeof(align_y));
    lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_y, sizeof(align_y));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t rc =
        lt.heuristic(handle_, plan->desc, plan->a, plan->b, plan->d, plan->d, pref, 1, &result, &found);
    lt.pref_destroy(pref);
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED || (rc == CUBLAS_STATUS_SUCCESS && found == 0)) return false;
    check_lt(lt, rc, "cublasLtMatmulAlgoGetHeuristic");
    plan->algo = result.algo;
    plan->workspace_bytes = result.workspaceSize;
    return true;
  }

  cublasLtHandle_t handle_;         // the device's, shared by every layer on it
  std::shared_ptr<Block> storage_;  // the weight, then the bias, from the device's pool
  const float* weight_;
  const float* bias_;
  mutable std::mutex plans_mutex_;
  mutable std::map<PlanKey, std::unique_ptr<Plan>> plans_;  // guarded by plans_mutex_
  mutable std::vector<std::unique_ptr<Plan>> retired_;      // guarded by plans_mutex_
};

void check_dense_args(int64_t K, int64_t N, const void* W, const char* w_name) {
  if (K < 1 || N < 1) {
    invalid("pack_dense: " + std::string(w_name) + " must be [K, N] with K, N >= 1, got [" + std::to_string(K) + ", " +
            std::to_string(N) + "]");
  }
  if (W == nullptr) invalid(std::string("pack_dense: ") + w_name + " must not be null");
}

size_t round_up_256(size_t n) { return (n + 255) & ~size_t{255}; }

// The device-resident weight and bias, with the library loaded and a handle made, so a
// missing cuBLASLt fails at load time rather than at the first request.
std::shared_ptr<const CudaDense> make_dense(int64_t K, int64_t N, const float* bias, Activation act, bool quantized,
                                            int device, const std::function<void(float*)>& fill_weight) {
  detail::DeviceScope scope(device);
  const cublasLtHandle_t handle = Library::instance().handle(device);
  const size_t weight_bytes = round_up_256(sizeof(float) * static_cast<size_t>(K * N));
  auto storage = detail::device_pool(device)->allocate(weight_bytes + sizeof(float) * static_cast<size_t>(N));
  auto* weight = static_cast<float*>(storage->data);
  float* device_bias = nullptr;
  fill_weight(weight);
  if (bias != nullptr) {
    device_bias = reinterpret_cast<float*>(static_cast<char*>(storage->data) + weight_bytes);
    check_cuda(cudaMemcpy(device_bias, bias, sizeof(float) * N, cudaMemcpyDefault), "cudaMemcpy(bias)");
  }
  return std::make_shared<CublasLtDense>(K, N, act, bias != nullptr, quantized, device, handle, std::move(storage),
                                         weight, device_bias);
}

}  // namespace

std::shared_ptr<const CudaDense> pack_dense(const float* W, int64_t K, int64_t N, const float* bias, Activation act,
                                            int device) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope scope(device);
  check_dense_args(K, N, W, "W");
  return make_dense(K, N, bias, act, false, device, [&](float* weight) {
    check_cuda(cudaMemcpy(weight, W, sizeof(float) * static_cast<size_t>(K * N), cudaMemcpyDefault), "cudaMemcpy(W)");
  });
}

std::shared_ptr<const CudaDense> pack_dense_int8(const int8_t* Wq, int64_t K, int64_t N, const float* scale,
                                                 const float* bias, Activation act, int device) {
  // No usable device (kUnavailable) takes precedence over argument errors.
  detail::DeviceScope scope(device);
  check_dense_args(K, N, Wq, "Wq");
  if (scale == nullptr) invalid("pack_dense: scale must not be null for int8 weights");
  return make_dense(K, N, bias, act, true, device, [&](float* weight) {
    // The int8 weight and the scales travel to the device as they are (a quarter of the
    // float bytes) and are multiplied out there.
    const size_t wq_bytes = round_up_256(static_cast<size_t>(K * N));
    auto staging = detail::device_pool(device)->allocate(wq_bytes + sizeof(float) * static_cast<size_t>(N));
    auto* device_wq = static_cast<int8_t*>(staging->data);
    auto* device_scale = reinterpret_cast<float*>(static_cast<char*>(staging->data) + wq_bytes);
    check_cuda(cudaMemcpy(device_wq, Wq, static_cast<size_t>(K * N), cudaMemcpyDefault), "cudaMemcpy(Wq)");
    check_cuda(cudaMemcpy(device_scale, scale, sizeof(float) * N, cudaMemcpyDefault), "cudaMemcpy(scale)");
    dequantize_int8(device_wq, K, N, device_scale, weight, Launch{device, nullptr});
    // The staging block goes back to the pool when this returns: the kernel must be done.
    check_cuda(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
  });
}

bool cublaslt_built() noexcept { return true; }

std::string cublaslt_soname() { return soname(); }

void add_cublaslt_candidates(const std::vector<std::string>& paths) { Library::instance().add_candidates(paths); }

std::string load_cublaslt() { return Library::instance().loaded_from(); }

int cublaslt_version() noexcept { return Library::instance().version(); }

}  // namespace conveyor::kernels::cuda
