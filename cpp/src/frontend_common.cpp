#include "conveyor/frontend_common.h"

#include <sys/random.h>

#include <cctype>
#include <cerrno>
#include <cstring>

#include "conveyor/batcher.h"
#include "conveyor/error.h"

namespace conveyor {

namespace {

void check_servable(const FrontendModel& model, const std::string& tag) {
  if (!model.batcher) throw Error(ErrorCode::kInvalidInput, tag + " has no batcher");
  const BatcherOptions& o = model.batcher->options();
  for (const auto* specs : {&o.inputs, &o.outputs}) {
    for (const TensorSpec& spec : *specs) {
      if (spec.dtype == DType::kBytes || spec.dtype == DType::kBFloat16) {
        throw Error(ErrorCode::kInvalidInput, tag + ": tensor '" + spec.name + "' is " + dtype_name(spec.dtype) +
                                                  ", which only the Python front end serves");
      }
    }
  }
}

}  // namespace

void FrontendModels::add(FrontendModel model, const char* where) {
  const std::string tag = std::string(where) + " model '" + model.name + "'";
  check_servable(model, tag);
  if (model.route) {
    const FrontendRoute& route = *model.route;
    if (!route.router || route.arms.size() != route.router->table().arm_bounds.size()) {
      throw Error(ErrorCode::kInvalidInput, tag + ": its route needs a router and one entry per arm");
    }
    const bool copies = route.router->table().shadow_bound != 0;
    const bool arm_named = route.copying_arm >= 0 && static_cast<size_t>(route.copying_arm) < route.arms.size() &&
                           route.arms[route.copying_arm] != nullptr;
    if (copies != arm_named) {
      throw Error(ErrorCode::kInvalidInput,
                  tag + (copies ? ": a route that copies to a shadow needs the loaded arm whose requests are copied"
                                : ": a route that copies to no shadow has no copying arm"));
    }
    for (const auto& arm : route.arms) {
      if (arm) check_servable(*arm, tag + " version " + std::to_string(arm->version));
    }
  }
  auto shared = std::make_shared<const FrontendModel>(std::move(model));
  std::lock_guard<std::mutex> lock(mu_);
  models_[shared->name] = std::move(shared);
}

void FrontendModels::remove(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  models_.erase(name);
}

std::shared_ptr<const FrontendModel> FrontendModels::find(std::string_view name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

OutputRows output_rows(const Tensor& t, const Completion& c) {
  if (t.device.kind != DeviceKind::kCPU) throw Error(ErrorCode::kInternal, "an output is not in host memory");
  Shape shape = t.shape;
  int64_t first_row = 0;
  if (c.rows >= 0 && shape.ndim() > 0) {
    shape[0] = c.rows;
    first_row = c.row_offset;
  }
  const auto* data = static_cast<const uint8_t*>(t.data) + first_row * static_cast<int64_t>(t.row_nbytes());
  return {shape, data, static_cast<size_t>(shape.numel()) * dtype_size(t.dtype)};
}

std::string new_request_id() {
  static constexpr size_t kIdBytes = 16, kPoolBytes = kIdBytes * 256;
  thread_local unsigned char pool[kPoolBytes];
  thread_local size_t next = kPoolBytes;
  if (next == kPoolBytes) {
    size_t got = 0;
    while (got < kPoolBytes) {
      const ssize_t n = getrandom(pool + got, kPoolBytes - got, 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw Error(ErrorCode::kInternal, "[frontend] no random bytes for a request id: " + std::string(std::strerror(errno)));
      }
      got += static_cast<size_t>(n);
    }
    next = 0;
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(2 * kIdBytes, '0');
  for (size_t i = 0; i < kIdBytes; ++i) {
    id[2 * i] = kHex[pool[next + i] >> 4];
    id[2 * i + 1] = kHex[pool[next + i] & 15];
  }
  next += kIdBytes;
  return id;
}

bool bearer_matches(std::string_view value, const std::string& key) {
  const size_t space = value.find(' ');
  if (space == std::string_view::npos || space != 6) return false;
  for (size_t i = 0; i < space; ++i) {
    if (std::tolower(static_cast<unsigned char>(value[i])) != "bearer"[i]) return false;
  }
  std::string_view token = value.substr(space + 1);
  while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) token.remove_prefix(1);
  while (!token.empty() && (token.back() == ' ' || token.back() == '\t')) token.remove_suffix(1);
  unsigned char diff = token.size() == key.size() ? 0 : 1;
  for (size_t i = 0; i < key.size(); ++i) diff |= static_cast<unsigned char>(key[i] ^ (i < token.size() ? token[i] : 0));
  return diff == 0;
}

bool route_key_from_header(std::string_view value, std::string* key) {
  for (char c : value) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  key->assign(value.data(), value.size());
  return true;
}

RoutedRequest route_request(const FrontendRoute& route, std::string_view key) {
  const uint32_t decision = route.router->decide(key.data(), key.size());
  const size_t arm = decision / 2;
  if (arm >= route.arms.size()) return {};
  RoutedRequest out{route.arms[arm], 0};
  if ((decision & 1) != 0 && static_cast<int>(arm) == route.copying_arm) {
    out.mirror_tag = route.last_mirror_tag.fetch_add(1, std::memory_order_relaxed) + 1;
  }
  return out;
}

}  // namespace conveyor
