#include <cstring>

#include "check.h"

namespace conveyor::testing {

namespace {
int g_failures_in_case = 0;
}

std::vector<TestCase>& registry() {
  static std::vector<TestCase> cases;
  return cases;
}

void record_failure(const char* file, int line, const std::string& what) {
  ++g_failures_in_case;
  std::cerr << "  " << file << ":" << line << ": " << what << "\n";
}

}  // namespace conveyor::testing

int main(int argc, char** argv) {
  using namespace conveyor::testing;
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0;
  for (const auto& test : registry()) {
    if (filter && !std::strstr(test.name, filter)) continue;
    g_failures_in_case = 0;
    try {
      test.body();
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    }
    if (g_failures_in_case == 0) {
      ++passed;
      std::cout << "PASS " << test.name << "\n";
    } else {
      ++failed;
      std::cout << "FAIL " << test.name << "\n";
    }
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
