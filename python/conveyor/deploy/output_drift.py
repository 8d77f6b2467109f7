"""Output drift of the challenger against the champion: binned counts and their PSI or KS.

An `output_drift` check compares the distribution of the challenger's output values with
the champion's, on the outputs shadow pairs compare (`OutputComparison`: every value of a
score or regression output, or the top-1 class of a classifier). The statistics are the
C++ monitor's own (`conveyor._core.drift.psi` and `ks_binned`), so a rollout and the
model monitor measure drift the same way.

Bins. The first `reference_size` champion values fix the bin edges: the quantiles at
1/bins, ..., (bins-1)/bins of those values, repeated edges merged (a discrete output gets
fewer, wider bins), and two open-ended outer bins. Until then both sides' values wait in
a buffer (at most `reference_size` each); from then on every value is counted into its
bin at once, so memory stays O(bins) for the rest of the rollout. Challenger values
beyond the buffer while the champion's reference still fills are not counted (with
shadow pairs both sides arrive together, so this does not happen). The champion's counts,
all of them, are the reference distribution; the challenger's counts are the window.

PSI is smoothed by `PSI_SMOOTHING` (the monitor's default), so an empty bin gives a large
finite value. KS is the binned two-sample statistic (its `error_bound` says how far the
exact statistic on the raw values can be above it). The rule is a threshold on the
statistic, an effect size rather than a sequential test: PSI's sampling noise is about
(bins - 1) / n for n values per side, so `min_samples` should make that small against the
threshold.

Outputs reach these counts from shadow pairs only (the traffic layer sees both versions'
outputs of the same request there); in canary and A/B/n rollouts without shadow copies an
output_drift check has no data and follows its `no_data` rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.deploy.checks import DRIFT_STATISTICS

__all__ = ["DRIFT_STATISTICS", "PSI_SMOOTHING", "OutputDrift"]

PSI_SMOOTHING = 1e-4  # the monitor's `eps` default for evaluate_drift


@dataclass
class OutputDrift:
    """Binned output values of both versions for the output_drift checks of one binning."""

    bins: int
    reference_size: int
    edges: np.ndarray | None = None  # interior edges, ascending; None while the reference fills
    champion_pending: list[np.ndarray] = field(default_factory=list)
    challenger_pending: list[np.ndarray] = field(default_factory=list)
    champion_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    challenger_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @property
    def key(self) -> tuple[int, int]:
        """(bins, reference_size): checks with the same binning share one OutputDrift."""
        return (self.bins, self.reference_size)

    def _pending_size(self, pending: list[np.ndarray]) -> int:
        return sum(int(values.size) for values in pending)

    def record(self, champion: np.ndarray, challenger: np.ndarray) -> None:
        """Adds both versions' output values (any shape; flattened, non-finite values skipped)."""
        champion, challenger = _finite(champion), _finite(challenger)
        if self.edges is None:
            champion = self._buffer(self.champion_pending, champion)
            challenger = self._buffer(self.challenger_pending, challenger)
            if self._pending_size(self.champion_pending) < self.reference_size:
                return
            self._fix_edges()
        self.champion_counts += self._binned(champion)
        self.challenger_counts += self._binned(challenger)

    def _buffer(self, pending: list[np.ndarray], values: np.ndarray) -> np.ndarray:
        """Keeps what fits in the reference buffer; returns the rest (counted once the edges are fixed)."""
        room = max(self.reference_size - self._pending_size(pending), 0)
        pending.append(values[:room])
        return values[room:]

    def _fix_edges(self) -> None:
        reference = np.concatenate(self.champion_pending)
        quantiles = np.quantile(reference, np.arange(1, self.bins) / self.bins)
        self.edges = np.unique(quantiles)
        self.champion_counts = self._binned(reference)
        self.challenger_counts = self._binned(np.concatenate(self.challenger_pending))
        self.champion_pending, self.challenger_pending = [], []

    def _binned(self, values: np.ndarray) -> np.ndarray:
        assert self.edges is not None
        indices = np.searchsorted(self.edges, values, side="right")
        return np.bincount(indices, minlength=self.edges.size + 1).astype(np.uint64)

    @property
    def champion_values(self) -> int:
        """Champion values counted into bins (0 while the reference fills)."""
        return int(self.champion_counts.sum())

    @property
    def challenger_values(self) -> int:
        """Challenger values counted into bins (0 while the reference fills)."""
        return int(self.challenger_counts.sum())

    def statistic(self, kind: str) -> tuple[float, dict[str, Any]]:
        """(the statistic, what it came from) of the challenger's counts against the champion's.

        `kind`: "psi" or "ks". NaN while either side has no binned value.
        """
        inputs: dict[str, Any] = {
            "bins": int(self.champion_counts.size), "edges": [] if self.edges is None else self.edges.tolist(),
            "champion_counts": self.champion_counts.tolist(), "challenger_counts": self.challenger_counts.tolist(),
        }  # fmt: skip
        champion_total = self.champion_values
        if champion_total == 0 or self.challenger_values == 0:
            return float("nan"), inputs
        reference = self.champion_counts.astype(np.float64) / champion_total
        if kind == "psi":
            return float(_core.drift.psi(reference, self.challenger_counts, PSI_SMOOTHING)), inputs
        result = _core.drift.ks_binned(reference, self.challenger_counts, champion_total)
        inputs.update(ks_error_bound=float(result.error_bound), ks_p_value=float(result.p_value))
        return float(result.statistic), inputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "bins": self.bins, "reference_size": self.reference_size,
            "edges": None if self.edges is None else self.edges.tolist(),
            "champion_pending": np.concatenate([np.zeros(0), *self.champion_pending]).tolist(),
            "challenger_pending": np.concatenate([np.zeros(0), *self.challenger_pending]).tolist(),
            "champion_counts": self.champion_counts.tolist(), "challenger_counts": self.challenger_counts.tolist(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputDrift:
        edges = data["edges"]
        return cls(
            bins=int(data["bins"]), reference_size=int(data["reference_size"]),
            edges=None if edges is None else np.asarray(edges, np.float64),
            champion_pending=[np.asarray(data["champion_pending"], np.float64)],
            challenger_pending=[np.asarray(data["challenger_pending"], np.float64)],
            champion_counts=np.asarray(data["champion_counts"], np.uint64),
            challenger_counts=np.asarray(data["challenger_counts"], np.uint64),
        )  # fmt: skip


def _finite(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values, np.float64).ravel()
    return flat[np.isfinite(flat)]
