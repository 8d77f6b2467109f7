"""Tensors as raw bytes: the binary tensor extension's layout, shared by HTTP and gRPC.

Fixed-size datatypes are row-major little-endian elements with no padding; a BYTES
tensor is, per element, a 4-byte little-endian length followed by that many bytes.
Decoding fixed-size data never copies: the array is a view of the caller's buffer
(read-only when the buffer is `bytes`, and not necessarily aligned, since the data
starts wherever the JSON header ends; the batcher copies it once into the batch).
Encoding never copies a contiguous array: `raw_view` is a memoryview of it, which
also keeps the array (and the pooled block under it) alive until it is written.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from conveyor.errors import InternalError, InvalidInput, ModelExecutionError
from conveyor.protocol.datatypes import ELEMENT_SIZES, NUMPY_DTYPES, numpy_dtype

_LENGTH_PREFIX = struct.Struct("<I")
_MAX_ELEMENT_BYTES = 2**32 - 1
# numpy refuses an array whose non-zero dimensions multiply past 2^63 - 1 bytes, even when
# a zero dimension leaves it empty; 8 bytes is the widest element (FP64, INT64, a BYTES object).
_MAX_ELEMENTS = (2**63 - 1) // 8


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def check_shape_size(shape: Sequence[int], *, where: str) -> None:
    """Raise InvalidInput if no tensor can have `shape` (its dimensions are already known to be >= 0)."""
    elements = math.prod(dim for dim in shape if dim)
    if elements > _MAX_ELEMENTS:
        raise InvalidInput(
            f"{where}: shape {format_shape(shape)} has more elements than a tensor can hold (its non-zero "
            f"dimensions multiply to {elements}, over 2^63 - 1 bytes of 8-byte elements); check the shape"
        )


def expected_byte_size(datatype: str, shape: Sequence[int]) -> int | None:
    """Bytes a tensor of this datatype and shape takes; None for BYTES (variable)."""
    element_size = ELEMENT_SIZES[datatype]
    return None if element_size is None else element_size * math.prod(shape)


def array_from_raw(buffer: bytes | memoryview, datatype: str, shape: Sequence[int], *, where: str) -> np.ndarray:
    """The tensor held in `buffer` (exactly its bytes), shaped; a view unless BYTES.

    `where` names the tensor in error messages ("input 'x'").
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buffer, count, where=where).reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        dtype = numpy_dtype(datatype)  # raises, naming the known datatypes
    nbytes = buffer.nbytes if type(buffer) is memoryview else len(buffer)
    if nbytes != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: shape {format_shape(shape)} needs {count * dtype.itemsize} bytes of {datatype} data "
            f"({count} elements of {dtype.itemsize} bytes), got {nbytes} bytes"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def deserialize_bytes(buffer: bytes | memoryview, count: int, *, where: str) -> np.ndarray:
    """`count` length-prefixed elements filling `buffer` exactly, as a 1-D object array of bytes."""
    view = memoryview(buffer).cast("B") if not isinstance(buffer, bytes) else buffer
    end = len(view)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"{where}: BYTES data ends inside element {index}'s 4-byte length prefix "
                f"({end} bytes hold fewer than the {count} elements the shape needs)"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{where}: BYTES element {index} claims {length} bytes but only {end - offset} remain in its data"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != end:
        raise InvalidInput(f"{where}: {end - offset} bytes left over after the {count} BYTES elements the shape needs")
    return object_array(items)


def object_array(items: list) -> np.ndarray:
    """A 1-D object array of exactly `items` (np.array would descend into sequences)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def serialize_bytes(array: np.ndarray, *, where: str) -> bytes:
    """A BYTES tensor in the length-prefixed layout; str elements are encoded as UTF-8."""
    pack = _LENGTH_PREFIX.pack
    parts: list[bytes] = []
    for index, item in enumerate(array.ravel().tolist()):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            raise ModelExecutionError(
                f"{where}: BYTES element {index} is a {type(item).__name__}; expected bytes or str"
            )
        if len(item) > _MAX_ELEMENT_BYTES:
            raise ModelExecutionError(f"{where}: BYTES element {index} has {len(item)} bytes; the limit is 2^32 - 1")
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def raw_view(array: np.ndarray, datatype: str, *, where: str) -> memoryview:
    """A fixed-size tensor's bytes as a memoryview of the array: no copy when contiguous."""
    check_dtype(array, datatype, where=where)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # Through uint8: a memoryview of ml_dtypes' bfloat16 has no buffer format to cast from.
    return array.reshape(-1).view(np.uint8).data


def check_dtype(array: np.ndarray, datatype: str, *, where: str) -> None:
    """Raise if `array` cannot be sent as `datatype`.

    The runtime checks model outputs against the config, so a mismatch here is a bug
    in whatever built the response, never the client's fault.
    """
    dtype = array.dtype
    if datatype == "BF16":
        fits = dtype.itemsize == 2 and (dtype.kind == "u" or dtype.name == "bfloat16")
    elif datatype == "BYTES":
        fits = dtype.kind in "OSU"
    else:
        expected = NUMPY_DTYPES.get(datatype)
        fits = expected is not None and dtype.kind == expected.kind and dtype.itemsize == expected.itemsize
    if not fits:
        raise InternalError(f"{where}: data of numpy dtype '{dtype}' cannot be sent as {datatype}")
