// The native HTTP/1.1 data plane (conveyor/http_frontend.h), on Boost.Beast and
// Boost.JSON.
#include "conveyor/http_frontend.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json/src.hpp>  // header-only Boost.JSON: compiled here, in this one translation unit


#include <algorithm>
#include <atomic>
#include <charconv>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <zlib.h>

#include "conveyor/batcher.h"
#include "conveyor/error.h"

namespace conveyor {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;

// Everything runs on one io_context: its executor type, named (not type-erased), so no
// handler pays for any_io_executor's copies.
using IoExecutor = asio::io_context::executor_type;
using Socket = asio::basic_stream_socket<tcp, IoExecutor>;
using Acceptor = asio::basic_socket_acceptor<tcp, IoExecutor>;
using Stream = beast::basic_stream<tcp, IoExecutor>;
using Timer = asio::basic_waitable_timer<std::chrono::steady_clock, asio::wait_traits<std::chrono::steady_clock>, IoExecutor>;

constexpr std::string_view kHeaderLength = "Inference-Header-Content-Length";

// A decimal byte count with nothing around it, as Content-Length is written.
std::optional<size_t> byte_count(std::string_view text) {
  size_t value = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// A request body's bytes, placed so that the byte after the JSON header of the binary
// tensor extension (Inference-Header-Content-Length bytes in) starts on a kAlignment
// boundary. Clients write headers of any length, so without this three requests in four
// would carry their FP32 data at an address no kernel may read it from in place, and a
// request alone in its batch would be copied. Grows without zero-filling: every byte is
// written by the read before it is used.
class BodyBytes {
 public:
  static constexpr size_t kAlignment = 16;  // operator new[]'s own: __STDCPP_DEFAULT_NEW_ALIGNMENT__
  static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= kAlignment);

  BodyBytes() = default;
  BodyBytes(const BodyBytes& other) {
    if (!other.storage_) return;
    // The same placement, so that a copy's data is aligned where the original's is.
    storage_.reset(new uint8_t[other.pad_ + other.size_]);
    pad_ = other.pad_;
    size_ = capacity_ = other.size_;
    if (size_) std::memcpy(data(), other.data(), size_);
  }
  BodyBytes(BodyBytes&& other) noexcept
      : storage_(std::move(other.storage_)), pad_(other.pad_), size_(other.size_), capacity_(other.capacity_) {
    other.pad_ = other.size_ = other.capacity_ = 0;
  }
  BodyBytes& operator=(BodyBytes other) noexcept {
    std::swap(storage_, other.storage_);
    std::swap(pad_, other.pad_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    return *this;
  }

  uint8_t* data() noexcept { return storage_.get() + pad_; }
  const uint8_t* data() const noexcept { return storage_.get() + pad_; }
  size_t size() const noexcept { return size_; }

  // Room for `bytes` in all, the first storage placed so that offset `lead` is aligned;
  // a later growth keeps the placement.
  void reserve(size_t bytes, size_t lead) {
    if (storage_ && bytes <= capacity_) return;
    const size_t pad = storage_ ? pad_ : (kAlignment - lead % kAlignment) % kAlignment;
    std::unique_ptr<uint8_t[]> grown(new uint8_t[pad + bytes]);  // default-initialized: not zeroed
    if (size_) std::memcpy(grown.get() + pad, data(), size_);
    storage_ = std::move(grown);
    pad_ = pad;
    capacity_ = bytes;
  }
  // `n` more bytes at the end, left unwritten for the caller; the address of the first.
  uint8_t* extend(size_t n, size_t lead) {
    if (size_ + n > capacity_) reserve(std::max(size_ + n, capacity_ * 2), lead);
    uint8_t* at = data() + size_;
    size_ += n;
    return at;
  }

 private:
  std::unique_ptr<uint8_t[]> storage_;
  size_t pad_ = 0;       // bytes before data()
  size_t size_ = 0;      // bytes written
  size_t capacity_ = 0;  // bytes after data() the storage holds
};

// The request body type: read into BodyBytes, placed as above; written (to the server
// behind, when a request is forwarded) as one buffer.
struct RequestBody {
  using value_type = BodyBytes;

  static std::uint64_t size(const value_type& body) { return body.size(); }

  class reader {
   public:
    // Beast makes the reader with its parser, before the head is read: the fields are
    // looked at in init(), once the head is whole.
    template <bool isRequest, class Fields>
    reader(http::header<isRequest, Fields>& header, value_type& body) : fields_(header), body_(body) {
      static_assert(std::is_same_v<Fields, http::fields>);
    }
    void init(const boost::optional<std::uint64_t>& length, beast::error_code& ec) {
      // A malformed value places nothing; the request is refused later, with its reason.
      if (auto field = fields_.find(kHeaderLength); field != fields_.end()) {
        lead_ = byte_count(field->value()).value_or(0);
      }
      // The parser's body_limit has already refused a length over the limit.
      if (length) body_.reserve(static_cast<size_t>(*length), lead_);
      ec = {};
    }
    template <class ConstBufferSequence>
    std::size_t put(const ConstBufferSequence& buffers, beast::error_code& ec) {
      const size_t n = beast::buffer_bytes(buffers);
      ec = {};
      return asio::buffer_copy(asio::buffer(body_.extend(n, lead_), n), buffers);
    }
    void finish(beast::error_code& ec) { ec = {}; }

   private:
    const http::fields& fields_;
    value_type& body_;
    size_t lead_ = 0;
  };

  class writer {
   public:
    using const_buffers_type = asio::const_buffer;
    template <bool isRequest, class Fields>
    writer(const http::header<isRequest, Fields>&, const value_type& body) : body_(body) {}
    void init(beast::error_code& ec) { ec = {}; }
    boost::optional<std::pair<const_buffers_type, bool>> get(beast::error_code& ec) {
      ec = {};
      return {{const_buffers_type(body_.data(), body_.size()), false}};
    }

   private:
    const value_type& body_;
  };
};
using Request = http::request<RequestBody>;
using Response = http::response<http::string_body>;

// The body of an inference answer with binary outputs: the JSON header, then each binary
// output written from the batch's own output memory (kept alive by `keep` until written),
// so that no output is copied into the answer.
struct OutputsBody {
  struct value_type {
    std::string header;
    std::vector<asio::const_buffer> outputs;
    std::shared_ptr<const void> keep;
  };

  static uint64_t size(const value_type& body) {
    uint64_t n = body.header.size();
    for (const asio::const_buffer& b : body.outputs) n += b.size();
    return n;
  }

  class writer {
   public:
    using const_buffers_type = std::vector<asio::const_buffer>;

    template <bool isRequest, typename Fields>
    writer(const http::header<isRequest, Fields>&, const value_type& body) : body_(body) {}

    void init(beast::error_code& ec) { ec = {}; }

    boost::optional<std::pair<const_buffers_type, bool>> get(beast::error_code& ec) {
      ec = {};
      if (done_) return boost::none;
      done_ = true;
      const_buffers_type buffers;
      buffers.reserve(body_.outputs.size() + 1);
      buffers.emplace_back(body_.header.data(), body_.header.size());
      buffers.insert(buffers.end(), body_.outputs.begin(), body_.outputs.end());
      return std::make_pair(std::move(buffers), false);
    }

   private:
    const value_type& body_;
    bool done_ = false;
  };
};
using OutputsResponse = http::response<OutputsBody>;

unsigned status_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidInput: return 400;
    case ErrorCode::kQueueFull:
    case ErrorCode::kUnavailable:
    case ErrorCode::kOutOfMemory: return 503;
    case ErrorCode::kDeadlineExceeded: return 504;
    case ErrorCode::kCancelled: return 499;
    default: return 500;
  }
}

Response json_response(unsigned status, std::string body) {
  Response res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "application/json");
  res.body() = std::move(body);
  return res;
}

Response error_response(unsigned status, std::string_view message) {
  json::object doc;
  doc["error"] = message;
  return json_response(status, json::serialize(doc));
}

