"""The part of Triton's `triton_python_backend_utils` that Conveyor provides.

A Triton python-backend model (model.py with a `TritonPythonModel` class) imports this
module as `triton_python_backend_utils` (conveyor.backends.triton_python installs the
alias). What it offers: `Tensor`, `InferenceRequest` and `InferenceResponse` as the
model sees them, `TritonError`, `Logger`, the config helpers
(`get_input_config_by_name`, `get_output_config_by_name`, `triton_string_to_numpy`,
`numpy_to_triton_type`) and `get_input_tensor_by_name` / `get_output_tensor_by_name`.

What it refuses, with a TritonError saying so: calls to other models from inside a
model (BLS: `InferenceRequest.exec`, `async_exec`, `stream_exec`), decoupled response
senders, and DLPack tensors on a device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "InferenceRequest",
    "InferenceResponse",
    "Logger",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "numpy_to_triton_type",
    "triton_string_to_numpy",
]

_log = logging.getLogger("conveyor.triton_python_model")

_NUMPY_BY_TRITON_TYPE = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}  # fmt: skip
# Triton's TRITONSERVER_DataType numbers, which numpy_to_triton_type returns.
_TRITON_TYPE_NUMBERS = {
    np.bool_: 1, np.uint8: 2, np.uint16: 3, np.uint32: 4, np.uint64: 5, np.int8: 6, np.int16: 7, np.int32: 8,
    np.int64: 9, np.float16: 10, np.float32: 11, np.float64: 12, np.object_: 13, np.bytes_: 13,
}  # fmt: skip

_BLS_REFUSED = (
    "calling another model from inside a model (BLS) is not supported by Conveyor: serve the steps as "
    "separate models and call them from the client, or move the logic into this model"
)


class TritonError(Exception):
    """An error a model returns in an InferenceResponse or raises; `code()` is one of the class constants."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = UNKNOWN) -> None:
        super().__init__(message)
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(TritonError):
    """What Triton raises to a model for a failed call; kept for models that catch it."""


class Tensor:
    """A named array, as a Triton python model reads its inputs and writes its outputs."""

    def __init__(self, name: str, data: Any) -> None:
        array = np.asarray(data)
        if array.dtype.kind in "SU":  # Triton's BYTES tensors are numpy object arrays of bytes
            array = array.astype(np.object_)
        self._name = str(name)
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> Tensor:
        """A tensor from an object with `__dlpack__` (a CPU array); device tensors are refused."""
        try:
            return cls(name, np.from_dlpack(capsule))
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TritonError(
                f"tensor '{name}': only CPU DLPack tensors with __dlpack__ are supported by Conveyor ({exc})",
                TritonError.UNSUPPORTED,
            ) from exc


class InferenceRequest:
    """The requests `execute` receives. Conveyor hands a model one request per batch, its
    inputs holding every row of the batch (the requests' rows concatenated).

    Built by a model to call another model (BLS), it cannot be executed: `exec` raises.
    """

    def __init__(
        self, model_name: str = "", inputs: Iterable[Tensor] = (), requested_output_names: Iterable[str] = (),
        request_id: str = "", correlation_id: int = 0, flags: int = 0, timeout: int = 0,
        parameters: Mapping[str, Any] | str | None = None, **_: Any,
    ) -> None:  # fmt: skip
        self._model_name = model_name
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(dict(parameters or {}))

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested)

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON object text."""
        return self._parameters

    def model_name(self) -> str:
        return self._model_name

    def is_cancelled(self) -> bool:
        return False

    def exec(self, *_: Any, **__: Any) -> InferenceResponse:
        raise TritonError(_BLS_REFUSED, TritonError.UNSUPPORTED)

    def async_exec(self, *_: Any, **__: Any) -> Any:
        raise TritonError(_BLS_REFUSED, TritonError.UNSUPPORTED)

    def stream_exec(self, *_: Any, **__: Any) -> Any:
        raise TritonError(_BLS_REFUSED, TritonError.UNSUPPORTED)

    def get_response_sender(self) -> Any:
        raise TritonError(
            "decoupled models (response senders) are not supported by Conveyor: return one "
            "InferenceResponse per request from execute",
            TritonError.UNSUPPORTED,
        )


class InferenceResponse:
    """What `execute` returns per request: output tensors, or an error."""

    def __init__(
        self, output_tensors: Iterable[Tensor] = (), error: TritonError | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self._outputs = list(output_tensors or ())
        self._error = error
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Logger:
    """Triton's model logger, writing to Conveyor's log (logger conveyor.triton_python_model)."""

    @staticmethod
    def log_info(message: str) -> None:
        _log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug("%s", message)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((tensor for tensor in request.inputs() if tensor.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((tensor for tensor in response.output_tensors() if tensor.name() == name), None)


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The input's entry of the model config (`json.loads(args["model_config"])`), or None."""
    return next((dict(entry) for entry in model_config.get("input", ()) if entry.get("name") == name), None)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The output's entry of the model config (`json.loads(args["model_config"])`), or None."""
    return next((dict(entry) for entry in model_config.get("output", ()) if entry.get("name") == name), None)


def triton_string_to_numpy(triton_type: str) -> type:
    """The numpy type of a config `data_type` such as "TYPE_FP32" (TYPE_STRING: object)."""
    try:
        return _NUMPY_BY_TRITON_TYPE[triton_type]
    except KeyError:
        raise TritonError(f"unknown data_type {triton_type!r}", TritonError.INVALID_ARG) from None


def numpy_to_triton_type(data_type: Any) -> int | None:
    """Triton's data type number for a numpy type, or None for one Triton has no type for."""
    return _TRITON_TYPE_NUMBERS.get(np.dtype(data_type).type)
