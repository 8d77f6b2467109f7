// Typed errors of the core. Every component throws conveyor::Error with a code and a
// message prefixed by the component ("[batcher] ..."); the bindings map the code to the
// matching conveyor.errors type, so Python sees one exception hierarchy.
#pragma once

#include <stdexcept>
#include <string>

namespace conveyor {

enum class ErrorCode : int {
  kOk = 0,
  kInvalidInput = 1,      // the request or argument does not match what was expected
  kQueueFull = 2,         // the model's bounded queue has no room
  kDeadlineExceeded = 3,  // the request's deadline passed before it was executed
  kCancelled = 4,         // the caller gave up on the request
  kModelExecution = 5,    // the model (backend) failed while executing a batch
  kOutOfMemory = 6,       // a memory pool could not satisfy an allocation
  kUnavailable = 7,       // the component is stopping or stopped
  kInternal = 8,          // a broken invariant inside the core
};

const char* error_code_name(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace conveyor