// Path segments after "/v2", the query dropped.
std::vector<std::string_view> split_path(std::string_view target) {
  if (auto q = target.find('?'); q != std::string_view::npos) target = target.substr(0, q);
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (start <= target.size()) {
    size_t end = target.find('/', start);
    if (end == std::string_view::npos) end = target.size();
    if (end > start) parts.push_back(target.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

// A JSON number as element type T; false when it is not a number of that kind.
template <class T>
bool element_from_json(const json::value& v, T* out) {
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_bool()) return false;
    *out = v.get_bool();
    return true;
  } else if constexpr (std::is_floating_point_v<T>) {
    if (v.is_double()) *out = static_cast<T>(v.get_double());
    else if (v.is_int64()) *out = static_cast<T>(v.get_int64());
    else if (v.is_uint64()) *out = static_cast<T>(v.get_uint64());
    else return false;
    return true;
  } else {
    if (v.is_int64()) {
      const int64_t x = v.get_int64();
      if constexpr (std::is_unsigned_v<T>) {
        if (x < 0 || static_cast<uint64_t>(x) > std::numeric_limits<T>::max()) return false;
      } else {
        if (x < std::numeric_limits<T>::min() || x > std::numeric_limits<T>::max()) return false;
      }
      *out = static_cast<T>(x);
      return true;
    }
    if (v.is_uint64()) {
      const uint64_t x = v.get_uint64();
      if (x > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
      *out = static_cast<T>(x);
      return true;
    }
    return false;
  }
}

template <class T>
bool flatten_into(const json::value& v, std::vector<T>* out) {
  if (v.is_array()) {
    for (const json::value& item : v.as_array()) {
      if (!flatten_into(item, out)) return false;
    }
    return true;
  }
  T x{};
  if (!element_from_json(v, &x)) return false;
  out->push_back(x);
  return true;
}

// An input given as JSON "data", converted into a buffer of its own.
template <class T>
std::shared_ptr<void> json_data(const json::value& data, int64_t count, const std::string& name, void** ptr) {
  auto values = std::make_shared<std::vector<T>>();
  values->reserve(static_cast<size_t>(std::min<int64_t>(count, int64_t{1} << 16)));  // the shape may lie
  if (!flatten_into(data, values.get())) {
    throw Error(ErrorCode::kInvalidInput, "input '" + name + "': 'data' holds a value that is not of its datatype");
  }
  if (static_cast<int64_t>(values->size()) != count) {
    throw Error(ErrorCode::kInvalidInput, "input '" + name + "': 'data' has " + std::to_string(values->size()) +
                                              " elements but its shape holds " + std::to_string(count));
  }
  *ptr = values->data();
  return values;
}

std::shared_ptr<void> json_input(DType dtype, const json::value& data, int64_t count, const std::string& name,
                                 void** ptr) {
  switch (dtype) {
    case DType::kBool: {
      // std::vector<bool> is packed: convert through uint8_t, one byte per element.
      auto values = std::make_shared<std::vector<uint8_t>>();
      std::vector<bool> bits;
      if (!flatten_into(data, &bits) || static_cast<int64_t>(bits.size()) != count) {
        throw Error(ErrorCode::kInvalidInput, "input '" + name + "': 'data' does not hold " + std::to_string(count) +
                                                  " booleans");
      }
      values->assign(bits.begin(), bits.end());
      *ptr = values->data();
      return values;
    }
    case DType::kUInt8: return json_data<uint8_t>(data, count, name, ptr);
    case DType::kUInt16: return json_data<uint16_t>(data, count, name, ptr);
    case DType::kUInt32: return json_data<uint32_t>(data, count, name, ptr);
    case DType::kUInt64: return json_data<uint64_t>(data, count, name, ptr);
    case DType::kInt8: return json_data<int8_t>(data, count, name, ptr);
    case DType::kInt16: return json_data<int16_t>(data, count, name, ptr);
    case DType::kInt32: return json_data<int32_t>(data, count, name, ptr);
    case DType::kInt64: return json_data<int64_t>(data, count, name, ptr);
    case DType::kFloat32: return json_data<float>(data, count, name, ptr);
    case DType::kFloat64: return json_data<double>(data, count, name, ptr);
    default:
      throw Error(ErrorCode::kInvalidInput, std::string("input '") + name + "': datatype " + dtype_name(dtype) +
                                                " is accepted only as binary data by this front end");
  }
}

// A float as the Python front end's encoder (orjson) writes it, so that both front ends
// answer the same text: the shortest digits that read back as the same value, positional
// from 1e-5 (1e-6 for FP32) up to below 1e16 (1e13 for FP32) with at least one decimal
// ("2.0"), otherwise "d.ddde+x" / "d.ddde-x"; NaN and infinities as null.
template <class T>
void append_float(T v, std::string* out) {
  if (!std::isfinite(v)) {
    *out += "null";
    return;
  }
  char text[48];
  const auto written = std::to_chars(text, text + sizeof text, v, std::chars_format::scientific);
  std::string_view s(text, static_cast<size_t>(written.ptr - text));  // [-]d[.ddd]e(+|-)xx
  if (s.front() == '-') {
    *out += '-';
    s.remove_prefix(1);
  }
  const size_t e = s.find('e');
  char digits[24];
  size_t length = 0;
  for (char c : s.substr(0, e)) {
    if (c != '.') digits[length++] = c;
  }
  int exponent = 0;
  std::string_view power = s.substr(e + 1);
  const bool negative_power = power.front() == '-';
  power.remove_prefix(1);
  std::from_chars(power.data(), power.data() + power.size(), exponent);
  if (negative_power) exponent = -exponent;
  constexpr int kMostWhole = std::is_same_v<T, float> ? 13 : 16;
  constexpr int kFewestLeadingZeros = std::is_same_v<T, float> ? -6 : -5;
  const std::string_view d(digits, length);
  const int whole = exponent + 1;  // value = 0.<digits> x 10^whole
  const int n = static_cast<int>(length);
  if (whole >= n && whole <= kMostWhole) {
    *out += d;
    out->append(static_cast<size_t>(whole - n), '0');
    *out += ".0";
  } else if (whole > 0 && whole <= kMostWhole) {
    *out += d.substr(0, static_cast<size_t>(whole));
    *out += '.';
    *out += d.substr(static_cast<size_t>(whole));
  } else if (whole > kFewestLeadingZeros && whole <= 0) {
    *out += "0.";
    out->append(static_cast<size_t>(-whole), '0');
    *out += d;
  } else {
    *out += d.front();
    if (n > 1) {
      *out += '.';
      *out += d.substr(1);
    }
    *out += exponent >= 0 ? "e+" : "e";
    *out += std::to_string(exponent);
  }
}

template <class T>
void append_json_values(const uint8_t* src, int64_t count, std::string* out) {
  char text[24];
  for (int64_t i = 0; i < count; ++i) {
    if (i) *out += ',';
    T x;
    std::memcpy(&x, src + i * sizeof(T), sizeof(T));
    if constexpr (std::is_floating_point_v<T>) {
      append_float(x, out);
    } else {
      const auto written = std::to_chars(text, text + sizeof text, x);
      out->append(text, written.ptr);
    }
  }
}

// The datatypes this front end writes as JSON "data"; a request asking for another as JSON
// is forwarded.
bool json_writable(DType dtype) {
  switch (dtype) {
    case DType::kBool: case DType::kUInt8: case DType::kUInt16: case DType::kUInt32: case DType::kUInt64:
    case DType::kInt8: case DType::kInt16: case DType::kInt32: case DType::kInt64:
    case DType::kFloat32: case DType::kFloat64:
      return true;
    default:
      return false;
  }
}

// Appends `count` elements as the comma-separated items of a JSON array.
void json_output(DType dtype, const uint8_t* src, int64_t count, std::string* out) {
  switch (dtype) {
    case DType::kBool:
      for (int64_t i = 0; i < count; ++i) *out += i ? (src[i] ? ",true" : ",false") : (src[i] ? "true" : "false");
      return;
    case DType::kUInt8: return append_json_values<uint8_t>(src, count, out);
    case DType::kUInt16: return append_json_values<uint16_t>(src, count, out);
    case DType::kUInt32: return append_json_values<uint32_t>(src, count, out);
    case DType::kUInt64: return append_json_values<uint64_t>(src, count, out);
    case DType::kInt8: return append_json_values<int8_t>(src, count, out);
    case DType::kInt16: return append_json_values<int16_t>(src, count, out);
    case DType::kInt32: return append_json_values<int32_t>(src, count, out);
    case DType::kInt64: return append_json_values<int64_t>(src, count, out);
    case DType::kFloat32: return append_json_values<float>(src, count, out);
    case DType::kFloat64: return append_json_values<double>(src, count, out);
    default:
      throw Error(ErrorCode::kInternal, std::string("output datatype ") + dtype_name(dtype) +
                                            " cannot be written as JSON by this front end");
  }
}

// Appends `text` as a JSON string (quoted, escaped).
void append_json_string(std::string_view text, std::string* out) { *out += json::serialize(json::string_view(text)); }

// Answers under this size go out as they are, as from the Python front end (compression.py):
// compressing one packet's worth costs more than it saves.
constexpr size_t kMinCompressedBodyBytes = 1024;

// "gzip" or "deflate", whichever an Accept-Encoding value rates higher (gzip on a tie), or
// empty: codings are rated by their q-values (1 when absent), "*" rates those not named,
// "x-gzip" is gzip, and q=0 refuses a coding (the rules of compression.accepted_compression).
std::string_view accepted_compression(std::string_view accept) {
  double gzip = -1, deflate = -1, wildcard = 0;
  while (!accept.empty()) {
    const size_t comma = accept.find(',');
    std::string_view item = accept.substr(0, comma);
    accept = comma == std::string_view::npos ? std::string_view{} : accept.substr(comma + 1);
    const size_t semi = item.find(';');
    std::string_view coding = item.substr(0, semi);
    double quality = 1.0;
    for (std::string_view rest = semi == std::string_view::npos ? std::string_view{} : item.substr(semi + 1);
         !rest.empty();) {
      const size_t next = rest.find(';');
      std::string_view parameter = rest.substr(0, next);
      rest = next == std::string_view::npos ? std::string_view{} : rest.substr(next + 1);
      const size_t eq = parameter.find('=');
      std::string_view key = parameter.substr(0, eq);
      while (!key.empty() && key.front() == ' ') key.remove_prefix(1);
      while (!key.empty() && key.back() == ' ') key.remove_suffix(1);
      if (eq == std::string_view::npos || !beast::iequals(key, "q")) continue;
      std::string value(parameter.substr(eq + 1));
      char* end = nullptr;
      quality = std::strtod(value.c_str(), &end);
      if (end == value.c_str()) quality = 0.0;
    }
    while (!coding.empty() && (coding.front() == ' ' || coding.front() == '\t')) coding.remove_prefix(1);
    while (!coding.empty() && (coding.back() == ' ' || coding.back() == '\t')) coding.remove_suffix(1);
    if (beast::iequals(coding, "gzip") || beast::iequals(coding, "x-gzip")) gzip = quality;
    else if (beast::iequals(coding, "deflate")) deflate = quality;
    else if (coding == "*") wildcard = quality;
  }
  if (gzip < 0) gzip = wildcard;
  if (deflate < 0) deflate = wildcard;
  if (gzip > 0 && gzip >= deflate) return "gzip";
  if (deflate > 0) return "deflate";
  return {};
}

// `body` compressed by zlib at its fastest level, as gzip or as a zlib stream ("deflate").
std::string compressed(const std::string& body, std::string_view encoding) {
  z_stream z{};
  if (deflateInit2(&z, 1, Z_DEFLATED, encoding == "gzip" ? 31 : 15, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
    throw Error(ErrorCode::kOutOfMemory, "[http] zlib could not start compressing an answer");
  }
  std::string out(deflateBound(&z, body.size()), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(body.data()));
  z.avail_in = static_cast<uInt>(body.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  const int status = deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  if (status != Z_STREAM_END) throw Error(ErrorCode::kInternal, "[http] zlib could not compress an answer");
  return out;
}

struct OutputChoice {
  int index;
  bool binary;
};

}  // namespace

class Session;

struct PendingRequest {
  std::shared_ptr<Session> session;
  std::shared_ptr<const FrontendModel> model;
  std::string id;
  std::vector<OutputChoice> outputs;
  std::string accept_encoding;  // the request's Accept-Encoding, when it had one
  bool has_accept_encoding = false;
  bool named_version = false;  // the path named the version
  std::string rollout;  // the rollout that routed it, answered as the "rollout" parameter; empty: none
};

struct HttpFrontend::Core {
  explicit Core(HttpFrontendOptions o) : options(std::move(o)) {}

  HttpFrontendOptions options;
  // Shared with the completion sink, which posts to it from batcher threads: the sink never
  // holds the Core, so the Core (and the batchers its models hold) is never released on a
  // batcher thread, where the last reference to a batcher would join that very thread.
  std::shared_ptr<asio::io_context> io = std::make_shared<asio::io_context>(1);
  asio::io_context& ioc = *io;
  Acceptor acceptor{ioc.get_executor()};
  std::unordered_set<Session*> sessions;  // I/O thread only: closed by stop()
  // Keeps run() going while nothing waits on a socket: after drain() closes the listener,
  // the requests in the batchers still have answers to post here.
  asio::executor_work_guard<IoExecutor> keep_running{ioc.get_executor()};
  std::thread thread;
  std::shared_ptr<CompletionSink> sink;
  FrontendModels models;
  mutable std::mutex metadata_mu;
  std::string server_metadata;  // guarded by metadata_mu: the body of GET /v2
  std::atomic<bool> started{false};  // health and metadata are answered here (serve_health)
  std::atomic<bool> server_ready{false};  // GET /v2/health/ready is answered here (set_ready)
  std::unordered_map<uint64_t, PendingRequest> pending;  // I/O thread only
  std::once_flag stop_once;
  int port = 0;
  std::atomic<bool> draining{false};
  size_t connections = 0;  // I/O thread only
  std::atomic<size_t> in_flight{0};

  void accept();
  void handle(const std::shared_ptr<Session>& session, Request&& request);
  // Serves an inference request, or forwards it when it asks for what this front end does not do.
  void infer(const std::shared_ptr<Session>& session, std::shared_ptr<const FrontendModel> model, bool named_version,
             Request&& request);
  bool authorized(const Request& request) const;
  void complete(std::vector<Completion>&& done);
  // Hands the requests staged in this round of reads to their batchers, a group per model.
  void submit_staged();

  // An inference request read and checked, waiting for the end of the round of reads.
  struct Staged {
    std::shared_ptr<const FrontendModel> model;
    Batcher::Queued queued;
    PendingRequest pending;
    Request request;  // its body moved out: put back to forward it
    std::shared_ptr<BodyBytes> body;
  };
  std::vector<Staged> staged;  // I/O thread only
  bool flush_posted = false;   // I/O thread only: submit_staged is posted
  std::shared_ptr<const FrontendModel> find(std::string_view name) const { return models.find(name); }
};

// One connection: read a request, answer it, read the next (a pipelined request waits
// in the read buffer until the answer before it is written). The same limits as the
// Python front end's (HttpLimits): a connection idle for idle_timeout is closed, a
// request not read within request_read_timeout of its start gets 408, and so does a
// response the client does not take within it.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Socket socket, HttpFrontend::Core* core)
      : stream_(std::move(socket)), core_(core), deadline_(stream_.get_executor()) {
    ++core_->connections;
    core_->sessions.insert(this);
    count_chunk_ = [this](std::uint64_t size, beast::string_view, beast::error_code& ec) {
      // The last, empty chunk only ends the body: it is not counted.
      if (size != 0 && ++chunks_ > core_->options.max_request_chunks) {
        too_many_chunks_ = true;
        ec = http::error::bad_chunk;
      }
    };
  }
  ~Session() {
    if (counted_) --core_->connections;
    core_->sessions.erase(this);
  }

  // Closes the connection: its pending operations end (operation_aborted) and release it.
  void shut() { close(); }

  void start() {
    beast::error_code ec;
    stream_.socket().set_option(tcp::no_delay(true), ec);
    if (core_->connections > core_->options.max_connections) {
      keep_alive_ = false;
      respond(error_response(503, "the server has " + std::to_string(core_->options.max_connections) +
                                      " connections open, its limit; retry later, or raise the limit with "
                                      "--max-connections"));
      return;
    }
    read();
  }

  bool open() const { return stream_.socket().is_open(); }

  // Hands `request` to the fallback server over this connection's own upstream
  // connection (opened on first use, kept while both sides keep it) and relays the answer.
  void forward(Request&& request) {
    if (core_->options.fallback_port == 0) {
      respond(error_response(404, "no route for " + std::string(request.target())));
      return;
    }
    upstream_request_ = std::move(request);
    upstream_request_->keep_alive(true);
    if (upstream_ && upstream_->is_open()) {
      upstream_reused_ = true;
      write_upstream();
      return;
    }
    connect_upstream();
  }

  // The next answer is an accepted inference request's: the front end counts it in
  // flight until the answer is written (or the connection fails), so a drain waits for it.
  void answering_inference() { answering_inference_ = true; }

  void respond(Response&& res) { write_answer(std::move(res), response_); }
  void respond(OutputsResponse&& res) { write_answer(std::move(res), outputs_response_); }

 private:
  void connect_upstream() {
    upstream_reused_ = false;
    upstream_buffer_.clear();
    upstream_.emplace(stream_.get_executor());
    const tcp::endpoint endpoint{asio::ip::make_address("127.0.0.1"),
                                 static_cast<unsigned short>(core_->options.fallback_port)};
    upstream_->async_connect(endpoint, [self = shared_from_this()](beast::error_code ec) {
      if (ec) return self->upstream_failed(ec);
      beast::error_code ignored;
      self->upstream_->set_option(tcp::no_delay(true), ignored);
      self->write_upstream();
    });
  }

  void write_upstream() {
    upstream_parser_.reset();
    http::async_write(*upstream_, *upstream_request_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->upstream_failed(ec);
      self->upstream_parser_.emplace();
      self->upstream_parser_->body_limit(boost::none);
      http::async_read(*self->upstream_, self->upstream_buffer_, *self->upstream_parser_,
                       [self](beast::error_code ec, size_t) {
                         if (ec) return self->upstream_failed(ec);
                         Response res = self->upstream_parser_->release();
                         if (!res.keep_alive()) {
                           self->keep_alive_ = false;  // the server behind closes after this answer
                           beast::error_code ignored;
                           self->upstream_->close(ignored);
                         }
                         self->upstream_request_.reset();
                         self->respond(std::move(res));
                       });
    });
  }

  void upstream_failed(beast::error_code ec) {
    beast::error_code ignored;
    if (upstream_) upstream_->close(ignored);
    if (!open()) return;  // the client went away (closing its connection closed this one too)
    // A kept connection the server behind closed while idle (its --idle-timeout-s) fails
    // before any answer: the request was never read there, so it goes again on a new one.
    if (upstream_reused_ && !(upstream_parser_ && upstream_parser_->got_some())) {
      connect_upstream();
      return;
    }
    upstream_request_.reset();
    keep_alive_ = false;
    respond(error_response(502, "the server's Python front end did not answer: " + ec.message()));
  }

  // Reads the next request: its head first (Beast parses it once it is whole), then its body.
  void read() {
    parser_.emplace();
    parser_->body_limit(core_->options.max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(core_->options.max_header_bytes));
    parser_->on_chunk_header(count_chunk_);
    chunks_ = 0;
    too_many_chunks_ = false;
    scanned_ = 0;
    stream_.expires_never();  // the stream's own timeouts bound writes alone
    // Idle until the first byte, then the whole head: the idle timeout bounds both.
    arm(core_->options.idle_timeout);
    read_head();
  }

  // Parses the head once the buffer holds all of it, reading until it does. Before Beast
  // sees it, the head is checked for what Beast would accept and the Python front end
  // refuses: a folded header line (obs-fold), which Beast unfolds.
  void read_head() {
    // Empty lines before a request line are skipped (RFC 9112, section 2.2).
    while (buffer_.size() >= 2 && buffered().substr(0, 2) == "\r\n") buffer_.consume(2);
    const std::string_view head = buffered();
    const size_t end = head.find("\r\n\r\n", scanned_ > 3 ? scanned_ - 3 : 0);
    const size_t limit = end == std::string_view::npos ? head.size() : end + 2;
    for (size_t at = head.find("\r\n", scanned_); at != std::string_view::npos && at + 2 < limit;
         at = head.find("\r\n", at + 2)) {
      if (head[at + 2] == ' ' || head[at + 2] == '\t') {
        return fail(400, "malformed HTTP request: Unexpected whitespace after header value");
      }
    }
    scanned_ = limit >= 2 ? limit - 2 : 0;
    if (!head.empty()) {
      beast::error_code ec;
      buffer_.consume(parser_->put(buffer_.data(), ec));  // nothing, until the head is whole
      if (ec && ec != http::error::need_more) return on_read(ec);
      if (parser_->is_header_done()) return on_header();
      if (head.size() > core_->options.max_header_bytes) return on_read(http::error::header_limit);
    }
    read_more(&Session::read_head);
  }

  // The bytes read and not yet parsed (the start of a head, or the rest of a body).
  std::string_view buffered() const {
    return {static_cast<const char*>(buffer_.data().data()), buffer_.size()};
  }

  void on_header() {
    const auto& fields = parser_->get();
    size_t count = 0;
    for (auto it = fields.begin(); it != fields.end(); ++it) ++count;
    if (count > core_->options.max_header_count) {
      return fail(431, "the request has more than " + std::to_string(core_->options.max_header_count) +
                           " headers (--max-header-count)");
    }
    arm(core_->options.request_read_timeout);
    parser_->eager(true);
    // A client that sent 'Expect: 100-continue' waits for a 100 before it sends the body.
    auto expect = fields.find(http::field::expect);
    if (expect != fields.end() && beast::iequals(expect->value(), "100-continue") && !parser_->is_done()) {
      parser_->get().erase(http::field::expect);  // answered here: not forwarded
      continue_ = std::make_shared<http::response<http::empty_body>>(http::status::continue_, 11);
      http::async_write(stream_, *continue_, [self = shared_from_this()](beast::error_code ec, size_t) {
        self->continue_.reset();
        if (ec) return self->close();
        self->read_body();
      });
      return;
    }
    read_body();
  }

  // Parses the body from the buffer, reading until the request is whole.
  void read_body() {
    while (!parser_->is_done() && buffer_.size() > 0) {
      beast::error_code ec;
      const size_t used = parser_->put(buffer_.data(), ec);
      buffer_.consume(used);
      if (ec == http::error::need_more) {
        if (used == 0 && parser_->chunked() && unterminated_chunk_extension()) {
          return fail(400, "malformed HTTP request: Invalid character in chunk extensions quoted value");
        }
        break;
      }
      if (ec) return on_read(ec);
    }
    if (parser_->is_done()) return on_read({});
    read_more(&Session::read_body);
  }

  // Whether the buffer starts with a whole chunk line that Beast still waits on: one whose
  // quoted extension value is not closed on its line (Beast reads the quote on past the
  // line's end, for a closing quote that may never come; a quoted string holds no CR or LF).
  bool unterminated_chunk_extension() const {
    std::string_view data = buffered();
    if (data.substr(0, 2) == "\r\n") data.remove_prefix(2);  // the end of the chunk before
    const size_t eol = data.find("\r\n");
    const size_t semicolon = data.find(';');
    if (eol == std::string_view::npos || semicolon == std::string_view::npos || semicolon == 0 || semicolon > eol) {
      return false;
    }
    for (char c : data.substr(0, semicolon)) {  // the chunk size, then optional white space
      if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ' ' && c != '\t') return false;
    }
    return true;
  }

  // Reads more of the request into the buffer, then calls `next`. While a request is being
  // answered (busy), the connection is still read, so that a client that resets it is seen
  // at once and its connection closed; what it sends meanwhile (pipelined requests) is
  // kept, up to kMaxReadAhead bytes. A client that shuts its sending side down still gets
  // the answer it waits for.
  void read_more(void (Session::*next)()) {
    next_ = next;
    if (reading_) return;  // the read under way goes on to next_
    if (busy_ && buffer_.size() >= kMaxReadAhead) return;  // no reading ahead past the bound
    if (peer_closed_) {
      if (!busy_) close();  // nothing more will come
      return;
    }
    reading_ = true;
    stream_.async_read_some(buffer_.prepare(kReadBytes), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->reading_ = false;
      self->buffer_.commit(n);
      if (self->busy_) {
        if (ec == asio::error::eof) {
          self->peer_closed_ = true;
        } else if (ec) {
          self->close();
        } else {
          self->read_more(self->next_);
        }
        return;
      }
      if (self->timed_out_) return self->on_read(beast::error::timeout);
      if (ec == asio::error::eof) {
        // The client closed its side: a request it left unfinished is dropped without an
        // answer, as the Python front end drops it.
        return self->close();
      }
      if (ec) return self->on_read(ec);
      if (self->next_) ((*self).*(self->next_))();
    });
  }

  // The next deadline of the request being read: when it passes, the read is cancelled and
  // answered 408 (or, on an idle connection, closed). Beast's own stream timeouts would
  // close the socket before the 408 could be written.
  void arm(std::chrono::steady_clock::duration after) {
    timed_out_ = false;
    deadline_.expires_after(after);
    deadline_.async_wait([self = shared_from_this(), generation = ++generation_](beast::error_code ec) {
      if (ec || generation != self->generation_) return;
      self->timed_out_ = true;
      beast::error_code ignored;
      self->stream_.socket().cancel(ignored);
    });
  }

  void disarm() {
    ++generation_;
    deadline_.cancel();
  }

  void on_read(beast::error_code ec) {
    disarm();
    if (too_many_chunks_) {
      return fail(413, "the request body comes in more than " + std::to_string(core_->options.max_request_chunks) +
                           " chunks; send fewer, larger chunks (--max-request-chunks)");
    }
    if (ec == http::error::body_limit) {
      return fail(413, "request body is over the limit of " + std::to_string(core_->options.max_body_bytes) +
                           " bytes (--max-request-bytes)");
    }
    if (ec == http::error::header_limit) {
      return fail(431, "the request line and headers are over " + std::to_string(core_->options.max_header_bytes) +
                           " bytes (--max-header-bytes)");
    }
    if (timed_out_ || ec == beast::error::timeout) {
      if (!parser_->got_some() && buffer_.size() == 0) return close();  // idle: nothing of a request had come
      const auto seconds = std::chrono::duration<double>(core_->options.request_read_timeout).count();
      std::ostringstream text;
      text << "the request was not fully received within " << seconds << " s (--request-read-timeout-s)";
      return fail(408, text.str());
    }
    if (ec == asio::error::connection_reset || ec == asio::error::operation_aborted) return close();
    // Both a length and chunks: the words of the Python front end's parser.
    const auto& fields = parser_->get();
    if (ec == http::error::bad_transfer_encoding && fields.find(http::field::content_length) != fields.end()) {
      return fail(400, "malformed HTTP request: Transfer-Encoding can't be present with Content-Length");
    }
    if (ec == http::error::bad_content_length && fields.find(http::field::transfer_encoding) != fields.end()) {
      return fail(400, "malformed HTTP request: Content-Length can't be present with Transfer-Encoding");
    }
    if (ec) return fail(400, "malformed HTTP request: " + ec.message());
    Request request = parser_->release();
    keep_alive_ = request.keep_alive();
    busy_ = true;
    core_->handle(shared_from_this(), std::move(request));
    if (!reading_) read_more(nullptr);  // watches the connection while the answer is made
  }

  // Answers a request that cannot be read, then closes the connection.
  void fail(unsigned status, const std::string& message) {
    keep_alive_ = false;
    respond(error_response(status, message));
  }

  // Writes `res`, held in `slot` until it is written.
  template <typename Message>
  void write_answer(Message&& res, std::optional<Message>& slot) {
    res.keep_alive(keep_alive_);
    res.prepare_payload();
    slot = std::move(res);
    stream_.expires_after(core_->options.request_read_timeout);
    http::async_write(stream_, *slot, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->on_write(ec);
    });
  }

  void on_write(beast::error_code ec) {
    response_.reset();
    outputs_response_.reset();  // lets the batch's outputs go
    busy_ = false;
    if (answering_inference_) {
      answering_inference_ = false;
      core_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    }
    if (ec || !keep_alive_) {
      close();
      return;
    }
    read();
  }

  void close() {
    disarm();
    if (counted_) {  // a connection closed no longer counts, though a request of it may still be in a model
      counted_ = false;
      --core_->connections;
    }
    beast::error_code ec;
    stream_.socket().shutdown(Socket::shutdown_send, ec);
    stream_.close();
    if (upstream_) upstream_->close(ec);
  }

  static constexpr size_t kReadBytes = 64 << 10;      // asked of the socket per read
  static constexpr size_t kMaxReadAhead = 64 << 10;   // read while a request is being answered

  Stream stream_;
  HttpFrontend::Core* core_;
  Timer deadline_;
  uint64_t generation_ = 0;  // of the armed deadline: a deadline that passes after a re-arm does nothing
  bool timed_out_ = false;
  bool counted_ = true;       // in core_->connections: until closed
  bool busy_ = false;         // a request read is being answered
  bool reading_ = false;      // a read of the socket is under way
  bool peer_closed_ = false;  // the client shut its sending side down
  void (Session::*next_)() = nullptr;  // what the read under way goes on to
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<RequestBody>> parser_;
  std::function<void(std::uint64_t, beast::string_view, beast::error_code&)> count_chunk_;
  size_t chunks_ = 0;
  bool too_many_chunks_ = false;
  size_t scanned_ = 0;  // of the buffered head: checked for folded lines up to here
  std::optional<Response> response_;
  std::optional<OutputsResponse> outputs_response_;  // an answer written from the batch's outputs
  std::shared_ptr<http::response<http::empty_body>> continue_;
  bool keep_alive_ = true;
  bool answering_inference_ = false;
  std::optional<Socket> upstream_;
  bool upstream_reused_ = false;  // the request goes on a connection an earlier one used
  beast::flat_buffer upstream_buffer_;
  std::optional<Request> upstream_request_;
  std::optional<http::response_parser<http::string_body>> upstream_parser_;
};

