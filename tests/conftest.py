"""Generic fixtures: throwaway model repositories and small ONNX models built in memory."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

ELEMENT_TYPES = {"FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE, "INT64": TensorProto.INT64}


def build_add_one_onnx(
    width: int = 4,
    *,
    datatype: str = "FP32",
    batch_dim: str | int = "batch",
    input_name: str = "x",
    output_name: str = "y",
) -> bytes:
    """An ONNX model computing y = x + 1 over [batch_dim, width]."""
    element_type = ELEMENT_TYPES[datatype]
    one = numpy_helper.from_array(
        np.ones((1, width), dtype=helper.tensor_dtype_to_np_dtype(element_type)), "one"
    )
    graph = helper.make_graph(
        [helper.make_node("Add", [input_name, "one"], [output_name])],
        "add_one",
        [helper.make_tensor_value_info(input_name, element_type, [batch_dim, width])],
        [helper.make_tensor_value_info(output_name, element_type, [batch_dim, width])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(deterministic=True)


class RepositoryBuilder:
    """Writes models into a temporary repository: config text plus version files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, name: str, config: str | None, versions: dict[str, dict[str, bytes | str]] | None = None) -> Path:
        """`versions` maps a version dir name to {file name: contents}; returns the model dir."""
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (model_dir / "config.toml").write_text(textwrap.dedent(config))
        for version, files in (versions or {}).items():
            version_dir = model_dir / version
            version_dir.mkdir(exist_ok=True)
            for file_name, contents in files.items():
                path = version_dir / file_name
                if isinstance(contents, bytes):
                    path.write_bytes(contents)
                else:
                    path.write_text(textwrap.dedent(contents))
        return model_dir


@pytest.fixture
def repository_builder(tmp_path: Path) -> RepositoryBuilder:
    root = tmp_path / "models"
    root.mkdir()
    return RepositoryBuilder(root)


@pytest.fixture
def add_one_onnx() -> Callable[..., bytes]:
    return build_add_one_onnx
