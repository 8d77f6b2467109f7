// Bindings of the load generator (conveyor/loadgen.h): argument conversion, the GIL
// released for the whole run (targets' own threads and Python models need it), results
// as numpy arrays. A callback target's Python function is called with the GIL taken.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "conveyor/loadgen.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

using loadgen::RunResult;

template <class T>
py::array_t<T> to_array(const std::vector<T>& values) {
  py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

py::dict result_to_python(const RunResult& r) {
  py::dict d;
  d["scheduled_ns"] = to_array(r.scheduled_ns);
  d["sent_ns"] = to_array(r.sent_ns);
  d["completed_ns"] = to_array(r.completed_ns);
  py::array_t<bool> ok(static_cast<py::ssize_t>(r.ok.size()));
  std::transform(r.ok.begin(), r.ok.end(), ok.mutable_data(), [](uint8_t v) { return v != 0; });
  d["ok"] = ok;
  d["samples_per_query"] = r.samples_per_query;
  d["duration_ns"] = r.duration_ns;
  d["busy_ns"] = r.busy_ns;
  d["active_ns"] = r.active_ns;
  d["generator_overhead"] = r.generator_overhead();
  d["late_sends"] = r.late_sends;
  py::dict errors;
  for (const auto& [text, count] : r.errors) {
    errors[py::str(PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace"))] = count;
  }
  d["errors"] = errors;
  return d;
}

std::vector<int64_t> int64_vector(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a) {
  if (a.ndim() != 1) throw Error(ErrorCode::kInvalidInput, "[loadgen] expected a one-dimensional array of int64");
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

// Calls `fn(sample, ticket)` with the GIL taken; a Python exception fails the request.
loadgen::CallbackTarget::SendFunction python_send(py::function fn) {
  auto fn_owner = make_python_owner(std::move(fn));
  return [fn_owner](std::shared_ptr<loadgen::RequestTicket> ticket, size_t sample) {
    ThreadGil gil;
    try {
      py::reinterpret_borrow<py::function>(static_cast<PyObject*>(fn_owner.get()))(sample, std::move(ticket));
    } catch (py::error_already_set& e) {
      throw std::runtime_error(py::str(e.type().attr("__name__")).cast<std::string>() + ": " +
                               py::str(e.value()).cast<std::string>());
    }
  };
}

}  // namespace

void init_loadgen(py::module_& m) {
  using namespace loadgen;
  m.def(
      "poisson_schedule",
      [](double rate_qps, int64_t count, uint64_t seed) { return to_array(poisson_schedule(rate_qps, count, seed)); },
      py::arg("rate_qps"), py::arg("count"), py::arg("seed"),
      "Arrival offsets in ns (int64, ascending, first 0) of Poisson arrivals spanning exactly (count-1)/rate s.");

  py::class_<Target, std::shared_ptr<Target>>(m, "LoadTarget", "Where the load generator sends requests.")
      .def_property_readonly("sample_count", &Target::sample_count)
      .def_property_readonly("capacity", &Target::capacity, "Requests it holds at once; 0: no bound of its own.");

  py::class_<BatcherTarget, Target, std::shared_ptr<BatcherTarget>>(
      m, "BatcherLoadTarget", "Submits straight to a model version's batcher, from C++.")
      .def(py::init([](std::shared_ptr<Batcher> batcher, const py::list& samples) {
             std::vector<std::vector<Tensor>> tensors;
             for (py::handle sample : samples) tensors.push_back(hold_arrays(sample.cast<py::tuple>(), "sample input"));
             return std::make_shared<BatcherTarget>(std::move(batcher), std::move(tensors));
           }),
           py::arg("batcher"), py::arg("samples"), "samples: one tuple of arrays (model input order) per sample.")
      .def(py::init([](std::shared_ptr<Graph> graph, const py::list& samples) {
             std::vector<std::vector<Tensor>> tensors;
             for (py::handle sample : samples) tensors.push_back(hold_arrays(sample.cast<py::tuple>(), "sample input"));
             return std::make_shared<BatcherTarget>(std::move(graph), std::move(tensors));
           }),
           py::arg("graph"), py::arg("samples"), "A model graph's target (Graph.submit, from C++).");

  py::class_<HttpTarget, Target, std::shared_ptr<HttpTarget>>(
      m, "HttpLoadTarget", "An HTTP/1.1 keep-alive client sending prebuilt requests over N connections.")
      .def(py::init([](std::string host, std::string port, const std::vector<py::bytes>& requests, size_t connections,
                       int64_t connect_timeout_ms) {
             HttpTargetOptions o;
             o.host = std::move(host);
             o.port = std::move(port);
             for (const auto& r : requests) o.requests.push_back(r.cast<std::string>());
             o.connections = connections;
             o.connect_timeout_ms = connect_timeout_ms;
             // Connecting blocks on the network.
             py::gil_scoped_release nogil;
             return std::make_shared<HttpTarget>(std::move(o));
           }),
           py::arg("host"), py::arg("port"), py::arg("requests"), py::arg("connections") = 16,
           py::arg("connect_timeout_ms") = 5000)
      .def("reconnects", &HttpTarget::reconnects, "Connections reopened after the first ones.");

  py::class_<RequestTicket, std::shared_ptr<RequestTicket>>(
      m, "LoadRequestTicket", "One request of a callback target: complete() it once with its outcome.")
      .def("complete", &RequestTicket::complete, py::arg("ok"), py::arg("error") = "");

  py::class_<CallbackTarget, Target, std::shared_ptr<CallbackTarget>>(
      m, "CallbackLoadTarget", "send(sample, ticket) is called (GIL taken) per request; it completes the ticket.")
      .def(py::init([](py::function send, size_t samples, size_t capacity) {
             return std::make_shared<CallbackTarget>(python_send(std::move(send)), samples, capacity);
           }),
           py::arg("send"), py::arg("samples"), py::arg("capacity") = 0);

  m.def(
      "run_open_loop",
      [](Target& target, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& schedule_ns,
         std::optional<py::array_t<int64_t, py::array::c_style | py::array::forcecast>> sample_indices,
         int64_t max_outstanding, int64_t timeout_ns, int64_t spin_ns) {
        const std::vector<int64_t> schedule = int64_vector(schedule_ns);
        const std::vector<int64_t> indices = sample_indices ? int64_vector(*sample_indices) : std::vector<int64_t>{};
        RunResult result;
        {
          // The run blocks for its whole length; batcher threads and callbacks need the GIL.
          py::gil_scoped_release nogil;
          result = run_open_loop(target, schedule, indices, OpenLoopOptions{max_outstanding, timeout_ns, spin_ns});
        }
        return result_to_python(result);
      },
      py::arg("target"), py::arg("schedule_ns"), py::arg("sample_indices") = py::none(),
      py::arg("max_outstanding") = 65536, py::arg("timeout_ns") = 60'000'000'000, py::arg("spin_ns") = 10'000);

  m.def(
      "run_closed_loop",
      [](Target& target, size_t queries, int samples_per_query, int64_t timeout_ns) {
        RunResult result;
        {
          // The run blocks for its whole length; batcher threads and callbacks need the GIL.
          py::gil_scoped_release nogil;
          result = run_closed_loop(target, queries, samples_per_query, timeout_ns);
        }
        return result_to_python(result);
      },
      py::arg("target"), py::arg("queries"), py::arg("samples_per_query") = 1, py::arg("timeout_ns") = 60'000'000'000);
}

}  // namespace conveyor::bindings
