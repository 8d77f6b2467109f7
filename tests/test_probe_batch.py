"""The probe batch at load: a graph model's declared outputs are checked by running it once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import conveyor
from conveyor.errors import ConfigError


def identity_onnx(path: Path) -> None:
    """y = x over FP32[batch, n] (n symbolic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")


def config(output_dims: list[int], input_dims: list[int] | None = None) -> dict:
    return {
        "backend": "onnx", "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": input_dims or [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": output_dims}],
    }  # fmt: skip


def test_outputs_declared_wrong_fail_the_load_with_both_shapes(tmp_path: Path) -> None:
    identity_onnx(tmp_path / "1")
    with conveyor.Runtime() as runtime, pytest.raises(ConfigError) as caught:
        runtime.add_model("m", config([5]), model_dir=tmp_path / "1")
    message = str(caught.value)
    assert "probe batch at load (x FP32 [1, 1])" in message
    assert "output 'y': the config declares FP32 [1, 5], the model returned float32 [1, 1]" in message
    assert "m" not in runtime.models()


def test_outputs_declared_right_load_and_the_probe_is_not_counted(tmp_path: Path) -> None:
    identity_onnx(tmp_path / "1")
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", config([3], input_dims=[3]), model_dir=tmp_path / "1")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(runtime.infer("m", {"x": x})["y"], x)
        assert runtime.model_stats("m")["succeeded"] == 1


def test_a_model_that_cannot_run_the_probe_fails_to_load_and_the_others_serve(tmp_path: Path) -> None:
    # Reshape to [-1, 4]: a row of one value (the variable dim probed as 1) cannot run.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "r", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    root = tmp_path / "models"
    (root / "broken" / "1").mkdir(parents=True)
    onnx.save(model, root / "broken" / "1" / "model.onnx")
    (root / "broken" / "config.toml").write_text('backend = "onnx"\nmax_batch_size = 0\n')
    identity_onnx(root / "fine" / "1")
    (root / "fine" / "config.toml").write_text('backend = "onnx"\nmax_batch_size = 0\n')
    with conveyor.Runtime.from_repository(root) as runtime:
        assert runtime.models() == {"fine": [1]}
    failed = r"the probe batch at load \(x FP32 \[1, 1\], all zeros\) failed"
    with conveyor.Runtime() as runtime, pytest.raises(ConfigError, match=failed):
        runtime.add_model("broken", {"backend": "onnx", "max_batch_size": 0}, model_dir=root / "broken" / "1")
