#include "conveyor/graph.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "conveyor/batch_policy.h"
#include "conveyor/monitor.h"
#include "conveyor/router.h"
#include "row_predicate.h"

namespace conveyor {

namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::kInvalidInput, message); }

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string out = "[-1";  // the batch dimension
  for (int64_t d : dims) out += ", " + std::to_string(d);
  return out + "]";
}

// Graph request ids live apart from the batchers' (both reach the same completion queues).
std::atomic<uint64_t> next_graph_request_id{1};
constexpr uint64_t kGraphIdBit = uint64_t{1} << 63;

template <typename T>
void fill_as(void* data, int64_t count, double value) noexcept {
  std::fill_n(static_cast<T*>(data), count, static_cast<T>(value));
}

void fill(Tensor& t, double value) {
  const int64_t n = t.shape.numel();
  switch (t.dtype) {
    case DType::kBool: fill_as<bool>(t.data, n, value); break;
    case DType::kUInt8: fill_as<uint8_t>(t.data, n, value); break;
    case DType::kUInt16: fill_as<uint16_t>(t.data, n, value); break;
    case DType::kUInt32: fill_as<uint32_t>(t.data, n, value); break;
    case DType::kUInt64: fill_as<uint64_t>(t.data, n, value); break;
    case DType::kInt8: fill_as<int8_t>(t.data, n, value); break;
    case DType::kInt16: fill_as<int16_t>(t.data, n, value); break;
    case DType::kInt32: fill_as<int32_t>(t.data, n, value); break;
    case DType::kInt64: fill_as<int64_t>(t.data, n, value); break;
    case DType::kFloat32: fill_as<float>(t.data, n, value); break;
    case DType::kFloat64: fill_as<double>(t.data, n, value); break;
    default: invalid(std::string("no default can fill a ") + dtype_name(t.dtype) + " output");
  }
}

}  // namespace

struct WeakArms {
  std::vector<std::weak_ptr<Batcher>> batchers;
  std::vector<uint64_t> bounds;
};
using WeakBindings = std::vector<WeakArms>;

struct Graph::Core {
  GraphOptions options;
  std::shared_ptr<MemoryPool> pool;
  std::shared_ptr<monitor::Monitor> monitor;
  std::vector<TensorSpec> slot_specs;         // per slot: its name ("step.output" for a step's) and spec
  std::vector<int> slot_step;                 // per slot: the step writing it, -1 for a graph input
  std::vector<int> first_slot;                // per step: the slot of its first output
  std::vector<std::vector<int>> waits_for;    // per step: the earlier steps it needs
  std::vector<std::vector<int>> dependents;   // per step: the later steps that need it

  std::mutex mu;
  std::condition_variable idle_cv;
  std::shared_ptr<const Bindings> bindings;                           // guarded by mu: the graph's own
  // The same batchers, weakly: what requests take (see the header on lifetimes).
  std::shared_ptr<const WeakBindings> weak_bindings;                 // guarded by mu
  mutable std::atomic<uint64_t> route_state{0};  // the arms' random source (router.h's splitmix64)
  std::vector<std::string> unbound_reasons;                           // guarded by mu
  std::unordered_map<uint64_t, std::weak_ptr<Request>> in_flight;     // guarded by mu
  bool accepting = true;                                              // guarded by mu

  std::atomic<uint64_t> requests{0}, succeeded{0}, failed{0}, rejected{0}, expired{0}, cancelled{0}, rows{0};
  std::atomic<int64_t> last_inference_ns{0};
  std::unique_ptr<std::atomic<uint64_t>[]> size_counts;
  DurationHistogram total;
  struct StepCounters {
    std::atomic<uint64_t> requests{0}, rows{0}, skipped_rows{0}, failed{0}, defaulted{0};
    DurationHistogram time;
  };
  std::unique_ptr<StepCounters[]> step_counters;

  std::string where() const { return "[graph] model '" + options.name + "': "; }
  std::string step_where(int s) const {
    return "graph '" + options.name + "': step '" + options.steps[s].name + "' (model '" + options.steps[s].model + "'): ";
  }
};

// One request in flight. Every member is guarded by mu, except the constants set before
// the first step is sent.
struct Graph::Request {
  std::shared_ptr<Core> core;
  std::shared_ptr<const WeakBindings> bindings;
  uint64_t id = 0;
  std::shared_ptr<CompletionSink> sink;
  int priority = 0;
  TimePoint started{};
  TimePoint deadline = kNoDeadline;
  int64_t rows = 0;

  std::mutex mu;
  std::vector<Tensor> inputs;                  // the caller's: handed back with the completion
  std::vector<Tensor> values;                  // per slot: its rows (in row order), once written
  std::vector<std::vector<uint8_t>> present;   // per slot: empty when it has every row, else a flag per row
  std::vector<int64_t> counts;                 // per slot: rows it holds
  std::vector<uint8_t> step_state;             // per step: 0 waiting, 1 sent, 2 done
  std::vector<int> unmet;                      // per step: steps it still waits for
  std::vector<uint64_t> step_ids;              // per sent step: its batcher request id
  std::vector<std::weak_ptr<Batcher>> step_batchers;  // per sent step: the arm it went to
  std::vector<TimePoint> step_sent;
  int steps_left = 0;
  int steps_running = 0;
  bool answered = false;                       // the caller has its completion
};

