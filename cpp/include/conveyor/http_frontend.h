// The native HTTP/1.1 data plane: KServe v2 inference, liveness, the server's readiness
// (while it is ready), and the metadata, config and readiness of the models it serves,
// answered on an I/O thread of its own, with inference
// requests handed straight to the models' batchers. Every other route, and an
// inference request this front end does not serve itself (a model it was not given, a
// compressed body, a classification output, a key it cannot check), is forwarded as
// received to the full-featured HTTP server behind it, whose answer is relayed.
//
// A request's body is read once (Boost.Beast) into a buffer that the request's input
// tensors view in place, lent to the batcher: a request alone in its batch runs on them
// where they lie, others are copied once into the batch. Completions come back from the
// batcher's threads in one deliver() per batch, posted to the I/O thread, which writes
// each response, binary outputs straight from the batch's output memory. No Python runs on this path: a model whose executor needs
// Python takes the GIL once per batch on its own instance thread.
//
// Threading: the constructor binds and starts the I/O thread; add_model, remove_model,
// port and stop may be called from any thread. Every connection, parser and pending
// request lives on the I/O thread alone.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "conveyor/frontend_common.h"

namespace conveyor {

struct HttpFrontendOptions {
  std::string host = "127.0.0.1";
  int port = 0;                             // 0: a free port (see HttpFrontend::port)
  size_t max_body_bytes = 64u << 20;        // a larger body is answered 413
  size_t max_header_bytes = 64u << 10;      // request line and headers; more gets 431
  size_t max_header_count = 100;            // header lines; more gets 431
  size_t max_connections = 1024;            // the next connection is answered 503 and closed
  size_t max_request_chunks = 65536;        // chunks of a chunked body (the last, empty one aside); more gets 413
  // A keep-alive connection with no request under way is closed after idle_timeout; a
  // request not fully read request_read_timeout after its head began gets 408.
  std::chrono::steady_clock::duration idle_timeout = std::chrono::seconds(60);
  std::chrono::steady_clock::duration request_read_timeout = std::chrono::seconds(60);
  size_t max_inference_header_bytes = 16u << 20;  // the JSON part of a binary request
  // Every route this front end does not answer itself is forwarded, as received, to the
  // HTTP server on 127.0.0.1:fallback_port (the Python front end), and its answer relayed.
  // 0: such routes are answered 404.
  int fallback_port = 0;
  // When set, inference needs 'Authorization: Bearer <api_key>'; a request without it is
  // forwarded (the server behind answers 401 with its own guard and message).
  std::string api_key;
};

class HttpFrontend {
 public:
  // Binds host:port and starts serving. Throws Error(kUnavailable) when it cannot bind.
  explicit HttpFrontend(HttpFrontendOptions options);
  ~HttpFrontend();  // stop()
  HttpFrontend(const HttpFrontend&) = delete;
  HttpFrontend& operator=(const HttpFrontend&) = delete;

  int port() const noexcept;
  // Serves `model` natively (replacing the version of that name served before).
  // Throws Error(kInvalidInput) for a model it cannot serve (BYTES tensors).
  void add_model(FrontendModel model);
  // Forwards the model's requests from now on.
  void remove_model(const std::string& name);
  // The server has started (every listener is up): from now on liveness, GET /v2 (with
  // `server_metadata` as its body) and the metadata and readiness of the models served
  // here are answered here. Until then they are forwarded, so that a client waiting for
  // the server to be live is not told so before all of it listens.
  void serve_health(std::string server_metadata);
  // Whether the server is ready (every model it was asked to serve serves), as the server
  // behind computes it: while true (and once serving health), GET /v2/health/ready is
  // answered 200 here; while false it is forwarded, and the server behind answers why not.
  // Set it false before the server stops being ready, true once it is.
  void set_ready(bool ready);
  // Stops accepting connections; inference requests that arrive on open connections
  // are forwarded from now on (the server behind refuses them while it drains).
  void drain();
  // Inference requests accepted whose answers are not written yet.
  size_t in_flight() const;
  // Closes every connection and joins the I/O thread. Requests still in a batcher
  // complete into nothing. Idempotent.
  void stop();

  struct Core;

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace conveyor
