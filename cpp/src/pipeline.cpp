// Pipeline: the pre/post-processing steps' checks, shapes and kernel calls.
#include "conveyor/pipeline.h"

#include <string>
#include <utility>

#include "conveyor/error.h"

namespace conveyor {

namespace {

[[noreturn]] void fail(ErrorCode code, const std::string& what) { throw Error(code, "[pipeline] " + what); }

const char* kind_name(PostprocessKind kind) {
  switch (kind) {
    case PostprocessKind::kSoftmax: return "softmax";
    case PostprocessKind::kSoftmaxTopK: return "softmax_topk";
    case PostprocessKind::kArgmax: return "argmax";
    case PostprocessKind::kTopK: return "top_k";
  }
  return "?";
}

int output_count(PostprocessKind kind) {
  return kind == PostprocessKind::kSoftmaxTopK || kind == PostprocessKind::kTopK ? 2 : 1;
}

Shape with_last_dim(const Shape& shape, int64_t last) {
  Shape out = shape;
  out[out.ndim() - 1] = last;
  return out;
}

}  // namespace

PostprocessKind postprocess_kind_from_name(std::string_view name) {
  for (auto kind : {PostprocessKind::kSoftmax, PostprocessKind::kSoftmaxTopK, PostprocessKind::kArgmax,
                    PostprocessKind::kTopK}) {
    if (name == kind_name(kind)) return kind;
  }
  fail(ErrorCode::kInvalidInput,
       "unknown postprocess step '" + std::string(name) + "': expected softmax, softmax_topk, argmax or top_k");
}

kernels::ImageLayout image_layout_from_name(std::string_view name) {
  if (name == "NCHW") return kernels::ImageLayout::kNCHW;
  if (name == "NHWC") return kernels::ImageLayout::kNHWC;
  fail(ErrorCode::kInvalidInput, "unknown image layout '" + std::string(name) + "': expected NCHW or NHWC");
}

Pipeline::Pipeline(int threads, std::shared_ptr<MemoryPool> pool)
    : threads_(threads), pool_(pool ? std::move(pool) : MemoryPool::default_host()) {
  if (threads < 1) fail(ErrorCode::kInvalidInput, "threads must be >= 1, got " + std::to_string(threads));
}

void Pipeline::add_normalize_image(int input, std::vector<float> mean, std::vector<float> std, float scale,
                                   kernels::ImageLayout layout, DType dtype) {
  if (input < 0) fail(ErrorCode::kInvalidInput, "normalize_image: input index " + std::to_string(input) + " < 0");
  if (mean.empty() || mean.size() != std.size()) {
    fail(ErrorCode::kInvalidInput, "normalize_image: mean and std need one value per channel, got " +
                                       std::to_string(mean.size()) + " and " + std::to_string(std.size()));
  }
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16) {
    fail(ErrorCode::kInvalidInput,
         std::string("normalize_image: dtype must be FP32 or FP16, got ") + dtype_name(dtype));
  }
  for (const PreStep& s : pre_) {
    if (s.input == input) fail(ErrorCode::kInvalidInput, "input " + std::to_string(input) + " has a step already");
  }
  pre_.push_back(PreStep{input, std::move(mean), std::move(std), scale, layout, dtype});
}

int Pipeline::add_postprocess(PostprocessKind kind, int source, int64_t k) {
  if (source < 0) fail(ErrorCode::kInvalidInput, std::string(kind_name(kind)) + ": source index < 0");
  const bool top = output_count(kind) == 2;
  if (top && k < 1) {
    fail(ErrorCode::kInvalidInput, std::string(kind_name(kind)) + ": k must be >= 1, got " + std::to_string(k));
  }
  post_.push_back(PostStep{kind, source, top ? k : 0});
  return static_cast<int>(post_.size()) - 1;
}

void Pipeline::set_outputs(std::vector<OutputSource> outputs) {
  for (const OutputSource& o : outputs) {
    const bool ok = o.step < 0 ? o.index >= 0
                               : o.step < static_cast<int>(post_.size()) && o.index >= 0 &&
                                     o.index < output_count(post_[o.step].kind);
    if (!ok) {
      fail(ErrorCode::kInvalidInput,
           "output (step " + std::to_string(o.step) + ", index " + std::to_string(o.index) + ") does not exist");
    }
  }
  outputs_ = std::move(outputs);
  outputs_set_ = true;
}

Tensor Pipeline::normalize(const PreStep& step, const Tensor& images) const {
  const Shape& s = images.shape;
  const bool batched = s.ndim() == 4;
  const int64_t channels = static_cast<int64_t>(step.mean.size());
  if (images.dtype != DType::kUInt8 || images.device.kind != DeviceKind::kCPU || (s.ndim() != 3 && !batched) ||
      s[s.ndim() - 1] != channels) {
    fail(ErrorCode::kInvalidInput, "normalize_image needs UINT8 [batch, height, width, " + std::to_string(channels) +
                                       "] images on the CPU, got " + dtype_name(images.dtype) + " " + s.to_string());
  }
  kernels::ImageShape shape;
  shape.batch = batched ? s[0] : 1;
  shape.height = s[batched ? 1 : 0];
  shape.width = s[batched ? 2 : 1];
  shape.channels = channels;
  Shape out_shape = s;
  if (step.layout == kernels::ImageLayout::kNCHW) {
    out_shape = batched ? Shape{shape.batch, channels, shape.height, shape.width}
                        : Shape{channels, shape.height, shape.width};
  }
  Tensor out = make_pooled_tensor(pool_, step.dtype, out_shape);
  kernels::normalize_image(static_cast<const uint8_t*>(images.data), shape, step.mean.data(), step.std.data(),
                           step.scale, out.data, step.dtype, step.layout, threads_);
  return out;
}

