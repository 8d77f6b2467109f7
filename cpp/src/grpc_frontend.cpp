#include "conveyor/grpc_frontend.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include "absl/synchronization/mutex.h"

#include <atomic>
#include <climits>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/completion.h"
#include "conveyor/error.h"
#include "conveyor/protocol/grpc/inference.pb.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"

namespace conveyor {

namespace {

constexpr std::string_view kModelInfer = "/inference.GRPCInferenceService/ModelInfer";
constexpr std::string_view kModelStreamInfer = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr std::string_view kServerLive = "/inference.GRPCInferenceService/ServerLive";
constexpr std::string_view kServerReady = "/inference.GRPCInferenceService/ServerReady";
constexpr std::string_view kServerMetadata = "/inference.GRPCInferenceService/ServerMetadata";
constexpr std::string_view kModelReady = "/inference.GRPCInferenceService/ModelReady";
constexpr std::string_view kModelMetadata = "/inference.GRPCInferenceService/ModelMetadata";
constexpr std::string_view kModelConfig = "/inference.GRPCInferenceService/ModelConfig";
constexpr std::string_view kHealthCheck = "/grpc.health.v1.Health/Check";

grpc::StatusCode grpc_code_for(ErrorCode code) {
  // The same table as the server behind (conveyor/protocol/errors.py).
  switch (code) {
    case ErrorCode::kInvalidInput: return grpc::StatusCode::INVALID_ARGUMENT;
    case ErrorCode::kQueueFull:
    case ErrorCode::kUnavailable: return grpc::StatusCode::UNAVAILABLE;
    case ErrorCode::kOutOfMemory: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case ErrorCode::kDeadlineExceeded: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case ErrorCode::kCancelled: return grpc::StatusCode::CANCELLED;
    default: return grpc::StatusCode::INTERNAL;
  }
}

// Metadata a client sends that gRPC itself writes on the relayed call (or that no call may set).
bool relayed_metadata(std::string_view key) {
  if (key.empty() || key.front() == ':') return false;
  if (key.substr(0, 5) == "grpc-") return false;
  return key != "te" && key != "content-type" && key != "user-agent" && key != "host";
}

// The priority or timeout of a request when it is an integer >= 0 (as the server behind
// reads it); -1 otherwise.
int64_t schedule_value(const inference::InferParameter& p) {
  switch (p.parameter_choice_case()) {
    case inference::InferParameter::kInt64Param: return p.int64_param() >= 0 ? p.int64_param() : -1;
    case inference::InferParameter::kUint64Param:
      return static_cast<int64_t>(std::min<uint64_t>(p.uint64_param(), INT64_MAX));
    default: return -1;
  }
}

// The index of the spec named `name`, or -1.
int spec_index(const std::vector<TensorSpec>& specs, const std::string& name) {
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace

struct GrpcFrontend::Core {
  explicit Core(GrpcFrontendOptions o) : options(std::move(o)) {}

  GrpcFrontendOptions options;
  int bound_port = 0;
  // Destroyed in reverse: the server (and its calls) before the service and the stub they use.
  std::unique_ptr<grpc::GenericStub> upstream;  // the server behind
  std::unique_ptr<grpc::CallbackGenericService> service;
  std::unique_ptr<grpc::Server> server;

  FrontendModels models;

  std::atomic<bool> draining{false};
  std::atomic<size_t> in_flight{0};
  std::atomic<bool> started{false};       // health and metadata calls are answered here (serve_health)
  std::atomic<bool> server_ready{false};  // ServerReady and health Check are answered here (set_ready)
  mutable std::mutex answers_mu;
  GrpcServerAnswers answers;  // guarded by answers_mu
  std::mutex stop_mu;
  bool stopped = false;  // guarded by stop_mu

  bool authorized(const grpc::GenericCallbackServerContext* ctx) const {
    if (options.api_key.empty()) return true;
    const auto& metadata = ctx->client_metadata();
    auto it = metadata.find("authorization");
    if (it == metadata.end()) return false;
    return bearer_matches(std::string_view(it->second.data(), it->second.size()), options.api_key);
  }
};

namespace {

using grpc::ByteBuffer;

// A ModelInfer request this front end serves itself, decoded: its tensors view the message.
struct NativeRequest {
  std::shared_ptr<inference::ModelInferRequest> message;
  std::shared_ptr<const FrontendModel> model;
  std::vector<Tensor> tensors;
  int64_t priority = 0;
  int64_t timeout_us = 0;
  std::vector<int> outputs;  // the batcher outputs answered, in the answer's order
  std::string id;            // the id answered: the client's, or one made here
  std::string rollout;       // the rollout that routed it, answered as the "rollout" parameter; empty: none
  uint64_t mirror_tag = 0;   // nonzero: the rollout copies it to its shadow version
};

using Metadata = std::multimap<grpc::string_ref, grpc::string_ref>;

// The request's routing key under `route` into `key` (left empty: none, a random draw), as
// the Python server reads it (conveyor.deploy.traffic.route_key_from): the parameter, a
// string or an integer, wins; else the metadata key's last value. False when the Python
// server must read it: a parameter of another type (it refuses it), or a value with bytes
// beyond ASCII (it reads them as latin-1).
bool route_key(const FrontendRoute& route, const inference::ModelInferRequest& request, const Metadata& metadata,
               std::string* key) {
  if (!route.key_parameter.empty()) {
    auto found = request.parameters().find(route.key_parameter);
    if (found != request.parameters().end()) {
      const inference::InferParameter& v = found->second;
      switch (v.parameter_choice_case()) {
        case inference::InferParameter::kStringParam:
          if (!v.string_param().empty()) {
            *key = v.string_param();
            return true;
          }
          break;
        case inference::InferParameter::kInt64Param: *key = std::to_string(v.int64_param()); return true;
        case inference::InferParameter::kUint64Param: *key = std::to_string(v.uint64_param()); return true;
        case inference::InferParameter::kBoolParam: break;
        default: return false;
      }
    }
  }
  if (route.key_header.empty()) return true;
  grpc::string_ref value;
  for (auto [at, end] = metadata.equal_range(grpc::string_ref(route.key_header)); at != end; ++at) value = at->second;
  return route_key_from_header(std::string_view(value.data(), value.size()), key);
}

// Decodes `bytes` (left as they are) into `out` when it is a request this front end serves
// exactly as the server behind would; false when it is not (relay it: the server behind
// answers it, or refuses it in its own words).
// `metadata`: the call's, where a rollout's routing key may be.
bool decode_native(GrpcFrontend::Core& core, const ByteBuffer& bytes, const Metadata& metadata, NativeRequest* out) {
  auto request = std::make_shared<inference::ModelInferRequest>();
  ByteBuffer copy(bytes);  // shares the slices; Deserialize consumes what it is given
  if (!grpc::SerializationTraits<inference::ModelInferRequest>::Deserialize(&copy, request.get()).ok()) return false;
  std::shared_ptr<const FrontendModel> model = core.models.find(request->model_name());
  if (!model) return false;
  if (model->route) {
    // Routed by the rollout to one of its versions; one naming a version is relayed.
    std::string key;
    if (!request->model_version().empty() || !route_key(*model->route, *request, metadata, &key)) return false;
    RoutedRequest routed = route_request(*model->route, key);
    if (!routed.arm) return false;
    out->rollout = model->route->rollout;
    out->mirror_tag = routed.mirror_tag;
    model = std::move(routed.arm);
  }
  if (!request->model_version().empty() && request->model_version() != std::to_string(model->version)) return false;
  for (const auto& [key, value] : request->parameters()) {
    // A parameter with no value is refused behind; the others are ignored there too.
    if (value.parameter_choice_case() == inference::InferParameter::PARAMETER_CHOICE_NOT_SET) return false;
    if (key == "priority" || key == "timeout") {
      const int64_t v = schedule_value(value);
      if (v < 0) return false;  // refused behind, in its words
      (key == "priority" ? out->priority : out->timeout_us) = v;
    }
  }
  const std::vector<TensorSpec>& specs = model->batcher->options().inputs;
  const auto& raw = request->raw_input_contents();
  if (request->inputs_size() != static_cast<int>(specs.size()) || raw.size() != request->inputs_size()) return false;
  std::vector<Tensor> tensors(specs.size());
  std::vector<bool> given(specs.size(), false);
  for (int i = 0; i < request->inputs_size(); ++i) {
    const auto& input = request->inputs(i);
    if (input.parameters_size() != 0 || input.has_contents()) return false;
    const int index = spec_index(specs, input.name());
    if (index < 0 || given[static_cast<size_t>(index)]) return false;
    given[static_cast<size_t>(index)] = true;
    Tensor& t = tensors[static_cast<size_t>(index)];
    try {
      t.dtype = dtype_from_name(input.datatype());
    } catch (const Error&) {
      return false;
    }
    if (t.dtype == DType::kBytes || t.dtype == DType::kBFloat16) return false;
    if (input.shape_size() > Shape::kMaxDims) return false;
    int64_t elements = 1;
    for (int64_t d : input.shape()) {
      if (d < 0 || (d && (__builtin_mul_overflow(elements, d, &elements) || elements > INT64_MAX / 8))) return false;
    }
    t.shape = Shape(input.shape().data(), input.shape_size());
    if (t.nbytes() != raw[i].size()) return false;
    t.data = const_cast<char*>(raw[i].data());
    t.owner = request;
  }
  const std::vector<TensorSpec>& output_specs = model->batcher->options().outputs;
  std::vector<int> outputs;
  if (request->outputs_size() == 0) {
    for (size_t i = 0; i < output_specs.size(); ++i) outputs.push_back(static_cast<int>(i));
  } else {
    std::unordered_set<std::string_view> names;
    for (const auto& output : request->outputs()) {
      for (const auto& [key, value] : output.parameters()) {
        // binary_data is HTTP's choice; anything else (classification, shared memory) is served behind.
        if (key != "binary_data" || value.parameter_choice_case() == inference::InferParameter::PARAMETER_CHOICE_NOT_SET) {
          return false;
        }
      }
      const int index = spec_index(output_specs, output.name());
      if (index < 0 || !names.insert(output.name()).second) return false;
      outputs.push_back(index);
    }
  }
  out->id = request->id().empty() ? new_request_id() : request->id();
  out->message = std::move(request);
  out->model = std::move(model);
  out->tensors = std::move(tensors);
  out->outputs = std::move(outputs);
  return true;
}

// One output's bytes in the batch outputs, written into an answer as raw_output_contents.
struct RawOutput {
  const uint8_t* data;
  size_t bytes;
};

using google::protobuf::internal::WireFormatLite;

// raw_output_contents is ModelInferResponse's last field, so protobuf writes it after all
// the others, as serialize_answer does.
constexpr int kRawOutputContentsField = inference::ModelInferResponse::kRawOutputContentsFieldNumber;

// Bytes a length-delimited `field` of `length` bytes takes in a message.
size_t field_bytes(int field, size_t length) {
  return WireFormatLite::TagSize(field, WireFormatLite::TYPE_BYTES) + WireFormatLite::LengthDelimitedSize(length);
}

// A length-delimited field's tag and length, as protobuf writes them, at the end of `out`.
void append_field_head(std::string& out, int field, size_t length) {
  using google::protobuf::io::CodedOutputStream;
  uint8_t head[2 * 10];  // two varints of at most 10 bytes
  uint8_t* end = CodedOutputStream::WriteVarint32ToArray(
      WireFormatLite::MakeTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED), head);
  end = CodedOutputStream::WriteVarint64ToArray(length, end);
  out.append(reinterpret_cast<const char*>(head), static_cast<size_t>(end - head));
}

// The answer to a native request from its completion, or the status refusing it (the
// batcher's error; an answer over the message limit, in the words of the server behind).
// The outputs' bytes are listed in `raw` (in the answer's order), not copied into `response`.
grpc::Status build_answer(const NativeRequest& r, const Completion& c, int max_message_bytes,
                          inference::ModelInferResponse* response, std::vector<RawOutput>* raw) {
  if (c.code != ErrorCode::kOk) return grpc::Status(grpc_code_for(c.code), c.message);
  try {
    response->set_model_name(r.model->name);
    response->set_model_version(std::to_string(r.model->version));
    response->set_id(r.id);
    if (!r.rollout.empty()) (*response->mutable_parameters())["rollout"].set_string_param(r.rollout);
    const std::vector<TensorSpec>& specs = r.model->batcher->options().outputs;
    for (int index : r.outputs) {
      const Tensor& t = c.outputs->tensors[static_cast<size_t>(index)];
      const auto [shape, src, nbytes] = output_rows(t, c);
      inference::ModelInferResponse::InferOutputTensor* out = response->add_outputs();
      out->set_name(specs[static_cast<size_t>(index)].name);
      out->set_datatype(dtype_name(t.dtype));
      for (int d = 0; d < shape.ndim(); ++d) out->add_shape(shape[d]);
      raw->push_back({src, nbytes});
    }
  } catch (const std::exception& e) {
    return grpc::Status(grpc::StatusCode::INTERNAL, std::string("internal error: ") + e.what());
  }
  size_t size = response->ByteSizeLong();
  for (const RawOutput& o : *raw) size += field_bytes(kRawOutputContentsField, o.bytes);
  if (size > static_cast<size_t>(max_message_bytes)) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "model '" + r.model->name + "': the response is " + std::to_string(size) +
                            " bytes, over the server's gRPC message limit of " + std::to_string(max_message_bytes) +
                            " bytes (--grpc-max-message-bytes): send fewer rows (or a shorter request id) per "
                            "request, or start the server with a larger limit");
  }
  return grpc::Status::OK;
}

// Outputs of at least this many bytes are sent from the batch's own memory; smaller ones
// are copied into the answer, which costs less than a slice of their own.
constexpr size_t kReferencedOutputBytes = 16 * 1024;

// A slice that owns `bytes` (moved, not copied).
grpc::Slice owning_slice(std::string&& bytes) {
  auto* kept = new std::string(std::move(bytes));
  return grpc::Slice(kept->data(), kept->size(), [](void* p) { delete static_cast<std::string*>(p); }, kept);
}

// A slice viewing `o` in the batch outputs, which it keeps alive until gRPC has sent it.
grpc::Slice output_slice(const RawOutput& o, const std::shared_ptr<const BatchOutputs>& outputs) {
  auto* kept = new std::shared_ptr<const BatchOutputs>(outputs);
  return grpc::Slice(
      const_cast<uint8_t*>(o.data), o.bytes,
      [](void* p) { delete static_cast<std::shared_ptr<const BatchOutputs>*>(p); }, kept);
}

// A native ModelInfer request's answer into `out`: the bytes protobuf would write for it,
// without copying large outputs. The response without its raw outputs is serialized by
// protobuf; each raw_output_contents field follows, its tag and length written here and
// its bytes viewed where the batch left them. `in_stream`: wrapped as the infer_response
// of a ModelStreamInferResponse (field 2, its only one when the request succeeded). Else
// the status refusing it (build_answer).
grpc::Status serialize_answer(const NativeRequest& r, const Completion& c, int max_message_bytes, bool in_stream,
                              ByteBuffer* out) {
  inference::ModelInferResponse response;
  std::vector<RawOutput> raw;
  grpc::Status status = build_answer(r, c, max_message_bytes, &response, &raw);
  if (!status.ok()) return status;
  try {
    std::string head = response.SerializeAsString();
    std::vector<grpc::Slice> slices;
    for (const RawOutput& o : raw) {
      append_field_head(head, kRawOutputContentsField, o.bytes);
      if (o.bytes < kReferencedOutputBytes) {
        head.append(reinterpret_cast<const char*>(o.data), o.bytes);
        continue;
      }
      slices.push_back(owning_slice(std::move(head)));
      head.clear();
      slices.push_back(output_slice(o, c.outputs));
    }
    if (!head.empty()) slices.push_back(owning_slice(std::move(head)));
    if (in_stream) {
      size_t inner = 0;
      for (const grpc::Slice& slice : slices) inner += slice.size();
      std::string prefix;
      append_field_head(prefix, inference::ModelStreamInferResponse::kInferResponseFieldNumber, inner);
      slices.insert(slices.begin(), owning_slice(std::move(prefix)));
    }
    *out = ByteBuffer(slices.data(), slices.size());
  } catch (const std::exception& e) {
    return grpc::Status(grpc::StatusCode::INTERNAL, std::string("internal error: ") + e.what());
  }
  return grpc::Status::OK;
}

// `bytes` decoded as a `Message`; false when they are not one.
template <typename Message>
bool decode(const ByteBuffer& bytes, Message* message) {
  ByteBuffer copy(bytes);  // shares the slices; Deserialize consumes what it is given
  return grpc::SerializationTraits<Message>::Deserialize(&copy, message).ok();
}

template <typename Message>
std::string serialized(const Message& message) {
  std::string out;
  message.SerializeToString(&out);
  return out;
}

// The model a ModelReady, ModelMetadata or ModelConfig request names, when this front end
// serves the version it names (none: the one served); else null.
template <typename Request>
std::shared_ptr<const FrontendModel> named_model(const GrpcFrontend::Core& core, const ByteBuffer& bytes) {
  Request request;
  if (!decode(bytes, &request)) return nullptr;
  std::shared_ptr<const FrontendModel> model = core.models.find(request.name());
  if (model && !request.version().empty() && request.version() != std::to_string(model->version)) return nullptr;
  return model;
}

// The answer to a health or metadata call as the server behind answers it, into `out`;
// false when the server behind must answer (a call of another method, a request it would
// refuse or reads differently, a model not served here, a server not ready or draining).
bool health_or_metadata_answer(const GrpcFrontend::Core& core, const grpc::GenericCallbackServerContext* ctx,
                               const ByteBuffer& bytes, std::string* out) {
  if (!core.started.load(std::memory_order_acquire) || core.draining.load(std::memory_order_relaxed)) return false;
  const std::string_view method = ctx->method();
  const bool ready = core.server_ready.load(std::memory_order_acquire);
  if (method == kServerLive) {
    inference::ServerLiveRequest request;
    if (!decode(bytes, &request)) return false;
    inference::ServerLiveResponse response;
    response.set_live(true);
    *out = serialized(response);
    return true;
  }
  if (method == kServerReady) {
    inference::ServerReadyRequest request;
    if (!ready || !decode(bytes, &request)) return false;
    inference::ServerReadyResponse response;
    response.set_ready(true);
    *out = serialized(response);
    return true;
  }
  if (method == kHealthCheck) {
    if (!ready) return false;
    grpc::Slice slice;
    if (!bytes.DumpToSingleSlice(&slice).ok()) return false;
    const std::string_view request(reinterpret_cast<const char*>(slice.begin()), slice.size());
    std::lock_guard<std::mutex> lock(core.answers_mu);
    for (const std::string& known : core.answers.health_check_requests) {
      if (request == known) {
        *out = core.answers.health_serving;
        return true;
      }
    }
    return false;
  }
  if (!core.authorized(ctx)) return false;
  if (method == kServerMetadata) {
    inference::ServerMetadataRequest request;
    if (!decode(bytes, &request)) return false;
    std::lock_guard<std::mutex> lock(core.answers_mu);
    *out = core.answers.server_metadata;
    return !out->empty();
  }
  if (method == kModelReady) {
    if (!named_model<inference::ModelReadyRequest>(core, bytes)) return false;
    inference::ModelReadyResponse response;
    response.set_ready(true);
    *out = serialized(response);
    return true;
  }
  if (method == kModelMetadata) {
    std::shared_ptr<const FrontendModel> model = named_model<inference::ModelMetadataRequest>(core, bytes);
    if (!model || model->metadata.empty()) return false;
    *out = model->metadata;
    return true;
  }
  if (method == kModelConfig) {
    std::shared_ptr<const FrontendModel> model = named_model<inference::ModelConfigRequest>(core, bytes);
    if (!model || model->config.empty()) return false;
    *out = model->config;
    return true;
  }
  return false;
}

// Counts the request on its model once its batcher took it (a refusal the caller answers
// here is counted by the caller).
void submit_native(NativeRequest& r, std::shared_ptr<CompletionSink> sink, uint64_t* batcher_id) {
  // The tensors view the decoded message, which nothing else reads: lent to the batch.
  *batcher_id = r.model->batcher->submit(std::move(r.tensors), std::move(sink),
                                         static_cast<int>(std::min<int64_t>(r.priority, INT32_MAX)),
                                         r.timeout_us > 0 ? r.timeout_us : -1, r.mirror_tag, /*inputs_lent=*/true);
  r.model->count(!r.message->model_version().empty());
}

// One call on the public port (ModelStreamInfer aside: StreamCall). Its first message is
// read first: a ModelInfer request this front end serves goes to the model's batcher and is
// answered from its completion, a health or metadata call it can answer is answered at once;
// any other call is relayed to the server behind, message by message in both directions.
//
// Lifetime: gRPC owns the server half (OnDone is its last callback); the relayed client
// half (OnDone likewise) holds a reference of its own. The object is deleted when both are done.
class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(GrpcFrontend::Core* core, grpc::GenericCallbackServerContext* ctx) : core_(core), ctx_(ctx) {
    // Every call's first message is read before anything else: then OnReadDone decides
    // (a ModelInfer served here, or relayed), and a call reset before its first message
    // (a rapid-reset flood) costs no call behind.
    StartRead(&down_message_);
  }

