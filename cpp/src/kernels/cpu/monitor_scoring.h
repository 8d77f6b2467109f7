// The contract between the monitor's scoring (kernels/monitor_scoring.h, compiled once)
// and its ISA variants (kernels/cpu/monitor_scoring.cpp, compiled per ISA into
// conveyor::kernels::<isa>): binning a chunk of feature values on the reference edges,
// and the Mahalanobis quadratic form of one row. Plain data only: this header is read
// by both variants.
#pragma once

#include <cstdint>

namespace conveyor::kernels {

// Edge arrays are padded with +inf to a whole number of blocks and then one block more,
// so a count may read up to a block past the last edge (a search window's tail).
inline constexpr int64_t kEdgeBlock = 4;

// Per value states bin_chunk writes (the monitor's chunk states).
enum : uint8_t { kValueInRange = 0, kValueOutOfRange = 1, kValueNaN = 2, kValueInf = 3 };
// Row flag bits bin_chunk sets (the same bits as conveyor/monitor.h's kFlag*).
inline constexpr uint8_t kRowOutOfRange = 1;
inline constexpr uint8_t kRowNonFinite = 2;

// One feature's bins. Numeric: bin i is [edges[i-1], edges[i]), the outer bins open, and
// a value outside [min, max] is out of range. Categorical: bin i is the category
// edges[i]; any other value goes to bin edge_count and is out of range.
struct BinTable {
  const double* edges = nullptr;  // edge_count ascending finite values, then padding (padded_edge_count)
  int64_t edge_count = 0;
  bool categorical = false;
  double min = 0, max = 0;  // numeric only
};

// The triangle triangular_form reads: an upper-triangular U of padded_k rows and columns
// (padded_k a multiple of kFormBlock, zero past the form's k), stored in blocks of
// kFormBlock rows: block b (rows b..b+3) holds the 4 x 4 tiles U[b..b+3][j..j+3] for
// j = b, b + 4, ... < padded_k, each row-major.
inline constexpr int64_t kFormBlock = 4;

struct MonitorKernels {
  // Bins rows [0, rows) of `features` feature-major columns (value of feature f, row r at
  // values[f * rows + r]) on tables[f]. For a finite value writes its bin to bins[] and
  // kValueInRange or kValueOutOfRange to states[] (same index as values[]); for NaN or
  // +-inf writes kValueNaN or kValueInf (its bin is left unwritten). ORs kRowOutOfRange
  // and kRowNonFinite into row_flags[r]. A bin is std::upper_bound's index of the value
  // in the edges (categorical: the matching category), on every ISA alike.
  void (*bin_chunk)(const double* values, int64_t rows, const BinTable* tables, int64_t features, uint16_t* bins,
                    uint8_t* states, uint8_t* row_flags);
  // With y = U diff: sum_i y_i^2 when `squares`, else sum_i diff_i y_i. diff holds
  // padded_k finite values (zero past k). The variants agree to rounding: they fuse
  // multiply-adds differently and add a row's partial sums in a different order.
  double (*triangular_form)(const double* diff, const double* triangle, int64_t padded_k, bool squares);
};

namespace baseline {
const MonitorKernels& monitor_kernels() noexcept;
}
namespace avx2 {
const MonitorKernels& monitor_kernels() noexcept;
}

}  // namespace conveyor::kernels
