// A minimal test harness: self-registering test cases and CHECK macros that record
// failures without aborting the case. main() runs every case (or those whose name
// contains argv[1]) and ends with the line "N passed, N failed".
#pragma once

#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace conveyor::testing {

struct TestCase {
  const char* name;
  std::function<void()> body;
};

std::vector<TestCase>& registry();
void record_failure(const char* file, int line, const std::string& what);

struct Registrar {
  Registrar(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

}  // namespace conveyor::testing

#define CONVEYOR_CAT2(a, b) a##b
#define CONVEYOR_CAT(a, b) CONVEYOR_CAT2(a, b)
#define TEST_CASE(name)                                                                   \
  static void CONVEYOR_CAT(test_body_, __LINE__)();                                       \
  static ::conveyor::testing::Registrar CONVEYOR_CAT(test_reg_, __LINE__)(                \
      name, &CONVEYOR_CAT(test_body_, __LINE__));                                         \
  static void CONVEYOR_CAT(test_body_, __LINE__)()

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) ::conveyor::testing::record_failure(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    auto&& check_a_ = (a);                                                                \
    auto&& check_b_ = (b);                                                                \
    if (!(check_a_ == check_b_)) {                                                        \
      std::ostringstream check_os_;                                                       \
      check_os_ << "CHECK_EQ(" #a ", " #b "): " << check_a_ << " != " << check_b_;       \
      ::conveyor::testing::record_failure(__FILE__, __LINE__, check_os_.str());           \
    }                                                                                     \
  } while (0)

// Runs stmt and checks that it throws conveyor::Error with the given code.
#define CHECK_THROWS_CODE(stmt, expected_code)                                            \
  do {                                                                                    \
    bool check_thrown_ = false;                                                           \
    try {                                                                                 \
      stmt;                                                                               \
    } catch (const ::conveyor::Error& e) {                                                \
      check_thrown_ = true;                                                               \
      if (e.code() != (expected_code))                                                    \
        ::conveyor::testing::record_failure(__FILE__, __LINE__,                          \
                                            std::string("wrong error code: ") + e.what()); \
    }                                                                                     \
    if (!check_thrown_)                                                                   \
      ::conveyor::testing::record_failure(__FILE__, __LINE__, "expected a throw: " #stmt); \
  } while (0)
