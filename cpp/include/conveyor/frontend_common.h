// What the native front ends (HTTP, gRPC) share: the models they serve, request ids and
// the API key check.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace conveyor {

class Batcher;

// A model version served natively: requests naming the model (and no version, or this
// one) go to `batcher`. Its tensors must be host tensors of fixed-size datatypes.
struct FrontendModel {
  std::string name;
  int64_t version = 1;
  std::shared_ptr<Batcher> batcher;
  // The body of GET /v2/models/{name}[/versions/{version}] (the server behind's answer,
  // rendered by it); empty: that route is forwarded.
  std::string metadata;
};

// An id for a request that came without one: 128 random bits in hex, an id another client
// cannot guess (feedback labels a prediction by it). The bits are drawn from the kernel
// 256 ids at a time, not with a system call per request.
std::string new_request_id();

// Whether an Authorization value ("Bearer <token>", the scheme in any case, blanks around
// the token ignored) carries `key`; compared in time independent of where they differ.
bool bearer_matches(std::string_view authorization, const std::string& key);

}  // namespace conveyor
