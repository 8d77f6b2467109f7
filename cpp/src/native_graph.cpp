// NativeGraph: step list, lifetime planning, and the per-batch walk over the kernels.
#include "conveyor/native_graph.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <utility>

#include "conveyor/error.h"
#include "conveyor/kernels.h"
#include "conveyor/thread_pool.h"

namespace conveyor {

namespace {

[[noreturn]] void invalid(const std::string& what) {
  throw Error(ErrorCode::kInvalidInput, "[native] " + what);
}

// Elements a thread should get before another is worth waking (a wake-up costs about
// what 16k elementwise operations do).
constexpr int64_t kMinElementsPerThread = int64_t{1} << 14;

// fn(begin, end) over [0, n) elements, on as many threads as the work is worth.
template <class Fn>
void for_elements(int64_t n, int threads, Fn fn) {
  const int64_t useful = std::max<int64_t>(1, n / kMinElementsPerThread);
  const int chunks = static_cast<int>(std::min<int64_t>(threads, useful));
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  parallel_for(chunks, chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(n * c / chunks, n * (c + 1) / chunks);
  });
}

float apply(ElementwiseOp op, float a, float b) {
  switch (op) {
    case ElementwiseOp::kAdd: return a + b;
    case ElementwiseOp::kSub: return a - b;
    case ElementwiseOp::kMul: return a * b;
    case ElementwiseOp::kDiv: return a / b;
  }
  return 0.0f;
}

const char* op_name(ElementwiseOp op) {
  switch (op) {
    case ElementwiseOp::kAdd: return "add";
    case ElementwiseOp::kSub: return "sub";
    case ElementwiseOp::kMul: return "mul";
    case ElementwiseOp::kDiv: return "div";
  }
  return "?";
}

int64_t last_dim(const Tensor& t) { return t.shape.ndim() ? t.shape[t.shape.ndim() - 1] : 1; }

const float* in_data(const Tensor& t) { return static_cast<const float*>(t.data); }
float* out_data(Tensor& t) { return static_cast<float*>(t.data); }

Shape with_last_dim(const Shape& shape, int64_t last) {
  Shape out = shape;
  out[out.ndim() - 1] = last;
  return out;
}

Shape reshaped(const Shape& in, const std::vector<int64_t>& dims) {
  std::vector<int64_t> out(dims.size());
  int inferred = -1;
  int64_t known = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = dims[i];
    if (d == 0) {
      if (static_cast<int>(i) >= in.ndim()) {
        invalid("reshape: dim 0 copies input dim " + std::to_string(i) + ", which " + in.to_string() + " lacks");
      }
      d = in[static_cast<int>(i)];
    }
    if (d == -1) {
      inferred = static_cast<int>(i);
    } else {
      known *= d;
    }
    out[i] = d;
  }
  if (inferred >= 0) {
    if (known == 0 || in.numel() % known != 0) {
      invalid("reshape: cannot view " + in.to_string() + " with dims that multiply to " + std::to_string(known));
    }
    out[inferred] = in.numel() / known;
  } else if (known != in.numel()) {
    invalid("reshape: cannot view " + in.to_string() + " (" + std::to_string(in.numel()) + " elements) as " +
            std::to_string(known) + " elements");
  }
  return Shape(out.data(), static_cast<int>(out.size()));
}

Shape flattened(const Shape& in, int axis) {
  const int a = axis < 0 ? axis + in.ndim() : axis;
  if (a < 0 || a > in.ndim()) {
    invalid("flatten: axis " + std::to_string(axis) + " is out of range for " + in.to_string());
  }
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < in.ndim(); ++i) (i < a ? outer : inner) *= in[i];
  return Shape{outer, inner};
}

}  // namespace

ElementwiseOp elementwise_op_from_name(std::string_view name) {
  for (ElementwiseOp op : {ElementwiseOp::kAdd, ElementwiseOp::kSub, ElementwiseOp::kMul, ElementwiseOp::kDiv}) {
    if (name == op_name(op)) return op;
  }
  invalid("unknown elementwise op '" + std::string(name) + "': expected add, sub, mul or div");
}

NativeGraph::NativeGraph(int input_count, int threads, std::shared_ptr<MemoryPool> pool)
    : input_count_(input_count), threads_(threads), pool_(pool ? std::move(pool) : MemoryPool::default_host()) {
  if (input_count < 1) invalid("a graph needs at least one input, got " + std::to_string(input_count));
  if (threads < 1) invalid("threads must be >= 1, got " + std::to_string(threads));
  slot_count_ = input_count;
}

