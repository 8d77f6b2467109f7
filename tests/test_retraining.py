"""RetrainingPolicy: each reason, its boundaries, the cooldown and what restarts after a
trigger, with time passed in; write_marker: content, naming and atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conveyor.errors import ConfigError, InvalidInput
from conveyor.monitor import retraining
from conveyor.monitor.retraining import REASONS, RetrainingPolicy, write_marker

QUIET = {"drift_alert": False, "metric": None, "reference_metric": None, "labeled_rows": 0}


def _policy(**options) -> RetrainingPolicy:
    return RetrainingPolicy(**{"drift_minutes": None, "metric_drop": None, "labeled_rows": None, **options})


def test_nothing_fires_when_every_criterion_is_off():
    policy = _policy()
    assert policy.update(0.0, drift_alert=True, metric=0.0, reference_metric=1.0, labeled_rows=10**9) == []
    assert policy.update(10**6, drift_alert=True, metric=0.0, reference_metric=1.0, labeled_rows=10**9) == []
    assert policy.snapshot() == {"triggers": 0, "last": None}


def test_sustained_drift_fires_after_drift_minutes_without_a_break():
    policy = _policy(drift_minutes=10)
    assert policy.update(0.0, **{**QUIET, "drift_alert": True}) == []
    assert policy.update(599.0, **{**QUIET, "drift_alert": True}) == []
    assert policy.update(600.0, **{**QUIET, "drift_alert": True}) == ["sustained_drift"]
    assert policy.snapshot() == {"triggers": 1, "last": {"time": 600.0, "reasons": ["sustained_drift"]}}


def test_a_break_in_the_drift_alert_restarts_the_clock():
    policy = _policy(drift_minutes=10)
    policy.update(0.0, **{**QUIET, "drift_alert": True})
    policy.update(300.0, **QUIET)
    policy.update(400.0, **{**QUIET, "drift_alert": True})
    assert policy.update(900.0, **{**QUIET, "drift_alert": True}) == []
    assert policy.update(1000.0, **{**QUIET, "drift_alert": True}) == ["sustained_drift"]


def test_metric_drop_for_accuracy_includes_the_threshold():
    policy = _policy(metric_drop=0.1, cooldown_s=0)
    assert policy.update(0.0, **{**QUIET, "metric": 0.84, "reference_metric": 0.93}) == []
    # 0.93 - 0.83 is 0.09999999999999998 in binary floating point: still a drop of 0.1.
    assert policy.update(1.0, **{**QUIET, "metric": 0.83, "reference_metric": 0.93}) == ["metric_drop"]
    assert policy.update(2.0, **{**QUIET, "metric": 0.5, "reference_metric": None}) == []
    assert policy.update(3.0, **{**QUIET, "metric": None, "reference_metric": 0.9}) == []
    assert policy.update(4.0, **{**QUIET, "metric": 0.99, "reference_metric": 0.5}) == []  # an improvement


def test_metric_drop_for_an_error_metric_looks_the_other_way():
    policy = _policy(metric_drop=0.5, higher_is_better=False, cooldown_s=0)
    assert policy.update(0.0, **{**QUIET, "metric": 0.2, "reference_metric": 1.0}) == []  # MAE fell: better
    assert policy.update(1.0, **{**QUIET, "metric": 1.4, "reference_metric": 1.0}) == []
    assert policy.update(2.0, **{**QUIET, "metric": 1.5, "reference_metric": 1.0}) == ["metric_drop"]


def test_the_direction_can_be_given_per_update():
    policy = _policy(metric_drop=0.5, cooldown_s=0)
    mae_rose = {**QUIET, "metric": 1.5, "reference_metric": 1.0}
    assert policy.update(0.0, **mae_rose) == []  # read as accuracy: an improvement
    assert policy.update(1.0, **mae_rose, higher_is_better=False) == ["metric_drop"]
    assert policy.update(2.0, **{**QUIET, "metric": 0.4, "reference_metric": 1.0}, higher_is_better=True) == [
        "metric_drop"
    ]


def test_labeled_rows_count_from_the_last_trigger():
    policy = _policy(labeled_rows=1000, cooldown_s=0)
    assert policy.update(0.0, **{**QUIET, "labeled_rows": 999}) == []
    assert policy.update(1.0, **{**QUIET, "labeled_rows": 1000}) == ["labeled_rows"]
    assert policy.update(2.0, **{**QUIET, "labeled_rows": 1999}) == []
    assert policy.update(3.0, **{**QUIET, "labeled_rows": 2000}) == ["labeled_rows"]


def test_a_counter_that_goes_back_is_a_restarted_counter():
    policy = _policy(labeled_rows=100, cooldown_s=0)
    assert policy.update(0.0, **{**QUIET, "labeled_rows": 5000}) == ["labeled_rows"]
    assert policy.update(1.0, **{**QUIET, "labeled_rows": 40}) == []  # a new store: counted from 0
    assert policy.update(2.0, **{**QUIET, "labeled_rows": 100}) == ["labeled_rows"]


def test_cooldown_holds_every_reason_and_sustained_drift_starts_over():
    policy = _policy(drift_minutes=1, metric_drop=0.1, labeled_rows=10, cooldown_s=3600)
    everything = {"drift_alert": True, "metric": 0.5, "reference_metric": 0.9, "labeled_rows": 10}
    assert policy.update(0.0, **{**QUIET, "drift_alert": True}) == []  # drift has only just begun
    assert policy.update(60.0, **everything) == list(REASONS)

    assert policy.update(3599.0, **{**everything, "labeled_rows": 100}) == []  # cooling down
    assert policy.update(3660.0, **{**everything, "labeled_rows": 100}) == list(REASONS)
    assert policy.snapshot() == {"triggers": 2, "last": {"time": 3660.0, "reasons": list(REASONS)}}

    # After the cooldown only the drift minutes measured from the trigger count.
    policy.cooldown_s = 0
    assert policy.update(3700.0, **{**everything, "metric": None, "labeled_rows": 100}) == []
    assert policy.update(3720.0, **{**everything, "metric": None, "labeled_rows": 100}) == ["sustained_drift"]


def test_a_trigger_without_drift_leaves_the_drift_clock_stopped():
    policy = _policy(drift_minutes=1, labeled_rows=1, cooldown_s=0)
    assert policy.update(0.0, **{**QUIET, "labeled_rows": 1}) == ["labeled_rows"]
    assert policy.update(1.0, **{**QUIET, "drift_alert": True, "labeled_rows": 1}) == []
    assert policy.update(61.0, **{**QUIET, "drift_alert": True, "labeled_rows": 1}) == ["sustained_drift"]


def test_snapshot_is_a_copy():
    policy = _policy(labeled_rows=1)
    policy.update(0.0, **{**QUIET, "labeled_rows": 1})
    snapshot = policy.snapshot()
    snapshot["last"]["reasons"].append("x")
    snapshot["last"]["time"] = 5.0
    assert policy.snapshot()["last"] == {"time": 0.0, "reasons": ["labeled_rows"]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drift_minutes": 0}, "drift_minutes must be > 0 (or unset), got 0"),
        ({"metric_drop": -0.1}, "metric_drop must be > 0 (or unset), got -0.1"),
        ({"labeled_rows": 0}, "labeled_rows must be >= 1 (or unset), got 0"),
        ({"cooldown_s": -1}, "cooldown_s must be >= 0, got -1"),
    ],
)
def test_bad_thresholds_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _policy(**options)


def test_write_marker_writes_the_documented_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "markers" / "mlp"  # created on demand
    files = [tmp_path / "capture" / "a.parquet", Path("relative.parquet")]

    path = write_marker(directory, model="mlp", version=3, reasons=["metric_drop"], files=files, time=1764480000.25)

    assert path == directory / "retrain-20251130T052000.250000Z.json"
    assert json.loads(path.read_text()) == {
        "model": "mlp", "version": 3, "reasons": ["metric_drop"], "time": 1764480000.25,
        "files": [str(tmp_path / "capture" / "a.parquet"), str(tmp_path / "relative.parquet")],
    }  # fmt: skip
    assert os.listdir(directory) == [path.name]  # no temporary left behind


def test_markers_with_the_same_time_do_not_overwrite_each_other(tmp_path: Path):
    names = [
        write_marker(tmp_path, model="m", version=1, reasons=["labeled_rows"], files=[], time=0.0).name
        for _ in range(3)
    ]
    assert names == ["retrain-19700101T000000.000000Z.json", "retrain-19700101T000000.000000Z-1.json",
                     "retrain-19700101T000000.000000Z-2.json"]  # fmt: skip


def test_a_marker_needs_a_reason(tmp_path: Path):
    with pytest.raises(InvalidInput, match="at least one reason"):
        write_marker(tmp_path, model="m", version=1, reasons=[], files=[], time=0.0)


def test_a_failed_write_leaves_no_temporary_and_names_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing_fsync(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retraining.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match=f"cannot write a retraining marker in {tmp_path}: No space left on device"):
        write_marker(tmp_path, model="m", version=1, reasons=["labeled_rows"], files=[], time=0.0)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_place_is_reported(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write a retraining marker in .*file/markers"):
        write_marker(blocker / "markers", model="m", version=1, reasons=["labeled_rows"], files=[], time=0.0)


def test_directory_fsync_is_skipped_where_a_directory_cannot_be_opened(tmp_path: Path, monkeypatch):
    real_open = os.open

    def no_directories(path, flags, *args):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(retraining.os, "open", no_directories)
    path = write_marker(tmp_path, model="m", version=1, reasons=["labeled_rows"], files=[], time=0.0)
    assert path.exists()
