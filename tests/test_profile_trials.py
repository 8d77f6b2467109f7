"""Profile trials: knobs applied to a model's config, the worker's time limit and crash handling, one real trial."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conveyor.config import parse_model_config
from conveyor.profile.profile_trials import (
    MemorySampler,
    TrialCrashed,
    TrialFailed,
    TrialRunner,
    TrialSettings,
    TrialTimeout,
    TrialWorker,
    apply_knobs,
    cost_model_from,
    describe_model,
    model_config_for,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
KNOBS = {"backend": "native", "device": "cpu", "max_batch_size": 32, "max_queue_delay_us": 500,
         "preferred_batch_sizes": "half", "instance_count": 2, "threads": 1, "inter_op_threads": 1,
         "pinning": "none"}  # fmt: skip


def test_describe_model_finds_which_backends_run_it() -> None:
    mlp = describe_model(EXAMPLES, "mlp")
    assert mlp.backends == ("onnx", "native") and mlp.version == 1 and mlp.max_batch_size == 64
    assert mlp.file_data["backend"] == "onnx" and "inputs" in mlp.config_data


def test_knobs_land_in_the_config_fields_the_runtime_reads() -> None:
    model = describe_model(EXAMPLES, "image_classifier")
    config = model_config_for(model, KNOBS)
    assert config.backend == "native" and config.max_batch_size == 32 and config.native.threads == 1
    assert config.dynamic_batching.max_queue_delay_us == 500 and config.dynamic_batching.preferred_batch_sizes == [16]
    assert config.instance_group.count == 2 and config.preprocess and config.postprocess
    onnx = model_config_for(model, KNOBS | {"backend": "onnx", "threads": 2, "inter_op_threads": 2})
    assert onnx.onnx.intra_op_threads == 2 and onnx.onnx.inter_op_threads == 2
    assert model_config_for(model, {}).max_batch_size == 64  # {}: the model as configured
    written = apply_knobs(model.file_data, KNOBS)
    assert parse_model_config(written, source="test", name="image_classifier").instance_group.count == 2
    assert "inputs" in written and model.file_data["instance_group"]["count"] == 1  # the original is untouched


def test_a_model_that_does_not_batch_keeps_max_batch_size_zero() -> None:
    data = {"name": "m", "backend": "python", "max_batch_size": 0,
            "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}]}  # fmt: skip
    written = apply_knobs(
        data,
        KNOBS | {"backend": "python", "max_batch_size": 0, "max_queue_delay_us": 0},
    )
    config = parse_model_config(written, source="test", name="m")
    assert config.max_batch_size == 0 and config.dynamic_batching.max_queue_delay_us == 0


def test_the_worker_answers_records_errors_and_survives_hangs_and_crashes() -> None:
    worker = TrialWorker()
    try:
        assert worker.call(os.path.join, ("a", "b"), 60) == "a/b"
        with pytest.raises(TrialFailed, match="ValueError: invalid literal"):
            worker.call(int, ("not a number",), 60)
        with pytest.raises(TrialTimeout, match="did not finish within 0.5 s"):
            worker.call(time.sleep, (3600,), 0.5)
        assert worker.call(os.path.join, ("c", "d"), 60) == "c/d"  # a new worker took over
        with pytest.raises(TrialCrashed, match="exit status 3"):
            worker.call(os._exit, (3,), 60)
        assert worker.call(abs, (-2,), 60) == 2
    finally:
        worker.close()


def test_pinning_is_written_into_the_config() -> None:
    model = describe_model(EXAMPLES, "image_classifier")
    for pinning in ("cores", "none"):
        written = apply_knobs(model.file_data, {**KNOBS, "pinning": pinning})
        config = parse_model_config(written, source="test", name="image_classifier")
        assert config.instance_group.cpu_pinning == pinning


def test_the_memory_sampler_sees_the_resident_set_grow() -> None:
    with MemorySampler() as memory:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, every page touched
    assert memory.growth_mb >= 60
    del block


def test_cost_model_rows_become_a_cost_model() -> None:
    model = cost_model_from([["onnx", "cpu", 1, 1, 0.001], ["onnx", "cpu", 1, 8, 0.002]], 10.0, 2)
    assert model.batch_seconds("onnx", "cpu", 1, 8) == 0.002 and model.slo_p99_s == 0.01


def test_a_real_trial_and_calibration_in_the_worker_and_a_timeout_recorded() -> None:
    """One short trial of the example mlp end to end: capacity, p99 and memory recorded; a hung one is skipped."""
    model = describe_model(EXAMPLES, "mlp")
    settings = TrialSettings(slo_p99_ms=20.0, probe_duration_s=0.05, min_queries=50, warmup_s=0.02, max_probes=8,
                             samples=4, precision=0.25)  # fmt: skip
    runner = TrialRunner(model, settings)
    try:
        rows = runner.calibrate([("onnx", "cpu", 1)], 4)
        assert [row[:4] for row in rows] == [
            ["onnx", "cpu", 1, 1],
            ["onnx", "cpu", 1, 2],
            ["onnx", "cpu", 1, 4],
        ]
        assert all(row[4] > 0 for row in rows)
        record = runner.run(
            KNOBS | {"backend": "onnx", "max_batch_size": 8, "instance_count": 1},
            1,
            200.0,
        )
        assert record.status == "ok", record.error
        assert record.capacity_qps > 0 and record.p99_ms <= 20.0 and record.probes >= 2
        assert record.memory_mb is not None and record.pool_reserved_mb is not None and record.seconds > 0
        runner.settings = TrialSettings(slo_p99_ms=20.0, timeout_s=0.001)
        hung = runner.run(KNOBS, 2, None)
        assert hung.status == "timed out" and "did not finish" in hung.error and hung.score == 0.0
    finally:
        runner.close()
