// Batch assembly: requests' rows written once, straight into one pooled tensor.
#pragma once

#include <memory>
#include <vector>

#include "conveyor/memory_pool.h"
#include "conveyor/tensor.h"

namespace conveyor {

// Concatenates `parts` along the first dimension into a tensor from `pool`.
// Every part must have the dtype of the first and the same dimensions after the first;
// otherwise throws Error(kInvalidInput) naming the part. Throws kOutOfMemory from the pool.
Tensor gather_rows(const std::vector<const Tensor*>& parts, MemoryPool& pool);

}  // namespace conveyor
