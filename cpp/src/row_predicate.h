// Internal to the graph (graph.cpp, row_predicate.cpp): the checks a plan's predicates pass.
#pragma once

#include <string>
#include <vector>

#include "conveyor/graph.h"

namespace conveyor {

// Whether a row predicate can read values of `dtype` (and a default can fill them): every
// type but BYTES and the half-precision formats.
inline bool numeric(DType dtype) noexcept {
  return dtype != DType::kBytes && dtype != DType::kFloat16 && dtype != DType::kBFloat16;
}

// Throws Error(kInvalidInput), prefixed by `where`, unless the program is well formed (every
// operation has its operands, one value is left), every test reads a slot below
// `readable_slots` holding numbers, and compares with one value (a set for in / not in).
void check_row_predicate(const RowPredicate& p, const std::string& where, const std::vector<TensorSpec>& slot_specs,
                         int readable_slots);

}  // namespace conveyor
