#include "conveyor/tensor.h"

#include <cstring>

namespace conveyor {

namespace {

struct DTypeInfo {
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {"BOOL", 1},  {"UINT8", 1}, {"UINT16", 2}, {"UINT32", 4}, {"UINT64", 8},
    {"INT8", 1},  {"INT16", 2}, {"INT32", 4},  {"INT64", 8},  {"FP16", 2},
    {"BF16", 2},  {"FP32", 4},  {"FP64", 8},   {"BYTES", 8},
};

}  // namespace

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kOk: return "OK";
    case ErrorCode::kInvalidInput: return "InvalidInput";
    case ErrorCode::kQueueFull: return "QueueFull";
    case ErrorCode::kDeadlineExceeded: return "DeadlineExceeded";
    case ErrorCode::kCancelled: return "Cancelled";
    case ErrorCode::kModelExecution: return "ModelExecutionError";
    case ErrorCode::kOutOfMemory: return "OutOfMemory";
    case ErrorCode::kUnavailable: return "Unavailable";
    case ErrorCode::kInternal: return "InternalError";
  }
  return "Unknown";
}

size_t dtype_size(DType dtype) noexcept { return kDTypes[static_cast<int>(dtype)].size; }

const char* dtype_name(DType dtype) noexcept { return kDTypes[static_cast<int>(dtype)].name; }

DType dtype_from_name(const std::string& name) {
  for (size_t i = 0; i < sizeof(kDTypes) / sizeof(kDTypes[0]); ++i) {
    if (name == kDTypes[i].name) return static_cast<DType>(i);
  }
  throw Error(ErrorCode::kInvalidInput,
              "[tensor] unknown datatype '" + name +
                  "': expected one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, "
                  "INT64, FP16, BF16, FP32, FP64, BYTES");
}

Shape::Shape(std::initializer_list<int64_t> dims) : Shape(dims.begin(), static_cast<int>(dims.size())) {}

Shape::Shape(const int64_t* dims, int ndim) {
  if (ndim < 0 || ndim > kMaxDims) {
    throw Error(ErrorCode::kInvalidInput, "[tensor] a tensor has " + std::to_string(ndim) +
                                              " dimensions; at most " + std::to_string(kMaxDims) +
                                              " are supported");
  }
  ndim_ = ndim;
  if (ndim > 0) std::memcpy(dims_, dims, sizeof(int64_t) * ndim);
}

int64_t Shape::numel() const noexcept {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[i];
  return n;
}

int64_t Shape::row_numel() const noexcept {
  int64_t n = 1;
  for (int i = 1; i < ndim_; ++i) n *= dims_[i];
  return n;
}

bool Shape::operator==(const Shape& other) const noexcept {
  if (ndim_ != other.ndim_) return false;
  for (int i = 0; i < ndim_; ++i) {
    if (dims_[i] != other.dims_[i]) return false;
  }
  return true;
}

std::string Shape::to_string() const {
  std::string s = "[";
  for (int i = 0; i < ndim_; ++i) {
    if (i) s += ", ";
    s += std::to_string(dims_[i]);
  }
  return s + "]";
}

}  // namespace conveyor
