// The native graph executor: a planned ONNX graph run on Conveyor's CPU kernels.
//
// A NativeGraph is a straight list of steps over numbered tensor slots. The planner
// (python/conveyor/backends/native.py) reads the ONNX file, folds constants, matches
// patterns and fuses layers; it then describes the result here with the add_* calls
// and finalize(). After that the graph is immutable and run() may be called from any
// number of threads at once without locks (the batcher's instances share one graph).
//
// Slots: [0, input_count) are the graph inputs, in the order run() receives them; every
// other slot is written by exactly one step before any step reads it. All tensors are
// float32, C-contiguous and on the CPU. Intermediates come from a memory pool and go
// back to it right after their last reader, so one batch reuses its own blocks.
// Steps that map a tensor elementwise write in place when their input is an
// intermediate nobody reads later; graph inputs are never written.
//
// Errors: building throws Error(kInvalidInput) naming the step ("[native] ..."); run()
// throws Error(kInvalidInput) when a batch's shapes do not fit the graph.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/dense.h"
#include "conveyor/memory_pool.h"
#include "conveyor/tensor.h"

namespace conveyor {

enum class ElementwiseOp : uint8_t { kAdd, kSub, kMul, kDiv };

// "add", "sub", "mul", "div"; throws Error(kInvalidInput) listing them for anything else.
ElementwiseOp elementwise_op_from_name(std::string_view name);

class NativeGraph {
 public:
  // threads (>= 1) bounds the threads each kernel call uses; pool null: the default host pool.
  NativeGraph(int input_count, int threads, std::shared_ptr<MemoryPool> pool = nullptr);

  // ---- building (before finalize) ----
  // y[..., N] = act(x[..., K] @ W + b): every leading dimension of x is a row.
  void add_dense(int in, int out, std::shared_ptr<const PackedDense> packed);
  // The activation alone (kNone copies).
  void add_activation(int in, int out, Activation act);
  // Softmax / LayerNormalization over the last axis. gamma, beta: empty or `cols` floats.
  void add_softmax(int in, int out);
  void add_layer_norm(int in, int out, std::vector<float> gamma, std::vector<float> beta, float epsilon);
  // out = x op c (or c op x when constant_first), c a scalar (1 float) or one value per
  // element of the last axis.
  void add_binary_constant(int in, int out, ElementwiseOp op, std::vector<float> constant, bool constant_first);
  // out = a op b for two tensors of the same shape.
  void add_binary(int a, int b, int out, ElementwiseOp op);
  // A view with another shape, ONNX Reshape rules: 0 copies the input's dim, one -1 is inferred.
  void add_reshape(int in, int out, std::vector<int64_t> dims);
  // A view as [prod(dims[:axis]), prod(dims[axis:])] (ONNX Flatten); axis may be negative.
  void add_flatten(int in, int out, int axis);
  // Ends building: `outputs` are the slots run() returns, in order. Checks that every
  // slot is written before it is read and plans when each intermediate is released.
  void finalize(std::vector<int> outputs);

  // ---- running (after finalize; thread-safe) ----
  // inputs: input_count float32 tensors. The outputs own their memory (pooled); an
  // output that is an input itself is copied.
  std::vector<Tensor> run(const std::vector<Tensor>& inputs) const;

  int input_count() const noexcept { return input_count_; }
  int output_count() const noexcept { return static_cast<int>(outputs_.size()); }
  int threads() const noexcept { return threads_; }
  size_t step_count() const noexcept { return steps_.size(); }
  // One line per step ("dense(relu) 0 -> 1"), for logs and tests.
  std::string describe() const;

 private:
  enum class Kind : uint8_t { kDense, kActivation, kSoftmax, kLayerNorm, kBinaryConstant, kBinary, kReshape, kFlatten };
  struct Step {
    Kind kind = Kind::kDense;
    int in = -1, in2 = -1, out = -1;
    std::shared_ptr<const PackedDense> dense;
    Activation activation = Activation::kNone;
    ElementwiseOp op = ElementwiseOp::kAdd;
    bool constant_first = false;
    std::vector<float> values, values2;  // binary constant; layer norm gamma and beta
    float epsilon = 0.0f;
    std::vector<int64_t> dims;  // reshape
    int axis = 0;               // flatten
    // Planned by finalize():
    bool in_place = false;           // write into the input's memory
    std::vector<int> release_after;  // slots whose memory no later step reads
  };

  static Step step_of(Kind kind, int in, int out);
  void add(Step step);
  void plan_lifetimes();
  Tensor output_like(const Tensor& x, const Shape& shape, bool in_place) const;
  void run_step(const Step& step, std::vector<Tensor>& slots) const;

  const int input_count_;
  const int threads_;
  const std::shared_ptr<MemoryPool> pool_;
  std::vector<Step> steps_;
  std::vector<int> outputs_;
  int slot_count_ = 0;
  bool finalized_ = false;
};

// The batcher executor that runs `graph` on each batch's inputs directly: no Python, no GIL.
Executor native_graph_executor(std::shared_ptr<const NativeGraph> graph);

}  // namespace conveyor
