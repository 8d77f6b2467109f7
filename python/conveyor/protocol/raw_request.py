"""The raw binary request: `Inference-Header-Content-Length: 0`, the body is one tensor.

With no JSON to name the input or give its shape, both come from the model: it must
have exactly one input; a batching model gets batch 1; one variable dimension is
deduced from the byte count; a BYTES input must hold one element, which is then the
whole body (no length prefix). Every output is returned binary (Triton's rules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from conveyor.errors import InvalidInput
from conveyor.protocol.binary import array_from_raw, format_shape, object_array
from conveyor.protocol.datatypes import ELEMENT_SIZES
from conveyor.protocol.types import InferInput, InferRequest

_RAW_FORM = "a raw binary request (Inference-Header-Content-Length: 0)"


class InputSpec(NamedTuple):
    """A model input as its config declares it: dims exclude the batch dimension."""

    name: str
    datatype: str
    dims: Sequence[int]  # -1 marks a variable dimension


def decode_raw_request(
    body: bytes | memoryview,
    *,
    model_name: str,
    model_version: str,
    input_specs: Sequence[InputSpec] | None,
    max_batch_size: int,
) -> InferRequest:
    if input_specs is None:
        raise InvalidInput(
            f"{_RAW_FORM} has no JSON header naming its input, and the model's inputs are not known here"
        )
    if len(input_specs) != 1:
        raise InvalidInput(
            f"{_RAW_FORM} carries one tensor's bytes and no JSON header, so the model must have exactly one "
            f"input to receive them; model '{model_name}' has {len(input_specs)}: send a JSON header instead"
        )
    name, datatype, dims = input_specs[0]
    shape = ([1] if max_batch_size > 0 else []) + list(dims)
    where = f"input '{name}'"
    nbytes = len(body) if isinstance(body, bytes) else memoryview(body).nbytes
    if datatype == "BYTES":
        if -1 in shape or math.prod(shape) != 1:
            raise InvalidInput(
                f"{_RAW_FORM}: BYTES {where} must hold exactly one element to be sent raw; "
                f"its shape is {format_shape(shape)}"
            )
        data = object_array([bytes(body)]).reshape(shape)
    else:
        _deduce_variable_dim(shape, ELEMENT_SIZES[datatype] or 1, nbytes, where=where)
        data = array_from_raw(body, datatype, shape, where=f"{_RAW_FORM}: {where}")
    single = InferInput(name, datatype, tuple(shape), data)
    return InferRequest(model_name, model_version, inputs=[single], binary_data_output=True)


def _deduce_variable_dim(shape: list[int], element_size: int, nbytes: int, *, where: str) -> None:
    """Replace the one -1 in `shape` (if any) by what `nbytes` implies, in place."""
    variable = [index for index, dim in enumerate(shape) if dim == -1]
    if not variable:
        return
    if len(variable) > 1:
        raise InvalidInput(
            f"{_RAW_FORM}: the shape of {where}, {format_shape(shape)}, has more than one variable dimension, "
            "so it cannot be deduced from the byte count; send a JSON header with the shape"
        )
    row_bytes = element_size * math.prod(dim for dim in shape if dim != -1)
    if row_bytes == 0 and nbytes == 0:  # another dimension is 0: the tensor is empty whatever this one is
        shape[variable[0]] = 0
        return
    if row_bytes == 0 or nbytes % row_bytes:
        raise InvalidInput(
            f"{_RAW_FORM}: {nbytes} bytes do not fill {where} of shape {format_shape(shape)} "
            f"({row_bytes} bytes per step of the variable dimension)"
        )
    shape[variable[0]] = nbytes // row_bytes
