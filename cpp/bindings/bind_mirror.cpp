// conveyor._core.Mirror: a rollout's batch-level shadow copy (conveyor/mirror.h).
//
// Conversion only: the compare kind arrives by name, drain() hands the paired rows back
// as numpy arrays (one copy of each vector), waits release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/mirror.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

MirrorCompare compare_from_name(const std::string& name) {
  if (name == "none") return MirrorCompare::kNone;
  if (name == "first_value") return MirrorCompare::kFirstValue;
  if (name == "argmax") return MirrorCompare::kArgmax;
  if (name == "values") return MirrorCompare::kValues;
  throw Error(ErrorCode::kInvalidInput,
              "[mirror] compare must be 'none', 'first_value', 'argmax' or 'values', got '" + name + "'");
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
  py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
  if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(T));
  return out;
}

py::dict stats_to_dict(const MirrorStats& s) {
  py::dict d;
  d["offered"] = s.offered_rows;
  d["sent"] = s.sent_rows;
  d["dropped"] = s.dropped_rows;
  d["failed"] = s.failed_rows;
  d["paired"] = s.paired_rows;
  d["incomparable"] = s.incomparable_rows;
  d["unrecorded"] = s.unrecorded_rows;
  d["in_flight"] = s.in_flight_rows;
  return d;
}

}  // namespace

void init_mirror(py::module_& m) {
  py::class_<Mirror, std::shared_ptr<Mirror>>(
      m, "Mirror", "A rollout's shadow: tagged rows of the champion's batches copied to a challenger's batcher.")
      .def(py::init([](std::shared_ptr<Batcher> challenger, size_t slots, int champion_output, int challenger_output,
                       const std::string& compare, size_t max_unread_rows) {
             MirrorOptions o;
             o.slots = slots;
             o.champion_output = champion_output;
             o.challenger_output = challenger_output;
             o.compare = compare_from_name(compare);
             o.max_unread_rows = max_unread_rows;
             return std::make_shared<Mirror>(std::move(challenger), o);
           }),
           py::kw_only(), py::arg("challenger"), py::arg("slots"), py::arg("champion_output") = -1,
           py::arg("challenger_output") = -1, py::arg("compare") = "none", py::arg("max_unread_rows") = 65536,
           "compare: 'none', 'first_value' (an index output), 'argmax' (class scores) or 'values'.")
      .def("drain",
           [](Mirror& self) {
             MirrorPairs p = self.drain();
             py::dict d;
             d["tags"] = to_array(p.tags);
             d["champion_ns"] = to_array(p.champion_ns);
             d["challenger_ns"] = to_array(p.challenger_ns);
             d["compared"] = to_array(p.compared).attr("astype")("bool");
             d["champion_first"] = to_array(p.champion_first);
             d["challenger_first"] = to_array(p.challenger_first);
             d["champion_values"] = to_array(p.champion_values);
             d["challenger_values"] = to_array(p.challenger_values);
             return d;
           },
           "The rows paired since the last drain: tags, champion_ns, challenger_ns and compared per row; "
           "champion_first/challenger_first per compared row; champion_values/challenger_values per value.")
      .def("wait_idle",
           [](const Mirror& self, double timeout_s) {
             py::gil_scoped_release nogil;
             return self.wait_idle(timeout_s < 0 ? -1 : static_cast<int64_t>(timeout_s * 1e6));
           },
           py::arg("timeout_s") = -1.0, "Waits until no copy is in flight; False when the timeout passed first.")
      .def("stats", [](const Mirror& self) { return stats_to_dict(self.stats()); })
      .def_property_readonly("slots", [](const Mirror& self) { return self.options().slots; });
}

}  // namespace conveyor::bindings
