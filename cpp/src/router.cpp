#include "conveyor/router.h"

#include <string>
#include <utility>

#include "conveyor/error.h"

namespace conveyor::router {

void validate(const RouteTable& table) {
  auto invalid = [](const std::string& what) { throw Error(ErrorCode::kInvalidInput, "[router] " + what); };
  if (table.arm_bounds.empty()) invalid("a route table needs at least one arm");
  for (size_t i = 1; i < table.arm_bounds.size(); ++i) {
    if (table.arm_bounds[i] < table.arm_bounds[i - 1]) {
      invalid("arm bounds must be ascending (cumulative), got bound " + std::to_string(i) + " below bound " +
              std::to_string(i - 1));
    }
  }
  if (table.arm_bounds.back() != kPointLimit) {
    invalid("the last arm bound must be 2^63 (100%), got " + std::to_string(table.arm_bounds.back()));
  }
  if (table.shadow_bound > kPointLimit) {
    invalid("the shadow bound must be at most 2^63 (100%), got " + std::to_string(table.shadow_bound));
  }
}

Router::Router(RouteTable table, uint64_t seed) : table_(std::move(table)), state_(seed) { validate(table_); }

}  // namespace conveyor::router
