// A model graph: pipelines, ensembles and cascades served as one model.
//
// A graph request does not queue anywhere of its own. submit() validates it and hands
// its rows to the batchers of the steps that can start (those reading only the graph's
// inputs); each step's completion, delivered on that step's instance thread, records the
// step's outputs and submits the steps that were waiting for them. So a graph's rows
// join the other traffic of every model it uses (one set of batches per model), nothing
// waits on a thread of its own, and independent steps run at the same time. The last
// step to finish assembles the outputs and completes the caller's request: nothing of
// this takes the GIL or runs Python.
//
// Tensors. Every tensor of a request lives in a slot: the graph's inputs first, then
// each step's outputs. A step's outputs are views of the batch outputs of the step's
// model (its pooled block stays alive through the view), and a step reading a slot with
// exactly its own rows gets that tensor by reference: no copy between steps. Rows are
// copied only where a request's rows split: a step that runs on a subset of them gets
// those rows gathered, and a graph output drawn from several steps has its rows
// scattered back in the request's row order.
//
// Rows. A step runs on the rows where all its input slots have a value and its `when`
// predicate (if any) holds; a step with no rows is skipped. A predicate reads whole rows
// of earlier slots (one element, element k, max, min, argmax) and compares them; a row
// whose slot has no value does not satisfy a test. A graph output lists its sources by
// preference: each row comes from the first source that has it; a row none has fails the
// request with that said.
//
// Failures. A step that fails (its batcher refuses the rows, the model raises, its
// deadline passes) fails the request, naming the step and its model, with the step's
// error code. An optional step's failure instead fills its outputs that have a default
// with that value for the step's rows, and leaves its other outputs without rows.
//
// Lifetimes. The caller's input tensors are handed back in the request's Completion
// (request_inputs) as the batcher does. The graph holds its step batchers; a request in
// flight holds them only weakly (the bindings it started with: a step rebound serves the
// requests submitted after), so the last reference to a batcher is never dropped on a
// batcher thread by a request. A step batcher's owner stops it before dropping it (as the
// runtime does); a request then finds it stopped or gone and fails with kUnavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/completion.h"
#include "conveyor/memory_pool.h"
#include "conveyor/stats.h"
#include "conveyor/tensor.h"

