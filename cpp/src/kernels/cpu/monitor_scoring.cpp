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

// The sum of an integer vector's lanes, halves folded onto each other (fewer
// instructions than lane by lane, once a value).
inline int64_t sum_lanes(vint64 v) {
#if defined(__SSE2__)
#ifdef __AVX2__
  const __m256i x = bits_as<__m256i>(v);
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
#else
  __m128i s = bits_as<__m128i>(v);
#endif
  s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si64(s);
#else
  int64_t s = 0;
  for (int lane = 0; lane < kDoubleLanes; ++lane) s += v[lane];
  return s;
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
  return lo - sum_lanes(below);
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
    for (int64_t r = 0; r < rows; ++r) {
      row_flags[r] |= bin_value(tables[f], values[at + r], bins[at + r], states[at + r]);
    }
  }
}

// A block's four rows are dotted with diff a tile (4 columns) at a time: per tile, one
// load of diff serves four rows (1.25 loads a multiply-add, against 2 for a broadcast
// per column). Two accumulators a row (even and odd tiles) keep eight chains going.
constexpr int kBlockVectors = kFormBlock / kDoubleLanes;

// The lane sums of rows r[0..3] (kBlockVectors vectors each) as kBlockVectors vectors:
// row u's sum in lane u overall.
inline void row_sums(const vdouble (&r)[kFormBlock][kBlockVectors], vdouble (&y)[kBlockVectors]) {
#if defined(__AVX2__)
  const vdouble a = __builtin_shufflevector(r[0][0], r[1][0], 0, 4, 2, 6) +
                    __builtin_shufflevector(r[0][0], r[1][0], 1, 5, 3, 7);  // r0 01, r1 01, r0 23, r1 23
  const vdouble b = __builtin_shufflevector(r[2][0], r[3][0], 0, 4, 2, 6) +
                    __builtin_shufflevector(r[2][0], r[3][0], 1, 5, 3, 7);
  y[0] = __builtin_shufflevector(a, b, 0, 1, 4, 5) + __builtin_shufflevector(a, b, 2, 3, 6, 7);
#else
  static_assert(kBlockVectors == 2, "two-lane vectors");
  vdouble row[kFormBlock];
  for (int u = 0; u < kFormBlock; ++u) row[u] = r[u][0] + r[u][1];
  y[0] = __builtin_shufflevector(row[0], row[1], 0, 2) + __builtin_shufflevector(row[0], row[1], 1, 3);
  y[1] = __builtin_shufflevector(row[2], row[3], 0, 2) + __builtin_shufflevector(row[2], row[3], 1, 3);
#endif
}

double triangular_form(const double* diff, const double* triangle, int64_t padded_k, bool squares) {
  constexpr int64_t kTile = kFormBlock * kFormBlock;
  vdouble total[kBlockVectors] = {};
  const double* t = triangle;
  for (int64_t b = 0; b < padded_k; b += kFormBlock) {
    vdouble even[kFormBlock][kBlockVectors] = {}, odd[kFormBlock][kBlockVectors] = {};
    const auto step = [&](int64_t j, vdouble (&acc)[kFormBlock][kBlockVectors]) {
      vdouble d[kBlockVectors];
      for (int v = 0; v < kBlockVectors; ++v) d[v] = load_double(diff + j + v * kDoubleLanes);
      for (int u = 0; u < kFormBlock; ++u) {
        for (int v = 0; v < kBlockVectors; ++v) {
          acc[u][v] = madd(load_double(t + u * kFormBlock + v * kDoubleLanes), d[v], acc[u][v]);
        }
      }
      t += kTile;
    };
    int64_t j = b;
    for (; j + kFormBlock < padded_k; j += 2 * kFormBlock) {
      step(j, even);
      step(j + kFormBlock, odd);
    }
    if (j < padded_k) step(j, even);
    for (int u = 0; u < kFormBlock; ++u) {
      for (int v = 0; v < kBlockVectors; ++v) even[u][v] += odd[u][v];
    }
    vdouble y[kBlockVectors];
    row_sums(even, y);
    for (int v = 0; v < kBlockVectors; ++v) {
      const vdouble c = squares ? y[v] : load_double(diff + b + v * kDoubleLanes);
      total[v] = madd(c, y[v], total[v]);
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
