"""Reading a model's inputs from a training-data file (the monitor's reference).

Accepted layouts, for inputs with per-row dims `dims` (n = prod(dims) elements, C order):

- Parquet or CSV with, per input, either one column named like the input holding the row
  (a list of n numbers, or a number when n = 1; in CSV a quoted cell such as
  "[0.5, 1.0, 2.5]"), or one column per element named like the monitor's features
  (`x[0]` .. `x[n-1]`; `x` when n = 1). Empty cells and nulls read as NaN, which only a
  floating-point input can hold.
- .npy: a 2-D numeric array [rows, sum of every input's n] (the inputs' elements side by
  side in the config's order; 1-D when that sum is 1), or for a model with one input
  [rows, *dims].

Every failure is a ConfigError naming the model, `monitor.reference`, the file, and the
column or input at fault with what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.config import NUMPY_DTYPE_BY_DATATYPE
from conveyor.errors import ConfigError

TensorSpec = tuple[str, str, Sequence[int]]
SUFFIXES = (".parquet", ".npy", ".csv")
MIN_ROWS = 2
_NPY_MAGIC = b"\x93NUMPY"
_NUMPY_KIND_NAMES = {"U": "text", "S": "bytes", "O": "object", "c": "complex", "M": "datetime", "m": "timedelta"}


def read_training_inputs(
    path: Path, inputs: Sequence[TensorSpec], *, where: str, max_rows: int
) -> dict[str, np.ndarray]:
    """{input name: array [rows, *dims]} of the first `max_rows` rows of `path`.

    Raises ConfigError for an input that cannot be read from a file (BYTES, variable
    dims), an unknown suffix, an unreadable file, a missing column, a wrong width, values
    that are not numbers or do not fit the input's datatype, and fewer than 2 rows.
    """
    path = Path(path)
    what = f"{where}: monitor.reference: {path}"
    if not inputs:
        raise ConfigError(f"{what}: the model has no inputs to read from the file")
    for name, datatype, dims in inputs:
        if datatype not in NUMPY_DTYPE_BY_DATATYPE or datatype == "BYTES" or any(d <= 0 for d in dims):
            raise ConfigError(
                f"{what}: input '{name}' ({datatype} {list(dims)}) cannot be read from a training file: "
                "only numeric inputs of fixed dims can"
            )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{what}: unknown format '{suffix or path.name}'; use one of {', '.join(SUFFIXES)}")
    try:
        arrays = _from_npy(path, inputs, what) if suffix == ".npy" else _from_table(path, inputs, what, suffix)
    except FileNotFoundError:
        raise ConfigError(f"{what}: cannot read it: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read it: {exc.strerror or exc}") from None
    return {name: _cast(arrays[name][:max_rows], name, datatype, dims, what) for name, datatype, dims in inputs}


def _width(dims: Sequence[int]) -> int:
    return math.prod(dims) if dims else 1


def _check_rows(rows: int, what: str) -> None:
    if rows < MIN_ROWS:
        plural = "" if rows == 1 else "s"
        raise ConfigError(f"{what}: holds {rows} row{plural}; a reference needs at least {MIN_ROWS} (ideally thousands)")


def _cast(values: np.ndarray, name: str, datatype: str, dims: Sequence[int], what: str) -> np.ndarray:
    """`values` [rows, n] as the input's dtype and shape, refusing values the dtype cannot hold."""
    dtype = NUMPY_DTYPE_BY_DATATYPE[datatype]
    if dtype.kind in "biu" and values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise ConfigError(
                f"{what}: input '{name}' is {datatype}, but {int(bad.sum())} of its values are empty, NaN or "
                "infinite (only a floating-point input can hold them); fill or drop those rows"
            )
        if dtype.kind in "iu" and (values != np.round(values)).any():
            raise ConfigError(f"{what}: input '{name}' is {datatype}, but the file holds values with a fraction")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise ConfigError(
                f"{what}: input '{name}' is {datatype}, range [{info.min}, {info.max}], but the file's values "
                f"span [{low}, {high}]"
            )
    return np.ascontiguousarray(values.reshape((len(values), *dims)).astype(dtype))


