// Conversions the batcher's bindings share with the graph's (which answers in the
// batcher's shapes: completions, statistics). Glue only.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/completion.h"
#include "conveyor/stats.h"

namespace conveyor::bindings {

namespace py = pybind11;

// [(name, datatype, dims), ...] -> specs.
std::vector<TensorSpec> tensor_specs(const py::iterable& specs);
// A batch's outputs as a tuple of numpy arrays.
py::tuple outputs_to_python(const BatchOutputs& outputs);
// count, sum_ns, p50/p90/p99_ns and the non-empty buckets.
py::dict histogram_to_python(const DurationHistogram::Snapshot& h);
// The dict Batcher.stats() returns.
py::dict stats_to_python(const BatcherStats& s);

}  // namespace conveyor::bindings
