"""Reference distributions for live monitoring: built from a feature matrix, saved as .npz.

A reference fixes, per feature, the bins the C++ monitor counts live rows in and the
reference probability of each bin:

- numeric: the inner edges are the k/bins quantiles (k = 1 .. bins-1) of the finite
  values, deduplicated (discrete data gives fewer bins) and strictly above the minimum;
  a value x falls in bin ``np.searchsorted(edges, x, side="right")``, exactly as the C++
  binning (bin i is [edges[i-1], edges[i]), the outer bins open).
- categorical: the distinct values (the ``max_categories`` most frequent), sorted, plus a
  last "other" bin for every remaining or unseen value.

It also holds each feature's mean/std/min/max (finite values, population std) and, for
the Mahalanobis outlier score, the mean and precision matrix of a set of numeric
features with the distance above which a row is an outlier (a quantile of the reference
rows' own distances).

Training files are read by ``conveyor.monitor.training_data.read_training_inputs``.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.errors import ConfigError, InvalidInput

__all__ = ["KINDS", "Reference", "build_reference"]

KINDS = ("numeric", "categorical")
FORMAT_VERSION = 1
# Relative ridge added to the covariance diagonal: keeps the precision finite when
# features are collinear.
COVARIANCE_RIDGE = 1e-6

_ARRAY_KEYS = (
    "kinds", "names", "edges", "edge_offsets", "probabilities", "mean", "std", "min", "max",
    "mahalanobis_features", "mahalanobis_mean", "precision",
)  # fmt: skip
_SCALAR_KEYS = ("format_version", "rows", "outlier_threshold")


@dataclass(frozen=True, eq=False)
class Reference:
    """The reference distribution of a model's monitored features (immutable).

    Per feature i: ``kinds[i]``, ``edges[i]`` (numeric inner edges, or sorted categories),
    ``probabilities[i]`` (len(edges[i]) + 1 values, the categorical "other" bin last),
    ``mean/std/min/max[i]`` (NaN when the feature had no finite value). Mahalanobis:
    ``mahalanobis_features`` (indices, possibly empty), ``mahalanobis_mean``,
    ``precision`` [k, k] and ``outlier_threshold`` (a distance). ``rows``: the reference
    rows the probabilities came from. ``names``: feature names, or None.
    """

    kinds: tuple[str, ...]
    edges: tuple[np.ndarray, ...]
    probabilities: tuple[np.ndarray, ...]
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    rows: int
    mahalanobis_features: np.ndarray
    mahalanobis_mean: np.ndarray
    precision: np.ndarray
    outlier_threshold: float
    names: tuple[str, ...] | None = None

    @property
    def feature_count(self) -> int:
        """Number of features."""
        return len(self.kinds)

    @functools.cached_property
    def core(self) -> Any:
        """The checked C++ reference (``_core.Reference``) a Monitor bins against; made once."""
        return _core.Reference(
            kinds=list(self.kinds),
            edges=list(self.edges),
            probabilities=list(self.probabilities),
            mean=self.mean,
            std=self.std,
            min=self.min,
            max=self.max,
            rows=self.rows,
            mahalanobis_features=self.mahalanobis_features,
            mahalanobis_mean=self.mahalanobis_mean,
            precision=self.precision,
            outlier_threshold=self.outlier_threshold,
        )

    def to_core(self) -> Any:
        """The C++ reference: what ``Monitor.set_reference`` and ``evaluate_drift`` accept."""
        return self.core

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the reference as a compressed .npz (atomically: a temporary file, then a rename)."""
        path = Path(path)
        offsets = np.cumsum([0] + [len(e) for e in self.edges]).astype(np.int64)
        arrays = {
            "format_version": np.int64(FORMAT_VERSION),
            "rows": np.int64(self.rows),
            "outlier_threshold": np.float64(self.outlier_threshold),
            "kinds": np.array(self.kinds, dtype=str),
            "names": np.array(self.names if self.names is not None else [], dtype=str),
            "edges": np.concatenate([np.asarray(e, np.float64) for e in self.edges]),
            "edge_offsets": offsets,
            "probabilities": np.concatenate([np.asarray(p, np.float64) for p in self.probabilities]),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "mahalanobis_features": np.asarray(self.mahalanobis_features, np.int64),
            "mahalanobis_mean": self.mahalanobis_mean,
            "precision": self.precision,
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reference:
        """Reads a reference written by save(); ConfigError naming the file and the fault otherwise."""
        path = Path(path)
        unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
        try:
            data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)  # small: read whole, nothing left open
        except unreadable as exc:
            raise ConfigError(f"reference file {path} cannot be read as a .npz reference: {exc}") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ConfigError(f"reference file {path} holds a single array, not a .npz reference (Reference.save)")
        with data:
            missing = [k for k in _ARRAY_KEYS + _SCALAR_KEYS if k not in data.files]
            if missing:
                raise ConfigError(f"reference file {path}: missing arrays {missing}; write it with Reference.save")
            try:
                arrays = {k: data[k] for k in _ARRAY_KEYS + _SCALAR_KEYS}
            except unreadable as exc:
                raise ConfigError(f"reference file {path} is damaged: {exc}") from None
        try:
            reference = _from_arrays(arrays)
            reference.to_core()  # the C++ checks: edges ascending, probabilities per bin, shapes
        except (ValueError, IndexError, TypeError) as exc:  # InvalidInput is a ValueError
            raise ConfigError(f"reference file {path}: {exc}") from None
        return reference


