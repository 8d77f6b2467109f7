// Row predicates of model graphs: compile-time checks and per-row evaluation (graph.h).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "row_predicate.h"

namespace conveyor {

namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::kInvalidInput, message); }

template <typename T>
double element_as_double(const void* data, int64_t i) noexcept {
  return static_cast<double>(static_cast<const T*>(data)[i]);
}

using ElementReader = double (*)(const void*, int64_t) noexcept;

ElementReader reader_for(DType dtype) {
  switch (dtype) {
    case DType::kBool: return &element_as_double<bool>;
    case DType::kUInt8: return &element_as_double<uint8_t>;
    case DType::kUInt16: return &element_as_double<uint16_t>;
    case DType::kUInt32: return &element_as_double<uint32_t>;
    case DType::kUInt64: return &element_as_double<uint64_t>;
    case DType::kInt8: return &element_as_double<int8_t>;
    case DType::kInt16: return &element_as_double<int16_t>;
    case DType::kInt32: return &element_as_double<int32_t>;
    case DType::kInt64: return &element_as_double<int64_t>;
    case DType::kFloat32: return &element_as_double<float>;
    case DType::kFloat64: return &element_as_double<double>;
    default: invalid(std::string("a row predicate cannot read ") + dtype_name(dtype) + " values");
  }
}

bool compare(RowCompare op, double x, const std::vector<double>& values) noexcept {
  switch (op) {
    case RowCompare::kLt: return x < values[0];
    case RowCompare::kLe: return x <= values[0];
    case RowCompare::kGt: return x > values[0];
    case RowCompare::kGe: return x >= values[0];
    case RowCompare::kEq: return x == values[0];
    case RowCompare::kNe: return x != values[0];
    case RowCompare::kIn: return std::find(values.begin(), values.end(), x) != values.end();
    case RowCompare::kNotIn: return std::find(values.begin(), values.end(), x) == values.end();
  }
  return false;
}

// One test over every row: 1 where the slot has the row and the comparison holds.
void evaluate_test(const RowTest& test, const Tensor* value, const std::vector<uint8_t>* present, int64_t rows,
                   uint8_t* out) {
  if (value == nullptr || value->data == nullptr) {  // the slot has no rows
    std::memset(out, 0, static_cast<size_t>(rows));
    return;
  }
  const ElementReader read = reader_for(value->dtype);
  const int64_t width = value->shape.row_numel();
  // FP32 values are compared with the constants as FP32 holds them: `p == 0.1` means the
  // FP32 nearest 0.1, which is what a model computing 0.1 returns.
  std::vector<double> constants = test.values;
  if (value->dtype == DType::kFloat32) {
    for (double& c : constants) c = static_cast<double>(static_cast<float>(c));
  }
  if (test.reduce == RowReduce::kValue && width != 1) {
    invalid("a row predicate compares a tensor with " + std::to_string(width) +
            " values per row as one value: name an element ([k]), or use max(), min() or argmax()");
  }
  if (test.reduce == RowReduce::kElement && (test.element < 0 || test.element >= width)) {
    invalid("a row predicate reads element " + std::to_string(test.element) + " of rows holding " +
            std::to_string(width) + " values");
  }
  if (width == 0 && test.reduce != RowReduce::kValue && test.reduce != RowReduce::kElement) {
    invalid("a row predicate takes max(), min() or argmax() of empty rows");
  }
  int64_t at = 0;  // the row's index among the rows the slot holds
  for (int64_t r = 0; r < rows; ++r) {
    if (present != nullptr && !(*present)[r]) {
      out[r] = 0;
      continue;
    }
    const int64_t base = at * width;
    ++at;
    double x = 0;
    switch (test.reduce) {
      case RowReduce::kValue: x = read(value->data, base); break;
      case RowReduce::kElement: x = read(value->data, base + test.element); break;
      case RowReduce::kMax:
      case RowReduce::kMin:
      case RowReduce::kArgmax: {
        double best = read(value->data, base);
        int64_t best_at = 0;
        for (int64_t i = 1; i < width; ++i) {
          const double v = read(value->data, base + i);
          if (test.reduce == RowReduce::kMin ? v < best : v > best) {
            best = v;
            best_at = i;
          }
        }
        x = test.reduce == RowReduce::kArgmax ? static_cast<double>(best_at) : best;
        break;
      }
    }
    out[r] = compare(test.op, x, constants) ? 1 : 0;
  }
}

}  // namespace

void check_row_predicate(const RowPredicate& p, const std::string& where, const std::vector<TensorSpec>& slot_specs,
                     int readable_slots) {
  int depth = 0;
  for (int32_t token : p.program) {
    if (token >= 0) {
      if (static_cast<size_t>(token) >= p.tests.size()) invalid(where + "its predicate names test " + std::to_string(token) + ", which it lacks");
      ++depth;
    } else if (token == RowPredicate::kNot) {
      if (depth < 1) invalid(where + "its predicate applies 'not' to nothing");
    } else if (token == RowPredicate::kAnd || token == RowPredicate::kOr) {
      if (depth < 2) invalid(where + "its predicate joins fewer than two tests");
      --depth;
    } else {
      invalid(where + "its predicate holds the unknown operation " + std::to_string(token));
    }
  }
  if (!p.program.empty() && depth != 1) invalid(where + "its predicate leaves " + std::to_string(depth) + " values, expected 1");
  for (const RowTest& t : p.tests) {
    if (t.slot < 0 || t.slot >= readable_slots) {
      invalid(where + "its predicate reads slot " + std::to_string(t.slot) + ", which is not written before the step");
    }
    if (!numeric(slot_specs[t.slot].dtype)) {
      invalid(where + "its predicate reads '" + slot_specs[t.slot].name + "', a " + dtype_name(slot_specs[t.slot].dtype) +
              " tensor: predicates read numbers (not BYTES, FP16 or BF16)");
    }
    const bool set = t.op == RowCompare::kIn || t.op == RowCompare::kNotIn;
    if (t.values.empty() || (!set && t.values.size() != 1)) {
      invalid(where + "its predicate compares with " + std::to_string(t.values.size()) + " values");
    }
  }
}


std::vector<uint8_t> evaluate_predicate(const RowPredicate& predicate, const std::vector<const Tensor*>& values,
                                        const std::vector<const std::vector<uint8_t>*>& present, int64_t rows) {
  const size_t n = static_cast<size_t>(rows);
  std::vector<std::vector<uint8_t>> tests(predicate.tests.size(), std::vector<uint8_t>(n));
  for (size_t i = 0; i < predicate.tests.size(); ++i) {
    const RowTest& t = predicate.tests[i];
    evaluate_test(t, values[t.slot], present[t.slot], rows, tests[i].data());
  }
  std::vector<std::vector<uint8_t>> stack;
  for (int32_t token : predicate.program) {
    if (token >= 0) {
      stack.push_back(tests[token]);
    } else if (token == RowPredicate::kNot) {
      for (uint8_t& v : stack.back()) v = !v;
    } else {
      std::vector<uint8_t> right = std::move(stack.back());
      stack.pop_back();
      std::vector<uint8_t>& left = stack.back();
      for (size_t r = 0; r < n; ++r) left[r] = token == RowPredicate::kAnd ? (left[r] & right[r]) : (left[r] | right[r]);
    }
  }
  return stack.empty() ? std::vector<uint8_t>(n, 1) : std::move(stack.back());
}

}  // namespace conveyor
