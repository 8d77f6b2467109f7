// The native HTTP front end over real sockets, its batcher and a fallback server on
// threads of their own; the test command runs these under ThreadSanitizer and
// AddressSanitizer. Clients are blocking Beast clients; no sleeps.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "check.h"
#include "doubling_model.h"
#include "gate.h"
#include "conveyor/batcher.h"
#include "conveyor/frontend_common.h"
#include "conveyor/http_frontend.h"
#include "conveyor/mirror.h"
#include "conveyor/router.h"

using namespace conveyor;

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

using testing::doubled;
using testing::doubling_model_options;

std::shared_ptr<Batcher> make_batcher() {
  return std::make_shared<Batcher>(doubling_model_options(), doubled, MemoryPool::default_host());
}

// A server standing for the Python front end: answers every request 200 with a body
// naming its method and target, keep-alive, until stopped. With `close_when_idle` it
// closes each connection once it has answered, as an idle timeout would, though its
// answer said keep-alive.
class FallbackServer {
 public:
  explicit FallbackServer(bool close_when_idle = false)
      : acceptor_(ioc_, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)), close_when_idle_(close_when_idle) {
    accept();
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~FallbackServer() {
    asio::post(ioc_, [this] { ioc_.stop(); });
    thread_.join();
  }
  int port() const { return acceptor_.local_endpoint().port(); }
  int answered() const { return answered_.load(); }

 private:
  struct Connection : std::enable_shared_from_this<Connection> {
    Connection(tcp::socket s, std::atomic<int>* answered, bool close_when_idle)
        : socket(std::move(s)), answered(answered), close_when_idle(close_when_idle) {}
    void read() {
      request = {};
      http::async_read(socket, buffer, request, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec) return;
        self->response = {http::status::ok, 11};
        self->response.body() = "behind: " + std::string(self->request.method_string()) + " " +
                                std::string(self->request.target()) + " " + std::to_string(self->request.body().size());
        self->response.keep_alive(true);
        self->response.prepare_payload();
        self->answered->fetch_add(1);
        http::async_write(self->socket, self->response, [self](beast::error_code ec, size_t) {
          if (ec) return;
          if (self->close_when_idle) {
            self->socket.close(ec);
            return;
          }
          self->read();
        });
      });
    }
    tcp::socket socket;
    std::atomic<int>* answered;
    bool close_when_idle;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    http::response<http::string_body> response;
  };

  void accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket s) {
      if (ec) return;
      std::make_shared<Connection>(std::move(s), &answered_, close_when_idle_)->read();
      accept();
    });
  }

  asio::io_context ioc_;
  tcp::acceptor acceptor_;
  bool close_when_idle_;
  std::atomic<int> answered_{0};
  std::thread thread_;
};

// A blocking keep-alive client.
class Client {
 public:
  explicit Client(int port) : socket_(ioc_) {
    socket_.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
  }
  http::response<http::string_body> send(http::verb method, const std::string& target, const std::string& body,
                                         const std::vector<std::pair<std::string, std::string>>& fields = {}) {
    http::request<http::string_body> req{method, target, 11};
    req.set(http::field::host, "127.0.0.1");
    for (const auto& [name, value] : fields) req.set(name, value);
    req.body() = body;
    req.prepare_payload();
    http::write(socket_, req);
    http::response<http::string_body> res;
    http::read(socket_, buffer_, res);
    return res;
  }

 private:
  asio::io_context ioc_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

// A binary request for `double` with the row (a, b); the answer's y is binary.
std::pair<std::string, std::string> binary_request(float a, float b) {
  const std::string header =
      R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}}],)"
      R"("outputs":[{"name":"y","parameters":{"binary_data":true}}]})";
  std::string body = header;
  body.append(reinterpret_cast<const char*>(&a), 4);
  body.append(reinterpret_cast<const char*>(&b), 4);
  return {body, std::to_string(header.size())};
}

// The two floats at the end of a binary answer.
std::pair<float, float> binary_answer(const std::string& body) {
  float y[2] = {0, 0};
  if (body.size() >= 8) std::memcpy(y, body.data() + body.size() - 8, 8);
  return {y[0], y[1]};
}

// A front end serving `double` natively, with the fallback server behind it.
struct Served {
  explicit Served(HttpFrontendOptions options = {}) : batcher(make_batcher()) {
    options.fallback_port = behind.port();
    frontend = std::make_unique<HttpFrontend>(options);
    frontend->add_model({"double", 1, batcher, {}, {}, {}, {}});
  }
  FallbackServer behind;
  std::shared_ptr<Batcher> batcher;
  std::unique_ptr<HttpFrontend> frontend;
};

}  // namespace

