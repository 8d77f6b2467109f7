// The native gRPC front end: ModelInfer answered from a batcher, every other call relayed
// to a server behind (here a C++ stand-in), streams and early ends included. Built when
// gRPC C++ is; run under AddressSanitizer (gRPC's own synchronisation is not visible to
// ThreadSanitizer, which would report its hand-offs).
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "doubling_model.h"
#include "conveyor/batcher.h"
#include "conveyor/grpc_frontend.h"
#include "conveyor/protocol/grpc/inference.pb.h"

using namespace conveyor;

namespace {

using grpc::ByteBuffer;

using testing::doubled;
using testing::doubling_model_options;

ByteBuffer bytes_of(const std::string& text) {
  grpc::Slice slice(text);
  return ByteBuffer(&slice, 1);
}

std::string text_of(const ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// The server behind, standing for the Python one. "/test.Echo/Stream" answers each message
// with "echo: <message>" until the client ends its stream; "/test.Echo/Fail" reads one
// message and ends the call FAILED_PRECONDITION while the client's stream is still open;
// any other method answers its one message with "behind: <method> <message> <x-test
// metadata>", the trailing metadata x-trailer: yes, and OK (FAILED_PRECONDITION when the
// x-test metadata is "refuse").
class BehindServer {
 public:
  BehindServer() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterCallbackGenericService(&service_);
    server_ = builder.BuildAndStart();
  }
  ~BehindServer() { server_->Shutdown(); }
  int port() const { return port_; }
  int calls() const { return service_.calls.load(); }

 private:
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    explicit Reactor(grpc::GenericCallbackServerContext* ctx) : ctx_(ctx) { StartRead(&in_); }
    void OnReadDone(bool ok) override {
      const std::string method = ctx_->method();
      if (method == "/test.Echo/Stream") {
        if (!ok) {
          Finish(grpc::Status::OK);
          return;
        }
        out_ = bytes_of("echo: " + text_of(in_));
        StartWrite(&out_);
        return;
      }
      if (!ok) {
        Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no message"));
        return;
      }
      if (method == "/test.Echo/Fail") {
        Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "behind refused it"));
        return;
      }
      std::string tag;
      auto it = ctx_->client_metadata().find("x-test");
      if (it != ctx_->client_metadata().end()) tag.assign(it->second.data(), it->second.size());
      if (tag == "refuse") {
        Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "behind refused it"));
        return;
      }
      ctx_->AddTrailingMetadata("x-trailer", "yes");
      out_ = bytes_of("behind: " + method + " " + text_of(in_) + " " + tag);
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    }
    void OnWriteDone(bool ok) override {
      if (ok) StartRead(&in_);  // streams only: the unary answer was the last write
    }
    void OnDone() override { delete this; }

   private:
    grpc::GenericCallbackServerContext* ctx_;
    ByteBuffer in_, out_;
  };

  struct Service final : grpc::CallbackGenericService {
    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
      calls.fetch_add(1);
      return new Reactor(ctx);
    }
    std::atomic<int> calls{0};
  };

  Service service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

struct Answer {
  grpc::Status status;
  std::string body;
  std::string trailer;
};

// One unary call of `method` carrying `message`, waited for.
Answer call(grpc::GenericStub& stub, const std::string& method, const std::string& message,
            const std::string& tag = "", std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  if (!tag.empty()) context.AddMetadata("x-test", tag);
  ByteBuffer request = bytes_of(message), response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  Answer answer;
  answer.status = done.get_future().get();
  answer.body = text_of(response);
  auto it = context.GetServerTrailingMetadata().find("x-trailer");
  if (it != context.GetServerTrailingMetadata().end()) answer.trailer.assign(it->second.data(), it->second.size());
  return answer;
}

// A client stream whose end a test waits for.
struct WaitedStream : grpc::ClientBidiReactor<ByteBuffer, ByteBuffer> {
  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> lock(mu);
    status = s;
    done = true;
    cv.notify_all();
  }
  grpc::Status wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done; });
    return status;
  }
  grpc::ClientContext context;
  ByteBuffer out, in;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
};

