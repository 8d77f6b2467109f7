"""conveyor._core.drift: every drift statistic against scipy/numpy on random data, the
binned KS and Wasserstein against the exact statistics of the raw samples (within their
stated bounds), and the bindings' argument errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from conveyor import _core
from conveyor.errors import InvalidInput

drift = _core.drift
BINS = 20
SEEDS = range(40)


def _multinomial(rng: np.random.Generator, n: int, p: np.ndarray) -> np.ndarray:
    return rng.multinomial(n, p / p.sum()).astype(np.uint64)


def _random_binned(rng: np.random.Generator, bins: int, *, holes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet reference probabilities and multinomial window counts from a nearby
    distribution; with `holes`, some bins of either side are empty."""
    ref_p = rng.dirichlet(np.full(bins, 2.0))
    window_p = 0.7 * ref_p + 0.3 * rng.dirichlet(np.full(bins, 1.0))
    if holes and bins > 2:
        ref_p[rng.integers(bins)] = 0.0
        ref_p /= ref_p.sum()
        window_p[rng.integers(bins)] = 0.0
    counts = _multinomial(rng, int(rng.integers(1, 5000)), window_p)
    return ref_p, counts


def _quantile_bins(ref: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Inner quantile edges of a reference sample and its probability per bin."""
    edges = np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1])
    ref_p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=bins) / ref.size
    return edges, ref_p


def _bin_counts(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1).astype(np.uint64)


def _samples(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference and a window sample: normal, shifted/scaled, sometimes heavy-tailed or
    rounded (ties and repeated quantile edges)."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(int(rng.integers(200, 4000)))
    shift = [0.0, 0.02, 0.1, 0.3, 1.0, 3.0][seed % 6]
    window = shift + rng.standard_normal(int(rng.integers(1, 3000))) * rng.uniform(0.5, 2.0)
    if seed % 5 == 1:
        window = shift + rng.standard_t(2, window.size)
    if seed % 7 == 3:
        ref, window = np.round(ref * 2) / 2, np.round(window * 2) / 2
    return ref, window


# ---- PSI and Jensen-Shannon ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_psi_matches_the_smoothed_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bins = [1, 2, 5, 20, 64][seed % 5]
    ref_p, counts = _random_binned(rng, bins, holes=seed % 2 == 0)
    for eps in (1e-4, 1e-6, 0.01):
        p = (ref_p + eps) / (1 + bins * eps)
        q = (counts / counts.sum() + eps) / (1 + bins * eps)
        want = float(np.sum((q - p) * np.log(q / p)))
        assert drift.psi(ref_p, counts, eps) == pytest.approx(want, rel=1e-12, abs=1e-15)
    if np.all(ref_p > 0) and np.all(counts > 0):
        q = counts / counts.sum()
        assert drift.psi(ref_p, counts, 0.0) == pytest.approx(float(np.sum((q - ref_p) * np.log(q / ref_p))), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_js_distance_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref_p, counts = _random_binned(rng, [2, 5, 20, 64][seed % 4], holes=seed % 2 == 0)
    want = jensenshannon(ref_p, counts / counts.sum(), base=2)
    assert drift.js_distance(ref_p, counts) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_psi_and_js_of_an_empty_window_are_zero_and_disjoint_js_is_one() -> None:
    ref_p = np.array([0.5, 0.5, 0.0])
    assert drift.psi(ref_p, np.zeros(3, np.uint64), 1e-4) == 0.0
    assert drift.js_distance(ref_p, np.zeros(3, np.uint64)) == 0.0
    assert drift.js_distance(ref_p, np.array([0, 0, 9], np.uint64)) == pytest.approx(1.0, abs=1e-15)
    assert drift.psi(ref_p, np.array([0, 0, 9], np.uint64), 0.0) == math.inf


# ---- Kolmogorov-Smirnov --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(120))
def test_binned_ks_brackets_the_exact_two_sample_statistic(seed: int) -> None:
    ref, window = _samples(seed)
    edges, ref_p = _quantile_bins(ref)
    counts = _bin_counts(edges, window)
    result = drift.ks_binned(ref_p, counts, ref.size)
    exact = stats.ks_2samp(ref, window).statistic
    assert result.statistic <= exact + 1e-12
    assert exact <= result.statistic + result.error_bound + 1e-12
    # Never looser than the max-bin-mass bound D_b + max(p, q).
    assert result.error_bound <= max(ref_p.max(), (counts / counts.sum()).max()) + 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_ks_p_value_is_the_corrected_asymptotic_kolmogorov(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref_p, counts = _random_binned(rng, BINS, holes=seed % 3 == 0)
    n = float(counts.sum())
    for ref_rows in (0, 1, 500, 10_000, 10**9):
        result = drift.ks_binned(ref_p, counts, ref_rows)
        n_eff = n if ref_rows == 0 else n * ref_rows / (n + ref_rows)
        lam = (math.sqrt(n_eff) + 0.12 + 0.11 / math.sqrt(n_eff)) * result.statistic
        assert result.p_value == pytest.approx(special.kolmogorov(lam), rel=1e-9, abs=0.0)
        cdf_diff = np.abs(np.cumsum(ref_p)[:-1] - np.cumsum(counts)[:-1] / n)
        assert result.statistic == pytest.approx(cdf_diff.max(initial=0.0), abs=1e-14)


def test_ks_of_an_empty_window_and_of_one_bin() -> None:
    empty = drift.ks_binned(np.full(4, 0.25), np.zeros(4, np.uint64), 100)
    assert (empty.statistic, empty.error_bound, empty.p_value) == (0.0, 0.0, 1.0)
    one = drift.ks_binned(np.array([1.0]), np.array([7], np.uint64), 100)
    assert (one.statistic, one.error_bound, one.p_value) == (0.0, 1.0, 1.0)
    assert "KsResult(statistic=0.0" in repr(one)


def test_kolmogorov_sf_matches_scipy_over_its_range() -> None:
    x = np.concatenate([np.geomspace(1e-3, 0.2, 50), np.linspace(0.2, 3, 5000), np.linspace(3, 19, 2000)])
    got = drift.kolmogorov_sf(x)
    want = special.kolmogorov(x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    tail = want > 1e-300
    np.testing.assert_allclose(got[tail], want[tail], rtol=1e-10, atol=0)
    assert drift.kolmogorov_sf(0.0) == 1.0 and drift.kolmogorov_sf(-2.0) == 1.0
    assert drift.kolmogorov_sf(50.0) == 0.0
    assert math.isnan(drift.kolmogorov_sf(math.nan))
    assert isinstance(drift.kolmogorov_sf(1.0), float)


# ---- chi-squared ---------------------------------------------------------------------------


@pytest.mark.parametrize("dof", [0.5, 1, 2, 3, 7, 19, 20, 63, 100, 999, 5_000, 100_000, 2_000_000])
def test_chi2_sf_matches_scipy_including_large_dof_and_far_tails(dof: float) -> None:
    mean, std = dof, math.sqrt(2 * dof)
    x = np.concatenate(
        [
            np.geomspace(1e-8, max(mean + 60 * std, 3000), 2000),
            np.linspace(max(mean - 10 * std, 1e-9), mean + 40 * std, 2000),
        ]
    )
    got = drift.chi2_sf(x, dof)
    want = stats.chi2.sf(x, dof)
    representable = want > 1e-300
    np.testing.assert_allclose(got[representable], want[representable], rtol=1e-9, atol=0)
    assert np.all(got[~representable] < 1e-290)


def test_chi2_sf_limits() -> None:
    assert drift.chi2_sf(0.0, 3) == 1.0
    assert drift.chi2_sf(math.inf, 3) == 0.0
    assert math.isnan(drift.chi2_sf(1.0, 0))
    assert math.isnan(drift.chi2_sf(math.nan, 3))
    assert drift.chi2_sf(np.array([[1.0, 2.0]]), np.array([2.0])).shape == (1, 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_chi_squared_matches_scipy_chisquare(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bins = [2, 3, 8, 20, 50][seed % 5]
    ref_p, counts = _random_binned(rng, bins, holes=seed % 2 == 0)
    for eps in (1e-4, 1e-2):
        expected = counts.sum() * (ref_p + eps) / (1 + bins * eps)
        want = stats.chisquare(counts.astype(np.float64), f_exp=expected)
        got = drift.chi_squared(ref_p, counts, eps)
        assert got.dof == bins - 1
        assert got.statistic == pytest.approx(want.statistic, rel=1e-12)
        assert got.p_value == pytest.approx(want.pvalue, rel=1e-9, abs=0.0)


def test_chi_squared_edge_cases() -> None:
    empty = drift.chi_squared(np.full(3, 1 / 3), np.zeros(3, np.uint64), 1e-4)
    assert (empty.statistic, empty.dof, empty.p_value) == (0.0, 2.0, 1.0)
    one = drift.chi_squared(np.array([1.0]), np.array([5], np.uint64), 1e-4)
    assert (one.dof, one.p_value) == (0.0, 1.0)
    hole = drift.chi_squared(np.array([0.5, 0.0, 0.5]), np.array([1, 1, 1], np.uint64), 0.0)
    assert (hole.statistic, hole.p_value) == (math.inf, 0.0)
    assert "ChiSquaredResult(statistic=inf" in repr(hole)


# ---- Wasserstein ---------------------------------------------------------------------------


def _binned_geometry(edges: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's midpoint and width, the outer bins closed at lo and hi."""
    bounds = np.concatenate([[lo], edges, [hi]])
    return (bounds[:-1] + bounds[1:]) / 2, np.diff(bounds)


@pytest.mark.parametrize("seed", range(60))
def test_wasserstein_is_the_midpoint_distance_and_within_half_a_bin_of_the_exact(seed: int) -> None:
    ref, window = _samples(seed)
    edges, ref_p = _quantile_bins(ref)
    counts = _bin_counts(edges, window)
    lo, hi = min(ref.min(), window.min()), max(ref.max(), window.max())
    scale = float(ref.std())
    got = drift.wasserstein_binned(edges, ref_p, counts, lo, hi, scale)
    midpoints, widths = _binned_geometry(edges, lo, hi)
    q = counts / counts.sum()
    # Exactly the distance between the point masses at the midpoints.
    at_midpoints = stats.wasserstein_distance(midpoints, midpoints, ref_p, q) / scale
    assert got == pytest.approx(at_midpoints, rel=1e-9, abs=1e-12)
    # Moving every sample's mass to its bin's midpoint costs at most half the bin's width per
    # unit of mass (triangle inequality), so |W_b - W| <= sum (p + q) width / 2.
    bound = float(np.sum((ref_p + q) * widths) / 2) / scale
    exact = stats.wasserstein_distance(ref, window) / scale
    assert abs(got - exact) <= bound + 1e-12


def test_wasserstein_edge_cases() -> None:
    edges = np.array([1.0, 2.0, 3.0])
    ref_p = np.full(4, 0.25)
    counts = np.array([10, 20, 30, 40], np.uint64)
    assert drift.wasserstein_binned(edges, ref_p, counts, 0.0, 4.0, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert drift.wasserstein_binned(edges, ref_p, counts, 0.0, 4.0, 0.0) == pytest.approx(0.5, abs=1e-15)
    assert drift.wasserstein_binned(edges, ref_p, counts, 0.0, 4.0, 2.0) == pytest.approx(0.25, abs=1e-15)
    assert drift.wasserstein_binned(edges, ref_p, np.zeros(4, np.uint64), 0.0, 4.0, 1.0) == 0.0
    one = drift.wasserstein_binned(np.empty(0), np.array([1.0]), np.array([3], np.uint64), -1.0, 1.0, 1.0)
    assert one == 0.0


# ---- multiplicity corrections --------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_benjamini_hochberg_is_scipys_false_discovery_control(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = [1, 2, 3, 10, 50, 200][seed % 6]
    p = rng.uniform(0, 1, n) ** rng.uniform(0.5, 6)
    if seed % 3 == 0:
        p = np.round(p, 2)  # ties
    np.testing.assert_array_equal(
        drift.adjust_p_values(p, "benjamini-hochberg"), stats.false_discovery_control(p, method="bh")
    )
    np.testing.assert_array_equal(drift.adjust_p_values(p, "bonferroni"), np.minimum(1.0, p * n))
    np.testing.assert_array_equal(drift.adjust_p_values(p, "none"), p)


def test_nan_p_values_are_skipped_and_stay_nan() -> None:
    rng = np.random.default_rng(7)
    p = rng.uniform(0, 0.2, 30)
    missing = rng.permutation(30)[:9]
    p[missing] = np.nan
    present = ~np.isnan(p)
    for correction, want in (
        ("benjamini-hochberg", stats.false_discovery_control(p[present], method="bh")),
        ("bonferroni", np.minimum(1.0, p[present] * present.sum())),
        ("none", p[present]),
    ):
        got = drift.adjust_p_values(p, correction)
        assert np.isnan(got[missing]).all()
        np.testing.assert_array_equal(got[present], want)
    assert drift.adjust_p_values(np.empty(0), "benjamini-hochberg").shape == (0,)


# ---- argument errors -----------------------------------------------------------------------

P4 = np.full(4, 0.25)
C4 = np.array([1, 2, 3, 4], np.uint64)
E3 = np.array([1.0, 2.0, 3.0])

CALLS: dict[str, Callable[..., Any]] = {
    "psi": lambda ref_p=P4, counts=C4: drift.psi(ref_p, counts, 1e-4),
    "js_distance": lambda ref_p=P4, counts=C4: drift.js_distance(ref_p, counts),
    "ks_binned": lambda ref_p=P4, counts=C4: drift.ks_binned(ref_p, counts, 10),
    "chi_squared": lambda ref_p=P4, counts=C4: drift.chi_squared(ref_p, counts, 1e-4),
    "wasserstein_binned": lambda ref_p=P4, counts=C4, edges=E3: drift.wasserstein_binned(
        edges, ref_p, counts, 0.0, 4.0, 1.0
    ),
}


@pytest.mark.parametrize("fn", sorted(CALLS))
def test_wrong_dtype_or_shape_names_the_argument(fn: str) -> None:
    call = CALLS[fn]
    call()  # the defaults are valid
    with pytest.raises(InvalidInput, match=rf"\[drift\] {fn}: counts must have dtype uint64, got int64"):
        call(counts=C4.astype(np.int64))
    with pytest.raises(InvalidInput, match=rf"{fn}: ref_p must have dtype float64, got float32"):
        call(ref_p=P4.astype(np.float32))
    with pytest.raises(InvalidInput, match="ref_p must be a numpy array, got list"):
        call(ref_p=[0.25] * 4)
    with pytest.raises(InvalidInput, match=r"counts must be one-dimensional, got shape \[2, 2\]"):
        call(counts=C4.reshape(2, 2))
    with pytest.raises(InvalidInput, match=r"counts must have one entry per bin of ref_p \(4\), got 3"):
        call(counts=C4[:3].copy())
    with pytest.raises(InvalidInput, match="ref_p is empty"):
        call(ref_p=np.empty(0), counts=np.empty(0, np.uint64))
    with pytest.raises(InvalidInput, match="counts is not C-contiguous"):
        call(counts=np.arange(8, dtype=np.uint64)[::2])


def test_wasserstein_edges_and_other_arguments_are_checked() -> None:
    call = CALLS["wasserstein_binned"]
    with pytest.raises(InvalidInput, match=r"edges must hold bins - 1 \(3\) inner edges .* got 4"):
        call(edges=np.arange(4.0))
    with pytest.raises(InvalidInput, match="edges must have dtype float64, got int64"):
        call(edges=np.arange(3))
    with pytest.raises(InvalidInput, match="ref_rows must be >= 0"):
        drift.ks_binned(P4, C4, -1)
    with pytest.raises(InvalidInput, match="correction must be 'benjamini-hochberg', 'bonferroni' or 'none', got 'bh'"):
        drift.adjust_p_values(P4, "bh")
    with pytest.raises(InvalidInput, match="adjust_p_values: p must have dtype float64"):
        drift.adjust_p_values(P4.astype(np.float32), "none")