TEST_CASE("http_frontend: concurrent keep-alive clients each get their own answer") {
  auto batcher = make_batcher();
  HttpFrontend frontend(HttpFrontendOptions{});
  frontend.add_model({"double", 1, batcher, {}, {}, {}, {}});
  constexpr int kThreads = 8, kRequests = 100;
  std::atomic<int> wrong{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([&, t] {
      Client client(frontend.port());
      for (int i = 0; i < kRequests; ++i) {
        auto [body, length] = binary_request(static_cast<float>(t), static_cast<float>(i));
        auto res = client.send(http::verb::post, "/v2/models/double/infer", body,
                               {{"Inference-Header-Content-Length", length}});
        const auto [y0, y1] = binary_answer(res.body());
        if (res.result_int() != 200 || y0 != 2.0f * t || y1 != 2.0f * i) wrong.fetch_add(1);
      }
    });
  }
  for (auto& c : clients) c.join();
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(batcher->stats().succeeded, uint64_t{kThreads * kRequests});
  frontend.stop();
}

TEST_CASE("http_frontend: a JSON request gets a JSON answer with an id") {
  auto batcher = make_batcher();
  HttpFrontend frontend(HttpFrontendOptions{});
  frontend.add_model({"double", 1, batcher, {}, {}, {}, {}});
  Client client(frontend.port());
  auto res = client.send(http::verb::post, "/v2/models/double/versions/1/infer",
                         R"({"id":"r-1","inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1.5,-2]}]})");
  CHECK_EQ(res.result_int(), 200u);
  CHECK(res.body().find(R"("id":"r-1")") != std::string::npos);
  CHECK(res.body().find(R"("shape":[1,2])") != std::string::npos);
  CHECK(res.body().find(R"("data":[3.0,-4.0])") != std::string::npos);
  // No id given: one is made (32 hex digits), so feedback can name the prediction.
  res = client.send(http::verb::post, "/v2/models/double/infer",
                    R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]})");
  const size_t at = res.body().find(R"("id":")");
  CHECK(at != std::string::npos);
  CHECK_EQ(res.body().find('"', at + 6) - (at + 6), size_t{32});
}

TEST_CASE("http_frontend: binary inputs after a header of any length run in place when alone in their batch") {
  // The batcher gathers from its own pool: a request copied into a batch shows there.
  auto pool = MemoryPool::create(MemoryKind::kHost);
  auto batcher = std::make_shared<Batcher>(doubling_model_options(), doubled, pool);
  HttpFrontend frontend(HttpFrontendOptions{});
  frontend.add_model({"double", 1, batcher, {}, {}, {}, {}});
  Client client(frontend.port());
  auto [body, length] = binary_request(1.5f, -2.0f);
  const std::string header = body.substr(0, std::stoul(length)), data = body.substr(header.size());
  for (size_t spaces = 0; spaces < 16; ++spaces) {  // JSON whitespace moves the data to every offset
    const std::string padded = header + std::string(spaces, ' ');
    auto res = client.send(http::verb::post, "/v2/models/double/infer", padded + data,
                           {{"Inference-Header-Content-Length", std::to_string(padded.size())}});
    CHECK_EQ(res.result_int(), 200u);
    CHECK(binary_answer(res.body()) == std::make_pair(3.0f, -4.0f));
  }
  // Sent one at a time, each ran alone on the body's own bytes: nothing was gathered.
  const PoolStats stats = pool->stats();
  CHECK_EQ(stats.hits + stats.misses, uint64_t{0});
  // A chunked body (no Content-Length ahead of it) is placed the same way.
  http::request<http::string_body> chunked{http::verb::post, "/v2/models/double/infer", 11};
  chunked.set(http::field::host, "127.0.0.1");
  chunked.set("Inference-Header-Content-Length", std::to_string(header.size() + 1));
  chunked.body() = header + " " + data;
  chunked.chunked(true);
  asio::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(frontend.port())));
  http::write(socket, chunked);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  CHECK_EQ(res.result_int(), 200u);
  CHECK(binary_answer(res.body()) == std::make_pair(3.0f, -4.0f));
  CHECK_EQ(pool->stats().hits + pool->stats().misses, uint64_t{0});
}