namespace {

using Request = Graph::Request;

class StepSink final : public CompletionSink {
 public:
  StepSink(std::shared_ptr<Request> request, int step) : request_(std::move(request)), step_(step) {}
  void deliver(std::vector<Completion>&& completions) override;

 private:
  std::shared_ptr<Request> request_;
  int step_;
};

// What to do once a request's lock is released: answer the caller, and what to drop.
struct AfterUnlock {
  std::shared_ptr<CompletionSink> sink;
  std::vector<Completion> answer;
  std::vector<Completion> dropped;  // step completions: released outside the request's lock
  std::vector<std::shared_ptr<Batcher>> batchers;  // those submitted to: released outside it too
  ErrorCode code = ErrorCode::kOk;
  bool finish = false;
};

const std::vector<uint8_t>* present_of(const Request& q, int slot) {
  return q.present[slot].empty() ? nullptr : &q.present[slot];
}

// Fails the request (lock held): the answer goes out after unlock.
void answer_error(Request& q, ErrorCode code, std::string message, AfterUnlock& after) {
  if (q.answered) return;
  q.answered = true;
  Completion c;
  c.request_id = q.id;
  c.code = code;
  c.message = std::move(message);
  after.sink = q.sink;
  after.answer.push_back(std::move(c));
  after.code = code;
  after.finish = true;
}

// Rows `mask` (a subset of the slot's rows) of slot `slot`, gathered into a pooled tensor.
Tensor gather_subset(Request& q, int slot, const std::vector<uint8_t>& mask, int64_t count) {
  const Tensor& from = q.values[slot];
  Shape shape = from.shape;
  shape[0] = count;
  Tensor out = make_pooled_tensor(q.core->pool, from.dtype, shape);
  const size_t row_bytes = from.row_nbytes();
  const auto* src = static_cast<const uint8_t*>(from.data);
  auto* dst = static_cast<uint8_t*>(out.data);
  const std::vector<uint8_t>* have = present_of(q, slot);
  int64_t at = 0;
  for (int64_t r = 0; r < q.rows; ++r) {
    if (have != nullptr && !(*have)[r]) continue;
    if (mask[r]) {
      std::memcpy(dst, src + at * row_bytes, row_bytes);
      dst += row_bytes;
    }
    ++at;
  }
  return out;
}

void step_done(Request& q, int step, AfterUnlock& after);

// Marks a step's outputs as holding no rows (skipped, or an optional step without defaults).
void set_no_rows(Request& q, int step, int output) {
  const int slot = q.core->first_slot[step] + output;
  q.values[slot] = Tensor{};
  q.present[slot].assign(static_cast<size_t>(q.rows), 0);
  q.counts[slot] = 0;
}

// A failed step: the request fails, or an optional step's outputs get their defaults.
void step_failed(Request& q, int step, ErrorCode code, const std::string& message, const std::vector<uint8_t>* mask,
                 int64_t count, AfterUnlock& after) {
  const Graph::Core& core = *q.core;
  const GraphStep& spec = core.options.steps[step];
  core.step_counters[step].failed.fetch_add(1, std::memory_order_relaxed);
  if (!spec.optional) {
    answer_error(q, code, core.step_where(step) + message, after);
    return;
  }
  core.step_counters[step].defaulted.fetch_add(1, std::memory_order_relaxed);
  for (size_t j = 0; j < spec.outputs.size(); ++j) {
    if (std::isnan(spec.defaults[j])) {
      set_no_rows(q, step, static_cast<int>(j));
      continue;
    }
    const int slot = core.first_slot[step] + static_cast<int>(j);
    std::vector<int64_t> dims = {count};
    dims.insert(dims.end(), spec.outputs[j].dims.begin(), spec.outputs[j].dims.end());
    Tensor t = make_pooled_tensor(core.pool, spec.outputs[j].dtype, Shape(dims.data(), static_cast<int>(dims.size())));
    fill(t, spec.defaults[j]);
    q.values[slot] = std::move(t);
    if (mask != nullptr) q.present[slot] = *mask; else q.present[slot].clear();
    q.counts[slot] = count;
  }
}

// The step's timeout argument for Batcher::submit, or false when the request's deadline has passed.
bool step_timeout(const Request& q, const GraphStep& spec, int64_t* timeout_us) {
  if (q.deadline == kNoDeadline) {
    *timeout_us = spec.timeout_us > 0 ? spec.timeout_us : -1;
    return true;
  }
  const auto left = std::chrono::duration_cast<std::chrono::microseconds>(q.deadline - Clock::now()).count();
  if (left < 1) return false;
  *timeout_us = spec.timeout_us > 0 ? std::min<int64_t>(left, spec.timeout_us) : left;
  return true;
}

// Sends every step whose inputs are ready; skips those with no rows (lock held).
void launch_ready(const std::shared_ptr<Request>& request, AfterUnlock& after) {
  Request& q = *request;
  const Graph::Core& core = *q.core;
  const int step_count = static_cast<int>(core.options.steps.size());
  for (bool progress = true; progress && !q.answered;) {
    progress = false;
    for (int s = 0; s < step_count && !q.answered; ++s) {
      if (q.step_state[s] != 0 || q.unmet[s] != 0) continue;
      progress = true;
      const GraphStep& spec = core.options.steps[s];
      // The step's rows: those all its inputs have, where its predicate holds.
      std::vector<uint8_t> mask;
      for (int slot : spec.input_slots) {
        const std::vector<uint8_t>* have = present_of(q, slot);
        if (have == nullptr) continue;
        if (mask.empty()) mask = *have; else for (size_t r = 0; r < mask.size(); ++r) mask[r] &= (*have)[r];
      }
      if (!spec.when.empty()) {
        std::vector<const Tensor*> values(q.values.size());
        std::vector<const std::vector<uint8_t>*> present(q.values.size());
        for (size_t slot = 0; slot < q.values.size(); ++slot) {
          values[slot] = &q.values[slot];
          present[slot] = present_of(q, static_cast<int>(slot));
        }
        std::vector<uint8_t> holds;
        try {
          holds = evaluate_predicate(spec.when, values, present, q.rows);
        } catch (const Error& e) {  // a tensor whose rows the predicate cannot read: not the caller's fault
          q.step_state[s] = 1;
          const std::vector<uint8_t> none(static_cast<size_t>(q.rows), 0);
          step_failed(q, s, ErrorCode::kModelExecution, std::string("its when: ") + e.what(), &none, 0, after);
          step_done(q, s, after);
          continue;
        }
        if (mask.empty()) mask = std::move(holds); else for (size_t r = 0; r < mask.size(); ++r) mask[r] &= holds[r];
      }
      const int64_t count = mask.empty() ? q.rows : std::count(mask.begin(), mask.end(), uint8_t{1});
      q.step_state[s] = 1;
      auto& counters = core.step_counters[s];
      if (count < q.rows) counters.skipped_rows.fetch_add(static_cast<uint64_t>(q.rows - count), std::memory_order_relaxed);
      if (count == 0) {
        for (size_t j = 0; j < spec.outputs.size(); ++j) set_no_rows(q, s, static_cast<int>(j));
        step_done(q, s, after);
        continue;
      }
      // By reference where the slot holds exactly the step's rows; else those rows gathered.
      std::vector<Tensor> inputs;
      inputs.reserve(spec.input_slots.size());
      try {
        for (int slot : spec.input_slots) {
          if (q.counts[slot] == count) {
            Tensor t = q.values[slot];
            if (core.slot_step[slot] < 0) t.owner.reset();  // the caller's: the request keeps it alive
            inputs.push_back(std::move(t));
          } else {
            inputs.push_back(gather_subset(q, slot, mask, count));
          }
        }
      } catch (const Error& e) {
        step_failed(q, s, e.code(), e.what(), mask.empty() ? nullptr : &mask, count, after);
        step_done(q, s, after);
        continue;
      }
      int64_t timeout_us = -1;
      if (!step_timeout(q, spec, &timeout_us)) {
        step_failed(q, s, ErrorCode::kDeadlineExceeded, "the graph request's deadline passed before the step started",
                    mask.empty() ? nullptr : &mask, count, after);
        step_done(q, s, after);
        continue;
      }
      // The step's rows are kept in the output slots' flags until it answers.
      for (size_t j = 0; j < spec.outputs.size(); ++j) {
        const int slot = core.first_slot[s] + static_cast<int>(j);
        q.present[slot] = mask;
        q.counts[slot] = count;
      }
      const WeakArms& arms = (*q.bindings)[s];
      size_t arm = 0;
      if (arms.batchers.size() > 1) {
        const uint64_t point =
            router::mix64(core.route_state.fetch_add(router::kSplitmixIncrement, std::memory_order_relaxed) +
                          router::kSplitmixIncrement) >> 1;
        while (arm + 1 < arms.bounds.size() && point >= arms.bounds[arm]) ++arm;
      }
      std::shared_ptr<Batcher> batcher = arms.batchers[arm].lock();
      q.step_batchers[s] = batcher;
      if (!batcher) {
        step_failed(q, s, ErrorCode::kUnavailable, "its model was unloaded while the request ran",
                    mask.empty() ? nullptr : &mask, count, after);
        step_done(q, s, after);
        continue;
      }
      after.batchers.push_back(batcher);
      counters.requests.fetch_add(1, std::memory_order_relaxed);
      counters.rows.fetch_add(static_cast<uint64_t>(count), std::memory_order_relaxed);
      q.step_sent[s] = Clock::now();
      try {
        q.step_ids[s] = batcher->submit(std::move(inputs), std::make_shared<StepSink>(request, s), q.priority, timeout_us);
        ++q.steps_running;
      } catch (const Error& e) {
        step_failed(q, s, e.code(), e.what(), mask.empty() ? nullptr : &mask, count, after);
        step_done(q, s, after);
      }
    }
  }
}

// Scatters (or passes through) each graph output; fails the request when a row has no source.
void answer_outputs(Request& q, AfterUnlock& after) {
  const Graph::Core& core = *q.core;
  const GraphOptions& o = core.options;
  auto outputs = std::make_shared<BatchOutputs>();
  outputs->rows = q.rows;
  outputs->tensors.reserve(o.outputs.size() + 1);
  try {
    for (size_t i = 0; i < o.outputs.size(); ++i) {
      const std::vector<int>& sources = o.output_sources[i];
      const int first = sources[0];
      if (q.counts[first] == q.rows) {  // the preferred source has every row: by reference
        outputs->tensors.push_back(q.values[first]);
        continue;
      }
      const Tensor* like = nullptr;
      for (int slot : sources) {
        if (q.counts[slot] > 0) {
          like = &q.values[slot];
          break;
        }
      }
      if (like == nullptr) {
        answer_error(q, ErrorCode::kModelExecution,
                     "graph '" + o.name + "': output '" + o.outputs[i].name + "': no step produced any of its " +
                         std::to_string(q.rows) + " rows (its sources ran for none of them)",
                     after);
        return;
      }
      Shape shape = like->shape;
      shape[0] = q.rows;
      Tensor out = make_pooled_tensor(core.pool, like->dtype, shape);
      const size_t row_bytes = like->row_nbytes();
      std::vector<int64_t> at(sources.size(), 0);
      auto* dst = static_cast<uint8_t*>(out.data);
      for (int64_t r = 0; r < q.rows; ++r) {
        bool placed = false;
        for (size_t k = 0; k < sources.size(); ++k) {
          const int slot = sources[k];
          const std::vector<uint8_t>* have = present_of(q, slot);
          if (have != nullptr && !(*have)[r]) continue;
          if (!placed) {
            const Tensor& from = q.values[slot];
            if (from.row_nbytes() != row_bytes || from.dtype != like->dtype) {
              answer_error(q, ErrorCode::kModelExecution,
                           "graph '" + o.name + "': output '" + o.outputs[i].name + "': its sources answered rows of " +
                               from.shape.to_string() + " and " + like->shape.to_string() + ", which cannot be merged",
                           after);
              return;
            }
            std::memcpy(dst + r * row_bytes, static_cast<const uint8_t*>(from.data) + at[k] * row_bytes, row_bytes);
            placed = true;
          }
          ++at[k];
        }
        if (!placed) {
          answer_error(q, ErrorCode::kModelExecution,
                       "graph '" + o.name + "': output '" + o.outputs[i].name + "': row " + std::to_string(r) +
                           " was produced by none of its sources (the steps writing them did not run for it): "
                           "list a source that runs for every row last",
                       after);
          return;
        }
      }
      outputs->tensors.push_back(std::move(out));
    }
    if (core.monitor) {
      Tensor flags = make_pooled_tensor(core.pool, DType::kUInt8, Shape{q.rows, 1});
      auto* bytes = static_cast<uint8_t*>(flags.data);
      try {
        core.monitor->observe(q.inputs, outputs->tensors, q.rows, monitor::wall_clock_ns(), bytes);
      } catch (const Error&) {  // a monitor that does not fit must not fail the request
        std::memset(bytes, 0, static_cast<size_t>(q.rows));
        core.monitor->count_failed_batch();
      }
      outputs->tensors.push_back(std::move(flags));
    }
  } catch (const Error& e) {
    answer_error(q, e.code(), "graph '" + o.name + "': assembling the outputs failed: " + e.what(), after);
    return;
  }
  q.answered = true;
  Completion c;
  c.request_id = q.id;
  c.outputs = std::move(outputs);
  c.row_offset = 0;
  c.rows = q.rows;
  c.request_inputs = std::move(q.inputs);  // every step has answered: nothing reads them any more
  after.sink = q.sink;
  after.answer.push_back(std::move(c));
  after.finish = true;
}

// A step is done (lock held): wake the steps waiting for it; answer when it was the last.
void step_done(Request& q, int step, AfterUnlock& after) {
  q.step_state[step] = 2;
  --q.steps_left;
  for (int later : q.core->dependents[step]) --q.unmet[later];
  if (q.steps_left == 0 && !q.answered) answer_outputs(q, after);
}

void finish(const std::shared_ptr<Graph::Core>& core, const Request& q, AfterUnlock& after);

void StepSink::deliver(std::vector<Completion>&& completions) {
  AfterUnlock after;
  Request& q = *request_;
  {
    std::lock_guard<std::mutex> lock(q.mu);
    const Graph::Core& core = *q.core;
    for (Completion& c : completions) {
      --q.steps_running;
      core.step_counters[step_].time.record(
          static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - q.step_sent[step_]).count()));
      if (!q.answered) {
        const GraphStep& spec = core.options.steps[step_];
        const int base = core.first_slot[step_];
        if (c.code == ErrorCode::kOk) {
          for (size_t j = 0; j < spec.outputs.size(); ++j) {
            const Tensor& batch = c.outputs->tensors[j];
            Tensor view = batch;
            if (c.rows >= 0) {
              view.data = static_cast<uint8_t*>(batch.data) + c.row_offset * static_cast<int64_t>(batch.row_nbytes());
              view.shape[0] = c.rows;
            }
            view.owner = std::shared_ptr<void>(c.outputs, batch.data);  // the step's batch stays alive through it
            q.values[base + static_cast<int>(j)] = std::move(view);
          }
        } else {
          const int slot = base;
          const int64_t count = q.counts[slot];
          const std::vector<uint8_t> mask = q.present[slot];
          step_failed(q, step_, c.code, c.message, mask.empty() ? nullptr : &mask, count, after);
        }
        step_done(q, step_, after);
        if (!q.answered) launch_ready(request_, after);
      }
      after.dropped.push_back(std::move(c));
    }
  }
  if (after.finish) finish(q.core, q, after);
}

