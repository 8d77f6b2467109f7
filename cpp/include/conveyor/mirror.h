// A rollout's shadow copy, made batch by batch in the core.
//
// The champion's batcher runs a batch; the requests of it that the router tagged for
// the shadow (a nonzero mirror tag at submit) are handed to the Mirror attached to that
// batcher (Batcher::set_mirror). The Mirror submits them to the challenger's batcher as
// requests of their own (so its counters and latencies are per request, like the
// champion's), in one group under one lock, each a view of its rows of the batch's
// pooled input tensors (no copy: the challenger gathers them into its own batch), and
// pairs both versions' outputs row by row as the challenger answers. Nothing of this
// runs on the caller's thread, takes the GIL or makes the champion wait: the copies of
// a batch cost the champion one group submit.
//
// Bounded: at most `slots` mirrored rows are in flight; the copies of a batch that would
// exceed them, or that the challenger's full queue refuses, are dropped and counted,
// never retried; copies it cannot take (stopped, other shapes, more rows than its
// max_batch_size) are counted as failed. Paired rows wait for drain() in a buffer of at most
// `max_unread_rows` rows; past that they are counted as unrecorded.
//
// What is paired per row: the champion's latency (queued + computed, as its caller saw
// it up to delivery) and the challenger's (the same queue wait, then the copy's own time
// from its batch's start to its answer: the latency the row would have had had the
// challenger served it; the copy's wait in the challenger's queue, where copies are
// gathered and may run at idle priority, tells of the mirror, not of the version), the
// row's tag, and the compared output's values:
//   kFirstValue  the row's first value (an index output: argmax's, or the best of a top-k)
//   kArgmax      the argmax over the last axis of each group of the row (class scores)
//   kValues      every value of the row (scores, regression outputs)
//   kNone        nothing compared (latencies only)
// A row whose compared output has a different size on the two sides, or a dtype that
// cannot be read as numbers (BYTES, FP16, BF16), is paired without values and counted
// as incomparable.
//
// Lifetimes. Copies in flight hold the mirror's shared state, never the Mirror or a
// batcher, so the last reference to a batcher is never dropped on a batcher thread.
// BYTES inputs point at objects owned by the champion's requests: the copy keeps those
// requests' input tensors (`keep_alive`) until the challenger has answered.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "conveyor/completion.h"
#include "conveyor/tensor.h"

namespace conveyor {

class Batcher;
struct MirrorState;

enum class MirrorCompare : uint8_t { kNone, kFirstValue, kArgmax, kValues };

struct MirrorOptions {
  size_t slots = 1024;          // mirrored rows in flight at once
  int champion_output = -1;     // index among the champion batcher's outputs; -1: compare nothing
  int challenger_output = -1;   // index among the challenger batcher's outputs
  MirrorCompare compare = MirrorCompare::kNone;
  size_t max_unread_rows = 65536;  // paired rows kept until drain()
};

struct MirrorStats {
  uint64_t offered_rows = 0;       // tagged rows of champion batches that succeeded
  uint64_t sent_rows = 0;          // submitted to the challenger
  uint64_t dropped_rows = 0;       // no slot, or the challenger refused them at submit
  uint64_t failed_rows = 0;        // the challenger answered with an error
  uint64_t paired_rows = 0;        // answered by both
  uint64_t incomparable_rows = 0;  // paired, but their outputs could not be compared
  uint64_t unrecorded_rows = 0;    // paired while the unread buffer was full
  uint64_t in_flight_rows = 0;     // sent and not answered yet
};

// Paired rows since the last drain(), in the order the challenger answered them.
struct MirrorPairs {
  std::vector<uint64_t> tags;                // per row
  std::vector<int64_t> champion_ns;          // per row
  std::vector<int64_t> challenger_ns;        // per row
  std::vector<uint8_t> compared;             // per row: 1 when its values are below
  std::vector<double> champion_first;        // per compared row: its first compared value
  std::vector<double> challenger_first;      // (a class, or the first output value)
  std::vector<double> champion_values;       // every compared value of the compared rows
  std::vector<double> challenger_values;
};

// One request of a champion batch that is copied: where its rows are and how long it took.
struct MirroredRequest {
  int64_t row_offset = 0;  // first row in the batch (0 without batching)
  int64_t rows = 1;
  uint64_t tag = 0;
  int64_t queue_ns = 0;    // enqueued -> its batch started
  int64_t total_ns = 0;    // enqueued -> its batch's outputs were ready
};

class Mirror {
 public:
  // Throws Error(kInvalidInput) when slots or max_unread_rows is 0, or an output index
  // is out of the range of its batcher's outputs while compare is not kNone.
  Mirror(std::shared_ptr<Batcher> challenger, MirrorOptions options);
  ~Mirror();
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;

  // A batch's copies in two steps, so that the champion's requests are delivered between
  // them while the copies already count as in flight (wait_idle waits for them).
  // reserve: called by the champion's batcher (its instance thread) after a batch
  // succeeded, before its requests are delivered; counts the offered rows and takes their
  // slots. Returns the rows to send (0: none; dropped or failed rows are counted).
  // `outputs`: the champion's batch outputs; `requests`: the tagged ones, in batch order.
  uint64_t reserve(const std::shared_ptr<const BatchOutputs>& outputs,
                   const std::vector<MirroredRequest>& requests) noexcept;
  // submit: after the delivery, sends the `reserved` rows to the challenger. `inputs`:
  // the batch's gathered inputs; `rows`: its rows (0 without batching); `keep_alive`:
  // what must live until the copy is answered (BYTES request inputs).
  void submit(uint64_t reserved, const std::vector<Tensor>& inputs, int64_t rows,
              const std::shared_ptr<const BatchOutputs>& outputs, const std::vector<MirroredRequest>& requests,
              std::vector<Tensor> keep_alive) noexcept;
  // reserve then submit at once.
  void offer(const std::vector<Tensor>& inputs, int64_t rows, const std::shared_ptr<const BatchOutputs>& outputs,
             const std::vector<MirroredRequest>& requests, std::vector<Tensor> keep_alive) noexcept;

  // Takes the paired rows recorded so far, and releases what answered copies held
  // (outputs, BYTES owners) on the calling thread: call it where dropping a Python-owned
  // tensor is cheap (the bindings hold the GIL).
  MirrorPairs drain();
  // Waits until no copy is in flight; false when timeout_us passed first (< 0: forever).
  bool wait_idle(int64_t timeout_us) const;
  MirrorStats stats() const;
  const MirrorOptions& options() const noexcept { return options_; }
  const std::shared_ptr<Batcher>& challenger() const noexcept { return challenger_; }

 private:
  const std::shared_ptr<Batcher> challenger_;
  const MirrorOptions options_;
  const std::shared_ptr<MirrorState> state_;
};

}  // namespace conveyor
