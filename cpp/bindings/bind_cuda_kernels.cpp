// conveyor._core.cuda: the CUDA kernels (conveyor/cuda_kernels.h) over raw device
// pointers. conveyor/kernels/cuda.py is the public face: it takes CuPy arrays, checks
// their shapes and dtypes, picks the stream and passes the pointers here.
//
// Pointers and streams travel as Python ints (addresses); `device` is the CUDA device
// that owns them. Every call only queues work on the stream, but a launch can block
// while the device's queue is full, so the GIL is released around each one.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "conveyor/cuda_kernels.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

namespace cuda = conveyor::kernels::cuda;

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cuda::Launch launch_on(int device, std::uintptr_t stream) { return {device, as_ptr<void>(stream)}; }

using CudaDensePtr = std::shared_ptr<cuda::CudaDense>;

// pybind11 holds the layer as shared_ptr<CudaDense>; nothing bound here mutates it.
CudaDensePtr hold(std::shared_ptr<const cuda::CudaDense> layer) { return std::const_pointer_cast<cuda::CudaDense>(layer); }

kernels::ImageLayout layout_from_name(const std::string& name) {
  if (name == "NCHW") return kernels::ImageLayout::kNCHW;
  if (name == "NHWC") return kernels::ImageLayout::kNHWC;
  throw Error(ErrorCode::kInvalidInput, "[kernels] normalize_image: layout must be 'NCHW' or 'NHWC', got '" + name + "'");
}

std::string repr(const cuda::CudaDense& d) {
  return "CudaDense(in_features=" + std::to_string(d.in_features()) + ", out_features=" +
         std::to_string(d.out_features()) + ", bias=" + (d.has_bias() ? "True" : "False") + ", activation='" +
         activation_name(d.activation()) + "', quantized=" + (d.quantized() ? "True" : "False") +
         ", device=" + std::to_string(d.device()) + ")";
}

}  // namespace

