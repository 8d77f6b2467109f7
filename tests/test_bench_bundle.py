"""Bundle format v1: written atomically, read back equal, refused with a clear message when wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.profile import bundle as bundle_module
from conveyor.profile.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    BundleError,
    read_bundle,
    write_bundle,
)


def run_entry(index: int) -> dict[str, Any]:
    return {
        "repetition": index, "seed": 100 + index, "queries": 4, "samples": 4, "errors": 1, "duration_s": 0.5,
        "offered_qps": 8.0, "achieved_qps": 8.0, "throughput_samples_per_s": 8.0,
        "latency_ms": {"mean": 1.0, "p50": 1.0, "p90": 2.0, "p95": 2.0, "p99": 3.0, "p999": 3.0, "max": 3.0},
        "early_stopping": {"percentile": 0.99, "estimate_ms": None, "queries_needed": 662, "enough": False},
        "generator_overhead": 0.01, "late_sends": 0, "latencies_key": f"run{index}",
    }  # fmt: skip


def document() -> dict[str, Any]:
    return {
        "software": {"conveyor_version": "0.1.0", "git_commit": None, "python": "3.11.9", "numpy": "2.0",
                     "onnxruntime": None},
        "target": {"kind": "in-process", "url": None, "model": "mlp", "version": 1, "model_sha256": "ab",
                   "config_sha256": "cd", "settings": {"max_batch_size": 64}},
        "scenario": {"name": "server", "seed": 7, "warmup_s": 0.1, "min_duration_s": 0.5, "min_queries": 4,
                     "samples_per_query": 1, "target_qps": 8.0, "slo_p99_ms": None, "repetitions": 2},
        "runs": [run_entry(0), run_entry(1)],
        "peak": None,
        "summary": {"metric": "p99_ms", "value": np.float64(3.0), "ci95": [2.0, 4.0], "cv": float("nan")},
        "accuracy": None,
        "batch_sizes": {1: 3, 2: 1},
        "utilisation": {"cpu_percent": 50.0, "gpu_percent": None},
        "machine": {"system_name": "box"},
    }  # fmt: skip


def arrays(runs: int = 2) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i in range(runs):
        out[f"run{i}_latency_ns"] = np.array([1_000_000, 2_000_000, 3_000_000, -1], dtype=np.int64)
        out[f"run{i}_ok"] = np.array([True, True, True, False])
    return out


def test_written_bundle_reads_back_with_header_and_lazy_arrays(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", document(), arrays())
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "latencies.npz"]  # no temporary left
    bundle = read_bundle(out)
    assert bundle.document["format"] == BUNDLE_FORMAT
    assert bundle.document["format_version"] == BUNDLE_FORMAT_VERSION == 1
    assert bundle.document["created"].endswith("Z")
    assert bundle["summary"]["value"] == 3.0 and bundle["summary"]["cv"] is None  # NaN became null
    assert bundle["batch_sizes"] == {"1": 3, "2": 1}
    assert bundle._arrays is None  # not read until asked
    np.testing.assert_array_equal(bundle.run_latencies_ns(1), [1_000_000, 2_000_000, 3_000_000, -1])
    assert bundle.run_ok(0).dtype == np.bool_ and bundle.run_ok(0).tolist() == [True, True, True, False]
    assert read_bundle(out / "bundle.json").document == bundle.document  # the JSON file's path does too


def test_rewriting_replaces_the_bundle(tmp_path: Path) -> None:
    write_bundle(tmp_path, document(), arrays())
    changed = document()
    changed["runs"] = [run_entry(0)]
    write_bundle(tmp_path, changed, arrays(1))
    assert len(read_bundle(tmp_path).runs) == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("machine"), "field 'machine' is missing"),
        (lambda d: d["runs"][1]["latency_ms"].pop("p99"), "field 'runs[1].latency_ms.p99' is missing"),
        (lambda d: d["scenario"].update(seed="7"), "field 'scenario.seed' is '7', expected int"),
        (lambda d: d["scenario"].update(name="burst"), "'scenario.name' is 'burst', expected one of single-stream"),
        (lambda d: d["target"].update(kind="ssh"), "'target.kind' is 'ssh'"),
        (lambda d: d.update(accuracy={"reference": "r.npz"}), "field 'accuracy.outputs_compared' is missing"),
        (lambda d: d["runs"][0]["early_stopping"].update(enough=1), "'runs[0].early_stopping.enough' is 1"),
    ],
)
def test_a_bad_document_is_refused_on_write_naming_the_field(tmp_path: Path, edit: Any, message: str) -> None:
    bad = document()
    edit(bad)
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        write_bundle(tmp_path / "b", bad, arrays())
    assert str(tmp_path / "b" / "bundle.json") in str(info.value)
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_write_needs_the_arrays_each_run_refers_to(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="run1_latency_ns and run1_ok are both needed"):
        write_bundle(tmp_path, document(), arrays(1))
    ragged = arrays()
    ragged["run0_ok"] = ragged["run0_ok"][:2]
    with pytest.raises(BundleError, match="run0_latency_ns has shape"):
        write_bundle(tmp_path, document(), ragged)


def test_find_peak_trials_are_checked_and_stored(tmp_path: Path) -> None:
    peaked = document()
    peaked["peak"] = {"slo_p99_ms": 5.0, "max_error_rate": 0.001, "capacity_qps": 100.0,
                      "capacity_qps_per_repetition": [100.0], "trials": [
                          {"rate_qps": 100.0, "p99_ms": 4.0, "error_rate": 0.0, "passed": True}]}  # fmt: skip
    values = arrays()
    with pytest.raises(BundleError, match="trial0_latency_ns and trial0_ok"):
        write_bundle(tmp_path, peaked, values)
    values["trial0_latency_ns"], values["trial0_ok"] = np.array([5], np.int64), np.array([True])
    bundle = read_bundle(write_bundle(tmp_path, peaked, values))
    assert bundle.arrays["trial0_latency_ns"].tolist() == [5]


def write_raw(directory: Path, content: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return directory


def complete_document(tmp_path: Path) -> dict[str, Any]:
    return json.loads((write_bundle(tmp_path / "good", document(), arrays()) / "bundle.json").read_text())


def test_read_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"{tmp_path} is not a bundle: it has no bundle.json"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle(tmp_path / "absent")
    with pytest.raises(BundleError, match="is not valid JSON"):
        read_bundle(write_raw(tmp_path / "garbled", "{"))
    with pytest.raises(BundleError, match="'format' is 'something-else'"):
        read_bundle(write_raw(tmp_path / "other", {"format": "something-else"}))
    with pytest.raises(BundleError, match="'format' is 'list'"):
        read_bundle(write_raw(tmp_path / "list", [1]))


def test_read_refuses_a_newer_format_saying_which_conveyor_reads_it(tmp_path: Path) -> None:
    newer = complete_document(tmp_path)
    newer["format_version"] = BUNDLE_FORMAT_VERSION + 1
    newer["software"]["conveyor_version"] = "9.0.0"
    with pytest.raises(BundleError, match=r"format_version 2, newer than this conveyor reads \(up to 1\).*conveyor 9.0.0"):
        read_bundle(write_raw(tmp_path / "newer", newer))
    newer["format_version"] = 0
    with pytest.raises(BundleError, match="'format_version' is 0, expected a positive integer"):
        read_bundle(write_raw(tmp_path / "zero", newer))


def test_read_refuses_a_missing_field_naming_file_and_field(tmp_path: Path) -> None:
    broken = complete_document(tmp_path)
    del broken["scenario"]["repetitions"]
    where = write_raw(tmp_path / "broken", broken)
    with pytest.raises(BundleError, match=f"{where / 'bundle.json'}: field 'scenario.repetitions' is missing"):
        read_bundle(where)


def test_read_refuses_a_bundle_whose_latencies_are_gone(tmp_path: Path) -> None:
    out = write_bundle(tmp_path, document(), arrays())
    np.savez_compressed(out / "latencies.npz", run0_latency_ns=np.zeros(1), run0_ok=np.zeros(1, bool))
    with pytest.raises(BundleError, match="has no array 'run1_latency_ns'"):
        read_bundle(out)
    (out / "latencies.npz").unlink()
    with pytest.raises(BundleError, match="latencies.npz is missing"):
        read_bundle(out)


def test_an_older_format_is_migrated_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend this reader knows format 2, whose migration from 1 renames a field.
    def to_two(old: dict[str, Any]) -> dict[str, Any]:
        new = copy.deepcopy(old)
        new["format_version"] = 2
        new["machine"]["migrated"] = True
        return new

    out = write_bundle(tmp_path, document(), arrays())
    monkeypatch.setattr(bundle_module, "BUNDLE_FORMAT_VERSION", 2)
    monkeypatch.setitem(bundle_module.MIGRATIONS, 1, to_two)
    bundle = read_bundle(out)
    assert bundle["format_version"] == 2 and bundle["machine"]["migrated"] is True


def test_write_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BundleError, match="is a file; pass a directory"):
        write_bundle(target, document(), arrays())