std::string infer_request(const std::string& model, std::vector<float> x, const std::string& id = "") {
  inference::ModelInferRequest request;
  request.set_model_name(model);
  request.set_id(id);
  auto* input = request.add_inputs();
  input->set_name("x");
  input->set_datatype("FP32");
  input->add_shape(static_cast<int64_t>(x.size() / 2));
  input->add_shape(2);
  request.add_raw_input_contents(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
  return request.SerializeAsString();
}

struct Setup {
  BehindServer behind;
  std::shared_ptr<Batcher> batcher = std::make_shared<Batcher>(doubling_model_options(), doubled, MemoryPool::default_host());
  std::unique_ptr<GrpcFrontend> frontend;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;

  Setup() {
    GrpcFrontendOptions options;
    options.fallback_target = "127.0.0.1:" + std::to_string(behind.port());
    frontend = std::make_unique<GrpcFrontend>(options);
    frontend->add_model({"double", 1, batcher, {}, {}, {}, {}});
    channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(frontend->port()), grpc::InsecureChannelCredentials());
    stub = std::make_unique<grpc::GenericStub>(channel);
  }
  ~Setup() {
    stub.reset();
    channel.reset();
    frontend->stop();
    batcher->stop(true);
  }
};

constexpr const char* kModelInfer = "/inference.GRPCInferenceService/ModelInfer";

}  // namespace

TEST_CASE("grpc_frontend: ModelInfer is answered from the batcher, with the request's id") {
  Setup s;
  Answer a = call(*s.stub, kModelInfer, infer_request("double", {1, -2}, "r-1"));
  CHECK(a.status.ok());
  inference::ModelInferResponse response;
  CHECK(response.ParseFromString(a.body));
  CHECK_EQ(response.model_name(), std::string("double"));
  CHECK_EQ(response.model_version(), std::string("1"));
  CHECK_EQ(response.id(), std::string("r-1"));
  CHECK_EQ(response.outputs_size(), 1);
  CHECK_EQ(response.outputs(0).name(), std::string("y"));
  CHECK_EQ(response.outputs(0).shape_size(), 2);
  CHECK_EQ(response.raw_output_contents_size(), 1);
  if (response.raw_output_contents_size() == 1 && response.raw_output_contents(0).size() == 8) {
    float y[2];
    std::memcpy(y, response.raw_output_contents(0).data(), sizeof y);
    CHECK_EQ(y[0], 2.0f);
    CHECK_EQ(y[1], -4.0f);
  }
  CHECK_EQ(s.behind.calls(), 0);
  // Without an id it gets one: 32 hex digits.
  Answer b = call(*s.stub, kModelInfer, infer_request("double", {1, 2}));
  CHECK(response.ParseFromString(b.body));
  CHECK_EQ(response.id().size(), size_t{32});
}