NativeGraph::Step NativeGraph::step_of(Kind kind, int in, int out) {
  Step s;
  s.kind = kind;
  s.in = in;
  s.out = out;
  return s;
}

void NativeGraph::add(Step step) {
  if (finalized_) invalid("the graph is finalized; steps can no longer be added");
  const int step_index = static_cast<int>(steps_.size());
  std::vector<int> reads = {step.in};
  if (step.kind == Kind::kBinary) reads.push_back(step.in2);
  for (int in : reads) {
    if (in < 0 || in >= slot_count_) {
      invalid("step " + std::to_string(step_index) + " reads slot " + std::to_string(in) +
              ", which no earlier step writes");
    }
  }
  if (step.out != slot_count_) {
    invalid("step " + std::to_string(step_index) + " writes slot " + std::to_string(step.out) +
            "; the next free slot is " + std::to_string(slot_count_) + " (each slot is written once, in order)");
  }
  ++slot_count_;
  steps_.push_back(std::move(step));
}

void NativeGraph::add_dense(int in, int out, std::shared_ptr<const PackedDense> packed) {
  if (!packed) invalid("dense: the packed weights are null");
  Step s = step_of(Kind::kDense, in, out);
  s.dense = std::move(packed);
  add(std::move(s));
}

void NativeGraph::add_activation(int in, int out, Activation act) {
  Step s = step_of(Kind::kActivation, in, out);
  s.activation = act;
  add(std::move(s));
}

void NativeGraph::add_softmax(int in, int out) {
  Step s = step_of(Kind::kSoftmax, in, out);
  add(std::move(s));
}

void NativeGraph::add_layer_norm(int in, int out, std::vector<float> gamma, std::vector<float> beta, float epsilon) {
  if (!gamma.empty() && !beta.empty() && gamma.size() != beta.size()) {
    invalid("layer_norm: gamma has " + std::to_string(gamma.size()) + " values and beta " +
            std::to_string(beta.size()));
  }
  if (!(epsilon >= 0.0f)) invalid("layer_norm: epsilon must be >= 0, got " + std::to_string(epsilon));
  Step s = step_of(Kind::kLayerNorm, in, out);
  s.values = std::move(gamma), s.values2 = std::move(beta), s.epsilon = epsilon;
  add(std::move(s));
}

void NativeGraph::add_binary_constant(int in, int out, ElementwiseOp op, std::vector<float> constant,
                                      bool constant_first) {
  if (constant.empty()) invalid(std::string(op_name(op)) + ": the constant is empty");
  Step s = step_of(Kind::kBinaryConstant, in, out);
  s.op = op, s.values = std::move(constant), s.constant_first = constant_first;
  add(std::move(s));
}

void NativeGraph::add_binary(int a, int b, int out, ElementwiseOp op) {
  Step s = step_of(Kind::kBinary, a, out);
  s.in2 = b, s.op = op;
  add(std::move(s));
}

void NativeGraph::add_reshape(int in, int out, std::vector<int64_t> dims) {
  if (dims.empty() || static_cast<int>(dims.size()) > Shape::kMaxDims) {
    invalid("reshape: expected 1 to " + std::to_string(Shape::kMaxDims) + " dims, got " + std::to_string(dims.size()));
  }
  if (std::count(dims.begin(), dims.end(), int64_t{-1}) > 1) invalid("reshape: at most one dim may be -1");
  for (int64_t d : dims) {
    if (d < -1) invalid("reshape: dims must be >= -1, got " + std::to_string(d));
  }
  Step s = step_of(Kind::kReshape, in, out);
  s.dims = std::move(dims);
  add(std::move(s));
}

void NativeGraph::add_flatten(int in, int out, int axis) {
  Step s = step_of(Kind::kFlatten, in, out);
  s.axis = axis;
  add(std::move(s));
}

void NativeGraph::finalize(std::vector<int> outputs) {
  if (finalized_) invalid("the graph is already finalized");
  if (outputs.empty()) invalid("a graph needs at least one output");
  for (int o : outputs) {
    if (o < 0 || o >= slot_count_) invalid("output slot " + std::to_string(o) + " is never written");
  }
  outputs_ = std::move(outputs);
  plan_lifetimes();
  finalized_ = true;
}