  void OnReadDone(bool ok) override {
    if (!decided_) {
      decided_ = true;
      if (!ok && ctx_->IsCancelled()) {
        Finish(grpc::Status::CANCELLED);
        return;
      }
      if (ok && (ctx_->method() == kModelInfer ? serve_natively() : answer_here())) return;
      relay(/*have_first=*/ok);
      return;
    }
    // Relaying: the client's next message goes up, or the end of its stream.
    std::lock_guard<std::mutex> lock(mu_);
    down_reading_ = false;
    if (!write_hold_) return;  // the call behind takes no more messages
    if (ok) {
      up_->StartWrite(&down_message_);
    } else {
      up_->StartWritesDone();
      drop_write_hold();
    }
  }

  void OnWriteDone(bool ok) override {
    if (native_) return;  // the answer's write was its last operation: OnDone follows
    std::unique_lock<std::mutex> lock(mu_);
    down_writing_ = false;
    if (up_done_) {
      finish_relayed(lock);
    } else if (ok) {
      up_->StartRead(&up_message_);  // the read hold is held: only the end of the answers drops it
    } else {
      up_->context.TryCancel();  // the client is gone: no more answers are read
      drop_read_hold();
    }
  }

  void OnCancel() override {
    uint64_t queued = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      if (up_ && !up_done_) up_->context.TryCancel();
      queued = batcher_id_;
    }
    // A native call still queued leaves the queue (counted cancelled) and is answered
    // CANCELLED at once. gRPC runs no OnDone while OnCancel runs, so this call outlives it.
    if (queued != 0) request_.model->batcher->cancel(queued);
  }

  void OnDone() override { release(); }

  // A native call's completion (on the batcher's thread).
  void answer(const Completion& c) {
    core_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    const grpc::Status status = serialize_answer(request_, c, core_->options.max_message_bytes, false, &answer_);
    if (!status.ok()) {
      Finish(status);
      return;
    }
    StartWriteAndFinish(&answer_, grpc::WriteOptions(), grpc::Status::OK);
  }

 private:
  // The relayed half: a call to the server behind carrying this call's messages.
  struct Upstream final : grpc::ClientBidiReactor<ByteBuffer, ByteBuffer> {
    explicit Upstream(Call* owner) : call(owner) {}
    void OnReadDone(bool ok) override { call->on_up_read(ok); }
    void OnWriteDone(bool ok) override { call->on_up_write(ok); }
    void OnDone(const grpc::Status& s) override { call->on_up_done(s); }
    Call* call;
    grpc::ClientContext context;
  };

  // Sinks a native request's completion into its call.
  struct Answer final : CompletionSink {
    explicit Answer(Call* owner) : call(owner) {}
    void deliver(std::vector<Completion>&& completions) override {
      for (const Completion& c : completions) call->answer(c);
    }
    Call* call;
  };

  // Decodes the ModelInfer request read and submits it to its model's batcher; false
  // (nothing started) when the request is not one this front end serves.
  bool serve_natively() {
    if (core_->draining.load(std::memory_order_relaxed) || !core_->authorized(ctx_)) return false;
    if (!decode_native(*core_, down_message_, ctx_->client_metadata(), &request_)) return false;
    native_ = true;
    core_->in_flight.fetch_add(1, std::memory_order_relaxed);
    try {
      // Under mu_: a cancellation arriving meanwhile sees the id (or the id sees it).
      std::unique_lock<std::mutex> lock(mu_);
      submit_native(request_, std::make_shared<Answer>(this), &batcher_id_);
      const bool cancel_now = cancelled_;
      const uint64_t queued = batcher_id_;
      lock.unlock();
      if (cancel_now) request_.model->batcher->cancel(queued);
    } catch (const Error& e) {
      core_->in_flight.fetch_sub(1, std::memory_order_relaxed);
      if (e.code() == ErrorCode::kQueueFull || e.code() == ErrorCode::kOutOfMemory) {
        request_.model->count(!request_.message->model_version().empty());
        Finish(grpc::Status(grpc_code_for(e.code()), e.what()));
        return true;
      }
      // Invalid, or a version swapped out by a reload (its batcher stopping): the server
      // behind words the refusal or serves the version loaded now.
      native_ = false;
      return false;
    }
    return true;
  }

  // Answers a health or metadata call here (health_or_metadata_answer); false (nothing
  // started) when the server behind must.
  bool answer_here() {
    std::string answer;
    if (!health_or_metadata_answer(*core_, ctx_, down_message_, &answer)) return false;
    native_ = true;
    grpc::Slice slice(answer);
    answer_ = ByteBuffer(&slice, 1);
    StartWriteAndFinish(&answer_, grpc::WriteOptions(), grpc::Status::OK);
    return true;
  }

  // Starts relaying this call to the server behind, once its first message is read.
  // have_first: that message goes up first; otherwise the client ended its stream without one.
  //
  // Reads and writes on the call behind are started from this call's callbacks, outside
  // its own: each flow holds it (a gRPC hold) until it starts nothing more, so that it
  // cannot end (OnDone) under an operation about to start. mu_ orders the two flows.
  // (gRPC never runs a client reaction inline, so starting one under mu_ cannot re-enter.)
  void relay(bool have_first) {
    std::unique_lock<std::mutex> lock(mu_);
    up_ = new Upstream(this);
    refs_.fetch_add(1, std::memory_order_relaxed);
    grpc::ClientContext& context = up_->context;
    context.set_deadline(ctx_->deadline());
    for (const auto& [key, value] : ctx_->client_metadata()) {
      const std::string_view name(key.data(), key.size());
      if (relayed_metadata(name)) context.AddMetadata(std::string(name), std::string(value.data(), value.size()));
    }
    core_->upstream->PrepareBidiStreamingCall(&context, std::string(ctx_->method()), grpc::StubOptions(), up_);
    read_hold_ = true;
    write_hold_ = have_first;
    up_->AddMultipleHolds(write_hold_ ? 2 : 1);
    up_->StartRead(&up_message_);
    if (have_first) {
      up_->StartWrite(&down_message_);  // its OnWriteDone reads the client's next message
    } else {
      up_->StartWritesDone();
    }
    up_->StartCall();
  }

  void on_up_write(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!write_hold_) return;
    if (ok) {
      down_reading_ = true;
      StartRead(&down_message_);  // the next message of the client (or its end)
    } else {
      drop_write_hold();  // the call behind ended: its OnDone finishes this one
    }
  }

  void on_up_read(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    if (ok) {
      down_writing_ = true;
      StartWrite(&up_message_);
      return;
    }
    // The end of its answers: the status follows. A client that keeps its stream open
    // may never send again, so the read waiting for it must not hold the call behind.
    drop_read_hold();
    if (down_reading_ && write_hold_) drop_write_hold();
  }

  void on_up_done(const grpc::Status& status) {
    std::unique_lock<std::mutex> lock(mu_);
    up_status_ = status;
    up_done_ = true;
    if (!down_writing_) finish_relayed(lock);
  }

  void drop_read_hold() {  // mu_ held
    if (!read_hold_) return;
    read_hold_ = false;
    up_->RemoveHold();
  }

  void drop_write_hold() {  // mu_ held
    if (!write_hold_) return;
    write_hold_ = false;
    up_->RemoveHold();
  }

  // The call behind ended and no answer is being written: end this call with its status. mu_ held.
  void finish_relayed(std::unique_lock<std::mutex>& lock) {
    if (finished_) return;
    finished_ = true;
    for (const auto& [key, value] : up_->context.GetServerTrailingMetadata()) {
      const std::string_view name(key.data(), key.size());
      if (relayed_metadata(name)) ctx_->AddTrailingMetadata(std::string(name), std::string(value.data(), value.size()));
    }
    grpc::Status status = up_status_;
    lock.unlock();
    release();     // the relayed half is done (its OnDone has run)
    Finish(status);  // may run this call's OnDone inline, which may delete it: the last use of this
  }

  void release() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      delete up_;
      delete this;
    }
  }

  GrpcFrontend::Core* core_;
  grpc::GenericCallbackServerContext* ctx_;
  ByteBuffer down_message_;  // the client's message being read or relayed
  ByteBuffer up_message_;    // the answer of the server behind being relayed
  ByteBuffer answer_;        // a native call's answer
  bool decided_ = false;
  bool native_ = false;
  Upstream* up_ = nullptr;
  std::atomic<int> refs_{1};
  std::mutex mu_;
  bool read_hold_ = false;     // guarded by mu_: the answers' flow holds the call behind
  bool write_hold_ = false;    // guarded by mu_: the client messages' flow holds it
  bool down_reading_ = false;  // guarded by mu_: a read of the client's next message is under way
  bool down_writing_ = false;  // guarded by mu_: an answer is being written to the client
  bool up_done_ = false;       // guarded by mu_: the call behind has ended (up_status_ is its status)
  bool finished_ = false;      // guarded by mu_
  grpc::Status up_status_;     // guarded by mu_
  bool cancelled_ = false;      // guarded by mu_: the client cancelled the call
  uint64_t batcher_id_ = 0;    // guarded by mu_: a native call's request in its batcher (0: none)
  NativeRequest request_;  // a native call's request
};