void init_cuda_kernels(py::module_& m) {
  py::module_ c = m.def_submodule(
      "cuda", "CUDA kernels over raw device pointers (private; conveyor.kernels.cuda takes CuPy arrays).");

  c.def(
      "normalize_image",
      [](std::uintptr_t images, int64_t batch, int64_t height, int64_t width, int64_t channels,
         const std::vector<float>& mean, const std::vector<float>& std, float scale, std::uintptr_t out,
         const std::string& dtype, const std::string& layout, int device, std::uintptr_t stream) {
        if (static_cast<int64_t>(mean.size()) != channels || static_cast<int64_t>(std.size()) != channels) {
          throw Error(ErrorCode::kInvalidInput, "[kernels] normalize_image: mean and std need one value per channel (" +
                                                    std::to_string(channels) + "), got " + std::to_string(mean.size()) +
                                                    " and " + std::to_string(std.size()));
        }
        const DType out_dtype = dtype_from_name(dtype);
        const kernels::ImageLayout out_layout = layout_from_name(layout);
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::normalize_image(as_ptr<const uint8_t>(images), {batch, height, width, channels}, mean.data(), std.data(),
                              scale, as_ptr<void>(out), out_dtype, out_layout, launch_on(device, stream));
      },
      py::arg("images"), py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("channels"), py::arg("mean"),
      py::arg("std"), py::arg("scale"), py::arg("out"), py::arg("dtype"), py::arg("layout"), py::arg("device"),
      py::arg("stream"), "uint8 NHWC images -> out (dtype 'FP32' or 'FP16', layout 'NCHW' or 'NHWC').");

  c.def(
      "softmax",
      [](std::uintptr_t x, int64_t rows, int64_t cols, std::uintptr_t out, int device, std::uintptr_t stream) {
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::softmax(as_ptr<const float>(x), rows, cols, as_ptr<float>(out), launch_on(device, stream));
      },
      py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("device"), py::arg("stream"));

  c.def(
      "softmax_topk",
      [](std::uintptr_t x, int64_t rows, int64_t cols, int64_t k, std::uintptr_t values, std::uintptr_t indices,
         int device, std::uintptr_t stream) {
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::softmax_topk(as_ptr<const float>(x), rows, cols, k, as_ptr<float>(values), as_ptr<int64_t>(indices),
                           launch_on(device, stream));
      },
      py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("values"), py::arg("indices"),
      py::arg("device"), py::arg("stream"));

  c.def(
      "argmax",
      [](std::uintptr_t x, int64_t rows, int64_t cols, std::uintptr_t out, int device, std::uintptr_t stream) {
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::argmax(as_ptr<const float>(x), rows, cols, as_ptr<int64_t>(out), launch_on(device, stream));
      },
      py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("device"), py::arg("stream"));

  c.def(
      "layer_norm",
      [](std::uintptr_t x, int64_t rows, int64_t cols, std::uintptr_t gamma, std::uintptr_t beta, float epsilon,
         std::uintptr_t out, int device, std::uintptr_t stream) {
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::layer_norm(as_ptr<const float>(x), rows, cols, as_ptr<const float>(gamma), as_ptr<const float>(beta),
                         epsilon, as_ptr<float>(out), launch_on(device, stream));
      },
      py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("gamma"), py::arg("beta"), py::arg("epsilon"),
      py::arg("out"), py::arg("device"), py::arg("stream"), "gamma and beta: 0 for none.");

  c.def(
      "dequantize_int8",
      [](std::uintptr_t Wq, int64_t K, int64_t N, std::uintptr_t scale, std::uintptr_t out, int device,
         std::uintptr_t stream) {
        // Queuing may wait for room in the device's launch queue.
        py::gil_scoped_release nogil;
        cuda::dequantize_int8(as_ptr<const int8_t>(Wq), K, N, as_ptr<const float>(scale), as_ptr<float>(out),
                              launch_on(device, stream));
      },
      py::arg("Wq"), py::arg("K"), py::arg("N"), py::arg("scale"), py::arg("out"), py::arg("device"),
      py::arg("stream"));

  py::class_<cuda::CudaDense, CudaDensePtr>(c, "CudaDense",
                                            "A dense layer's weights on one GPU, run through cuBLASLt. Immutable; "
                                            "safe to share between threads. Make one with "
                                            "conveyor.kernels.cuda.pack_dense.")
      .def_property_readonly("in_features", &cuda::CudaDense::in_features, "K: x's columns, W's rows.")
      .def_property_readonly("out_features", &cuda::CudaDense::out_features, "N: W's columns, y's columns.")
      .def_property_readonly(
          "activation", [](const cuda::CudaDense& d) { return activation_name(d.activation()); },
          "The activation applied after the bias.")
      .def_property_readonly("has_bias", &cuda::CudaDense::has_bias)
      .def_property_readonly("quantized", &cuda::CudaDense::quantized,
                             "Packed from int8 weights and scales (held dequantized, as float32).")
      .def_property_readonly("device", &cuda::CudaDense::device, "The CUDA device holding the weights.")
      .def_property_readonly("nbytes", &cuda::CudaDense::nbytes, "Device bytes held (weight and bias).")
      .def_property_readonly(
          "weight_ptr", [](const cuda::CudaDense& d) { return reinterpret_cast<std::uintptr_t>(d.weight()); },
          "Address of the float32 [K, N] weight on the device.")
      .def_property_readonly(
          "bias_ptr", [](const cuda::CudaDense& d) { return reinterpret_cast<std::uintptr_t>(d.bias()); },
          "Address of the float32 [N] bias on the device, 0 without one.")
      .def(
          "forward",
          [](const cuda::CudaDense& d, std::uintptr_t x, int64_t M, std::uintptr_t y, std::uintptr_t stream) {
            // Queuing may wait for room in the device's launch queue.
            py::gil_scoped_release nogil;
            d.forward(as_ptr<const float>(x), M, as_ptr<float>(y), as_ptr<void>(stream));
          },
          py::arg("x"), py::arg("M"), py::arg("y"), py::arg("stream"), "y [M, N] = act(x [M, K] @ W + b).")
      .def("__repr__", &repr);

  c.def(
      "pack_dense",
      [](std::uintptr_t W, int64_t K, int64_t N, std::uintptr_t bias, const std::string& activation, int device) {
        const Activation act = activation_from_name(activation);
        // Synchronous copies to the device (and the first load of cuBLASLt).
        py::gil_scoped_release nogil;
        return hold(cuda::pack_dense(as_ptr<const float>(W), K, N, as_ptr<const float>(bias), act, device));
      },
      py::arg("W"), py::arg("K"), py::arg("N"), py::arg("bias"), py::arg("activation"), py::arg("device"),
      "W: float32 [K, N] in host or device memory; bias: [N] or 0.");

  c.def(
      "pack_dense_int8",
      [](std::uintptr_t Wq, int64_t K, int64_t N, std::uintptr_t scale, std::uintptr_t bias,
         const std::string& activation, int device) {
        const Activation act = activation_from_name(activation);
        // Synchronous copies to the device (and the first load of cuBLASLt).
        py::gil_scoped_release nogil;
        return hold(cuda::pack_dense_int8(as_ptr<const int8_t>(Wq), K, N, as_ptr<const float>(scale),
                                          as_ptr<const float>(bias), act, device));
      },
      py::arg("Wq"), py::arg("K"), py::arg("N"), py::arg("scale"), py::arg("bias"), py::arg("activation"),
      py::arg("device"), "Wq: int8 [K, N], scale: float32 [N], bias: [N] or 0; host or device memory.");

  c.def("cublaslt_built", &cuda::cublaslt_built, "Whether this build has the cuBLASLt dense path.");
  c.def("cublaslt_soname", &cuda::cublaslt_soname, "The library file name cuBLASLt is loaded by.");
  c.def("add_cublaslt_candidates", &cuda::add_cublaslt_candidates, py::arg("paths"),
        "Files to try when cuBLASLt is loaded (after CONVEYOR_CUBLASLT_LIBRARY and the plain name).");
  c.def(
      "load_cublaslt",
      []() {
        // dlopen of a large library.
        py::gil_scoped_release nogil;
        return cuda::load_cublaslt();
      },
      "Loads cuBLASLt now; returns where from. Raises Unavailable listing what was tried.");
  c.def("cublaslt_version", &cuda::cublaslt_version, "The loaded cuBLASLt's version, 0 before loading.");
  c.def("compiled_architectures", &cuda::compiled_architectures,
        "The GPU architectures the kernels were compiled for, e.g. '80;90'.");
  c.attr("MAX_IMAGE_CHANNELS") = cuda::kMaxImageChannels;
}

}  // namespace conveyor::bindings