namespace {

// Posts each batch's completions to the I/O thread.
class IoSink final : public CompletionSink {
 public:
  IoSink(std::shared_ptr<asio::io_context> io, HttpFrontend::Core* core) : io_(std::move(io)), core_(core) {}
  // The handler runs on the I/O thread, which only runs until stop() joins it, and the Core
  // is destroyed only after that: a handler posted later is destroyed with the io_context,
  // never run.
  void deliver(std::vector<Completion>&& completions) override {
    asio::post(*io_, [core = core_, done = std::move(completions)]() mutable { core->complete(std::move(done)); });
  }

 private:
  std::shared_ptr<asio::io_context> io_;
  HttpFrontend::Core* core_;
};

}  // namespace

void HttpFrontend::Core::accept() {
  acceptor.async_accept([this](beast::error_code ec, Socket socket) {
    if (ec) {
      if (ec == asio::error::operation_aborted) return;
    } else {
      std::make_shared<Session>(std::move(socket), this)->start();
    }
    accept();
  });
}

namespace {

// Whether a request's path splits as the Python front end splits it: it strips the slashes at
// both ends and keeps the empty segments of "//" inside (which then match no route), where
// split_path drops them.
bool no_empty_segment(std::string_view target) {
  if (auto q = target.find('?'); q != std::string_view::npos) target = target.substr(0, q);
  while (!target.empty() && target.front() == '/') target.remove_prefix(1);
  while (!target.empty() && target.back() == '/') target.remove_suffix(1);
  return target.find("//") == std::string_view::npos;
}

// Whether `text` is `version` written as the Python front end reads a version (int()).
bool names_version(std::string_view text, int64_t version) {
  int64_t value = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  return err == std::errc() && end == text.data() + text.size() && value == version;
}

}  // namespace