// Delivers the answer and settles the graph's books (no request lock held).
void finish(const std::shared_ptr<Graph::Core>& core, const Request& q, AfterUnlock& after) {
  const int64_t elapsed = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - q.started).count();
  switch (after.code) {
    case ErrorCode::kOk:
      core->succeeded.fetch_add(1, std::memory_order_relaxed);
      core->rows.fetch_add(static_cast<uint64_t>(q.rows), std::memory_order_relaxed);
      core->size_counts[std::min<int64_t>(q.rows, core->options.max_batch_size)].fetch_add(1, std::memory_order_relaxed);
      core->total.record(static_cast<uint64_t>(elapsed));
      core->last_inference_ns.store(monitor::wall_clock_ns(), std::memory_order_relaxed);
      break;
    case ErrorCode::kCancelled: core->cancelled.fetch_add(1, std::memory_order_relaxed); break;
    case ErrorCode::kDeadlineExceeded: core->expired.fetch_add(1, std::memory_order_relaxed); break;
    default: core->failed.fetch_add(1, std::memory_order_relaxed); break;
  }
  try {
    after.sink->deliver(std::move(after.answer));
  } catch (...) {  // out of memory in the sink: the caller's completion is lost, as a batcher counts it
  }
  std::lock_guard<std::mutex> lock(core->mu);
  core->in_flight.erase(q.id);
  if (core->in_flight.empty()) core->idle_cv.notify_all();
}

}  // namespace

