// What the native front ends (HTTP, gRPC) share: the models they serve, request ids and
// the API key check.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "conveyor/completion.h"
#include "conveyor/router.h"
#include "conveyor/tensor.h"

namespace conveyor {

class Batcher;

// The requests native front ends answered with one version of a model under a rollout
// (the rollout's traffic counters add them to their own): those naming no version (routed
// by the rollout, or to its outcome once it ended) and those naming the version.
struct RolloutCounts {
  std::atomic<uint64_t> routed{0};
  std::atomic<uint64_t> named{0};
};

struct FrontendModel;

// How a running rollout routes the requests naming no version of a model served natively:
// the router's decision picks an arm, whose version answers and counts the request, and
// the answer carries the rollout's name (the "rollout" parameter), as the Python front ends
// route it (conveyor/deploy/traffic.py). A request naming a version goes behind.
//
// A rollout that copies to a shadow version: the copying arm's batcher holds the rollout's
// Mirror (conveyor/mirror.h), so a request the decision copies and routes to that arm is
// submitted with a mirror tag of its own, and the batcher copies it to the shadow once its
// batch has run. A request the decision copies but routes to the shadow version's own arm is
// not copied (it is answered there), as in Python.
struct FrontendRoute {
  std::string rollout;
  std::unique_ptr<router::Router> router;
  std::vector<std::shared_ptr<const FrontendModel>> arms;  // by arm index; null: an arm at 0 % (never picked)
  // The arm whose requests a copying decision tags for the shadow; -1: none (the table
  // copies to no shadow). Required when the table copies.
  int copying_arm = -1;
  // The last mirror tag handed out: each copied request gets the next one (never 0).
  mutable std::atomic<uint64_t> last_mirror_tag{0};
  // Where the routing key is read: the request parameter (which wins), else the header (or
  // gRPC metadata key, lowercase). Both empty: no key can change a decision; none is read.
  std::string key_parameter;
  std::string key_header;
};

// A model version served natively: requests naming the model (and no version, or this
// one) go to `batcher`. Its tensors must be host tensors of fixed-size datatypes.
struct FrontendModel {
  std::string name;
  int64_t version = 1;
  std::shared_ptr<Batcher> batcher;
  // The model's metadata and config answers, rendered by the server behind in the front
  // end's encoding (HTTP: the JSON bodies of GET /v2/models/{name}[/versions/{version}] and
  // .../config; gRPC: serialized ModelMetadataResponse and ModelConfigResponse messages).
  // Empty: that request goes behind.
  std::string metadata;
  std::string config;
  // Where the requests answered here are counted; null: they are not.
  std::shared_ptr<RolloutCounts> counts;
  // Set: a rollout routes the requests naming no version to its arms (`batcher` is then the
  // champion's, for readiness).
  std::shared_ptr<FrontendRoute> route;

  // Counts one request answered here (`named`: it named the version).
  void count(bool named) const {
    if (counts) (named ? counts->named : counts->routed).fetch_add(1, std::memory_order_relaxed);
  }
};

// The models a native front end serves, by name: looked up from its threads, changed from
// any thread.
class FrontendModels {
 public:
  // Serves `model` (replacing the version of that name served before). Throws
  // Error(kInvalidInput) for a model a native front end cannot serve: no batcher, or a
  // BYTES or BF16 tensor (the Python front ends serve those). `where` tags the message.
  void add(FrontendModel model, const char* where);
  void remove(const std::string& name);
  // The model of that name, or null; no string is made for the lookup.
  std::shared_ptr<const FrontendModel> find(std::string_view name) const;

 private:
  struct NameHash {
    using is_transparent = void;
    size_t operator()(std::string_view name) const noexcept { return std::hash<std::string_view>{}(name); }
  };
  mutable std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<const FrontendModel>, NameHash, std::equal_to<>> models_;  // guarded by mu_
};

// Where a rollout sends one request: the arm that answers it, or null when none can here (an
// arm at 0 %), and its mirror tag (Batcher::submit's: nonzero to copy it to the shadow).
struct RoutedRequest {
  std::shared_ptr<const FrontendModel> arm;
  uint64_t mirror_tag = 0;
};
// The routing of a request whose routing key is `key` (empty: a random draw).
RoutedRequest route_request(const FrontendRoute& route, std::string_view key);

// A routing key read from a header (or gRPC metadata) value into `key`, as the Python front
// ends read it; false for a value with bytes beyond ASCII, which they read as latin-1 (the
// request goes behind, so that its key is theirs).
bool route_key_from_header(std::string_view value, std::string* key);

// One request's rows of a batch output (the whole output for a model that does not batch).
struct OutputRows {
  Shape shape;           // the request's rows first
  const uint8_t* data;   // its first row
  size_t nbytes;
};
// Throws Error(kInternal) for an output not in host memory.
OutputRows output_rows(const Tensor& output, const Completion& completion);

// An id for a request that came without one: 128 random bits in hex, an id another client
// cannot guess (feedback labels a prediction by it). The bits are drawn from the kernel
// 256 ids at a time, not with a system call per request.
std::string new_request_id();

// Whether an Authorization value ("Bearer <token>", the scheme in any case, blanks around
// the token ignored) carries `key`; compared in time independent of where they differ.
bool bearer_matches(std::string_view authorization, const std::string& key);

}  // namespace conveyor
