// Bindings of the batcher: option conversion, the executor (a Python callable, adapted,
// or a NativeGraph or TreeEnsemble, run directly without the GIL), GIL release around waits,
// completions converted to numpy views.
#include <pybind11/stl.h>

#include "conveyor/batcher.h"
#include "conveyor/gather.h"
#include "conveyor/monitor.h"
#include "conveyor/native_graph.h"
#include "conveyor/torch_model.h"
#include "conveyor/pipeline.h"
#include "conveyor/trees.h"
#include "batcher_convert.h"
#include "convert.h"

namespace conveyor::bindings {

std::vector<TensorSpec> tensor_specs(const py::iterable& specs) {
  std::vector<TensorSpec> out;
  for (py::handle item : specs) {
    auto t = item.cast<py::tuple>();
    out.push_back({t[0].cast<std::string>(), dtype_from_name(t[1].cast<std::string>()),
                   t[2].cast<std::vector<int64_t>>()});
  }
  return out;
}

namespace {

// "ValueError: message", or just the message for Conveyor's own errors.
std::string describe_python_error(py::error_already_set& e, py::handle conveyor_error) {
  std::string message = py::str(e.value()).cast<std::string>();
  if (e.matches(conveyor_error)) return message;
  return py::str(e.type().attr("__name__")).cast<std::string>() + ": " + message;
}

// The adapter for a Python callable `fn(inputs: tuple[np.ndarray], instance: int) ->
// sequence[np.ndarray]`, instance being the 0-based execution instance running the batch.
// It crosses into Python once per batch; the arrays it receives view pooled memory
// (BYTES inputs are object arrays of their own, holding a reference to each element).
Executor python_executor(py::function fn, std::vector<std::string> output_names) {
  auto fn_owner = make_python_owner(std::move(fn));
  return [fn_owner, output_names](const Batch& batch) -> std::vector<Tensor> {
    // The model is Python code: take the GIL for the whole batch.
    ThreadGil gil;
    auto fn = py::reinterpret_borrow<py::function>(static_cast<PyObject*>(fn_owner.get()));
    try {
      py::tuple args(batch.inputs.size());
      for (size_t i = 0; i < batch.inputs.size(); ++i) args[i] = array_from_tensor(batch.inputs[i]);
      py::object result = fn(args, batch.instance);
      std::vector<Tensor> outputs;
      size_t i = 0;
      for (py::handle item : result) {
        const std::string what =
            "output '" + (i < output_names.size() ? output_names[i] : std::to_string(i)) + "'";
        Tensor t = borrow_array(item, what.c_str());
        t.owner = make_python_owner(py::reinterpret_borrow<py::object>(item));
        outputs.push_back(std::move(t));
        ++i;
      }
      return outputs;
    } catch (py::error_already_set& e) {
      // InvalidInput from a Python step (tokenize) is the request's fault, not the model's.
      const ErrorCode code = e.matches(conveyor_invalid_input()) ? ErrorCode::kInvalidInput : ErrorCode::kModelExecution;
      throw Error(code, describe_python_error(e, conveyor_error_base()));
    }
  };
}

}  // namespace

std::vector<Tensor> hold_request_inputs(const std::vector<TensorSpec>& specs, const py::tuple& inputs) {
  std::vector<Tensor> tensors;
  tensors.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string what = "input '" + (i < specs.size() ? specs[i].name : std::to_string(i)) + "'";
    tensors.push_back(borrow_array(inputs[i], what.c_str()));
  }
  if (!tensors.empty()) {
    std::shared_ptr<void> owner = make_python_owner(py::reinterpret_borrow<py::object>(inputs));
    for (Tensor& t : tensors) t.owner = owner;
  }
  return tensors;
}

namespace {

// numpy.ndarray, looked up once (it lives with the interpreter).
PyTypeObject* numpy_array_type() {
  static PyTypeObject* type =
      reinterpret_cast<PyTypeObject*>(py::object(py::module_::import("numpy").attr("ndarray")).release().ptr());
  return type;
}

}  // namespace

