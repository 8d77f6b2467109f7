"""`conveyor profile`: outputs, resume, failures, an unmet objective and bad input (a simulated trial runner stands in)."""

from __future__ import annotations

import io
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conveyor.config import load_model_config
from conveyor.profile import profile_cli
from conveyor.profile.profile_cli import main, progress_display
from conveyor.toml_text import toml_text
from conveyor.profile.profile_trials import TrialRecord, describe_model
from conveyor.profile.search import configuration_key
from test_profile_search import BALANCED, Surface

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
SPACE = [
    "--set",
    "max_batch_size=1,4,16,64",
    "--set",
    "max_queue_delay_us=0,500",
    "--set",
    "threads=1,2",
]
# (batch size 1, or 4/16/64 x (no delay, or 500 us x preferred none/half)) x 8 instance/thread pairs x 2 backends
# x 2 pinnings = 10 x 8 x 4 = 320 configurations
SURFACE = Surface("smooth", BALANCED)


class SimulatedRunner:
    """Trials from a simulated capacity surface; `outcome(configuration)` may turn one into a failure."""

    def __init__(
        self,
        outcome: Callable[[dict], dict | None] | None = None,
        interrupt_after: int | None = None,
    ):
        self.outcome = outcome or (lambda configuration: None)
        self.interrupt_after = interrupt_after
        self.calls: list[tuple[str, str]] = []
        self.calibrated: list[Any] = []
        self.closed = False

    def calibrate(self, keys: list[tuple[str, str, int]], max_batch_size: int) -> list[list[Any]]:
        self.calibrated.append((keys, max_batch_size))
        sizes = [1, 2, 4, 8, 16, 32, 64]
        return [[b, d, t, size, SURFACE.machine.batch_s(b, t, size)] for b, d, t in keys for size in sizes]

    def run(
        self,
        configuration: dict,
        seed: int,
        start_qps: float | None,
        purpose: str = "search",
    ) -> TrialRecord:
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append((configuration_key(configuration), purpose))
        real = configuration or {"backend": "onnx", "device": "cpu", "max_batch_size": 64, "max_queue_delay_us": 0,
                                 "preferred_batch_sizes": "none", "instance_count": 1, "threads": 1,
                                 "inter_op_threads": 1, "pinning": "none"}  # fmt: skip
        capacity = SURFACE.capacity(real, seed % 1000)
        fields = {"status": "ok", "capacity_qps": capacity, "p99_ms": 4.0, "best_p99_ms": 1.0,
                  "lowest_rate_qps": capacity / 4, "memory_mb": 10.0 * real["instance_count"] * real["threads"],
                  "probes": 6, "seconds": 0.01} | (self.outcome(real) or {})  # fmt: skip
        return TrialRecord(dict(configuration), seed=seed, purpose=purpose, **fields)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> Callable[..., SimulatedRunner]:
    """Installs a SimulatedRunner factory on a 4-CPU host without a GPU; returns a setter for the next runner."""
    monkeypatch.setattr(profile_cli, "allowed_cpus", lambda: 4)
    monkeypatch.setattr(profile_cli, "detect_gpu", lambda: False)
    holder: dict[str, SimulatedRunner] = {"runner": SimulatedRunner()}
    monkeypatch.setattr(profile_cli, "make_runner", lambda model, settings: holder["runner"])

    def use(runner: SimulatedRunner | None = None) -> SimulatedRunner:
        holder["runner"] = runner or SimulatedRunner()
        return holder["runner"]

    return use


def _args(out: Path, *extra: str) -> list[str]:
    return [
        "mlp",
        "--repository",
        str(EXAMPLES),
        "--slo-p99-ms",
        "10",
        *SPACE,
        "--out",
        str(out),
        *extra,
    ]