TEST_CASE("http_frontend: what it does not serve goes to the server behind, and the answer comes back") {
  Served served;
  auto& behind = served.behind;
  auto& batcher = served.batcher;
  HttpFrontend& frontend = *served.frontend;
  Client client(frontend.port());
  // Another route, a model not given, another version, an invalid request, a gzip body.
  auto res = client.send(http::verb::get, "/v2/health/ready", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/health/ready 0"));
  res = client.send(http::verb::post, "/v2/models/other/infer", "{}");
  CHECK_EQ(res.body(), std::string("behind: POST /v2/models/other/infer 2"));
  res = client.send(http::verb::post, "/v2/models/double/versions/2/infer", "{}");
  CHECK_EQ(res.body(), std::string("behind: POST /v2/models/double/versions/2/infer 2"));
  const std::string missing_input = R"({"inputs":[]})";
  res = client.send(http::verb::post, "/v2/models/double/infer", missing_input);
  CHECK_EQ(res.body(), "behind: POST /v2/models/double/infer " + std::to_string(missing_input.size()));
  res = client.send(http::verb::post, "/v2/models/double/infer", "x", {{"Content-Encoding", "gzip"}});
  CHECK_EQ(res.body(), std::string("behind: POST /v2/models/double/infer 1"));
  // Served here: the server behind sees nothing of it.
  const int before = behind.answered();
  auto [body, length] = binary_request(1, 2);
  res = client.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  CHECK_EQ(res.result_int(), 200u);
  CHECK_EQ(behind.answered(), before);
  CHECK_EQ(batcher->stats().succeeded, uint64_t{1});
}

TEST_CASE("http_frontend: readiness is answered here only while the server is ready, config where given") {
  Served served;
  auto& behind = served.behind;
  HttpFrontend& frontend = *served.frontend;
  Client client(frontend.port());
  frontend.set_ready(true);  // not serving health yet: behind
  auto res = client.send(http::verb::get, "/v2/health/ready", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/health/ready 0"));
  frontend.serve_health(R"({"name":"conveyor"})");
  const int before = behind.answered();
  res = client.send(http::verb::get, "/v2/health/ready", "");
  CHECK_EQ(res.result_int(), 200u);
  CHECK_EQ(res.body(), std::string(R"({"ready":true})"));
  CHECK_EQ(behind.answered(), before);
  frontend.set_ready(false);  // the server behind says why not
  res = client.send(http::verb::get, "/v2/health/ready", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/health/ready 0"));
  // A model's config: here when its body was given, for no version or its own.
  res = client.send(http::verb::get, "/v2/models/double/config", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/models/double/config 0"));
  frontend.add_model({"double", 1, served.batcher, R"({"name":"double"})", R"({"max_batch_size":8})", {}, {}});
  const int with_config = behind.answered();
  for (const char* target : {"/v2/models/double/config", "/v2/models/double/versions/1/config"}) {
    res = client.send(http::verb::get, target, "");
    CHECK_EQ(res.result_int(), 200u);
    CHECK_EQ(res.body(), std::string(R"({"max_batch_size":8})"));
  }
  CHECK_EQ(behind.answered(), with_config);
  res = client.send(http::verb::get, "/v2/models/double/versions/2/config", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/models/double/versions/2/config 0"));
  frontend.drain();  // draining: everything behind, readiness too
  frontend.set_ready(true);
  res = client.send(http::verb::get, "/v2/health/ready", "");
  CHECK_EQ(res.body(), std::string("behind: GET /v2/health/ready 0"));
}

TEST_CASE("http_frontend: a request its stopped batcher refuses goes behind (a version swapped out by a reload)") {
  Served served;
  auto& behind = served.behind;
  auto& batcher = served.batcher;
  HttpFrontend& frontend = *served.frontend;
  batcher->stop();
  Client client(frontend.port());
  auto [body, length] = binary_request(1, 2);
  auto res = client.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  CHECK_EQ(res.body(), "behind: POST /v2/models/double/infer " + std::to_string(body.size()));
  // And once removed, every request of the model goes behind.
  frontend.remove_model("double");
  res = client.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  CHECK_EQ(res.result_int(), 200u);
  CHECK_EQ(behind.answered(), 2);
}

TEST_CASE("http_frontend: limits: a long body gets 413, too many headers 431, an API key is checked") {
  HttpFrontendOptions options;
  options.max_body_bytes = 1024;
  options.max_header_count = 8;
  options.api_key = "secret";
  Served served(options);
  HttpFrontend& frontend = *served.frontend;
  {
    Client client(frontend.port());
    auto res = client.send(http::verb::post, "/v2/models/double/infer", std::string(1025, 'x'));
    CHECK_EQ(res.result_int(), 413u);
  }
  {
    Client client(frontend.port());
    std::vector<std::pair<std::string, std::string>> many;
    for (int i = 0; i < 9; ++i) many.push_back({"X-Header-" + std::to_string(i), "1"});
    auto res = client.send(http::verb::get, "/v2/health/ready", "", many);
    CHECK_EQ(res.result_int(), 431u);
  }
  Client client(frontend.port());
  auto [body, length] = binary_request(1, 2);
  auto res = client.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  CHECK(res.body().rfind("behind:", 0) == 0);  // no key: the server behind answers (401)
  res = client.send(http::verb::post, "/v2/models/double/infer", body,
                    {{"Inference-Header-Content-Length", length}, {"Authorization", "Bearer secret"}});
  CHECK_EQ(res.result_int(), 200u);
  CHECK_EQ(binary_answer(res.body()).second, 4.0f);
}

TEST_CASE("http_frontend: drain forwards new requests; stop with requests in a batcher loses no memory") {
  Served served;
  auto& batcher = served.batcher;
  auto& frontend = served.frontend;
  Client client(frontend->port());
  CHECK_EQ(client.send(http::verb::get, "/v2/health/live", "").result_int(), 200u);  // the connection is accepted
  frontend->drain();
  auto [body, length] = binary_request(1, 2);
  auto res = client.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  CHECK(res.body().rfind("behind:", 0) == 0);
  frontend->stop();
  frontend.reset();  // the batcher outlives it: completions after this go nowhere
  CHECK_EQ(batcher->stats().succeeded, uint64_t{0});
}

TEST_CASE("http_frontend: a kept connection the server behind closed while idle: the request goes on a new one") {
  FallbackServer behind(/*close_when_idle=*/true);
  HttpFrontendOptions options;
  options.fallback_port = behind.port();
  HttpFrontend frontend(options);
  Client client(frontend.port());
  for (int i = 0; i < 3; ++i) {
    auto res = client.send(http::verb::get, "/v2/models/double/stats", "");
    CHECK_EQ(res.result_int(), 200u);
    CHECK_EQ(res.body(), std::string("behind: GET /v2/models/double/stats 0"));
  }
  CHECK_EQ(behind.answered(), 3);
}

TEST_CASE("http_frontend: a request in its batcher when the front end drains is still answered") {
  conveyor::testing::Gate gate;
  auto batcher = std::make_shared<Batcher>(doubling_model_options(), [&](const Batch& batch) {
    gate.pass();
    return doubled(batch);
  }, MemoryPool::default_host());
  HttpFrontend frontend(HttpFrontendOptions{});
  frontend.add_model({"double", 1, batcher, {}, {}, {}, {}});
  http::response<http::string_body> res;
  std::thread client([&] {
    Client c(frontend.port());
    auto [body, length] = binary_request(3, 4);
    res = c.send(http::verb::post, "/v2/models/double/infer", body, {{"Inference-Header-Content-Length", length}});
  });
  gate.wait_entered(1);  // the request is in its batch
  CHECK_EQ(frontend.in_flight(), size_t{1});  // counted from before it was queued
  frontend.drain();      // the listener closes: nothing waits on a socket any more
  gate.open();
  client.join();
  CHECK_EQ(res.result_int(), 200u);
  CHECK_EQ(binary_answer(res.body()).second, 8.0f);
}

namespace {

// Sends `bytes` on a new connection (then shuts its sending side when `half_close`) and
// returns all the server writes until it closes the connection.
std::string exchange_raw(int port, const std::string& bytes, bool half_close = false) {
  asio::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
  asio::write(socket, asio::buffer(bytes));
  if (half_close) socket.shutdown(tcp::socket::shutdown_send);
  std::string answer;
  beast::error_code ec;
  char chunk[4096];
  while (!ec) {
    const size_t n = socket.read_some(asio::buffer(chunk), ec);
    answer.append(chunk, n);
  }
  return answer;
}

}  // namespace

TEST_CASE("http_frontend: the read path: folded headers, chunk floods, slow and half-closed clients") {
  HttpFrontendOptions options;
  options.max_request_chunks = 4;
  options.request_read_timeout = std::chrono::milliseconds(50);
  Served served(options);
  const int port = served.frontend->port();
  // A folded header line: refused, as the Python front end refuses it (Beast would unfold it).
  std::string answer = exchange_raw(port, "GET /v2 HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 400 ", 0) == 0);
  CHECK(answer.find("Unexpected whitespace after header value") != std::string::npos);
  // Chunks: four are accepted (the request goes behind), the fifth is one too many.
  const std::string chunked_head = "POST /v2/models/absent/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                                   "Connection: close\r\n\r\n";
  answer = exchange_raw(port, chunked_head + "1\r\na\r\n1\r\nb\r\n1\r\nc\r\n1\r\nd\r\n0\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 200 ", 0) == 0);
  CHECK(answer.find("behind:") != std::string::npos);
  answer = exchange_raw(port, chunked_head + "1\r\na\r\n1\r\nb\r\n1\r\nc\r\n1\r\nd\r\n1\r\ne\r\n0\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 413 ", 0) == 0);
  CHECK(answer.find("--max-request-chunks") != std::string::npos);
  // A quoted chunk extension not closed on its line: refused, not waited on.
  answer = exchange_raw(port, chunked_head + "2;a=\"b\r\n{}\r\n0\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 400 ", 0) == 0);
  CHECK(answer.find("chunk extensions") != std::string::npos);
  // Content-Length beside Transfer-Encoding (request smuggling): the parser's words for it.
  answer = exchange_raw(port, "POST /v2 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                              "0\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 400 ", 0) == 0);
  CHECK(answer.find("can't be present with Content-Length") != std::string::npos);
  // A head that never ends: 408 once the read timeout passes, then closed.
  answer = exchange_raw(port, "GET /v2 HTTP/1.1\r\nHost: t\r\n");
  CHECK(answer.rfind("HTTP/1.1 408 ", 0) == 0);
  CHECK(answer.find("--request-read-timeout-s") != std::string::npos);
  // A client that shuts its sending side once the request is out still gets the answer.
  auto [body, length] = binary_request(3, 4);
  answer = exchange_raw(port, "POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: " +
                                  length + "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body,
                        /*half_close=*/true);
  CHECK(answer.rfind("HTTP/1.1 200 ", 0) == 0);
  // Empty lines before a request line are skipped.
  answer = exchange_raw(port, "\r\n\r\nGET /v2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 200 ", 0) == 0);
}

TEST_CASE("http_frontend: a rollout's route answers each key from its router's arm, counted per arm") {
  FallbackServer behind;
  HttpFrontendOptions options;
  options.fallback_port = behind.port();
  HttpFrontend frontend(options);
  const router::RouteTable table{{router::kPointLimit / 2, router::kPointLimit}, 0, router::fnv1a64("salt"), true};
  auto route = std::make_shared<FrontendRoute>();
  route->rollout = "m-canary";
  route->router = std::make_unique<router::Router>(table, 7);
  std::vector<std::shared_ptr<RolloutCounts>> counts;
  for (int64_t version : {2, 1}) {
    counts.push_back(std::make_shared<RolloutCounts>());
    route->arms.push_back(std::make_shared<const FrontendModel>(
        FrontendModel{"double", version, make_batcher(), {}, {}, counts.back(), {}}));
  }
  route->key_parameter = "route-key";
  route->key_header = "route-key";
  frontend.add_model({"double", 1, route->arms[1]->batcher, {}, {}, {}, route});
  const std::string row = R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}])";

  constexpr int kThreads = 4, kKeys = 50;
  std::atomic<int> wrong{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([&, t] {
      Client client(frontend.port());
      for (int i = 0; i < kKeys; ++i) {
        const std::string key = "user-" + std::to_string(t * kKeys + i);
        const uint32_t arm = router::decide(table, router::key_draw(key, table.salt_basis)) / 2;
        const std::string version = arm == 0 ? "2" : "1";
        auto res = client.send(http::verb::post, "/v2/models/double/infer", row + "}", {{"Route-Key", key}});
        const bool right = res.result_int() == 200 &&
                           res.body().find(R"("model_version":")" + version + "\"") != std::string::npos &&
                           res.body().find(R"("parameters":{"rollout":"m-canary"})") != std::string::npos &&
                           res.body().find(R"("data":[2.0,4.0])") != std::string::npos;
        if (!right) wrong.fetch_add(1);
      }
    });
  }
  for (auto& c : clients) c.join();
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(counts[0]->routed.load() + counts[1]->routed.load(), uint64_t{kThreads * kKeys});
  CHECK(counts[0]->routed.load() > 0);
  CHECK(counts[1]->routed.load() > 0);
  CHECK_EQ(route->arms[0]->batcher->stats().succeeded, counts[0]->routed.load());

  // The parameter wins over the header; an integer is keyed by its text.
  Client client(frontend.port());
  const uint32_t arm = router::decide(table, router::key_draw("7", table.salt_basis)) / 2;
  auto res = client.send(http::verb::post, "/v2/models/double/infer", row + R"(,"parameters":{"route-key":7}})",
                         {{"Route-Key", "user-0"}});
  CHECK(res.body().find(R"("model_version":")" + std::string(arm == 0 ? "2" : "1") + "\"") != std::string::npos);
  // Behind: a key of another type, a header beyond ASCII, a request naming a version.
  for (const auto& [target, body, header] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"/v2/models/double/infer", row + R"(,"parameters":{"route-key":1.5}})", "a"},
           {"/v2/models/double/infer", row + "}", "caf\xc3\xa9"},
           {"/v2/models/double/versions/1/infer", row + "}", "a"}}) {
    res = client.send(http::verb::post, target, body, {{"Route-Key", header}});
    CHECK(res.body().rfind("behind: POST " + target, 0) == 0);
  }
  CHECK_EQ(behind.answered(), 3);
  frontend.stop();
}