Graph::Graph(GraphOptions options, std::shared_ptr<MemoryPool> pool, std::shared_ptr<monitor::Monitor> monitor)
    : core_(std::make_shared<Core>()) {
  Core& c = *core_;
  c.options = std::move(options);
  c.pool = pool ? std::move(pool) : MemoryPool::default_host();
  c.monitor = std::move(monitor);
  const GraphOptions& o = c.options;
  const std::string where = "[graph] model '" + o.name + "': ";
  if (o.max_batch_size < 1) invalid(where + "max_batch_size must be >= 1 (a graph batches rows), got " + std::to_string(o.max_batch_size));
  if (o.max_in_flight < 1) invalid(where + "max_in_flight must be >= 1");
  if (o.inputs.empty()) invalid(where + "a graph needs at least one input");
  if (o.outputs.empty() || o.outputs.size() != o.output_sources.size()) {
    invalid(where + "every output needs its sources (" + std::to_string(o.outputs.size()) + " outputs, " +
            std::to_string(o.output_sources.size()) + " source lists)");
  }
  c.slot_specs = o.inputs;
  c.slot_step.assign(o.inputs.size(), -1);
  c.waits_for.resize(o.steps.size());
  c.dependents.resize(o.steps.size());
  for (size_t s = 0; s < o.steps.size(); ++s) {
    const GraphStep& step = o.steps[s];
    const std::string at = where + "step '" + step.name + "': ";
    const int readable = static_cast<int>(c.slot_specs.size());
    std::vector<int> reads = step.input_slots;
    for (const RowTest& t : step.when.tests) reads.push_back(t.slot);
    for (int slot : step.input_slots) {
      if (slot < 0 || slot >= readable) invalid(at + "reads slot " + std::to_string(slot) + ", which is not written before the step");
    }
    check_row_predicate(step.when, at, c.slot_specs, readable);
    for (int slot : reads) {
      const int writer = c.slot_step[slot];
      if (writer >= 0 && std::find(c.waits_for[s].begin(), c.waits_for[s].end(), writer) == c.waits_for[s].end()) {
        c.waits_for[s].push_back(writer);
        c.dependents[writer].push_back(static_cast<int>(s));
      }
    }
    if (step.outputs.empty()) invalid(at + "has no outputs");
    if (step.defaults.size() != step.outputs.size()) invalid(at + "needs one default (or NaN) per output");
    c.first_slot.push_back(static_cast<int>(c.slot_specs.size()));
    for (size_t j = 0; j < step.outputs.size(); ++j) {
      const TensorSpec& out = step.outputs[j];
      if (!std::isnan(step.defaults[j])) {
        if (!step.optional) invalid(at + "output '" + out.name + "' has a default, but only an optional step's outputs can");
        if (!numeric(out.dtype)) invalid(at + "output '" + out.name + "' is " + dtype_name(out.dtype) + ": a default fills numbers only");
        for (int64_t d : out.dims) {
          if (d < 0) invalid(at + "output '" + out.name + "' has dims " + dims_text(out.dims) + ": a default needs every dimension fixed");
        }
      }
      c.slot_specs.push_back({step.name + "." + out.name, out.dtype, out.dims});
      c.slot_step.push_back(static_cast<int>(s));
    }
  }
  for (size_t i = 0; i < o.outputs.size(); ++i) {
    if (o.output_sources[i].empty()) invalid(where + "output '" + o.outputs[i].name + "' has no source");
    for (int slot : o.output_sources[i]) {
      if (slot < 0 || slot >= static_cast<int>(c.slot_specs.size())) {
        invalid(where + "output '" + o.outputs[i].name + "' reads slot " + std::to_string(slot) + ", which no step writes");
      }
      if (c.slot_specs[slot].dtype != o.outputs[i].dtype) {
        invalid(where + "output '" + o.outputs[i].name + "' is " + dtype_name(o.outputs[i].dtype) + " but its source '" +
                c.slot_specs[slot].name + "' is " + dtype_name(c.slot_specs[slot].dtype));
      }
    }
  }
  c.bindings = std::make_shared<Bindings>(o.steps.size());
  c.weak_bindings = std::make_shared<WeakBindings>(o.steps.size());
  c.route_state.store(static_cast<uint64_t>(Clock::now().time_since_epoch().count()), std::memory_order_relaxed);
  c.unbound_reasons.assign(o.steps.size(), "not bound yet");
  c.size_counts.reset(new std::atomic<uint64_t>[static_cast<size_t>(o.max_batch_size) + 1]());
  c.step_counters.reset(new Core::StepCounters[o.steps.size()]);
}

