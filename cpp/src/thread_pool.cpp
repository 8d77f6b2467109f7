#include "conveyor/thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace conveyor {

namespace {

// One parallel_for call: how many chunks are left and the first error, if any.
struct Job {
  std::mutex mu;
  std::condition_variable done_cv;
  int remaining = 0;          // guarded by mu
  std::exception_ptr error;   // guarded by mu
};

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  void run(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
    const int chunks = static_cast<int>(std::min<int64_t>(threads, n));
    ensure_workers(chunks - 1);
    Job job;
    job.remaining = chunks;
    auto chunk = [&](int i) {
      const int64_t begin = n * i / chunks, end = n * (i + 1) / chunks;
      std::exception_ptr error;
      try {
        fn(begin, end);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(job.mu);
      if (error && !job.error) job.error = error;
      if (--job.remaining == 0) job.done_cv.notify_one();
    };
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 1; i < chunks; ++i) tasks_.push_back([&chunk, i] { chunk(i); });
    }
    cv_.notify_all();
    chunk(0);
    std::unique_lock<std::mutex> lock(job.mu);
    job.done_cv.wait(lock, [&] { return job.remaining == 0; });
    if (job.error) std::rethrow_exception(job.error);
  }

  int size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(workers_.size());
  }

 private:
  void ensure_workers(int wanted) {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int>(workers_.size()) < wanted) {
      workers_.emplace_back([this] { work(); });
      workers_.back().detach();
    }
  }

  void work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  std::vector<std::thread> workers_;         // guarded by mu_ (detached; kept for the count)
};

}  // namespace

void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    fn(0, n);
    return;
  }
  Pool::instance().run(n, threads, fn);
}

int thread_pool_size() noexcept { return Pool::instance().size(); }

}  // namespace conveyor
