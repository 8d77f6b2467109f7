"""The interface every backend implements: execute one whole batch."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from conveyor.config import ModelConfig
from conveyor.errors import ConveyorError, InvalidInput, ModelExecutionError, Unavailable


class Backend(abc.ABC):
    """Runs one version of one model, a whole batch per call.

    Inputs and outputs are positional, in the config's order; the batch dimension
    leads when `config.max_batch_size > 0`. The caller (the batcher) has already
    checked each input's dtype and shape against the config.
    """

    kind: ClassVar[str]
    # True: one backend object may run `execute` on several instance threads at
    # once. False: the runtime creates one backend per instance instead.
    thread_safe: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, version: int | None) -> None:
        self.config = config
        self.version = version
        self.input_names = [tensor.name for tensor in config.inputs]
        self.output_names = [tensor.name for tensor in config.outputs]
        self.closed = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def label(self) -> str:
        """How error messages name this model version."""
        if self.version is None:
            return f"model '{self.name}'"
        return f"model '{self.name}' version {self.version}"

    @abc.abstractmethod
    def execute(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one batch; outputs in config order. Raises ModelExecutionError."""

    def close(self) -> None:
        """Release the model; later `execute` calls raise Unavailable."""
        self.closed = True

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_callable(self, inputs: list[np.ndarray]) -> None:
        if self.closed:
            raise Unavailable(f"{self.label} is closed")
        if len(inputs) != len(self.input_names):
            raise InvalidInput(
                f"{self.label}: expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                f"got {len(inputs)}"
            )


class CoreExecutorBackend(Backend):
    """A backend whose batches run in C++: `native_executor` (a NativeGraph, TreeEnsemble or
    TorchModel) is what the runtime hands the batcher, so batches take no GIL; `execute`
    runs the same object from Python, for callers outside the batcher (the probe at load)."""

    native_executor: Any = None

    def _arrays(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The inputs as the C++ object takes them (default: contiguous float32)."""
        return [np.ascontiguousarray(x, dtype=np.float32) for x in inputs]

    def execute(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self._check_callable(inputs)
        executor = self.native_executor
        if executor is None:
            raise Unavailable(f"{self.label} is closed")
        try:
            return executor.run(self._arrays(inputs))
        except ConveyorError:  # the core's own errors (InvalidInput for a bad batch) keep their type
            raise
        except Exception as exc:
            raise ModelExecutionError(f"{self.label}: {exc}") from exc

    def close(self) -> None:
        # The batcher holds its own reference to the executor while it drains.
        self.native_executor = None
        super().close()


def version_of(version_dir: Path) -> int | None:
    """The version number a repository version directory stands for."""
    return int(version_dir.name) if version_dir.name.isdigit() else None
