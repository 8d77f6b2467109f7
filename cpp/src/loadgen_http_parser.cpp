// The load generator's HTTP/1.1 response parser: status line, headers, and a
// Content-Length, chunked or read-until-close body, however the stream is split.
#include <algorithm>
#include <cctype>
#include <cstring>

#include "conveyor/loadgen.h"

namespace conveyor::loadgen {

namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  }
  return true;
}

bool icontains(std::string_view haystack, std::string_view needle) {
  if (needle.size() > haystack.size()) return false;
  for (size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
    if (iequals(haystack.substr(i, needle.size()), needle)) return true;
  }
  return false;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// A decimal that fits in 63 bits, all digits; false otherwise.
bool parse_decimal(std::string_view s, uint64_t* value) {
  if (s.empty() || s.size() > 18) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *value = v;
  return true;
}

// Where the value of the JSON key "error" starts in `body` (after the colon), or npos.
size_t error_value_at(std::string_view body) {
  for (size_t at = body.find("\"error\""); at != std::string_view::npos; at = body.find("\"error\"", at + 1)) {
    size_t p = at + 7;
    while (p < body.size() && std::isspace(static_cast<unsigned char>(body[p]))) ++p;
    if (p < body.size() && body[p] == ':') return p + 1;
  }
  return std::string_view::npos;
}

// The JSON string starting at `p` (after spaces), unescaped enough to be read; empty if none.
std::string json_string_at(std::string_view body, size_t p) {
  while (p < body.size() && std::isspace(static_cast<unsigned char>(body[p]))) ++p;
  if (p >= body.size() || body[p] != '"') return {};
  std::string out;
  for (++p; p < body.size() && body[p] != '"'; ++p) {
    if (body[p] == '\\' && p + 1 < body.size()) {
      const char e = body[++p];
      out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
    } else {
      out += body[p];
    }
  }
  return out;
}

}  // namespace

// ---- response parser -------------------------------------------------------------------

void HttpResponseParser::reset() {
  phase_ = Phase::kHead;
  head_.clear();
  line_.clear();
  body_.clear();
  keep_limit_ = kMaxKeptBodyBytes;
  remaining_ = 0;
  status_ = 0;
  keep_alive_ = true;
  started_ = false;
  error_.clear();
}

HttpResponseParser::State HttpResponseParser::fail(std::string message) {
  error_ = std::move(message);
  return State::kMalformed;
}

void HttpResponseParser::keep(const char* data, size_t size) {
  if (body_.size() < keep_limit_) body_.append(data, std::min(size, keep_limit_ - body_.size()));
}

bool HttpResponseParser::take_line(const char*& p, const char* end, std::string* line) {
  const char* newline = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(end - p)));
  const char* stop = newline ? newline : end;
  line_.append(p, static_cast<size_t>(stop - p));
  p = newline ? newline + 1 : end;
  if (!newline) return false;
  if (!line_.empty() && line_.back() == '\r') line_.pop_back();
  *line = std::move(line_);
  line_.clear();
  return true;
}

HttpResponseParser::State HttpResponseParser::parse_head() {
  std::string_view head(head_);
  const size_t first_end = head.find("\r\n");
  const std::string_view status_line = head.substr(0, first_end);
  // "HTTP/1.x SSS reason"
  if (status_line.size() < 12 || status_line.substr(0, 7) != "HTTP/1." || status_line[8] != ' ') {
    return fail("not an HTTP/1.x status line: '" + std::string(status_line.substr(0, 80)) + "'");
  }
  uint64_t status = 0;
  if (!parse_decimal(status_line.substr(9, 3), &status) || status < 100 || status > 999 ||
      (status_line.size() > 12 && status_line[12] != ' ')) {
    return fail("bad status code in '" + std::string(status_line.substr(0, 80)) + "'");
  }
  status_ = static_cast<int>(status);
  keep_alive_ = status_line[7] == '1';  // HTTP/1.1 keeps the connection unless told otherwise
  bool chunked = false, has_length = false;
  uint64_t length = 0;
  size_t at = first_end + 2;
  while (at < head.size()) {
    const size_t line_end = head.find("\r\n", at);
    const std::string_view line = head.substr(at, line_end - at);
    at = line_end + 2;
    if (line.empty()) break;
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      return fail("header line without a name and a colon: '" + std::string(line.substr(0, 80)) + "'");
    }
    const std::string_view name = trim(line.substr(0, colon)), value = trim(line.substr(colon + 1));
    if (iequals(name, "content-length")) {
      uint64_t v = 0;
      if (!parse_decimal(value, &v) || (has_length && v != length)) {
        return fail("bad Content-Length '" + std::string(value.substr(0, 40)) + "'");
      }
      has_length = true;
      length = v;
    } else if (iequals(name, "transfer-encoding")) {
      chunked = icontains(value, "chunked");
    } else if (iequals(name, "connection")) {
      if (icontains(value, "close")) keep_alive_ = false;
      if (icontains(value, "keep-alive")) keep_alive_ = true;
    } else if (iequals(name, "inference-header-content-length")) {
      uint64_t v = 0;
      if (parse_decimal(value, &v)) keep_limit_ = std::min<uint64_t>(v, kMaxKeptBodyBytes);
    }
  }
  head_.clear();
  if (status_ < 200) {  // 1xx: an interim answer; the real one follows
    phase_ = Phase::kHead;
    return State::kNeedMore;
  }
  if (status_ == 204 || status_ == 304) {
    phase_ = Phase::kDone;
  } else if (chunked) {
    phase_ = Phase::kChunkSize;
  } else if (has_length) {
    remaining_ = length;
    phase_ = length ? Phase::kBody : Phase::kDone;
  } else {
    phase_ = Phase::kUntilClose;
    keep_alive_ = false;
  }
  return State::kNeedMore;
}

