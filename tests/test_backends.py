from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conveyor.backends import (
    CallableBackend,
    OnnxBackend,
    PythonBackend,
    create_backend,
    fill_config_from_onnx,
)
from conveyor.config import ModelConfig, parse_model_config
from conveyor.errors import ConfigError, InvalidInput, ModelExecutionError, Unavailable


def make_config(
    backend: str = "onnx",
    *,
    max_batch_size: int = 8,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> ModelConfig:
    data: dict[str, Any] = {"backend": backend, "max_batch_size": max_batch_size, **fields}
    if inputs is not None:
        data["inputs"] = inputs
    if outputs is not None:
        data["outputs"] = outputs
    return parse_model_config(data, source="test", name="m")


def tensor(name: str, dims: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "dims": dims}


def write_file(directory: Path, name: str, contents: bytes | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(contents) if isinstance(contents, bytes) else path.write_text(contents)
    return path


def build_dense_softmax_onnx(fan_in: int = 8, fan_out: int = 5) -> bytes:
    """x [batch, fan_in] -> Gemm -> Relu -> Softmax -> probs [batch, fan_out], seeded weights."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
    bias = rng.standard_normal(fan_out).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Softmax", ["a"], ["probs"], axis=-1),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", fan_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", fan_out])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


# --- onnx ---------------------------------------------------------------------------


def test_onnx_batch_equals_rows_run_alone(tmp_path: Path) -> None:
    write_file(tmp_path / "1", "model.onnx", build_dense_softmax_onnx())
    config = make_config(inputs=[tensor("x", [8])], outputs=[tensor("probs", [5])])
    batch = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    with create_backend(config, tmp_path / "1") as backend:
        assert isinstance(backend, OnnxBackend)
        assert backend.version == 1 and backend.thread_safe
        assert backend.providers == ["CPUExecutionProvider"]
        (probs,) = backend.execute([batch])
        rows = np.concatenate([backend.execute([batch[i : i + 1]])[0] for i in range(len(batch))])
    assert probs.shape == (6, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, rows, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_onnx_without_batching_uses_full_shapes(tmp_path: Path, add_one_onnx: Callable[..., bytes]) -> None:
    path = write_file(tmp_path, "model.onnx", add_one_onnx(4, batch_dim=2))
    config = make_config(max_batch_size=0, inputs=[tensor("x", [2, 4])], outputs=[tensor("y", [2, 4])])
    backend = OnnxBackend(config, path)
    (y,) = backend.execute([np.zeros((2, 4), np.float32)])
    np.testing.assert_array_equal(y, np.ones((2, 4), np.float32))


def test_onnx_fills_omitted_tensors(tmp_path: Path, add_one_onnx: Callable[..., bytes]) -> None:
    path = write_file(tmp_path, "model.onnx", add_one_onnx(4))
    filled = fill_config_from_onnx(make_config(), path)
    assert filled.inputs[0].model_dump(exclude_none=True) == tensor("x", [4])
    assert filled.outputs[0].model_dump(exclude_none=True) == tensor("y", [4])
    assert fill_config_from_onnx(filled, path) is filled
    # The backend completes a config on its own too.
    assert OnnxBackend(make_config(), path).config.inputs == filled.inputs
    unbatched = fill_config_from_onnx(make_config(max_batch_size=0), path)
    assert unbatched.inputs[0].dims == [-1, 4]


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (
            [tensor("x", [4], "FP64")],
            [tensor("y", [4])],
            "input 'x': expected datatype FP32 (the model's), got FP64 (the config's)",
        ),
        ([tensor("x", [5])], [tensor("y", [4])], "input 'x': expected dims [4] (the model's, -1 = variable), got [5]"),
        ([tensor("x", [-1])], [tensor("y", [4])], "input 'x': expected dims [4]"),
        ([tensor("x", [4, 1])], [tensor("y", [4])], "input 'x': expected dims [4]"),
        ([tensor("x", [4]), tensor("z", [4])], [tensor("y", [4])], "input 'z': expected one of the model's inputs (x)"),
        ([tensor("x", [4])], [tensor("probs", [4])], "output 'probs': expected one of the model's outputs (y)"),
        ([tensor("x", [4])], [tensor("y", [4], "INT64")], "output 'y': expected datatype FP32"),
    ],
)
def test_onnx_config_mismatch_names_tensor(
    tmp_path: Path, add_one_onnx: Callable[..., bytes], inputs: list, outputs: list, message: str
) -> None:
    path = write_file(tmp_path, "model.onnx", add_one_onnx(4))
    with pytest.raises(ConfigError) as caught:
        OnnxBackend(make_config(inputs=inputs, outputs=outputs), path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_onnx_model_input_missing_from_config(tmp_path: Path) -> None:
    two_inputs = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(two_inputs, opset_imports=[helper.make_opsetid("", 17)])
    path = write_file(tmp_path, "model.onnx", model.SerializeToString())
    with pytest.raises(ConfigError, match="the model's input 'b' is missing from the config's inputs"):
        OnnxBackend(make_config(inputs=[tensor("a", [2])], outputs=[tensor("c", [2])]), path)


def test_onnx_fixed_batch_dim_needs_max_batch_size_zero(
    tmp_path: Path, add_one_onnx: Callable[..., bytes]
) -> None:
    path = write_file(tmp_path, "model.onnx", add_one_onnx(4, batch_dim=1))
    with pytest.raises(ConfigError, match=r"input 'x': expected a variable first \(batch\) dim .* got shape \[1, 4\]"):
        OnnxBackend(make_config(inputs=[tensor("x", [4])], outputs=[tensor("y", [4])]), path)
    with pytest.raises(ConfigError, match="input 'x': expected a variable first"):
        fill_config_from_onnx(make_config(), path)


def test_onnx_unreadable_model_and_missing_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, "model.onnx", b"not a model")
    with pytest.raises(ConfigError, match="onnxruntime cannot load it"):
        OnnxBackend(make_config(), path)
    with pytest.raises(ConfigError, match="no such model file"):
        OnnxBackend(make_config(), tmp_path / "absent.onnx")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu present")
def test_onnx_cuda_without_onnxruntime_gpu(tmp_path: Path, add_one_onnx: Callable[..., bytes]) -> None:
    path = write_file(tmp_path, "model.onnx", add_one_onnx(4))
    config = make_config(instance_group={"device": "cuda:0"})
    with pytest.raises(ConfigError, match="'cuda:0' needs onnxruntime-gpu"):
        OnnxBackend(config, path)


def test_onnx_runtime_errors_become_model_execution_errors(
    tmp_path: Path, add_one_onnx: Callable[..., bytes]
) -> None:
    backend = OnnxBackend(make_config(), write_file(tmp_path, "model.onnx", add_one_onnx(4)))
    with pytest.raises(ModelExecutionError, match=r"model 'm': onnxruntime: .*INVALID_ARGUMENT") as caught:
        backend.execute([np.zeros((2, 4), np.float64)])
    assert caught.value.__cause__ is not None
    with pytest.raises(InvalidInput, match="expected 1 inputs"):
        backend.execute([])
    backend.close()
    with pytest.raises(Unavailable, match="closed"):
        backend.execute([np.zeros((2, 4), np.float32)])


# --- python ---------------------------------------------------------------------------

SCALE_MODEL = """
import numpy as np

class Model:
    def __init__(self, config):
        self.factor = np.float32(config.parameters["factor"])
        self.events = []

    def initialize(self, config):
        self.events.append("initialize")

    def execute(self, inputs):
        return {"y": inputs["x"] * self.factor}

    def finalize(self):
        with open(self.marker, "w") as file:
            file.write("finalized")

    marker = MARKER
"""

PYTHON_TENSORS = {"inputs": [tensor("x", [3])], "outputs": [tensor("y", [3])]}


def python_config(**fields: Any) -> ModelConfig:
    return make_config("python", **PYTHON_TENSORS, **fields)


def test_python_model_from_file(tmp_path: Path) -> None:
    marker = tmp_path / "finalized.txt"
    write_file(tmp_path / "2", "model.py", SCALE_MODEL.replace("MARKER", repr(str(marker))))
    backend = create_backend(python_config(parameters={"factor": 2.0}), tmp_path / "2")
    assert isinstance(backend, PythonBackend) and backend.version == 2
    (y,) = backend.execute([np.ones((4, 3), np.float32)])
    np.testing.assert_array_equal(y, np.full((4, 3), 2.0, np.float32))
    module_names = [name for name in sys.modules if name.startswith("_conveyor_model_m_v2_")]
    assert len(module_names) == 1
    backend.close()
    assert marker.read_text() == "finalized"
    assert module_names[0] not in sys.modules
    backend.close()  # a second close does nothing


def test_python_model_without_config_argument(tmp_path: Path) -> None:
    source = "class Model:\n    def execute(self, inputs):\n        return {'y': inputs['x'] + 1}\n"
    backend = PythonBackend(python_config(), write_file(tmp_path, "model.py", source))
    (y,) = backend.execute([np.zeros((1, 3), np.float32)])
    np.testing.assert_array_equal(y, np.ones((1, 3), np.float32))


def test_two_versions_load_as_separate_modules(tmp_path: Path) -> None:
    template = "class Model:\n    def execute(self, inputs):\n        return {{'y': inputs['x'] + {}}}\n"
    first = create_backend(python_config(), write_file(tmp_path / "1", "model.py", template.format(1)).parent)
    second = create_backend(python_config(), write_file(tmp_path / "2", "model.py", template.format(2)).parent)
    batch = [np.zeros((1, 3), np.float32)]
    assert first.execute(batch)[0][0, 0] == 1 and second.execute(batch)[0][0, 0] == 2


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        ("x = 1\n", ConfigError, "expected a class named 'Model' (or Triton's 'TritonPythonModel'), found none"),
        ("class Model:\n    pass\n", ConfigError, "class 'Model' has no execute(inputs) method"),
        ("import no_such_module_anywhere\n", ModelExecutionError, "raised ModuleNotFoundError"),
        ("def broken(:\n", ModelExecutionError, "raised SyntaxError"),
        (
            "class Model:\n    def __init__(self, config):\n        raise ValueError('bad parameter')\n"
            "    def execute(self, inputs):\n        return {}\n",
            ModelExecutionError,
            "model 'm' version 1 raised ValueError: bad parameter while loading",
        ),
    ],
)
def test_python_model_load_errors_name_the_file(tmp_path: Path, source: str, error: type, message: str) -> None:
    path = write_file(tmp_path / "1", "model.py", source)
    before = set(sys.modules)
    with pytest.raises(error) as caught:
        create_backend(python_config(), path.parent)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert set(sys.modules) == before


def test_python_model_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such model file"):
        create_backend(python_config(), tmp_path / "1")


def test_create_backend_needs_a_source() -> None:
    with pytest.raises(ConfigError, match="expected a version directory or a callable"):
        create_backend(python_config(), None)


def test_callable_backend() -> None:
    seen: list[dict[str, np.ndarray]] = []

    def double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs)
        return {"y": inputs["x"] * 2}

    backend = create_backend(python_config(), None, fn=double)
    assert isinstance(backend, CallableBackend) and backend.version is None
    batch = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = backend.execute([batch])
    np.testing.assert_array_equal(y, batch * 2)
    assert list(seen[0]) == ["x"] and seen[0]["x"] is batch


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1, 2], "expected execute to return a dict of output name -> array, got list"),
        ({}, "missing output 'y' (expected outputs: y)"),
        ({"y": np.zeros((2, 3), np.float32), "z": 1}, "unknown output 'z' (expected outputs: y)"),
        ({"y": np.zeros((2, 3), np.float64)}, "output 'y': expected dtype FP32 (float32), got float64"),
        ({"y": np.zeros((3, 3), np.float32)}, "output 'y': expected shape [2, 3] (the batch size first, -1 = any), got [3, 3]"),
        ({"y": np.zeros((2, 4), np.float32)}, "output 'y': expected shape [2, 3]"),
        ({"y": np.zeros(3, np.float32)}, "output 'y': expected shape [2, 3]"),
        ({"y": [[1.0], [1.0, 2.0]]}, "output 'y' is not an array"),
    ],
)
def test_outputs_are_validated(result: object, message: str) -> None:
    backend = CallableBackend(python_config(), lambda inputs: result)
    with pytest.raises(ModelExecutionError) as caught:
        backend.execute([np.zeros((2, 3), np.float32)])
    assert str(caught.value).startswith("model 'm': ")
    assert message in str(caught.value)


def test_variable_dims_and_bytes_outputs() -> None:
    config = make_config(
        "python",
        max_batch_size=0,
        inputs=[tensor("x", [-1])],
        outputs=[tensor("n", [-1], "INT64"), tensor("text", [-1], "BYTES")],
    )

    def describe(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        count = len(inputs["x"])
        return {"n": np.arange(count, dtype=np.int64), "text": ["row"] * count}

    n, text = CallableBackend(config, describe).execute([np.zeros(5, np.float32)])
    assert n.tolist() == [0, 1, 2, 3, 4]
    assert text.dtype == object and text.tolist() == ["row"] * 5


def test_user_exceptions_are_wrapped_with_cause() -> None:
    problem = ValueError("negative input")

    def fails(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise problem

    backend = CallableBackend(python_config(), fails)
    with pytest.raises(ModelExecutionError, match=r"^model 'm' raised ValueError: negative input$") as caught:
        backend.execute([np.zeros((1, 3), np.float32)])
    assert caught.value.__cause__ is problem


def test_python_models_cannot_use_bf16() -> None:
    config = make_config("python", inputs=[tensor("x", [3], "BF16")], outputs=[tensor("y", [3])])
    with pytest.raises(ConfigError, match="tensor 'x': expected a datatype numpy can hold, got BF16"):
        CallableBackend(config, lambda inputs: inputs)


def test_callable_backend_needs_a_callable() -> None:
    with pytest.raises(ConfigError, match="expected a callable, got int"):
        CallableBackend(python_config(), 3)  # type: ignore[arg-type]