Graph::~Graph() {
  stop(true);
  // Requests still waiting for a step after their answer (a failed request's other steps)
  // hold the core, never the batchers: those go with the graph, here.
  std::shared_ptr<const Bindings> released;
  std::lock_guard<std::mutex> lock(core_->mu);
  released = std::move(core_->bindings);
}

const GraphOptions& Graph::options() const noexcept { return core_->options; }

void Graph::bind(int step, std::shared_ptr<Batcher> batcher, const std::string& reason) {
  if (!batcher) {
    bind_arms(step, {}, {});
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!reason.empty()) core_->unbound_reasons[step] = reason;
    return;
  }
  bind_arms(step, {std::move(batcher)}, {router::kPointLimit});
}

void Graph::bind_arms(int step, std::vector<std::shared_ptr<Batcher>> batchers, std::vector<uint64_t> bounds) {
  Core& c = *core_;
  if (step < 0 || step >= static_cast<int>(c.options.steps.size())) {
    invalid(c.where() + "there is no step " + std::to_string(step));
  }
  const GraphStep& spec = c.options.steps[step];
  const std::string at = c.where() + "step '" + spec.name + "': ";
  if (batchers.size() != bounds.size()) {
    invalid(at + std::to_string(batchers.size()) + " arms with " + std::to_string(bounds.size()) + " bounds");
  }
  for (size_t i = 0; i < bounds.size(); ++i) {
    if ((i > 0 && bounds[i] < bounds[i - 1]) || (i + 1 == bounds.size() && bounds[i] != router::kPointLimit)) {
      invalid(at + "arm bounds must ascend and end at 2^63");
    }
  }
  for (const auto& batcher : batchers) {
    if (!batcher) invalid(at + "an arm has no batcher");
    const BatcherOptions& b = batcher->options();
    if (b.inputs.size() != spec.input_slots.size() || b.outputs.size() < spec.outputs.size()) {
      invalid(at + "model '" + b.model_name + "' has " + std::to_string(b.inputs.size()) + " inputs and " +
              std::to_string(b.outputs.size()) + " outputs; the plan expects " + std::to_string(spec.input_slots.size()) +
              " and " + std::to_string(spec.outputs.size()));
    }
  }
  std::shared_ptr<const Bindings> old;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto next = std::make_shared<Bindings>(*c.bindings);
    (*next)[step] = StepArms{std::move(batchers), std::move(bounds)};
    auto weak = std::make_shared<WeakBindings>();
    for (const StepArms& arms : *next) weak->push_back(WeakArms{{arms.batchers.begin(), arms.batchers.end()}, arms.bounds});
    c.unbound_reasons[step] = (*next)[step].batchers.empty() ? "its model is not loaded" : "";
    c.weak_bindings = std::move(weak);
    old = std::move(c.bindings);
    c.bindings = std::move(next);
  }
}