HttpResponseParser::State HttpResponseParser::feed(const char* data, size_t size, size_t* consumed) {
  const char* p = data;
  const char* const end = data + size;
  if (size) started_ = true;
  std::string line;
  while (phase_ != Phase::kDone && p < end) {
    switch (phase_) {
      case Phase::kHead: {
        const size_t before = head_.size();
        head_.append(p, static_cast<size_t>(end - p));
        const size_t found = head_.find("\r\n\r\n", before >= 3 ? before - 3 : 0);
        if (found == std::string::npos) {
          if (head_.size() > kMaxHeaderBytes) return fail("response headers exceed 64 KiB");
          p = end;
          break;
        }
        p += found + 4 - before;
        head_.resize(found + 4);
        if (parse_head() == State::kMalformed) return State::kMalformed;
        break;
      }
      case Phase::kBody:
      case Phase::kChunkData: {
        const size_t take = static_cast<size_t>(std::min<uint64_t>(remaining_, static_cast<uint64_t>(end - p)));
        keep(p, take);
        p += take;
        remaining_ -= take;
        if (remaining_ == 0) phase_ = phase_ == Phase::kBody ? Phase::kDone : Phase::kChunkDataEnd;
        break;
      }
      case Phase::kChunkSize: {
        if (!take_line(p, end, &line)) {
          if (line_.size() > 1024) return fail("chunk size line exceeds 1 KiB");
          break;
        }
        const std::string_view digits = trim(std::string_view(line).substr(0, line.find(';')));
        uint64_t chunk = 0;
        if (digits.empty() || digits.size() > 15) return fail("bad chunk size '" + line.substr(0, 40) + "'");
        for (char c : digits) {
          const int v = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                        : (c >= 'a' && c <= 'f')                   ? c - 'a' + 10
                        : (c >= 'A' && c <= 'F')                   ? c - 'A' + 10
                                                                   : -1;
          if (v < 0) return fail("bad chunk size '" + line.substr(0, 40) + "'");
          chunk = chunk * 16 + static_cast<uint64_t>(v);
        }
        remaining_ = chunk;
        phase_ = chunk ? Phase::kChunkData : Phase::kTrailers;
        break;
      }
      case Phase::kChunkDataEnd:
        if (!take_line(p, end, &line)) break;
        if (!line.empty()) return fail("chunk data longer than its size");
        phase_ = Phase::kChunkSize;
        break;
      case Phase::kTrailers:
        if (!take_line(p, end, &line)) {
          if (line_.size() > kMaxHeaderBytes) return fail("trailer line exceeds 64 KiB");
          break;
        }
        if (line.empty()) phase_ = Phase::kDone;
        break;
      case Phase::kUntilClose:
        keep(p, static_cast<size_t>(end - p));
        p = end;
        break;
      case Phase::kDone:
        break;
    }
  }
  *consumed = static_cast<size_t>(p - data);
  return phase_ == Phase::kDone ? State::kDone : State::kNeedMore;
}

HttpResponseParser::State HttpResponseParser::feed_eof() {
  if (phase_ == Phase::kUntilClose) {
    phase_ = Phase::kDone;
    return State::kDone;
  }
  if (phase_ == Phase::kDone) return State::kDone;
  return fail(started_ ? "the connection closed in the middle of a response" : "the connection closed before any response");
}

bool HttpResponseParser::ok() const {
  return phase_ == Phase::kDone && status_ >= 200 && status_ < 300 && error_value_at(body_) == std::string::npos;
}

std::string HttpResponseParser::describe() const {
  std::string text;
  const size_t at = error_value_at(body_);
  if (at != std::string::npos) text = json_string_at(body_, at);
  if (text.empty()) text = body_.empty() ? "(empty body)" : body_.substr(0, 120);
  return "HTTP " + std::to_string(status_) + ": " + text;
}

}  // namespace conveyor::loadgen