def test_quick_profile_writes_a_config_that_loads_the_pareto_set_and_the_why(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner], capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    runner = simulated()
    assert main(_args(tmp_path)) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    searched = [call for call in runner.calls if call[1] == "search"]
    assert report["space_size"] == 320
    assert len(searched) == report["trial_count"]["search"] <= report["space_size"] // 10
    assert [purpose for _, purpose in runner.calls[-12:]] == ["rerun"] * 9 + ["baseline"] * 3
    assert len(report["finalists"]) == 3 and report["trial_count"]["rerun"] == 9
    assert runner.closed and runner.calibrated[0][1] == 64
    winner = report["winner"]
    assert winner["ci95"] is not None and len(winner["capacities_qps"]) == 3
    assert report["baseline"]["capacity_qps"] > 0
    config = load_model_config(tmp_path / "config.toml", name="mlp")
    chosen = winner["configuration"]
    assert config.backend == chosen["backend"] and config.max_batch_size == chosen["max_batch_size"]
    assert config.instance_group.count == chosen["instance_count"]
    assert config.dynamic_batching.max_queue_delay_us == chosen["max_queue_delay_us"]
    threads = config.native.threads if config.backend == "native" else config.onnx.intra_op_threads
    assert threads == chosen["threads"]
    capacities = [point["capacity_qps"] for point in report["pareto"]]
    assert capacities == sorted(capacities, reverse=True) and report["pareto"]
    varied = [effect for effect in report["knob_effects"] if effect["spread"] is not None]
    assert varied and all(len(effect["values"]) >= 2 for effect in varied)
    out = capsys.readouterr().out
    assert "recommended: backend" in out and "Pareto set" in out and "why (capacity spread" in out


