// Dense layers: the packed kernels against the plain-loop reference on both ISA paths and
// several thread counts; packing round trips; argument errors. Run under ASan and TSan.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "isa.h"
#include "conveyor/cpu_features.h"
#include "conveyor/dense.h"
#include "conveyor/error.h"

using namespace conveyor;
using conveyor::test::isas;

namespace {

constexpr Activation kActivations[] = {Activation::kNone,     Activation::kRelu,    Activation::kGeluErf,
                                       Activation::kGeluTanh, Activation::kSigmoid, Activation::kTanh};

std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Largest violation of |y - ref| <= tol, tol scaled by the size of the terms summed
// (float32 accumulation in a different order), plus the activations' approximation error.
double worst_excess(const std::vector<float>& y, const std::vector<float>& ref, const std::vector<float>& x,
                    const std::vector<float>& W, const float* bias, int64_t M, int64_t K, int64_t N) {
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double magnitude = bias ? std::fabs(bias[n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) magnitude += std::fabs(x[m * K + k] * W[k * N + n]);
      const double tol = 1e-5 * magnitude + 2e-6;
      const double diff = std::fabs(static_cast<double>(y[m * N + n]) - ref[m * N + n]);
      if (!(diff <= tol)) worst = std::max(worst, std::isnan(diff) ? INFINITY : diff - tol);
    }
  }
  return worst;
}

Tensor cpu_tensor(DType dtype, Shape shape, const void* data) {
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  t.data = const_cast<void*>(data);
  return t;
}

struct Case {
  int64_t M, K, N;
};

// Odd sizes, partial panels, one and several row blocks, several K slices (K > 512 with
// more than one row block).
constexpr Case kCases[] = {{1, 1, 1}, {1, 17, 33}, {2, 64, 16}, {3, 5, 100}, {7, 31, 17},
                           {8, 129, 48}, {13, 530, 20}, {20, 7, 3}};

}  // namespace

TEST_CASE("dense: float kernels match the reference on every ISA, activation and thread count") {
  std::mt19937 rng(1234);
  for (const Case& c : kCases) {
    const auto x = random_floats(c.M * c.K, rng), W = random_floats(c.K * c.N, rng, 0.3f);
    const auto b = random_floats(c.N, rng);
    for (const Activation act : kActivations) {
      for (const bool with_bias : {true, false}) {
        const float* bias = with_bias ? b.data() : nullptr;
        const auto packed = pack_dense(W.data(), c.K, c.N, bias, act);
        std::vector<float> ref(c.M * c.N);
        reference::dense(x.data(), c.M, c.K, c.N, W.data(), bias, act, ref.data());
        for (const CpuIsa isa : isas()) {
          force_cpu_isa(isa);
          for (const int threads : {1, 2, 3}) {
            std::vector<float> y(c.M * c.N, NAN);
            dense(x.data(), c.M, *packed, y.data(), threads);
            const double excess = worst_excess(y, ref, x, W, bias, c.M, c.K, c.N);
            if (excess > 0) {
              std::cerr << "  M=" << c.M << " K=" << c.K << " N=" << c.N << " act=" << activation_name(act)
                        << " isa=" << cpu_isa_name(isa) << " threads=" << threads << " excess=" << excess << "\n";
            }
            CHECK(excess <= 0);
          }
        }
        reset_cpu_isa();
      }
    }
  }
}