def _from_arrays(a: Mapping[str, np.ndarray]) -> Reference:
    version = int(a["format_version"])
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version} is not supported (this Conveyor reads {FORMAT_VERSION})")
    kinds = tuple(str(k) for k in a["kinds"])
    n = len(kinds)
    if n == 0:
        raise ValueError("it holds no features")
    bad = sorted({k for k in kinds if k not in KINDS})
    if bad:
        raise ValueError(f"unknown feature kinds {bad} (expected {list(KINDS)})")
    offsets = np.asarray(a["edge_offsets"], np.int64)
    edges_flat = np.asarray(a["edges"], np.float64)
    probs_flat = np.asarray(a["probabilities"], np.float64)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(edges_flat):
        raise ValueError(f"edge_offsets must be {n + 1} ascending offsets into {len(edges_flat)} edges")
    if len(probs_flat) != len(edges_flat) + n:
        raise ValueError(f"it needs {len(edges_flat) + n} probabilities (one per bin), got {len(probs_flat)}")
    edges = tuple(edges_flat[offsets[i] : offsets[i + 1]] for i in range(n))
    probabilities = tuple(probs_flat[offsets[i] + i : offsets[i + 1] + i + 1] for i in range(n))
    stats = {}
    for key in ("mean", "std", "min", "max"):
        stats[key] = np.asarray(a[key], np.float64)
        if stats[key].shape != (n,):
            raise ValueError(f"'{key}' must hold {n} values (one per feature), got shape {stats[key].shape}")
    names_array = a["names"]
    names = tuple(str(x) for x in names_array) if len(names_array) else None
    if names is not None and len(names) != n:
        raise ValueError(f"'names' must hold {n} names, got {len(names)}")
    features = np.asarray(a["mahalanobis_features"], np.int64)
    k = len(features)
    precision = np.asarray(a["precision"], np.float64)
    mahalanobis_mean = np.asarray(a["mahalanobis_mean"], np.float64)
    if precision.shape != (k, k) or mahalanobis_mean.shape != (k,):
        raise ValueError(f"Mahalanobis over {k} features needs a mean ({k},) and a precision ({k}, {k})")
    rows = int(a["rows"])
    if rows < 0:
        raise ValueError(f"'rows' must be >= 0, got {rows}")
    return Reference(
        kinds=kinds, edges=edges, probabilities=probabilities, rows=rows,
        mahalanobis_features=features, mahalanobis_mean=mahalanobis_mean, precision=precision,
        outlier_threshold=float(a["outlier_threshold"]), names=names, **stats,
    )  # fmt: skip


