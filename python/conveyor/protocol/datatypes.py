"""The v2 tensor datatypes: their numpy dtypes, element sizes and Triton config names.

BF16 has no numpy dtype. On the wire it is raw little-endian bfloat16, so a decoded
BF16 tensor is a `uint16` array holding the bit patterns, two bytes per element as
sent: no conversion and no copy. `array.view(ml_dtypes.bfloat16)` reinterprets it
where that package is installed; `(array.astype(np.uint32) << 16).view(np.float32)`
widens it exactly without it. BF16 never travels as JSON numbers (as in Triton).

FP16 goes as JSON numbers too (Triton refuses it there; accepting it costs nothing
and a float16 value read back from its shortest decimal form is exact).

BYTES tensors are object arrays whose elements are `bytes`.
"""

from __future__ import annotations

import numpy as np

from conveyor.errors import InvalidInput

# Explicit little-endian: the wire order. On a little-endian host these equal the
# native dtypes, so views need no byte swapping.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bit patterns; see the module docstring
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

DATATYPES: tuple[str, ...] = tuple(NUMPY_DTYPES)

# Bytes per element on the wire; BYTES is variable (a 4-byte length, then the bytes).
ELEMENT_SIZES: dict[str, int | None] = {
    name: (None if name == "BYTES" else dtype.itemsize) for name, dtype in NUMPY_DTYPES.items()
}

# Datatypes whose values JSON carries as numbers or booleans.
JSON_NUMERIC_DATATYPES = frozenset(DATATYPES) - {"BF16", "BYTES"}

# Triton's model-config names (model_config.proto DataType); BYTES is TYPE_STRING there.
TRITON_CONFIG_TYPES: dict[str, str] = {
    name: ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}") for name in DATATYPES
}
DATATYPES_BY_TRITON_CONFIG_TYPE: dict[str, str] = {value: key for key, value in TRITON_CONFIG_TYPES.items()}

_DATATYPES_BY_NUMPY: dict[np.dtype, str] = {
    dtype: name for name, dtype in NUMPY_DTYPES.items() if name not in ("BF16", "BYTES")
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The dtype a decoded tensor of `datatype` has (uint16 for BF16, object for BYTES)."""
    try:
        return NUMPY_DTYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown datatype {datatype!r}: expected one of {', '.join(DATATYPES)}") from None


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype for a numpy dtype: object, bytes_ and str_ arrays are BYTES.

    uint16 maps to UINT16, never BF16: the bit patterns are indistinguishable, so
    BF16 must be named by the model's config. ml_dtypes' bfloat16 maps to BF16.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    found = _DATATYPES_BY_NUMPY.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if found is None:
        raise InvalidInput(f"numpy dtype '{dtype}' has no v2 datatype")
    return found
