// Reference dense layers: the definitions, in plain loops. Sums in double and <cmath>
// activations make these far more accurate than the float32 kernels they check.
#include <cmath>

#include "conveyor/dense.h"

namespace conveyor::reference {

double activate(Activation act, double v) noexcept {
  switch (act) {
    case Activation::kNone: return v;
    case Activation::kRelu: return v > 0.0 ? v : 0.0;
    case Activation::kGeluErf: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / M_PI);
      return 0.5 * v * (1.0 + std::tanh(c * (v + 0.044715 * v * v * v)));
    }
    case Activation::kSigmoid: return 1.0 / (1.0 + std::exp(-v));
    case Activation::kTanh: return std::tanh(v);
  }
  return v;
}

void dense(const float* x, int64_t M, int64_t K, int64_t N, const float* W, const float* bias, Activation act,
           float* y) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double sum = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(x[m * K + k]) * W[k * N + n];
      y[m * N + n] = static_cast<float>(activate(act, sum));
    }
  }
}

void dequantize_dense(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* Wq, const float* scale,
                      const float* bias, Activation act, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double sum = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        // The weight as defined: dequantized to float first (Wq * scale), then multiplied.
        const float w = static_cast<float>(Wq[k * N + n]) * scale[n];
        sum += static_cast<double>(x[m * K + k]) * w;
      }
      y[m * N + n] = static_cast<float>(activate(act, sum));
    }
  }
}

}  // namespace conveyor::reference
