// Bindings of the native gRPC front end (conveyor/grpc_frontend.h), when it was built:
// `_core.GRPC_FRONTEND_BUILT` says whether it was. Construction and stop release the GIL
// (stopping waits for calls whose batches may run Python).
#include <pybind11/stl.h>

#include "batcher_convert.h"
#include "conveyor/batcher.h"
#include "convert.h"
#include "frontend_convert.h"
#ifdef CONVEYOR_WITH_GRPC
#include "conveyor/grpc_frontend.h"
#endif

namespace conveyor::bindings {

void init_grpc_frontend(py::module_& m) {
#ifdef CONVEYOR_WITH_GRPC
  m.attr("GRPC_FRONTEND_BUILT") = true;
  py::class_<GrpcFrontend, std::shared_ptr<GrpcFrontend>>(
      m, "GrpcFrontend",
      "The native gRPC data plane: ModelInfer answered from gRPC C++ threads; every other call is relayed to the "
      "gRPC server at `fallback` (a gRPC target: unix:/path or 127.0.0.1:port).")
      .def(py::init([](const std::string& host, int port, std::string fallback, int max_message_bytes,
                       std::string api_key) {
             GrpcFrontendOptions options;
             options.host = host;
             options.port = port;
             options.fallback_target = std::move(fallback);
             options.max_message_bytes = max_message_bytes;
             options.api_key = std::move(api_key);
             py::gil_scoped_release release;
             // Deleted without the GIL: stopping waits for native calls whose batches may need it.
             return std::shared_ptr<GrpcFrontend>(new GrpcFrontend(std::move(options)), DeleteWithoutGil<GrpcFrontend>{});
           }),
           py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("fallback") = "",
           py::arg("max_message_bytes") = 64 << 20, py::arg("api_key") = "")
      .def_property_readonly("port", &GrpcFrontend::port)
      .def(
          "add_model",
          [](GrpcFrontend& f, std::string name, int64_t version, std::shared_ptr<Batcher> batcher, py::bytes metadata,
             py::bytes config, std::shared_ptr<RolloutCounts> counts, py::handle route) {
            std::shared_ptr<FrontendRoute> routed = frontend_route(name, route);
            f.add_model({std::move(name), version, std::move(batcher), std::string(metadata), std::string(config),
                         std::move(counts), std::move(routed)});
          },
          py::arg("name"), py::arg("version"), py::arg("batcher"), py::arg("metadata") = py::bytes(),
          py::arg("config") = py::bytes(), py::arg("counts") = nullptr, py::arg("route") = py::none(),
          "Serve the model's ModelInfer calls natively (replacing the version of that name served before), and "
          "its ModelReady calls; when `metadata` and `config` (its serialized ModelMetadataResponse and "
          "ModelConfigResponse) are given, its ModelMetadata and ModelConfig calls. `counts`: where the requests "
          "answered here are counted (a RolloutCounts), or None. `route`: a running rollout's routing of the calls "
          "naming no version (see native_models.py), or None.")
      .def("remove_model", &GrpcFrontend::remove_model, py::arg("name"), "Relay the model's calls from now on.")
      .def(
          "serve_health",
          [](GrpcFrontend& f, py::bytes server_metadata, const std::vector<py::bytes>& health_check_requests,
             py::bytes health_serving) {
            GrpcServerAnswers answers{std::string(server_metadata), {}, std::string(health_serving)};
            for (const py::bytes& request : health_check_requests) answers.health_check_requests.emplace_back(request);
            f.serve_health(std::move(answers));
          },
          py::arg("server_metadata"), py::arg("health_check_requests"), py::arg("health_serving"),
          "The server has started: answer ServerLive, ServerMetadata (this serialized answer), grpc.health.v1 Check "
          "of these serialized requests (with `health_serving` while the server is ready), ServerReady, and the "
          "ModelReady, ModelMetadata and ModelConfig calls of the models served here from now on.")
      .def("set_ready", &GrpcFrontend::set_ready, py::arg("ready"),
           "Whether the server is ready: while it is, ServerReady and health Check are answered here (once serving "
           "health); while not, the server behind answers them.")
      .def("drain", &GrpcFrontend::drain, "Relay inference calls from now on (the server behind refuses them).")
      .def_property_readonly("in_flight", &GrpcFrontend::in_flight)
      .def("stop", &GrpcFrontend::stop, py::arg("grace_ms") = 0, py::call_guard<py::gil_scoped_release>(),
           "Stop serving; calls under way are cancelled after grace_ms (native ones are answered when their batch "
           "completes).");
#else
  m.attr("GRPC_FRONTEND_BUILT") = false;
#endif
}

}  // namespace conveyor::bindings
