// Model graphs over real batchers and threads; the test command runs these under
// ThreadSanitizer and AddressSanitizer. Synchronisation is explicit (gates), never sleeps.
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "gate.h"
#include "conveyor/graph.h"
#include "conveyor/router.h"

using namespace conveyor;
using conveyor::testing::Gate;

namespace {

constexpr double kNoDefault = std::numeric_limits<double>::quiet_NaN();

// A batcher over rows of `width` floats computing out = f(in) element by element.
std::shared_ptr<Batcher> elementwise(const std::string& name, int64_t width, std::function<float(float)> f,
                                     Gate* gate = nullptr, int64_t max_batch = 16) {
  BatcherOptions o;
  o.model_name = name;
  o.inputs = {{"x", DType::kFloat32, {width}}};
  o.outputs = {{"y", DType::kFloat32, {width}}};
  o.max_batch_size = max_batch;
  return std::make_shared<Batcher>(o, [f, gate](const Batch& b) {
    if (gate != nullptr) gate->pass();
    const Tensor& x = b.inputs[0];
    Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, x.shape);
    for (int64_t i = 0; i < x.shape.numel(); ++i) static_cast<float*>(y.data)[i] = f(static_cast<const float*>(x.data)[i]);
    return std::vector<Tensor>{y};
  }, nullptr);
}

// A batcher adding its two inputs.
std::shared_ptr<Batcher> adder(int64_t width) {
  BatcherOptions o;
  o.model_name = "add";
  o.inputs = {{"a", DType::kFloat32, {width}}, {"b", DType::kFloat32, {width}}};
  o.outputs = {{"sum", DType::kFloat32, {width}}};
  o.max_batch_size = 16;
  return std::make_shared<Batcher>(o, [](const Batch& b) {
    Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, b.inputs[0].shape);
    for (int64_t i = 0; i < y.shape.numel(); ++i) {
      static_cast<float*>(y.data)[i] = static_cast<const float*>(b.inputs[0].data)[i] + static_cast<const float*>(b.inputs[1].data)[i];
    }
    return std::vector<Tensor>{y};
  }, nullptr);
}

std::shared_ptr<Batcher> failing(const std::string& name, int64_t width) {
  BatcherOptions o;
  o.model_name = name;
  o.inputs = {{"x", DType::kFloat32, {width}}};
  o.outputs = {{"y", DType::kFloat32, {width}}};
  o.max_batch_size = 16;
  return std::make_shared<Batcher>(o, [](const Batch&) -> std::vector<Tensor> {
    throw Error(ErrorCode::kModelExecution, "the model broke");
  }, nullptr);
}

GraphStep step(const std::string& name, std::vector<int> inputs, int64_t width) {
  GraphStep s;
  s.name = name;
  s.model = name + "_model";
  s.input_slots = std::move(inputs);
  s.outputs = {{"y", DType::kFloat32, {width}}};
  s.defaults = {kNoDefault};
  return s;
}

RowPredicate test(int slot, RowReduce reduce, RowCompare op, std::vector<double> values, int64_t element = 0) {
  RowPredicate p;
  p.tests.push_back({slot, reduce, element, op, std::move(values)});
  p.program = {0};
  return p;
}

// A cascade: `cheap` (y = x / 10) on every row; `costly` (y = x * 100) on the rows whose
// first cheap value is >= 0.5; the output takes costly's rows first, then cheap's.
GraphOptions cascade_options(int64_t width) {
  GraphOptions o;
  o.name = "cascade";
  o.inputs = {{"x", DType::kFloat32, {width}}};
  o.outputs = {{"y", DType::kFloat32, {width}}};
  o.steps.push_back(step("cheap", {0}, width));                    // writes slot 1
  GraphStep costly = step("costly", {0}, width);                   // writes slot 2
  costly.when = test(1, RowReduce::kElement, RowCompare::kGe, {0.5});
  o.steps.push_back(costly);
  o.output_sources = {{2, 1}};
  o.max_batch_size = 16;
  return o;
}

Tensor borrow(std::vector<float>& data, int64_t rows) {
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{rows, static_cast<int64_t>(data.size()) / rows};
  t.data = data.data();
  return t;
}

