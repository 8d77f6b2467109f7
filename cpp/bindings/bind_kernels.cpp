// conveyor._core.kernels_*: numpy arrays in and out of the CPU kernels of
// conveyor/kernels.h, plus their references (kernels_reference_*, for tests) and the ISA
// switch. conveyor/kernels/ is the public face (device routing, defaults, docstrings).
//
// Conversion only: each function checks dtype, contiguity and shape (InvalidInput naming
// the argument), allocates the outputs unless out= is given, and runs the kernel without
// the GIL. The kernels themselves check sizes, k, threads and overlaps.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "../src/kernels/reference/reference.h"
#include "conveyor/cpu_features.h"
#include "conveyor/kernels.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

using kernels::ImageLayout;
using kernels::ImageShape;
using Shape = std::vector<py::ssize_t>;

[[noreturn]] void invalid(const char* fn, const std::string& what) {
  throw Error(ErrorCode::kInvalidInput, std::string("[kernels] ") + fn + ": " + what);
}

std::string shape_text(const Shape& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  text += shape.size() == 1 ? ",)" : ")";
  return text;
}

Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

bool has_dtype(const py::array& a, const py::dtype& dtype) { return same_dtype(a.dtype(), dtype); }

// obj as an aligned, C-contiguous numpy array of `dtype`.
py::array checked_array(py::handle obj, const char* fn, const char* name, const py::dtype& dtype) {
  if (!py::isinstance<py::array>(obj)) {
    invalid(fn, std::string(name) + " must be a numpy array, got " +
                    py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  }
  auto array = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype(array, dtype)) {
    invalid(fn, std::string(name) + " must have dtype " + py::str(dtype).cast<std::string>() + ", got " +
                    py::str(array.dtype()).cast<std::string>());
  }
  const int flags = array.flags();
  if (!(flags & py::array::c_style)) {
    invalid(fn, std::string(name) + " must be C-contiguous: pass np.ascontiguousarray(" + name + ")");
  }
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    invalid(fn, std::string(name) + " is not aligned to its dtype: copy it (np.array(" + name + "))");
  }
  return array;
}

// The output: out itself after checks, or a new array when out is None.
py::array output_array(py::handle out, const char* fn, const char* name, const py::dtype& dtype, const Shape& shape) {
  if (out.is_none()) return py::array(dtype, shape);
  py::array array = checked_array(out, fn, name, dtype);
  if (!array.writeable()) invalid(fn, std::string(name) + " is read-only");
  if (shape_of(array) != shape) {
    invalid(fn, std::string(name) + " must have shape " + shape_text(shape) + ", got " + shape_text(shape_of(array)));
  }
  return array;
}

const py::dtype& float32() {
  static const py::dtype* dtype = new py::dtype(py::dtype::of<float>());  // lives with the interpreter
  return *dtype;
}
const py::dtype& float16() {
  static const py::dtype* dtype = new py::dtype("float16");
  return *dtype;
}
const py::dtype& int64() {
  static const py::dtype* dtype = new py::dtype(py::dtype::of<int64_t>());
  return *dtype;
}

// x as rows of its last axis.
struct Rows {
  py::array array;
  int64_t rows = 1, cols = 0;
  const float* data() const { return static_cast<const float*>(array.data()); }
  Shape leading() const { return Shape(array.shape(), array.shape() + array.ndim() - 1); }
};

Rows rows_of(py::handle x, const char* fn) {
  Rows r{checked_array(x, fn, "x", float32())};
  if (r.array.ndim() == 0) invalid(fn, "x must have at least one axis (the kernel works on the last one)");
  for (py::ssize_t i = 0; i + 1 < r.array.ndim(); ++i) r.rows *= r.array.shape(i);
  r.cols = r.array.shape(r.array.ndim() - 1);
  return r;
}

// ---- row kernels -------------------------------------------------------------------------

py::object softmax(py::handle x, py::handle out, int threads, bool reference) {
  const Rows in = rows_of(x, "softmax");
  py::array result = output_array(out, "softmax", "out", float32(), shape_of(in.array));
  auto* dst = static_cast<float*>(result.mutable_data());
  // Pure compute on arrays this frame keeps alive: other Python threads may run meanwhile.
  py::gil_scoped_release release;
  if (reference) {
    kernels::reference::softmax(in.data(), in.rows, in.cols, dst);
  } else {
    kernels::softmax(in.data(), in.rows, in.cols, dst, threads);
  }
  return std::move(result);
}

