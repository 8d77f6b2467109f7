// A bounded map from (device, stream) to a shared entry: the policy behind the CUDA
// kernels' per-stream scratch memory (launch.cpp), in plain C++ so that it is unit-tested
// without a GPU (cpp/tests/test_stream_cache.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace conveyor::kernels::cuda::detail {

// Keeps at most `streams_per_device` entries per device. A stream not yet present takes
// a new entry; when its device is full, the entry used least recently is dropped from
// the map and handed back to the caller, who releases it (and whatever it holds) after
// letting go of any lock. Not thread-safe: the caller serializes every call.
template <typename Entry>
class StreamCache {
 public:
  struct Acquired {
    std::shared_ptr<Entry> entry;    // the entry for the stream asked for
    std::shared_ptr<Entry> evicted;  // the entry dropped to make room, or null
  };

  explicit StreamCache(size_t streams_per_device)
      : streams_per_device_(streams_per_device < 1 ? 1 : streams_per_device) {}

  // The entry for (device, stream), made with make() when absent; marks it most recent.
  template <typename Make>
  Acquired acquire(int device, const void* stream, Make&& make) {
    std::vector<Slot>& slots = devices_[device];
    const uint64_t now = ++clock_;
    for (Slot& slot : slots) {
      if (slot.stream == stream) {
        slot.last_use = now;
        return {slot.entry, nullptr};
      }
    }
    Acquired result;
    if (slots.size() >= streams_per_device_) {
      auto oldest = slots.begin();
      for (auto it = slots.begin(); it != slots.end(); ++it) {
        if (it->last_use < oldest->last_use) oldest = it;
      }
      result.evicted = std::move(oldest->entry);
      slots.erase(oldest);
    }
    result.entry = make();
    slots.push_back(Slot{stream, now, result.entry});
    return result;
  }

  size_t size(int device) const {
    const auto it = devices_.find(device);
    return it == devices_.end() ? 0 : it->second.size();
  }

  bool contains(int device, const void* stream) const {
    const auto it = devices_.find(device);
    if (it == devices_.end()) return false;
    for (const Slot& slot : it->second) {
      if (slot.stream == stream) return true;
    }
    return false;
  }

  size_t streams_per_device() const noexcept { return streams_per_device_; }

 private:
  struct Slot {
    const void* stream;
    uint64_t last_use;  // clock_ at the latest acquire
    std::shared_ptr<Entry> entry;
  };

  size_t streams_per_device_;
  uint64_t clock_ = 0;
  std::map<int, std::vector<Slot>> devices_;  // a few slots each: a linear scan is the cheapest lookup
};

}  // namespace conveyor::kernels::cuda::detail