const float* out_rows(const Completion& c, int output = 0) {
  return static_cast<const float*>(c.outputs->tensors[output].data) + c.row_offset * c.outputs->tensors[output].shape.row_numel();
}

}  // namespace

TEST_CASE("graph: a cascade sends each row down its branch and scatters answers in row order") {
  auto cheap = elementwise("cheap", 2, [](float v) { return v / 10; });
  auto costly = elementwise("costly", 2, [](float v) { return v * 100; });
  Graph g(cascade_options(2), nullptr);
  g.bind(0, cheap);
  g.bind(1, costly);
  // Every mix of rows for batches of 1 to 6: bit r of `mask` sends row r to the costly model.
  for (int64_t rows = 1; rows <= 6; ++rows) {
    for (int mask = 0; mask < (1 << rows); ++mask) {
      std::vector<float> x(static_cast<size_t>(rows) * 2);
      for (int64_t r = 0; r < rows; ++r) {
        x[r * 2] = (mask >> r) & 1 ? 7.0f + r : 1.0f + r / 10.0f;  // cheap gives >= 0.5 only for the first kind
        x[r * 2 + 1] = static_cast<float>(r);
      }
      Completion c = g.infer({borrow(x, rows)});
      CHECK_EQ(static_cast<int>(c.code), 0);
      if (c.code != ErrorCode::kOk) return;
      CHECK_EQ(c.rows, rows);
      const float* y = out_rows(c);
      for (int64_t r = 0; r < rows; ++r) {
        const bool costly_row = (mask >> r) & 1;
        for (int k = 0; k < 2; ++k) {
          const float expected = costly_row ? x[r * 2 + k] * 100 : x[r * 2 + k] / 10;
          CHECK_EQ(y[r * 2 + k], expected);
        }
      }
    }
  }
  auto steps = g.step_stats();
  CHECK_EQ(steps[0].skipped_rows, 0u);
  CHECK(steps[1].skipped_rows > 0);
  CHECK_EQ(steps[0].rows, steps[1].rows + steps[1].skipped_rows);
  CHECK_EQ(g.stats().failed, 0u);
}

TEST_CASE("graph: a pipeline's output is the last step's batch output itself, not a copy") {
  auto first = elementwise("first", 2, [](float v) { return v + 1; });
  auto second = elementwise("second", 2, [](float v) { return v * 2; });
  GraphOptions o;
  o.name = "pipe";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.steps = {step("first", {0}, 2), step("second", {1}, 2)};
  o.output_sources = {{2}};
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  g.bind(0, first);
  g.bind(1, second);
  std::vector<float> x = {1, 2, 3, 4};
  Completion c = g.infer({borrow(x, 2)});
  CHECK_EQ(static_cast<int>(c.code), 0);
  const float* y = out_rows(c);
  CHECK_EQ(y[0], 4.0f);
  CHECK_EQ(y[3], 10.0f);
  CHECK(c.outputs->tensors[0].owner != nullptr);  // a view that keeps the step's batch alive
}

TEST_CASE("graph: independent steps run at the same time and a join waits for both") {
  Gate both;
  // Each branch waits at its own gate until both branches are inside their batches.
  auto left = elementwise("left", 1, [](float v) { return v + 1; }, &both);
  auto right = elementwise("right", 1, [](float v) { return v * 3; }, &both);
  auto add = adder(1);
  GraphOptions o;
  o.name = "fanout";
  o.inputs = {{"x", DType::kFloat32, {1}}};
  o.outputs = {{"sum", DType::kFloat32, {1}}};
  GraphStep join;
  join.name = "join";
  join.model = "add";
  join.input_slots = {1, 2};
  join.outputs = {{"sum", DType::kFloat32, {1}}};
  join.defaults = {kNoDefault};
  o.steps = {step("left", {0}, 1), step("right", {0}, 1), join};
  o.output_sources = {{3}};
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  g.bind(0, left);
  g.bind(1, right);
  g.bind(2, add);
  auto waiter = std::make_shared<CompletionWaiter>();
  std::vector<float> x = {2, 5};
  g.submit({borrow(x, 2)}, waiter);
  both.wait_entered(2);  // both branches are running at once: neither waits for the other
  both.open();
  Completion c = waiter->wait();
  CHECK_EQ(static_cast<int>(c.code), 0);
  CHECK_EQ(out_rows(c)[0], 3.0f + 6.0f);
  CHECK_EQ(out_rows(c)[1], 6.0f + 15.0f);
}

