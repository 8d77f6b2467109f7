// conveyor._core.TorchModel: a torch.export + AOTInductor package's compiled model,
// opened by conveyor/backends/torch_package.py; the Batcher binding runs it without the GIL.
//
// Conversion only: run() borrows the arrays for the call and releases the GIL while
// the compiled model computes; the outputs come back as arrays that own torch's tensors.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "conveyor/torch_model.h"
#include "convert.h"

namespace conveyor::bindings {

void init_torch(py::module_& m) {
  py::class_<TorchModel, std::shared_ptr<TorchModel>>(
      m, "TorchModel",
      "A compiled PyTorch model (the .so of a .pt2 package) run through its C interface. run() and the batcher "
      "may use it from any number of threads; up to num_models runs compute at once.")
      .def(py::init([](const std::string& libtorch_path, const std::string& model_so_path,
                       const std::string& model_dir, int num_models, int intra_op_threads) {
             // Opening libraries and creating the model's copies touches no Python object.
             py::gil_scoped_release nogil;
             return std::make_shared<TorchModel>(libtorch_path, model_so_path, model_dir, num_models,
                                                 intra_op_threads);
           }),
           py::kw_only(), py::arg("libtorch_path"), py::arg("model_so_path"), py::arg("model_dir"),
           py::arg("num_models") = 1, py::arg("intra_op_threads") = 1,
           "libtorch_path: torch/lib/libtorch_cpu.so; model_so_path: the package's compiled model; model_dir: the "
           "extracted folder holding it.")
      .def(
          "run",
          [](const TorchModel& model, const py::sequence& arrays) {
            std::vector<Tensor> inputs = hold_arrays(arrays, "input");
            std::vector<Tensor> outputs;
            {
              // The compiled model computes on arrays this call holds.
              py::gil_scoped_release nogil;
              outputs = model.run(inputs);
            }
            py::list out;
            for (const Tensor& t : outputs) out.append(array_from_tensor(t));
            return out;
          },
          py::arg("inputs"), "Run one batch: C-contiguous arrays in the model's input order; a list of arrays out.")
      .def(
          "time_runs",
          [](const TorchModel& model, const py::sequence& arrays, int iterations) {
            std::vector<Tensor> inputs = hold_arrays(arrays, "input");
            TorchModel::RunTimings timings;
            {
              // The timed runs compute on arrays this call holds.
              py::gil_scoped_release nogil;
              timings = model.time_runs(inputs, iterations);
            }
            return py::make_tuple(timings.model_run_ns, timings.backend_run_ns);
          },
          py::arg("inputs"), py::arg("iterations"),
          "For benchmarks: (model_run_ns, backend_run_ns), `iterations` interleaved pairs of per-batch times: the "
          "compiled model's own run on handles made beforehand, and run() as the batcher calls it.")
      .def_property_readonly("input_names", &TorchModel::input_names)
      .def_property_readonly("output_names", &TorchModel::output_names)
      .def_property_readonly("in_spec", &TorchModel::in_spec, "The input pytree spec torch.export recorded (JSON).")
      .def_property_readonly("out_spec", &TorchModel::out_spec, "The output pytree spec torch.export recorded (JSON).")
      .def_property_readonly("num_models", &TorchModel::num_models)
      .def_property_readonly("intra_op_threads", &TorchModel::intra_op_threads);
}

}  // namespace conveyor::bindings
