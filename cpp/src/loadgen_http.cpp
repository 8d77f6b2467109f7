// The load generator's HTTP target: a keep-alive client over POSIX sockets, one epoll
// thread reading every connection's answers (the parser is in loadgen_http_parser.cpp).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "conveyor/loadgen.h"

namespace conveyor::loadgen {

namespace {

constexpr uint64_t kStopTag = ~uint64_t{0};
constexpr int kWriteTimeoutMs = 10'000;

std::string errno_text(int error) { return std::strerror(error); }

std::string address_text(const sockaddr_storage& address) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (address.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&address);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  const auto* a = reinterpret_cast<const sockaddr_in6*>(&address);
  inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
  port = ntohs(a->sin6_port);
  std::string text = "[";  // built piecewise: "[" + string trips GCC 12's -Wrestrict
  text += host;
  text += "]:";
  text += std::to_string(port);
  return text;
}

// Writes all of `data`, waiting for room when the socket is full; false with `error` set.
bool write_all(int fd, const std::string& data, std::string* error) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd waiting{fd, POLLOUT, 0};
      if (poll(&waiting, 1, kWriteTimeoutMs) <= 0) {
        *error = "the server took no data for " + std::to_string(kWriteTimeoutMs / 1000) + " s";
        return false;
      }
      continue;
    }
    *error = errno_text(errno);
    return false;
  }
  return true;
}

}  // namespace

struct HttpConnection {
  std::mutex mu;
  int fd = -1;              // guarded by mu; -1: closed, reopened by the next send
  uint32_t generation = 0;  // guarded by mu; bumped per open and close, so stale events are told apart
  bool busy = false;        // guarded by mu: a request is in flight
  bool reused = false;      // guarded by mu: has answered before (a keep-alive connection)
  bool retried = false;     // guarded by mu: the request in flight was already resent once
  std::shared_ptr<Recorder> recorder;  // guarded by mu: the run of the request in flight
  uint64_t query = 0;
  size_t sample = 0;
  HttpResponseParser parser;
};

struct HttpTarget::Impl {
  HttpTargetOptions options;
  std::string where;  // "host:port", for messages
  std::vector<sockaddr_storage> addresses;
  std::vector<socklen_t> address_lengths;
  std::vector<std::unique_ptr<HttpConnection>> connections;  // fixed after construction
  std::mutex free_mu;
  std::vector<size_t> free;  // guarded by free_mu: idle connections
  int epoll_fd = -1;
  int stop_fd = -1;
  std::thread receiver;
  std::atomic<uint64_t> reconnects{0};
  std::vector<char> buffer = std::vector<char>(64 * 1024);  // the receiver thread's

