// The monitor's binning and Mahalanobis quadratic form for one ISA (see
// kernels/cpu/monitor_scoring.h for the contract, vector_ops.h for the rules these files
// follow). Vectors of doubles: 2 lanes on the baseline, 4 with AVX2.
#include "kernels/cpu/monitor_scoring.h"

#include <cstdint>

#include "kernels/cpu/vector_ops.h"

namespace conveyor::kernels::CONVEYOR_KERNEL_ISA {

namespace {

constexpr int kDoubleLanes = kLanes / 2;
typedef double vdouble __attribute__((vector_size(kDoubleLanes * 8)));
typedef int64_t vint64 __attribute__((vector_size(kDoubleLanes * 8)));

static_assert(kEdgeBlock % kDoubleLanes == 0 && kFormBlock % kDoubleLanes == 0,
              "edge and triangle blocks are whole vectors");

// Edges a value's final count reads at most: a search narrows longer edge arrays to this
// window first. Counting a window with vector compares costs a few cycles; each halving
// step costs a dependent load and compare (~10 cycles), so short arrays are counted whole.
constexpr int64_t kCountWindow = 32;

inline vdouble splat_double(double x) { return vdouble{} + x; }

inline vdouble load_double(const double* p) {
  vdouble v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline vdouble madd(vdouble x, vdouble a, vdouble b) {
#if defined(__FMA__) && defined(__AVX2__)
  return bits_as<vdouble>(_mm256_fmadd_pd(bits_as<__m256d>(x), bits_as<__m256d>(a), bits_as<__m256d>(b)));
#else
  return x * a + b;
#endif
}

// Number of edges <= v (std::upper_bound's index), v finite. Halving steps without
// data-dependent branches (live values land in unpredictable bins) narrow the array to a
// window: the edges before it are <= v and those after it > v. The window is then
// counted with vector compares, reading up to a block past it (padding is +inf, real
// edges past the window are > v: neither counts).
inline int64_t count_at_most(const double* edges, int64_t n, double v) {
  int64_t lo = 0;
  while (n > kCountWindow) {
    const int64_t half = n / 2;
    lo += half * static_cast<int64_t>(edges[lo + half - 1] <= v);
    n -= half;
  }
  const vdouble value = splat_double(v);
  vint64 below = {};  // -1 per lane and edge <= v
  for (int64_t i = lo; i < lo + n; i += kDoubleLanes) below += load_double(edges + i) <= value;
  int64_t count = lo;
  for (int lane = 0; lane < kDoubleLanes; ++lane) count -= below[lane];
  return count;
}

// Bins one value: writes its bin (finite values only) and state, returns its row flags.
inline uint8_t bin_value(const BinTable& table, double v, uint16_t& bin_out, uint8_t& state_out) {
  if (!__builtin_isfinite(v)) {
    state_out = __builtin_isnan(v) ? kValueNaN : kValueInf;
    return kRowNonFinite;
  }
  int64_t bin = count_at_most(table.edges, table.edge_count, v);
  bool out_of_range;
  if (!table.categorical) {
    out_of_range = v < table.min || v > table.max;
  } else {  // a known category is the last edge <= v, and equal to it
    out_of_range = bin == 0 || table.edges[bin - 1] != v;
    bin = out_of_range ? table.edge_count : bin - 1;
  }
  bin_out = static_cast<uint16_t>(bin);
  state_out = out_of_range ? kValueOutOfRange : kValueInRange;
  return out_of_range ? kRowOutOfRange : 0;
}

void bin_chunk(const double* values, int64_t rows, const BinTable* tables, int64_t features, uint16_t* bins,
               uint8_t* states, uint8_t* row_flags) {
  if (rows == 1) {  // one row: its flags stay in a register rather than chaining through memory
    uint8_t flags = 0;
    for (int64_t f = 0; f < features; ++f) flags |= bin_value(tables[f], values[f], bins[f], states[f]);
    row_flags[0] |= flags;
    return;
  }
  for (int64_t f = 0; f < features; ++f) {
    const int64_t at = f * rows;
    for (int64_t r = 0; r < rows; ++r) row_flags[r] |= bin_value(tables[f], values[at + r], bins[at + r], states[at + r]);
  }
}

// Block b's rows b..b+3 are kBlockVectors vectors. Each gets four accumulators (one per
// column of a group of four), so the FMA latency does not serialise a row's sum.
constexpr int kBlockVectors = kFormBlock / kDoubleLanes;

double triangular_form(const double* diff, const double* triangle, int64_t padded_k, bool squares) {
  vdouble total[kBlockVectors] = {};
  const double* t = triangle;
  for (int64_t b = 0; b < padded_k; b += kFormBlock) {
    vdouble acc[kFormBlock][kBlockVectors] = {};
    for (int64_t j = b; j < padded_k; j += kFormBlock) {
      for (int u = 0; u < kFormBlock; ++u) {
        const vdouble d = splat_double(diff[j + u]);
        for (int v = 0; v < kBlockVectors; ++v) {
          acc[u][v] = madd(load_double(t + u * kFormBlock + v * kDoubleLanes), d, acc[u][v]);
        }
      }
      t += kFormBlock * kFormBlock;
    }
    for (int v = 0; v < kBlockVectors; ++v) {
      const vdouble y = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
      const vdouble c = squares ? y : load_double(diff + b + v * kDoubleLanes);
      total[v] = madd(c, y, total[v]);
    }
  }
  double sum = 0;  // the four row positions of a block, in order, on every ISA
  for (int v = 0; v < kBlockVectors; ++v) {
    for (int lane = 0; lane < kDoubleLanes; ++lane) sum += total[v][lane];
  }
  return sum;
}

}  // namespace

const MonitorKernels& monitor_kernels() noexcept {
  static const MonitorKernels kernels{&bin_chunk, &triangular_form};
  return kernels;
}

}  // namespace conveyor::kernels::CONVEYOR_KERNEL_ISA