TEST_CASE("grpc_frontend: a large output is sent from the batch's memory, in the bytes protobuf writes") {
  // "wide": x FP32 [8192] -> y = 2x (32 KiB a row: sent from the batch) and s = the row's sum
  // (4 bytes a row: copied), in that order.
  constexpr int64_t kWidth = 8192;
  BatcherOptions options;
  options.model_name = "wide";
  options.inputs = {{"x", DType::kFloat32, {kWidth}}};
  options.outputs = {{"y", DType::kFloat32, {kWidth}}, {"s", DType::kFloat32, {1}}};
  options.max_batch_size = 4;
  auto wide = [](const Batch& batch) {
    const Tensor& x = batch.inputs[0];
    const int64_t rows = x.shape[0];
    Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
    Tensor sum = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, Shape{rows, 1});
    const auto* in = static_cast<const float*>(x.data);
    for (int64_t r = 0; r < rows; ++r) {
      float total = 0;
      for (int64_t i = 0; i < kWidth; ++i) {
        static_cast<float*>(y.data)[r * kWidth + i] = 2 * in[r * kWidth + i];
        total += in[r * kWidth + i];
      }
      static_cast<float*>(sum.data)[r] = total;
    }
    return std::vector<Tensor>{y, sum};
  };
  BehindServer behind;
  auto batcher = std::make_shared<Batcher>(options, wide, MemoryPool::default_host());
  GrpcFrontendOptions frontend_options;
  frontend_options.fallback_target = "127.0.0.1:" + std::to_string(behind.port());
  GrpcFrontend frontend(frontend_options);
  frontend.add_model({"wide", 1, batcher, {}, {}, {}, {}});
  {
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(frontend.port()), grpc::InsecureChannelCredentials());
    grpc::GenericStub stub(channel);
    // A request for "wide" carrying `x` ([rows, kWidth]).
    auto wide_request = [&](const std::vector<float>& x, const std::string& id) {
      inference::ModelInferRequest request;
      request.set_model_name("wide");
      request.set_id(id);
      auto* input = request.add_inputs();
      input->set_name("x");
      input->set_datatype("FP32");
      input->add_shape(static_cast<int64_t>(x.size()) / kWidth);
      input->add_shape(kWidth);
      request.add_raw_input_contents(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
      return request.SerializeAsString();
    };
    for (int64_t rows : {1, 3}) {
      std::vector<float> x(static_cast<size_t>(rows * kWidth));
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 97) - 48.0f;
      Answer a = call(stub, kModelInfer, wide_request(x, "r-" + std::to_string(rows)));
      CHECK(a.status.ok());
      inference::ModelInferResponse response;
      CHECK(response.ParseFromString(a.body));
      CHECK_EQ(a.body, response.SerializeAsString());  // byte for byte what protobuf writes
      CHECK_EQ(response.id(), "r-" + std::to_string(rows));
      CHECK_EQ(response.outputs_size(), 2);
      CHECK_EQ(response.raw_output_contents_size(), 2);
      if (response.raw_output_contents_size() != 2) continue;
      const std::string& y = response.raw_output_contents(0);
      const std::string& sums = response.raw_output_contents(1);
      CHECK_EQ(y.size(), x.size() * sizeof(float));
      CHECK_EQ(sums.size(), static_cast<size_t>(rows) * sizeof(float));
      if (y.size() != x.size() * sizeof(float) || sums.size() != static_cast<size_t>(rows) * sizeof(float)) continue;
      bool doubled_all = true;
      for (size_t i = 0; i < x.size(); ++i) {
        float v;
        std::memcpy(&v, y.data() + i * sizeof(float), sizeof v);
        doubled_all = doubled_all && v == 2 * x[i];
      }
      CHECK(doubled_all);
      for (int64_t r = 0; r < rows; ++r) {
        float total = 0, answered;
        for (int64_t i = 0; i < kWidth; ++i) total += x[static_cast<size_t>(r * kWidth + i)];
        std::memcpy(&answered, sums.data() + r * sizeof(float), sizeof answered);
        CHECK_EQ(answered, total);
      }
    }
    // On a stream, the same answer is the infer_response of a ModelStreamInferResponse.
    struct OneOnStream final : WaitedStream {
      void start(grpc::GenericStub& stub, const std::string& message) {
        stub.PrepareBidiStreamingCall(&context, "/inference.GRPCInferenceService/ModelStreamInfer",
                                      grpc::StubOptions(), this);
        out = bytes_of(message);
        StartWrite(&out);
        StartRead(&in);
        StartCall();
      }
      void OnWriteDone(bool ok) override {
        if (ok) StartWritesDone();
      }
      void OnReadDone(bool ok) override {
        if (!ok) return;
        got.push_back(text_of(in));
        StartRead(&in);
      }
      std::vector<std::string> got;
    };
    std::vector<float> x(static_cast<size_t>(2 * kWidth), 0.5f);
    OneOnStream streamed;
    streamed.start(stub, wide_request(x, ""));
    CHECK(streamed.wait().ok());
    CHECK_EQ(streamed.got.size(), size_t{1});
    if (streamed.got.size() == 1) {
      inference::ModelStreamInferResponse answer;
      CHECK(answer.ParseFromString(streamed.got[0]));
      CHECK_EQ(streamed.got[0], answer.SerializeAsString());
      CHECK(answer.error_message().empty());
      CHECK_EQ(answer.infer_response().raw_output_contents_size(), 2);
      if (answer.infer_response().raw_output_contents_size() == 2) {
        const std::string& y = answer.infer_response().raw_output_contents(0);
        CHECK_EQ(y.size(), x.size() * sizeof(float));
        float first = 0, sum = 0;
        if (y.size() >= sizeof first) std::memcpy(&first, y.data(), sizeof first);
        std::memcpy(&sum, answer.infer_response().raw_output_contents(1).data(), sizeof sum);
        CHECK_EQ(first, 1.0f);
        CHECK_EQ(sum, 0.5f * kWidth);
      }
    }
    CHECK_EQ(behind.calls(), 0);
  }
  frontend.stop();
  batcher->stop(true);
}

