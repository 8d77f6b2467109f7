// softmax, softmax_topk, argmax and layer_norm over rows, for one ISA (see vector_ops.h).
// Cheap reductions run four vectors at a time so the add or max latency does not bound
// them; tails go through the same vector code on padded lanes.
#include "kernels/cpu/activations.h"

#include <cstdint>

#include "kernels/cpu/vector_ops.h"

namespace conveyor::kernels::CONVEYOR_KERNEL_ISA {

namespace {

constexpr float kInf = __builtin_inff();
constexpr int64_t kUnroll = 4 * kLanes;

// Maxima of 4 * kLanes disjoint subsets of the row (its lanes), skipping NaN: -inf
// for a subset that is empty or all NaN. Each finite one is an element of the row.
struct LaneMaxima {
  vfloat m[4];

  // The largest value of the row, skipping NaN (-inf for a row of NaN: the NaN then
  // reaches every output through the sum of exps).
  float max() const {
    return max_lanes_skip_nan(max_skip_nan(max_skip_nan(m[0], m[1]), max_skip_nan(m[2], m[3])));
  }
};

LaneMaxima lane_maxima(const float* x, int64_t n) {
  vfloat m0 = splat(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + kUnroll <= n; i += kUnroll) {
    m0 = max_skip_nan(load(x + i), m0);
    m1 = max_skip_nan(load(x + i + kLanes), m1);
    m2 = max_skip_nan(load(x + i + 2 * kLanes), m2);
    m3 = max_skip_nan(load(x + i + 3 * kLanes), m3);
  }
  for (; i + kLanes <= n; i += kLanes) m0 = max_skip_nan(load(x + i), m0);
  if (i < n) m1 = max_skip_nan(load_partial(x + i, n - i, -kInf), m1);
  return {{m0, m1, m2, m3}};
}

// Called by exp_sum with each vector's offset, values and valid lane count (top k).
struct NoSelection {
  void operator()(int64_t, vfloat, int) const {}
};

// sum(exp(x - max)); with kStore also writes each exp to out (which may be x); `select`
// sees every loaded vector with the count of its valid lanes. Two accumulators, two
// vectors per step: measured faster than one (the add latency shows) and than four
// (exp's constants already crowd AVX2's 16 vector registers). softmax and softmax_topk
// share it, so their sums agree bit for bit.
template <bool kStore, class Select = NoSelection>
float exp_sum(const float* x, int64_t n, float max, float* out, Select select = {}) {
  vfloat s0 = splat(0.0f), s1 = s0;
  auto step = [&](int64_t at, vfloat& sum) {
    const vfloat v = load(x + at);
    select(at, v, kLanes);
    const vfloat e = exp_nonpositive(v - max);
    if constexpr (kStore) store(out + at, e);
    sum += e;
  };
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    step(i, s0);
    step(i + kLanes, s1);
  }
  if (i + kLanes <= n) {
    step(i, s0);
    i += kLanes;
  }
  if (i < n) {
    // Padding with -inf gives exp(-inf - max) = 0 for a finite max; with max = -inf the
    // row's own lanes are NaN already.
    const vfloat v = load_partial(x + i, n - i, -kInf);
    select(i, v, static_cast<int>(n - i));
    vfloat e = exp_nonpositive(v - max);
    if constexpr (kStore) __builtin_memcpy(out + i, &e, static_cast<size_t>(n - i) * sizeof(float));
    for (int64_t lane = n - i; lane < kLanes; ++lane) e[lane] = 0.0f;
    s1 += e;
  }
  return sum_lanes(s0 + s1);
}

void scale_row(float* out, int64_t n, float factor) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(out + i, load(out + i) * factor);
  for (; i < n; ++i) out[i] *= factor;
}

void softmax_rows(const float* x, int64_t cols, float* out, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* in = x + row * cols;
    float* dst = out + row * cols;
    const float max = lane_maxima(in, cols).max();
    const float sum = exp_sum<true>(in, cols, max, dst);
    scale_row(dst, cols, 1.0f / sum);
  }
}

// ---- top k -------------------------------------------------------------------------

// Whether (a, index_a) ranks before (b, index_b): larger first, NaN above everything,
// the lower index first among equals.
inline bool ranks_before(float a, int64_t index_a, float b, int64_t index_b) {
  if (a > b) return true;
  if (a < b) return false;
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  return index_a < index_b;
}

