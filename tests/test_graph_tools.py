"""Model graphs and the tools around a model: loading a graph with its steps, `conveyor bench`
on a graph (the native load generator submits to the graph itself), `conveyor profile`
refusing one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conveyor import Runtime
from conveyor.profile.bench_cli import main as bench_main
from conveyor.profile.bundle import read_bundle
from conveyor.profile.profile_cli import main as profile_main
from conveyor.repository import ModelRepository

STEP_CONFIG = """\
backend = "python"
max_batch_size = 16
[[inputs]]
name = "x"
datatype = "FP32"
dims = [2]
[[outputs]]
name = "y"
datatype = "FP32"
dims = [2]
"""

STEP_MODEL = """\
import numpy as np

class Model:
    def execute(self, inputs):
        return {{"y": (inputs["x"] {op}).astype(np.float32)}}
"""

CASCADE = """\
[graph]
inputs = ["x"]
[graph.outputs]
y = ["costly.y", "cheap.y"]
[[graph.step]]
name = "cheap"
model = "cheap"
inputs = { x = "x" }
[[graph.step]]
name = "costly"
model = "costly"
inputs = { x = "x" }
when = "cheap.y[0] >= 0.5"
"""


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """cheap (x / 10), costly (x * 100) and `cascade`: costly answers the rows where cheap's first value >= 0.5."""
    root = tmp_path / "models"
    for name, op in (("cheap", "/ 10"), ("costly", "* 100")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(STEP_CONFIG)
        (root / name / "1" / "model.py").write_text(STEP_MODEL.format(op=op))
    (root / "cascade").mkdir()
    (root / "cascade" / "config.toml").write_text(CASCADE)
    return root


def test_a_graph_named_alone_loads_with_its_steps_and_answers_row_by_row(repository: Path) -> None:
    assert ModelRepository(repository).with_graph_steps(["cascade"]) == ["cheap", "costly", "cascade"]
    assert ModelRepository(repository).with_graph_steps(["cascade", "cheap"]) == ["costly", "cheap", "cascade"]
    with Runtime.from_repository(repository, models=["cascade"]) as runtime:
        assert runtime.models() == {"cheap": [1], "costly": [1], "cascade": [1]}
        x = np.array([[1, 2], [9, 3], [2, 4]], np.float32)
        expected = np.where((x[:, :1] / 10) >= 0.5, x * 100, x / 10).astype(np.float32)
        np.testing.assert_array_equal(runtime.infer("cascade", {"x": x})["y"], expected)
        steps = runtime.model_stats("cascade")["steps"]
        assert [(s["step"], s["rows"], s["skipped_rows"]) for s in steps] == [("cheap", 3, 0), ("costly", 1, 2)]


def test_bench_runs_the_native_load_generator_against_a_graph(repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    code = bench_main([
        "cascade", "--repository", str(repository), "--duration-s", "0.05", "--warmup-s", "0.01",
        "--min-queries", "40", "--samples", "4", "--repetitions", "1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    bundle = read_bundle(out)
    assert bundle["target"]["model"] == "cascade" and bundle["target"]["model_sha256"] is None
    assert bundle.runs and all(run["errors"] == 0 and run["queries"] >= 40 for run in bundle.runs)


def test_profile_refuses_a_graph_and_names_the_step_models_to_profile(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = profile_main(["cascade", "--repository", str(repository), "--slo-p99-ms", "5"])
    assert code != 0
    error = capsys.readouterr().err
    assert "is a graph" in error and "profile its step models instead (cheap, costly)" in error


def test_a_monitored_graph_observes_and_captures_its_public_rows(repository: Path, tmp_path: Path) -> None:
    """[monitor] and [capture] on a graph: the C++ monitor sees every answered row (the
    reference first, read from the graph's directory), and capture writes each request's
    public inputs and outputs."""
    from conveyor.monitor.capture_files import read_capture

    reference = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    np.save(repository / "cascade" / "reference.npy", reference)
    with (repository / "cascade" / "config.toml").open("a") as config:
        config.write('\n[monitor]\nreference = "reference.npy"\n\n[capture]\nsample_rate = 1.0\n')
    data = tmp_path / "data"
    x = np.array([[1, 2], [9, 3], [2, 4]], np.float32)
    with Runtime.from_repository(repository, models=["cascade"], data_dir=data) as runtime:
        handle = runtime.model("cascade")
        assert handle.monitor is not None and handle.monitor.core.rows_observed == len(reference)
        answers = [runtime.infer("cascade", {"x": x}, request_id=f"r{i}")["y"] for i in range(5)]
        assert handle.monitor.core.rows_observed == len(reference) + 5 * len(x)
        assert runtime.monitor_document("cascade")["model"] == "cascade"
    table = read_capture(data / "cascade" / "v1")
    assert table.num_rows == 5 * len(x)
    assert sorted(set(table.column("request_id").to_pylist())) == [f"r{i}" for i in range(5)]
    order = np.argsort([int(r[1:]) * 10 + row for r, row in zip(table.column("request_id").to_pylist(),
                                                                table.column("row").to_pylist())])  # fmt: skip
    captured = np.array(table.column("output.y").to_pylist(), np.float32)[order]
    np.testing.assert_array_equal(captured, np.concatenate(answers))
    np.testing.assert_array_equal(np.array(table.column("input.x").to_pylist(), np.float32)[order], np.tile(x, (5, 1)))
