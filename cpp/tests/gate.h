// A gate a test's executor can wait on, and a count of the threads that reached it, for
// the threaded tests: synchronisation is explicit, never a sleep.
#pragma once

#include <condition_variable>
#include <mutex>

namespace conveyor::testing {

class Gate {
 public:
  // Lets every waiting thread and every later one through.
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // Counts the caller in, then waits until the gate is open.
  void pass() {
    std::unique_lock<std::mutex> lock(mu_);
    ++entered_;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
  }
  // Waits until `n` threads have reached pass().
  void wait_entered(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return entered_ >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  int entered_ = 0;
};

}  // namespace conveyor::testing