  // A connected non-blocking socket, or -1 with `error` set.
  int connect_socket(std::string* error) const {
    for (size_t i = 0; i < addresses.size(); ++i) {
      const int fd = ::socket(addresses[i].ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) {
        *error = "socket(): " + errno_text(errno);
        continue;
      }
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addresses[i]), address_lengths[i]);
      if (rc < 0 && errno == EINPROGRESS) {
        pollfd waiting{fd, POLLOUT, 0};
        rc = poll(&waiting, 1, static_cast<int>(options.connect_timeout_ms));
        int so_error = 0;
        socklen_t length = sizeof so_error;
        if (rc == 0) {
          so_error = ETIMEDOUT;
        } else if (rc > 0) {
          getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &length);
        } else {
          so_error = errno;
        }
        rc = so_error ? -1 : 0;
        errno = so_error;
      }
      if (rc == 0) return fd;
      *error = address_text(addresses[i]) + ": " + errno_text(errno);
      ::close(fd);
    }
    return -1;
  }

  // Opens `c`'s socket and watches it. c.mu held.
  bool open(size_t index, HttpConnection& c, std::string* error) {
    const int fd = connect_socket(error);
    if (fd < 0) return false;
    c.fd = fd;
    ++c.generation;
    c.reused = false;
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP;
    event.data.u64 = (static_cast<uint64_t>(index) << 32) | c.generation;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) {
      *error = "epoll_ctl: " + errno_text(errno);
      close(c);
      return false;
    }
    return true;
  }

  void close(HttpConnection& c) {  // c.mu held
    if (c.fd < 0) return;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c.fd, nullptr);
    ::close(c.fd);
    c.fd = -1;
    ++c.generation;
  }

  // Ends the request in flight on connection `index`: the connection goes back to the idle
  // ones BEFORE the recorder hears of it, so a free slot always has a free connection.
  void finish(size_t index, std::unique_lock<std::mutex>& lock, bool ok, const std::string& error) {
    HttpConnection& c = *connections[index];
    std::shared_ptr<Recorder> recorder = std::move(c.recorder);
    const uint64_t query = c.query;
    c.recorder.reset();
    c.busy = false;
    lock.unlock();
    {
      std::lock_guard<std::mutex> free_lock(free_mu);
      free.push_back(index);
    }
    if (recorder) recorder->complete(query, ok, error);
  }

  // Resends the request in flight on a fresh connection, once: a keep-alive connection the
  // server closed while idle is not an error of the request. c.mu held; false if impossible.
  bool resend(size_t index, HttpConnection& c) {
    if (!c.reused || c.retried) return false;
    c.retried = true;
    close(c);
    std::string ignored;
    if (!open(index, c, &ignored)) return false;
    reconnects.fetch_add(1, std::memory_order_relaxed);
    c.parser.reset();
    return write_all(c.fd, options.requests[c.sample], &ignored);
  }

  void on_readable(size_t index, uint32_t generation) {
    HttpConnection& c = *connections[index];
    std::unique_lock<std::mutex> lock(c.mu);
    if (c.fd < 0 || c.generation != generation) return;
    while (true) {
      const ssize_t n = ::recv(c.fd, buffer.data(), buffer.size(), 0);
      if (n > 0) {
        if (!c.busy) {  // bytes nobody asked for: the stream is out of step
          close(c);
          return;
        }
        size_t consumed = 0;
        const auto state = c.parser.feed(buffer.data(), static_cast<size_t>(n), &consumed);
        if (state == HttpResponseParser::State::kMalformed) {
          const std::string error = "malformed HTTP response from " + where + ": " + c.parser.error();
          close(c);
          finish(index, lock, false, error);
          return;
        }
        if (state == HttpResponseParser::State::kDone) {
          complete_response(index, c, lock, consumed < static_cast<size_t>(n));
          return;
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      // End of stream or a socket error.
      const std::string cause = n == 0 ? std::string("closed by the server") : errno_text(errno);
      if (!c.busy) {
        close(c);
        return;
      }
      if (n == 0 && c.parser.started() && c.parser.feed_eof() == HttpResponseParser::State::kDone) {
        complete_response(index, c, lock, false);
        return;
      }
      if (!c.parser.started() && resend(index, c)) return;
      close(c);
      finish(index, lock, false, "connection to " + where + " " + cause + " before the response was complete");
      return;
    }
  }

  void complete_response(size_t index, HttpConnection& c, std::unique_lock<std::mutex>& lock, bool extra_bytes) {
    const bool ok = c.parser.ok();
    const std::string error = ok ? std::string() : c.parser.describe();
    if (extra_bytes || !c.parser.keep_alive()) {
      close(c);
    } else {
      c.reused = true;
    }
    c.parser.reset();
    finish(index, lock, ok, error);
  }

  void receive_loop() {
    epoll_event events[64];
    while (true) {
      const int n = epoll_wait(epoll_fd, events, 64, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        return;
      }
      for (int i = 0; i < n; ++i) {
        const uint64_t tag = events[i].data.u64;
        if (tag == kStopTag) return;
        on_readable(static_cast<size_t>(tag >> 32), static_cast<uint32_t>(tag & 0xFFFFFFFFu));
      }
    }
  }
};

HttpTarget::HttpTarget(HttpTargetOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (options.connections < 1) throw Error(ErrorCode::kInvalidInput, "[loadgen] an HTTP target needs at least one connection");
  if (options.requests.empty()) throw Error(ErrorCode::kInvalidInput, "[loadgen] an HTTP target needs at least one request");
  if (options.connect_timeout_ms < 1) throw Error(ErrorCode::kInvalidInput, "[loadgen] the connect timeout must be >= 1 ms");
  m.where = (options.host.find(':') != std::string::npos ? "[" + options.host + "]" : options.host) + ":" + options.port;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(options.host.c_str(), options.port.c_str(), &hints, &found);
  if (rc != 0) {
    throw Error(ErrorCode::kUnavailable, "[loadgen] cannot resolve " + m.where + ": " + gai_strerror(rc) +
                                             " (check the host name and port of the URL)");
  }
  for (addrinfo* a = found; a; a = a->ai_next) {
    sockaddr_storage address{};
    std::memcpy(&address, a->ai_addr, a->ai_addrlen);
    m.addresses.push_back(address);
    m.address_lengths.push_back(a->ai_addrlen);
  }
  freeaddrinfo(found);
  m.options = std::move(options);
  m.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  m.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (m.epoll_fd < 0 || m.stop_fd < 0) {
    const std::string error = errno_text(errno);
    if (m.epoll_fd >= 0) ::close(m.epoll_fd);
    if (m.stop_fd >= 0) ::close(m.stop_fd);
    throw Error(ErrorCode::kUnavailable, "[loadgen] cannot create the HTTP client's event loop: " + error);
  }
  epoll_event stop{};
  stop.events = EPOLLIN;
  stop.data.u64 = kStopTag;
  epoll_ctl(m.epoll_fd, EPOLL_CTL_ADD, m.stop_fd, &stop);
  for (size_t i = 0; i < m.options.connections; ++i) {
    m.connections.push_back(std::make_unique<HttpConnection>());
    m.free.push_back(m.options.connections - 1 - i);  // popped from the back: connection 0 first
  }
  for (size_t i = 0; i < m.connections.size(); ++i) {
    std::lock_guard<std::mutex> lock(m.connections[i]->mu);
    std::string error;
    if (!m.open(i, *m.connections[i], &error)) {
      for (auto& c : m.connections) m.close(*c);
      ::close(m.epoll_fd);
      ::close(m.stop_fd);
      throw Error(ErrorCode::kUnavailable, "[loadgen] cannot connect to " + m.where + " (" + error +
                                               "): is the server running, and are the host and port right?");
    }
  }
  m.receiver = std::thread([&m] { m.receive_loop(); });
}

HttpTarget::~HttpTarget() {
  Impl& m = *impl_;
  const uint64_t one = 1;
  if (::write(m.stop_fd, &one, sizeof one) < 0) {
    // An eventfd write fails only on overflow, which one write cannot reach.
  }
  m.receiver.join();
  for (auto& c : m.connections) {
    std::lock_guard<std::mutex> lock(c->mu);
    m.close(*c);
  }
  ::close(m.epoll_fd);
  ::close(m.stop_fd);
}

void HttpTarget::send(const std::shared_ptr<Recorder>& recorder, uint64_t query, size_t sample) {
  Impl& m = *impl_;
  size_t index = 0;
  {
    std::lock_guard<std::mutex> lock(m.free_mu);
    if (m.free.empty()) {
      // The engine keeps requests below capacity(), so this only follows a broken promise.
      recorder->complete(query, false, "no free connection to " + m.where);
      return;
    }
    index = m.free.back();
    m.free.pop_back();
  }
  HttpConnection& c = *m.connections[index];
  std::unique_lock<std::mutex> lock(c.mu);
  c.recorder = recorder;
  c.query = query;
  c.sample = sample;
  c.retried = false;
  c.parser.reset();
  std::string error;
  if (c.fd < 0) {
    if (!m.open(index, c, &error)) {
      m.finish(index, lock, false, "cannot reconnect to " + m.where + ": " + error);
      return;
    }
    m.reconnects.fetch_add(1, std::memory_order_relaxed);
  }
  c.busy = true;
  if (!write_all(c.fd, m.options.requests[sample], &error) && !m.resend(index, c)) {
    m.close(c);
    m.finish(index, lock, false, "cannot send to " + m.where + ": " + error);
  }
}

size_t HttpTarget::sample_count() const noexcept { return impl_->options.requests.size(); }

size_t HttpTarget::capacity() const noexcept { return impl_->connections.size(); }

void HttpTarget::abandon() noexcept {
  Impl& m = *impl_;
  for (size_t i = 0; i < m.connections.size(); ++i) {
    HttpConnection& c = *m.connections[i];
    std::unique_lock<std::mutex> lock(c.mu);
    if (!c.busy) continue;
    m.close(c);  // its answer, if it ever comes, must not be read as the next request's
    try {
      m.finish(i, lock, false, "abandoned at the end of the run");
    } catch (...) {  // the free list could not grow: the connection stays out of use
    }
  }
}

uint64_t HttpTarget::reconnects() const noexcept { return impl_->reconnects.load(std::memory_order_relaxed); }

}  // namespace conveyor::loadgen
