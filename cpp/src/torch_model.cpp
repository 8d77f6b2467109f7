// TorchModel: see conveyor/torch_model.h. The C prototypes are in torch_abi.h.
#include "conveyor/torch_model.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "torch_abi.h"

namespace conveyor {

namespace abi = torch_abi;

namespace {

template <typename Fn>
Fn symbol(void* library, const char* name, const std::string& file) {
  void* address = dlsym(library, name);
  if (address == nullptr) {
    throw Error(ErrorCode::kInvalidInput, "[torch] " + file + " lacks " + name +
                                              ": it is not a torch " "AOTInductor library this version of "
                                              "Conveyor can call (export the model again with the installed torch)");
  }
  return reinterpret_cast<Fn>(address);
}

std::string dlerror_text() {
  const char* text = dlerror();
  return text == nullptr ? "unknown dlopen error" : text;
}

// The whole pages inside the read-only segments (PT_LOAD without PF_W) of the loaded
// object named `name` at load address `base`; `found` false when it is not loaded.
struct SegmentSearch {
  ElfW(Addr) base;
  std::string name;
  std::vector<std::pair<uintptr_t, uintptr_t>> pages;
  bool found = false;
};

int collect_read_only_pages(struct dl_phdr_info* info, size_t, void* data) {
  auto* search = static_cast<SegmentSearch*>(data);
  if (info->dlpi_addr != search->base || info->dlpi_name == nullptr || search->name != info->dlpi_name) return 0;
  search->found = true;
  // Text relocations write into read-only segments while loading: then none is left as the file has it.
  for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type != PT_DYNAMIC) continue;
    const auto* entry = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    for (; entry->d_tag != DT_NULL; ++entry) {
      if (entry->d_tag == DT_TEXTREL || (entry->d_tag == DT_FLAGS && (entry->d_un.d_val & DF_TEXTREL) != 0)) {
        return 1;
      }
    }
  }
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD || (header.p_flags & PF_W) != 0) continue;
    const uintptr_t begin = (info->dlpi_addr + header.p_vaddr + page - 1) / page * page;
    const uintptr_t end = (info->dlpi_addr + header.p_vaddr + header.p_memsz) / page * page;
    if (end > begin) search->pages.emplace_back(begin, end);
  }
  return 1;
}

// Unloads a compiled model library, and frees its memory when the loader keeps it.
// torch's compiled models define GNU unique symbols, which make glibc ignore dlclose: the
// library (with the weights inside it, read in place) stays mapped for the life of the
// process. Its read-only pages were never written, so dropping them is safe (a later
// access, e.g. by its exit handlers, reads them from the file again) and returns the
// memory they hold; its writable pages (relocated data included) are left alone.
void close_model_library(void* library) {
  struct link_map* map = nullptr;
  if (dlinfo(library, RTLD_DI_LINKMAP, &map) != 0 || map == nullptr || map->l_name == nullptr) {
    dlclose(library);
    return;
  }
  SegmentSearch search{map->l_addr, map->l_name, {}};
  dlclose(library);
  dl_iterate_phdr(collect_read_only_pages, &search);
  for (const auto& [begin, end] : search.pages) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }
}

}  // namespace

struct TorchLibrary {
  std::string path;
  abi::CreateTensorFromBlob create_tensor_from_blob;
  abi::EmptyStrided empty_strided;
  abi::CopyInto copy_into;
  abi::DeleteTensor delete_tensor;
  abi::GetDataPtr get_data_ptr;
  abi::GetDim get_dim;
  abi::GetInt64Array get_sizes, get_strides;
  abi::GetInt32 get_dtype, get_device_type;
  int32_t device_type_cpu = 0;
  std::unordered_map<int, int32_t> torch_dtype_of;  // DType -> torch's dtype code
  std::unordered_map<int32_t, DType> dtype_of;      // torch's dtype code -> DType
  void (*omp_set_num_threads)(int) = nullptr;
  int (*omp_get_max_threads)() = nullptr;

