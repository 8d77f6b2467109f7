// conveyor._core dense layers (conveyor/dense.h): PackedDense, pack_dense[_int8], dense,
// dequantize_int8 and the references (dense_reference*, for tests).
// conveyor/kernels/dense.py is the public face (defaults, device routing, docstrings).
//
// Conversion only: numpy arrays are borrowed as tensors and the core checks dtypes and
// shapes (InvalidInput naming the argument); compute runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <optional>
#include <string>

#include "conveyor/dense.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

using PackedPtr = std::shared_ptr<PackedDense>;

// pybind11 holds packs as shared_ptr<PackedDense>; the core hands out const ones and
// never mutates them, and neither does anything bound here.
PackedPtr hold(std::shared_ptr<const PackedDense> packed) { return std::const_pointer_cast<PackedDense>(packed); }

Tensor borrow_output(py::handle out) {
  Tensor t = borrow_array(out, "out");
  if (!py::reinterpret_borrow<py::array>(out).writeable()) {
    throw Error(ErrorCode::kInvalidInput, "[dense] out is read-only");
  }
  return t;
}

// x itself, or a C-contiguous copy of a strided numpy array (the kernels read rows densely).
py::object contiguous(py::handle x) {
  if (py::isinstance<py::array>(x) && !(py::reinterpret_borrow<py::array>(x).flags() & py::array::c_style)) {
    return py::array::ensure(x, py::array::c_style);
  }
  return py::reinterpret_borrow<py::object>(x);
}

// A new [M, N] float32 output; [0, N] when x is malformed (the core then names x).
py::object new_output(const Tensor& x, const PackedDense& packed) {
  const int64_t rows = x.shape.ndim() == 2 ? x.shape[0] : 0;
  return py::array_t<float>({rows, packed.out_features()});
}

std::optional<Tensor> borrow_optional(py::handle obj, const char* what) {
  if (obj.is_none()) return std::nullopt;
  return borrow_array(obj, what);
}

const Tensor* ptr(const std::optional<Tensor>& t) { return t ? &*t : nullptr; }

py::array_t<float> padded_vector_copy(const float* data, int64_t n) {
  py::array_t<float> out(n);
  std::copy(data, data + n, out.mutable_data());
  return out;
}

std::string repr(const PackedDense& p) {
  return "PackedDense(in_features=" + std::to_string(p.in_features()) +
         ", out_features=" + std::to_string(p.out_features()) + ", weights=" + (p.quantized() ? "int8" : "float32") +
         ", bias=" + (p.has_bias() ? "True" : "False") + ", activation='" + activation_name(p.activation()) + "')";
}

// The references' argument checks (the kernels' own live in the core).
const float* float_matrix(const Tensor& t, const char* what, int64_t cols) {
  if (t.dtype != DType::kFloat32 || t.shape.ndim() != 2 || (cols >= 0 && t.shape[1] != cols)) {
    throw Error(ErrorCode::kInvalidInput, std::string("[dense] ") + what + " must be float32 [rows, " +
                                              (cols >= 0 ? std::to_string(cols) : "cols") + "], got " +
                                              dtype_name(t.dtype) + " " + t.shape.to_string());
  }
  return static_cast<const float*>(t.data);
}

const float* float_vector(const Tensor& t, const char* what, int64_t n) {
  if (t.dtype != DType::kFloat32 || t.shape.ndim() != 1 || t.shape[0] != n) {
    throw Error(ErrorCode::kInvalidInput, std::string("[dense] ") + what + " must be float32 [" + std::to_string(n) +
                                              "], got " + dtype_name(t.dtype) + " " + t.shape.to_string());
  }
  return static_cast<const float*>(t.data);
}

}  // namespace

