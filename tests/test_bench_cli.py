"""`conveyor bench`: flags, errors and exit codes, the bundle it writes (a simulated load driver stands in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.profile import bench_cli
from conveyor.profile.bench_cli import main
from conveyor.profile.bundle import read_bundle
from conveyor.profile.fingerprint import file_sha256
from processes import free_port
from test_bench_scenarios import SimulatedDriver

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
SHORT = ["--repository", str(EXAMPLES), "--duration-s", "0.05", "--warmup-s", "0.01", "--min-queries", "40",
         "--samples", "4"]  # fmt: skip


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replaces the native generator with a simulated server of 1000 queries/s; records what it was given."""
    given: list[Any] = []

    def make_driver(target: Any, samples: list[dict[str, np.ndarray]], args: Any) -> SimulatedDriver:
        given.append((target, samples))
        return SimulatedDriver(sample_count=len(samples))

    monkeypatch.setattr(bench_cli, "make_driver", make_driver)
    return given


def test_in_process_single_stream_writes_a_complete_bundle(tmp_path: Path, simulated: list[Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["mlp", *SHORT, "--repetitions", "2", "--seed", "9", "--out", str(tmp_path / "b")]) == 0
    bundle = read_bundle(tmp_path / "b")
    target = bundle["target"]
    assert target["kind"] == "in-process" and target["model"] == "mlp" and target["version"] == 1
    assert target["model_sha256"] == file_sha256(EXAMPLES / "mlp" / "1" / "model.onnx")
    assert len(target["config_sha256"]) == 64 and target["settings"]["max_batch_size"] == 64
    assert target["settings"]["intra_op_threads"] == 1 and target["settings"]["instance_count"] == 1
    assert bundle["scenario"]["name"] == "single-stream" and bundle["scenario"]["seed"] == 9
    assert len(bundle.runs) == 2 and bundle.runs[0]["queries"] >= 40
    assert bundle["summary"]["metric"] == "p90_ms" and bundle["inputs"]["source"] == "generated"
    assert bundle["machine"]["cpu"]["logical_cpus"] >= 1 and bundle["software"]["python"]
    assert bundle["command"][:3] == ["conveyor", "bench", "mlp"]
    assert bundle.run_latencies_ns(0).dtype == np.int64
    samples = simulated[0][1]
    assert len(samples) == 4 and samples[0]["x"].shape == (1, 64)
    out = capsys.readouterr().out
    assert "mlp v1 (in-process), single-stream" in out and "p90_ms: " in out and f"bundle written to {tmp_path / 'b'}" in out


def test_find_peak_alone_means_the_server_scenario(tmp_path: Path, simulated: list[Any]) -> None:
    code = main(["mlp", *SHORT, "--find-peak", "--slo-p99-ms", "5", "--target-qps", "200", "--repetitions", "1",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    bundle = read_bundle(tmp_path)
    assert bundle["scenario"]["name"] == "server" and bundle["summary"]["metric"] == "capacity_qps"
    assert 600 < bundle["peak"]["capacity_qps"] < 720 and bundle["peak"]["trials"]


def test_a_missed_objective_exits_4(tmp_path: Path, simulated: list[Any]) -> None:
    common = ["mlp", *SHORT, "--scenario", "server", "--repetitions", "1", "--out", str(tmp_path)]
    assert main([*common, "--target-qps", "900", "--slo-p99-ms", "2"]) == bench_cli.EXIT_OBJECTIVE
    assert read_bundle(tmp_path).runs[0]["slo_met"] is False
    assert main([*common, "--target-qps", "100", "--slo-p99-ms", "5"]) == 0


def test_accuracy_reference_written_then_checked(tmp_path: Path, simulated: list[Any]) -> None:
    reference = tmp_path / "reference.npz"
    assert main(["mlp", *SHORT, "--repetitions", "1", "--write-reference", str(reference), "--out",
                 str(tmp_path / "first")]) == 0  # fmt: skip
    assert read_bundle(tmp_path / "first")["accuracy"] is None
    assert main(["mlp", *SHORT, "--repetitions", "1", "--reference", str(reference), "--out",
                 str(tmp_path / "same")]) == 0  # fmt: skip
    accuracy = read_bundle(tmp_path / "same")["accuracy"]
    assert accuracy["passed"] and accuracy["outputs_compared"] == 4 and accuracy["max_abs_difference"] <= 1e-6
    with np.load(reference) as archive:
        tampered = {name: archive[name] for name in archive.files}
    tampered["output/0/probs"] = tampered["output/0/probs"] + 0.5
    np.savez(reference, **tampered)
    code = main(["mlp", *SHORT, "--repetitions", "1", "--reference", str(reference), "--out", str(tmp_path / "bad")])
    assert code == bench_cli.EXIT_ACCURACY
    assert read_bundle(tmp_path / "bad")["accuracy"]["passed"] is False


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nope"], "model 'nope' is not in the repository .*; models there: churn, classifier_large, classifier_small, image_cascade, image_classifier, mlp"),
        (["mlp", "--find-peak"], "--find-peak needs the p99 objective: pass --slo-p99-ms"),
        (["mlp", "--scenario", "server"], "needs its arrival rate: pass --target-qps"),
        (["mlp", "--scenario", "offline", "--find-peak", "--slo-p99-ms", "3"], "use --scenario server"),
        (["mlp", "--model-version", "7"], "model 'mlp' has no version 7 to serve"),
        ([], "MODEL is required"),
    ],
)
def test_bad_usage_exits_2_with_what_to_do(arguments: list[str], message: str, simulated: list[Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main([*arguments, "--repository", str(EXAMPLES)]) == bench_cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert error.startswith("conveyor bench: error: ")
    assert pytest.importorskip("re").search(message, error), error


def test_inputs_that_do_not_fit_the_model_exit_2(tmp_path: Path, simulated: list[Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    np.save(tmp_path / "wrong.npy", np.ones((3, 63), np.float32))
    assert main(["mlp", *SHORT, "--inputs", str(tmp_path / "wrong.npy")]) == bench_cli.EXIT_USAGE
    assert "input 'x' has shape [63], but the model expects [64] per sample" in capsys.readouterr().err
    np.save(tmp_path / "right.npy", np.ones((3, 64), np.float32))
    assert main(["mlp", *SHORT, "--repetitions", "1", "--inputs", str(tmp_path / "right.npy"), "--out",
                 str(tmp_path / "b")]) == 0  # fmt: skip
    assert read_bundle(tmp_path / "b")["inputs"] == {"source": "file", "path": str(tmp_path / "right.npy"),
                                                      "samples": 3}  # fmt: skip


def test_an_unreachable_url_exits_2(simulated: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["mlp", "--url", url]) == bench_cli.EXIT_USAGE
    assert f"the server is not reachable at {url}" in capsys.readouterr().err


def test_flags_come_from_the_environment(tmp_path: Path, simulated: list[Any], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("CONVEYOR_SCENARIO", "offline")
    monkeypatch.setenv("CONVEYOR_REPETITIONS", "1")
    monkeypatch.setenv("CONVEYOR_MODEL", "mlp")
    assert main([*SHORT, "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "bundle.json").read_text())
    assert document["scenario"]["name"] == "offline" and len(document["runs"]) == 1
    monkeypatch.setenv("CONVEYOR_REPETITIONS", "none")
    assert main([*SHORT]) == bench_cli.EXIT_USAGE
    assert "CONVEYOR_REPETITIONS='none' is not valid for --repetitions" in capsys.readouterr().err


def test_summary_lines_show_the_interval_and_flags() -> None:
    document = {
        "scenario": {"name": "server", "target_qps": 100.0},
        "target": {"model": "m", "version": 2, "url": "http://h:1"},
        "runs": [{"repetition": 0, "queries": 700, "errors": 0, "duration_s": 7.0, "achieved_qps": 100.0,
                  "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": None},
                  "early_stopping": {"estimate_ms": None, "enough": False, "queries_needed": 900}}],
        "summary": {"metric": "p99_ms", "value": 3.0, "ci95": [2.5, 3.5], "cv": 0.05},
        "peak": None, "accuracy": {"reference": "r.npz", "passed": False, "max_abs_difference": 0.5,
                                   "top1_agreement": 0.5},
    }  # fmt: skip
    lines = bench_cli.summary_lines(document, Path("out"), ["the generator was busy"])
    assert lines[0] == "m v2 (http://h:1), server at 100 queries/s"
    assert "— (needs 900)" in lines[2]
    assert "p99_ms: 3 (95% interval 2.5 to 3.5, CV 5.0%)" in lines
    assert any("FAILED: this machine or configuration changes the answers" in line for line in lines)
    assert lines[-2:] == ["warning: the generator was busy", "bundle written to out"]


# ---------------------------------------------------------------- end to end, with the native generator


def test_end_to_end_in_process_server_scenario(tmp_path: Path) -> None:
    code = main(["mlp", "--repository", str(EXAMPLES), "--scenario", "server", "--target-qps", "300",
                 "--duration-s", "0.15", "--min-queries", "40", "--warmup-s", "0.05", "--repetitions", "2",
                 "--samples", "8", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    bundle = read_bundle(tmp_path)
    for index, run in enumerate(bundle.runs):
        assert run["queries"] == 46 and run["errors"] == 0  # 0.15 s at 300/s: 45 gaps
        assert run["offered_qps"] == pytest.approx(300.0, rel=1e-6)  # the schedule spans exactly (n - 1) / rate
        latency = bundle.run_latencies_ns(index)
        assert len(latency) == run["queries"] and (latency > 0).all() and bundle.run_ok(index).all()
    answered = sum(int(size) * count for size, count in bundle["batch_sizes"].items())
    assert answered >= sum(run["queries"] for run in bundle.runs)  # warm-up batches count too
    assert bundle["utilisation"]["process_cpu_percent"] is not None


def test_end_to_end_over_http_offline(tmp_path: Path) -> None:
    from conveyor.server.serve import ServeOptions
    from server_thread import ServerThread

    served = ServerThread(ServeOptions(repository=EXAMPLES, http_port=0, grpc_port=0,
                                       model_control_mode="explicit", load_models=["mlp"]))  # fmt: skip
    try:
        code = main(["mlp", "--url", f"http://127.0.0.1:{served.port}", "--repository", str(EXAMPLES),
                     "--scenario", "offline", "--duration-s", "0.1", "--min-queries", "50", "--warmup-s", "0.02",
                     "--repetitions", "1", "--samples", "4", "--out", str(tmp_path)])  # fmt: skip
    finally:
        served.stop()
    assert code == 0
    bundle = read_bundle(tmp_path)
    target = bundle["target"]
    assert target["kind"] == "http" and target["version"] == "1" and target["settings"]["max_batch_size"] == 64
    assert target["model_sha256"] == file_sha256(EXAMPLES / "mlp" / "1" / "model.onnx")
    assert bundle.runs[0]["errors"] == 0 and bundle.runs[0]["queries"] >= 50
    assert bundle["summary"]["metric"] == "throughput_samples_per_s" and bundle["summary"]["value"] > 0
    assert sum(bundle["batch_sizes"].values()) > 0  # from the server's statistics extension


class Terminal:
    """A stream that says it is a terminal and keeps what was written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        return None


def test_progress_is_plain_lines_on_a_terminal_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "rich.progress", None)  # as if rich were not installed
    terminal = Terminal()
    with bench_cli.progress_display(terminal) as progress:
        progress("warm-up", 0.0)
        progress("repetition 1 of 3", 0.0)
    assert terminal.text == "  warm-up\n  repetition 1 of 3\n"


def test_progress_is_silent_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with bench_cli.progress_display() as progress:
        progress("warm-up", 0.5)
    assert capsys.readouterr().err == ""


def test_utilisation_measures_cpu_while_it_runs() -> None:
    with bench_cli.Utilisation() as meter:
        sum(i * i for i in range(200_000))
    document = meter.document()
    assert document["process_cpu_percent"] > 0 and document["cpus"] >= 1
    assert document["cpu_percent"] is None or 0 <= document["cpu_percent"] <= 100


def test_end_to_end_in_process_multi_stream(tmp_path: Path) -> None:
    code = main(["mlp", "--repository", str(EXAMPLES), "--scenario", "multi-stream", "--duration-s", "0.05",
                 "--min-queries", "20", "--warmup-s", "0.02", "--repetitions", "1", "--samples", "8",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    bundle = read_bundle(tmp_path)
    run = bundle.runs[0]
    assert run["queries"] >= 20 and run["samples"] == 8 * run["queries"] and run["duration_s"] >= 0.05
    assert bundle["summary"]["metric"] == "p99_ms" and run["latency_ms"]["p99"] > 0
    assert max(int(size) for size in bundle["batch_sizes"]) <= 8  # one query's 8 requests at a time
