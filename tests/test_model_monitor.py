"""A monitored model version in the Runtime: where its reference comes from, what is
captured and labelled, and the errors a bad monitoring config gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.errors import ConfigError, InvalidInput, ModelNotFound
from conveyor.monitor.capture import read_capture
from conveyor.monitor.reference import Reference
from conveyor import Runtime

FEATURES = 4


def _softmax_model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"][..., :2].astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return {"probs": (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)}


def _config(**tables: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [FEATURES]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "dims": [2]}],
    }
    config.update(tables)
    return config


def _rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, FEATURES)).astype(np.float32)


def test_training_file_reference_is_ready_at_load_and_its_rows_are_not_traffic(tmp_path: Path) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    np.save(tmp_path / "m" / "train.npy", _rows(300))
    config = _config(
        monitor={"reference": "train.npy", "classifier_outputs": [{"output": "probs"}]},
        capture={"sample_rate": 1.0},
        feedback={"kind": "classification", "output": "probs"},
    )
    with Runtime(data_dir=tmp_path / "data") as runtime:
        runtime.add_model("m", config, _softmax_model, model_dir=version_dir)
        monitor = runtime.model("m").monitor
        assert monitor.reference is not None and monitor.reference.rows == 300
        assert monitor.reference_source == f"file:{tmp_path / 'm' / 'train.npy'}"
        # the classifier's derived features got their reference from the model's outputs
        names = [f.name for f in monitor.features]
        assert names[-2:] == ["probs:class", "probs:confidence"]
        assert np.isfinite(monitor.reference.mean[names.index("probs:confidence")])
        assert monitor.core.rows_observed == 300
        capture_dir = monitor.capture.directory
        assert monitor.feedback.snapshot()["pending"] == 0
        runtime.infer("m", {"x": _rows(1, seed=1)}, request_id="live-1")
    table = read_capture(capture_dir)
    assert table.column("request_id").to_pylist() == ["live-1"]  # the 300 training rows were not captured


def test_live_reference_is_saved_and_reloaded_by_the_next_load(tmp_path: Path) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    config = _config(monitor={"reference_rows": 100, "evaluate_interval_s": 3600.0})
    with Runtime() as runtime:
        runtime.add_model("m", config, _softmax_model, model_dir=version_dir)
        monitor = runtime.model("m").monitor
        runtime.infer("m", {"x": _rows(8)})
        monitor.tick()
        assert monitor.reference is None  # 8 of 100 rows
        for start in range(0, 96, 8):
            runtime.infer("m", {"x": _rows(8, seed=start + 1)})
        monitor.tick()
        assert monitor.reference is not None and monitor.reference.rows == 100
    saved = version_dir / "monitor_reference.npz"
    assert saved.is_file() and saved.stat().st_size < 1 << 20
    with Runtime() as runtime:
        runtime.add_model("m", config, _softmax_model, model_dir=version_dir)
        monitor = runtime.model("m").monitor
        assert monitor.reference_source == f"saved:{saved}"
        np.testing.assert_array_equal(monitor.reference.edges[0], Reference.load(saved).edges[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_version_directory_saves_the_reference_under_the_data_dir(tmp_path: Path) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    version_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with Runtime(data_dir=tmp_path / "data") as runtime:
            runtime.add_model("m", _config(monitor={"reference_rows": 100}), _softmax_model, model_dir=version_dir)
            monitor = runtime.model("m").monitor
            for seed in range(13):
                runtime.infer("m", {"x": _rows(8, seed=seed)})
            monitor.tick()
            assert monitor.reference_source == f"live:{tmp_path / 'data' / 'm' / 'v1' / 'monitor_reference.npz'}"
    finally:
        version_dir.chmod(stat.S_IRWXU)


def test_multi_row_requests_are_labelled_per_row_and_models_without_batching_flag_one_row(tmp_path: Path) -> None:
    config = _config(feedback={"kind": "classification", "output": "probs"}, monitor={"reference_rows": 100})
    with Runtime() as runtime:
        runtime.add_model("m", config, _softmax_model)
        runtime.infer("m", {"x": _rows(3)}, request_id="batch")
        result = runtime.add_feedback("m", [{"id": "batch/0", "label": 0}, {"id": "batch/2", "label": 1}, {"id": "batch", "label": 1}])
        assert (result["joined"], result["unknown"]) == (2, 1)

        unbatched = _config(max_batch_size=0, monitor={"reference_rows": 100})
        unbatched["inputs"][0]["dims"] = [FEATURES]
        runtime.add_model("single", unbatched, lambda inputs: {"probs": _softmax_model({"x": inputs["x"][None]})["probs"][0]})
        out = runtime.infer("single", {"x": _rows(1)[0]})
        assert out["probs"].shape == (2,)
        assert runtime.model("single").monitor.core.collected_rows == 1


def test_monitoring_errors_name_what_to_fix(tmp_path: Path) -> None:
    with Runtime() as runtime:
        with pytest.raises(ConfigError, match=r"\[capture\] needs a directory.*--data-dir"):
            runtime.add_model("m", _config(capture={}), _softmax_model)
        with pytest.raises(ConfigError, match=r"training-data file not found"):
            runtime.add_model("m", _config(monitor={"reference": "missing.parquet"}), _softmax_model, model_dir=tmp_path)
        (tmp_path / "bad.npy").write_bytes(b"not an array")
        with pytest.raises(ConfigError, match=r"bad.npy"):
            runtime.add_model("m", _config(monitor={"reference": "bad.npy"}), _softmax_model, model_dir=tmp_path)
        assert runtime.models() == {}
        runtime.add_model("plain", _config(), _softmax_model)
        with pytest.raises(ModelNotFound, match=r"not monitored.*\[monitor\]"):
            runtime.monitor_document("plain")
        with pytest.raises(InvalidInput, match=r"takes no feedback.*\[feedback\]"):
            runtime.add_feedback("plain", [{"id": "a", "label": 1}])


def test_a_corrupt_saved_reference_is_rebuilt_from_live_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "monitor_reference.npz").write_bytes(b"damaged")
    with Runtime() as runtime:
        runtime.add_model("m", _config(monitor={"reference_rows": 100}), _softmax_model, model_dir=version_dir)
        assert runtime.model("m").monitor.reference is None
    assert "ignoring the saved reference" in caplog.text


def test_capture_keeps_anomalous_rows_and_everything_while_alerting(tmp_path: Path) -> None:
    config = _config(
        monitor={"reference_rows": 100, "evaluate_interval_s": 3600.0},
        capture={"sample_rate": 0.0, "anomalies": True, "alerting": True},
    )
    with Runtime(data_dir=tmp_path) as runtime:
        runtime.add_model("m", config, _softmax_model)
        monitor = runtime.model("m").monitor
        for seed in range(13):  # 104 rows: the reference
            runtime.infer("m", {"x": _rows(8, seed=seed)})
        monitor.tick()
        assert monitor.reference is not None
        runtime.infer("m", {"x": np.zeros((1, FEATURES), np.float32)}, request_id="typical")
        far = np.full((1, FEATURES), 50.0, np.float32)  # outside the reference range: flagged
        runtime.infer("m", {"x": far}, request_id="far")
        batch = np.zeros((3, FEATURES), np.float32)
        batch[2] = np.nan
        runtime.infer("m", {"x": batch}, request_id="batch-with-nan")
        monitor.alerting = True  # as an evaluation that alerts would set it
        runtime.infer("m", {"x": np.zeros((1, FEATURES), np.float32)}, request_id="during-alert")
        monitor.capture.flush()
        table = read_capture(monitor.capture.directory, include_segments=True)
    reasons = dict(zip(table.column("request_id").to_pylist(), table.column("reason").to_pylist()))
    assert reasons == {"far": "anomaly", "batch-with-nan": "anomaly", "during-alert": "alert"}
    assert table.column("request_id").to_pylist().count("batch-with-nan") == 3  # every row of the request


def test_the_core_runtime_needs_a_monitor_factory_for_monitored_configs() -> None:
    from conveyor.runtime import Runtime as CoreRuntime

    with CoreRuntime() as runtime:
        with pytest.raises(ConfigError, match=r"\[monitor\], \[capture\] or \[feedback\].*conveyor\.Runtime"):
            runtime.add_model("m", _config(monitor={}), _softmax_model)
        runtime.add_model("plain", _config(), _softmax_model)  # unmonitored models need nothing
        assert runtime.model("plain").monitor is None