TEST_CASE("graph: predicates combine tests with and, or, not; absent rows fail every test") {
  // Slot 0 holds 4 rows of 3 values; slot 1 holds rows 1 and 3 only (one value each).
  std::vector<float> a = {0.1f, 0.7f, 0.2f,  0.9f, 0.05f, 0.05f,  0.3f, 0.3f, 0.4f,  0.2f, 0.2f, 0.6f};
  std::vector<float> b = {5, -1};
  Tensor ta = borrow(a, 4);
  Tensor tb = borrow(b, 2);
  std::vector<uint8_t> b_rows = {0, 1, 0, 1};
  std::vector<const Tensor*> values = {&ta, &tb};
  std::vector<const std::vector<uint8_t>*> present = {nullptr, &b_rows};
  auto eval = [&](const RowPredicate& p) { return evaluate_predicate(p, values, present, 4); };
  CHECK((eval(test(0, RowReduce::kMax, RowCompare::kLt, {0.65})) == std::vector<uint8_t>{0, 0, 1, 1}));
  CHECK((eval(test(0, RowReduce::kArgmax, RowCompare::kIn, {1, 2})) == std::vector<uint8_t>{1, 0, 1, 1}));
  CHECK((eval(test(0, RowReduce::kArgmax, RowCompare::kNotIn, {1, 2})) == std::vector<uint8_t>{0, 1, 0, 0}));
  CHECK((eval(test(0, RowReduce::kMin, RowCompare::kLe, {0.05})) == std::vector<uint8_t>{0, 1, 0, 0}));
  CHECK((eval(test(0, RowReduce::kElement, RowCompare::kEq, {0.3f}, 1)) == std::vector<uint8_t>{0, 0, 1, 0}));
  CHECK((eval(test(1, RowReduce::kValue, RowCompare::kGt, {0})) == std::vector<uint8_t>{0, 1, 0, 0}));
  CHECK((eval(test(1, RowReduce::kValue, RowCompare::kNe, {3})) == std::vector<uint8_t>{0, 1, 0, 1}));
  // max(a) < 0.65 or not (b > 0): rows 0 and 2 have no b, so "b > 0" fails there and "not" holds.
  RowPredicate p;
  p.tests = {{0, RowReduce::kMax, 0, RowCompare::kLt, {0.65}}, {1, RowReduce::kValue, 0, RowCompare::kGt, {0}}};
  p.program = {0, 1, RowPredicate::kNot, RowPredicate::kOr};
  CHECK((eval(p) == std::vector<uint8_t>{1, 0, 1, 1}));
  p.program = {0, 1, RowPredicate::kAnd};
  CHECK((eval(p) == std::vector<uint8_t>{0, 0, 0, 0}));
  // One value per row is what a bare tensor means: three are refused, as is an element past the row.
  CHECK_THROWS_CODE(eval(test(0, RowReduce::kValue, RowCompare::kLt, {1})), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(eval(test(0, RowReduce::kElement, RowCompare::kLt, {1}, 3)), ErrorCode::kInvalidInput);
}

TEST_CASE("graph: a failing step fails the request naming it; an optional one answers its default") {
  auto good = elementwise("good", 2, [](float v) { return v; });
  auto bad = failing("bad", 2);
  GraphOptions o;
  o.name = "g";
  o.inputs = {{"x", DType::kFloat32, {2}}};
  o.outputs = {{"y", DType::kFloat32, {2}}, {"z", DType::kFloat32, {2}}};
  o.steps = {step("good", {0}, 2), step("bad", {0}, 2)};
  o.output_sources = {{1}, {2}};
  o.max_batch_size = 16;
  {
    Graph g(o, nullptr);
    g.bind(0, good);
    g.bind(1, bad);
    std::vector<float> x = {1, 2};
    Completion c = g.infer({borrow(x, 1)});
    CHECK_EQ(static_cast<int>(c.code), static_cast<int>(ErrorCode::kModelExecution));
    CHECK(c.message.find("step 'bad' (model 'bad_model')") != std::string::npos);
    CHECK(c.message.find("the model broke") != std::string::npos);
    CHECK_EQ(g.stats().failed, 1u);
  }
  o.steps[1].optional = true;
  o.steps[1].defaults = {-1.5};
  {
    Graph g(o, nullptr);
    g.bind(0, good);
    g.bind(1, bad);
    std::vector<float> x = {1, 2, 3, 4};
    Completion c = g.infer({borrow(x, 2)});
    CHECK_EQ(static_cast<int>(c.code), 0);
    CHECK_EQ(out_rows(c, 0)[3], 4.0f);
    for (int i = 0; i < 4; ++i) CHECK_EQ(out_rows(c, 1)[i], -1.5f);
    const std::vector<GraphStepStats> steps = g.step_stats();
    CHECK_EQ(steps[1].defaulted, 1u);
  }
  // Without a default, the optional step's rows are absent: a fallback source answers them.
  o.outputs = {{"y", DType::kFloat32, {2}}};
  o.output_sources = {{2, 1}};
  o.steps[1].defaults = {kNoDefault};
  {
    Graph g(o, nullptr);
    g.bind(0, good);
    g.bind(1, bad);
    std::vector<float> x = {1, 2};
    Completion c = g.infer({borrow(x, 1)});
    CHECK_EQ(static_cast<int>(c.code), 0);
    CHECK_EQ(out_rows(c)[1], 2.0f);
  }
  // A row no source has fails the request, saying so.
  o.output_sources = {{2}};
  {
    Graph g(o, nullptr);
    g.bind(0, good);
    g.bind(1, bad);
    std::vector<float> x = {1, 2};
    Completion c = g.infer({borrow(x, 1)});
    CHECK_EQ(static_cast<int>(c.code), static_cast<int>(ErrorCode::kModelExecution));
    CHECK(c.message.find("output 'y'") != std::string::npos);
  }
}

TEST_CASE("graph: a step whose request cannot start within its timeout fails the request by its deadline") {
  Gate gate;
  auto slow = elementwise("slow", 1, [](float v) { return v; }, &gate);
  GraphOptions o;
  o.name = "g";
  o.inputs = {{"x", DType::kFloat32, {1}}};
  o.outputs = {{"y", DType::kFloat32, {1}}};
  o.steps = {step("slow", {0}, 1)};
  o.steps[0].timeout_us = 1000;
  o.output_sources = {{1}};
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  g.bind(0, slow);
  // A direct request occupies the model's only instance at the gate.
  std::vector<float> direct = {1};
  auto direct_waiter = std::make_shared<CompletionWaiter>();
  slow->submit({borrow(direct, 1)}, direct_waiter);
  gate.wait_entered(1);
  std::vector<float> x = {2};
  Completion c = g.infer({borrow(x, 1)});  // queued behind it; the batcher's deadline thread expires it
  CHECK_EQ(static_cast<int>(c.code), static_cast<int>(ErrorCode::kDeadlineExceeded));
  CHECK(c.message.find("step 'slow'") != std::string::npos);
  CHECK_EQ(g.stats().expired, 1u);
  gate.open();
  CHECK_EQ(static_cast<int>(direct_waiter->wait().code), 0);
}

TEST_CASE("graph: an unbound step makes the graph unready and refuses requests; rebinding serves again") {
  auto cheap = elementwise("cheap", 2, [](float v) { return v / 10; });
  auto costly = elementwise("costly", 2, [](float v) { return v * 100; });
  Graph g(cascade_options(2), nullptr);
  g.bind(0, cheap);
  std::string reason;
  CHECK(!g.ready(&reason));
  CHECK(reason.find("costly") != std::string::npos);
  std::vector<float> x = {1, 2};
  CHECK_THROWS_CODE(g.infer({borrow(x, 1)}), ErrorCode::kUnavailable);
  g.bind(1, costly);
  CHECK(g.ready());
  CHECK_EQ(static_cast<int>(g.infer({borrow(x, 1)}).code), 0);
  g.bind(1, nullptr, "model 'costly' is not loaded");
  CHECK(!g.ready(&reason));
  CHECK(reason.find("is not loaded") != std::string::npos);
  CHECK_EQ(g.stats().rejected, 1u);
}

TEST_CASE("graph: invalid plans and requests are refused with the step or input named") {
  GraphOptions o = cascade_options(2);
  o.steps[1].input_slots = {5};
  CHECK_THROWS_CODE(Graph(o, nullptr), ErrorCode::kInvalidInput);
  o = cascade_options(2);
  o.steps[1].when = test(2, RowReduce::kMax, RowCompare::kLt, {1});  // its own output
  CHECK_THROWS_CODE(Graph(o, nullptr), ErrorCode::kInvalidInput);
  o = cascade_options(2);
  o.steps[0].defaults = {1.0};  // a default on a step that is not optional
  CHECK_THROWS_CODE(Graph(o, nullptr), ErrorCode::kInvalidInput);
  o = cascade_options(2);
  o.steps[1].when.program = {0, RowPredicate::kAnd};
  CHECK_THROWS_CODE(Graph(o, nullptr), ErrorCode::kInvalidInput);
  Graph g(cascade_options(2), nullptr);
  g.bind(0, elementwise("cheap", 2, [](float v) { return v; }));
  g.bind(1, elementwise("costly", 2, [](float v) { return v; }));
  std::vector<float> wide = {1, 2, 3};
  CHECK_THROWS_CODE(g.infer({borrow(wide, 1)}), ErrorCode::kInvalidInput);
  std::vector<float> many(17 * 2);
  CHECK_THROWS_CODE(g.infer({borrow(many, 17)}), ErrorCode::kInvalidInput);
}

TEST_CASE("graph: callers of a graph and direct callers of its step models share batches, all answered right") {
  Gate hold;  // the cheap model's first batch waits here while the others queue up
  std::atomic<bool> first{true};
  BatcherOptions bo;
  bo.model_name = "cheap";
  bo.inputs = {{"x", DType::kFloat32, {2}}};
  bo.outputs = {{"y", DType::kFloat32, {2}}};
  bo.max_batch_size = 64;
  auto cheap = std::make_shared<Batcher>(bo, [&](const Batch& b) {
    if (first.exchange(false)) hold.pass();
    Tensor y = make_pooled_tensor(MemoryPool::default_host(), DType::kFloat32, b.inputs[0].shape);
    for (int64_t i = 0; i < y.shape.numel(); ++i) static_cast<float*>(y.data)[i] = static_cast<const float*>(b.inputs[0].data)[i] / 10;
    return std::vector<Tensor>{y};
  }, nullptr);
  auto costly = elementwise("costly", 2, [](float v) { return v * 100; }, nullptr, 64);
  GraphOptions o = cascade_options(2);
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  g.bind(0, cheap);
  g.bind(1, costly);
  constexpr int kThreads = 8, kPerThread = 60;
  std::atomic<int> wrong{0}, errors{0};
  std::vector<std::thread> callers;
  // Thread 0's first direct request holds the model until the others have queued.
  std::vector<float> blocker = {0, 0};
  auto blocker_waiter = std::make_shared<CompletionWaiter>();
  cheap->submit({borrow(blocker, 1)}, blocker_waiter);
  hold.wait_entered(1);
  for (int t = 0; t < kThreads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const bool costly_row = (i + t) % 5 == 0;
        std::vector<float> x = {costly_row ? 9.0f : 1.0f, static_cast<float>(t * 1000 + i)};
        const bool direct = t % 2 == 1;
        Completion c = direct ? cheap->infer({borrow(x, 1)}) : g.infer({borrow(x, 1)});
        if (c.code != ErrorCode::kOk) {
          ++errors;
          continue;
        }
        const float scale = (!direct && costly_row) ? 100.0f : 0.1f;
        if (std::fabs(out_rows(c)[1] - x[1] * scale) > 1e-3f * std::fabs(x[1] * scale) + 1e-6f) ++wrong;
      }
    });
  }
  // Each caller's first request is queued (or about to be) behind the blocker; let them run.
  hold.open();
  for (auto& th : callers) th.join();
  CHECK_EQ(static_cast<int>(blocker_waiter->wait().code), 0);
  CHECK_EQ(wrong.load(), 0);
  CHECK_EQ(errors.load(), 0);
  const BatcherStats gs = g.stats();
  CHECK_EQ(gs.succeeded, static_cast<uint64_t>(kThreads / 2 * kPerThread));
  CHECK_EQ(gs.in_flight, 0u);
  const BatcherStats cs = cheap->stats();
  CHECK_EQ(cs.succeeded, static_cast<uint64_t>(kThreads * kPerThread + 1));
  const std::vector<GraphStepStats> steps = g.step_stats();
  CHECK_EQ(steps[0].requests, static_cast<uint64_t>(kThreads / 2 * kPerThread));
}

