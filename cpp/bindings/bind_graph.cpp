// conveyor._core.Graph: a model graph run by the core (conveyor/graph.h).
//
// Conversion only: the plan arrives as Python lists and dicts (conveyor.graph_plan makes
// it), requests and answers take the batcher's shapes so the runtime treats a graph like
// any model version, and waits release the GIL.
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "batcher_convert.h"
#include "conveyor/graph.h"
#include "conveyor/monitor.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

RowReduce reduce_from_name(const std::string& name) {
  if (name == "value") return RowReduce::kValue;
  if (name == "element") return RowReduce::kElement;
  if (name == "max") return RowReduce::kMax;
  if (name == "min") return RowReduce::kMin;
  if (name == "argmax") return RowReduce::kArgmax;
  throw Error(ErrorCode::kInvalidInput, "[graph] unknown row reduction '" + name + "'");
}

RowCompare compare_from_name(const std::string& name) {
  static const std::pair<const char*, RowCompare> names[] = {
      {"<", RowCompare::kLt}, {"<=", RowCompare::kLe}, {">", RowCompare::kGt},  {">=", RowCompare::kGe},
      {"==", RowCompare::kEq}, {"!=", RowCompare::kNe}, {"in", RowCompare::kIn}, {"not in", RowCompare::kNotIn}};
  for (const auto& [text, op] : names) {
    if (name == text) return op;
  }
  throw Error(ErrorCode::kInvalidInput, "[graph] unknown comparison '" + name + "'");
}

// (tests, program) -> RowPredicate; None -> an empty one.
RowPredicate predicate_from_python(py::handle when) {
  RowPredicate p;
  if (when.is_none()) return p;
  auto pair = when.cast<py::tuple>();
  for (py::handle item : pair[0].cast<py::list>()) {
    auto t = item.cast<py::tuple>();
    p.tests.push_back({t[0].cast<int>(), reduce_from_name(t[1].cast<std::string>()), t[2].cast<int64_t>(),
                       compare_from_name(t[3].cast<std::string>()), t[4].cast<std::vector<double>>()});
  }
  for (py::handle token : pair[1].cast<py::list>()) {
    if (py::isinstance<py::str>(token)) {
      const std::string op = token.cast<std::string>();
      if (op == "and") p.program.push_back(RowPredicate::kAnd);
      else if (op == "or") p.program.push_back(RowPredicate::kOr);
      else if (op == "not") p.program.push_back(RowPredicate::kNot);
      else throw Error(ErrorCode::kInvalidInput, "[graph] unknown predicate operation '" + op + "'");
    } else {
      p.program.push_back(token.cast<int32_t>());
    }
  }
  return p;
}

GraphStep step_from_python(const py::dict& d) {
  GraphStep s;
  s.name = d["name"].cast<std::string>();
  s.model = d["model"].cast<std::string>();
  s.input_slots = d["inputs"].cast<std::vector<int>>();
  s.outputs = tensor_specs(d["outputs"]);
  s.when = predicate_from_python(d["when"]);
  s.optional = d["optional"].cast<bool>();
  for (py::handle value : d["defaults"].cast<py::list>()) {
    s.defaults.push_back(value.is_none() ? std::numeric_limits<double>::quiet_NaN() : value.cast<double>());
  }
  s.timeout_us = d["timeout_us"].cast<int64_t>();
  return s;
}

}  // namespace

