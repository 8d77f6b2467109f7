// StreamCache, the bound on the CUDA kernels' per-stream scratch: at most N entries per
// device, the least recently used one handed back when a new stream needs room.
#include <cstdint>
#include <memory>
#include <vector>

#include "../src/kernels/cuda/stream_cache.h"
#include "check.h"

using conveyor::kernels::cuda::detail::StreamCache;

namespace {

// A distinct stream handle per number; never dereferenced.
const void* stream(int n) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(0x1000 + 0x10 * n)); }

struct Counted {
  int made_for;
};

}  // namespace

TEST_CASE("stream cache: the same stream gets the same entry, made once") {
  StreamCache<Counted> cache(4);
  int made = 0;
  auto make_for = [&made](int n) {
    return [&made, n] {
      ++made;
      return std::make_shared<Counted>(Counted{n});
    };
  };
  auto first = cache.acquire(0, stream(1), make_for(1));
  auto again = cache.acquire(0, stream(1), make_for(1));
  CHECK(first.entry != nullptr);
  CHECK(first.entry == again.entry);
  CHECK(first.evicted == nullptr && again.evicted == nullptr);
  CHECK_EQ(made, 1);
  CHECK_EQ(first.entry->made_for, 1);
  // The null (legacy default) stream is a stream like any other.
  auto null_stream = cache.acquire(0, nullptr, make_for(0));
  CHECK(null_stream.entry != first.entry);
  CHECK_EQ(made, 2);
}

TEST_CASE("stream cache: a device holds at most the bound; the least recently used goes") {
  StreamCache<Counted> cache(3);
  std::vector<std::shared_ptr<Counted>> entries;
  for (int n = 0; n < 3; ++n) {
    auto acquired = cache.acquire(0, stream(n), [n] { return std::make_shared<Counted>(Counted{n}); });
    CHECK(acquired.evicted == nullptr);
    entries.push_back(acquired.entry);
  }
  CHECK_EQ(cache.size(0), size_t{3});
  cache.acquire(0, stream(0), [] { return std::make_shared<Counted>(Counted{-1}); });  // 0 is now the most recent
  auto fourth = cache.acquire(0, stream(3), [] { return std::make_shared<Counted>(Counted{3}); });
  CHECK(fourth.evicted == entries[1]);  // 1 was used least recently
  CHECK_EQ(cache.size(0), size_t{3});
  CHECK(!cache.contains(0, stream(1)));
  CHECK(cache.contains(0, stream(0)) && cache.contains(0, stream(2)) && cache.contains(0, stream(3)));
  auto fifth = cache.acquire(0, stream(4), [] { return std::make_shared<Counted>(Counted{4}); });
  CHECK(fifth.evicted == entries[2]);
  // A stream that comes back after its eviction gets a new entry (and evicts in turn).
  auto back = cache.acquire(0, stream(1), [] { return std::make_shared<Counted>(Counted{10}); });
  CHECK(back.entry != entries[1]);
  CHECK_EQ(back.entry->made_for, 10);
  CHECK(back.evicted == entries[0]);
  CHECK_EQ(cache.size(0), size_t{3});
}

TEST_CASE("stream cache: an evicted entry lives on while a holder keeps it") {
  StreamCache<Counted> cache(1);
  auto held = cache.acquire(0, stream(0), [] { return std::make_shared<Counted>(Counted{0}); }).entry;
  std::weak_ptr<Counted> watch = held;
  auto next = cache.acquire(0, stream(1), [] { return std::make_shared<Counted>(Counted{1}); });
  CHECK(next.evicted == held);
  next.evicted.reset();
  CHECK(!watch.expired());  // a lease in flight still owns it
  held.reset();
  CHECK(watch.expired());  // the last owner releases it
}

TEST_CASE("stream cache: devices are bounded separately") {
  StreamCache<Counted> cache(2);
  for (int device = 0; device < 3; ++device) {
    for (int n = 0; n < 2; ++n) {
      auto acquired = cache.acquire(device, stream(n), [n] { return std::make_shared<Counted>(Counted{n}); });
      CHECK(acquired.evicted == nullptr);
    }
  }
  for (int device = 0; device < 3; ++device) CHECK_EQ(cache.size(device), size_t{2});
  // The same handle on another device is another entry.
  CHECK(cache.acquire(1, stream(0), [] { return nullptr; }).entry !=
        cache.acquire(2, stream(0), [] { return nullptr; }).entry);
  auto third = cache.acquire(1, stream(2), [] { return std::make_shared<Counted>(Counted{2}); });
  CHECK(third.evicted != nullptr);
  CHECK(!cache.contains(1, stream(1)) && cache.contains(1, stream(0)));  // stream 0 was used since
  CHECK_EQ(cache.size(0), size_t{2});
  CHECK_EQ(cache.size(1), size_t{2});
  CHECK_EQ(cache.size(7), size_t{0});
  CHECK_EQ(StreamCache<Counted>(0).streams_per_device(), size_t{1});  // a bound of 0 would keep nothing
}
