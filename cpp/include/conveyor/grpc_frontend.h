// The native gRPC data plane: KServe v2 ModelInfer (GRPCInferenceService, as Triton's
// clients and perf_analyzer call it) answered by gRPC C++ threads, with each request's
// tensors viewed in place in the decoded message and handed straight to the model's
// batcher; ModelStreamInfer likewise, request by request (a request of a stream it does
// not serve goes behind as a ModelInfer of its own, its answer or refusal coming back on the
// stream). Once the server has started (serve_health), the health calls (ServerLive;
// ServerReady and grpc.health.v1 Check while the server is ready) and the metadata calls
// (ServerMetadata; ModelReady, ModelMetadata and ModelConfig of the models served here) are
// answered here too, with answers the server behind rendered. Every other call (the other
// RPCs, health Watch, and any call this front end does not serve itself: a model it was not given, a tensor in shared memory, typed
// contents, a classification output, a key it cannot check, a request it would refuse) is
// relayed as received, message by message, to the full-featured gRPC server behind it,
// whose answers, status and trailing metadata are relayed back. So every RPC keeps the
// behaviour of the server behind, and the common inference call skips Python.
//
// Built only when gRPC C++ is found at build time (CONVEYOR_WITH_GRPC).
//
// Threading: the constructor binds and starts serving; add_model, remove_model, port,
// drain, in_flight and stop may be called from any thread. Calls run on gRPC's threads;
// a native call is answered on the thread of the batcher that ran it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conveyor/frontend_common.h"

namespace conveyor {

struct GrpcFrontendOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: a free port (see GrpcFrontend::port)
  // The gRPC server that answers every call not served here, as a gRPC target:
  // "unix:/path/to/socket" (what the server uses: no TCP port, only this process's user can
  // reach it) or "127.0.0.1:port".
  std::string fallback_target;
  // The largest message received or sent, as the server behind is configured; an answer
  // over it is refused with RESOURCE_EXHAUSTED, in the words of the server behind.
  int max_message_bytes = 64 << 20;
  // When set, ModelInfer and the metadata calls need 'authorization: Bearer <api_key>'
  // metadata (the health calls never do); a call without it is relayed (the server behind
  // refuses it with its own status and message).
  std::string api_key;
};

// The answers of the calls about the whole server, rendered by the server behind as it
// answers them (serialized messages).
struct GrpcServerAnswers {
  std::string server_metadata;  // a ServerMetadataResponse
  // grpc.health.v1.Health/Check requests (serialized HealthCheckRequest messages: the
  // services the server behind reports on) answered `health_serving` (a HealthCheckResponse
  // saying SERVING) while the server is ready. Any other request is relayed.
  std::vector<std::string> health_check_requests;
  std::string health_serving;
};

class GrpcFrontend {
 public:
  // Binds host:port and starts serving. Throws Error(kUnavailable) when it cannot bind.
  explicit GrpcFrontend(GrpcFrontendOptions options);
  ~GrpcFrontend();  // stop()
  GrpcFrontend(const GrpcFrontend&) = delete;
  GrpcFrontend& operator=(const GrpcFrontend&) = delete;

  int port() const noexcept;
  // Serves `model`'s inference natively (replacing the version of that name served before).
  // Throws Error(kInvalidInput) for a model it cannot serve (BYTES or BF16 tensors).
  void add_model(FrontendModel model);
  // Relays the model's calls from now on.
  void remove_model(const std::string& name);
  // The server has started (every listener is up): from now on the health and metadata
  // calls are answered here (see the top of this file). Until then they are relayed.
  void serve_health(GrpcServerAnswers answers);
  // Whether the server is ready (every model it was asked to serve serves), as the server
  // behind computes it: while true, ServerReady and health Check are answered here; while
  // false they are relayed, and the server behind answers. Set it false before the server
  // stops being ready, true once it is.
  void set_ready(bool ready);
  // Inference calls arriving from now on are relayed (the server behind refuses them
  // while it drains); calls already accepted are answered.
  void drain();
  // Inference calls accepted here whose answers are not sent yet.
  size_t in_flight() const;
  // Stops serving: new calls are refused, calls under way are cancelled after
  // `grace_ms` (each native call is answered when its batch completes). Idempotent.
  void stop(int64_t grace_ms = 0);

  struct Core;

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace conveyor
