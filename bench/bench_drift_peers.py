"""The drift check of 50 features against Alibi Detect and Evidently, same data, same run.

    CONVEYOR_DRIFT_PEERS_PYTHON=/path/to/side-venv/bin/python \
        PYTHONPATH=python python -m pytest bench/bench_drift_peers.py --benchmark-enable

The peers live in a side virtual environment (`python -m venv side && side/bin/pip install
evidently alibi-detect`): bench/drift_peers_worker.py runs there, loads the data once and
runs a check per request on its stdin, so a timed round is the check plus a pipe round
trip (microseconds). Without CONVEYOR_DRIFT_PEERS_PYTHON the peer benchmarks skip.

Conveyor's side: `evaluate_drift` over the window state its monitor kept while observing
the rows (PSI, JS, binned KS with p-values, Wasserstein, BH correction, verdict). The
peers recompute from the raw rows: Alibi Detect's KSDrift (per-feature KS, FDR
correction), Evidently's DataDriftPreset report (its default test per column).
Reference 10,000 rows x 50 features, window 1,000 rows, one feature shifted by 0.3 sd.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conveyor import _core
from conveyor.monitor.reference import build_reference

FEATURES = 50
REFERENCE_ROWS = 10_000
WINDOW_ROWS = 1000
SHIFTED = 3
PEERS_PYTHON = os.environ.get("CONVEYOR_DRIFT_PEERS_PYTHON")
WORKER = Path(__file__).with_name("drift_peers_worker.py")
GROUP = "drift check: 50 features, 1k-row window vs 10k reference"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((REFERENCE_ROWS, FEATURES))
    window = rng.standard_normal((WINDOW_ROWS, FEATURES))
    window[:, SHIFTED] += 0.3
    return reference, window


class Worker:
    def __init__(self, python: str, reference: Path, window: Path) -> None:
        self.process = subprocess.Popen(
            [python, str(WORKER), str(reference), str(window)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the drift peers worker did not start (said {line!r}); is {python} the side venv?")

    def run(self, check: str) -> int:
        self.process.stdin.write(check + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().split()
        assert answer and answer[0] == "done", answer
        return int(answer[1])

    def close(self) -> None:
        self.process.stdin.close()  # the worker's loop ends on end of input
        self.process.wait(timeout=60)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def worker(data: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    if not PEERS_PYTHON:
        pytest.skip("set CONVEYOR_DRIFT_PEERS_PYTHON to a side venv's python with evidently and alibi-detect")
    directory = tmp_path_factory.mktemp("drift-peers")
    np.save(directory / "reference.npy", data[0])
    np.save(directory / "window.npy", data[1])
    started = Worker(PEERS_PYTHON, directory / "reference.npy", directory / "window.npy")
    try:
        yield started
    finally:
        started.close()


def test_conveyor_evaluate_drift(benchmark, ratio_report, data):
    reference_rows, window_rows = data
    reference = build_reference(reference_rows, ["numeric"] * FEATURES)
    monitor = _core.Monitor(features=[{"name": f"x[{i}]", "column": i} for i in range(FEATURES)], window_rows=WINDOW_ROWS)
    monitor.set_reference(reference.core)
    monitor.observe([window_rows])
    state = monitor.window("rows")
    benchmark.group = GROUP
    report = benchmark(_core.evaluate_drift, reference.core, state)
    assert report.alerting == [SHIFTED]
    ratio_report.candidate("vs Alibi Detect KSDrift", benchmark, label="evaluate_drift (kept counters)")
    ratio_report.candidate("vs Evidently DataDriftPreset", benchmark, label="evaluate_drift (kept counters)")


def test_alibi_detect_ks_drift(benchmark, ratio_report, worker):
    benchmark.group = GROUP
    drifting = benchmark.pedantic(worker.run, args=("alibi",), rounds=10, iterations=1, warmup_rounds=1)
    assert drifting >= 1
    ratio_report.baseline("vs Alibi Detect KSDrift", benchmark, label="Alibi Detect KSDrift.predict (raw rows)")


def test_evidently_data_drift_report(benchmark, ratio_report, worker):
    benchmark.group = GROUP
    drifting = benchmark.pedantic(worker.run, args=("evidently",), rounds=3, iterations=1, warmup_rounds=0)
    assert drifting >= 1
    ratio_report.baseline("vs Evidently DataDriftPreset", benchmark, label="Evidently Report.run (raw rows)")
