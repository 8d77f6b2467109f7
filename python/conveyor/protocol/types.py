"""KServe v2 inference request and response, as the servers and the data plane share them.

Transport-free: the HTTP and gRPC front ends decode into these and encode from them;
tensors are numpy arrays already shaped (BYTES tensors are object arrays of bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]  # values: str, int, float or bool


@dataclass(slots=True)
class InferInput:
    name: str
    datatype: str  # v2 name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]
    data: np.ndarray  # shaped as `shape`
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # None: the request-level default
    classification: int = 0  # > 0: return the top-N classes as BYTES "score:index[:label]"
    parameters: Parameters = field(default_factory=dict)


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


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]
    parameters: Parameters = field(default_factory=dict)