// Memory groups: slots that share memory (views, and steps written in place). A step may
// write in place only when no slot of its input's group is read after it, the group is
// not a graph input (the caller's memory) and holds no graph output.
void NativeGraph::plan_lifetimes() {
  constexpr int kForever = INT_MAX;
  std::vector<int> last_read(slot_count_, -1);
  for (size_t s = 0; s < steps_.size(); ++s) {
    last_read[steps_[s].in] = static_cast<int>(s);
    if (steps_[s].in2 >= 0) last_read[steps_[s].in2] = static_cast<int>(s);
  }
  for (int o : outputs_) last_read[o] = kForever;

  std::vector<int> group(slot_count_);
  std::vector<int> group_last_read(slot_count_, -1);
  std::vector<bool> group_is_input(slot_count_, false);
  for (int i = 0; i < input_count_; ++i) {
    group[i] = i;
    group_last_read[i] = last_read[i];
    group_is_input[i] = true;
  }
  for (size_t s = 0; s < steps_.size(); ++s) {
    Step& step = steps_[s];
    const int g = group[step.in];
    bool joins = false;
    switch (step.kind) {
      case Kind::kReshape:
      case Kind::kFlatten:
        joins = true;
        break;
      case Kind::kDense:
        break;
      default:
        step.in_place = !group_is_input[g] && group_last_read[g] <= static_cast<int>(s);
        joins = step.in_place;
    }
    // A slot nobody reads is released as soon as it is written.
    if (last_read[step.out] < 0) last_read[step.out] = static_cast<int>(s);
    if (joins) {
      group[step.out] = g;
      group_last_read[g] = std::max(group_last_read[g], last_read[step.out]);
    } else {
      group[step.out] = step.out;
      group_last_read[step.out] = last_read[step.out];
    }
  }
  for (int slot = 0; slot < slot_count_; ++slot) {
    if (last_read[slot] >= 0 && last_read[slot] != kForever) steps_[last_read[slot]].release_after.push_back(slot);
  }
}

std::string NativeGraph::describe() const {
  std::string out;
  for (const Step& s : steps_) {
    switch (s.kind) {
      case Kind::kDense:
        out += std::string("dense(") + activation_name(s.dense->activation()) + ")";
        break;
      case Kind::kActivation: out += std::string("activation(") + activation_name(s.activation) + ")"; break;
      case Kind::kSoftmax: out += "softmax"; break;
      case Kind::kLayerNorm: out += "layer_norm"; break;
      case Kind::kBinaryConstant: out += std::string(op_name(s.op)) + "_constant"; break;
      case Kind::kBinary: out += op_name(s.op); break;
      case Kind::kReshape: out += "reshape"; break;
      case Kind::kFlatten: out += "flatten"; break;
    }
    // Appended piece by piece: GCC 12 misreports chained `"," + std::to_string()` (-Wrestrict).
    out += ' ';
    out += std::to_string(s.in);
    if (s.in2 >= 0) {
      out += ',';
      out += std::to_string(s.in2);
    }
    out += " -> ";
    out += std::to_string(s.out);
    if (s.in_place) out += " (in place)";
    out += '\n';
  }
  return out;
}

Tensor NativeGraph::output_like(const Tensor& x, const Shape& shape, bool in_place) const {
  if (in_place) {
    Tensor t = x;
    t.shape = shape;
    return t;
  }
  return make_pooled_tensor(pool_, DType::kFloat32, shape);
}