py::tuple softmax_topk(py::handle x, int64_t k, py::handle out, int threads, bool reference) {
  const Rows in = rows_of(x, "softmax_topk");
  Shape shape = in.leading();
  shape.push_back(static_cast<py::ssize_t>(k));
  if (k < 1 || k > in.cols) {
    invalid("softmax_topk", "k must be in [1, " + std::to_string(in.cols) + "] (the last axis of x), got " +
                                std::to_string(k));
  }
  py::handle out_values = py::none(), out_indices = py::none();
  if (!out.is_none()) {
    if (!py::isinstance<py::tuple>(out) || py::len(out) != 2) {
      invalid("softmax_topk", "out must be a (values, indices) tuple of arrays");
    }
    const auto pair = py::reinterpret_borrow<py::tuple>(out);  // holds both while we run
    out_values = pair[0];
    out_indices = pair[1];
  }
  py::array values = output_array(out_values, "softmax_topk", "out[0] (values)", float32(), shape);
  py::array indices = output_array(out_indices, "softmax_topk", "out[1] (indices)", int64(), shape);
  auto* v = static_cast<float*>(values.mutable_data());
  auto* i = static_cast<int64_t*>(indices.mutable_data());
  {
    // Pure compute on arrays this frame keeps alive: other Python threads may run meanwhile.
    py::gil_scoped_release release;
    if (reference) {
      kernels::reference::softmax_topk(in.data(), in.rows, in.cols, k, v, i);
    } else {
      kernels::softmax_topk(in.data(), in.rows, in.cols, k, v, i, threads);
    }
  }
  return py::make_tuple(values, indices);
}

py::object argmax(py::handle x, py::handle out, int threads, bool reference) {
  const Rows in = rows_of(x, "argmax");
  if (in.cols == 0 && in.rows > 0) invalid("argmax", "x has an empty last axis: there is no maximum");
  py::array result = output_array(out, "argmax", "out", int64(), in.leading());
  auto* dst = static_cast<int64_t*>(result.mutable_data());
  // Pure compute on arrays this frame keeps alive: other Python threads may run meanwhile.
  py::gil_scoped_release release;
  if (reference) {
    kernels::reference::argmax(in.data(), in.rows, in.cols, dst);
  } else {
    kernels::argmax(in.data(), in.rows, in.cols, dst, threads);
  }
  return std::move(result);
}

// gamma or beta: None, or `cols` float32 values.
const float* optional_vector(py::handle obj, const char* name, int64_t cols, py::array& keep) {
  if (obj.is_none()) return nullptr;
  keep = checked_array(obj, "layer_norm", name, float32());
  if (keep.ndim() != 1 || keep.shape(0) != cols) {
    invalid("layer_norm", std::string(name) + " must have shape (" + std::to_string(cols) +
                              ",) (the last axis of x), got " + shape_text(shape_of(keep)));
  }
  return static_cast<const float*>(keep.data());
}

py::object layer_norm(py::handle x, py::handle gamma, py::handle beta, float epsilon, py::handle out, int threads,
                      bool reference) {
  const Rows in = rows_of(x, "layer_norm");
  py::array gamma_array, beta_array;
  const float* g = optional_vector(gamma, "gamma", in.cols, gamma_array);
  const float* b = optional_vector(beta, "beta", in.cols, beta_array);
  py::array result = output_array(out, "layer_norm", "out", float32(), shape_of(in.array));
  auto* dst = static_cast<float*>(result.mutable_data());
  // Pure compute on arrays this frame keeps alive: other Python threads may run meanwhile.
  py::gil_scoped_release release;
  if (reference) {
    kernels::reference::layer_norm(in.data(), in.rows, in.cols, g, b, epsilon, dst);
  } else {
    kernels::layer_norm(in.data(), in.rows, in.cols, g, b, epsilon, dst, threads);
  }
  return std::move(result);
}

// ---- normalize_image ---------------------------------------------------------------------

ImageLayout parse_layout(py::handle layout) {
  const std::string text = py::isinstance<py::str>(layout) ? layout.cast<std::string>() : "";
  if (text == "NCHW") return ImageLayout::kNCHW;
  if (text == "NHWC") return ImageLayout::kNHWC;
  invalid("normalize_image", "layout must be 'NCHW' or 'NHWC', got " + py::repr(layout).cast<std::string>());
}

// The output dtype: `dtype` when given (float32 or float16), else out's, else float32.
py::dtype output_dtype(py::handle dtype, py::handle out) {
  if (dtype.is_none()) {
    if (!out.is_none() && py::isinstance<py::array>(out)) {
      py::dtype of_out = py::reinterpret_borrow<py::array>(out).dtype();
      if (same_dtype(of_out, float16())) return float16();
    }
    return float32();
  }
  py::dtype requested = py::dtype::from_args(py::reinterpret_borrow<py::object>(dtype));
  if (same_dtype(requested, float32())) return float32();
  if (same_dtype(requested, float16())) return float16();
  invalid("normalize_image", "dtype must be float32 or float16, got " + py::str(requested).cast<std::string>());
}

const float* channel_values(py::handle obj, const char* name, int64_t channels, py::array& keep) {
  keep = checked_array(obj, "normalize_image", name, float32());
  if (keep.ndim() != 1 || keep.shape(0) != channels) {
    invalid("normalize_image", std::string(name) + " must have one value per channel, shape (" +
                                   std::to_string(channels) + ",), got " + shape_text(shape_of(keep)));
  }
  return static_cast<const float*>(keep.data());
}

