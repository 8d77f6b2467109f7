#include "allocation_hooks.h"

#include <cstdlib>
#include <new>

namespace {

thread_local uint64_t t_allocations = 0;
thread_local int t_failures_left = 0;

void* counted_malloc(std::size_t n) noexcept {
  ++t_allocations;
  if (t_failures_left > 0) {
    --t_failures_left;
    return nullptr;
  }
  return std::malloc(n ? n : 1);
}

void* counted_alloc(std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}

}  // namespace

namespace conveyor::testing {

uint64_t this_thread_allocations() { return t_allocations; }
void fail_next_allocations_on_this_thread(int count) { t_failures_left = count; }

}  // namespace conveyor::testing

// Every unaligned form, so each allocation and its release meet the same allocator (the
// sanitizers check that they match).
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