// The best k offered entries as a binary heap with the worst one at the root, stored in
// the caller's values/indices arrays (k of each). It starts with k sentinel entries
// (-inf, largest index) that rank below every element of a row.
class TopKHeap {
 public:
  TopKHeap(float* values, int64_t* indices, int64_t k) : values_(values), indices_(indices), k_(k) {
    for (int64_t i = 0; i < k; ++i) {
      values_[i] = -kInf;
      indices_[i] = INT64_MAX;
    }
  }

  void offer(float value, int64_t index) {
    if (!ranks_before(value, index, values_[0], indices_[0])) return;
    values_[0] = value;
    indices_[0] = index;
    sift_down(0, k_);
  }

  // Sorts the kept entries best first (heap sort: the root, the worst, goes last).
  void sort() {
    for (int64_t size = k_; size > 1; --size) {
      swap(0, size - 1);
      sift_down(0, size - 1);
    }
  }

 private:
  void swap(int64_t i, int64_t j) {
    const float v = values_[i];
    values_[i] = values_[j];
    values_[j] = v;
    const int64_t ix = indices_[i];
    indices_[i] = indices_[j];
    indices_[j] = ix;
  }

  // Moves entry `at` down until both children rank before it (heap of `size` entries).
  void sift_down(int64_t at, int64_t size) {
    for (;;) {
      int64_t worst = at;
      for (int64_t child = 2 * at + 1; child <= 2 * at + 2 && child < size; ++child) {
        if (ranks_before(values_[worst], indices_[worst], values_[child], indices_[child])) worst = child;
      }
      if (worst == at) return;
      swap(at, worst);
      at = worst;
    }
  }

  float* values_;
  int64_t* indices_;
  int64_t k_;
};

// A lower bound on the row's k-th largest value: the k-th largest of its lane maxima
// (k of them are distinct elements at least that large), found without branches by
// taking out the largest k - 1 times; equal lanes go out together, which can only lower
// the bound. -inf when k exceeds the lanes.
float kth_largest_bound(const LaneMaxima& maxima, int64_t k) {
  if (k > 4 * kLanes) return -kInf;
  vfloat m0 = maxima.m[0], m1 = maxima.m[1], m2 = maxima.m[2], m3 = maxima.m[3];
  const vfloat gone = splat(-kInf);
  vfloat largest = broadcast_max(max_skip_nan(max_skip_nan(m0, m1), max_skip_nan(m2, m3)));
  for (int64_t taken = 1; taken < k; ++taken) {
    m0 = m0 == largest ? gone : m0;
    m1 = m1 == largest ? gone : m1;
    m2 = m2 == largest ? gone : m2;
    m3 = m3 == largest ? gone : m3;
    largest = broadcast_max(max_skip_nan(max_skip_nan(m0, m1), max_skip_nan(m2, m3)));
  }
  return largest[0];
}

// Two passes over each row: lane maxima (the max, and a lower bound on the k-th largest
// logit), then the sum of exps, which also notes per vector the lanes that reach the
// bound (exp is monotonic, so the top k logits are the top k probabilities). The notes
// are a byte per vector written unconditionally: no branch or call in the exp loop.
// The noted lanes, few since the bound sits near the k-th largest, then go through
// the heap, and k more exps give the values.
void softmax_topk_rows(const float* x, int64_t cols, int64_t k, float* values, int64_t* indices,
                       int64_t row_begin, int64_t row_end) {
  static_assert(kLanes <= 8, "a byte holds one vector's lanes");
  const int64_t blocks = (cols + kLanes - 1) / kLanes;
  ScratchArray<uint8_t> noted(blocks + 8);  // padded to whole 8-byte words
  for (int64_t b = blocks; b < blocks + 8; ++b) noted[b] = 0;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* in = x + row * cols;
    float* top_values = values + row * k;
    int64_t* top_indices = indices + row * k;
    const LaneMaxima maxima = lane_maxima(in, cols);
    const float max = maxima.max();
    const vfloat bound = splat(kth_largest_bound(maxima, k));
    auto note = [&](int64_t at, vfloat v, int valid_lanes) {
      // !(x < bound) also notes NaN, which ranks above everything.
      noted[at / kLanes] = static_cast<uint8_t>(lane_bits(~(v < bound)) & ((1 << valid_lanes) - 1));
    };
    const float inv_sum = 1.0f / exp_sum<false>(in, cols, max, nullptr, note);
    TopKHeap top(top_values, top_indices, k);
    for (int64_t b = 0; b < blocks; b += 8) {
      uint64_t word;
      __builtin_memcpy(&word, &noted[b], sizeof word);
      for (; word != 0; word &= word - 1) {
        const int bit = __builtin_ctzll(word);
        const int64_t j = (b + bit / 8) * kLanes + bit % 8;
        top.offer(in[j], j);
      }
    }
    top.sort();
    // The same max, exp and factor as softmax_rows: equal to softmax bit for bit.
    int64_t j = 0;
    for (; j + kLanes <= k; j += kLanes) {
      store(top_values + j, exp_nonpositive(load(top_values + j) - max) * inv_sum);
    }
    if (j < k) {
      const vfloat v = exp_nonpositive(load_partial(top_values + j, k - j, 0.0f) - max) * inv_sum;
      __builtin_memcpy(top_values + j, &v, static_cast<size_t>(k - j) * sizeof(float));
    }
  }
}