TEST_CASE("graph: cancel answers a request at once; stop without drain cancels the rest") {
  Gate gate;
  auto slow = elementwise("slow", 1, [](float v) { return v; }, &gate);
  GraphOptions o;
  o.name = "g";
  o.inputs = {{"x", DType::kFloat32, {1}}};
  o.outputs = {{"y", DType::kFloat32, {1}}};
  o.steps = {step("slow", {0}, 1)};
  o.output_sources = {{1}};
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  g.bind(0, slow);
  std::vector<float> x = {1}, y = {2};
  auto first = std::make_shared<CompletionWaiter>();
  auto second = std::make_shared<CompletionWaiter>();
  const uint64_t running = g.submit({borrow(x, 1)}, first);
  gate.wait_entered(1);
  const uint64_t queued = g.submit({borrow(y, 1)}, second);
  CHECK(g.cancel(queued));
  CHECK_EQ(static_cast<int>(second->wait().code), static_cast<int>(ErrorCode::kCancelled));
  CHECK(!g.cancel(queued));
  CHECK(g.cancel(running));
  CHECK_EQ(static_cast<int>(first->wait().code), static_cast<int>(ErrorCode::kCancelled));
  gate.open();
  g.stop(false);
  CHECK_EQ(g.stats().cancelled, 2u);
  CHECK_THROWS_CODE(g.infer({borrow(x, 1)}), ErrorCode::kUnavailable);
}

