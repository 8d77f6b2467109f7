"""Generic fixtures: throwaway model repositories and small ONNX models built in memory.

And one run-wide rule: with ``CONVEYOR_EXPECT_CUDA=1`` in the environment (as
bench/device_check.sh sets it), a test marked ``gpu`` that skips fails instead, naming
what was missing, so a GPU run cannot pass while testing nothing.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

EXPECT_CUDA_VARIABLE = "CONVEYOR_EXPECT_CUDA"


def _skip_reason(report: pytest.TestReport) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    if isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Under CONVEYOR_EXPECT_CUDA=1, a gpu test's skip becomes a failure that says why.

    A skip in setup (a skipif mark) then reports as an error, one in the test body
    (pytest.skip, importorskip) as a failure; either fails the run.
    """
    report: pytest.TestReport = yield
    expected = os.environ.get(EXPECT_CUDA_VARIABLE) == "1"
    if expected and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu"):
        report.outcome = "failed"
        report.longrepr = (
            f"{EXPECT_CUDA_VARIABLE}=1, but this gpu test skipped: {_skip_reason(report)}. "
            "Provide what is missing (a build with CONVEYOR_CUDA=ON and cuBLASLt, a visible CUDA device, "
            f"CuPy for the driver's CUDA version), or unset {EXPECT_CUDA_VARIABLE} where no GPU run is meant."
        )
    return report


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