bool Graph::ready(std::string* reason) const {
  Core& c = *core_;
  std::lock_guard<std::mutex> lock(c.mu);
  for (size_t s = 0; s < c.options.steps.size(); ++s) {
    if ((*c.bindings)[s].batchers.empty()) {
      if (reason != nullptr) *reason = "step '" + c.options.steps[s].name + "' (model '" + c.options.steps[s].model + "'): " + c.unbound_reasons[s];
      return false;
    }
  }
  return true;
}

uint64_t Graph::submit(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority,
                       int64_t timeout_us, uint64_t mirror_tag) {
  const std::shared_ptr<Core>& core = core_;
  const GraphOptions& o = core->options;
  auto refuse = [&](ErrorCode code, const std::string& message) {  // the prefix is built only for an error
    core->rejected.fetch_add(1, std::memory_order_relaxed);
    throw Error(code, core->where() + message);
  };
  if (!sink) refuse(ErrorCode::kInvalidInput, "submit needs a completion sink");
  if (mirror_tag != 0) refuse(ErrorCode::kInvalidInput, "a graph's requests cannot be copied to a shadow");
  if (inputs.size() != o.inputs.size()) {
    refuse(ErrorCode::kInvalidInput, "expected " + std::to_string(o.inputs.size()) + " inputs, got " + std::to_string(inputs.size()));
  }
  int64_t rows = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    const TensorSpec& spec = o.inputs[i];
    if (t.dtype != spec.dtype) {
      refuse(ErrorCode::kInvalidInput, "input '" + spec.name + "' expected datatype " + dtype_name(spec.dtype) + ", got " + dtype_name(t.dtype));
    }
    bool ok = t.shape.ndim() == static_cast<int>(spec.dims.size()) + 1;
    for (size_t d = 0; ok && d < spec.dims.size(); ++d) {
      const int64_t got = t.shape[static_cast<int>(d) + 1];
      ok = got >= 0 && (spec.dims[d] < 0 || spec.dims[d] == got);
    }
    if (!ok) {
      refuse(ErrorCode::kInvalidInput, "input '" + spec.name + "' expected shape " + dims_text(spec.dims) +
                                           " (batch dimension first), got " + t.shape.to_string());
    }
    if (i == 0) rows = t.shape[0];
    if (t.shape[0] != rows) {
      refuse(ErrorCode::kInvalidInput, "inputs disagree on the batch dimension: '" + o.inputs[0].name + "' has " +
                                           std::to_string(rows) + " rows, '" + spec.name + "' has " + std::to_string(t.shape[0]));
    }
  }
  if (rows < 1 || rows > o.max_batch_size) {
    refuse(ErrorCode::kInvalidInput, "batch of " + std::to_string(rows) + " rows is outside [1, max_batch_size=" +
                                         std::to_string(o.max_batch_size) + "]");
  }
  if (timeout_us < 0) timeout_us = o.default_timeout_us;

  auto request = std::make_shared<Request>();
  Request& q = *request;
  q.core = core;
  q.sink = std::move(sink);
  q.priority = priority;
  q.started = Clock::now();
  if (timeout_us > 0) q.deadline = q.started + std::chrono::microseconds(timeout_us);
  q.rows = rows;
  q.id = kGraphIdBit | next_graph_request_id.fetch_add(1, std::memory_order_relaxed);
  const size_t slots = core->slot_specs.size();
  const size_t steps = o.steps.size();
  q.values.resize(slots);
  q.present.resize(slots);
  q.counts.assign(slots, 0);
  for (size_t i = 0; i < inputs.size(); ++i) {
    q.values[i] = inputs[i];
    q.counts[i] = rows;
  }
  q.inputs = std::move(inputs);
  q.step_state.assign(steps, 0);
  q.unmet.resize(steps);
  for (size_t s = 0; s < steps; ++s) q.unmet[s] = static_cast<int>(core->waits_for[s].size());
  q.step_ids.assign(steps, 0);
  q.step_batchers.resize(steps);
  q.step_sent.resize(steps);
  q.steps_left = static_cast<int>(steps);
  {
    std::lock_guard<std::mutex> lock(core->mu);
    if (!core->accepting) refuse(ErrorCode::kUnavailable, "the graph is stopping");
    for (size_t s = 0; s < steps; ++s) {
      if ((*core->bindings)[s].batchers.empty()) {
        core->rejected.fetch_add(1, std::memory_order_relaxed);
        throw Error(ErrorCode::kUnavailable, "[graph] model '" + o.name + "' is not ready: step '" + o.steps[s].name + "' (model '" + o.steps[s].model +
                                            "'): " + core->unbound_reasons[s]);
      }
    }
    if (core->in_flight.size() >= o.max_in_flight) {
      refuse(ErrorCode::kQueueFull, "the graph has " + std::to_string(core->in_flight.size()) +
                                        " requests in flight, its max_queue_size: retry later, or raise it");
    }
    q.bindings = core->weak_bindings;
    core->in_flight.emplace(q.id, request);
  }
  core->requests.fetch_add(1, std::memory_order_relaxed);
  const uint64_t id = q.id;
  AfterUnlock after;
  {
    std::lock_guard<std::mutex> lock(q.mu);
    launch_ready(request, after);
  }
  if (after.finish) finish(core, q, after);
  return id;
}