py::object normalize_image(py::handle images, py::handle mean, py::handle std, float scale, py::handle layout,
                           py::handle dtype, py::handle out, int threads, bool reference) {
  static const py::dtype uint8 = py::dtype::of<uint8_t>();
  const py::array x = checked_array(images, "normalize_image", "images", uint8);
  if (x.ndim() != 4) {
    invalid("normalize_image", "images must be uint8 [batch, height, width, channels] (NHWC), got shape " +
                                   shape_text(shape_of(x)) + (x.ndim() == 3 ? ": add a batch axis (images[None])" : ""));
  }
  const ImageShape shape{x.shape(0), x.shape(1), x.shape(2), x.shape(3)};
  py::array mean_array, std_array;
  const float* m = channel_values(mean, "mean", shape.channels, mean_array);
  const float* s = channel_values(std, "std", shape.channels, std_array);
  const ImageLayout out_layout = parse_layout(layout);
  const py::dtype out_dtype = output_dtype(dtype, out);
  const Shape out_shape = out_layout == ImageLayout::kNCHW ? Shape{x.shape(0), x.shape(3), x.shape(1), x.shape(2)}
                                                           : shape_of(x);
  py::array result = output_array(out, "normalize_image", "out", out_dtype, out_shape);
  const DType core_dtype = same_dtype(out_dtype, float16()) ? DType::kFloat16 : DType::kFloat32;
  const auto* src = static_cast<const uint8_t*>(x.data());
  void* dst = result.mutable_data();
  {
    // Pure compute on arrays this frame keeps alive: other Python threads may run meanwhile.
    py::gil_scoped_release release;
    if (reference) {
      kernels::reference::normalize_image(src, shape, m, s, scale, dst, core_dtype, out_layout);
    } else {
      kernels::normalize_image(src, shape, m, s, scale, dst, core_dtype, out_layout, threads);
    }
  }
  return std::move(result);
}

// ---- ISA ---------------------------------------------------------------------------------

void force_isa(py::handle name) {
  if (name.is_none()) {
    reset_cpu_isa();
    return;
  }
  const std::string text = py::isinstance<py::str>(name) ? name.cast<std::string>() : "";
  if (text == "baseline") {
    force_cpu_isa(CpuIsa::kBaseline);
  } else if (text == "avx2") {
    force_cpu_isa(CpuIsa::kAvx2);
  } else {
    invalid("force_isa", "isa must be 'baseline', 'avx2' or None, got " + py::repr(name).cast<std::string>());
  }
}

}  // namespace

void init_kernels(py::module_& m) {
  using namespace pybind11::literals;
  for (const bool reference : {false, true}) {
    const std::string prefix = reference ? "kernels_reference_" : "kernels_";
    const char* what = reference ? "The reference implementation of " : "The CPU kernel ";
    m.def((prefix + "softmax").c_str(),
          [reference](py::handle x, py::handle out, int threads) { return softmax(x, out, threads, reference); },
          "x"_a, py::kw_only(), "out"_a = py::none(), "threads"_a = 1, (std::string(what) + "softmax.").c_str());
    m.def((prefix + "softmax_topk").c_str(),
          [reference](py::handle x, int64_t k, py::handle out, int threads) {
            return softmax_topk(x, k, out, threads, reference);
          },
          "x"_a, "k"_a, py::kw_only(), "out"_a = py::none(), "threads"_a = 1,
          (std::string(what) + "softmax_topk: (values, indices).").c_str());
    m.def((prefix + "argmax").c_str(),
          [reference](py::handle x, py::handle out, int threads) { return argmax(x, out, threads, reference); },
          "x"_a, py::kw_only(), "out"_a = py::none(), "threads"_a = 1, (std::string(what) + "argmax.").c_str());
    m.def((prefix + "layer_norm").c_str(),
          [reference](py::handle x, py::handle gamma, py::handle beta, float epsilon, py::handle out, int threads) {
            return layer_norm(x, gamma, beta, epsilon, out, threads, reference);
          },
          "x"_a, "gamma"_a = py::none(), "beta"_a = py::none(), py::kw_only(), "epsilon"_a = 1e-5f,
          "out"_a = py::none(), "threads"_a = 1, (std::string(what) + "layer_norm.").c_str());
    m.def((prefix + "normalize_image").c_str(),
          [reference](py::handle images, py::handle mean, py::handle std, float scale, py::handle layout,
                      py::handle dtype, py::handle out, int threads) {
            return normalize_image(images, mean, std, scale, layout, dtype, out, threads, reference);
          },
          "images"_a, "mean"_a, "std"_a, py::kw_only(), "scale"_a, "layout"_a = "NCHW", "dtype"_a = py::none(),
          "out"_a = py::none(), "threads"_a = 1, (std::string(what) + "normalize_image.").c_str());
  }
  m.def("kernels_cpu_isa", [] { return std::string(cpu_isa_name(active_cpu_isa())); },
        "The instruction set the CPU kernels use now: 'baseline' or 'avx2'.");
  m.def("kernels_force_isa", &force_isa, "isa"_a,
        "Forces the CPU kernels onto 'baseline' or 'avx2' (InvalidInput if unsupported); None: automatic.");
}

}  // namespace conveyor::bindings