void HttpFrontend::Core::handle(const std::shared_ptr<Session>& session, Request&& request) {
  // Anything while draining keeps the behind server's handling (it refuses new inference).
  const std::vector<std::string_view> parts = split_path(request.target());
  if (draining.load(std::memory_order_relaxed) || parts.empty() || parts[0] != "v2" ||
      !no_empty_segment(request.target())) {
    return session->forward(std::move(request));
  }
  // /v2/models/{model}[/versions/{version}]/<action>, for the version served here.
  std::shared_ptr<const FrontendModel> model;
  std::string_view action;
  bool versioned = false;
  if (parts.size() >= 3 && parts.size() <= 6 && parts[1] == "models") {
    versioned = parts.size() >= 5 && parts[3] == "versions";
    const size_t action_at = versioned ? 5 : 3;
    if (parts.size() <= action_at + 1 && (versioned || parts.size() <= 4)) {
      model = find(parts[2]);
      if (model && versioned && !names_version(parts[4], model->version)) model = nullptr;
      if (parts.size() == action_at + 1) action = parts[action_at];
    }
  }
  if (request.method() == http::verb::post) {
    // Compressed bodies keep the behind server's handling.
    if (!model || action != "infer" || request.find(http::field::content_encoding) != request.end() ||
        !authorized(request)) {
      return session->forward(std::move(request));
    }
    return infer(session, std::move(model), versioned, std::move(request));
  }
  if (request.method() == http::verb::get && started.load(std::memory_order_acquire)) {
    // Health and metadata, answered as the Python front end answers them once the server has
    // started: liveness always, the rest for the models served here and the server.
    if (parts.size() == 3 && parts[1] == "health") {
      if (parts[2] == "live") return session->respond(json_response(200, R"({"live":true})"));
      // Not ready: the server behind answers, with the reason.
      if (parts[2] == "ready" && server_ready.load(std::memory_order_acquire)) {
        return session->respond(json_response(200, R"({"ready":true})"));
      }
    }
    if (authorized(request)) {
      if (parts.size() == 1) {
        std::string body;
        {
          std::lock_guard<std::mutex> lock(metadata_mu);
          body = server_metadata;
        }
        return session->respond(json_response(200, std::move(body)));
      } else if (model && action.empty() && !model->metadata.empty()) {
        return session->respond(json_response(200, model->metadata));
      } else if (model && action == "config" && !model->config.empty()) {
        return session->respond(json_response(200, model->config));
      } else if (model && action == "ready") {
        std::string body = R"({"name":)";
        append_json_string(model->name, &body);
        body += R"(,"ready":true})";
        return session->respond(json_response(200, std::move(body)));
      }
    }
  }
  session->forward(std::move(request));
}

