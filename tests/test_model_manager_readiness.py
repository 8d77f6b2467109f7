"""The model manager tells readiness listeners (the native front ends) every change of the
server's readiness, in order, so that what they answer is what `ready()` answers."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import conveyor
from conveyor.errors import ConveyorError
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime
from conveyor.server.models import ModelManager


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """tiny, and `late`, whose model file is not a graph until a test writes tiny's there."""
    shutil.copytree(conveyor.example_repository() / "tiny", tmp_path / "tiny")
    (tmp_path / "late" / "1").mkdir(parents=True)
    shutil.copy(tmp_path / "tiny" / "config.toml", tmp_path / "late" / "config.toml")
    (tmp_path / "late" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    return tmp_path


@pytest.fixture
def manager(repository: Path) -> Iterator[ModelManager]:
    runtime = Runtime()
    try:
        yield ModelManager(ModelRepository(repository), runtime, "explicit")
    finally:
        runtime.close()


def test_every_change_is_told_in_order_and_matches_ready(manager: ModelManager, repository: Path) -> None:
    told: list[bool] = []

    def listener(ready: bool) -> None:
        assert ready == manager.ready()  # told after the change, never before it
        told.append(ready)

    manager.add_readiness_listener(listener)
    assert told == [True]  # at once: nothing asked for yet
    manager.start(["tiny"])
    assert told == [True, False, True]  # loading (not ready: it serves nothing yet), then serving
    with pytest.raises(ConveyorError):
        manager.load("late")
    assert told[3:] == [False, False] and not manager.ready()  # asked for, and failed
    shutil.copy(repository / "tiny" / "1" / "model.onnx", repository / "late" / "1" / "model.onnx")
    manager.load("late")
    assert told[5:] == [False, True]
    manager.load("tiny")  # a reload: the serving version keeps the server ready throughout
    assert told[7:] == [True, True]
    manager.unload("late")
    assert told[9:] == [True]
    manager.remove_readiness_listener(listener)
    manager.load("late")
    assert len(told) == 10


def test_a_failing_listener_is_logged_and_the_load_stands(
    manager: ModelManager, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[bool] = []

    def failing(ready: bool) -> None:
        calls.append(ready)
        if len(calls) > 1:
            raise RuntimeError("listener broke")

    manager.add_readiness_listener(failing)
    with caplog.at_level(logging.ERROR, logger="conveyor.server.models"):
        manager.start(["tiny"])
    assert manager.ready() and manager.runtime.models() == {"tiny": [1]}
    assert "a readiness listener failed" in caplog.text
