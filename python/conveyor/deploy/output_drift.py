"""Output drift of the challenger against the champion: binned counts and their PSI or KS.

An `output_drift` check compares the distribution of the challenger's output values with
the champion's, on the outputs shadow pairs compare (`OutputComparison`: every value of a
score or regression output, or the top-1 class of a classifier). The statistics are the
C++ monitor's own (`conveyor._core.drift.psi` and `ks_binned`), so a rollout and the
model monitor measure drift the same way.

Bins. The first `reference_size` champion values fix the bin edges: the quantiles at
1/bins, ..., (bins-1)/bins of those values, repeated edges merged (a discrete output gets
fewer, wider bins), and two open-ended outer bins. Those values wait in a buffer (at
most `reference_size`) and only fix the edges: the counts start once the edges are
fixed, on both sides (the challenger's values of the same pairs are left out), so the
edges never depend on the values counted between them; memory is O(bins) from then on.
The champion's counts are the reference distribution; the challenger's are the window.

PSI is smoothed by `PSI_SMOOTHING` (the monitor's default), so an empty bin gives a large
finite value. KS is the binned two-sample statistic (its `error_bound` says how far the
exact statistic on the raw values can be above it).

The rule, valid under repeated looks. The check fails only when the drift of the
distributions behind the counts, not of the counts themselves, is shown to exceed the
threshold by a confidence sequence (`bounds`), so the chance that a challenger whose true
drift is at most the threshold is ever failed stays below the check's alpha however
often, and whenever, the judge looks. Derivation:

- Each bin's probability (PSI) or each interior edge's cumulative probability (KS) is a
  proportion, estimated from one side's counts; `sequential.binomial_confidence_sequence`
  (Robbins' beta mixture, its prior centred where the edges put it when nothing drifts,
  with B bins 1/B per bin and k/B at the k-th edge, worth `PRIOR_STRENGTH` values) gives it an
  interval that holds at every sample size at once with probability
  1 - alpha / (2 K), K the number of bins (PSI) or interior edges (KS). By the union
  bound all 2 K intervals, both sides', hold together, at every look, with probability
  at least 1 - alpha. No independence between the sides is needed (shadow pairs answer
  the same requests).
- KS: the binned population statistic is max_k |F_A(e_k) - F_B(e_k)|; with F_A(e_k) in
  [a_lo, a_hi] and F_B(e_k) in [b_lo, b_hi] its term at e_k is at least
  max(0, a_lo - b_hi, b_lo - a_hi) and at most max(a_hi - b_lo, b_hi - a_lo).
- PSI: sum_k g(p_k, q_k) with g(x, y) = (y - x) log(y / x) on the smoothed probabilities
  (x + eps) / (1 + K eps), a monotone map of each interval. dg/dy has the sign of y - x
  and dg/dx the sign of x - y, so g grows away from the diagonal in each coordinate: over
  a box its minimum is 0 when the intervals overlap, else g at the two nearest ends, and
  its maximum is g at one of the corners (x_lo, y_hi), (x_hi, y_lo). Summing the bins'
  minima (maxima) bounds the PSI from below (above) whenever every interval holds.
- The edges are fixed by values counted nowhere else, and the counted values come from
  later requests, independent of those: given the edges, each count is a binomial sum,
  so the intervals hold with the edges as they came out.

So `lower > threshold` fails the check, and with enough values a real drift is caught
as the intervals narrow like sqrt(log n / n). Assumptions: output values independent and
identically distributed per version (several values of one request that move together
count as more evidence than they are: prefer one value per request, a classifier's
top-1 or a one-element score), and the distributions fixed for the rollout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.deploy.checks import DRIFT_STATISTICS
from conveyor.deploy.sequential import binomial_confidence_sequence

__all__ = ["DRIFT_STATISTICS", "PSI_SMOOTHING", "OutputDrift"]

PSI_SMOOTHING = 1e-4  # the monitor's `eps` default for evaluate_drift
# The bounds' beta-mixture prior is worth this many values: weak, so a bin far from where
# the edges put it costs little (2 to 20 give lower bounds within 10% of each other).
PRIOR_STRENGTH = 10.0


@dataclass
class OutputDrift:
    """Binned output values of both versions for the output_drift checks of one binning."""

    bins: int
    reference_size: int
    edges: np.ndarray | None = None  # interior edges, ascending; None while the reference fills
    champion_pending: list[np.ndarray] = field(default_factory=list)
    champion_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    challenger_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @property
    def key(self) -> tuple[int, int]:
        """(bins, reference_size): checks with the same binning share one OutputDrift."""
        return (self.bins, self.reference_size)

    def _pending_size(self, pending: list[np.ndarray]) -> int:
        return sum(int(values.size) for values in pending)

    def record(self, champion: np.ndarray, challenger: np.ndarray) -> None:
        """Adds both versions' output values (any shape; flattened, non-finite values skipped).

        While the edges are not fixed, the champion's values fill the reference and the
        challenger's values at the same positions are left out (see Bins above).
        """
        champion, challenger = _finite(champion), _finite(challenger)
        if self.edges is None:
            room = max(self.reference_size - self._pending_size(self.champion_pending), 0)
            self.champion_pending.append(champion[:room])
            champion, challenger = champion[room:], challenger[room:]
            if self._pending_size(self.champion_pending) < self.reference_size:
                return
            self._fix_edges()
        self.champion_counts += self._binned(champion)
        self.challenger_counts += self._binned(challenger)

    def _fix_edges(self) -> None:
        reference = np.concatenate(self.champion_pending)
        quantiles = np.quantile(reference, np.arange(1, self.bins) / self.bins)
        self.edges = np.unique(quantiles)
        self.champion_counts = np.zeros(self.edges.size + 1, np.uint64)
        self.challenger_counts = np.zeros(self.edges.size + 1, np.uint64)
        self.champion_pending = []

    def _binned(self, values: np.ndarray) -> np.ndarray:
        assert self.edges is not None
        indices = np.searchsorted(self.edges, values, side="right")
        return np.bincount(indices, minlength=self.edges.size + 1).astype(np.uint64)

    @property
    def champion_values(self) -> int:
        """Champion values counted into bins since the edges were fixed."""
        return int(self.champion_counts.sum())

    @property
    def challenger_values(self) -> int:
        """Challenger values counted into bins since the edges were fixed."""
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

    def bounds(self, kind: str, alpha: float) -> tuple[float, float]:
        """(lower, upper): a (1 - alpha) confidence sequence for the drift behind the counts.

        `kind`: "psi" or "ks". The true (binned, smoothed for PSI) statistic of the two
        versions' output distributions lies within it at every look at once with
        probability at least 1 - alpha (see the module docstring). (0, inf) while either
        side has no binned value.
        """
        champion_total, challenger_total = self.champion_values, self.challenger_values
        if champion_total == 0 or challenger_total == 0:
            return 0.0, math.inf
        if kind == "psi":
            return _psi_bounds(self.champion_counts, champion_total, self.challenger_counts, challenger_total, alpha)
        return _ks_bounds(self.champion_counts, champion_total, self.challenger_counts, challenger_total, alpha)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bins": self.bins, "reference_size": self.reference_size,
            "edges": None if self.edges is None else self.edges.tolist(),
            "champion_pending": np.concatenate([np.zeros(0), *self.champion_pending]).tolist(),
            "champion_counts": self.champion_counts.tolist(), "challenger_counts": self.challenger_counts.tolist(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputDrift:
        edges = data["edges"]
        return cls(
            bins=int(data["bins"]), reference_size=int(data["reference_size"]),
            edges=None if edges is None else np.asarray(edges, np.float64),
            champion_pending=[np.asarray(data["champion_pending"], np.float64)],
            champion_counts=np.asarray(data["champion_counts"], np.uint64),
            challenger_counts=np.asarray(data["challenger_counts"], np.uint64),
        )  # fmt: skip


def _intervals(
    champion: np.ndarray, n_a: int, challenger: np.ndarray, n_b: int, delta: float, center: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(champion lower, upper, challenger lower, upper) of every count's probability, in one call."""
    counts = np.concatenate([champion, challenger]).astype(np.float64)
    trials = np.concatenate([np.full(champion.size, float(n_a)), np.full(challenger.size, float(n_b))])
    lower, upper = binomial_confidence_sequence(
        counts, trials, delta, center=np.concatenate([center, center]), strength=PRIOR_STRENGTH
    )
    return lower[: champion.size], upper[: champion.size], lower[champion.size :], upper[champion.size :]