bool HttpFrontend::Core::authorized(const Request& request) const {
  if (options.api_key.empty()) return true;
  auto field = request.find(http::field::authorization);
  if (field == request.end()) return false;
  return bearer_matches(field->value(), options.api_key);
}

namespace {

const json::object* object_at(const json::object& parent, std::string_view key) {
  const json::value* v = parent.if_contains(key);
  return v ? v->if_object() : nullptr;
}

// Whether a tensor of the request lives in a registered shared-memory region.
bool in_shared_memory(const json::object& tensor) {
  const json::object* parameters = object_at(tensor, "parameters");
  return parameters && parameters->contains("shared_memory_region");
}

// Whether a "parameters" field (absent counts) is one the Python front end accepts: null, or
// an object of strings, numbers and booleans.
bool plain_parameters(const json::object& parent) {
  const json::value* v = parent.if_contains("parameters");
  if (!v || v->is_null()) return true;
  const json::object* parameters = v->if_object();
  if (!parameters) return false;
  for (const auto& item : *parameters) {
    const json::value& x = item.value();
    if (!x.is_string() && !x.is_number() && !x.is_bool()) return false;
  }
  return true;
}

// Whether `key` of a parameters object is absent or a boolean.
bool absent_or_bool(const json::object* parameters, std::string_view key) {
  const json::value* v = parameters ? parameters->if_contains(key) : nullptr;
  return !v || v->is_bool();
}

// Whether the front end behind must answer this request: it asks for something served
// there alone (a tensor in shared memory, a classification output, a BYTES or BF16
// tensor), or it is malformed in a way whose exact message the behind server owns (this
// front end forwards every request it would refuse, so both refuse in the same words).
bool needs_full_server(const json::object& root) {
  if (!plain_parameters(root) || !absent_or_bool(object_at(root, "parameters"), "binary_data_output")) return true;
  const json::value* inputs = root.if_contains("inputs");
  if (!inputs || !inputs->is_array()) return true;
  for (const json::value& entry : inputs->get_array()) {
    const json::object* input = entry.if_object();
    if (!input || !plain_parameters(*input) || in_shared_memory(*input)) return true;
    const json::object* parameters = object_at(*input, "parameters");
    if (parameters && parameters->contains("binary_data_size") && input->contains("data")) return true;
    const json::value* datatype = input->if_contains("datatype");
    if (!datatype || !datatype->is_string()) return true;
    const json::string& name = datatype->get_string();
    if (name == "BYTES" || name == "BF16") return true;
  }
  if (const json::value* outputs = root.if_contains("outputs")) {
    if (!outputs->is_array()) return true;
    std::unordered_set<std::string_view> names;
    for (const json::value& entry : outputs->get_array()) {
      const json::object* output = entry.if_object();
      if (!output || !plain_parameters(*output) || in_shared_memory(*output)) return true;
      const json::object* parameters = object_at(*output, "parameters");
      if (!absent_or_bool(parameters, "binary_data") || (parameters && parameters->contains("classification"))) {
        return true;
      }
      const json::value* name = output->if_contains("name");
      if (!name || !name->is_string()) return true;
      if (!names.insert(name->get_string()).second) return true;  // asked for twice
    }
  }
  return false;
}

// A schedule parameter: absent, or an integer >= 0 (anything else: InvalidInput naming it).
int64_t schedule_parameter(const json::object* parameters, std::string_view key, std::string_view what) {
  if (!parameters) return 0;
  const json::value* v = parameters->if_contains(key);
  if (!v) return 0;
  if (v->is_int64() && v->get_int64() >= 0) return v->get_int64();
  if (v->is_uint64()) return static_cast<int64_t>(std::min<uint64_t>(v->get_uint64(), INT64_MAX));
  throw Error(ErrorCode::kInvalidInput, "parameter '" + std::string(key) + "' must be " + std::string(what) + ", got " +
                                            json::serialize(*v));
}

// The request's routing key under `route` into `key` (left empty: none, a random draw), as
// the Python front end reads it (conveyor.deploy.traffic.route_key_from): the parameter, a
// string or an integer, wins; else the header's last line. False when the Python front end
// must read it: a parameter of another type (it refuses it), or a header with bytes beyond
// ASCII (it reads them as latin-1).
bool route_key(const FrontendRoute& route, const json::object* parameters, const Request& request, std::string* key) {
  if (!route.key_parameter.empty() && parameters) {
    if (const json::value* v = parameters->if_contains(route.key_parameter)) {
      if (v->is_string() && !v->get_string().empty()) {
        *key = std::string(v->get_string());
        return true;
      }
      if (v->is_int64()) {
        *key = std::to_string(v->get_int64());
        return true;
      }
      if (v->is_uint64()) {
        *key = std::to_string(v->get_uint64());
        return true;
      }
      if (!v->is_string() && !v->is_bool() && !v->is_null()) return false;
    }
  }
  if (route.key_header.empty()) return true;
  std::string_view value;
  for (auto [at, end] = request.equal_range(route.key_header); at != end; ++at) value = at->value();
  return route_key_from_header(value, key);
}

}  // namespace