  static const TorchLibrary& open(const std::string& path);
};

// Opened once per process and never closed: model libraries and tensors refer to it.
const TorchLibrary& TorchLibrary::open(const std::string& path) {
  static std::mutex mu;
  static std::unique_ptr<TorchLibrary> opened;
  std::lock_guard<std::mutex> lock(mu);
  if (opened) return *opened;
  // RTLD_GLOBAL: the model .so resolves its aoti_torch_* imports against this library.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    throw Error(ErrorCode::kInvalidInput, "[torch] cannot open " + path + ": " + dlerror_text() +
                                              " (install torch: pip install conveyor-serve[torch])");
  }
  auto lib = std::make_unique<TorchLibrary>();
  lib->path = path;
  lib->create_tensor_from_blob = symbol<abi::CreateTensorFromBlob>(handle, "aoti_torch_create_tensor_from_blob", path);
  lib->empty_strided = symbol<abi::EmptyStrided>(handle, "aoti_torch_empty_strided", path);
  lib->copy_into = symbol<abi::CopyInto>(handle, "aoti_torch_copy_", path);
  lib->delete_tensor = symbol<abi::DeleteTensor>(handle, "aoti_torch_delete_tensor_object", path);
  lib->get_data_ptr = symbol<abi::GetDataPtr>(handle, "aoti_torch_get_data_ptr", path);
  lib->get_dim = symbol<abi::GetDim>(handle, "aoti_torch_get_dim", path);
  lib->get_sizes = symbol<abi::GetInt64Array>(handle, "aoti_torch_get_sizes", path);
  lib->get_strides = symbol<abi::GetInt64Array>(handle, "aoti_torch_get_strides", path);
  lib->get_dtype = symbol<abi::GetInt32>(handle, "aoti_torch_get_dtype", path);
  lib->get_device_type = symbol<abi::GetInt32>(handle, "aoti_torch_get_device_type", path);
  lib->device_type_cpu = symbol<abi::DeviceTypeGetter>(handle, "aoti_torch_device_type_cpu", path)();
  const std::pair<DType, const char*> dtypes[] = {
      {DType::kBool, "aoti_torch_dtype_bool"},       {DType::kUInt8, "aoti_torch_dtype_uint8"},
      {DType::kUInt16, "aoti_torch_dtype_uint16"},   {DType::kUInt32, "aoti_torch_dtype_uint32"},
      {DType::kUInt64, "aoti_torch_dtype_uint64"},   {DType::kInt8, "aoti_torch_dtype_int8"},
      {DType::kInt16, "aoti_torch_dtype_int16"},     {DType::kInt32, "aoti_torch_dtype_int32"},
      {DType::kInt64, "aoti_torch_dtype_int64"},     {DType::kFloat16, "aoti_torch_dtype_float16"},
      {DType::kBFloat16, "aoti_torch_dtype_bfloat16"}, {DType::kFloat32, "aoti_torch_dtype_float32"},
      {DType::kFloat64, "aoti_torch_dtype_float64"},
  };
  for (const auto& [dtype, getter] : dtypes) {
    const int32_t code = symbol<abi::DTypeGetter>(handle, getter, path)();
    lib->torch_dtype_of[static_cast<int>(dtype)] = code;
    lib->dtype_of[code] = dtype;
  }
  // libgomp came in with libtorch_cpu.so; its thread count is per calling thread.
  lib->omp_set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  lib->omp_get_max_threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  if (lib->omp_get_max_threads == nullptr) lib->omp_set_num_threads = nullptr;
  opened = std::move(lib);
  return *opened;
}

struct TorchModel::Entry {
  abi::ContainerDelete container_delete;
  abi::ContainerRun run;
  abi::GetLastError get_last_error = nullptr;
};

