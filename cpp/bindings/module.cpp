// conveyor._core: the private compiled module. conveyor/__init__.py is the public API.
#include <pybind11/pybind11.h>

#include "convert.h"

namespace py = pybind11;

namespace conveyor::bindings {
void init_tensor(py::module_& m);
void init_memory(py::module_& m);
void init_batcher(py::module_& m);
void init_loop_completions(py::module_& m);
void init_dense(py::module_& m);
void init_native(py::module_& m);
void init_trees(py::module_& m);
void init_torch(py::module_& m);
void init_pipeline(py::module_& m);
void init_kernels(py::module_& m);
void init_cuda_kernels(py::module_& m);
void init_monitor(py::module_& m);
void init_drift(py::module_& m);
void init_router(py::module_& m);
void init_loadgen(py::module_& m);
void init_http_frontend(py::module_& m);
void init_grpc_frontend(py::module_& m);
void init_mirror(py::module_& m);
void init_graph(py::module_& m);
}  // namespace conveyor::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "Conveyor's C++ core: memory pool, dynamic batcher, kernels (private; use conveyor).";
  conveyor::bindings::register_errors(m);
  conveyor::bindings::init_tensor(m);
  conveyor::bindings::init_memory(m);
  conveyor::bindings::init_native(m);
  conveyor::bindings::init_trees(m);
  conveyor::bindings::init_torch(m);
  conveyor::bindings::init_pipeline(m);
  conveyor::bindings::init_monitor(m);
  conveyor::bindings::init_batcher(m);
  conveyor::bindings::init_dense(m);
  conveyor::bindings::init_kernels(m);
  conveyor::bindings::init_cuda_kernels(m);
  conveyor::bindings::init_drift(m);
  conveyor::bindings::init_router(m);
  conveyor::bindings::init_loadgen(m);
  conveyor::bindings::init_http_frontend(m);
  conveyor::bindings::init_grpc_frontend(m);
  conveyor::bindings::init_mirror(m);
  conveyor::bindings::init_graph(m);
  conveyor::bindings::init_loop_completions(m);
}
