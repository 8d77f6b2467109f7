// The load generator: its schedule (fixed seeds, so the statistics are exact numbers), the
// recorder's accounting, the engine against an in-process batcher with a fake executor and
// against callback targets, and the HTTP client against a tiny server on a thread.
// Synchronisation is explicit (gates), never sleeps; no check depends on timing.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "check.h"
#include "gate.h"
#include "conveyor/loadgen.h"
#include "conveyor/memory_pool.h"

using namespace conveyor;
using conveyor::testing::Gate;
using namespace conveyor::loadgen;

namespace {

constexpr int64_t kTimeoutNs = 30'000'000'000;  // a bound on waits; healthy runs take milliseconds


BatcherOptions options(int64_t max_batch) {
  BatcherOptions o;
  o.model_name = "loadgen-test";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.max_batch_size = max_batch;
  return o;
}

// y = x + 1; a row whose first value is negative fails the batch.
std::vector<Tensor> add_one(const Batch& batch) {
  const Tensor& x = batch.inputs[0];
  const auto* in = static_cast<const float*>(x.data);
  for (int64_t r = 0; r < batch.rows; ++r) {
    if (in[r * 2] < 0) throw Error(ErrorCode::kModelExecution, "negative input");
  }
  Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
  auto* out = static_cast<float*>(y.data);
  for (int64_t i = 0; i < x.shape.numel(); ++i) out[i] = in[i] + 1;
  return {y};
}

// A one-row sample owning its memory.
std::vector<Tensor> sample(float a, float b) {
  auto data = std::make_shared<std::vector<float>>(std::vector<float>{a, b});
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{1, 2};
  t.data = data->data();
  t.owner = data;
  return {t};
}

size_t count_ok(const RunResult& r) { return static_cast<size_t>(std::accumulate(r.ok.begin(), r.ok.end(), 0)); }

}  // namespace

// ---- schedule ----------------------------------------------------------------------------