void NativeGraph::run_step(const Step& step, std::vector<Tensor>& slots) const {
  const Tensor& x = slots[step.in];
  Tensor& y = slots[step.out];
  const int64_t cols = last_dim(x);
  const int64_t n = x.shape.numel();
  switch (step.kind) {
    case Kind::kDense: {
      const PackedDense& p = *step.dense;
      if (x.shape.ndim() < 1 || cols != p.in_features()) {
        invalid("dense expects [..., " + std::to_string(p.in_features()) + "], got " + x.shape.to_string());
      }
      y = output_like(x, with_last_dim(x.shape, p.out_features()), false);
      dense(in_data(x), n / cols, p, out_data(y), threads_);
      return;
    }
    case Kind::kActivation: {
      y = output_like(x, x.shape, step.in_place);
      const float* src = in_data(x);
      float* dst = out_data(y);
      const Activation act = step.activation;
      for_elements(n, threads_, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dst[i] = static_cast<float>(reference::activate(act, src[i]));
      });
      return;
    }
    case Kind::kSoftmax:
      y = output_like(x, x.shape, step.in_place);
      if (n) kernels::softmax(in_data(x), n / cols, cols, out_data(y), threads_);
      return;
    case Kind::kLayerNorm: {
      const int64_t want = static_cast<int64_t>(std::max(step.values.size(), step.values2.size()));
      if (want && cols != want) {
        invalid("layer_norm expects [..., " + std::to_string(want) + "], got " + x.shape.to_string());
      }
      y = output_like(x, x.shape, step.in_place);
      if (n) {
        kernels::layer_norm(in_data(x), n / cols, cols, step.values.empty() ? nullptr : step.values.data(),
                            step.values2.empty() ? nullptr : step.values2.data(), step.epsilon, out_data(y), threads_);
      }
      return;
    }
    case Kind::kBinaryConstant: {
      const int64_t c = static_cast<int64_t>(step.values.size());
      if (c != 1 && c != cols) {
        invalid(std::string(op_name(step.op)) + ": a constant of " + std::to_string(c) +
                " values does not broadcast over the last axis of " + x.shape.to_string());
      }
      y = output_like(x, x.shape, step.in_place);
      const float* src = in_data(x);
      const float* k = step.values.data();
      float* dst = out_data(y);
      const ElementwiseOp op = step.op;
      const bool first = step.constant_first;
      for_elements(n, threads_, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float v = k[c == 1 ? 0 : i % c];
          dst[i] = first ? apply(op, v, src[i]) : apply(op, src[i], v);
        }
      });
      return;
    }
    case Kind::kBinary: {
      const Tensor& x2 = slots[step.in2];
      if (!(x.shape == x2.shape)) {
        invalid(std::string(op_name(step.op)) + " needs two tensors of one shape, got " + x.shape.to_string() +
                " and " + x2.shape.to_string());
      }
      y = output_like(x, x.shape, step.in_place);
      const float* a = in_data(x);
      const float* b2 = in_data(x2);
      float* dst = out_data(y);
      const ElementwiseOp op = step.op;
      for_elements(n, threads_, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dst[i] = apply(op, a[i], b2[i]);
      });
      return;
    }
    case Kind::kReshape:
      y = output_like(x, reshaped(x.shape, step.dims), true);
      return;
    case Kind::kFlatten:
      y = output_like(x, flattened(x.shape, step.axis), true);
      return;
  }
}

std::vector<Tensor> NativeGraph::run(const std::vector<Tensor>& inputs) const {
  if (!finalized_) invalid("run() before finalize()");
  if (static_cast<int>(inputs.size()) != input_count_) {
    invalid("expected " + std::to_string(input_count_) + " inputs, got " + std::to_string(inputs.size()));
  }
  std::vector<Tensor> slots(slot_count_);
  for (int i = 0; i < input_count_; ++i) {
    const Tensor& t = inputs[i];
    if (t.dtype != DType::kFloat32 || t.device.kind != DeviceKind::kCPU || t.shape.ndim() < 1) {
      invalid("input " + std::to_string(i) + " must be an FP32 CPU tensor with at least one dim, got " +
              dtype_name(t.dtype) + " " + t.shape.to_string());
    }
    slots[i] = t;
  }
  for (const Step& step : steps_) {
    run_step(step, slots);
    for (int slot : step.release_after) slots[slot] = Tensor{};
  }
  std::vector<Tensor> out;
  out.reserve(outputs_.size());
  for (int o : outputs_) {
    Tensor t = slots[o];
    // Outputs outlive the batch: they must not borrow the caller's input memory.
    bool borrowed = o < input_count_ || t.owner == nullptr;
    for (int i = 0; i < input_count_ && !borrowed; ++i) borrowed = t.data == inputs[i].data;
    if (borrowed) {
      Tensor copy = make_pooled_tensor(pool_, DType::kFloat32, t.shape);
      if (copy.nbytes()) std::memcpy(copy.data, t.data, copy.nbytes());
      t = std::move(copy);
    }
    out.push_back(std::move(t));
  }
  return out;
}

Executor native_graph_executor(std::shared_ptr<const NativeGraph> graph) {
  return [graph = std::move(graph)](const Batch& batch) { return graph->run(batch.inputs); };
}

}  // namespace conveyor