def test_an_interrupted_profile_resumes_without_repeating_a_trial(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner]) -> None:  # fmt: skip
    first = simulated(SimulatedRunner(interrupt_after=5))
    assert main(_args(tmp_path)) == 130
    lines = (tmp_path / "checkpoint.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "calibration"] + ["trial"] * 5
    second = simulated()
    assert main(_args(tmp_path)) == 0
    assert not second.calibrated  # the calibration came from the checkpoint
    assert not set(first.calls) & set(second.calls)
    fresh_dir = tmp_path / "uninterrupted"
    whole = simulated()
    assert main(_args(fresh_dir)) == 0
    assert sorted(first.calls + second.calls) == sorted(whole.calls)
    resumed = json.loads((tmp_path / "profile.json").read_text())["winner"]["configuration"]
    assert resumed == json.loads((fresh_dir / "profile.json").read_text())["winner"]["configuration"]


def test_a_checkpoint_of_another_objective_is_refused_unless_fresh(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner], capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    simulated(SimulatedRunner(interrupt_after=2))
    assert main(_args(tmp_path)) == 130
    other = [arg if arg != "10" else "20" for arg in _args(tmp_path)]
    assert main(other) == 2
    assert "differs in slo_p99_ms" in capsys.readouterr().err
    simulated()
    assert main([*other, "--fresh"]) == 0


def test_failed_crashed_and_hung_trials_are_recorded_and_skipped(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner], capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def outcome(configuration: dict) -> dict | None:
        if configuration["instance_count"] == 2:
            return {
                "status": "timed out",
                "capacity_qps": 0.0,
                "error": "the trial did not finish within 120 s",
            }
        if configuration["backend"] == "native" and configuration["threads"] == 2:
            return {
                "status": "crashed",
                "capacity_qps": 0.0,
                "error": "the worker died (exit status -11)",
            }
        return None

    simulated(SimulatedRunner(outcome))
    assert main(_args(tmp_path)) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    statuses = {trial["status"] for trial in report["trials"]}
    assert "timed out" in statuses or "crashed" in statuses
    assert report["winner"]["configuration"]["instance_count"] != 2
    assert "failed and were skipped" in capsys.readouterr().out


def test_an_objective_nothing_meets_names_the_closest_and_what_to_relax(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner], capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def unmet(configuration: dict) -> dict:
        return {"status": "unmet", "capacity_qps": 0.0, "p99_ms": None,
                "best_p99_ms": 12.0 + configuration["max_batch_size"] / 10, "lowest_rate_qps": 3.0}  # fmt: skip

    simulated(SimulatedRunner(unmet))
    assert main(_args(tmp_path)) == 4
    err = capsys.readouterr().err
    assert "no configuration met p99 <= 10 ms" in err and "p99 12.10 ms (21% over)" in err
    assert "--slo-p99-ms 14.6" in err
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["winner"] is None and len(report["closest"]) == 3
    assert not (tmp_path / "config.toml").exists()


def test_exhaustive_search_measures_every_configuration(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner]) -> None:  # fmt: skip
    runner = simulated()
    small = [
        "--set",
        "backend=onnx",
        "--set",
        "pinning=none",
        "--set",
        "threads=1",
        "--set",
        "instance_count=1,2",
    ]
    assert main([*_args(tmp_path), *small, "--search", "exhaustive", "--repetitions", "2"]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    searched = {key for key, purpose in runner.calls if purpose == "search"}
    assert len(searched) == report["space_size"] == report["trial_count"]["search"]


def test_a_memory_limit_makes_bigger_configurations_infeasible(
        tmp_path: Path, simulated: Callable[..., SimulatedRunner]) -> None:  # fmt: skip
    simulated()
    assert main([*_args(tmp_path), "--max-memory-mb", "15"]) == 0
    winner = json.loads((tmp_path / "profile.json").read_text())["winner"]
    assert winner["configuration"]["instance_count"] * winner["configuration"]["threads"] == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["nonexistent", "--slo-p99-ms", "5"], "nonexistent"),
    (["mlp"], "--slo-p99-ms is required"),
    (["mlp", "--slo-p99-ms", "5", "--set", "speed=2"], "unknown knob 'speed'"),
    (["mlp", "--slo-p99-ms", "5", "--set", "device=cuda"], "no GPU"),
    (["mlp", "--slo-p99-ms", "5", "--set", "threads=4", "--max-threads", "2"], "no configuration fits"),
])  # fmt: skip
def test_bad_input_exits_2_saying_what_to_change(argv: list[str], message: str, tmp_path: Path,
                                                 simulated: Callable[..., SimulatedRunner],
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main([*argv, "--repository", str(EXAMPLES), "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_toml_text_round_trips_a_config_with_tables_and_arrays_of_tables() -> None:
    model = describe_model(EXAMPLES, "image_classifier")
    assert tomllib.loads(toml_text(model.file_data)) == model.file_data
    odd = {"name": "a \"quoted\" é", "ratio": 0.25, "flag": True, "sizes": [1, 2], "t": {"u": {"v": 1}},
           "rows": [{"k": "x"}, {"k": "y"}]}  # fmt: skip
    assert tomllib.loads(toml_text(odd)) == odd


def test_when_only_memory_stands_in_the_way_the_message_says_to_raise_the_limit(
    tmp_path: Path,
    simulated: Callable[..., SimulatedRunner],
    capsys: pytest.CaptureFixture[str],
) -> None:
    simulated()
    assert main([*_args(tmp_path), "--max-memory-mb", "5"]) == 4
    err = capsys.readouterr().err
    assert "used more memory than --max-memory-mb 5 (the least: 10.0 MB)" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_with_an_eta_on_a_terminal_and_one_line_per_trial_otherwise() -> None:
    terminal = _Terminal()
    with progress_display(4, terminal) as say:
        say("search: one", 0)
        say("search: two", 2)
    assert "2/4" in terminal.getvalue() and "ETA" in terminal.getvalue()
    plain = io.StringIO()
    with progress_display(4, plain) as say:
        say("running", 0)
        say("done one", 1)
        say("running", 1)
    assert plain.getvalue() == "  [1/4] done one\n"


def test_the_winner_is_chosen_on_repeated_measurements_not_one_lucky_trial(
    tmp_path: Path, simulated: Callable[..., SimulatedRunner]
) -> None:
    """One configuration's search trial is lucky (10x); measured again it is ordinary, and another wins."""
    lucky = "backend=onnx,device=cpu,max_batch_size=1,"
    runner = simulated()
    original = runner.run

    def run(configuration: dict, seed: int, start_qps: float | None, purpose: str = "search") -> TrialRecord:
        record = original(configuration, seed, start_qps, purpose)
        if purpose == "search" and configuration_key(configuration).startswith(lucky):
            record.capacity_qps *= 1000
        return record

    runner.run = run  # type: ignore[method-assign]
    assert main([*_args(tmp_path), "--search", "exhaustive", "--set", "instance_count=1", "--set", "threads=1"]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert any(configuration_key(f["configuration"]).startswith(lucky) for f in report["finalists"])
    assert not configuration_key(report["winner"]["configuration"]).startswith(lucky)
