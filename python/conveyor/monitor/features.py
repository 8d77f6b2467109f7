"""Which values of a model's requests are monitored: the features a config asks for.

A feature is one flattened column of a numeric input or output (`x[3]`; `x` when a row
holds one element), or a value derived from a classifier output's row (`probs:class`, the
predicted class; `probs:confidence`, its score). The C++ monitor reads them straight from
the batch tensors; this module only plans which ones, in which order, and of which kind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from conveyor.config import MonitorConfig
from conveyor.errors import ConfigError

log = logging.getLogger(__name__)

# Datatypes the monitor can read as numbers (BYTES cannot be binned).
NUMERIC_DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"}
)

# The batcher's extra output when a monitor is attached: one flag byte per row
# (FLAG_* bits), shape [rows, 1] (or [1] for a model that does not batch).
FLAGS_OUTPUT = ("__monitor_flags", "UINT8", [1])
FLAG_OUT_OF_RANGE, FLAG_NONFINITE, FLAG_OUTLIER = 1, 2, 4

Derive = Literal["value", "predicted_class", "confidence", "confidence_from_logits"]


@dataclass(frozen=True)
class Feature:
    """One monitored value per row."""

    name: str
    source: Literal["input", "output"]
    tensor: int  # index among the batch's inputs or (core) outputs
    column: int  # flat element index within a row (0 for derived values)
    derive: Derive
    kind: Literal["numeric", "categorical"]


TensorSpec = tuple[str, str, Sequence[int]]  # (name, v2 datatype, per-row dims)


def plan_features(
    monitor: MonitorConfig,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    where: str,
) -> list[Feature]:
    """The features `monitor` asks for, inputs first, capped at `monitor.max_features`.

    `inputs`/`outputs` are the tensors the batch carries (for a model with steps, the
    public inputs and the core outputs). Raises ConfigError naming a tensor that does not
    exist or cannot be monitored.
    """
    input_index = {name: i for i, (name, _, _) in enumerate(inputs)}
    output_index = {name: i for i, (name, _, _) in enumerate(outputs)}
    classifier = {entry.output: entry.scores for entry in monitor.classifier_outputs}
    for name in classifier:
        _require(name, output_index, "classifier_outputs", where)

    wanted_inputs = monitor.inputs if monitor.inputs is not None else [
        name for name, datatype, dims in inputs if datatype in NUMERIC_DATATYPES and _fixed(dims)
    ]
    wanted_outputs = monitor.outputs if monitor.outputs is not None else [
        name for name, datatype, dims in outputs
        if datatype in NUMERIC_DATATYPES and _fixed(dims) and name not in classifier
    ]  # fmt: skip
    categorical, numeric = set(monitor.categorical), set(monitor.numeric)

    features: list[Feature] = []
    total_columns = 0
    for source, wanted, index, specs in (
        ("input", wanted_inputs, input_index, inputs),
        ("output", wanted_outputs, output_index, outputs),
    ):
        for name in wanted:
            _require(name, index, f"{source}s", where)
            _, datatype, dims = specs[index[name]]
            if datatype not in NUMERIC_DATATYPES:
                raise ConfigError(f"{where}: monitor.{source}s: {source} '{name}' is {datatype}; only numeric tensors can be monitored")
            if not _fixed(dims):
                raise ConfigError(
                    f"{where}: monitor.{source}s: {source} '{name}' has variable dims {list(dims)}; "
                    "only fixed-size rows can be monitored (give fixed dims or leave it out of the list)"
                )
            columns = math.prod(dims) if dims else 1
            total_columns += columns
            for column in range(columns):
                feature = name if columns == 1 else f"{name}[{column}]"
                is_categorical = feature in categorical or name in categorical or (
                    datatype == "BOOL" and feature not in numeric and name not in numeric
                )
                features.append(Feature(feature, source, index[name], column, "value",
                                        "categorical" if is_categorical else "numeric"))  # fmt: skip
    for name, scores in classifier.items():
        _, datatype, dims = outputs[output_index[name]]
        if datatype not in NUMERIC_DATATYPES or not _fixed(dims):
            raise ConfigError(
                f"{where}: monitor.classifier_outputs: output '{name}' is {datatype} {list(dims)}; "
                "class scores must be a numeric tensor of fixed dims"
            )
        confidence: Derive = "confidence" if scores == "probabilities" else "confidence_from_logits"
        total_columns += 2
        features.append(Feature(f"{name}:class", "output", output_index[name], 0, "predicted_class", "categorical"))
        features.append(Feature(f"{name}:confidence", "output", output_index[name], 0, confidence, "numeric"))

    known = {f.name for f in features} | {f.name.split("[")[0] for f in features}
    for field in ("categorical", "numeric"):
        unknown = sorted(set(getattr(monitor, field)) - known)
        if unknown:
            raise ConfigError(f"{where}: monitor.{field}: {unknown} are not monitored features (features: {_sample(features)})")
    if len(features) > monitor.max_features:
        # Derived classifier values matter most: keep them, cut columns from the end.
        derived = [f for f in features if f.derive != "value"]
        kept = [f for f in features if f.derive == "value"][: max(0, monitor.max_features - len(derived))]
        log.warning(
            "%s: monitoring %d of %d features (monitor.max_features = %d); list monitor.inputs/outputs "
            "or raise max_features to choose others",
            where, len(kept) + len(derived), total_columns, monitor.max_features,
        )  # fmt: skip
        features = kept + derived
    if not features:
        raise ConfigError(f"{where}: [monitor] finds nothing to monitor: no numeric input or output of fixed dims")
    return features


def _fixed(dims: Sequence[int]) -> bool:
    return all(dim > 0 for dim in dims)


def _require(name: str, index: dict[str, int], field: str, where: str) -> None:
    if name not in index:
        raise ConfigError(f"{where}: monitor.{field}: no tensor named '{name}' (known: {', '.join(index) or 'none'})")


def _sample(features: Sequence[Feature], count: int = 6) -> str:
    names = [f.name for f in features[:count]]
    return ", ".join(names) + (", ..." if len(features) > count else "")