py::object order_dict(py::handle inputs, const py::tuple& input_names) {
  if (!PyDict_CheckExact(inputs.ptr())) return py::none();
  const Py_ssize_t n = static_cast<Py_ssize_t>(input_names.size());
  if (PyDict_GET_SIZE(inputs.ptr()) != n) return py::none();
  py::tuple arrays(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* value = PyDict_GetItemWithError(inputs.ptr(), PyTuple_GET_ITEM(input_names.ptr(), i));
    if (value == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return py::none();
    }
    if (Py_TYPE(value) != numpy_array_type() ||
        !(py::reinterpret_borrow<py::array>(value).flags() & py::array::c_style)) {
      return py::none();
    }
    Py_INCREF(value);
    PyTuple_SET_ITEM(arrays.ptr(), i, value);
  }
  return arrays;
}

py::dict request_outputs(const py::tuple& outputs, const py::tuple& output_names, int64_t offset, int64_t rows) {
  const size_t n = output_names.size();
  if (outputs.size() < n) {
    throw Error(ErrorCode::kInternal, "the batch has " + std::to_string(outputs.size()) + " outputs, the model " +
                                          std::to_string(n));
  }
  py::dict result;
  bool whole = rows < 0;
  if (!whole && n > 0) whole = offset == 0 && rows == py::len(outputs[0]);
  py::object slice;
  if (!whole) {
    slice = py::reinterpret_steal<py::object>(PySlice_New(py::int_(offset).ptr(), py::int_(offset + rows).ptr(), nullptr));
    if (!slice) throw py::error_already_set();
  }
  for (size_t i = 0; i < n; ++i) {
    PyObject* array = PyTuple_GET_ITEM(outputs.ptr(), static_cast<Py_ssize_t>(i));
    if (whole) {
      result[output_names[i]] = py::reinterpret_borrow<py::object>(array);
    } else {
      PyObject* view = PyObject_GetItem(array, slice.ptr());
      if (view == nullptr) throw py::error_already_set();
      result[output_names[i]] = py::reinterpret_steal<py::object>(view);
    }
  }
  return result;
}

py::tuple outputs_to_python(const BatchOutputs& outputs) {
  py::tuple arrays(outputs.tensors.size());
  for (size_t i = 0; i < outputs.tensors.size(); ++i) arrays[i] = array_from_tensor(outputs.tensors[i]);
  return arrays;
}

py::object completion_error(const Completion& c, py::object& outputs, py::object& conversion_error) {
  if (c.code != ErrorCode::kOk) return make_exception(c.code, c.message);
  if (outputs.is_none() && conversion_error.is_none()) {
    try {
      outputs = outputs_to_python(*c.outputs);
    } catch (py::error_already_set& e) {
      conversion_error = e.value();
    } catch (const Error& e) {
      conversion_error = make_exception(e.code(), e.what());
    }
  }
  return conversion_error;
}

// [(batch outputs or None, [(request_id, error or None, row_offset, rows), ...]), ...]
// A batch whose outputs cannot be converted fails its own requests with that error;
// the other batches are unaffected. Request inputs the completions hand back are
// released here, with the GIL held.
py::list drain_to_python(CompletionQueue& queue) {
  std::vector<std::vector<Completion>> groups = queue.drain();
  py::list out;
  for (auto& group : groups) {
    py::object arrays = py::none();
    py::object conversion_error = py::none();
    py::list done(group.size());
    for (size_t i = 0; i < group.size(); ++i) {
      const Completion& c = group[i];
      done[i] = py::make_tuple(c.request_id, completion_error(c, arrays, conversion_error), c.row_offset, c.rows);
    }
    out.append(py::make_tuple(arrays, done));
  }
  return out;
}

py::dict histogram_to_python(const DurationHistogram::Snapshot& h) {
  py::dict d;
  d["count"] = h.count;
  d["sum_ns"] = h.sum_ns;
  d["p50_ns"] = h.percentile(0.50);
  d["p90_ns"] = h.percentile(0.90);
  d["p99_ns"] = h.percentile(0.99);
  // Non-empty buckets as (upper bound in ns, count), ascending: exporters re-bucket these.
  py::list buckets;
  for (int i = 0; i < DurationHistogram::kBuckets; ++i) {
    if (h.buckets[i]) buckets.append(py::make_tuple(DurationHistogram::bucket_upper_bound(i), h.buckets[i]));
  }
  d["buckets"] = buckets;
  return d;
}