// A ModelStreamInfer call: each request of the stream is answered on it, in the order the
// answers come, as the server behind answers a stream. A request this front end serves goes
// to its batcher; any other is sent behind as a ModelInfer call of its own (with the
// stream's metadata and deadline), and its answer, or its refusal as the request's error,
// comes back on the stream. At most kStreamMaxInFlight requests of a stream are running or
// waiting to be written: past that the stream is not read, and gRPC's flow control holds
// the client back. Once the client ends its stream and every answer is written, the call
// ends OK.
class StreamCall final : public grpc::ServerGenericBidiReactor {
 public:
  static constexpr size_t kStreamMaxInFlight = 128;  // as the server behind (STREAM_MAX_IN_FLIGHT)

  StreamCall(GrpcFrontend::Core* core, grpc::GenericCallbackServerContext* ctx) : core_(core), ctx_(ctx) {
    core_->in_flight.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    read_next();
  }

  void OnReadDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    reading_ = false;
    if (!ok || cancelled_) {
      client_done_ = true;
      maybe_finish(lock);
      return;
    }
    ByteBuffer message = std::move(incoming_);
    ++running_;
    lock.unlock();
    NativeRequest request;
    const bool native = !core_->draining.load(std::memory_order_relaxed) &&
                        decode_native(*core_, message, ctx_->client_metadata(), &request);
    std::shared_ptr<inference::ModelInferRequest> decoded = request.message;
    if (!native || !submit(std::move(request))) relay(std::move(message), std::move(decoded));
    lock.lock();
    read_next();
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    queued_.pop_front();
    if (!ok) {  // the client is gone: nothing more can be written
      broken_ = true;
      queued_.clear();
    } else if (!queued_.empty()) {
      writing_ = true;
      StartWrite(&queued_.front());
    }
    read_next();
    maybe_finish(lock);
  }

  void OnCancel() override {
    std::vector<std::pair<std::shared_ptr<const FrontendModel>, uint64_t>> queued;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      for (auto& [id, model] : native_) queued.emplace_back(model, id);
      for (auto& relayed : relayed_) relayed->context.TryCancel();
    }
    // gRPC runs no OnDone while OnCancel runs, and the call waits for every answer first.
    for (auto& [model, id] : queued) model->batcher->cancel(id);
  }

  void OnDone() override {
    core_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    delete this;
  }

 private:
  // A native request's completion (on the batcher's thread).
  struct Answer final : CompletionSink {
    Answer(StreamCall* owner, NativeRequest r) : call(owner), request(std::move(r)) {}
    void deliver(std::vector<Completion>&& completions) override {
      for (const Completion& c : completions) call->answered(*this, c);
    }
    StreamCall* call;
    NativeRequest request;
    uint64_t batcher_id = 0;
  };

  // A request sent behind as a ModelInfer call of its own.
  struct Relayed {
    grpc::ClientContext context;
    ByteBuffer request, response;
    std::shared_ptr<inference::ModelInferRequest> message;  // null: not a ModelInferRequest
  };

  // Reads the client's next request unless a read is under way, the stream is over, or
  // kStreamMaxInFlight of its requests are running or waiting to be written. mu_ held.
  void read_next() {
    if (reading_ || client_done_ || cancelled_ || broken_ || running_ + queued_.size() >= kStreamMaxInFlight) return;
    reading_ = true;
    StartRead(&incoming_);
  }

  // Submits a decoded request; false when its batcher refuses it (a full queue too): the
  // server behind then answers it, in its words.
  bool submit(NativeRequest request) {
    // The answer holds the request before the batcher may complete it; its batcher id is
    // set under mu_, which the completion takes before it reads the id.
    auto answer = std::make_shared<Answer>(this, std::move(request));
    bool cancel_now = false;
    try {
      std::lock_guard<std::mutex> lock(mu_);
      submit_native(answer->request, answer, &answer->batcher_id);
      native_.emplace(answer->batcher_id, answer->request.model);
      cancel_now = cancelled_;  // OnCancel ran before this request reached native_
    } catch (const Error&) {
      return false;
    }
    if (cancel_now) answer->request.model->batcher->cancel(answer->batcher_id);
    return true;
  }

  void answered(Answer& a, const Completion& c) {
    ByteBuffer bytes;
    const grpc::Status status = serialize_answer(a.request, c, core_->options.max_message_bytes, true, &bytes);
    bool written = status.ok();
    if (!written) {
      inference::ModelStreamInferResponse answer;
      failed(status.error_message(), a.request.message.get(), &answer);
      written = serialize(answer, &bytes);
    }
    std::unique_lock<std::mutex> lock(mu_);
    native_.erase(a.batcher_id);
    finished_one(written ? &bytes : nullptr, lock);
  }

  void relay(ByteBuffer message, std::shared_ptr<inference::ModelInferRequest> decoded) {
    auto* relayed = new Relayed;
    relayed->request = std::move(message);
    relayed->message = std::move(decoded);
    if (!relayed->message) {  // decode_native stopped before parsing, or it is not a ModelInferRequest
      auto parsed = std::make_shared<inference::ModelInferRequest>();
      ByteBuffer copy(relayed->request);
      if (grpc::SerializationTraits<inference::ModelInferRequest>::Deserialize(&copy, parsed.get()).ok()) {
        relayed->message = std::move(parsed);
      }
    }
    relayed->context.set_deadline(ctx_->deadline());
    for (const auto& [key, value] : ctx_->client_metadata()) {
      const std::string_view name(key.data(), key.size());
      if (relayed_metadata(name)) {
        relayed->context.AddMetadata(std::string(name), std::string(value.data(), value.size()));
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      relayed_.insert(relayed);
      if (cancelled_) relayed->context.TryCancel();
    }
    core_->upstream->UnaryCall(&relayed->context, std::string(kModelInfer), grpc::StubOptions(), &relayed->request,
                               &relayed->response, [this, relayed](grpc::Status status) {
                                 relayed_done(relayed, status);
                               });
  }

  void relayed_done(Relayed* relayed, const grpc::Status& status) {
    inference::ModelStreamInferResponse answer;
    bool ok = status.ok();
    if (ok) {
      ok = grpc::SerializationTraits<inference::ModelInferResponse>::Deserialize(&relayed->response,
                                                                                 answer.mutable_infer_response())
               .ok();
    }
    if (!ok) {
      answer.Clear();
      failed(status.ok() ? std::string("the answer could not be read") : status.error_message(), relayed->message.get(),
             &answer);
    }
    std::unique_lock<std::mutex> lock(mu_);
    relayed_.erase(relayed);
    delete relayed;
    finished_one(std::move(answer), lock);
  }

  // A request's error, answered as the server behind answers it on a stream: the message,
  // and (when the request could be read) its model, version and id.
  void failed(const std::string& message, const inference::ModelInferRequest* request,
              inference::ModelStreamInferResponse* answer) {
    answer->set_error_message(message);
    if (request == nullptr) return;
    inference::ModelInferResponse* r = answer->mutable_infer_response();
    r->set_model_name(request->model_name());
    r->set_model_version(request->model_version());
    r->set_id(request->id());
    if (answer->ByteSizeLong() > static_cast<size_t>(core_->options.max_message_bytes)) r->clear_id();
  }

  static bool serialize(const inference::ModelStreamInferResponse& answer, ByteBuffer* bytes) {
    bool own = false;
    return grpc::SerializationTraits<inference::ModelStreamInferResponse>::Serialize(answer, bytes, &own).ok();
  }

  // One request answered: its answer's bytes (null: none could be made) join the writes. mu_ held.
  void finished_one(ByteBuffer* bytes, std::unique_lock<std::mutex>& lock) {
    --running_;
    if (!broken_ && bytes != nullptr) {
      queued_.push_back(std::move(*bytes));
      if (!writing_) {
        writing_ = true;
        StartWrite(&queued_.front());
      }
    }
    read_next();
    maybe_finish(lock);
  }

  void finished_one(inference::ModelStreamInferResponse&& answer, std::unique_lock<std::mutex>& lock) {
    ByteBuffer bytes;
    finished_one(serialize(answer, &bytes) ? &bytes : nullptr, lock);
  }

  // Ends the call once the client's stream has ended (or the call is cancelled or broken)
  // and every answer is in and written. mu_ held.
  void maybe_finish(std::unique_lock<std::mutex>& lock) {
    if (finished_ || running_ != 0 || writing_ || !queued_.empty()) return;
    if (!client_done_ && !cancelled_ && !broken_) return;
    finished_ = true;
    const grpc::Status status =
        cancelled_ ? grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled") : grpc::Status::OK;
    lock.unlock();
    Finish(status);  // may run OnDone inline, which deletes this: the last use of it
  }

  GrpcFrontend::Core* core_;
  grpc::GenericCallbackServerContext* ctx_;
  std::mutex mu_;
  ByteBuffer incoming_;                                   // the request being read
  std::deque<ByteBuffer> queued_;                         // guarded by mu_: answers to write, the first being written
  std::unordered_map<uint64_t, std::shared_ptr<const FrontendModel>> native_;  // guarded by mu_: in batchers
  std::unordered_set<Relayed*> relayed_;                  // guarded by mu_: sent behind, unanswered
  size_t running_ = 0;                                    // guarded by mu_: requests read, not yet answered
  bool reading_ = false, writing_ = false;                // guarded by mu_
  bool client_done_ = false, cancelled_ = false, broken_ = false, finished_ = false;  // guarded by mu_
};