def build_reference(
    values: np.ndarray,
    kinds: Sequence[str],
    *,
    bins: int = 20,
    max_categories: int = 50,
    mahalanobis_features: Sequence[int] | None = None,
    outlier_quantile: float = 0.999,
    names: Sequence[str] | None = None,
) -> Reference:
    """The reference of a feature matrix ``values`` [rows, features] (NaN/inf: missing).

    kinds: "numeric" or "categorical" per feature. bins: numeric bins before
    deduplication. max_categories: categories kept per categorical feature (the most
    frequent; the rest share the "other" bin). mahalanobis_features: indices of the
    numeric features scored together (None: every numeric feature with a finite,
    non-zero std; empty: no score). outlier_quantile: the quantile of the reference rows'
    own distances that becomes the outlier threshold. Raises InvalidInput naming the
    argument at fault.
    """
    x = _feature_matrix(values)
    rows, n = x.shape
    kinds = tuple(kinds)
    if len(kinds) != n:
        raise InvalidInput(f"kinds: {len(kinds)} kinds for {n} feature columns")
    bad = sorted({k for k in kinds if k not in KINDS})
    if bad:
        raise InvalidInput(f"kinds: unknown kinds {bad} (expected {list(KINDS)})")
    if names is not None and len(names) != n:
        raise InvalidInput(f"names: {len(names)} names for {n} feature columns")
    if bins < 1:
        raise InvalidInput(f"bins must be >= 1, got {bins}")
    if max_categories < 1:
        raise InvalidInput(f"max_categories must be >= 1, got {max_categories}")
    if not 0 < outlier_quantile <= 1:
        raise InvalidInput(f"outlier_quantile must lie in (0, 1], got {outlier_quantile}")

    edges, probabilities = [], []
    stats = np.full((4, n), np.nan)
    for i, kind in enumerate(kinds):
        column = x[:, i]
        finite = column[np.isfinite(column)]
        if finite.size:
            stats[:, i] = finite.mean(), finite.std(), finite.min(), finite.max()
        e, p = (_numeric_bins if kind == "numeric" else _categorical_bins)(finite, bins, max_categories)
        edges.append(e)
        probabilities.append(p)

    if mahalanobis_features is None:
        chosen = [i for i, k in enumerate(kinds) if k == "numeric" and np.isfinite(stats[1, i]) and stats[1, i] > 0]
    else:
        chosen = [int(i) for i in mahalanobis_features]
        for i in chosen:
            if not 0 <= i < n or kinds[i] != "numeric":
                raise InvalidInput(f"mahalanobis_features: {i} is not the index of a numeric feature (0..{n - 1})")
    mean, precision, threshold = _mahalanobis(x[:, chosen], outlier_quantile)
    return Reference(
        kinds=kinds, edges=tuple(edges), probabilities=tuple(probabilities),
        mean=stats[0].copy(), std=stats[1].copy(), min=stats[2].copy(), max=stats[3].copy(), rows=rows,
        mahalanobis_features=np.asarray(chosen, np.int64), mahalanobis_mean=mean, precision=precision,
        outlier_threshold=threshold, names=None if names is None else tuple(str(s) for s in names),
    )  # fmt: skip


def _feature_matrix(values: Any) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"values must be a numeric [rows, features] array: {exc}") from None
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InvalidInput(f"values must be a [rows, features] array with rows and features, got shape {x.shape}")
    return x


def _numeric_bins(finite: np.ndarray, bins: int, _max_categories: int) -> tuple[np.ndarray, np.ndarray]:
    if finite.size == 0:
        return np.empty(0), np.ones(1)
    edges = np.unique(np.quantile(finite, np.arange(1, bins) / bins))
    edges = edges[edges > finite.min()]  # an edge at the minimum would leave bin 0 empty forever
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return edges, counts / finite.size


def _categorical_bins(finite: np.ndarray, _bins: int, max_categories: int) -> tuple[np.ndarray, np.ndarray]:
    if finite.size == 0:
        return np.empty(0), np.ones(1)
    categories, counts = np.unique(finite, return_counts=True)
    if len(categories) > max_categories:
        keep = np.sort(np.argsort(-counts, kind="stable")[:max_categories])
        categories, counts = categories[keep], counts[keep]
    other = finite.size - counts.sum()
    return categories, np.append(counts, other) / finite.size


def _mahalanobis(x: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray, float]:
    k = x.shape[1]
    if k == 0:
        return np.empty(0), np.empty((0, 0)), float("inf")
    complete = x[np.all(np.isfinite(x), axis=1)]
    if len(complete) < 2:
        raise InvalidInput(f"mahalanobis_features: {len(complete)} rows have every one of them finite; need >= 2")
    mean = complete.mean(axis=0)
    covariance = np.atleast_2d(np.cov(complete, rowvar=False))
    scale = float(np.mean(np.diag(covariance)))
    covariance = covariance + np.eye(k) * COVARIANCE_RIDGE * (scale if scale > 0 else 1.0)
    precision = np.linalg.pinv(covariance, hermitian=True)
    precision = (precision + precision.T) / 2
    centered = complete - mean
    distances = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centered, precision, centered), 0.0))
    return mean, precision, float(np.quantile(distances, quantile))