void HttpFrontend::Core::infer(const std::shared_ptr<Session>& session, std::shared_ptr<const FrontendModel> model,
                               bool named_version, Request&& request) {
  BodyBytes& raw = request.body();
  size_t json_bytes = raw.size();
  if (auto field = request.find(kHeaderLength); field != request.end()) {
    const std::optional<size_t> value = byte_count(field->value());
    if (!value || *value > raw.size() || *value == 0) {
      session->forward(std::move(request));  // the behind server words every such refusal
      return;
    }
    json_bytes = *value;
  }
  if (json_bytes > options.max_inference_header_bytes) {
    session->forward(std::move(request));
    return;
  }
  // The document lives in this stack buffer (and past it, in blocks freed at once on return).
  unsigned char scratch[4096];
  json::monotonic_resource resource(scratch, sizeof scratch);
  boost::system::error_code jec;
  json::parse_options parse_options;
  parse_options.numbers = json::number_precision::precise;  // every double as Python reads it
  json::value doc =
      json::parse(json::string_view(reinterpret_cast<const char*>(raw.data()), json_bytes), jec, &resource, parse_options);
  const json::object* root = jec ? nullptr : doc.if_object();
  if (!root || needs_full_server(*root)) {
    session->forward(std::move(request));
    return;
  }
  // The body's buffer moves, not its bytes: views into it stay valid.
  auto body = std::make_shared<BodyBytes>(std::move(raw));
  try {
    PendingRequest pending_request{session, model, {}, {}, {}, false, named_version, {}};
    if (auto accept = request.find(http::field::accept_encoding); accept != request.end()) {
      pending_request.accept_encoding = std::string(accept->value());
      pending_request.has_accept_encoding = true;
    }
    if (const json::value* id = root->if_contains("id")) {
      if (!id->is_string()) throw Error(ErrorCode::kInvalidInput, "'id' must be a string");
      pending_request.id = std::string(id->get_string());
    }
    if (pending_request.id.empty()) pending_request.id = new_request_id();
    const json::object* request_parameters = object_at(*root, "parameters");
    const int64_t priority = schedule_parameter(request_parameters, "priority", "an integer >= 0");
    const int64_t timeout_us =
        schedule_parameter(request_parameters, "timeout", "an integer number of microseconds >= 0");
    uint64_t mirror_tag = 0;  // nonzero: the rollout copies it to its shadow version
    if (model->route) {
      // Routed by the rollout to one of its versions; one naming a version goes behind.
      std::string key;
      if (named_version || !route_key(*model->route, request_parameters, request, &key)) {
        throw Error(ErrorCode::kInvalidInput, "routed behind");
      }
      RoutedRequest routed = route_request(*model->route, key);
      if (!routed.arm) throw Error(ErrorCode::kInvalidInput, "routed behind");
      pending_request.rollout = model->route->rollout;
      pending_request.model = routed.arm;
      model = std::move(routed.arm);
      mirror_tag = routed.mirror_tag;
    }
    const std::vector<TensorSpec>& specs = model->batcher->options().inputs;
    std::vector<Tensor> tensors(specs.size());
    std::vector<bool> given(specs.size(), false);
    const json::value* inputs_value = root->if_contains("inputs");
    if (!inputs_value || !inputs_value->is_array()) throw Error(ErrorCode::kInvalidInput, "'inputs' must be a list");
    size_t offset = json_bytes;
    for (const json::value& entry_value : inputs_value->get_array()) {
      const json::object* entry = entry_value.if_object();
      const json::value* name_value = entry ? entry->if_contains("name") : nullptr;
      if (!name_value || !name_value->is_string()) throw Error(ErrorCode::kInvalidInput, "every input needs a 'name'");
      const std::string name(name_value->get_string());
      size_t index = 0;
      while (index < specs.size() && specs[index].name != name) ++index;
      if (index == specs.size()) {
        throw Error(ErrorCode::kInvalidInput, "model '" + model->name + "' has no input '" + name + "'");
      }
      if (given[index]) throw Error(ErrorCode::kInvalidInput, "input '" + name + "' is given twice");
      given[index] = true;
      const json::value* datatype = entry->if_contains("datatype");
      if (!datatype || !datatype->is_string()) {
        throw Error(ErrorCode::kInvalidInput, "input '" + name + "' needs a 'datatype'");
      }
      Tensor& t = tensors[index];
      t.dtype = dtype_from_name(std::string(datatype->get_string()));
      const json::value* shape_value = entry->if_contains("shape");
      if (!shape_value || !shape_value->is_array()) {
        throw Error(ErrorCode::kInvalidInput, "input '" + name + "' needs a 'shape' list");
      }
      std::vector<int64_t> dims;
      for (const json::value& d : shape_value->get_array()) {
        if (!d.is_int64() || d.get_int64() < 0) {
          throw Error(ErrorCode::kInvalidInput, "input '" + name + "': 'shape' must hold non-negative integers");
        }
        dims.push_back(d.get_int64());
      }
      t.shape = Shape(dims.data(), static_cast<int>(dims.size()));
      int64_t elements = 1;  // of the non-zero dimensions: at most (2^63 - 1) / 8, as the Python front end says
      for (int64_t d : dims) {
        if (d && (__builtin_mul_overflow(elements, d, &elements) || elements > INT64_MAX / 8)) {
          throw Error(ErrorCode::kInvalidInput, "input '" + name + "': more elements than a tensor can hold");
        }
      }
      const json::value* binary_size = nullptr;
      if (const json::value* parameters = entry->if_contains("parameters"); parameters && parameters->is_object()) {
        binary_size = parameters->get_object().if_contains("binary_data_size");
      }
      if (binary_size) {
        if (!binary_size->is_int64() || binary_size->get_int64() < 0) {
          throw Error(ErrorCode::kInvalidInput, "input '" + name + "': 'binary_data_size' must be a byte count");
        }
        const size_t size = static_cast<size_t>(binary_size->get_int64());
        if (t.dtype == DType::kBytes || size != t.nbytes()) {
          throw Error(ErrorCode::kInvalidInput, "input '" + name + "': binary_data_size " + std::to_string(size) +
                                                    " does not match its datatype and shape (" +
                                                    std::to_string(t.nbytes()) + " bytes)");
        }
        if (size > body->size() - offset) {
          throw Error(ErrorCode::kInvalidInput, "input '" + name + "': the body ends before its binary data");
        }
        t.data = body->data() + offset;
        t.owner = body;
        offset += size;
      } else if (const json::value* data = entry->if_contains("data")) {
        t.owner = json_input(t.dtype, *data, t.shape.numel(), name, &t.data);
      } else {
        throw Error(ErrorCode::kInvalidInput, "input '" + name + "' has neither 'data' nor 'binary_data_size'");
      }
    }
    for (size_t i = 0; i < specs.size(); ++i) {
      if (!given[i]) throw Error(ErrorCode::kInvalidInput, "input '" + specs[i].name + "' is missing");
    }
    if (offset != body->size()) {
      throw Error(ErrorCode::kInvalidInput, "the body holds " + std::to_string(body->size() - offset) +
                                                " bytes of binary data that no input claims");
    }

    bool binary_default = false;
    if (const json::value* parameters = root->if_contains("parameters"); parameters && parameters->is_object()) {
      if (const json::value* flag = parameters->get_object().if_contains("binary_data_output")) {
        binary_default = flag->is_bool() && flag->get_bool();
      }
    }
    const std::vector<TensorSpec>& output_specs = model->batcher->options().outputs;
    if (const json::value* outputs = root->if_contains("outputs"); outputs && outputs->is_array()) {
      for (const json::value& o : outputs->get_array()) {
        const json::object* entry = o.if_object();
        const json::value* name_value = entry ? entry->if_contains("name") : nullptr;
        if (!name_value || !name_value->is_string()) throw Error(ErrorCode::kInvalidInput, "every output needs a 'name'");
        int index = 0;
        while (index < static_cast<int>(output_specs.size()) && output_specs[index].name != name_value->get_string()) {
          ++index;
        }
        if (index == static_cast<int>(output_specs.size())) {
          throw Error(ErrorCode::kInvalidInput, "model '" + model->name + "' has no output '" +
                                                    std::string(name_value->get_string()) + "'");
        }
        bool binary = binary_default;
        if (const json::value* parameters = entry->if_contains("parameters"); parameters && parameters->is_object()) {
          if (const json::value* flag = parameters->get_object().if_contains("binary_data")) {
            binary = flag->is_bool() && flag->get_bool();
          }
        }
        pending_request.outputs.push_back({index, binary});
      }
    } else {
      for (int i = 0; i < static_cast<int>(output_specs.size()); ++i) pending_request.outputs.push_back({i, binary_default});
    }
    for (const OutputChoice& choice : pending_request.outputs) {
      if (!choice.binary && !json_writable(output_specs[choice.index].dtype)) {
        throw Error(ErrorCode::kInvalidInput, "an output this front end cannot write as JSON");
      }
    }

    // Queued at the end of this round of reads, with the other requests read in it.
    Batcher::Queued queued{std::move(tensors), sink, static_cast<int>(std::min<int64_t>(priority, INT32_MAX)),
                           timeout_us > 0 ? timeout_us : -1, mirror_tag};
    queued.inputs_lent = true;  // the tensors view this request's own body (or decoded JSON): nothing else reads them
    staged.push_back({std::move(model), std::move(queued), std::move(pending_request), std::move(request), body});
    in_flight.fetch_add(1, std::memory_order_relaxed);  // from here until its answer is written
    if (!flush_posted) {
      flush_posted = true;
      asio::post(ioc, [this] { submit_staged(); });
    }
    return;
  } catch (const std::exception&) {
    // A request this front end finds invalid (or cannot hold) goes behind, which words the refusal.
  }
  request.body() = body.use_count() == 1 ? std::move(*body) : *body;
  session->forward(std::move(request));
}

