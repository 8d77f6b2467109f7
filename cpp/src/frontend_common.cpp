#include "conveyor/frontend_common.h"

#include <sys/random.h>

#include <cctype>
#include <cerrno>
#include <cstring>

#include "conveyor/error.h"

namespace conveyor {

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

}  // namespace conveyor