namespace conveyor {

namespace monitor {
class Monitor;
}

enum class RowReduce : uint8_t { kValue, kElement, kMax, kMin, kArgmax };
enum class RowCompare : uint8_t { kLt, kLe, kGt, kGe, kEq, kNe, kIn, kNotIn };

// One comparison of a value made from each row of a slot.
struct RowTest {
  int slot = 0;
  RowReduce reduce = RowReduce::kValue;
  int64_t element = 0;         // kElement: the element of the (flattened) row
  RowCompare op = RowCompare::kLt;
  std::vector<double> values;  // one for a comparison; the set for kIn / kNotIn
};

// A boolean expression over tests, in reverse Polish order: a value >= 0 pushes test i,
// kAnd / kOr pop two and push one, kNot replaces the top.
struct RowPredicate {
  static constexpr int32_t kAnd = -1, kOr = -2, kNot = -3;
  std::vector<RowTest> tests;
  std::vector<int32_t> program;
  bool empty() const noexcept { return program.empty(); }
};

struct GraphStep {
  std::string name;               // the step's name in the graph (errors and statistics)
  std::string model;              // the model it runs (errors)
  std::vector<int> input_slots;   // per input of the step's batcher, in its order: the slot it reads
  std::vector<TensorSpec> outputs;  // the step batcher's outputs used (a monitor's flags after them are ignored)
  RowPredicate when;              // empty: every row that has its inputs
  bool optional = false;
  std::vector<double> defaults;   // per output: the fill value of a failed optional step; NaN: none
  int64_t timeout_us = 0;         // > 0: the step's request must start within this
};

struct GraphOptions {
  std::string name;
  std::vector<TensorSpec> inputs;                // slots 0 .. inputs.size() - 1
  std::vector<TensorSpec> outputs;
  std::vector<std::vector<int>> output_sources;  // per output: slots, by preference
  std::vector<GraphStep> steps;                  // in an order where a step reads only earlier slots
  int64_t max_batch_size = 1;
  size_t max_in_flight = 1024;                   // requests in flight; more are refused with kQueueFull
  int64_t default_timeout_us = 0;
};

struct GraphStepStats {
  uint64_t requests = 0;      // requests sent to the step's model
  uint64_t rows = 0;          // rows sent
  uint64_t skipped_rows = 0;  // rows of graph requests the step did not run on (its when, or absent inputs)
  uint64_t failed = 0;        // requests of the step that failed
  uint64_t defaulted = 0;     // failures of an optional step answered with its defaults
  DurationHistogram::Snapshot time;  // from sending the rows to the step's answer
};

class Graph {
 public:
  // Checks the plan (slots in range, read before written never, predicates well formed,
  // defaults only on optional steps with fixed dims); throws Error(kInvalidInput) naming
  // the step. Every step starts unbound.
  Graph(GraphOptions options, std::shared_ptr<MemoryPool> pool, std::shared_ptr<monitor::Monitor> monitor = nullptr);
  ~Graph();  // stop(true)
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Serve step `step` with `batcher` from the next request on; null unbinds it, and a
  // request then fails with kUnavailable quoting `reason`.
  void bind(int step, std::shared_ptr<Batcher> batcher, const std::string& reason = "");
  // Serve step `step` with several versions of its model (a rollout beneath the graph):
  // each of the step's requests goes to arm i for a random point (router.h's points) below
  // bounds[i] and at or above bounds[i - 1]. bounds ascend and the last is router::kPointLimit.
  void bind_arms(int step, std::vector<std::shared_ptr<Batcher>> batchers, std::vector<uint64_t> bounds);
  // Whether every step is bound; otherwise *reason says which is not and why.
  bool ready(std::string* reason = nullptr) const;

  // As Batcher::submit: inputs in the graph's input order, a batch dimension first.
  // priority is handed to every step; timeout_us: < 0 the graph's default, 0 none, > 0
  // a deadline that far from now, shared by the steps. mirror_tag: Batcher::submit's, and
  // must be 0 (a graph's requests are not copied to a shadow). Throws kInvalidInput,
  // kQueueFull, kUnavailable (stopped, or a step unbound).
  uint64_t submit(std::vector<Tensor> inputs, std::shared_ptr<CompletionSink> sink, int priority = 0,
                  int64_t timeout_us = -1, uint64_t mirror_tag = 0);
  Completion infer(std::vector<Tensor> inputs, int priority = 0, int64_t timeout_us = -1);
  // Completes a request in flight with kCancelled now, and cancels its queued step
  // requests; false when it has already completed.
  bool cancel(uint64_t request_id);
  // Stops accepting; drain: waits for the requests in flight (their steps must still
  // run them), else cancels them. Must not be called from a step's thread. Idempotent.
  void stop(bool drain = true);

  // The graph's own counters in the batcher's shape: a request is one batch of its rows.
  BatcherStats stats() const;
  std::vector<GraphStepStats> step_stats() const;
  const GraphOptions& options() const noexcept;

  // Internal (graph.cpp): the state requests share with the graph, and one request in flight.
  struct Core;
  struct Request;
  struct StepArms {
    std::vector<std::shared_ptr<Batcher>> batchers;  // empty: unbound
    std::vector<uint64_t> bounds;                    // one per batcher (router.h's points)
  };
  using Bindings = std::vector<StepArms>;

 private:
  std::shared_ptr<Core> core_;  // requests in flight hold it too: they may outlive the graph
};

// The slot values a predicate reads and the rows it holds for: evaluates `predicate`
// for every row of a request of `rows` rows. present[s] is null when slot s has every
// row; values[s] holds slot s's present rows in row order. Exposed for tests.
std::vector<uint8_t> evaluate_predicate(const RowPredicate& predicate, const std::vector<const Tensor*>& values,
                                        const std::vector<const std::vector<uint8_t>*>& present, int64_t rows);

}  // namespace conveyor