void init_graph(py::module_& m) {
  py::class_<Graph, std::shared_ptr<Graph>>(
      m, "Graph", "A model graph: requests flow through the batchers of its steps (conveyor/graph.h).")
      .def(py::init([](const std::string& name, const py::iterable& inputs, const py::iterable& outputs,
                       std::vector<std::vector<int>> output_sources, const py::list& steps, int64_t max_batch_size,
                       size_t max_in_flight, int64_t default_timeout_us, std::shared_ptr<MemoryPool> pool,
                       std::shared_ptr<monitor::Monitor> monitor) {
             GraphOptions o;
             o.name = name;
             o.inputs = tensor_specs(inputs);
             o.outputs = tensor_specs(outputs);
             o.output_sources = std::move(output_sources);
             for (py::handle step : steps) o.steps.push_back(step_from_python(step.cast<py::dict>()));
             o.max_batch_size = max_batch_size;
             o.max_in_flight = max_in_flight;
             o.default_timeout_us = default_timeout_us;
             return std::shared_ptr<Graph>(new Graph(std::move(o), std::move(pool), std::move(monitor)),
                                           DeleteWithoutGil<Graph>{});
           }),
           py::kw_only(), py::arg("name"), py::arg("inputs"), py::arg("outputs"), py::arg("output_sources"),
           py::arg("steps"), py::arg("max_batch_size"), py::arg("max_in_flight") = 1024,
           py::arg("default_timeout_us") = 0, py::arg("pool") = nullptr, py::arg("monitor") = nullptr,
           "The plan conveyor.graph_plan makes. monitor: a Monitor observing every answered request; the "
           "answers then end with the per-row flags, [rows, 1] UINT8.")
      .def(
          "bind",
          [](Graph& g, int step, std::shared_ptr<Batcher> batcher, const std::string& reason) {
            g.bind(step, std::move(batcher), reason);
          },
          py::arg("step"), py::arg("batcher"), py::arg("reason") = "",
          // The old binding may hold the last reference to a stopped batcher.
          py::call_guard<py::gil_scoped_release>(),
          "Serve step `step` with `batcher` from the next request on; None unbinds it, quoting `reason`.")
      .def("bind_arms", &Graph::bind_arms, py::arg("step"), py::arg("batchers"), py::arg("bounds"),
           py::call_guard<py::gil_scoped_release>(),
           "Serve step `step` with several versions (a rollout beneath the graph): a step request goes to arm i "
           "for a random point in [bounds[i-1], bounds[i]) of [0, 2^63) (RouteTable.arm_bounds()).")
      .def(
          "ready",
          [](const Graph& g) {
            std::string reason;
            const bool ready = g.ready(&reason);
            return py::make_tuple(ready, reason);
          },
          "(whether every step is bound, why not)")
      .def(
          "submit",
          [](Graph& g, const py::tuple& inputs, std::shared_ptr<CompletionQueue> queue, int priority,
             int64_t timeout_us, uint64_t mirror_tag) {
            return g.submit(hold_request_inputs(g.options().inputs, inputs), std::move(queue), priority, timeout_us,
                            mirror_tag);
          },
          py::arg("inputs"), py::arg("queue"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
          py::arg("mirror_tag") = 0, "As Batcher.submit (mirror_tag must be 0: a graph has no shadow).")
      .def("infer", &infer_to_python<Graph>, py::arg("inputs"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
          "Submit and wait; returns (outputs, row_offset, rows) as Batcher.infer does.")
      .def("infer_named", &infer_named_to_python<Graph>, py::arg("inputs"), py::arg("input_names"),
           py::arg("output_names"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
           "infer() for a dict holding exactly `input_names`, each a C-contiguous ndarray: returns {output name: "
           "the request's rows}; None, with nothing submitted, for any other `inputs` (the caller checks those).")
      .def("cancel", &Graph::cancel, py::arg("request_id"), py::call_guard<py::gil_scoped_release>())
      .def("stop", &Graph::stop, py::arg("drain") = true, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const Graph& g) { return stats_to_python(g.stats()); })
      .def(
          "step_stats",
          [](const Graph& g) {
            py::list out;
            const auto& steps = g.options().steps;
            std::vector<GraphStepStats> stats = g.step_stats();
            for (size_t s = 0; s < stats.size(); ++s) {
              py::dict d;
              d["step"] = steps[s].name;
              d["model"] = steps[s].model;
              d["requests"] = stats[s].requests;
              d["rows"] = stats[s].rows;
              d["skipped_rows"] = stats[s].skipped_rows;
              d["failed"] = stats[s].failed;
              d["defaulted"] = stats[s].defaulted;
              d["time"] = histogram_to_python(stats[s].time);
              out.append(d);
            }
            return out;
          },
          "Per step: requests and rows sent, rows skipped, failures, defaults used, time to answer.");
}

}  // namespace conveyor::bindings
