// Reference monitor scoring: std::upper_bound per value, the quadratic form in full.
#include <algorithm>
#include <cmath>

#include "reference.h"

namespace conveyor::kernels::reference {

void bin_chunk(const double* values, int64_t rows, const BinTable* tables, int64_t features, uint16_t* bins,
               uint8_t* states, uint8_t* row_flags) {
  for (int64_t f = 0; f < features; ++f) {
    const BinTable& table = tables[f];
    const double* end = table.edges + table.edge_count;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = f * rows + r;
      const double v = values[at];
      if (std::isnan(v) || std::isinf(v)) {
        states[at] = std::isnan(v) ? kValueNaN : kValueInf;
        row_flags[r] |= kRowNonFinite;
        continue;
      }
      bool out_of_range;
      int64_t bin;
      if (table.categorical) {
        const double* match = std::find(table.edges, end, v);
        out_of_range = match == end;
        bin = match - table.edges;
      } else {
        out_of_range = v < table.min || v > table.max;
        bin = std::upper_bound(table.edges, end, v) - table.edges;
      }
      bins[at] = static_cast<uint16_t>(bin);
      states[at] = out_of_range ? kValueOutOfRange : kValueInRange;
      if (out_of_range) row_flags[r] |= kRowOutOfRange;
    }
  }
}

double quadratic_form(const double* d, const double* precision, int64_t k) {
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) sum += d[i] * precision[i * k + j] * d[j];
  }
  return sum;
}

}  // namespace conveyor::kernels::reference
