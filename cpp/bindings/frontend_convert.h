// What the bindings of both native front ends (HTTP, gRPC) convert alike. Glue only.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "conveyor/frontend_common.h"

namespace conveyor::bindings {

namespace py = pybind11;

// The route of a model under a running rollout, from the tuple conveyor/server/native_models.py
// makes: (rollout, arm_bounds, salt_basis, sticky, seed, [(version, batcher or None, counts
// or None) per arm], key_parameter, key_header). None: no route.
std::shared_ptr<FrontendRoute> frontend_route(const std::string& model, py::handle route);

}  // namespace conveyor::bindings
