// conveyor._core.NativeGraph: the planner in conveyor/backends/native.py describes a
// graph through these calls; the Batcher binding runs it without the GIL.
//
// Conversion only: arrays are borrowed for the duration of a call (weights are packed
// into memory the graph owns), names become enums in the core, and run() releases the
// GIL while the kernels compute.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "conveyor/native_graph.h"
#include "convert.h"

namespace conveyor::bindings {

void init_native(py::module_& m) {
  py::class_<NativeGraph, std::shared_ptr<NativeGraph>>(
      m, "NativeGraph",
      "A planned ONNX graph over the CPU kernels: steps over numbered slots, inputs first. Build it with the "
      "add_* calls, then finalize(outputs); run() and the batcher may then use it from any thread.")
      .def(py::init<int, int, std::shared_ptr<MemoryPool>>(), py::kw_only(), py::arg("input_count"),
           py::arg("threads") = 1, py::arg("pool") = nullptr)
      .def(
          "add_dense",
          [](NativeGraph& g, int in, int out, py::handle weight, py::handle bias, const std::string& activation) {
            Tensor w = borrow_array(weight, "weight");
            std::optional<Tensor> b;
            if (!bias.is_none()) b = borrow_array(bias, "bias");
            const Activation act = activation_from_name(activation);
            // Packing copies the weights once; no Python object is touched meanwhile.
            py::gil_scoped_release nogil;
            g.add_dense(in, out, pack_dense(w, b ? &*b : nullptr, act));
          },
          py::arg("input"), py::arg("output"), py::arg("weight"), py::arg("bias"), py::arg("activation") = "none",
          "output = activation(input @ weight + bias); weight float32 [K, N], bias float32 [N] or None.")
      .def(
          "add_activation",
          [](NativeGraph& g, int in, int out, const std::string& activation) {
            g.add_activation(in, out, activation_from_name(activation));
          },
          py::arg("input"), py::arg("output"), py::arg("activation"))
      .def("add_softmax", &NativeGraph::add_softmax, py::arg("input"), py::arg("output"), "Softmax over the last axis.")
      .def("add_layer_norm", &NativeGraph::add_layer_norm, py::arg("input"), py::arg("output"), py::arg("gamma"),
           py::arg("beta"), py::arg("epsilon"), "LayerNormalization over the last axis; gamma/beta may be empty.")
      .def(
          "add_binary_constant",
          [](NativeGraph& g, int in, int out, const std::string& op, std::vector<float> constant, bool constant_first) {
            g.add_binary_constant(in, out, elementwise_op_from_name(op), std::move(constant), constant_first);
          },
          py::arg("input"), py::arg("output"), py::arg("op"), py::arg("constant"), py::arg("constant_first") = false,
          "output = input op constant (constant op input when constant_first); constant: 1 value or one per "
          "element of the last axis.")
      .def(
          "add_binary",
          [](NativeGraph& g, int a, int b, int out, const std::string& op) {
            g.add_binary(a, b, out, elementwise_op_from_name(op));
          },
          py::arg("a"), py::arg("b"), py::arg("output"), py::arg("op"))
      .def("add_reshape", &NativeGraph::add_reshape, py::arg("input"), py::arg("output"), py::arg("dims"))
      .def("add_flatten", &NativeGraph::add_flatten, py::arg("input"), py::arg("output"), py::arg("axis"))
      .def("finalize", &NativeGraph::finalize, py::arg("outputs"))
      .def(
          "run",
          [](const NativeGraph& g, const py::sequence& arrays) {
            std::vector<Tensor> inputs = hold_arrays(arrays, "input");
            std::vector<Tensor> outputs;
            {
              // Pure kernel work on arrays this call holds.
              py::gil_scoped_release nogil;
              outputs = g.run(inputs);
            }
            py::list out;
            for (const Tensor& t : outputs) out.append(array_from_tensor(t));
            return out;
          },
          py::arg("inputs"), "Run one batch: float32 arrays in, a list of float32 arrays out.")
      .def_property_readonly("input_count", &NativeGraph::input_count)
      .def_property_readonly("output_count", &NativeGraph::output_count)
      .def_property_readonly("threads", &NativeGraph::threads)
      .def_property_readonly("step_count", &NativeGraph::step_count)
      .def("describe", &NativeGraph::describe, "One line per step, for logs and tests.");
}

}  // namespace conveyor::bindings
