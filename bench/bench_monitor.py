"""The live monitor's costs, against baselines measured in the same run.

    PYTHONPATH=python python -m pytest bench/bench_monitor.py --benchmark-enable

- overhead per request: 50 numeric features of batch-1 requests through a Batcher whose
  executor is C++ (a NativeGraph passing the input through), with monitor= against the
  same Batcher without it; the difference of the medians is the time monitoring adds
  to one request (printed in microseconds).
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
_medians: dict[str, float | None] = {}  # per-round medians of the overhead pair, in seconds


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


@pytest.mark.parametrize("monitored", [True, False], ids=["with monitor", "without monitor"])
def test_overhead_per_request(benchmark, ratio_report, data, monitored):
    _, window_rows, reference = data
    monitor = None
    if monitored:
        monitor = _core.Monitor(features=_features)
        monitor.set_reference(reference)
    rows = window_rows.astype(np.float32)
    requests = [(rows[i % WINDOW_ROWS : i % WINDOW_ROWS + 1],) for i in range(REQUESTS_PER_ROUND)]
    batcher = _batcher(monitor)
    try:
        benchmark.group = "overhead: batch-1 requests, 50 features"
        benchmark.pedantic(_run_requests, args=(batcher, requests), rounds=20, warmup_rounds=2)
    finally:
        batcher.stop()
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    name = "overhead: batch-1 requests, 50 features"
    if monitored:
        assert monitor.rows_observed > 0 and monitor.failed_batches == 0
        ratio_report.candidate(name, benchmark, label="Batcher(monitor=)")
        _medians["with"] = median
    else:
        ratio_report.baseline(name, benchmark, label="Batcher without monitor")
        _medians["without"] = median
    if _medians.get("with") and _medians.get("without"):
        added_us = (_medians["with"] - _medians["without"]) / REQUESTS_PER_ROUND * 1e6
        per_request_us = _medians["without"] / REQUESTS_PER_ROUND * 1e6
        benchmark.extra_info["monitor_added_us_per_request"] = added_us
        print(f"\nmonitoring 50 features adds {added_us:.2f} us to a {per_request_us:.1f} us batch-1 request")


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