TorchModel::TorchModel(const std::string& libtorch_path, const std::string& model_so_path,
                       const std::string& model_dir, int num_models, int intra_op_threads)
    : num_models_(num_models), intra_op_threads_(intra_op_threads) {
  if (num_models < 1 || intra_op_threads < 1) {
    throw Error(ErrorCode::kInvalidInput, "[torch] num_models and intra_op_threads must be >= 1, got " +
                                              std::to_string(num_models) + " and " + std::to_string(intra_op_threads));
  }
  torch_ = &TorchLibrary::open(libtorch_path);
  model_library_ = dlopen(model_so_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (model_library_ == nullptr) {
    throw Error(ErrorCode::kInvalidInput, "[torch] cannot open the compiled model " + model_so_path + ": " +
                                              dlerror_text() + " (was the package exported with another torch "
                                              "version? export it again with the installed one)");
  }
  try {
    entry_ = std::make_unique<Entry>();
    entry_->container_delete = symbol<abi::ContainerDelete>(model_library_, "AOTInductorModelContainerDelete",
                                                            model_so_path);
    entry_->run = symbol<abi::ContainerRun>(model_library_, "AOTInductorModelContainerRun", model_so_path);
    entry_->get_last_error = reinterpret_cast<abi::GetLastError>(dlsym(model_library_, "AOTInductorGetLastError"));
    auto create = symbol<abi::ContainerCreateWithDevice>(model_library_, "AOTInductorModelContainerCreateWithDevice",
                                                         model_so_path);
    abi::ContainerHandle container = nullptr;
    if (create(&container, static_cast<size_t>(num_models), "cpu", model_dir.c_str()) != 0 || container == nullptr) {
      throw Error(ErrorCode::kInvalidInput, "[torch] " + model_so_path + ": creating the model failed: " +
                                                last_error("see the process's standard error"));
    }
    container_ = container;
    auto names = [&](const char* count_name, const char* name_name) {
      auto count = symbol<abi::ContainerGetCount>(model_library_, count_name, model_so_path);
      auto get = symbol<abi::ContainerGetName>(model_library_, name_name, model_so_path);
      size_t n = 0;
      if (count(container, &n) != 0) throw Error(ErrorCode::kInvalidInput, "[torch] cannot read " + model_so_path);
      std::vector<std::string> out;
      for (size_t i = 0; i < n; ++i) {
        const char* name = nullptr;
        if (get(container, i, &name) != 0 || name == nullptr) {
          throw Error(ErrorCode::kInvalidInput, "[torch] cannot read tensor names of " + model_so_path);
        }
        out.emplace_back(name);
      }
      return out;
    };
    input_names_ = names("AOTInductorModelContainerGetNumInputs", "AOTInductorModelContainerGetInputName");
    output_names_ = names("AOTInductorModelContainerGetNumOutputs", "AOTInductorModelContainerGetOutputName");
    read_weights(model_so_path);
    auto call_spec = symbol<abi::ContainerGetCallSpec>(model_library_, "AOTInductorModelContainerGetCallSpec",
                                                       model_so_path);
    const char* in_spec = nullptr;
    const char* out_spec = nullptr;
    if (call_spec(container, &in_spec, &out_spec) == 0) {
      in_spec_ = in_spec == nullptr ? "" : in_spec;
      out_spec_ = out_spec == nullptr ? "" : out_spec;
    }
  } catch (...) {
    if (container_ != nullptr) entry_->container_delete(static_cast<abi::ContainerHandle>(container_));
    dlclose(model_library_);
    throw;
  }
}

TorchModel::~TorchModel() {
  if (container_ != nullptr) entry_->container_delete(static_cast<abi::ContainerHandle>(container_));
  if (model_library_ != nullptr) close_model_library(model_library_);
}

void TorchModel::read_weights(const std::string& model_so_path) {
  auto container = static_cast<abi::ContainerHandle>(container_);
  auto count = symbol<abi::ContainerGetCount>(model_library_, "AOTInductorModelContainerGetNumConstants", model_so_path);
  auto folded = symbol<abi::ContainerGetFlag>(model_library_, "AOTInductorModelContainerGetConstantFromFolded",
                                              model_so_path);
  auto extract = symbol<abi::ContainerExtractConstants>(
      model_library_, "AOTInductorModelContainerExtractConstantsMapEntries", model_so_path);
  size_t constants = 0, weights = 0, loaded = 0;
  if (count(container, &constants) != 0) throw Error(ErrorCode::kInvalidInput, "[torch] cannot read " + model_so_path);
  for (size_t i = 0; i < constants; ++i) {
    bool from_folded = false;
    if (folded(container, i, &from_folded) == 0 && !from_folded) ++weights;
  }
  const abi::ConstantMapEntry* entries = nullptr;
  if (weights > 0 && (extract(container, &entries, &loaded, false) != 0 || loaded == 0)) {
    // Running such a model reads weights that were never loaded: refuse it instead.
    throw Error(ErrorCode::kInvalidInput,
                "[torch] " + model_so_path + ": the model's " + std::to_string(weights) +
                    " weights are not inside its compiled library (exported with "
                    "aot_inductor.package_constants_in_so=False); export it with the default, which keeps them there");
  }
  const TorchLibrary& torch = *torch_;
  for (size_t i = 0; i < loaded; ++i) {
    void* data = nullptr;
    int64_t dim = 0;
    int64_t* sizes = nullptr;
    int32_t dtype = 0;
    if (entries[i].handle == nullptr || torch.get_data_ptr(entries[i].handle, &data) != 0 || data == nullptr) continue;
    torch.get_dim(entries[i].handle, &dim);
    torch.get_sizes(entries[i].handle, &sizes);
    torch.get_dtype(entries[i].handle, &dtype);
    int64_t numel = 1;
    for (int64_t d = 0; d < dim; ++d) numel *= sizes[d];
    auto known = torch.dtype_of.find(dtype);
    // An unknown dtype: assume the widest element, so the range errs towards copying.
    const size_t element = known == torch.dtype_of.end() ? 16 : dtype_size(known->second);
    const auto begin = reinterpret_cast<uintptr_t>(data);
    weight_ranges_.emplace_back(begin, begin + static_cast<uintptr_t>(numel) * element);
  }
}

bool TorchModel::aliases_weight(const void* data) const {
  const auto address = reinterpret_cast<uintptr_t>(data);
  // A linear scan: a model has at most a few hundred weights, and a run costs far more.
  for (const auto& [begin, end] : weight_ranges_) {
    if (address >= begin && address < end) return true;
  }
  return false;
}

std::string TorchModel::last_error(const char* fallback) const {
  const char* message = nullptr;
  if (entry_ && entry_->get_last_error != nullptr && entry_->get_last_error(&message) == 0 && message != nullptr &&
      *message != '\0') {
    return message;
  }
  return fallback;
}

namespace {

// Deletes tensor handles this scope still owns (on an error path).
struct HandleGuard {
  const TorchLibrary& torch;
  std::vector<abi::AtenTensorHandle>& handles;
  ~HandleGuard() {
    for (auto handle : handles) {
      if (handle != nullptr) torch.delete_tensor(handle);
    }
  }
};

void contiguous_strides(const int64_t* sizes, int ndim, int64_t* strides) {
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
}

bool is_contiguous(const int64_t* sizes, const int64_t* strides, int ndim) {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// Sets the calling thread's OpenMP thread count for one run and restores it after, so a
// caller's own thread (run() from Python) keeps its setting.
class ThreadCount {
 public:
  ThreadCount(const TorchLibrary& torch, int threads) : torch_(torch) {
    if (torch.omp_set_num_threads == nullptr) return;
    previous_ = torch.omp_get_max_threads();
    if (previous_ != threads) torch.omp_set_num_threads(threads);
    else previous_ = 0;
  }
  ~ThreadCount() {
    if (previous_ > 0) torch_.omp_set_num_threads(previous_);
  }

 private:
  const TorchLibrary& torch_;
  int previous_ = 0;
};

bool aliases_input(const void* data, const std::vector<Tensor>& inputs) {
  const auto* address = static_cast<const char*>(data);
  for (const Tensor& t : inputs) {
    const auto* begin = static_cast<const char*>(t.data);
    if (address >= begin && address < begin + t.nbytes()) return true;
  }
  return false;
}

}  // namespace

std::vector<Tensor> TorchModel::run(const std::vector<Tensor>& inputs) const {
  const TorchLibrary& torch = *torch_;
  if (inputs.size() != input_names_.size()) {
    throw Error(ErrorCode::kInvalidInput, "[torch] expected " + std::to_string(input_names_.size()) +
                                              " inputs, got " + std::to_string(inputs.size()));
  }
  ThreadCount thread_count(torch, intra_op_threads_);
  std::vector<abi::AtenTensorHandle> in(inputs.size(), nullptr);
  std::vector<abi::AtenTensorHandle> out(output_names_.size(), nullptr);
  HandleGuard in_guard{torch, in};
  HandleGuard out_guard{torch, out};
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    auto code = torch.torch_dtype_of.find(static_cast<int>(t.dtype));
    if (code == torch.torch_dtype_of.end() || t.device.kind == DeviceKind::kCUDA) {
      throw Error(ErrorCode::kInvalidInput, "[torch] input '" + input_names_[i] + "': " + dtype_name(t.dtype) +
                                                " tensors on this device cannot be passed to a torch model");
    }
    int64_t strides[Shape::kMaxDims];
    contiguous_strides(t.shape.data(), t.shape.ndim(), strides);
    // Borrowed: the batch's buffer outlives the run; torch never frees it.
    if (torch.create_tensor_from_blob(t.data, t.shape.ndim(), t.shape.data(), strides, 0, code->second,
                                      torch.device_type_cpu, 0, &in[i]) != 0) {
      throw Error(ErrorCode::kModelExecution, "[torch] cannot wrap input '" + input_names_[i] + "'");
    }
  }
  const abi::Status status = entry_->run(static_cast<abi::ContainerHandle>(container_), in.data(), in.size(),
                                         out.data(), out.size(), nullptr, nullptr);
  // The container took the input handles, whether the run succeeded or not.
  std::fill(in.begin(), in.end(), nullptr);
  if (status != 0) {
    throw Error(ErrorCode::kModelExecution, "[torch] the compiled model failed: " +
                                                last_error("see the process's standard error"));
  }
  std::vector<Tensor> results;
  results.reserve(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    abi::AtenTensorHandle handle = out[i];
    int64_t ndim = 0;
    int64_t* sizes = nullptr;
    int64_t* strides = nullptr;
    int32_t code = 0;
    torch.get_dim(handle, &ndim);
    torch.get_sizes(handle, &sizes);
    torch.get_strides(handle, &strides);
    torch.get_dtype(handle, &code);
    auto dtype = torch.dtype_of.find(code);
    if (dtype == torch.dtype_of.end()) {
      throw Error(ErrorCode::kModelExecution, "[torch] output '" + output_names_[i] + "' has torch dtype code " +
                                                  std::to_string(code) + ", which Conveyor cannot serve");
    }
    Tensor result;
    result.dtype = dtype->second;
    result.shape = Shape(sizes, static_cast<int>(ndim));
    void* data = nullptr;
    torch.get_data_ptr(handle, &data);
    // A view of an input (an identity output) would outlive the batch's borrowed buffer,
    // and a view of a weight the model (whose library holds the weights).
    if (!is_contiguous(sizes, strides, static_cast<int>(ndim)) || aliases_input(data, inputs) ||
        aliases_weight(data)) {
      int64_t dense[Shape::kMaxDims];
      contiguous_strides(sizes, static_cast<int>(ndim), dense);
      abi::AtenTensorHandle copy = nullptr;
      if (torch.empty_strided(ndim, sizes, dense, code, torch.device_type_cpu, 0, &copy) != 0 ||
          torch.copy_into(copy, handle, 0) != 0) {
        if (copy != nullptr) torch.delete_tensor(copy);
        throw Error(ErrorCode::kModelExecution, "[torch] cannot copy output '" + output_names_[i] + "'");
      }
      torch.delete_tensor(handle);
      handle = out[i] = copy;
    }
    torch.get_data_ptr(handle, &result.data);
    // The Tensor owns torch's handle from here: the last view of it deletes it.
    const abi::DeleteTensor delete_tensor = torch.delete_tensor;
    result.owner = std::shared_ptr<void>(handle, [delete_tensor](void* h) {
      delete_tensor(static_cast<abi::AtenTensorHandle>(h));
    });
    out[i] = nullptr;
    results.push_back(std::move(result));
  }
  return results;
}

TorchModel::RunTimings TorchModel::time_runs(const std::vector<Tensor>& inputs, int iterations) const {
  using Clock = std::chrono::steady_clock;
  const TorchLibrary& torch = *torch_;
  if (inputs.size() != input_names_.size() || iterations < 1) {
    throw Error(ErrorCode::kInvalidInput, "[torch] time_runs: expected " + std::to_string(input_names_.size()) +
                                              " inputs and iterations >= 1");
  }
  // The model's own runs use the same thread count as run() sets.
  ThreadCount thread_count(torch, intra_op_threads_);
  RunTimings timings;
  timings.model_run_ns.reserve(static_cast<size_t>(iterations));
  timings.backend_run_ns.reserve(static_cast<size_t>(iterations));
  std::vector<abi::AtenTensorHandle> in(inputs.size(), nullptr);
  std::vector<abi::AtenTensorHandle> out(output_names_.size(), nullptr);
  HandleGuard in_guard{torch, in};
  HandleGuard out_guard{torch, out};
  for (int i = 0; i < iterations; ++i) {
    for (size_t k = 0; k < inputs.size(); ++k) {
      const Tensor& t = inputs[k];
      int64_t strides[Shape::kMaxDims];
      contiguous_strides(t.shape.data(), t.shape.ndim(), strides);
      if (torch.create_tensor_from_blob(t.data, t.shape.ndim(), t.shape.data(), strides, 0,
                                        torch.torch_dtype_of.at(static_cast<int>(t.dtype)), torch.device_type_cpu, 0,
                                        &in[k]) != 0) {
        throw Error(ErrorCode::kModelExecution, "[torch] cannot wrap input '" + input_names_[k] + "'");
      }
    }
    const auto model_start = Clock::now();
    const abi::Status status = entry_->run(static_cast<abi::ContainerHandle>(container_), in.data(), in.size(),
                                           out.data(), out.size(), nullptr, nullptr);
    const auto model_end = Clock::now();
    std::fill(in.begin(), in.end(), nullptr);  // taken by the container
    if (status != 0) throw Error(ErrorCode::kModelExecution, "[torch] the compiled model failed: " + last_error("?"));
    for (auto& handle : out) {
      torch.delete_tensor(handle);
      handle = nullptr;
    }
    const auto backend_start = Clock::now();
    std::vector<Tensor> results = run(inputs);
    const auto backend_end = Clock::now();
    results.clear();
    timings.model_run_ns.push_back(
        std::chrono::duration_cast<std::chrono::nanoseconds>(model_end - model_start).count());
    timings.backend_run_ns.push_back(
        std::chrono::duration_cast<std::chrono::nanoseconds>(backend_end - backend_start).count());
  }
  return timings;
}

Executor torch_model_executor(std::shared_ptr<const TorchModel> model) {
  return [model = std::move(model)](const Batch& batch) { return model->run(batch.inputs); };
}

}  // namespace conveyor