TEST_CASE("loadgen: a Poisson schedule is reproducible, starts at 0 and spans (count-1)/rate exactly") {
  const auto a = poisson_schedule(1000.0, 5000, 42);
  const auto b = poisson_schedule(1000.0, 5000, 42);
  const auto c = poisson_schedule(1000.0, 5000, 43);
  CHECK(a == b);
  CHECK(a != c);
  CHECK_EQ(a.size(), size_t{5000});
  CHECK_EQ(a.front(), int64_t{0});
  CHECK_EQ(a.back(), int64_t{4'999'000'000});  // 4999 gaps at 1 ms on average
  bool ascending = true;
  for (size_t i = 1; i < a.size(); ++i) ascending = ascending && a[i] >= a[i - 1];
  CHECK(ascending);
  CHECK(poisson_schedule(10.0, 0, 1).empty());
  CHECK(poisson_schedule(10.0, 1, 1) == std::vector<int64_t>{0});
}

TEST_CASE("loadgen: Poisson gaps look exponential (seeded, so these are fixed numbers)") {
  const auto s = poisson_schedule(2000.0, 20001, 7);
  const double mean_ns = 1e9 / 2000.0;
  double sum = 0, sum_sq = 0;
  size_t above_mean = 0, above_three_means = 0;
  for (size_t i = 1; i < s.size(); ++i) {
    const double gap = static_cast<double>(s[i] - s[i - 1]);
    sum += gap;
    sum_sq += gap * gap;
    above_mean += gap > mean_ns;
    above_three_means += gap > 3 * mean_ns;
  }
  const double n = static_cast<double>(s.size() - 1);
  const double mean = sum / n;
  const double cv = std::sqrt(sum_sq / n - mean * mean) / mean;
  CHECK(std::fabs(mean - mean_ns) < 1.0);  // the span is exact, so the mean gap is too
  CHECK(cv > 0.97 && cv < 1.03);            // exponential: standard deviation = mean
  // P(gap > mean) = e^-1 = 0.368, P(gap > 3 mean) = e^-3 = 0.0498
  CHECK(std::fabs(above_mean / n - std::exp(-1.0)) < 0.01);
  CHECK(std::fabs(above_three_means / n - std::exp(-3.0)) < 0.005);
}

TEST_CASE("loadgen: a schedule refuses a rate that is not positive") {
  CHECK_THROWS_CODE(poisson_schedule(0.0, 10, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(poisson_schedule(-5.0, 10, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(poisson_schedule(std::nan(""), 10, 1), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(poisson_schedule(10.0, -1, 1), ErrorCode::kInvalidInput);
}

// ---- recorder --------------------------------------------------------------------------

TEST_CASE("loadgen: a query of several requests is answered when its last one is, and fails if any fails") {
  Recorder r(2, 3, Clock::now());
  r.note_sent(6);
  r.complete(0, true, {});
  r.complete(0, true, {});
  CHECK(!r.answered(0));
  r.complete(0, true, {});
  r.complete(1, true, {});
  r.complete(1, false, std::string(500, 'x'));
  r.complete(1, true, {});
  CHECK(r.answered(0));
  CHECK(r.answered(1));
  CHECK(!r.failed(0));
  CHECK(r.failed(1));
  CHECK_EQ(r.outstanding(), int64_t{0});
  const auto errors = r.errors();
  CHECK_EQ(errors.size(), size_t{1});
  CHECK_EQ(errors.begin()->first.size(), kMaxErrorTextBytes + 3);  // truncated, with "..."
  r.close();
  r.complete(0, false, "after the end");  // ignored
  CHECK(!r.failed(0));
  CHECK(r.errors().size() == 1);
}

// ---- in-process target -----------------------------------------------------------------

TEST_CASE("loadgen: open loop against a batcher answers every query, in schedule order of sends") {
  auto batcher = std::make_shared<Batcher>(options(8), add_one, nullptr);
  BatcherTarget target(batcher, {sample(1, 2), sample(3, 4), sample(5, 6)});
  const auto schedule = poisson_schedule(20000.0, 300, 3);
  const RunResult r = run_open_loop(target, schedule, {}, OpenLoopOptions{});
  CHECK_EQ(count_ok(r), size_t{300});
  CHECK(r.errors.empty());
  bool ordered = true;
  for (size_t i = 0; i < schedule.size(); ++i) {
    ordered = ordered && r.sent_ns[i] >= r.scheduled_ns[i] && r.completed_ns[i] >= r.sent_ns[i];
    if (i) ordered = ordered && r.sent_ns[i] >= r.sent_ns[i - 1];
  }
  CHECK(ordered);
  CHECK(r.busy_ns > 0 && r.busy_ns <= r.active_ns);
  CHECK(r.generator_overhead() > 0.0 && r.generator_overhead() <= 1.0);
  CHECK(r.duration_ns >= r.completed_ns.back() - r.scheduled_ns.front());
  CHECK_EQ(batcher->stats().succeeded, uint64_t{300});
}

TEST_CASE("loadgen: failed requests count as errors with their text, and the others succeed") {
  auto batcher = std::make_shared<Batcher>(options(1), add_one, nullptr);
  BatcherTarget target(batcher, {sample(1, 1), sample(-1, 0)});
  const RunResult r = run_open_loop(target, std::vector<int64_t>(10, 0), {}, OpenLoopOptions{});
  CHECK_EQ(count_ok(r), size_t{5});
  CHECK_EQ(r.errors.size(), size_t{1});
  CHECK(r.errors.begin()->first.find("negative input") != std::string::npos);
  CHECK_EQ(r.errors.begin()->second, uint64_t{5});
  for (size_t i = 0; i < 10; ++i) CHECK(r.completed_ns[i] >= 0);  // a failure still has its time
}

TEST_CASE("loadgen: a send held back by a full target still counts its latency from the schedule") {
  Gate gate;
  auto batcher = std::make_shared<Batcher>(
      options(1), [&](const Batch& b) { gate.pass(); return add_one(b); }, nullptr);
  BatcherTarget target(batcher, {sample(1, 1)});
  // Everything due at once, one request in flight at a time: query i waits for query i-1.
  std::thread opener([&] {
    gate.wait_entered(1);
    gate.open();
  });
  OpenLoopOptions o;
  o.max_outstanding = 1;
  const RunResult r = run_open_loop(target, std::vector<int64_t>(5, 0), {}, o);
  opener.join();
  CHECK_EQ(count_ok(r), size_t{5});
  for (size_t i = 1; i < 5; ++i) {
    CHECK(r.sent_ns[i] >= r.completed_ns[i - 1]);  // not sent before a slot was free
    CHECK(r.completed_ns[i] - r.scheduled_ns[i] > r.completed_ns[i] - r.sent_ns[i]);  // the wait is latency
    CHECK(r.completed_ns[i] - r.scheduled_ns[i] >= r.completed_ns[i - 1] - r.scheduled_ns[i - 1]);
  }
}

TEST_CASE("loadgen: closed loop sends a query of N requests together and the next only after all N") {
  auto batcher = std::make_shared<Batcher>(options(8), add_one, nullptr);
  BatcherTarget target(batcher, {sample(1, 1), sample(2, 2), sample(3, 3)});
  const RunResult r = run_closed_loop(target, 20, 4, kTimeoutNs);
  CHECK_EQ(r.samples_per_query, 4);
  CHECK_EQ(count_ok(r), size_t{20});
  for (size_t q = 1; q < 20; ++q) CHECK(r.scheduled_ns[q] >= r.completed_ns[q - 1]);
  CHECK_EQ(batcher->stats().succeeded, uint64_t{80});
}

TEST_CASE("loadgen: schedules and sample indices are checked before the run") {
  auto batcher = std::make_shared<Batcher>(options(8), add_one, nullptr);
  BatcherTarget target(batcher, {sample(1, 1)});
  CHECK_THROWS_CODE(run_open_loop(target, {5, 3}, {}, OpenLoopOptions{}), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(run_open_loop(target, {0, 1}, {0}, OpenLoopOptions{}), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(run_open_loop(target, {0, 1}, {0, 1}, OpenLoopOptions{}), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(BatcherTarget(batcher, {}), ErrorCode::kInvalidInput);
}

// ---- callback target ---------------------------------------------------------------------

TEST_CASE("loadgen: a callback target's answers from other threads, thrown sends and dropped tickets") {
  std::vector<std::thread> answerers;
  std::mutex mu;
  CallbackTarget target(
      [&](std::shared_ptr<RequestTicket> ticket, size_t sample) {
        if (sample == 1) throw std::runtime_error("refused");
        if (sample == 2) return;  // dropped without an answer
        std::lock_guard<std::mutex> lock(mu);
        answerers.emplace_back([ticket] { ticket->complete(true, {}); });
      },
      3, 0);
  const RunResult r = run_open_loop(target, std::vector<int64_t>(9, 0), {}, OpenLoopOptions{});
  for (auto& t : answerers) t.join();
  CHECK_EQ(count_ok(r), size_t{3});
  CHECK_EQ(r.errors.at("refused"), uint64_t{3});
  CHECK_EQ(r.errors.at("the client dropped the request without an answer"), uint64_t{3});
}

TEST_CASE("loadgen: queries not answered within the timeout are recorded, not waited for forever") {
  std::vector<std::shared_ptr<RequestTicket>> held;
  CallbackTarget target([&](std::shared_ptr<RequestTicket> ticket, size_t) { held.push_back(ticket); }, 1, 0);
  OpenLoopOptions o;
  o.timeout_ns = 1'000'000;
  const RunResult r = run_open_loop(target, {0, 0, 0}, {}, o);
  CHECK_EQ(count_ok(r), size_t{0});
  CHECK_EQ(r.completed_ns[0], int64_t{-1});
  CHECK_EQ(r.errors.size(), size_t{1});
  CHECK(r.errors.begin()->first.find("no answer within the timeout") != std::string::npos);
  CHECK_EQ(r.errors.begin()->second, uint64_t{3});
  held.clear();  // late answers go to the closed run and are ignored
}

// ---- HTTP ------------------------------------------------------------------------------

namespace {

HttpResponseParser::State feed_all(HttpResponseParser& p, const std::string& bytes, size_t piece, size_t* used) {
  *used = 0;
  auto state = HttpResponseParser::State::kNeedMore;
  for (size_t at = 0; at < bytes.size() && state == HttpResponseParser::State::kNeedMore; at += piece) {
    size_t consumed = 0;
    state = p.feed(bytes.data() + at, std::min(piece, bytes.size() - at), &consumed);
    *used += consumed;
  }
  return state;
}

}  // namespace

TEST_CASE("loadgen: the HTTP parser reads a response however it is split") {
  const std::string ok =
      "HTTP/1.1 200 OK\r\ncontent-length: 26\r\ninference-header-content-length: 18\r\n\r\n"
      "{\"model_name\":\"m\"}\x01\x02\x03\x04\x05\x06\x07\x08";
  for (size_t piece : {size_t{1}, size_t{7}, ok.size()}) {
    HttpResponseParser p;
    size_t used = 0;
    CHECK(feed_all(p, ok + "HTTP/1.1", piece, &used) == HttpResponseParser::State::kDone);
    CHECK_EQ(used, ok.size());  // the next response's bytes are left alone
    CHECK(p.ok());
    CHECK(p.keep_alive());
  }
  const std::string chunked =
      "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
      "a;ext=1\r\n{\"error\": \r\n14\r\n\"no such \\\"model\\\"\"}\r\n0\r\nx-trailer: 1\r\n\r\n";
  for (size_t piece : {size_t{1}, size_t{5}, chunked.size()}) {
    HttpResponseParser p;
    size_t used = 0;
    CHECK(feed_all(p, chunked, piece, &used) == HttpResponseParser::State::kDone);
    CHECK(!p.ok());
    CHECK(!p.keep_alive());
    CHECK_EQ(p.describe(), std::string("HTTP 400: no such \"model\""));
  }
}

TEST_CASE("loadgen: the HTTP parser tells errors in a 200, interim answers, and bodies until close") {
  HttpResponseParser p;
  size_t used = 0;
  CHECK(feed_all(p, "HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"error\" : \"bad\"}", 64, &used) ==
        HttpResponseParser::State::kDone);
  CHECK(!p.ok());
  CHECK_EQ(p.describe(), std::string("HTTP 200: bad"));
  p.reset();
  CHECK(feed_all(p, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 3, &used) ==
        HttpResponseParser::State::kDone);
  CHECK_EQ(p.status(), 204);
  CHECK(p.ok());
  p.reset();
  CHECK(feed_all(p, "HTTP/1.0 200 OK\r\n\r\n{\"outputs\": []}", 4, &used) == HttpResponseParser::State::kNeedMore);
  CHECK(p.feed_eof() == HttpResponseParser::State::kDone);
  CHECK(p.ok());
  CHECK(!p.keep_alive());
}

TEST_CASE("loadgen: the HTTP parser refuses what is not HTTP, without crashing") {
  const char* bad[] = {
      "SSH-2.0-OpenSSH\r\n\r\n",
      "HTTP/1.1 2x0 OK\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
      "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
  };
  for (const char* bytes : bad) {
    HttpResponseParser p;
    size_t used = 0;
    CHECK(feed_all(p, bytes, 3, &used) == HttpResponseParser::State::kMalformed);
    CHECK(!p.error().empty());
  }
  HttpResponseParser p;
  size_t used = 0;
  CHECK(feed_all(p, "HTTP/1.1 200 OK\r\n" + std::string(70 * 1024, 'a'), 4096, &used) ==
        HttpResponseParser::State::kMalformed);
  p.reset();
  CHECK(feed_all(p, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 64, &used) ==
        HttpResponseParser::State::kNeedMore);
  CHECK(p.feed_eof() == HttpResponseParser::State::kMalformed);
}

namespace {

// A loopback HTTP server on a thread: reads one request (headers + Content-Length body) at
// a time and answers with `answer(n)` for the n-th request overall; an empty answer closes
// the connection instead. Serves connections one after another (the client's are few).
class TinyServer {
 public:
  explicit TinyServer(std::function<std::string(int)> answer) : answer_(std::move(answer)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(listen_fd_, 64);
    socklen_t length = sizeof a;
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &length);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~TinyServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    ::close(listen_fd_);
    thread_.join();
  }
  std::string port() const { return std::to_string(port_); }

 private:
  void serve() {
    std::vector<std::thread> workers;
    while (true) {
      const int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) break;
      workers.emplace_back([this, fd] { serve_connection(fd); });
    }
    for (auto& w : workers) w.join();
  }
  void serve_connection(int fd) {
    std::string buffer;
    char chunk[4096];
    while (true) {
      size_t end = buffer.find("\r\n\r\n");
      while (end == std::string::npos) {
        const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
        if (n <= 0) {
          ::close(fd);
          return;
        }
        buffer.append(chunk, static_cast<size_t>(n));
        end = buffer.find("\r\n\r\n");
      }
      const size_t at = buffer.find("Content-Length: ");
      const size_t body = at == std::string::npos ? 0 : std::stoul(buffer.substr(at + 16));
      while (buffer.size() < end + 4 + body) {
        const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
        if (n <= 0) {
          ::close(fd);
          return;
        }
        buffer.append(chunk, static_cast<size_t>(n));
      }
      buffer.erase(0, end + 4 + body);
      const std::string reply = answer_(count_.fetch_add(1));
      if (reply.empty() || ::send(fd, reply.data(), reply.size(), MSG_NOSIGNAL) < 0) {
        ::close(fd);
        return;
      }
    }
  }

  std::function<std::string(int)> answer_;
  std::atomic<int> count_{0};
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
};

const std::string kRequest = "POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
const std::string kOk = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";

}  // namespace

TEST_CASE("loadgen: the HTTP target keeps connections alive and counts error answers") {
  TinyServer server([](int n) {
    return n % 4 == 3 ? std::string("HTTP/1.1 404 Not Found\r\nContent-Length: 16\r\n\r\n{\"error\":\"nope\"}") : kOk;
  });
  HttpTargetOptions o{"127.0.0.1", server.port(), {kRequest}, 4, 5000};
  HttpTarget target(o);
  const RunResult r = run_open_loop(target, std::vector<int64_t>(40, 0), {}, OpenLoopOptions{});
  CHECK_EQ(count_ok(r), size_t{30});
  CHECK_EQ(r.errors.at("HTTP 404: nope"), uint64_t{10});
  CHECK_EQ(target.reconnects(), uint64_t{0});
  const RunResult closed = run_closed_loop(target, 5, 4, kTimeoutNs);  // 4 connections: one query of 4 at a time
  CHECK_EQ(closed.ok.size(), size_t{5});
}

TEST_CASE("loadgen: the HTTP target survives a server that closes connections and one that talks nonsense") {
  TinyServer closing([](int n) { return n % 3 == 1 ? std::string() : kOk; });
  HttpTarget target(HttpTargetOptions{"127.0.0.1", closing.port(), {kRequest}, 2, 5000});
  const RunResult r = run_open_loop(target, std::vector<int64_t>(30, 0), {}, OpenLoopOptions{});
  // A connection closed before the answer is resent once (it may have been an idle
  // keep-alive one), so some closings are recovered and the rest counted: none is lost.
  CHECK_EQ(r.ok.size(), size_t{30});
  uint64_t failed = 0;
  for (const auto& [text, count] : r.errors) failed += count;
  CHECK_EQ(count_ok(r) + failed, size_t{30});
  CHECK(target.reconnects() > 0);

  TinyServer nonsense([](int) { return std::string("garbage\r\n\r\n"); });
  HttpTarget confused(HttpTargetOptions{"127.0.0.1", nonsense.port(), {kRequest}, 2, 5000});
  const RunResult bad = run_open_loop(confused, std::vector<int64_t>(6, 0), {}, OpenLoopOptions{});
  CHECK_EQ(count_ok(bad), size_t{0});
  CHECK_EQ(bad.errors.size(), size_t{1});
  CHECK(bad.errors.begin()->first.find("malformed HTTP response") != std::string::npos);
}

TEST_CASE("loadgen: an HTTP target that cannot connect says so") {
  std::string port;
  {
    TinyServer gone([](int) { return kOk; });
    port = gone.port();
  }  // closed: nothing listens there now
  CHECK_THROWS_CODE(HttpTarget(HttpTargetOptions{"127.0.0.1", port, {kRequest}, 1, 5000}), ErrorCode::kUnavailable);
  CHECK_THROWS_CODE(HttpTarget(HttpTargetOptions{"no-such-host.invalid", "80", {kRequest}, 1, 5000}),
                    ErrorCode::kUnavailable);
}
