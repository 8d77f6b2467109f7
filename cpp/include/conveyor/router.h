// The rollout routing decision: per request, which arm answers and whether it is copied
// to the shadow version. Python's conveyor/deploy/router.py builds the tables and holds
// the reference implementation; both must decide the same for the same table, key and seed.
//
// Points: a request's 64-bit draw (its key's hash, or the next random value) shifted right
// by one, so points lie in [0, 2^63) and a bound of 2^63 (kPointLimit) means 100%. Arms own
// consecutive ranges [bound[i-1], bound[i]); the last bound is kPointLimit.
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>
#include <vector>

namespace conveyor::router {

inline constexpr uint64_t kPointLimit = uint64_t{1} << 63;
inline constexpr uint64_t kFnvOffsetBasis = 0xCBF29CE484222325ull;
inline constexpr uint64_t kFnvPrime = 0x100000001B3ull;
inline constexpr uint64_t kSplitmixIncrement = 0x9E3779B97F4A7C15ull;
inline constexpr uint64_t kShadowStream = 0x5BD1E9955BD1E995ull;  // decorrelates shadow from arm

// The splitmix64 finalizer: a bijection on 64-bit values that spreads every input bit.
inline uint64_t mix64(uint64_t value) {
  value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9ull;
  value = (value ^ (value >> 27)) * 0x94D049BB133111EBull;
  return value ^ (value >> 31);
}

// 64-bit FNV-1a of `bytes`, starting from `basis` (a salt's own FNV-1a gives each salt its split).
inline uint64_t fnv1a64(std::string_view bytes, uint64_t basis = kFnvOffsetBasis) {
  uint64_t value = basis;
  for (unsigned char byte : bytes) value = (value ^ byte) * kFnvPrime;
  return value;
}

// The draw of a routing key: stable across processes, restarts and machines.
inline uint64_t key_draw(std::string_view key, uint64_t salt_basis) { return mix64(fnv1a64(key, salt_basis)); }

// One rollout state, as points.
struct RouteTable {
  std::vector<uint64_t> arm_bounds;  // ascending cumulative upper bounds; last == kPointLimit
  uint64_t shadow_bound = 0;         // points below it are copied to the shadow; 0: never
  uint64_t salt_basis = kFnvOffsetBasis;
  bool sticky = true;                // false: keys are ignored, every draw is random
};

// Throws Error(kInvalidInput) naming the problem: no arms, bounds descending, last bound
// not kPointLimit, or shadow_bound above kPointLimit.
void validate(const RouteTable& table);

// The decision for one draw, packed as arm_index * 2 + shadow (one small integer, so the
// caller can index a table of prebuilt answers). Pure; `table` must be valid.
inline uint32_t decide(const RouteTable& table, uint64_t draw) {
  const uint64_t point = draw >> 1;
  uint32_t arm = 0;
  while (point >= table.arm_bounds[arm]) ++arm;  // terminates: the last bound exceeds every point
  const bool shadow = table.shadow_bound != 0 && (mix64(draw ^ kShadowStream) >> 1) < table.shadow_bound;
  return arm * 2 + static_cast<uint32_t>(shadow);
}

// A table plus the random source for requests without a key. Thread-safe: the generator
// is a splitmix64 counter advanced with one relaxed atomic add, so concurrent callers get
// distinct draws; the table is immutable after construction.
class Router {
 public:
  Router(RouteTable table, uint64_t seed);  // validates the table

  // `key` null or empty, or the table not sticky: a random draw; else the key's draw.
  uint32_t decide(const char* key, size_t length) {
    const bool keyed = key != nullptr && length != 0 && table_.sticky;
    return router::decide(table_, keyed ? key_draw(std::string_view(key, length), table_.salt_basis) : next_random());
  }

  uint64_t next_random() { return mix64(state_.fetch_add(kSplitmixIncrement, std::memory_order_relaxed) + kSplitmixIncrement); }
  const RouteTable& table() const { return table_; }

 private:
  RouteTable table_;
  std::atomic<uint64_t> state_;
};

}  // namespace conveyor::router