Completion Graph::infer(std::vector<Tensor> inputs, int priority, int64_t timeout_us) {
  auto waiter = std::make_shared<CompletionWaiter>();
  submit(std::move(inputs), waiter, priority, timeout_us);
  return waiter->wait();
}

bool Graph::cancel(uint64_t request_id) {
  std::shared_ptr<Request> request;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    auto it = core_->in_flight.find(request_id);
    if (it != core_->in_flight.end()) request = it->second.lock();
  }
  if (!request) return false;
  AfterUnlock after;
  std::vector<std::pair<std::shared_ptr<Batcher>, uint64_t>> queued;
  {
    std::lock_guard<std::mutex> lock(request->mu);
    if (request->answered) return false;
    answer_error(*request, ErrorCode::kCancelled, core_->where() + "the request was cancelled", after);
    for (size_t s = 0; s < request->step_state.size(); ++s) {
      if (request->step_state[s] != 1 || request->step_ids[s] == 0) continue;
      if (auto batcher = request->step_batchers[s].lock()) queued.emplace_back(std::move(batcher), request->step_ids[s]);
    }
  }
  finish(core_, *request, after);
  for (auto& [batcher, id] : queued) batcher->cancel(id);
  return true;
}

void Graph::stop(bool drain) {
  Core& c = *core_;
  std::vector<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.accepting = false;
    if (!drain) for (const auto& entry : c.in_flight) ids.push_back(entry.first);
  }
  for (uint64_t id : ids) cancel(id);
  std::unique_lock<std::mutex> lock(c.mu);
  c.idle_cv.wait(lock, [&] { return c.in_flight.empty(); });
}