def _from_npy(path: Path, inputs: Sequence[TensorSpec], what: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        with path.open("rb") as file:
            is_npy = file.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        reason = str(exc) if is_npy else "no .npy header (write it with numpy.save)"
        raise ConfigError(f"{what}: not a numeric .npy array: {reason}") from None
    if not isinstance(data, np.ndarray):
        data.close()  # an NpzFile holds the file open
        raise ConfigError(f"{what}: not a .npy array but an archive of several (.npz); save one array with numpy.save")
    if data.dtype.kind not in "biuf":
        kind = _NUMPY_KIND_NAMES.get(data.dtype.kind, "non-numeric")
        raise ConfigError(f"{what}: holds {kind} values ({data.dtype}), expected numbers")
    widths = [_width(dims) for _, _, dims in inputs]
    total = sum(widths)
    if data.ndim == 1 and total == 1:
        data = data.reshape(-1, 1)
    dims0 = tuple(inputs[0][2])
    if len(inputs) == 1 and data.ndim >= 2 and tuple(data.shape[1:]) == dims0:
        _check_rows(len(data), what)
        return {inputs[0][0]: data.reshape(len(data), -1)}
    if data.ndim != 2 or data.shape[1] != total:
        if len(inputs) == 1:
            layout = f" or [rows, {', '.join(map(str, dims0))}]" if len(dims0) > 1 else ""
        else:
            layout = " (" + ", ".join(f"{n} of '{name}'" for (name, _, _), n in zip(inputs, widths)) + ", side by side)"
        raise ConfigError(f"{what}: has shape {list(data.shape)}, expected [rows, {total}]{layout}")
    _check_rows(len(data), what)
    out, at = {}, 0
    for (name, _, _), width in zip(inputs, widths):
        out[name] = data[:, at : at + width]
        at += width
    return out


def _from_table(path: Path, inputs: Sequence[TensorSpec], what: str, suffix: str) -> dict[str, np.ndarray]:
    import pyarrow as pa

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{what}: not a readable {suffix[1:]} file: {exc}") from None
    _check_rows(table.num_rows, what)
    columns = table.column_names
    out = {}
    for name, _, dims in inputs:
        width = _width(dims)
        if name in columns:
            out[name] = _input_column(table.column(name).combine_chunks(), name, dims, what, csv=suffix == ".csv")
            continue
        names = [name] if width == 1 else [f"{name}[{i}]" for i in range(width)]
        missing = [n for n in names if n not in columns]
        if missing:
            expected = f"a column '{name}'" if width == 1 else (
                f"a column '{name}' holding a list of {width} values per row, or the columns "
                f"{name}[0] .. {name}[{width - 1}] (missing: {_sample(missing, 3)})"
            )  # fmt: skip
            raise ConfigError(f"{what}: no column for input '{name}': expected {expected}; the file has {_sample(columns)}")
        out[name] = np.stack([_numbers(table.column(n).combine_chunks(), n, what) for n in names], axis=1)
    return out


def _input_column(column: Any, name: str, dims: Sequence[int], what: str, *, csv: bool) -> np.ndarray:
    """The [rows, n] values of a column named like the input: a list per row, or a number when n = 1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    width = _width(dims)
    if csv and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = _parse_list_cells(column, name, what)
    if not _is_list(column.type):
        if width != 1:
            raise ConfigError(
                f"{what}: column '{name}' holds one {column.type} per row, but input '{name}' has {width} values per "
                f"row (dims {list(dims)}): store a list per row, or columns {name}[0] .. {name}[{width - 1}]"
            )
        return _numbers(column, name, what).reshape(-1, 1)
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ConfigError(f"{what}: column '{name}' has {column.null_count} empty rows (row {first} first); fill or drop them")
    values = _numbers(column.flatten(), name, what, lists=True)
    if pa.types.is_fixed_size_list(column.type) and column.type.list_size != width:
        raise ConfigError(
            f"{what}: column '{name}' holds lists of {column.type.list_size} values, expected {width} "
            f"(input '{name}' dims {list(dims)})"
        )
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if (lengths != width).any():
        bad = int(np.flatnonzero(lengths != width)[0])
        raise ConfigError(
            f"{what}: column '{name}' row {bad} holds {int(lengths[bad])} values, expected {width} "
            f"(input '{name}' dims {list(dims)})"
        )
    return values.reshape(len(column), width)


def _parse_list_cells(column: Any, name: str, what: str) -> Any:
    """A CSV column of cells like "[1.0, 2.0]" (or "1.0 2.0") as a list<double> column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stripped = pc.utf8_trim(pc.replace_substring_regex(column, r"[\[\]]", ""), " ")
    try:
        return pc.split_pattern_regex(stripped, r"[,\s]+").cast(pa.list_(pa.float64()))
    except pa.ArrowInvalid as exc:
        raise ConfigError(
            f"{what}: column '{name}' holds cells that are neither numbers nor lists of numbers like "
            f"\"[1.0, 2.0]\": {exc}"
        ) from None


def _numbers(values: Any, column: str, what: str, *, lists: bool = False) -> np.ndarray:
    """A numeric arrow array as numpy (nulls as NaN); ConfigError for any other type."""
    import pyarrow as pa

    kind = values.type
    if pa.types.is_boolean(kind):
        values = values.cast(pa.uint8())  # to_numpy would give objects for booleans with nulls
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        holds = f"lists of {kind}" if lists else f"{kind} values"
        flat = " (a flat list of numbers per row, in C order)" if lists and _is_list(kind) else ""
        raise ConfigError(f"{what}: column '{column}' holds {holds}, expected numbers{flat}")
    return values.to_numpy(zero_copy_only=False)


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _sample(names: Sequence[str], count: int = 8) -> str:
    return ", ".join(repr(n) for n in names[:count]) + (", ..." if len(names) > count else "")