std::vector<Tensor> Pipeline::preprocess(const std::vector<Tensor>& inputs) const {
  std::vector<Tensor> out = inputs;
  for (const PreStep& step : pre_) {
    if (step.input >= static_cast<int>(inputs.size())) {
      fail(ErrorCode::kInvalidInput, "normalize_image reads input " + std::to_string(step.input) + " of " +
                                         std::to_string(inputs.size()));
    }
    out[step.input] = normalize(step, inputs[step.input]);
  }
  return out;
}

std::vector<Tensor> Pipeline::run_post(const PostStep& step, const Tensor& x) const {
  const char* name = kind_name(step.kind);
  if (x.dtype != DType::kFloat32 || x.device.kind != DeviceKind::kCPU || x.shape.ndim() < 1 ||
      x.shape[x.shape.ndim() - 1] < 1) {
    fail(ErrorCode::kModelExecution, std::string(name) + " needs an FP32 CPU output [..., classes], got " +
                                         dtype_name(x.dtype) + " " + x.shape.to_string());
  }
  const int64_t cols = x.shape[x.shape.ndim() - 1];
  const int64_t rows = x.shape.numel() / cols;
  const auto* data = static_cast<const float*>(x.data);
  if (step.k > cols) {
    fail(ErrorCode::kModelExecution, std::string(name) + " keeps k = " + std::to_string(step.k) +
                                         " classes, but the output has only " + std::to_string(cols));
  }
  switch (step.kind) {
    case PostprocessKind::kSoftmax: {
      Tensor out = make_pooled_tensor(pool_, DType::kFloat32, x.shape);
      kernels::softmax(data, rows, cols, static_cast<float*>(out.data), threads_);
      return {std::move(out)};
    }
    case PostprocessKind::kArgmax: {
      Tensor out = make_pooled_tensor(pool_, DType::kInt64, with_last_dim(x.shape, 1));
      kernels::argmax(data, rows, cols, static_cast<int64_t*>(out.data), threads_);
      return {std::move(out)};
    }
    case PostprocessKind::kSoftmaxTopK:
    case PostprocessKind::kTopK: {
      const Shape shape = with_last_dim(x.shape, step.k);
      Tensor values = make_pooled_tensor(pool_, DType::kFloat32, shape);
      Tensor indices = make_pooled_tensor(pool_, DType::kInt64, shape);
      auto* v = static_cast<float*>(values.data);
      auto* idx = static_cast<int64_t*>(indices.data);
      // The ranking of the logits is the ranking of their softmax (exp is monotonic):
      // top_k reuses it and then reads the raw scores at the chosen indices.
      kernels::softmax_topk(data, rows, cols, step.k, v, idx, threads_);
      if (step.kind == PostprocessKind::kTopK) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < step.k; ++j) v[r * step.k + j] = data[r * cols + idx[r * step.k + j]];
        }
      }
      return {std::move(values), std::move(indices)};
    }
  }
  return {};
}

std::vector<Tensor> Pipeline::postprocess(const std::vector<Tensor>& backend_outputs) const {
  if (!outputs_set_) return backend_outputs;
  std::vector<std::vector<Tensor>> produced;
  produced.reserve(post_.size());
  for (const PostStep& step : post_) {
    if (step.source >= static_cast<int>(backend_outputs.size())) {
      fail(ErrorCode::kModelExecution, std::string(kind_name(step.kind)) + " reads backend output " +
                                           std::to_string(step.source) + " of " +
                                           std::to_string(backend_outputs.size()));
    }
    produced.push_back(run_post(step, backend_outputs[step.source]));
  }
  std::vector<Tensor> out;
  out.reserve(outputs_.size());
  for (const OutputSource& o : outputs_) {
    if (o.step >= 0) {
      out.push_back(produced[o.step][o.index]);
    } else if (o.index < static_cast<int>(backend_outputs.size())) {
      out.push_back(backend_outputs[o.index]);
    } else {
      fail(ErrorCode::kModelExecution, "the backend returned " + std::to_string(backend_outputs.size()) +
                                           " outputs, expected at least " + std::to_string(o.index + 1));
    }
  }
  return out;
}

Executor pipeline_executor(std::shared_ptr<const Pipeline> pipeline, Executor inner) {
  return [pipeline = std::move(pipeline), inner = std::move(inner)](const Batch& batch) {
    const std::vector<Tensor> inputs = pipeline->preprocess(batch.inputs);
    const std::vector<Tensor> outputs = inner(Batch{inputs, batch.rows, batch.instance});
    return pipeline->postprocess(outputs);
  };
}

}  // namespace conveyor