void HttpFrontend::Core::submit_staged() {
  flush_posted = false;
  std::vector<Staged> work;
  work.swap(staged);
  std::vector<std::pair<Batcher*, Batcher::Queued>> round;
  round.reserve(work.size());
  for (Staged& s : work) round.emplace_back(s.model->batcher.get(), std::move(s.queued));
  const std::vector<Batcher::Outcome> outcomes = submit_round(std::move(round));  // work holds the models
  for (size_t i = 0; i < work.size(); ++i) {
    Staged& s = work[i];
    const Batcher::Outcome& outcome = outcomes[i];
    if (outcome.id != 0) {
      s.model->count(s.pending.named_version);
      // The completion is posted to this thread, so it cannot run before this insert.
      pending.emplace(outcome.id, std::move(s.pending));
    } else if (outcome.code == ErrorCode::kQueueFull || outcome.code == ErrorCode::kOutOfMemory) {
      s.model->count(s.pending.named_version);
      s.pending.session->answering_inference();
      s.pending.session->respond(error_response(status_for(outcome.code), outcome.message));
    } else {
      in_flight.fetch_sub(1, std::memory_order_relaxed);  // the server behind answers it now
      // Invalid, or a version swapped out by a reload between the lookup and the submit
      // (its batcher stopping): behind, which words the refusal or serves the new version.
      s.request.body() = s.body.use_count() == 1 ? std::move(*s.body) : *s.body;
      s.pending.session->forward(std::move(s.request));
    }
  }
}

