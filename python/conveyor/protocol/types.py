"""KServe v2 inference request and response, as the servers and the data plane share them.

Transport-free: the HTTP and gRPC front ends decode into these and encode from them;
tensors are numpy arrays already shaped (BYTES tensors are object arrays of bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]  # values: str, int, float or bool


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor lies in a registered shared-memory region (the shared-memory extension's
    `shared_memory_region`, `shared_memory_offset` and `shared_memory_byte_size` parameters).

    `offset` counts from the start of the region as registered, not of the memory object."""

    region: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class InferInput:
    name: str
    datatype: str  # v2 name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]
    data: np.ndarray | None  # shaped as `shape`; None while the tensor is still in shared memory
    parameters: Parameters = field(default_factory=dict)
    shared_memory: SharedMemoryRef | None = None  # the data plane reads `data` from there


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # None: the request-level default
    classification: int = 0  # > 0: return the top-N classes as BYTES "score:index[:label]"
    parameters: Parameters = field(default_factory=dict)
    shared_memory: SharedMemoryRef | None = None  # written there; the answer carries no data


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""  # "" = the version the server's policy picks
    id: str = ""
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: every output
    parameters: Parameters = field(default_factory=dict)
    binary_data_output: bool = False


@dataclass(slots=True)
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    binary_data: bool = False
    parameters: Parameters = field(default_factory=dict)
    # Set when `data` was written into a shared-memory region (byte_size: the bytes written):
    # the encoders send the output's name, datatype and shape only, as Triton does (with no
    # parameters either: Triton's C++ client takes any output parameters to hold binary_data_size).
    shared_memory: SharedMemoryRef | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]
    parameters: Parameters = field(default_factory=dict)


def uses_shared_memory(request: InferRequest) -> bool:
    """Whether any input or requested output of `request` lies in a shared-memory region."""
    return any(t.shared_memory is not None for t in request.inputs) or any(
        o.shared_memory is not None for o in request.outputs
    )
