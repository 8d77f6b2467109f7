// conveyor._core.Router: the rollout routing decision of conveyor/router.h.
//
// Conversion only: the key arrives as None, str (its cached UTF-8, no copy) or bytes and
// is passed on as bytes; decide() returns arm_index * 2 + shadow for the Python side to
// look up. The GIL stays held: one decision costs tens of nanoseconds, far less than
// releasing it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "conveyor/router.h"
#include "convert.h"

namespace conveyor::bindings {

void init_router(py::module_& m) {
  using router::RouteTable;
  using router::Router;
  py::class_<Router>(m, "Router", "A rollout state and its random source; decide(key) routes one request.")
      .def(py::init([](std::vector<uint64_t> arm_bounds, uint64_t shadow_bound, uint64_t salt_basis, bool sticky, uint64_t seed) {
             return new Router(RouteTable{std::move(arm_bounds), shadow_bound, salt_basis, sticky}, seed);
           }),
           py::arg("arm_bounds"), py::arg("shadow_bound"), py::arg("salt_basis"), py::arg("sticky"), py::arg("seed"),
           "Cumulative arm bounds over [0, 2^63) (the last 2^63), the shadow bound, the salt's FNV-1a basis, "
           "whether keys are used, and the generator's seed.")
      .def(
          "decide",
          [](Router& self, py::handle key) -> uint32_t {
            if (key.is_none()) return self.decide(nullptr, 0);
            Py_ssize_t length = 0;
            const char* data = nullptr;
            if (PyUnicode_Check(key.ptr())) {
              data = PyUnicode_AsUTF8AndSize(key.ptr(), &length);
              if (data == nullptr) throw py::error_already_set();
            } else if (PyBytes_Check(key.ptr())) {
              data = PyBytes_AS_STRING(key.ptr());
              length = PyBytes_GET_SIZE(key.ptr());
            } else {
              throw Error(ErrorCode::kInvalidInput, std::string("[router] a routing key must be str, bytes or None, got ") +
                                                        Py_TYPE(key.ptr())->tp_name);
            }
            return self.decide(data, static_cast<size_t>(length));
          },
          py::arg("key"), "arm_index * 2 + (1 if the request is copied to the shadow else 0).")
      .def("next_random", &Router::next_random, "Advances the generator and returns its 64-bit draw (tests).");
}

}  // namespace conveyor::bindings
