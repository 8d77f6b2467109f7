// Conversions the batcher's bindings share with the graph's (which answers in the
// batcher's shapes: completions, statistics). Glue only.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/completion.h"
#include "conveyor/stats.h"

namespace conveyor::bindings {

namespace py = pybind11;

// The request's inputs, each holding the tuple as its owner: the batcher (or graph) keeps
// them alive until the completion is dropped, whatever happens to the caller.
std::vector<Tensor> hold_request_inputs(const std::vector<TensorSpec>& specs, const py::tuple& inputs);

// The deleter of a batcher or graph held by Python: deleting one joins its threads (or
// waits for its requests), which may need the GIL to finish a Python batch, so it is
// released if this thread holds it (the last reference may also go on a thread without
// it: a Mirror released by set_mirror, which runs without the GIL).
template <typename T>
struct DeleteWithoutGil {
  void operator()(T* object) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release nogil;
      delete object;
    } else {
      delete object;
    }
  }
};

// A batch's outputs as a tuple of numpy arrays.
py::tuple outputs_to_python(const BatchOutputs& outputs);
// What one completion of a batch delivers to Python as its error: None when it succeeded,
// its own error, or the failure to convert the batch's outputs. The outputs are converted
// once per batch, into `outputs` (None until then), a failure kept in `conversion_error`.
py::object completion_error(const Completion& c, py::object& outputs, py::object& conversion_error);

// infer() on a batcher or graph with the GIL released while it waits: (outputs, row_offset,
// rows), or the completion's error raised.
template <typename Target>
py::tuple infer_to_python(Target& target, const py::tuple& inputs, int priority, int64_t timeout_us) {
  std::vector<Tensor> tensors = hold_request_inputs(target.options().inputs, inputs);
  Completion c;
  {
    // Waiting for the answer: other Python threads (and a Python model) need the GIL.
    py::gil_scoped_release nogil;
    c = target.infer(std::move(tensors), priority, timeout_us);
  }
  if (c.code != ErrorCode::kOk) throw Error(c.code, c.message);
  return py::make_tuple(outputs_to_python(*c.outputs), c.row_offset, c.rows);
}

// The request's inputs as a tuple in the model's order when `inputs` is a dict holding
// exactly those names, each a C-contiguous numpy ndarray; None otherwise (the caller's
// own checks then say what is wrong, or convert).
py::object order_dict(py::handle inputs, const py::tuple& input_names);
// {name: the request's rows of that output}: the whole arrays when the request is the
// batch (or the model does not batch), views of its rows otherwise.
py::dict request_outputs(const py::tuple& outputs, const py::tuple& output_names, int64_t offset, int64_t rows);

// infer_to_python for a dict of the model's inputs by name (order_dict), answering
// {output name: the request's rows}; None, with nothing submitted, for any other `inputs`.
template <typename Target>
py::object infer_named_to_python(Target& target, py::handle inputs, const py::tuple& input_names,
                                 const py::tuple& output_names, int priority, int64_t timeout_us) {
  py::object arrays = order_dict(inputs, input_names);
  if (arrays.is_none()) return arrays;
  std::vector<Tensor> tensors = hold_request_inputs(target.options().inputs, arrays.cast<py::tuple>());
  Completion c;
  {
    py::gil_scoped_release nogil;
    c = target.infer(std::move(tensors), priority, timeout_us);
  }
  if (c.code != ErrorCode::kOk) throw Error(c.code, c.message);
  return request_outputs(outputs_to_python(*c.outputs), output_names, c.row_offset, c.rows);
}

// [(name, datatype, dims), ...] -> specs.
std::vector<TensorSpec> tensor_specs(const py::iterable& specs);
// count, sum_ns, p50/p90/p99_ns and the non-empty buckets.
py::dict histogram_to_python(const DurationHistogram::Snapshot& h);
// The dict Batcher.stats() returns.
py::dict stats_to_python(const BatcherStats& s);

}  // namespace conveyor::bindings
