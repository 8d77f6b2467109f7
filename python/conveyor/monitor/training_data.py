"""Reading a model's inputs from a training-data file (the monitor's reference).

Accepted layouts, for inputs with per-row dims `dims` (n = prod(dims) elements):

- Parquet or CSV with one column per input holding the row (a list of n numbers, or a
  number when n = 1), or one column per element named like the monitor's features
  (`x[0]` .. `x[n-1]`; `x` when n = 1). CSV holds numbers only, so it uses the second form.
- .npy: a 2-D array [rows, sum of every input's n] (the inputs' elements side by side in
  the config's order), or for a model with one input [rows, *dims].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conveyor.config import NUMPY_DTYPE_BY_DATATYPE
from conveyor.errors import ConfigError

TensorSpec = tuple[str, str, Sequence[int]]
SUFFIXES = (".parquet", ".npy", ".csv")


def read_training_inputs(
    path: Path, inputs: Sequence[TensorSpec], *, where: str, max_rows: int
) -> dict[str, np.ndarray]:
    """{input name: array [rows, *dims]} of the first `max_rows` rows of `path`."""
    path = Path(path)
    suffix = path.suffix.lower()
    for name, datatype, dims in inputs:
        if datatype == "BYTES" or datatype not in NUMPY_DTYPE_BY_DATATYPE or any(d <= 0 for d in dims):
            raise ConfigError(
                f"{where}: monitor.reference: input '{name}' ({datatype} {list(dims)}) cannot be read from a "
                "training file: only numeric inputs of fixed dims can"
            )
    try:
        if suffix == ".npy":
            arrays = _from_npy(path, inputs, where)
        elif suffix in (".parquet", ".csv"):
            arrays = _from_table(path, inputs, where, suffix)
        else:
            raise ConfigError(f"{where}: monitor.reference: {path.name}: unknown format; use one of {', '.join(SUFFIXES)}")
    except OSError as exc:
        raise ConfigError(f"{where}: monitor.reference: cannot read {path}: {exc}") from exc
    rows = len(next(iter(arrays.values())))
    if rows < 2:
        raise ConfigError(f"{where}: monitor.reference: {path} holds {rows} rows; a reference needs at least 2 (ideally thousands)")
    out = {}
    for name, datatype, dims in inputs:
        array = arrays[name][:max_rows]
        try:
            out[name] = np.ascontiguousarray(array.reshape((len(array), *dims)).astype(NUMPY_DTYPE_BY_DATATYPE[datatype]))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: monitor.reference: {path}: input '{name}' cannot be read as {datatype}: {exc}") from exc
    return out


def _from_npy(path: Path, inputs: Sequence[TensorSpec], where: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: monitor.reference: {path} is not a numeric .npy array: {exc}") from exc
    widths = [math.prod(dims) if dims else 1 for _, _, dims in inputs]
    if len(inputs) == 1 and data.ndim >= 2 and tuple(data.shape[1:]) == tuple(inputs[0][2]):
        return {inputs[0][0]: data.reshape(len(data), -1)}
    if data.ndim != 2 or data.shape[1] != sum(widths):
        expected = f"[rows, {sum(widths)}]" + (f" or [rows, {', '.join(map(str, inputs[0][2]))}]" if len(inputs) == 1 else "")
        raise ConfigError(f"{where}: monitor.reference: {path} has shape {list(data.shape)}, expected {expected}")
    if data.dtype.kind not in "biuf":
        raise ConfigError(f"{where}: monitor.reference: {path} holds {data.dtype}, expected numbers")
    out, at = {}, 0
    for (name, _, _), width in zip(inputs, widths):
        out[name] = data[:, at : at + width]
        at += width
    return out


def _from_table(path: Path, inputs: Sequence[TensorSpec], where: str, suffix: str) -> dict[str, np.ndarray]:
    import pyarrow as pa

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{where}: monitor.reference: {path} is not a readable {suffix[1:]} file: {exc}") from exc
    columns = set(table.column_names)
    out = {}
    for name, _, dims in inputs:
        width = math.prod(dims) if dims else 1
        if name in columns:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
                lengths = np.asarray(column.value_lengths()) if not pa.types.is_fixed_size_list(column.type) else None
                if lengths is not None and (lengths != width).any():
                    bad = int(np.argmax(lengths != width))
                    raise ConfigError(
                        f"{where}: monitor.reference: {path}: column '{name}' row {bad} holds {int(lengths[bad])} values, "
                        f"expected {width} (input '{name}' dims {list(dims)})"
                    )
                values = column.flatten().to_numpy(zero_copy_only=False)
                if len(values) != width * len(column):
                    raise ConfigError(f"{where}: monitor.reference: {path}: column '{name}' rows must hold {width} values each")
                out[name] = _numeric(values, path, name, where).reshape(len(column), width)
                continue
            if width != 1:
                raise ConfigError(
                    f"{where}: monitor.reference: {path}: column '{name}' holds one value per row, but input '{name}' "
                    f"has {width} per row: store a list per row or columns {name}[0] .. {name}[{width - 1}]"
                )
            out[name] = _numeric(column.to_numpy(zero_copy_only=False), path, name, where).reshape(-1, 1)
            continue
        names = [name] if width == 1 else [f"{name}[{i}]" for i in range(width)]
        missing = [n for n in names if n not in columns]
        if missing:
            raise ConfigError(
                f"{where}: monitor.reference: {path} has no column '{name}' nor {missing[0]!r}"
                f"{' (and ' + str(len(missing) - 1) + ' more)' if len(missing) > 1 else ''}; "
                f"columns: {_sample(table.column_names)}"
            )
        out[name] = np.stack(
            [_numeric(table.column(n).to_numpy(zero_copy_only=False), path, n, where) for n in names], axis=1
        )
    return out


def _numeric(values: np.ndarray, path: Path, column: str, where: str) -> np.ndarray:
    if values.dtype.kind not in "biuf":
        raise ConfigError(f"{where}: monitor.reference: {path}: column '{column}' holds {values.dtype}, expected numbers")
    return values


def _sample(names: Sequence[str], count: int = 8) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")