// ---- argmax ------------------------------------------------------------------------

int64_t argmax_row(const float* in, int64_t n) {
  vfloat m0 = splat(-kInf), m1 = m0;
  vint nan0 = vint{}, nan1 = nan0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vfloat a = load(in + i), b = load(in + i + kLanes);
    m0 = max_skip_nan(a, m0);
    m1 = max_skip_nan(b, m1);
    nan0 |= a != a;
    nan1 |= b != b;
  }
  for (; i < n; i += kLanes) {
    const vfloat a = i + kLanes <= n ? load(in + i) : load_partial(in + i, n - i, -kInf);
    m0 = max_skip_nan(a, m0);
    nan0 |= a != a;
  }
  if (any_lane(nan0 | nan1)) {
    for (int64_t j = 0; j < n; ++j) {
      if (in[j] != in[j]) return j;
    }
  }
  const float max = max_lanes_skip_nan(max_skip_nan(m0, m1));
  // The first position holding the max: whole vectors first, lanes once one matches.
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    if (any_lane(load(in + j) == max)) break;
  }
  for (; j < n; ++j) {
    if (in[j] == max) return j;
  }
  return 0;  // unreachable: max is one of the row's values (-inf for a row of -inf)
}

void argmax_rows(const float* x, int64_t cols, int64_t* out, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) out[row] = argmax_row(x + row * cols, cols);
}

// ---- layer_norm ------------------------------------------------------------------------

// sum((x - center)^2) with center = 0 gives the plain sum of x when kSquare is false.
template <bool kSquare>
float centered_sum(const float* in, int64_t n, float center) {
  vfloat s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
  auto term = [center](vfloat v) {
    const vfloat d = v - center;
    if constexpr (kSquare) return d * d;
    return d;
  };
  int64_t i = 0;
  for (; i + kUnroll <= n; i += kUnroll) {
    s0 += term(load(in + i));
    s1 += term(load(in + i + kLanes));
    s2 += term(load(in + i + 2 * kLanes));
    s3 += term(load(in + i + 3 * kLanes));
  }
  for (; i + kLanes <= n; i += kLanes) s0 += term(load(in + i));
  // Padding with the center contributes exactly 0.
  if (i < n) s1 += term(load_partial(in + i, n - i, center));
  return sum_lanes((s0 + s1) + (s2 + s3));
}

void layer_norm_rows(const float* x, int64_t cols, const float* gamma, const float* beta, float epsilon,
                     float* out, int64_t row_begin, int64_t row_end) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* in = x + row * cols;
    float* dst = out + row * cols;
    // Two passes for the statistics (mean, then squared deviations): the one-pass
    // sum-of-squares formula loses the variance to cancellation when |mean| >> std.
    const float mean = centered_sum<false>(in, cols, 0.0f) * inv_cols;
    const float var = centered_sum<true>(in, cols, mean) * inv_cols;
    const float inv_std = 1.0f / __builtin_sqrtf(var + epsilon);
    int64_t i = 0;
    for (; i + kLanes <= cols; i += kLanes) {
      store(dst + i, (load(in + i) - mean) * inv_std * load(gamma + i) + load(beta + i));
    }
    for (; i < cols; ++i) dst[i] = madd((in[i] - mean) * inv_std, gamma[i], beta[i]);
  }
}

}  // namespace

const ActivationKernels& activation_kernels() noexcept {
  static const ActivationKernels kernels{&softmax_rows, &softmax_topk_rows, &argmax_rows, &layer_norm_rows};
  return kernels;
}

}  // namespace conveyor::kernels::CONVEYOR_KERNEL_ISA
