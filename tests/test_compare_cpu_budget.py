"""Comparing machines on one box, honestly: `conveyor bench` under one core and under two, then `compare`.

Two bundles of the same CPU-bound model (a native MLP, one request per batch, two
instances, one kernel thread each) are measured with --find-peak in child processes
whose CPU affinity is one core and two cores (os.sched_setaffinity, as taskset does).
With two cores the two instances run side by side, so capacity at the objective roughly
doubles; `compare` must rank the two-core bundle better, with a 95% interval of the
capacity ratio above 1, and the p99 at the common load no worse.

A CPU budget is only what the box gives: on a machine busy with other work, two cores of
affinity are not two cores of time. So the test first measures what two cores of affinity
actually deliver to a child process, before and after the benches, and skips (saying how
much it got) when that is under 1.6 cores; it never passes on a measurement it cannot trust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import conveyor
from conveyor.profile.bundle import read_bundle
from conveyor.profile.compare import compare_bundles

pytestmark = pytest.mark.slow

ROWS, WIDTH, LAYERS = 128, 256, 12  # about 100 M multiply-adds per request: milliseconds of one core
# The directory holding the conveyor package these tests import: the installed one in CI,
# the source tree with an in-tree build (PYTHONPATH=python) in development.
PYTHON_PATH = str(Path(conveyor.__file__).resolve().parents[1])
MIN_CORES_DELIVERED = 1.6
BENCH_ARGS = ["--scenario", "server", "--find-peak", "--slo-p99-ms", "100", "--target-qps", "40", "--duration-s",
              "0.3", "--min-queries", "80", "--warmup-s", "0.5", "--repetitions", "4", "--peak-precision", "0.1",
              "--samples", "8"]  # fmt: skip


def _usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _heavy_mlp() -> bytes:
    """An MLP over [batch, ROWS, WIDTH]: LAYERS MatMuls with Tanh between them (seeded weights)."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        last = i == LAYERS - 1
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], ["y" if last else f"m{i}"]))
        if not last:
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]))
            previous = f"h{i}"
    shape = ["batch", ROWS, WIDTH]
    graph = helper.make_graph(nodes, "heavy_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=weights)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(deterministic=True)


def _repository(root: Path) -> Path:
    version = root / "heavy" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(_heavy_mlp())
    (root / "heavy" / "config.toml").write_text(textwrap.dedent(f"""\
        backend = "native"
        max_batch_size = 1
        [[inputs]]
        name = "x"
        datatype = "FP32"
        dims = [{ROWS}, {WIDTH}]
        [[outputs]]
        name = "y"
        datatype = "FP32"
        dims = [{ROWS}, {WIDTH}]
        [instance_group]
        count = 2
        [native]
        threads = 1
    """))
    return root


def _child(cpus: list[int], code: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter restricted to `cpus` before anything starts a thread."""
    prologue = f"import os, sys\nos.sched_setaffinity(0, {set(cpus)!r})\n"
    environment = {**os.environ, "PYTHONPATH": PYTHON_PATH, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout_s, env=environment, check=False)  # fmt: skip


def _cores_delivered(cpus: list[int]) -> float:
    """CPU seconds per wall second two busy threads get under affinity `cpus` (2.0 on an idle two-core box)."""
    completed = _child(cpus, """
        import threading, time
        import numpy as np
        a = np.random.default_rng(0).standard_normal((192, 192))
        def spin(until):
            while time.perf_counter() < until:
                a @ a  # numpy releases the GIL here
        until = time.perf_counter() + 0.6
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=spin, args=(until,)) for _ in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        print((time.process_time() - start_cpu) / (time.perf_counter() - start_wall))
    """, 60)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return float(completed.stdout.strip())


def _bench(cpus: list[int], repository: Path, out: Path) -> Path:
    arguments = ["heavy", "--repository", str(repository), *BENCH_ARGS, "--out", str(out)]
    completed = _child(cpus, f"""
        from conveyor.profile.bench_cli import main
        sys.exit(main({arguments!r}))
    """, 300)
    assert completed.returncode == 0, f"bench on cpus {cpus} exited {completed.returncode}: {completed.stderr[-3000:]}"
    return out


def _skip_when_busy(cpus: list[int], when: str, measured: str = "") -> None:
    delivered = _cores_delivered(cpus)
    if delivered < MIN_CORES_DELIVERED:
        pytest.skip(f"{when}, two cores of affinity delivered {delivered:.2f} cores of CPU time (under "
                    f"{MIN_CORES_DELIVERED}): the box is busy with other work, so a one-core against two-core "
                    f"comparison would measure that work, not the budget{measured}")


@pytest.mark.skipif(len(_usable_cpus()) < 2, reason="needs two CPUs this process may run on")
def test_two_cores_rank_above_one_core_with_the_difference_and_its_interval(tmp_path: Path) -> None:
    cpus = _usable_cpus()[:2]
    _skip_when_busy(cpus, "before the benches")
    repository = _repository(tmp_path / "models")
    one = _bench(cpus[:1], repository, tmp_path / "one-core")
    two = _bench(cpus, repository, tmp_path / "two-cores")
    bundles = [(str(one), read_bundle(one)), (str(two), read_bundle(two))]
    result = compare_bundles(bundles)
    capacity = result.comparisons[0].primary
    report = json.dumps({"capacity": [v.measured.per_repetition for v in result.views],
                         "ratio": [capacity.estimate.value, capacity.estimate.low, capacity.estimate.high]})  # fmt: skip
    _skip_when_busy(cpus, "after the benches", f" (measured: {report})")
    assert [len(b.document["machine"]["affinity_cpus"]) for _, b in bundles] == [1, 2]  # the budgets are recorded
    assert capacity.metric == "capacity_qps" and capacity.verdict == "better", report
    assert capacity.estimate.low > 1.0, report
    assert result.comparisons[0].p99.verdict in ("better", "indistinguishable"), report
    differing = {row.name for row in result.fingerprint if row.differs}
    assert "CPUs the process may use (affinity)" in differing
