// The monitor's per-row arithmetic (binning, the Mahalanobis distance), laid out once per
// reference and run by the ISA variant chosen at run time (cpu_features.h). Internal to
// the core: the monitor (monitor.cpp) and the tests use it.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/monitor_scoring.h"

namespace conveyor::kernels {

// The active ISA's kernels, chosen per call (forcing an ISA applies at once).
const MonitorKernels& monitor_kernels() noexcept;

// Length of an edge array as bin_chunk reads it: edge_count rounded up to whole blocks,
// plus one block.
int64_t padded_edge_count(int64_t edge_count) noexcept;

// Appends `edges` padded with +inf to padded_edge_count(edges.size()) values to `out`.
void append_padded_edges(const std::vector<double>& edges, std::vector<double>& out);

// A quadratic form d^T P d as triangular_form computes it. When P's symmetric part
// (P + P^T) / 2 has a Cholesky factor L L^T, U = L^T and the form is ||U d||^2 (half the
// multiply-adds of the full form, and never negative); otherwise U is that symmetric
// part's upper triangle with the off-diagonal entries doubled and the form is d^T (U d).
struct PackedQuadraticForm {
  int64_t k = 0;         // values in d
  int64_t padded_k = 0;  // k rounded up to whole kFormBlock
  bool squares = false;  // true: the Cholesky form
  std::vector<double> triangle;  // triangular_form's layout

  // d^T P d on the active ISA; d holds padded_k finite values, zero past k.
  double evaluate(const double* padded_d) const noexcept;
};

// Packs the k x k row-major matrix P (finite values). Allocates; never throws but for
// std::bad_alloc.
PackedQuadraticForm pack_quadratic_form(const double* precision, int64_t k);

}  // namespace conveyor::kernels