TEST_CASE("grpc_frontend: other calls, other models and requests it would refuse go behind, metadata and all") {
  Setup s;
  Answer a = call(*s.stub, "/inference.GRPCInferenceService/ServerLive", "ping", "t-1");
  CHECK(a.status.ok());
  CHECK_EQ(a.body, std::string("behind: /inference.GRPCInferenceService/ServerLive ping t-1"));
  CHECK_EQ(a.trailer, std::string("yes"));
  const std::string other = infer_request("other", {1, 2});
  Answer b = call(*s.stub, kModelInfer, other);
  CHECK_EQ(b.body, std::string("behind: ") + kModelInfer + " " + other + " ");
  inference::ModelInferRequest odd;
  odd.ParseFromString(infer_request("double", {1, 2}));
  odd.mutable_inputs(0)->set_datatype("INT32");
  Answer c = call(*s.stub, kModelInfer, odd.SerializeAsString());  // refused by the batcher: behind words it
  CHECK_EQ(c.body.substr(0, 8), std::string("behind: "));
  Answer d = call(*s.stub, kModelInfer, "not a message");
  CHECK_EQ(d.body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(s.behind.calls(), 4);
  s.frontend->remove_model("double");
  Answer e = call(*s.stub, kModelInfer, infer_request("double", {1, 2}));
  CHECK_EQ(e.body.substr(0, 8), std::string("behind: "));
}

TEST_CASE("grpc_frontend: health and metadata are answered here once serving health, readiness while ready") {
  Setup s;
  const std::string service = "/inference.GRPCInferenceService/";
  const std::string live = inference::ServerLiveRequest().SerializeAsString();
  Answer a = call(*s.stub, service + "ServerLive", live);  // not serving health yet: behind
  CHECK_EQ(a.body.substr(0, 8), std::string("behind: "));
  inference::ModelReadyRequest named;
  named.set_name("double");
  const std::string health_request = "\x0a\x07service";  // a HealthCheckRequest naming "service"
  s.frontend->serve_health({"server metadata", {"", health_request}, "serving"});
  s.frontend->add_model({"double", 1, s.batcher, "model metadata", "model config", {}, {}});
  const int relayed = s.behind.calls();

  inference::ServerLiveResponse live_answer;
  a = call(*s.stub, service + "ServerLive", live);
  CHECK(a.status.ok());
  CHECK((live_answer.ParseFromString(a.body) && live_answer.live()));
  CHECK_EQ(call(*s.stub, service + "ServerMetadata", "").body, std::string("server metadata"));
  inference::ModelReadyResponse model_ready;
  CHECK((model_ready.ParseFromString(call(*s.stub, service + "ModelReady", named.SerializeAsString()).body) &&
         model_ready.ready()));
  CHECK_EQ(call(*s.stub, service + "ModelMetadata", named.SerializeAsString()).body, std::string("model metadata"));
  named.set_version("1");
  CHECK_EQ(call(*s.stub, service + "ModelConfig", named.SerializeAsString()).body, std::string("model config"));
  CHECK_EQ(s.behind.calls(), relayed);

  // Not ready: readiness behind. Ready: here, for the health requests it was given only.
  CHECK_EQ(call(*s.stub, service + "ServerReady", "").body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(call(*s.stub, "/grpc.health.v1.Health/Check", "").body.substr(0, 8), std::string("behind: "));
  s.frontend->set_ready(true);
  inference::ServerReadyResponse server_ready;
  CHECK((server_ready.ParseFromString(call(*s.stub, service + "ServerReady", "").body) && server_ready.ready()));
  CHECK_EQ(call(*s.stub, "/grpc.health.v1.Health/Check", "").body, std::string("serving"));
  CHECK_EQ(call(*s.stub, "/grpc.health.v1.Health/Check", health_request).body, std::string("serving"));
  const int answered_here = s.behind.calls();
  CHECK_EQ(answered_here, relayed + 2);

  // Another version, another model, an unknown health service, bytes that are no request,
  // another method: behind.
  named.set_version("2");
  CHECK_EQ(call(*s.stub, service + "ModelConfig", named.SerializeAsString()).body.substr(0, 8), std::string("behind: "));
  named.set_version("");
  named.set_name("other");
  CHECK_EQ(call(*s.stub, service + "ModelReady", named.SerializeAsString()).body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(call(*s.stub, "/grpc.health.v1.Health/Check", "\x0a\x01x").body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(call(*s.stub, service + "ModelMetadata", "\xff\xff").body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(call(*s.stub, service + "ModelStatistics", "").body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(s.behind.calls(), answered_here + 5);

  // Draining: everything behind.
  s.frontend->drain();
  CHECK_EQ(call(*s.stub, service + "ServerLive", live).body.substr(0, 8), std::string("behind: "));
  CHECK_EQ(call(*s.stub, service + "ServerReady", "").body.substr(0, 8), std::string("behind: "));
}

TEST_CASE("grpc_frontend: a stream is relayed message by message, and an early end reaches the client") {
  Setup s;
  // A client that writes three messages, reads three echoes, then ends its stream.
  struct Streamer final : WaitedStream {
    void start(grpc::GenericStub& stub, const std::string& method, bool end_after_writes) {
      end_ = end_after_writes;
      stub.PrepareBidiStreamingCall(&context, method, grpc::StubOptions(), this);
      out = bytes_of("m0");
      StartWrite(&out);
      StartRead(&in);
      StartCall();
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return;
      if (++written < 3) {
        out = bytes_of("m" + std::to_string(written));
        StartWrite(&out);
      } else if (end_) {
        StartWritesDone();
      }
    }
    void OnReadDone(bool ok) override {
      if (!ok) return;
      got.push_back(text_of(in));
      StartRead(&in);
    }
    int written = 0;
    bool end_ = true;
    std::vector<std::string> got;
  };
  Streamer echo;
  echo.start(*s.stub, "/test.Echo/Stream", true);
  CHECK(echo.wait().ok());
  CHECK_EQ(echo.got.size(), size_t{3});
  if (echo.got.size() == 3) CHECK_EQ(echo.got[2], std::string("echo: m2"));
  // The server behind ends the call while the client keeps its stream open: the client
  // still gets the status at once.
  Streamer refused;
  refused.start(*s.stub, "/test.Echo/Fail", false);
  grpc::Status status = refused.wait();
  CHECK_EQ(static_cast<int>(status.error_code()), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  CHECK_EQ(status.error_message(), std::string("behind refused it"));
}

TEST_CASE("grpc_frontend: concurrent calls, native and relayed, some cancelled, all end") {
  Setup s;
  constexpr int kThreads = 8, kCalls = 200;
  std::atomic<int> wrong{0}, ended{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const bool relayed = (i % 5) == 0;
        // Some calls get a deadline too short to be answered: they end DEADLINE_EXCEEDED.
        const auto timeout = (i % 7) == 0 ? std::chrono::milliseconds(0) : std::chrono::milliseconds(30000);
        Answer a = relayed ? call(*s.stub, "/inference.GRPCInferenceService/ServerLive", "x", "", timeout)
                           : call(*s.stub, kModelInfer, infer_request("double", {float(t), float(i)}), "", timeout);
        ended.fetch_add(1);
        if (a.status.ok() && !relayed) {
          inference::ModelInferResponse response;
          float y[2] = {0, 0};
          if (!response.ParseFromString(a.body) || response.raw_output_contents_size() != 1 ||
              response.raw_output_contents(0).size() != sizeof y) {
            wrong.fetch_add(1);
            continue;
          }
          std::memcpy(y, response.raw_output_contents(0).data(), sizeof y);
          if (y[0] != 2.0f * t || y[1] != 2.0f * i) wrong.fetch_add(1);
        } else if (!a.status.ok() && a.status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
          wrong.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(ended.load(), kThreads * kCalls);
  // Calls whose client gave up end on the server a moment later (cancelled in the queue, or answered).
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (s.frontend->in_flight() != 0 && std::chrono::steady_clock::now() < limit) std::this_thread::yield();
  CHECK_EQ(s.frontend->in_flight(), size_t{0});
}

TEST_CASE("grpc_frontend: a stream's requests are each answered, here or behind; a cancelled stream ends") {
  Setup s;
  // Writes kRequests requests (every fourth for a model served behind), half-closes, reads every answer.
  constexpr int kRequests = 200;
  struct Streamer final : WaitedStream {
    void start(grpc::GenericStub& stub, bool cancel_midway) {
      cancel_ = cancel_midway;
      context.AddMetadata("x-test", "refuse");  // relayed requests are refused behind: their errors come back
      stub.PrepareBidiStreamingCall(&context, "/inference.GRPCInferenceService/ModelStreamInfer", grpc::StubOptions(),
                                    this);
      write_next();
      StartRead(&in);
      StartCall();
    }
    void write_next() {
      out = bytes_of(infer_request(written % 4 == 3 ? "other" : "double", {float(written), 1.0f},
                                   "r-" + std::to_string(written)));
      StartWrite(&out);
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return;
      if (++written == kRequests / 2 && cancel_) context.TryCancel();
      if (written < kRequests) {
        write_next();
      } else {
        StartWritesDone();
      }
    }
    void OnReadDone(bool ok) override {
      if (!ok) return;
      inference::ModelStreamInferResponse answer;
      if (answer.ParseFromString(text_of(in))) {
        if (answer.error_message() == "behind refused it" && answer.infer_response().model_name() == "other") {
          ++behind;
        } else if (answer.infer_response().raw_output_contents_size() == 1) {
          float y[2];
          std::memcpy(y, answer.infer_response().raw_output_contents(0).data(), sizeof y);
          const int k = std::stoi(answer.infer_response().id().substr(2));
          if (y[0] == 2.0f * k && y[1] == 2.0f) ++right;
        }
      }
      ++answers;
      StartRead(&in);
    }
    int written = 0, answers = 0, right = 0, behind = 0;
    bool cancel_ = false;
  };
  Streamer whole;
  whole.start(*s.stub, false);
  CHECK(whole.wait().ok());
  CHECK_EQ(whole.answers, kRequests);
  CHECK_EQ(whole.right, kRequests * 3 / 4);
  CHECK_EQ(whole.behind, kRequests / 4);
  Streamer cut;
  cut.start(*s.stub, true);
  CHECK_EQ(static_cast<int>(cut.wait().error_code()), static_cast<int>(grpc::StatusCode::CANCELLED));
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (s.frontend->in_flight() != 0 && std::chrono::steady_clock::now() < limit) std::this_thread::yield();
  CHECK_EQ(s.frontend->in_flight(), size_t{0});
}