def _ks_bounds(champion: np.ndarray, n_a: int, challenger: np.ndarray, n_b: int, alpha: float) -> tuple[float, float]:
    """Bounds of max_k |F_A(e_k) - F_B(e_k)| over the interior edges (cumulative counts below each)."""
    below_a, below_b = np.cumsum(champion)[:-1], np.cumsum(challenger)[:-1]
    if below_a.size == 0:  # one bin: both distributions put everything in it
        return 0.0, 0.0
    delta = alpha / (2 * below_a.size)
    center = np.arange(1, below_a.size + 1) / (below_a.size + 1)
    a_lo, a_hi, b_lo, b_hi = _intervals(below_a, n_a, below_b, n_b, delta, center)
    lower = float(np.maximum(a_lo - b_hi, b_lo - a_hi).max())
    upper = float(np.maximum(a_hi - b_lo, b_hi - a_lo).max())
    return max(lower, 0.0), min(upper, 1.0)


def _psi_bounds(champion: np.ndarray, n_a: int, challenger: np.ndarray, n_b: int, alpha: float) -> tuple[float, float]:
    """Bounds of the smoothed PSI sum_k g(p_k, q_k) from intervals of every bin's probability."""
    bins = champion.size
    delta = alpha / (2 * bins)
    scale = 1.0 / (1.0 + bins * PSI_SMOOTHING)
    center = np.full(bins, 1.0 / bins)
    p_lo, p_hi, q_lo, q_hi = ((end + PSI_SMOOTHING) * scale for end in _intervals(champion, n_a, challenger, n_b, delta, center))
    nearest = np.where(q_lo > p_hi, _psi_term(p_hi, q_lo), np.where(p_lo > q_hi, _psi_term(p_lo, q_hi), 0.0))
    farthest = np.maximum(_psi_term(p_lo, q_hi), _psi_term(p_hi, q_lo))
    return float(nearest.sum()), float(farthest.sum())


def _psi_term(reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(q - p) log(q / p) per bin, p and q smoothed (so positive)."""
    return (window - reference) * np.log(window / reference)


def _finite(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values, np.float64).ravel()
    return flat[np.isfinite(flat)]