TEST_CASE("graph: a step bound to several versions splits its requests by the arms' bounds") {
  auto v1 = elementwise("m_v1", 1, [](float v) { return v; });
  auto v2 = elementwise("m_v2", 1, [](float v) { return -v; });
  GraphOptions o;
  o.name = "g";
  o.inputs = {{"x", DType::kFloat32, {1}}};
  o.outputs = {{"y", DType::kFloat32, {1}}};
  o.steps = {step("m", {0}, 1)};
  o.output_sources = {{1}};
  o.max_batch_size = 16;
  Graph g(o, nullptr);
  // Everything to the first arm: the second's range is empty.
  g.bind_arms(0, {v1, v2}, {router::kPointLimit, router::kPointLimit});
  std::vector<float> x = {3};
  for (int i = 0; i < 50; ++i) {
    Completion c = g.infer({borrow(x, 1)});
    CHECK_EQ(out_rows(c)[0], 3.0f);
  }
  // Half and half: 400 requests reach both versions (each is missed with probability 2^-400).
  g.bind_arms(0, {v1, v2}, {router::kPointLimit / 2, router::kPointLimit});
  int first = 0, second = 0;
  for (int i = 0; i < 400; ++i) {
    Completion c = g.infer({borrow(x, 1)});
    const float y = out_rows(c)[0];
    if (y == 3.0f) ++first; else if (y == -3.0f) ++second;
  }
  CHECK_EQ(first + second, 400);
  CHECK(first > 0 && second > 0);
  CHECK_EQ(v2->stats().succeeded, static_cast<uint64_t>(second));
  CHECK_THROWS_CODE(g.bind_arms(0, {v1, v2}, {1, 2}), ErrorCode::kInvalidInput);  // must end at 2^63
  CHECK_THROWS_CODE(g.bind_arms(0, {v1}, {}), ErrorCode::kInvalidInput);
}