// Large enough for several threads (each needs ~2M multiply-adds): rows split across
// threads (M > N), with several row blocks and K slices of packed x rows; and panels
// split across threads (M < N).
TEST_CASE("dense: thread splits, row blocks and K slices") {
  std::mt19937 rng(4321);
  for (const Case& c : {Case{260, 1030, 18}, Case{10, 600, 700}}) {
    const auto x = random_floats(c.M * c.K, rng), W = random_floats(c.K * c.N, rng, 0.05f);
    const auto b = random_floats(c.N, rng);
    const auto packed = pack_dense(W.data(), c.K, c.N, b.data(), Activation::kRelu);
    std::vector<float> ref(c.M * c.N);
    reference::dense(x.data(), c.M, c.K, c.N, W.data(), b.data(), Activation::kRelu, ref.data());
    for (const CpuIsa isa : isas()) {
      force_cpu_isa(isa);
      for (const int threads : {1, 2, 3}) {
        std::vector<float> y(c.M * c.N, NAN);
        dense(x.data(), c.M, *packed, y.data(), threads);
        CHECK(worst_excess(y, ref, x, W, b.data(), c.M, c.K, c.N) <= 0);
      }
    }
    reset_cpu_isa();
  }
}

TEST_CASE("dense: int8 kernels match the dequantize-then-multiply reference") {
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> q(-127, 127);
  for (const Case& c : kCases) {
    const auto x = random_floats(c.M * c.K, rng);
    std::vector<int8_t> Wq(c.K * c.N);
    for (auto& w : Wq) w = static_cast<int8_t>(q(rng));
    std::vector<float> scale(c.N), W(c.K * c.N);
    for (auto& s : scale) s = 0.001f + 0.01f * std::uniform_real_distribution<float>(0, 1)(rng);
    for (int64_t i = 0; i < c.K * c.N; ++i) W[i] = static_cast<float>(Wq[i]) * scale[i % c.N];
    const auto b = random_floats(c.N, rng);
    for (const Activation act : {Activation::kNone, Activation::kRelu, Activation::kGeluErf}) {
      const auto packed = pack_dense_int8(Wq.data(), c.K, c.N, scale.data(), b.data(), act);
      std::vector<float> ref(c.M * c.N);
      reference::dequantize_dense(x.data(), c.M, c.K, c.N, Wq.data(), scale.data(), b.data(), act, ref.data());
      for (const CpuIsa isa : isas()) {
        force_cpu_isa(isa);
        for (const int threads : {1, 2}) {
          std::vector<float> y(c.M * c.N, NAN);
          dequantize_dense(x.data(), c.M, *packed, y.data(), threads);
          CHECK(worst_excess(y, ref, x, W, b.data(), c.M, c.K, c.N) <= 0);
        }
      }
      reset_cpu_isa();
    }
  }
}

TEST_CASE("dense: dequantize_int8 is Wq * scale on both ISAs") {
  const int64_t K = 5, N = 37;
  std::vector<int8_t> Wq(K * N);
  std::vector<float> scale(N);
  for (int64_t i = 0; i < K * N; ++i) Wq[i] = static_cast<int8_t>((i * 37) % 255 - 127);
  for (int64_t n = 0; n < N; ++n) scale[n] = 0.5f + 0.25f * static_cast<float>(n);
  for (const CpuIsa isa : isas()) {
    force_cpu_isa(isa);
    std::vector<float> out(K * N, NAN);
    dequantize_int8(Wq.data(), K, N, scale.data(), out.data(), 2);
    int wrong = 0;
    for (int64_t i = 0; i < K * N; ++i) wrong += out[i] != static_cast<float>(Wq[i]) * scale[i % N];
    CHECK_EQ(wrong, 0);
  }
  reset_cpu_isa();
}

