"""Tensor data as JSON values: `data` lists to numpy arrays and back.

Numbers go through one `np.asarray` of the whole (flat or nested) list: numpy infers
the element kind, which is checked against the datatype so that strings, nulls or
fractions in integer data are refused instead of silently converted, then the array
is cast once. Checking the kind per array rather than per element leaves one
laxity: booleans mixed into numeric data read as 0 and 1 (numpy promotes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from conveyor.errors import InvalidInput, ModelExecutionError
from conveyor.protocol.binary import format_shape, object_array
from conveyor.protocol.datatypes import NUMPY_DTYPES

# numpy kinds accepted per target kind: JSON integers may fill float tensors, but
# fractions never fill integer tensors and numbers never fill BOOL ones.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_EXPECTED_BY_KIND = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers"}
_FOUND_BY_KIND = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "non-integer numbers",
    "U": "strings",
    "O": "nulls, objects or integers beyond 64 bits",
}


def array_from_json(data: Any, datatype: str, shape: Sequence[int], *, where: str) -> np.ndarray:
    """The `data` of a JSON input as an array of `shape`; nested or flat lists both work."""
    if datatype == "BYTES":
        return _bytes_from_json(data, shape, where=where)
    if datatype == "BF16":
        raise InvalidInput(
            f"{where}: BF16 data cannot travel as JSON numbers; send it as binary data "
            "(parameters.binary_data_size and the bytes after the JSON header)"
        )
    dtype = NUMPY_DTYPES[datatype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"{where}: 'data' is not a list of {datatype} values nested to a regular shape ({exc})"
        ) from None
    count = math.prod(shape)
    if array.size != count:
        raise InvalidInput(f"{where}: shape {format_shape(shape)} needs {count} {datatype} elements, got {array.size}")
    if array.dtype != dtype and count:
        if dtype.kind in "iu" and array.dtype.kind in "fO":
            # numpy infers float64 (or object) for integers beyond int64 mixed with others:
            # look at the elements themselves before calling them fractions.
            exact = _exact_integers(data, datatype, dtype, where=where)
            array = array if exact is None else exact
        if array.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
            found = _FOUND_BY_KIND.get(array.dtype.kind, f"values of numpy kind '{array.dtype.kind}'")
            raise InvalidInput(f"{where}: {datatype} data must be {_EXPECTED_BY_KIND[dtype.kind]}, got {found}")
        if dtype.kind in "iu":
            _check_integer_range(array, datatype, dtype, where=where)
    return array.astype(dtype, copy=False).reshape(shape)


def _exact_integers(data: Any, datatype: str, dtype: np.dtype, *, where: str) -> np.ndarray | None:
    """The integers of `data` as an int64 or uint64 array, or None if one is not an integer."""
    leaves: list[Any] = []
    _flatten(data, leaves)
    if not all(type(leaf) is int for leaf in leaves):
        return None
    for wide in (np.int64, np.uint64):
        try:
            return np.array(leaves, dtype=wide)
        except OverflowError:
            continue
    info = np.iinfo(dtype)
    value = next(leaf for leaf in leaves if not info.min <= leaf <= info.max)
    raise InvalidInput(f"{where}: value {value} is out of the {datatype} range [{info.min}, {info.max}]")


def _flatten(data: Any, into: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, into)
    else:
        into.append(data)


def _check_integer_range(array: np.ndarray, datatype: str, dtype: np.dtype, *, where: str) -> None:
    info = np.iinfo(dtype)
    for value in (int(array.min()), int(array.max())):
        if not info.min <= value <= info.max:
            raise InvalidInput(f"{where}: value {value} is out of the {datatype} range [{info.min}, {info.max}]")


def _bytes_from_json(data: Any, shape: Sequence[int], *, where: str) -> np.ndarray:
    if isinstance(data, list) and all(type(item) is str for item in data):
        strings = data
    else:
        strings = []
        _flatten_strings(data, strings, where=where)
    count = math.prod(shape)
    if len(strings) != count:
        raise InvalidInput(f"{where}: shape {format_shape(shape)} needs {count} BYTES elements, got {len(strings)}")
    try:
        encoded = [text.encode("utf-8") for text in strings]
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{where}: a BYTES string is not valid Unicode ({exc.reason})") from None
    return object_array(encoded).reshape(shape)


def _flatten_strings(data: Any, into: list[str], *, where: str) -> None:
    if isinstance(data, str):
        into.append(data)
    elif isinstance(data, list):
        for item in data:
            _flatten_strings(item, into, where=where)
    else:
        kind = "null" if data is None else type(data).__name__
        raise InvalidInput(f"{where}: BYTES data must be strings (UTF-8 text), got {kind}")


def json_from_array(array: np.ndarray) -> Any:
    """A numeric array as the flat `data` value the JSON encoder writes.

    orjson writes bool, integer, float32 and float64 arrays itself, 8x faster than
    json with lists, and float32 as its shortest text; float16 it cannot write.
    """
    flat = array.ravel()
    if (flat.dtype.kind == "f" and flat.dtype.itemsize == 2) or not flat.dtype.isnative:
        return flat.tolist()
    return flat


def utf8_strings(array: np.ndarray, *, where: str) -> list[str] | None:
    """A BYTES array's elements as str, or None when one is not UTF-8 (it must go binary)."""
    strings: list[str] = []
    for index, item in enumerate(array.ravel().tolist()):
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            try:
                strings.append(str(item, "utf-8"))
            except UnicodeDecodeError:
                return None
        else:
            raise ModelExecutionError(
                f"{where}: BYTES element {index} is a {type(item).__name__}; expected bytes or str"
            )
    return strings