TEST_CASE("http_frontend: a rollout copying to a shadow tags the copied requests of the copying arm only") {
  HttpFrontend frontend(HttpFrontendOptions{});
  auto champion = make_batcher(), challenger = make_batcher();
  MirrorOptions mirror_options;
  mirror_options.champion_output = mirror_options.challenger_output = 0;
  mirror_options.compare = MirrorCompare::kValues;
  auto mirror = std::make_shared<Mirror>(challenger, mirror_options);
  champion->set_mirror(mirror);
  // Every request goes to the champion (arm 0), half of them copied (a random draw each).
  const router::RouteTable table{{router::kPointLimit, router::kPointLimit}, router::kPointLimit / 2,
                                 router::fnv1a64("salt"), true};
  auto make_route = [&](int copying_arm) {
    auto route = std::make_shared<FrontendRoute>();
    route->rollout = "m-shadow";
    route->router = std::make_unique<router::Router>(table, 11);
    route->arms = {std::make_shared<const FrontendModel>(FrontendModel{"double", 1, champion, {}, {}, {}, {}}),
                   std::make_shared<const FrontendModel>(FrontendModel{"double", 2, challenger, {}, {}, {}, {}})};
    route->copying_arm = copying_arm;
    return route;
  };
  // A route that copies names the arm whose requests are copied.
  CHECK_THROWS_CODE(frontend.add_model({"double", 1, champion, {}, {}, {}, make_route(-1)}), ErrorCode::kInvalidInput);
  std::shared_ptr<FrontendRoute> route = make_route(0);
  frontend.add_model({"double", 1, champion, {}, {}, {}, route});

  constexpr int kRequests = 200;
  Client client(frontend.port());
  const std::string row = R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]})";
  int answered = 0;
  for (int i = 0; i < kRequests; ++i) {
    auto res = client.send(http::verb::post, "/v2/models/double/infer", row);
    answered += res.result_int() == 200 && res.body().find(R"("model_version":"1")") != std::string::npos;
  }
  CHECK_EQ(answered, kRequests);
  CHECK(mirror->wait_idle(-1));
  const MirrorStats stats = mirror->stats();
  // Each copied request got its own tag, counted by the route.
  CHECK_EQ(stats.offered_rows, route->last_mirror_tag.load());
  CHECK(stats.offered_rows > 0);
  CHECK(stats.offered_rows < uint64_t{kRequests});
  CHECK_EQ(stats.paired_rows, stats.offered_rows);
  CHECK_EQ(challenger->stats().succeeded, stats.offered_rows);
  MirrorPairs pairs = mirror->drain();
  CHECK_EQ(pairs.tags.size(), stats.paired_rows);
  for (size_t i = 0; i < pairs.champion_values.size(); ++i) {
    CHECK_EQ(pairs.champion_values[i], pairs.challenger_values[i]);
  }
  frontend.stop();
  champion->set_mirror(nullptr);
}
