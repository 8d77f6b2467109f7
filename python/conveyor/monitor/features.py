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

# The batcher's extra output when a monitor is attached: one flag byte per row (bit 0
# out of range, bit 1 NaN/inf, bit 2 outlier), shape [rows, 1] ([1] without batching).
FLAGS_OUTPUT = ("__monitor_flags", "UINT8", [1])

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
    public inputs and the core outputs). A feature's kind: a feature named in
    `categorical`/`numeric` first, then its tensor named there, else categorical for BOOL
    and numeric otherwise. Past `max_features`, columns are cut from the end and the
    classifier values kept (they too are cut when they alone exceed the cap). Raises
    ConfigError naming the field and a tensor that does not exist, is listed twice or
    cannot be monitored.
    """
    input_index = {name: i for i, (name, _, _) in enumerate(inputs)}
    output_index = {name: i for i, (name, _, _) in enumerate(outputs)}
    classifier = {entry.output: entry.scores for entry in monitor.classifier_outputs}
    _check_listed([entry.output for entry in monitor.classifier_outputs], output_index, "classifier_outputs", where)

    wanted_inputs = monitor.inputs if monitor.inputs is not None else [
        name for name, datatype, dims in inputs if datatype in NUMERIC_DATATYPES and _fixed(dims)
    ]
    wanted_outputs = monitor.outputs if monitor.outputs is not None else [
        name for name, datatype, dims in outputs
        if datatype in NUMERIC_DATATYPES and _fixed(dims) and name not in classifier
    ]  # fmt: skip
    _check_listed(wanted_inputs, input_index, "inputs", where)
    _check_listed(wanted_outputs, output_index, "outputs", where)
    features: list[Feature] = []
    for name in wanted_inputs:
        features += _columns(monitor, "input", name, input_index[name], inputs[input_index[name]], where)
    for name in wanted_outputs:
        features += _columns(monitor, "output", name, output_index[name], outputs[output_index[name]], where)
    for position, (name, scores) in enumerate(classifier.items()):
        _, datatype, dims = outputs[output_index[name]]
        if datatype not in NUMERIC_DATATYPES or not _fixed(dims):
            raise ConfigError(
                f"{where}: monitor.classifier_outputs[{position}].output: output '{name}' is {datatype} {list(dims)}; "
                "class scores must be a numeric tensor of fixed dims"
            )
        confidence: Derive = "confidence" if scores == "probabilities" else "confidence_from_logits"
        features.append(Feature(f"{name}:class", "output", output_index[name], 0, "predicted_class", "categorical"))
        features.append(Feature(f"{name}:confidence", "output", output_index[name], 0, confidence, "numeric"))

    _check_kind_lists(monitor, features, where)
    if not features:
        raise ConfigError(
            f"{where}: [monitor] finds nothing to monitor: monitor.inputs and monitor.outputs select no numeric "
            "tensor of fixed dims, and there are no classifier_outputs"
        )
    if len(features) > monitor.max_features:
        features = _capped(features, monitor.max_features, where)
    return features


def _columns(
    monitor: MonitorConfig, source: Literal["input", "output"], name: str, tensor: int, spec: TensorSpec, where: str
) -> list[Feature]:
    """The features of one listed input or output: a column per flattened element."""
    _, datatype, dims = spec
    field = f"monitor.{source}s"
    if datatype not in NUMERIC_DATATYPES:
        raise ConfigError(f"{where}: {field}: {source} '{name}' is {datatype}; only numeric tensors can be monitored")
    if not _fixed(dims):
        raise ConfigError(
            f"{where}: {field}: {source} '{name}' has variable dims {list(dims)}; "
            "only fixed-size rows can be monitored (give fixed dims or leave it out of the list)"
        )
    categorical, numeric = set(monitor.categorical), set(monitor.numeric)
    columns = math.prod(dims) if dims else 1
    features = []
    for column in range(columns):
        feature = name if columns == 1 else f"{name}[{column}]"
        if feature in categorical or feature in numeric:  # a listed feature beats its listed tensor
            is_categorical = feature in categorical
        elif name in categorical or name in numeric:
            is_categorical = name in categorical
        else:
            is_categorical = datatype == "BOOL"
        kind: Literal["numeric", "categorical"] = "categorical" if is_categorical else "numeric"
        features.append(Feature(feature, source, tensor, column, "value", kind))
    return features


def _check_listed(names: Sequence[str], index: dict[str, int], field: str, where: str) -> None:
    """Each name a tensor of `index`, none twice; `field` is "inputs", "outputs" or "classifier_outputs"."""
    kind = "input" if field == "inputs" else "output"
    suffix = ".output" if field == "classifier_outputs" else ""
    seen: set[str] = set()
    for position, name in enumerate(names):
        if name not in index:
            known = ", ".join(index) or "none"
            raise ConfigError(f"{where}: monitor.{field}[{position}]{suffix}: no {kind} named '{name}' ({kind}s: {known})")
        if name in seen:
            raise ConfigError(f"{where}: monitor.{field}[{position}]{suffix}: '{name}' is listed twice")
        seen.add(name)


def _check_kind_lists(monitor: MonitorConfig, features: Sequence[Feature], where: str) -> None:
    """`categorical` and `numeric` name monitored features or tensors, and no derived value against its kind."""
    known = {f.name for f in features} | {f.name.split("[")[0] for f in features if f.derive == "value"}
    fixed_kind = {f.name: f.kind for f in features if f.derive != "value"}
    for field in ("categorical", "numeric"):
        listed = getattr(monitor, field)
        unknown = sorted(set(listed) - known)
        if unknown:
            raise ConfigError(
                f"{where}: monitor.{field}: {', '.join(map(repr, unknown))} not among the monitored features or "
                f"their tensors (features: {_sample(features)})"
            )
        against = sorted(name for name in listed if name in fixed_kind and fixed_kind[name] != field)
        if against:
            raise ConfigError(
                f"{where}: monitor.{field}: {', '.join(map(repr, against))} is a classifier value whose kind is fixed "
                "(':class' is categorical, ':confidence' numeric); remove it from the list"
            )


def _capped(features: list[Feature], max_features: int, where: str) -> list[Feature]:
    # Derived classifier values matter most: keep them, cut columns from the end.
    derived = [f for f in features if f.derive != "value"][:max_features]
    kept = [f for f in features if f.derive == "value"][: max_features - len(derived)]
    log.warning(
        "%s: monitoring %d of %d features (monitor.max_features = %d); list monitor.inputs/outputs "
        "or raise max_features to choose others",
        where, len(kept) + len(derived), len(features), max_features,
    )  # fmt: skip
    return kept + derived


def _fixed(dims: Sequence[int]) -> bool:
    return all(dim > 0 for dim in dims)


def _sample(features: Sequence[Feature], count: int = 6) -> str:
    names = [f.name for f in features[:count]]
    return ", ".join(names) + (", ..." if len(features) > count else "")