void HttpFrontend::Core::complete(std::vector<Completion>&& done) {
  for (Completion& c : done) {
    auto it = pending.find(c.request_id);
    if (it == pending.end()) continue;
    PendingRequest p = std::move(it->second);
    pending.erase(it);
    if (!p.session->open()) {
      in_flight.fetch_sub(1, std::memory_order_relaxed);
      continue;
    }
    p.session->answering_inference();  // in flight until its answer is written
    if (c.code != ErrorCode::kOk) {
      p.session->respond(error_response(status_for(c.code), c.message));
      continue;
    }
    try {
      // The header, written as the Python front end writes it (the same keys in the same order).
      std::string text;
      text.reserve(256);
      text += "{\"model_name\":";
      append_json_string(p.model->name, &text);
      text += ",\"model_version\":\"";
      text += std::to_string(p.model->version);
      text += "\",\"id\":";
      append_json_string(p.id, &text);
      if (!p.rollout.empty()) {
        text += ",\"parameters\":{\"rollout\":";
        append_json_string(p.rollout, &text);
        text += '}';
      }
      text += ",\"outputs\":[";
      std::vector<asio::const_buffer> binary;  // the binary outputs, in order, after the header
      const std::vector<TensorSpec>& specs = p.model->batcher->options().outputs;
      bool first_output = true;
      for (const OutputChoice& choice : p.outputs) {
        const Tensor& t = c.outputs->tensors[choice.index];
        const auto [shape, src, nbytes] = output_rows(t, c);
        text += first_output ? "{\"name\":" : ",{\"name\":";
        first_output = false;
        append_json_string(specs[choice.index].name, &text);
        text += ",\"datatype\":\"";
        text += dtype_name(t.dtype);
        text += "\",\"shape\":[";
        for (int d = 0; d < shape.ndim(); ++d) {
          if (d) text += ',';
          text += std::to_string(shape[d]);
        }
        if (choice.binary) {
          text += "],\"parameters\":{\"binary_data_size\":";
          text += std::to_string(nbytes);
          text += "}}";
          binary.emplace_back(src, nbytes);
        } else {
          text += "],\"data\":[";
          json_output(t.dtype, src, shape.numel(), &text);
          text += "]}";
        }
      }
      text += "]}";
      // The coding a large enough answer is compressed with; empty: none (the answer is not).
      const std::string_view encoding =
          p.has_accept_encoding ? accepted_compression(p.accept_encoding) : std::string_view();
      if (!binary.empty() && encoding.empty()) {
        // Written from the outputs where they lie: the answer holds the batch's outputs until then.
        OutputsResponse res{http::status::ok, 11};
        res.set(http::field::content_type, "application/octet-stream");
        res.set(kHeaderLength, std::to_string(text.size()));
        if (p.has_accept_encoding) res.set(http::field::vary, "Accept-Encoding");  // the body depends on the header
        res.body().header = std::move(text);
        res.body().outputs = std::move(binary);
        res.body().keep = c.outputs;
        p.session->respond(std::move(res));
        continue;
      }
      Response res{http::status::ok, 11};
      if (binary.empty()) {
        res.set(http::field::content_type, "application/json");
        res.body() = std::move(text);
      } else {
        res.set(http::field::content_type, "application/octet-stream");
        res.set(kHeaderLength, std::to_string(text.size()));
        size_t bytes = text.size();
        for (const asio::const_buffer& part : binary) bytes += part.size();
        text.reserve(bytes);
        for (const asio::const_buffer& part : binary) text.append(static_cast<const char*>(part.data()), part.size());
        res.body() = std::move(text);
      }
      if (p.has_accept_encoding) {
        res.set(http::field::vary, "Accept-Encoding");  // the body depends on the header
        if (!encoding.empty() && res.body().size() >= kMinCompressedBodyBytes) {
          res.body() = compressed(res.body(), encoding);
          res.set(http::field::content_encoding, encoding);
        }
      }
      p.session->respond(std::move(res));
    } catch (const std::exception& e) {
      p.session->respond(error_response(500, e.what()));
    }
  }
}

HttpFrontend::HttpFrontend(HttpFrontendOptions options) : core_(std::make_shared<Core>(std::move(options))) {
  core_->sink = std::make_shared<IoSink>(core_->io, core_.get());
  beast::error_code ec;
  const auto address = asio::ip::make_address(core_->options.host, ec);
  if (ec) throw Error(ErrorCode::kInvalidInput, "[http] '" + core_->options.host + "' is not an IP address");
  const tcp::endpoint endpoint{address, static_cast<unsigned short>(core_->options.port)};
  core_->acceptor.open(endpoint.protocol(), ec);
  if (!ec) core_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) core_->acceptor.bind(endpoint, ec);
  if (!ec) core_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw Error(ErrorCode::kUnavailable, "[http] cannot listen on " + core_->options.host + ":" +
                                             std::to_string(core_->options.port) + ": " + ec.message());
  }
  core_->port = core_->acceptor.local_endpoint().port();
  core_->accept();
  core_->thread = std::thread([core = core_.get()] { core->ioc.run(); });
}

HttpFrontend::~HttpFrontend() { stop(); }

int HttpFrontend::port() const noexcept { return core_->port; }

void HttpFrontend::add_model(FrontendModel model) { core_->models.add(std::move(model), "[http]"); }

void HttpFrontend::serve_health(std::string server_metadata) {
  {
    std::lock_guard<std::mutex> lock(core_->metadata_mu);
    core_->server_metadata = std::move(server_metadata);
  }
  core_->started.store(true, std::memory_order_release);
}

void HttpFrontend::set_ready(bool ready) { core_->server_ready.store(ready, std::memory_order_release); }

void HttpFrontend::remove_model(const std::string& name) { core_->models.remove(name); }

void HttpFrontend::drain() {
  core_->draining.store(true);
  asio::post(core_->ioc, [core = core_.get()] {
    beast::error_code ec;
    core->acceptor.close(ec);
  });
}

size_t HttpFrontend::in_flight() const { return core_->in_flight.load(); }

void HttpFrontend::stop() {
  std::call_once(core_->stop_once, [this] {
    asio::post(core_->ioc, [core = core_.get()] {
      beast::error_code ec;
      core->acceptor.close(ec);
      core->pending.clear();
      core->staged.clear();
      core->keep_running.reset();
      // Every connection closed: the handlers of their operations, queued by now, run
      // (aborted) and release the sessions here, on this thread, before run() stops.
      for (Session* session : std::vector<Session*>(core->sessions.begin(), core->sessions.end())) session->shut();
      asio::post(core->ioc, [core] { core->ioc.stop(); });
    });
    if (core_->thread.joinable()) core_->thread.join();
  });
}

}  // namespace conveyor