py::dict stats_to_python(const BatcherStats& s) {
  py::dict d;
  d["requests"] = s.requests;
  d["succeeded"] = s.succeeded;
  d["failed"] = s.failed;
  d["rejected"] = s.rejected;
  d["expired"] = s.expired;
  d["cancelled"] = s.cancelled;
  d["batches"] = s.batches;
  d["batched_rows"] = s.batched_rows;
  d["queue_depth"] = s.queue_depth;
  d["in_flight"] = s.in_flight;
  d["undelivered"] = s.undelivered;
  d["last_inference_ns"] = s.last_inference_ns;
  d["batch_size_counts"] = s.batch_size_counts;
  d["batch_input_ns"] = s.batch_input_ns;
  d["batch_infer_ns"] = s.batch_infer_ns;
  d["batch_output_ns"] = s.batch_output_ns;
  d["queue"] = histogram_to_python(s.queue);
  d["compute_input"] = histogram_to_python(s.compute_input);
  d["compute_infer"] = histogram_to_python(s.compute_infer);
  d["compute_output"] = histogram_to_python(s.compute_output);
  d["total"] = histogram_to_python(s.total);
  return d;
}

namespace {

// With monitor=, the executor appends the row flags: the output specs must say so.
void check_monitor_flags_spec(const std::vector<TensorSpec>& outputs) {
  const bool ok = !outputs.empty() && outputs.back().name == "__monitor_flags" &&
                  outputs.back().dtype == DType::kUInt8 && outputs.back().dims == std::vector<int64_t>{1};
  if (!ok) {
    throw Error(ErrorCode::kInvalidInput,
                "[batcher] argument 'outputs': with monitor=, the last output must be ('__monitor_flags', 'UINT8', "
                "[1]), the per-row flags the monitor appends");
  }
}

}  // namespace

