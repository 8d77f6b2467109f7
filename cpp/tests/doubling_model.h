// The model the front ends' tests serve: "double", x FP32 [2] -> y = 2x, batches of up to 16.
#pragma once

#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/memory_pool.h"

namespace conveyor::testing {

inline BatcherOptions doubling_model_options() {
  BatcherOptions o;
  o.model_name = "double";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.max_batch_size = 16;
  return o;
}

// y = 2x over a pooled output.
inline std::vector<Tensor> doubled(const Batch& batch) {
  const Tensor& x = batch.inputs[0];
  Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
  const auto* in = static_cast<const float*>(x.data);
  auto* out = static_cast<float*>(y.data);
  for (int64_t i = 0; i < x.shape.numel(); ++i) out[i] = 2 * in[i];
  return {y};
}

}  // namespace conveyor::testing
