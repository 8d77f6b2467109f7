// A tensor as the core sees it: dtype, shape, device, a data pointer and an owner.
// The owner (a type-erased shared_ptr) keeps the memory alive: a pooled block, or
// whatever the producer attached. A tensor without an owner borrows its memory, and
// the producer guarantees it outlives every use (documented where that happens).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "conveyor/error.h"

namespace conveyor {

// KServe v2 datatypes. kBytes is a variable-length byte string; inside the core it is
// carried as an array of opaque 8-byte handles (object pointers) that only the
// producer can interpret, so the batcher can gather it like any fixed-size type.
enum class DType : uint8_t {
  kBool, kUInt8, kUInt16, kUInt32, kUInt64,
  kInt8, kInt16, kInt32, kInt64,
  kFloat16, kBFloat16, kFloat32, kFloat64,
  kBytes,
};

size_t dtype_size(DType dtype) noexcept;
// The v2 protocol name: "FP32", "INT64", "BYTES", ...
const char* dtype_name(DType dtype) noexcept;
// Parses a v2 protocol name; throws Error(kInvalidInput) naming the unknown value.
DType dtype_from_name(const std::string& name);

enum class DeviceKind : uint8_t { kCPU, kCUDAHost, kCUDA };

struct Device {
  DeviceKind kind = DeviceKind::kCPU;
  int index = 0;
  bool operator==(const Device&) const = default;
};

// Fixed-capacity shape: no allocation per request on the hot path.
class Shape {
 public:
  static constexpr int kMaxDims = 8;

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  // Throws Error(kInvalidInput) when ndim exceeds kMaxDims.
  Shape(const int64_t* dims, int ndim);

  int ndim() const noexcept { return ndim_; }
  int64_t operator[](int i) const noexcept { return dims_[i]; }
  int64_t& operator[](int i) noexcept { return dims_[i]; }
  const int64_t* data() const noexcept { return dims_; }
  int64_t numel() const noexcept;
  // Product of all dimensions but the first (1 for ndim <= 1).
  int64_t row_numel() const noexcept;
  bool operator==(const Shape& other) const noexcept;
  std::string to_string() const;

 private:
  int64_t dims_[kMaxDims] = {};
  int ndim_ = 0;
};

struct Tensor {
  DType dtype = DType::kFloat32;
  Shape shape;
  void* data = nullptr;
  Device device;
  std::shared_ptr<void> owner;  // null: borrowed memory

  size_t nbytes() const noexcept { return static_cast<size_t>(shape.numel()) * dtype_size(dtype); }
  size_t row_nbytes() const noexcept {
    return static_cast<size_t>(shape.row_numel()) * dtype_size(dtype);
  }
};

}  // namespace conveyor