void init_batcher(py::module_& m) {
  // Looked up now, with the GIL and no other thread: a first call from two threads at once
  // could wait on the static's guard while holding the GIL the other needs to import.
  numpy_array_type();
  py::class_<CompletionQueue, std::shared_ptr<CompletionQueue>>(
      m, "CompletionQueue", "Completions for one event loop; fileno() becomes readable when some are ready.")
      .def(py::init<>())
      .def("fileno", &CompletionQueue::fd)
      .def("pending", &CompletionQueue::pending)
      .def("drain", &drain_to_python,
           "[(batch outputs or None, [(request_id, error or None, row_offset, rows)])], one entry per batch.");

  py::class_<Batcher, std::shared_ptr<Batcher>>(m, "Batcher", "Dynamic batcher of one model version.")
      .def(py::init([](const std::string& model_name, const py::iterable& inputs, const py::iterable& outputs,
                       py::object executor, int64_t max_batch_size, int64_t max_queue_delay_us,
                       std::vector<int64_t> preferred_batch_sizes, size_t max_queue_size, int priority_levels,
                       int default_priority_level, int64_t default_timeout_us, int instance_count,
                       bool pin_instances, std::shared_ptr<MemoryPool> pool, std::shared_ptr<Pipeline> pipeline,
                       std::shared_ptr<monitor::Monitor> monitor) {
             BatcherOptions o;
             o.model_name = model_name;
             o.inputs = tensor_specs(inputs);
             o.outputs = tensor_specs(outputs);
             o.max_batch_size = max_batch_size;
             o.max_queue_delay_us = max_queue_delay_us;
             o.preferred_batch_sizes = std::move(preferred_batch_sizes);
             o.max_queue_size = max_queue_size;
             o.priority_levels = priority_levels;
             o.default_priority_level = default_priority_level;
             o.default_timeout_us = default_timeout_us;
             o.instance_count = instance_count;
             o.pin_instances = pin_instances;
             if (monitor) check_monitor_flags_spec(o.outputs);
             // With a pipeline the executor returns the backend's outputs, not these; the
             // monitor's flags are not the executor's either.
             std::vector<std::string> names;
             if (!pipeline) {
               for (const auto& spec : o.outputs) names.push_back(spec.name);
               if (monitor) names.pop_back();
             }
             Executor exec;
             if (py::isinstance<NativeGraph>(executor)) {
               exec = native_graph_executor(executor.cast<std::shared_ptr<NativeGraph>>());
             } else if (py::isinstance<TreeEnsemble>(executor)) {
               exec = tree_ensemble_executor(executor.cast<std::shared_ptr<TreeEnsemble>>());
             } else if (py::isinstance<TorchModel>(executor)) {
               exec = torch_model_executor(executor.cast<std::shared_ptr<TorchModel>>());
             } else if (PyCallable_Check(executor.ptr())) {
               exec = python_executor(py::reinterpret_borrow<py::function>(executor), std::move(names));
             } else {
               throw py::type_error("executor must be a callable, a NativeGraph, a TreeEnsemble or a TorchModel");
             }
             if (pipeline) exec = pipeline_executor(std::move(pipeline), std::move(exec));
             // Outermost: the monitor sees the public inputs and outputs of every batch.
             if (monitor) {
               exec = monitor::monitor_executor(std::move(monitor), std::move(exec), o.max_batch_size > 0, pool);
             }
             return std::shared_ptr<Batcher>(new Batcher(std::move(o), std::move(exec), std::move(pool)),
                                             DeleteWithoutGil<Batcher>{});
           }),
           py::kw_only(), py::arg("model_name"), py::arg("inputs"), py::arg("outputs"), py::arg("executor"),
           py::arg("max_batch_size"), py::arg("max_queue_delay_us") = 0,
           py::arg("preferred_batch_sizes") = std::vector<int64_t>{}, py::arg("max_queue_size") = 1024,
           py::arg("priority_levels") = 0, py::arg("default_priority_level") = 0,
           py::arg("default_timeout_us") = 0, py::arg("instance_count") = 1,
           py::arg("pin_instances") = false, py::arg("pool") = nullptr,
           py::arg("pipeline") = nullptr, py::arg("monitor") = nullptr,
           "pin_instances: instance i's thread runs on the i-th CPU the process may use (round robin). "
           "monitor: a Monitor observing every batch in C++ (no GIL); the outputs must then end with "
           "('__monitor_flags', 'UINT8', [1]), which carries the per-row flag bytes ([rows, 1] when batching, [1] "
           "otherwise).")
      .def(
          "submit",
          [](Batcher& b, const py::tuple& inputs, std::shared_ptr<CompletionQueue> queue, int priority,
             int64_t timeout_us, uint64_t mirror_tag) {
            // The batcher holds the inputs and the queue until the completion is drained.
            return b.submit(hold_request_inputs(b.options().inputs, inputs), std::move(queue), priority, timeout_us, mirror_tag);
          },
          py::arg("inputs"), py::arg("queue"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
          py::arg("mirror_tag") = 0, "mirror_tag: nonzero copies the request to the attached Mirror after its batch.")
      .def("set_mirror", &Batcher::set_mirror, py::arg("mirror"),
           // Dropping the old mirror may delete its challenger batcher, whose threads may need the GIL.
           py::call_guard<py::gil_scoped_release>(), "Attaches the Mirror tagged requests are copied to (None: none).")
      .def("set_background", &Batcher::set_background, py::arg("background"),
           py::call_guard<py::gil_scoped_release>(),
           "Background mode (a shadow challenger): instance threads in the OS's idle scheduling class while on, "
           "and requests gathered into batches for up to 1 ms; leaving it starts new threads at the caller's "
           "priority. Returns whether the idle class is available.")
      .def("infer", &infer_to_python<Batcher>, py::arg("inputs"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
          "Submit and wait; returns (batch outputs, row_offset, rows), rows -1 meaning all.")
      .def("infer_named", &infer_named_to_python<Batcher>, py::arg("inputs"), py::arg("input_names"),
           py::arg("output_names"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
           "infer() for a dict holding exactly `input_names`, each a C-contiguous ndarray: returns {output name: "
           "the request's rows}; None, with nothing submitted, for any other `inputs` (the caller checks those).")
      .def("cancel", &Batcher::cancel, py::arg("request_id"))
      .def("stop", &Batcher::stop, py::arg("drain") = true,
           // Joining the instances may wait for a Python batch, which needs the GIL.
           py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const Batcher& b) { return stats_to_python(b.stats()); });

  m.def(
      "gather_rows",
      [](const py::list& arrays, std::shared_ptr<MemoryPool> pool) {
        std::vector<Tensor> tensors = hold_arrays(arrays, "array");
        std::vector<const Tensor*> parts;
        for (const Tensor& t : tensors) parts.push_back(&t);
        return array_from_tensor(gather_rows(parts, pool ? *pool : *MemoryPool::default_host()));
      },
      py::arg("arrays"), py::arg("pool") = nullptr,
      "Concatenate arrays along the first axis into one pooled array: the batcher's batch assembly.");
}

}  // namespace conveyor::bindings
