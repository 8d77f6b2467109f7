"""The live monitor's costs, against baselines measured in the same run.

    PYTHONPATH=python python -m pytest bench/bench_monitor.py --benchmark-enable

- overhead per request: 50 numeric features of batch-1 requests through a Batcher whose
  executor is C++ (a NativeGraph passing the input through), with monitor= against the
  same Batcher without it. The round trips' ratio is printed at the end; the time
  monitoring adds to one request is printed in microseconds from the batcher's own
  executor-phase timings (the monitor runs inside that phase), which thread wake-ups
  (most of a batch-1 round trip, and most of its noise) do not blur.
- evaluation: the drift check of 50 features (PSI, JS, binned KS with p-values,
  Wasserstein, BH correction, verdict) over a 1,000-row window against a 10,000-row
  reference, against the same check done the usual way: scipy.stats.ks_2samp per
  feature over the raw reference and window rows.
Ratios are printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from conveyor import _core
from conveyor.monitor.reference import build_reference

FEATURES = 50
REQUESTS_PER_ROUND = 500
REFERENCE_ROWS = 10_000
WINDOW_ROWS = 1000

_features = [{"name": f"x[{i}]", "column": i} for i in range(FEATURES)]
_executor_us: dict[str, float] = {}  # executor phase per batch-1 request, with and without the monitor


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    reference_rows = rng.standard_normal((REFERENCE_ROWS, FEATURES))
    window_rows = rng.standard_normal((WINDOW_ROWS, FEATURES))
    window_rows[:, 3] += 0.3
    return reference_rows, window_rows, build_reference(reference_rows, ["numeric"] * FEATURES)


def _batcher(monitor: _core.Monitor | None) -> _core.Batcher:
    graph = _core.NativeGraph(input_count=1)
    graph.finalize([0])  # the input is the output: the executor costs next to nothing
    outputs = [("y", "FP32", [FEATURES])]
    if monitor is not None:
        outputs.append(("__monitor_flags", "UINT8", [1]))
    return _core.Batcher(
        model_name="passthrough", inputs=[("x", "FP32", [FEATURES])], outputs=outputs, executor=graph,
        max_batch_size=64, monitor=monitor,
    )  # fmt: skip


def _run_requests(batcher: _core.Batcher, requests: list[tuple[np.ndarray]]) -> None:
    for request in requests:
        batcher.infer(request)


@pytest.fixture(scope="module")
def batchers(data):
    """Both batchers live through both overhead tests, so each test sees the same threads and machine state."""
    monitor = _core.Monitor(features=_features)
    monitor.set_reference(data[2])
    made = {True: _batcher(monitor), False: _batcher(None)}
    yield made, monitor
    for batcher in made.values():
        batcher.stop()


@pytest.mark.parametrize("monitored", [True, False], ids=["with monitor", "without monitor"])
def test_overhead_per_request(benchmark, ratio_report, data, batchers, monitored):
    made, monitor = batchers
    batcher = made[monitored]
    rows = data[1].astype(np.float32)
    requests = [(rows[i % WINDOW_ROWS : i % WINDOW_ROWS + 1],) for i in range(REQUESTS_PER_ROUND)]
    before = batcher.stats()
    benchmark.group = "overhead: batch-1 requests, 50 features"
    benchmark.pedantic(_run_requests, args=(batcher, requests), rounds=20, warmup_rounds=2)
    after = batcher.stats()
    # The executor phase of batch-1 batches (the monitor runs inside it): the time a request
    # spends on the instance thread, free of the thread wake-ups that dominate (and make
    # noisy) the round trip.
    batches = after["batch_size_counts"][1] - before["batch_size_counts"][1]
    executor_us = (after["batch_infer_ns"][1] - before["batch_infer_ns"][1]) / batches / 1000
    name = "overhead: batch-1 requests, 50 features"
    if monitored:
        assert monitor.rows_observed > 0 and monitor.failed_batches == 0
        ratio_report.candidate(name, benchmark, label="Batcher(monitor=)")
    else:
        ratio_report.baseline(name, benchmark, label="Batcher without monitor")
    _executor_us["with" if monitored else "without"] = executor_us
    benchmark.extra_info["executor_phase_us_per_request"] = executor_us
    print(f"\nexecutor phase of a batch-1 request {'with' if monitored else 'without'} monitor: {executor_us:.2f} us")
    if len(_executor_us) == 2:
        added = _executor_us["with"] - _executor_us["without"]
        print(f"monitoring 50 features adds {added:.2f} us to each batch-1 request (executor phase, mean)")


def test_evaluation_conveyor(benchmark, ratio_report, data):
    _, window_rows, reference = data
    monitor = _core.Monitor(features=_features, window_rows=WINDOW_ROWS)
    monitor.set_reference(reference)
    monitor.observe([window_rows])
    state = monitor.window("rows")
    benchmark.group = "drift check: 50 features, 1k-row window vs 10k reference"
    report = benchmark(_core.evaluate_drift, reference, state)
    assert report.alerting == [3]
    ratio_report.candidate("drift check, 50 features", benchmark, label="evaluate_drift (binned)")


def test_evaluation_scipy_ks_2samp(benchmark, ratio_report, data):
    reference_rows, window_rows, _ = data

    def ks_per_feature():
        return [stats.ks_2samp(reference_rows[:, i], window_rows[:, i]).pvalue for i in range(FEATURES)]

    benchmark.group = "drift check: 50 features, 1k-row window vs 10k reference"
    p_values = benchmark(ks_per_feature)
    assert np.argmin(p_values) == 3
    ratio_report.baseline("drift check, 50 features", benchmark, label="scipy ks_2samp per feature (raw rows)")
