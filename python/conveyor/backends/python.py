"""Models written in Python: a `Model` class in model.py, or an in-process callable.

Both receive a whole batch as `{input name: array}` and return `{output name: array}`;
what they return is checked against the config before it reaches any request. A
model.py written for Triton's python backend (a `TritonPythonModel` class) runs too,
through `TritonModelAdapter` (triton_python.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from conveyor.backends.base import Backend
from conveyor.backends.triton_python import (
    TRITON_MODEL_CLASS,
    UTILS_MODULE,
    TritonModelAdapter,
    install_utils_module,
)
from conveyor.config import ModelConfig, TensorConfig
from conveyor.errors import ConfigError, ModelExecutionError

logger = logging.getLogger(__name__)

ModelFunction = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]
_Result = TypeVar("_Result")

# Makes module names unique across reloads of the same model version.
_module_serial = itertools.count(1)


class _UserCodeBackend(Backend):
    """Calls user code on a named batch and validates what it returns."""

    def __init__(self, config: ModelConfig, version: int | None) -> None:
        for tensor in config.inputs + config.outputs:
            if tensor.datatype == "BF16":
                raise ConfigError(
                    f"model '{config.name}': tensor '{tensor.name}': expected a datatype numpy can hold, "
                    "got BF16 (python models cannot use it)"
                )
        super().__init__(config, version)
        # What an answer usually is, checked in one pass per batch (`_expected_arrays`): per
        # output its name, dtype and per-row shape; None where a dimension is variable (-1),
        # which leaves that model to the full check.
        self._expected: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] | None = tuple(
            (tensor.name, tensor.numpy_dtype, tuple(tensor.dims)) for tensor in config.outputs
        )
        if any(dim in (-1, None) for tensor in config.outputs for dim in tensor.dims):
            self._expected = None
        self._batches = config.max_batch_size > 0

    def _run_batch(self, execute: ModelFunction, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.closed or len(inputs) != len(self.input_names):
            self._check_callable(inputs)
        result = self._call_user(execute, dict(zip(self.input_names, inputs)))
        batch_size = inputs[0].shape[0] if self._batches and inputs and inputs[0].ndim else None
        return self._expected_arrays(result, batch_size) or self._collect_outputs(result, batch_size)

    def _expected_arrays(self, result: object, batch_size: int | None) -> list[np.ndarray] | None:
        """The outputs in config order when `result` is exactly what the config says (a dict
        of the output names to arrays of their dtypes and shapes); else None, and
        `_collect_outputs` converts it or says what is wrong. On a 2-vCPU machine this takes
        about 1.7 us a batch where the full check takes about 10; an idle round trip through
        a Python model pays it once."""
        expected = self._expected
        if expected is None or type(result) is not dict or len(result) != len(expected):
            return None
        arrays = []
        for name, dtype, dims in expected:
            array = result.get(name)
            if type(array) is not np.ndarray or array.dtype != dtype:
                return None
            shape = array.shape
            if batch_size is None:
                if shape != dims:
                    return None
            elif len(shape) != len(dims) + 1 or shape[0] != batch_size or shape[1:] != dims:
                return None
            arrays.append(array)
        return arrays

    def _call_user(self, function: Callable[..., _Result], *args: Any, context: str = "") -> _Result:
        try:
            return function(*args)
        except Exception as exc:
            raise ModelExecutionError(f"{self.label} raised {type(exc).__name__}: {exc}{context}") from exc

    def _collect_outputs(self, result: object, batch_size: int | None) -> list[np.ndarray]:
        if not isinstance(result, Mapping):
            raise ModelExecutionError(
                f"{self.label}: expected execute to return a dict of output name -> array, "
                f"got {type(result).__name__}"
            )
        missing = [name for name in self.output_names if name not in result]
        unknown = [str(name) for name in result if name not in self.output_names]
        if missing or unknown:
            problems = [f"missing output '{name}'" for name in missing]
            problems += [f"unknown output '{name}'" for name in unknown]
            raise ModelExecutionError(
                f"{self.label}: {'; '.join(problems)} (expected outputs: {', '.join(self.output_names)})"
            )
        return [self._checked_output(tensor, result[tensor.name], batch_size) for tensor in self.config.outputs]

    def _checked_output(self, tensor: TensorConfig, value: Any, batch_size: int | None) -> np.ndarray:
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and objects numpy cannot hold
            raise ModelExecutionError(f"{self.label}: output '{tensor.name}' is not an array: {exc}") from exc
        expected_dtype = tensor.numpy_dtype
        if tensor.datatype == "BYTES" and array.dtype.kind in "SU":
            array = array.astype(object)
        if array.dtype != expected_dtype:
            raise ModelExecutionError(
                f"{self.label}: output '{tensor.name}': expected dtype {tensor.datatype} ({expected_dtype}), "
                f"got {array.dtype}"
            )
        expected_shape = ([batch_size] if self.max_batch_size > 0 else []) + list(tensor.dims)
        matches = array.ndim == len(expected_shape) and all(
            want in (-1, None, got) for want, got in zip(expected_shape, array.shape)
        )
        if not matches:
            rendered = ", ".join("-1" if want in (-1, None) else str(want) for want in expected_shape)
            legend = "the batch size first, -1 = any" if self.max_batch_size > 0 else "-1 = any"
            raise ModelExecutionError(
                f"{self.label}: output '{tensor.name}': expected shape [{rendered}] ({legend}), "
                f"got {list(array.shape)}"
            )
        return array


class PythonBackend(_UserCodeBackend):
    """Loads `Model` from model.py in a version directory.

    The class is built as `Model(config)` when its constructor takes an argument,
    else `Model()`; then `initialize(config)` runs if defined, and `finalize()` on close.
    """

    kind = "python"

    def __init__(self, config: ModelConfig, model_path: Path, *, version: int | None = None) -> None:
        super().__init__(config, version)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(f"{self.model_path}: no such model file")
        # A name of its own, so versions of one model and models sharing a name in
        # different repositories never replace each other's module.
        safe_name = re.sub(r"\W", "_", self.name)
        self._module_name = f"_conveyor_model_{safe_name}_v{self.version}_{next(_module_serial)}"
        try:
            self._model = self._load(config)
        except BaseException:
            sys.modules.pop(self._module_name, None)
            raise
        logger.debug("%s: loaded %s", self.label, self.model_path)

    def _load(self, config: ModelConfig) -> Any:
        spec = importlib.util.spec_from_file_location(self._module_name, self.model_path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{self.model_path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        # Registered until close because dataclasses and pickling look a class's
        # module up by name.
        sys.modules[self._module_name] = module
        if _imports_triton_utils(self.model_path):
            install_utils_module()
        self._call_user(spec.loader.exec_module, module, context=f" while importing {self.model_path}")
        loading = f" while loading {self.model_path}"
        model_class = getattr(module, "Model", None)
        triton_class = getattr(module, TRITON_MODEL_CLASS, None)
        if not inspect.isclass(model_class) and inspect.isclass(triton_class):
            if not callable(getattr(triton_class, "execute", None)):
                raise ConfigError(f"{self.model_path}: class '{TRITON_MODEL_CLASS}' has no execute(requests) method")
            return self._call_user(TritonModelAdapter, triton_class, config, self.model_path, self.version,
                                   context=loading)  # fmt: skip
        if not inspect.isclass(model_class):
            raise ConfigError(
                f"{self.model_path}: expected a class named 'Model' (or Triton's '{TRITON_MODEL_CLASS}'), found none"
            )
        if not callable(getattr(model_class, "execute", None)):
            raise ConfigError(f"{self.model_path}: class 'Model' has no execute(inputs) method")
        model = self._call_user(_instantiate, model_class, config, context=loading)
        initialize = getattr(model, "initialize", None)
        if callable(initialize):
            self._call_user(initialize, config, context=loading)
        return model

    def execute(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self._run_batch(self._model.execute, inputs)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        sys.modules.pop(self._module_name, None)
        finalize = getattr(self._model, "finalize", None)
        if callable(finalize):
            self._call_user(finalize, context=" while closing")


class CallableBackend(_UserCodeBackend):
    """Wraps an in-process function `fn(inputs: dict) -> dict` over a whole batch."""

    kind = "python"

    def __init__(self, config: ModelConfig, fn: ModelFunction, *, version: int | None = None) -> None:
        if not callable(fn):
            raise ConfigError(f"model '{config.name}': expected a callable, got {type(fn).__name__}")
        super().__init__(config, version)
        self.fn = fn

    def execute(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self._run_batch(self.fn, inputs)


def _imports_triton_utils(path: Path) -> bool:
    """Whether a model.py names Triton's utility module (then Conveyor's subset is installed under its name)."""
    try:
        return UTILS_MODULE in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _instantiate(model_class: type, config: ModelConfig) -> Any:
    try:
        parameters = inspect.signature(model_class).parameters.values()
    except (TypeError, ValueError):  # a signature inspect cannot read: assume none
        return model_class()
    positional = {
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    }
    takes_config = any(parameter.kind in positional for parameter in parameters)
    return model_class(config) if takes_config else model_class()
