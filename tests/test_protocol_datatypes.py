"""Datatype tables and the raw (binary) tensor layout."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conveyor.config import NUMPY_DTYPE_BY_DATATYPE
from conveyor.errors import InternalError, InvalidInput
from conveyor.protocol.binary import array_from_raw, deserialize_bytes, raw_view, serialize_bytes
from conveyor.protocol.datatypes import (
    DATATYPES,
    DATATYPES_BY_TRITON_CONFIG_TYPE,
    ELEMENT_SIZES,
    NUMPY_DTYPES,
    TRITON_CONFIG_TYPES,
    datatype_of,
    numpy_dtype,
)


def test_tables_cover_every_v2_datatype() -> None:
    assert set(DATATYPES) == set(NUMPY_DTYPE_BY_DATATYPE) | {"BF16"}
    assert set(ELEMENT_SIZES) == set(TRITON_CONFIG_TYPES) == set(DATATYPES)
    assert ELEMENT_SIZES["BYTES"] is None and ELEMENT_SIZES["BF16"] == 2 and ELEMENT_SIZES["FP64"] == 8
    assert TRITON_CONFIG_TYPES["BYTES"] == "TYPE_STRING" and TRITON_CONFIG_TYPES["FP16"] == "TYPE_FP16"
    assert DATATYPES_BY_TRITON_CONFIG_TYPE["TYPE_STRING"] == "BYTES"


def test_numpy_dtypes_agree_with_the_config_table() -> None:
    for datatype, dtype in NUMPY_DTYPE_BY_DATATYPE.items():
        assert NUMPY_DTYPES[datatype] == dtype
    assert numpy_dtype("BF16") == np.uint16
    with pytest.raises(InvalidInput, match="unknown datatype 'FP8': expected one of BOOL"):
        numpy_dtype("FP8")


@pytest.mark.parametrize("datatype", [name for name in DATATYPES if name not in ("BF16", "BYTES")])
def test_datatype_of_inverts_numpy_dtype(datatype: str) -> None:
    assert datatype_of(numpy_dtype(datatype)) == datatype
    assert datatype_of(numpy_dtype(datatype).newbyteorder(">")) == datatype


def test_datatype_of_text_and_bfloat16() -> None:
    assert datatype_of(np.dtype(object)) == datatype_of(np.dtype("S4")) == datatype_of(np.dtype("U2")) == "BYTES"
    assert datatype_of(np.dtype(np.uint16)) == "UINT16"
    assert datatype_of(np.dtype(ml_dtypes.bfloat16)) == "BF16"
    with pytest.raises(InvalidInput, match="numpy dtype 'complex64' has no v2 datatype"):
        datatype_of(np.dtype(np.complex64))


def test_raw_arrays_are_read_only_views() -> None:
    body = np.arange(6, dtype=np.int16).tobytes()
    array = array_from_raw(body, "INT16", (2, 3), where="input 'x'")
    assert np.shares_memory(array, np.frombuffer(body, np.uint8)) and not array.flags.writeable
    np.testing.assert_array_equal(array, np.arange(6).reshape(2, 3))


def test_raw_arrays_at_unaligned_offsets_still_read() -> None:
    body = b"\x00" + np.array([1.5, -2.0], dtype=np.float64).tobytes()
    array = array_from_raw(memoryview(body)[1:], "FP64", (2,), where="input 'x'")
    assert not array.flags.aligned
    assert array.tolist() == [1.5, -2.0]


def test_bytes_layout_round_trips() -> None:
    items = [b"", b"a", bytes(range(256)), b"text"]
    array = np.empty(4, dtype=object)
    array[:] = items
    blob = serialize_bytes(array, where="output 'y'")
    assert blob[:4] == b"\x00\x00\x00\x00" and blob[4:9] == b"\x01\x00\x00\x00a"
    assert deserialize_bytes(blob, 4, where="x").tolist() == items
    assert deserialize_bytes(memoryview(blob), 4, where="x").tolist() == items
    assert deserialize_bytes(b"", 0, where="x").shape == (0,)


def test_fixed_width_text_arrays_serialize() -> None:
    assert serialize_bytes(np.array([b"ab", b"c"]), where="y") == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert serialize_bytes(np.array(["é"]), where="y") == b"\x02\x00\x00\x00\xc3\xa9"


def test_raw_view_shares_memory_and_keeps_the_array_alive() -> None:
    array = np.arange(5, dtype=np.float32)
    view = raw_view(array, "FP32", where="output 'y'")
    assert view.nbytes == 20 and np.shares_memory(np.frombuffer(view, np.uint8), array)
    del array
    assert np.frombuffer(view, np.float32).tolist() == [0, 1, 2, 3, 4]


def test_raw_view_of_big_endian_and_bfloat16_arrays() -> None:
    big = np.array([1, 2], dtype=">i4")
    assert bytes(raw_view(big, "INT32", where="y")) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    halves = np.array([1.0, -2.0], dtype=ml_dtypes.bfloat16)
    assert bytes(raw_view(halves, "BF16", where="y")) == np.array([0x3F80, 0xC000], np.uint16).tobytes()


def test_raw_view_refuses_a_mismatched_dtype() -> None:
    with pytest.raises(InternalError, match="output 'y': data of numpy dtype 'int64' cannot be sent as INT32"):
        raw_view(np.zeros(2, dtype=np.int64), "INT32", where="output 'y'")
