// conveyor._core.Pipeline: pre/post-processing steps around a model's executor. Built by
// conveyor/pipeline.py from the model config; the Batcher binding composes it with the
// executor, so the steps run on the instance threads without the GIL.
//
// Conversion only: names become enums in the core; the core checks everything else.
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "conveyor/pipeline.h"
#include "convert.h"

namespace conveyor::bindings {

void init_pipeline(py::module_& m) {
  py::class_<Pipeline, std::shared_ptr<Pipeline>>(
      m, "Pipeline",
      "Steps run in C++ before and after a model's executor. Build it, then pass it to Batcher(pipeline=...).")
      .def(py::init<int, std::shared_ptr<MemoryPool>>(), py::kw_only(), py::arg("threads") = 1,
           py::arg("pool") = nullptr)
      .def(
          "add_normalize_image",
          [](Pipeline& p, int input, std::vector<float> mean, std::vector<float> std, float scale,
             const std::string& layout, const std::string& dtype) {
            p.add_normalize_image(input, std::move(mean), std::move(std), scale, image_layout_from_name(layout),
                                  dtype_from_name(dtype));
          },
          py::kw_only(), py::arg("input"), py::arg("mean"), py::arg("std"), py::arg("scale"), py::arg("layout"),
          py::arg("dtype"), "Replace batch input `input` (uint8 NHWC images) by its normalized form.")
      .def(
          "add_postprocess",
          [](Pipeline& p, const std::string& kind, int source, int64_t k) {
            return p.add_postprocess(postprocess_kind_from_name(kind), source, k);
          },
          py::kw_only(), py::arg("kind"), py::arg("source"), py::arg("k") = 0,
          "A step (softmax, softmax_topk, argmax, top_k) over backend output `source`; returns its index.")
      .def(
          "set_outputs",
          [](Pipeline& p, const std::vector<std::pair<int, int>>& sources) {
            std::vector<Pipeline::OutputSource> outputs;
            for (const auto& [step, index] : sources) outputs.push_back({step, index});
            p.set_outputs(std::move(outputs));
          },
          py::arg("sources"),
          "The outputs in order, each (step, index): step -1 for backend output `index`, else output `index` of "
          "that step.")
      .def(
          "run",
          [](const Pipeline& p, const py::sequence& arrays, const py::function& backend) {
            // Held, not borrowed: a step that passes an array through returns it, and
            // the array returned must keep its memory alive after this call.
            std::vector<Tensor> inputs = hold_arrays(arrays, "input");
            std::vector<Tensor> prepared;
            {
              py::gil_scoped_release nogil;
              prepared = p.preprocess(inputs);
            }
            py::list backend_inputs;
            for (const Tensor& t : prepared) backend_inputs.append(array_from_tensor(t));
            py::object results = backend(backend_inputs);
            std::vector<Tensor> backend_outputs = hold_arrays(py::list(results), "backend output");
            std::vector<Tensor> outputs;
            {
              py::gil_scoped_release nogil;
              outputs = p.postprocess(backend_outputs);
            }
            py::list out;
            for (const Tensor& t : outputs) out.append(array_from_tensor(t));
            return out;
          },
          py::arg("inputs"), py::arg("backend"),
          "preprocess -> backend(list of arrays) -> postprocess, outside a batcher (tests, tools).");
}

}  // namespace conveyor::bindings
