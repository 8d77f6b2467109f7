"""The classification extension: an output's top-N classes instead of its scores.

A requested output with `parameters.classification = N` comes back as a BYTES tensor
of "score:index" strings, or "score:index:label" where a label exists for the index,
best first. For a batching model each batch row is ranked on its own and the result
is [batch, N]; otherwise the whole output is ranked and the result is [N]. N larger
than the class count gives every class. Scores print as C's "%f" for floating
types and as integers for integer types, as Triton's std::to_string does. Ties keep
the lower index first; NaN ranks below every number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conveyor.errors import InvalidInput
from conveyor.protocol.binary import object_array
from conveyor.protocol.types import InferOutput


def classify(scores: np.ndarray, count: int, *, batched: bool, labels: Sequence[str] | None = None) -> np.ndarray:
    """The top `count` classes of `scores` as an object array of bytes ([batch, N] or [N])."""
    if count < 1:
        raise InvalidInput(f"classification needs a class count >= 1, got {count}")
    if scores.dtype.kind not in "iuf":
        raise InvalidInput(f"classification needs numeric scores, not numpy dtype '{scores.dtype}'")
    if batched and scores.ndim == 0:
        raise InvalidInput("classification of a batching model's output needs a batch dimension")
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    ranked = _rank_descending(rows)[:, :count]
    values = np.take_along_axis(rows, ranked, axis=1).tolist()
    template = "{:f}:{}" if scores.dtype.kind == "f" else "{:d}:{}"
    strings: list[bytes] = []
    for row_values, row_indices in zip(values, ranked.tolist(), strict=True):
        for value, index in zip(row_values, row_indices, strict=True):
            text = template.format(value, index)
            if labels is not None and index < len(labels):
                text = f"{text}:{labels[index]}"
            strings.append(text.encode("utf-8"))
    result = object_array(strings)
    return result.reshape(rows.shape[0], ranked.shape[1]) if batched else result


def _rank_descending(rows: np.ndarray) -> np.ndarray:
    """Column indices of each row, highest score first, ties by lower index."""
    if rows.dtype.kind == "f" and np.isnan(rows).any():
        rows = np.where(np.isnan(rows), -np.inf, rows)
    # A stable ascending sort of the mirrored row, read backwards, is a descending sort
    # in which equal scores keep ascending original indices (negating would overflow
    # unsigned types).
    mirrored = np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1]
    return rows.shape[1] - 1 - mirrored


def classification_output(
    output: InferOutput, count: int, *, batched: bool, labels: Sequence[str] | None = None
) -> InferOutput:
    """`output` replaced by its top-`count` classes (a BYTES output of the same name)."""
    classes = classify(output.data, count, batched=batched, labels=labels)
    return InferOutput(output.name, "BYTES", classes.shape, classes, output.binary_data, dict(output.parameters))
