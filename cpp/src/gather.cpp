#include "conveyor/gather.h"

#include <cstring>
#include <string>

namespace conveyor {

Tensor gather_rows(const std::vector<const Tensor*>& parts, MemoryPool& pool) {
  if (parts.empty()) throw Error(ErrorCode::kInvalidInput, "[gather] nothing to gather");
  const Tensor& head = *parts.front();
  if (head.shape.ndim() < 1) throw Error(ErrorCode::kInvalidInput, "[gather] part 0 has no first dimension");
  int64_t rows = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const Tensor& part = *parts[p];
    bool same = part.dtype == head.dtype && part.shape.ndim() == head.shape.ndim();
    for (int d = 1; same && d < head.shape.ndim(); ++d) same = part.shape[d] == head.shape[d];
    if (!same) {
      throw Error(ErrorCode::kInvalidInput, "[gather] part " + std::to_string(p) + " is " +
                                                dtype_name(part.dtype) + part.shape.to_string() +
                                                ", which cannot be stacked under part 0's " +
                                                dtype_name(head.dtype) + head.shape.to_string());
    }
    rows += part.shape[0];
  }
  Shape shape = head.shape;
  shape[0] = rows;
  Tensor out;
  out.dtype = head.dtype;
  out.shape = shape;
  out.device = pool.device();
  auto block = pool.allocate(out.nbytes());
  out.data = block->data;
  out.owner = std::move(block);
  auto* dst = static_cast<char*>(out.data);
  for (const Tensor* part : parts) {
    const size_t n = part->nbytes();
    if (n) std::memcpy(dst, part->data, n);
    dst += n;
  }
  return out;
}

}  // namespace conveyor
