// The test binary replaces the global operator new/delete with counting ones, so a test
// can state that code allocates nothing, or make the next allocations of a thread fail
// to prove that code survives std::bad_alloc.
#pragma once

#include <cstdint>

namespace conveyor::testing {

// operator new calls made by this thread so far.
uint64_t this_thread_allocations();
// The next `count` operator new calls of this thread throw std::bad_alloc (the nothrow
// forms return null).
void fail_next_allocations_on_this_thread(int count);

}  // namespace conveyor::testing