BatcherStats Graph::stats() const {
  const Core& c = *core_;
  BatcherStats s;
  s.requests = c.requests.load(std::memory_order_relaxed);
  s.succeeded = c.succeeded.load(std::memory_order_relaxed);
  s.failed = c.failed.load(std::memory_order_relaxed);
  s.rejected = c.rejected.load(std::memory_order_relaxed);
  s.expired = c.expired.load(std::memory_order_relaxed);
  s.cancelled = c.cancelled.load(std::memory_order_relaxed);
  s.batches = s.succeeded;
  s.batched_rows = c.rows.load(std::memory_order_relaxed);
  s.last_inference_ns = c.last_inference_ns.load(std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    s.in_flight = c.in_flight.size();
  }
  const size_t sizes = static_cast<size_t>(c.options.max_batch_size) + 1;
  s.batch_size_counts.resize(sizes);
  for (size_t i = 0; i < sizes; ++i) s.batch_size_counts[i] = c.size_counts[i].load(std::memory_order_relaxed);
  s.batch_input_ns.assign(sizes, 0);
  s.batch_infer_ns.assign(sizes, 0);
  s.batch_output_ns.assign(sizes, 0);
  // A graph does not queue: a request's whole time is its compute, spent in its steps.
  s.total = c.total.snapshot();
  s.compute_infer = s.total;
  // Its queue and the batch phases around compute take no time of their own, for every
  // request (clients such as perf_analyzer divide each phase by its count).
  DurationHistogram none;
  none.record(0, s.total.count);
  s.queue = s.compute_input = s.compute_output = none.snapshot();
  return s;
}

std::vector<GraphStepStats> Graph::step_stats() const {
  const Core& c = *core_;
  std::vector<GraphStepStats> out(c.options.steps.size());
  for (size_t s = 0; s < out.size(); ++s) {
    const auto& k = c.step_counters[s];
    out[s].requests = k.requests.load(std::memory_order_relaxed);
    out[s].rows = k.rows.load(std::memory_order_relaxed);
    out[s].skipped_rows = k.skipped_rows.load(std::memory_order_relaxed);
    out[s].failed = k.failed.load(std::memory_order_relaxed);
    out[s].defaulted = k.defaulted.load(std::memory_order_relaxed);
    out[s].time = k.time.snapshot();
  }
  return out;
}

}  // namespace conveyor
