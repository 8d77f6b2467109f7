// Bindings of the native HTTP front end (conveyor/http_frontend.h): construction and
// stop release the GIL (the I/O thread may be dropping a Python-owned batch output).
#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/http_frontend.h"
#include "convert.h"
#include "frontend_convert.h"

namespace conveyor::bindings {

namespace {

std::chrono::steady_clock::duration seconds(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

}  // namespace

std::shared_ptr<FrontendRoute> frontend_route(const std::string& model, py::handle route) {
  if (route.is_none()) return nullptr;
  auto [rollout, arm_bounds, shadow_bound, salt_basis, sticky, seed, arms, copying_arm, key_parameter, key_header] =
      route.cast<std::tuple<std::string, std::vector<uint64_t>, uint64_t, uint64_t, bool, uint64_t,
                            std::vector<std::tuple<int64_t, std::shared_ptr<Batcher>, std::shared_ptr<RolloutCounts>>>,
                            int, std::string, std::string>>();
  auto out = std::make_shared<FrontendRoute>();
  out->rollout = std::move(rollout);
  out->router = std::make_unique<router::Router>(
      router::RouteTable{std::move(arm_bounds), shadow_bound, salt_basis, sticky}, seed);
  out->copying_arm = copying_arm;
  for (auto& [version, batcher, counts] : arms) {
    out->arms.push_back(batcher ? std::make_shared<const FrontendModel>(
                                      FrontendModel{model, version, std::move(batcher), {}, {}, std::move(counts), {}})
                                : nullptr);
  }
  out->key_parameter = std::move(key_parameter);
  out->key_header = std::move(key_header);
  return out;
}

void init_http_frontend(py::module_& m) {
  // Shared by both native front ends (the gRPC one's bindings come after these).
  py::class_<RolloutCounts, std::shared_ptr<RolloutCounts>>(
      m, "RolloutCounts",
      "The requests native front ends answered with one version of a model under a rollout: `routed` (naming "
      "no version) and `named` (naming the version). The rollout's traffic counters add them to their own.")
      .def(py::init<>())
      .def_property_readonly("routed", [](const RolloutCounts& c) { return c.routed.load(std::memory_order_relaxed); })
      .def_property_readonly("named", [](const RolloutCounts& c) { return c.named.load(std::memory_order_relaxed); });
  py::class_<HttpFrontend, std::shared_ptr<HttpFrontend>>(
      m, "HttpFrontend",
      "The native HTTP/1.1 data plane: v2 inference on its own I/O thread; every other request is forwarded to "
      "the HTTP server on 127.0.0.1:fallback_port.")
      .def(py::init([](const std::string& host, int port, int fallback_port, size_t max_body_bytes,
                       size_t max_header_bytes, size_t max_header_count, size_t max_connections, size_t max_request_chunks,
                       double idle_timeout_s, double request_read_timeout_s, std::string api_key) {
             HttpFrontendOptions options;
             options.host = host;
             options.port = port;
             options.fallback_port = fallback_port;
             options.max_body_bytes = max_body_bytes;
             options.max_header_bytes = max_header_bytes;
             options.max_header_count = max_header_count;
             options.max_connections = max_connections;
             options.max_request_chunks = max_request_chunks;
             options.idle_timeout = seconds(idle_timeout_s);
             options.request_read_timeout = seconds(request_read_timeout_s);
             options.api_key = std::move(api_key);
             py::gil_scoped_release release;
             return std::make_shared<HttpFrontend>(std::move(options));
           }),
           py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("fallback_port") = 0,
           py::arg("max_body_bytes") = size_t{64} << 20, py::arg("max_header_bytes") = size_t{64} << 10,
           py::arg("max_header_count") = 100, py::arg("max_connections") = 1024, py::arg("max_request_chunks") = 65536,
           py::arg("idle_timeout_s") = 60.0,
           py::arg("request_read_timeout_s") = 60.0, py::arg("api_key") = "")
      .def_property_readonly("port", &HttpFrontend::port)
      .def(
          "add_model",
          [](HttpFrontend& f, std::string name, int64_t version, std::shared_ptr<Batcher> batcher, std::string metadata,
             std::string config, std::shared_ptr<RolloutCounts> counts, py::handle route) {
            std::shared_ptr<FrontendRoute> routed = frontend_route(name, route);
            f.add_model({std::move(name), version, std::move(batcher), std::move(metadata), std::move(config),
                         std::move(counts), std::move(routed)});
          },
          py::arg("name"), py::arg("version"), py::arg("batcher"), py::arg("metadata") = "", py::arg("config") = "",
          py::arg("counts") = nullptr, py::arg("route") = py::none(),
          "Serve the model's inference natively (replacing the version of that name served before), and its "
          "readiness and, when `metadata` and `config` (the bodies of its metadata and config routes) are given, "
          "those routes. `counts`: where the requests answered here are counted (a RolloutCounts), or None. "
          "`route`: a running rollout's routing of the requests naming no version (see native_models.py), or None.")
      .def("serve_health", &HttpFrontend::serve_health, py::arg("server_metadata"),
           "The server has started: answer liveness, GET /v2 (with this body) and the metadata and readiness of "
           "the models served here from now on.")
      .def("set_ready", &HttpFrontend::set_ready, py::arg("ready"),
           "Whether the server is ready: while it is, GET /v2/health/ready is answered here (once serving health); "
           "while not, the server behind answers it.")
      .def("remove_model", &HttpFrontend::remove_model, py::arg("name"), "Forward the model's requests from now on.")
      .def("drain", &HttpFrontend::drain, "Stop accepting connections; forward inference from now on.")
      .def_property_readonly("in_flight", &HttpFrontend::in_flight)
      .def("stop", &HttpFrontend::stop, py::call_guard<py::gil_scoped_release>());
}

}  // namespace conveyor::bindings