void init_dense(py::module_& m) {
  py::class_<PackedDense, PackedPtr>(m, "PackedDense",
                                     "A dense layer's weights packed once for the CPU kernels, with its bias and "
                                     "activation. Immutable; safe to share between threads. Make one with "
                                     "conveyor.kernels.pack_dense.")
      .def_property_readonly("in_features", &PackedDense::in_features, "K: x's columns, W's rows.")
      .def_property_readonly("out_features", &PackedDense::out_features, "N: W's columns, y's columns.")
      .def_property_readonly(
          "activation", [](const PackedDense& p) { return activation_name(p.activation()); },
          "The activation applied in the epilogue.")
      .def_property_readonly("has_bias", &PackedDense::has_bias)
      .def_property_readonly("quantized", &PackedDense::quantized, "int8 weights with per-output-channel scales.")
      .def_property_readonly("nbytes", &PackedDense::nbytes, "Bytes held by the packed weights, bias and scales.")
      .def(
          "weight",
          [](const PackedDense& p) -> py::array {
            if (p.quantized()) {
              py::array_t<int8_t> out({p.in_features(), p.out_features()});
              p.unpack_int8(out.mutable_data());
              return out;
            }
            py::array_t<float> out({p.in_features(), p.out_features()});
            p.unpack_f32(out.mutable_data());
            return out;
          },
          "A new [K, N] array of the packed weights: float32 W, or int8 Wq when quantized.")
      .def(
          "bias",
          [](const PackedDense& p) -> py::object {
            if (!p.has_bias()) return py::none();
            return padded_vector_copy(p.bias_padded(), p.out_features());
          },
          "A new [N] float32 array of the bias, or None.")
      .def(
          "scale",
          [](const PackedDense& p) -> py::object {
            if (!p.quantized()) return py::none();
            return padded_vector_copy(p.scale_padded(), p.out_features());
          },
          "A new [N] float32 array of the int8 weights' scales, or None.")
      .def("__repr__", &repr);

  m.def(
      "pack_dense",
      [](py::handle W, py::handle bias, const std::string& activation) {
        const Activation act = activation_from_name(activation);
        const Tensor w = borrow_array(W, "W");
        const auto b = borrow_optional(bias, "bias");
        return hold(pack_dense(w, ptr(b), act));
      },
      py::arg("W"), py::arg("bias"), py::arg("activation"));

  m.def(
      "pack_dense_int8",
      [](py::handle Wq, py::handle scale, py::handle bias, const std::string& activation) {
        const Activation act = activation_from_name(activation);
        const Tensor w = borrow_array(Wq, "Wq");
        const Tensor s = borrow_array(scale, "scale");
        const auto b = borrow_optional(bias, "bias");
        return hold(pack_dense_int8(w, s, ptr(b), act));
      },
      py::arg("Wq"), py::arg("scale"), py::arg("bias"), py::arg("activation"));

  m.def(
      "dense",
      [](py::handle x, const PackedDense& packed, py::handle out, int threads) {
        const py::object x_array = contiguous(x);
        const Tensor xt = borrow_array(x_array, "x");
        py::object y = out.is_none() ? new_output(xt, packed) : py::reinterpret_borrow<py::object>(out);
        Tensor yt = borrow_output(y);
        {
          // Pure compute on arrays this frame keeps alive.
          py::gil_scoped_release nogil;
          dense(xt, packed, yt, threads);
        }
        return y;
      },
      py::arg("x"), py::arg("packed"), py::arg("out") = py::none(), py::arg("threads") = 1,
      "y = act(x @ W + b) into out (a new float32 [M, N] array when None); returns it.");

  m.def(
      "dequantize_int8",
      [](py::handle Wq, py::handle scale, py::handle out, int threads) {
        const Tensor w = borrow_array(Wq, "Wq");
        const Tensor s = borrow_array(scale, "scale");
        Tensor o = borrow_output(out);
        // Pure compute on borrowed arrays the caller keeps alive.
        py::gil_scoped_release nogil;
        dequantize_int8(w, s, o, threads);
      },
      py::arg("Wq"), py::arg("scale"), py::arg("out"), py::arg("threads"));

  m.def(
      "dense_reference",
      [](py::handle x, py::handle W, py::handle bias, const std::string& activation) {
        const Activation act = activation_from_name(activation);
        const Tensor xt = borrow_array(x, "x"), wt = borrow_array(W, "W");
        const auto b = borrow_optional(bias, "bias");
        const float* w = float_matrix(wt, "W", -1);
        const int64_t K = wt.shape[0], N = wt.shape[1];
        const float* xd = float_matrix(xt, "x", K);
        const float* bd = b ? float_vector(*b, "bias", N) : nullptr;
        py::array_t<float> y({xt.shape[0], N});
        reference::dense(xd, xt.shape[0], K, N, w, bd, act, y.mutable_data());
        return y;
      },
      py::arg("x"), py::arg("W"), py::arg("bias"), py::arg("activation"),
      "The plain-loop definition of dense (double sums), for tests.");

  m.def(
      "dequantize_dense_reference",
      [](py::handle x, py::handle Wq, py::handle scale, py::handle bias, const std::string& activation) {
        const Activation act = activation_from_name(activation);
        const Tensor xt = borrow_array(x, "x"), wt = borrow_array(Wq, "Wq"), st = borrow_array(scale, "scale");
        const auto b = borrow_optional(bias, "bias");
        if (wt.dtype != DType::kInt8 || wt.shape.ndim() != 2) {
          throw Error(ErrorCode::kInvalidInput, "[dense] Wq must be a 2-D int8 array");
        }
        const int64_t K = wt.shape[0], N = wt.shape[1];
        const float* xd = float_matrix(xt, "x", K);
        const float* sd = float_vector(st, "scale", N);
        const float* bd = b ? float_vector(*b, "bias", N) : nullptr;
        py::array_t<float> y({xt.shape[0], N});
        reference::dequantize_dense(xd, xt.shape[0], K, N, static_cast<const int8_t*>(wt.data), sd, bd, act,
                                    y.mutable_data());
        return y;
      },
      py::arg("x"), py::arg("Wq"), py::arg("scale"), py::arg("bias"), py::arg("activation"),
      "The plain-loop definition of dequantize_dense (double sums), for tests.");
}

}  // namespace conveyor::bindings
