// Pre- and post-processing steps around a model's executor, run inside the batch.
//
// A Pipeline turns the batch of public inputs (what clients send) into the backend's
// inputs, runs the backend's executor (a NativeGraph, or a Python callable adapted by
// the bindings), and turns the backend's outputs into the public outputs. The steps are
// CPU kernels (kernels.h) on pooled memory: they never need Python or the GIL, so a
// native backend with steps runs each batch wholly in C++.
//
// Steps:
// - normalize_image on one input: uint8 [batch, H, W, C] (or [H, W, C] for a model that
//   does not batch) -> float32/float16 NCHW or NHWC, (x * scale - mean[c]) / std[c].
// - on one backend output (float32 [..., classes]), producing new outputs:
//   softmax       -> float32, same shape
//   softmax_topk  -> float32 [..., k] probabilities and int64 [..., k] indices, best first
//   argmax        -> int64 [..., 1]
//   top_k         -> float32 [..., k] raw scores and int64 [..., k] indices, best first
//                    (classification: the caller formats "score:index:label" from them)
// Every step allocates fresh outputs: a backend's outputs are never written in place,
// since a Python model may hand back arrays it keeps.
//
// Build with the add_* calls and set_outputs(), then share it read-only between threads.
// Errors: building throws Error(kInvalidInput); a batch whose tensors do not fit a step
// throws Error(kInvalidInput) ("[pipeline] ...") for inputs and Error(kModelExecution)
// for backend outputs.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/kernels.h"
#include "conveyor/memory_pool.h"
#include "conveyor/tensor.h"

namespace conveyor {

enum class PostprocessKind : uint8_t { kSoftmax, kSoftmaxTopK, kArgmax, kTopK };

// "softmax", "softmax_topk", "argmax", "top_k"; throws Error(kInvalidInput) otherwise.
PostprocessKind postprocess_kind_from_name(std::string_view name);
// "NCHW" or "NHWC"; throws Error(kInvalidInput) otherwise.
kernels::ImageLayout image_layout_from_name(std::string_view name);

class Pipeline {
 public:
  // Where one pipeline output comes from: backend output `index` (step -1), or output
  // `index` of post step `step` (0: values / probabilities / argmax, 1: indices).
  struct OutputSource {
    int step = -1;
    int index = 0;
  };

  // threads (>= 1) bounds each kernel call; pool null: the default host pool.
  explicit Pipeline(int threads = 1, std::shared_ptr<MemoryPool> pool = nullptr);

  // Replaces batch input `input` by its normalized image. dtype: kFloat32 or kFloat16.
  void add_normalize_image(int input, std::vector<float> mean, std::vector<float> std, float scale,
                           kernels::ImageLayout layout, DType dtype);
  // A step over backend output `source`; returns the step's index. k: for the top-k kinds.
  int add_postprocess(PostprocessKind kind, int source, int64_t k = 0);
  // The pipeline's outputs in order. Not called: the backend's outputs, unchanged.
  void set_outputs(std::vector<OutputSource> outputs);

  // The backend's inputs for a batch of public inputs (unchanged ones are shared).
  std::vector<Tensor> preprocess(const std::vector<Tensor>& inputs) const;
  // The public outputs for the backend's outputs.
  std::vector<Tensor> postprocess(const std::vector<Tensor>& backend_outputs) const;

 private:
  struct PreStep {
    int input = 0;
    std::vector<float> mean, std;
    float scale = 1.0f;
    kernels::ImageLayout layout = kernels::ImageLayout::kNCHW;
    DType dtype = DType::kFloat32;
  };
  struct PostStep {
    PostprocessKind kind = PostprocessKind::kSoftmax;
    int source = 0;
    int64_t k = 0;
  };

  Tensor normalize(const PreStep& step, const Tensor& images) const;
  std::vector<Tensor> run_post(const PostStep& step, const Tensor& x) const;

  const int threads_;
  const std::shared_ptr<MemoryPool> pool_;
  std::vector<PreStep> pre_;
  std::vector<PostStep> post_;
  std::vector<OutputSource> outputs_;
  bool outputs_set_ = false;
};

// The executor running pipeline.preprocess -> inner -> pipeline.postprocess on each batch.
Executor pipeline_executor(std::shared_ptr<const Pipeline> pipeline, Executor inner);

}  // namespace conveyor