class Service final : public grpc::CallbackGenericService {
 public:
  explicit Service(GrpcFrontend::Core* core) : core_(core) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    // A stream is answered here unless the key it needs is missing: then the server behind
    // refuses the whole call, as it would.
    if (ctx->method() == kModelStreamInfer && core_->authorized(ctx)) return new StreamCall(core_, ctx);
    return new Call(core_, ctx);
  }

 private:
  GrpcFrontend::Core* core_;
};

}  // namespace

GrpcFrontend::GrpcFrontend(GrpcFrontendOptions options) : core_(std::make_shared<Core>(std::move(options))) {
  // abseil built without NDEBUG (as Debian ships it) records the order of every pair of
  // Mutexes gRPC takes, to abort the process on an inversion: a debugging aid that cost
  // 4-17 % of the server's CPU per call (tiny, c=32; bench/README.md). A server keeps running
  // instead, as release builds do.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  Core& core = *core_;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // the server behind and this one hold the limits
  args.SetMaxSendMessageSize(-1);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  args.SetInt(GRPC_ARG_CLIENT_IDLE_TIMEOUT_MS, INT_MAX);  // one connection for the server's life
  auto channel = grpc::CreateCustomChannel(core.options.fallback_target, grpc::InsecureChannelCredentials(), args);
  // Connected now (the server behind listens already), not by the first call relayed.
  channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10));
  core.upstream = std::make_unique<grpc::GenericStub>(channel);
  core.service = std::make_unique<Service>(&core);

  grpc::ServerBuilder builder;
  const std::string& host = core.options.host;
  const std::string address = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
                              std::to_string(core.options.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &core.bound_port);
  builder.SetMaxReceiveMessageSize(core.options.max_message_bytes);
  builder.SetMaxSendMessageSize(core.options.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a taken port fails instead of being shared
  builder.RegisterCallbackGenericService(core.service.get());
  core.server = builder.BuildAndStart();
  if (!core.server || core.bound_port == 0) {
    throw Error(ErrorCode::kUnavailable,
                "[grpc] cannot listen for gRPC on " + address + ": the port is in use or the address is not local");
  }
}

GrpcFrontend::~GrpcFrontend() { stop(); }

int GrpcFrontend::port() const noexcept { return core_->bound_port; }

void GrpcFrontend::add_model(FrontendModel model) { core_->models.add(std::move(model), "[grpc]"); }

void GrpcFrontend::remove_model(const std::string& name) { core_->models.remove(name); }

void GrpcFrontend::serve_health(GrpcServerAnswers answers) {
  {
    std::lock_guard<std::mutex> lock(core_->answers_mu);
    core_->answers = std::move(answers);
  }
  core_->started.store(true, std::memory_order_release);
}

void GrpcFrontend::set_ready(bool ready) { core_->server_ready.store(ready, std::memory_order_release); }

void GrpcFrontend::drain() { core_->draining.store(true, std::memory_order_relaxed); }

size_t GrpcFrontend::in_flight() const { return core_->in_flight.load(std::memory_order_relaxed); }

void GrpcFrontend::stop(int64_t grace_ms) {
  std::lock_guard<std::mutex> lock(core_->stop_mu);
  if (core_->stopped) return;
  core_->stopped = true;
  core_->draining.store(true, std::memory_order_relaxed);
  core_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms));
  core_->server->Wait();
}

}  // namespace conveyor
