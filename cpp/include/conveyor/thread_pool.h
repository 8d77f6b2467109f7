// A fixed pool of worker threads for data-parallel kernels.
//
// parallel_for splits [0, n) into at most `threads` contiguous chunks and runs them on
// the calling thread plus pool workers; it returns when every chunk is done. Kernels
// never start threads of their own: on a small machine, compute threads must not
// outnumber cores (the model config's thread count bounds them).
#pragma once

#include <cstdint>
#include <functional>

namespace conveyor {

// Runs fn(begin, end) over chunks of [0, n) on up to `threads` threads (1: inline, no
// pool involved). Exceptions from fn are rethrown on the calling thread (the first
// one). Safe to call from several threads at once; not re-entrant from inside fn.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn);

// Workers the shared pool holds (it grows on demand up to the largest `threads` asked).
int thread_pool_size() noexcept;

}  // namespace conveyor
