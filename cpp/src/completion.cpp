#include "conveyor/completion.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace conveyor {

CompletionQueue::CompletionQueue() {
  event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0) {
    throw Error(ErrorCode::kInternal, std::string("[completion] eventfd failed: ") + std::strerror(errno));
  }
}

CompletionQueue::~CompletionQueue() {
  if (event_fd_ >= 0) ::close(event_fd_);
}

void CompletionQueue::deliver(std::vector<Completion>&& completions) {
  bool signal = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.push_back(std::move(completions));  // may throw bad_alloc, before anything changed
    ready_count_ += ready_.back().size();
    if (!signalled_) signalled_ = signal = true;
  }
  if (signal) {
    // One token is enough: the reader drains everything that is ready.
    const uint64_t one = 1;
    ssize_t written;
    do {
      written = ::write(event_fd_, &one, sizeof(one));
    } while (written < 0 && errno == EINTR);
  }
}

std::vector<std::vector<Completion>> CompletionQueue::drain() {
  std::vector<std::vector<Completion>> out;
  std::lock_guard<std::mutex> lock(mu_);
  if (signalled_) {
    uint64_t tokens;
    ssize_t got;
    do {
      got = ::read(event_fd_, &tokens, sizeof(tokens));
    } while (got < 0 && errno == EINTR);
    signalled_ = false;
  }
  out.swap(ready_);
  ready_count_ = 0;
  return out;
}

size_t CompletionQueue::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_count_;
}

void CompletionWaiter::deliver(std::vector<Completion>&& completions) {
  // A waiter is handed to exactly one request, so there is exactly one completion.
  result_ = std::move(completions.front());
  done_.store(1, std::memory_order_release);
  // The caller holds a reference to this sink (see CompletionSink), so notifying after
  // the store touches a live object even when wait() has already returned. No waiter
  // asleep: no system call.
  done_.notify_one();
}

Completion CompletionWaiter::wait() {
  while (done_.load(std::memory_order_acquire) == 0) done_.wait(0, std::memory_order_acquire);
  return std::move(result_);
}

}  // namespace conveyor