TEST_CASE("dense: unpacking returns the packed weights, bias and scales") {
  std::mt19937 rng(5);
  const int64_t K = 9, N = 21;
  const auto W = random_floats(K * N, rng);
  const auto packed = pack_dense(W.data(), K, N, nullptr, Activation::kTanh);
  CHECK(!packed->has_bias() && !packed->quantized() && packed->activation() == Activation::kTanh);
  CHECK_EQ(packed->panel_count(), int64_t{2});
  std::vector<float> back(K * N);
  packed->unpack_f32(back.data());
  CHECK(back == W);
  for (int64_t n = 0; n < 2 * PackedDense::kPanelWidth; ++n) CHECK_EQ(packed->bias_padded()[n], 0.0f);
  CHECK_THROWS_CODE(packed->unpack_int8(nullptr), ErrorCode::kInvalidInput);

  std::vector<int8_t> Wq(K * N), back_q(K * N);
  for (int64_t i = 0; i < K * N; ++i) Wq[i] = static_cast<int8_t>(i % 200 - 100);
  std::vector<float> scale(N, 0.5f), dequantized(K * N);
  const auto packed_q = pack_dense_int8(Wq.data(), K, N, scale.data(), nullptr, Activation::kNone);
  packed_q->unpack_int8(back_q.data());
  CHECK(back_q == Wq);
  packed_q->unpack_f32(dequantized.data());
  int wrong = 0;
  for (int64_t i = 0; i < K * N; ++i) wrong += dequantized[i] != 0.5f * static_cast<float>(Wq[i]);
  CHECK_EQ(wrong, 0);
}

TEST_CASE("dense: one pack serves concurrent callers") {
  std::mt19937 rng(7);
  const int64_t M = 9, K = 40, N = 35;
  const auto W = random_floats(K * N, rng), b = random_floats(N, rng);
  const auto packed = pack_dense(W.data(), K, N, b.data(), Activation::kGeluTanh);
  const auto x = random_floats(M * K, rng);
  std::vector<float> expected(M * N);
  dense(x.data(), M, *packed, expected.data(), 1);
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        std::vector<float> y(M * N);
        dense(x.data(), M, *packed, y.data(), 1 + round % 3);
        mismatches[t] += y != expected;
      }
    });
  }
  for (auto& c : callers) c.join();
  for (int t = 0; t < 4; ++t) CHECK_EQ(mismatches[t], 0);
}

TEST_CASE("dense: bad arguments are InvalidInput") {
  const std::vector<float> W(12, 1.0f), x(8, 1.0f);
  std::vector<float> y(8);
  CHECK_THROWS_CODE(pack_dense(W.data(), 0, 4, nullptr, Activation::kNone), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(pack_dense(nullptr, 3, 4, nullptr, Activation::kNone), ErrorCode::kInvalidInput);
  const std::vector<int8_t> Wq(12, 1);
  CHECK_THROWS_CODE(pack_dense_int8(Wq.data(), 3, 4, nullptr, nullptr, Activation::kNone), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(activation_from_name("swish"), ErrorCode::kInvalidInput);
  CHECK(activation_from_name("gelu_tanh") == Activation::kGeluTanh);

  const auto packed = pack_dense(W.data(), 3, 4, nullptr, Activation::kNone);
  CHECK_THROWS_CODE(dense(x.data(), 2, *packed, y.data(), 0), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(dense(x.data(), -1, *packed, y.data(), 1), ErrorCode::kInvalidInput);
  std::vector<float> shared(16, 1.0f);
  CHECK_THROWS_CODE(dense(shared.data(), 2, *packed, shared.data() + 4, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(dequantize_dense(x.data(), 2, *packed, y.data(), 1), ErrorCode::kInvalidInput);
  dense(nullptr, 0, *packed, nullptr, 1);  // M == 0: nothing to do

  // Tensor forms name the argument.
  Tensor xt = cpu_tensor(DType::kFloat32, Shape{2, 4}, x.data());
  Tensor yt = cpu_tensor(DType::kFloat32, Shape{2, 4}, y.data());
  try {
    dense(xt, *packed, yt, 1);
    CHECK(false);
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("x must have shape [M, 3]") != std::string::npos);
  }
  Tensor wt = cpu_tensor(DType::kFloat64, Shape{3, 4}, W.data());
  try {
    pack_dense(wt, nullptr, Activation::kNone);
    CHECK(false);
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("W must be FP32, got FP64") != std::string::npos);
  }
  const Tensor bias = cpu_tensor(DType::kFloat32, Shape{3}, x.data());
  wt.dtype = DType::kFloat32;
  CHECK_THROWS_CODE(pack_dense(wt, &bias, Activation::kNone), ErrorCode::kInvalidInput);
}
