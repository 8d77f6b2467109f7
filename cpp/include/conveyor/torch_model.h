// A PyTorch model compiled ahead of time (torch.export + AOTInductor, a `.pt2` package),
// run through the compiled model's C interface: no torch headers at build time, no
// Python and no GIL at run time.
//
// The caller (python/conveyor/backends/torch_package.py) extracts the package's model
// folder and passes the path of its compiled `.so` and of torch's libtorch_cpu.so.
// TorchModel opens libtorch_cpu.so once per process with RTLD_GLOBAL (the model .so
// links against it and takes its tensor shims from it), opens the model .so, and
// creates one model container holding `num_models` copies of the model, so that up to
// that many run() calls compute at once (the container hands each call a free copy and
// blocks while none is free); the weights are shared by the copies.
//
// run() is thread-safe. Inputs are wrapped zero-copy (the batch's pooled buffers) and
// must be C-contiguous CPU tensors; outputs are returned zero-copy as well, each
// Tensor owning torch's tensor handle (released when the last view of it goes), except
// a non-contiguous output and one that is a view of an input or a weight (memory that
// the batch or the model owns), which are copied first.
//
// Destruction deletes the container and closes the model .so. glibc keeps such a library
// loaded (torch's compiled code defines GNU unique symbols), so the pages of its
// read-only segments, where the weights live, are released by hand (madvise): the
// memory a loaded model held returns to the system when it is unloaded.
//
// Errors: construction and run() throw Error(kInvalidInput) naming the file or the
// input for what the caller got wrong, and Error(kModelExecution) with torch's
// message when the compiled model fails ("[torch] ...").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/tensor.h"

namespace conveyor {

struct TorchLibrary;  // the libtorch_cpu.so entry points (torch_model.cpp)

class TorchModel {
 public:
  // intra_op_threads (>= 1): OpenMP threads each run() may use, set on the calling thread.
  TorchModel(const std::string& libtorch_path, const std::string& model_so_path, const std::string& model_dir,
             int num_models, int intra_op_threads);
  ~TorchModel();
  TorchModel(const TorchModel&) = delete;
  TorchModel& operator=(const TorchModel&) = delete;

  // One batch: inputs in the model's input order; outputs in its output order.
  std::vector<Tensor> run(const std::vector<Tensor>& inputs) const;

  // For measuring the backend's cost per batch (bench/bench_torch.py): `iterations` pairs of
  // timed runs on `inputs`, interleaved, in nanoseconds each. model_run_ns: the compiled
  // model's own AOTInductorModelContainerRun, on input handles made before the timing.
  // backend_run_ns: run(), as the batcher's instance thread calls it (inputs wrapped,
  // outputs inspected and wrapped). Neither times deleting the outputs.
  struct RunTimings {
    std::vector<int64_t> model_run_ns, backend_run_ns;
  };
  RunTimings time_runs(const std::vector<Tensor>& inputs, int iterations) const;

  const std::vector<std::string>& input_names() const noexcept { return input_names_; }
  const std::vector<std::string>& output_names() const noexcept { return output_names_; }
  // The pytree specs torch.export recorded (JSON text), for logs and signature checks.
  const std::string& in_spec() const noexcept { return in_spec_; }
  const std::string& out_spec() const noexcept { return out_spec_; }
  int num_models() const noexcept { return num_models_; }
  int intra_op_threads() const noexcept { return intra_op_threads_; }

 private:
  struct Entry;  // the model .so's entry points
  std::string last_error(const char* fallback) const;
  // Records where the weights live; throws Error(kInvalidInput) when the package kept
  // them outside the .so (they were never loaded).
  void read_weights(const std::string& model_so_path);
  // Whether `data` lies inside a weight (an output that is a view of one is copied).
  bool aliases_weight(const void* data) const;

  const TorchLibrary* torch_ = nullptr;  // process-wide, never unloaded
  void* model_library_ = nullptr;
  std::unique_ptr<Entry> entry_;
  void* container_ = nullptr;
  std::vector<std::string> input_names_, output_names_;
  std::string in_spec_, out_spec_;
  std::vector<std::pair<uintptr_t, uintptr_t>> weight_ranges_;  // [begin, end) addresses
  int num_models_ = 1;
  int intra_op_threads_ = 1;
};

// The batcher executor that runs `model` on each batch's inputs directly: no Python, no GIL.
Executor torch_model_executor(std::shared_ptr<const TorchModel> model);

}  // namespace conveyor
