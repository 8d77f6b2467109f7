"""The C++ monitor through _core and the Python reference builder, against numpy and scipy.

Observation (histograms, sums, min/max, NaN/inf, out-of-range, categorical, derived
classifier features, Mahalanobis), both windows, merging, drift evaluation, the synthetic
drift scenarios (a 0.5-sd shift is caught; the false-alarm rate stays under alpha), the
memory and file-size bounds, reference files, and a Batcher with monitor=.
Every random draw has a fixed seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import spatial, special, stats

from conveyor import _core
from conveyor.errors import ConfigError, InvalidInput
from conveyor.monitor.reference import Reference, build_reference

SECOND = 1_000_000_000
FLAG_OUT_OF_RANGE, FLAG_NONFINITE, FLAG_OUTLIER = 1, 2, 4


def numeric_features(n: int, input_name: str = "x") -> list[dict]:
    return [{"name": f"{input_name}[{i}]", "column": i} for i in range(n)]


def make_monitor(features: list[dict], **options) -> _core.Monitor:
    return _core.Monitor(features=features, **options)


def mixed_data(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """Columns: 4 normal features (correlated 0 and 1), one skewed, one categorical in {0..4}."""
    x = rng.standard_normal((rows, 6))
    x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]
    x[:, 2] += shift
    x[:, 4] = rng.exponential(2.0, rows)
    x[:, 5] = rng.choice(5, rows, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    return x


MIXED_KINDS = ["numeric"] * 5 + ["categorical"]
MIXED_FEATURES = numeric_features(5) + [{"name": "x[5]", "column": 5, "kind": "categorical"}]


def numpy_distances(reference: Reference, x: np.ndarray) -> np.ndarray:
    d = x[:, reference.mahalanobis_features] - reference.mahalanobis_mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, reference.precision, d), 0))


# ---- observation against numpy ----


def test_observe_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    reference = build_reference(mixed_data(rng, 5000), MIXED_KINDS, mahalanobis_features=[0, 1, 2, 3])
    x = mixed_data(rng, 3000, shift=0.3)
    x[rng.integers(0, 3000, 40), rng.integers(0, 5, 40)] = np.nan
    x[rng.integers(0, 3000, 10), 3] = np.inf
    x[:5, 4] = -1.0  # below the reference minimum
    x[5:9, 5] = 7.0  # an unseen category
    monitor = make_monitor(MIXED_FEATURES, window_rows=10_000, sub_windows=10)
    monitor.set_reference(reference)
    flags = np.concatenate([monitor.observe([x[i : i + 700]], now_ns=0) for i in range(0, 3000, 700)])
    state = monitor.window("rows")

    assert state.rows == 3000
    finite = np.isfinite(x)
    out_of_range = np.zeros_like(finite)
    for i in range(6):
        column, ok = x[:, i], finite[:, i]
        values = column[ok]
        if MIXED_KINDS[i] == "numeric":
            expected = np.bincount(np.searchsorted(reference.edges[i], values, side="right"),
                                   minlength=len(reference.edges[i]) + 1)
            out_of_range[:, i] = ok & ((column < reference.min[i]) | (column > reference.max[i]))
        else:
            known = np.isin(values, reference.edges[i])
            index = np.searchsorted(reference.edges[i], values)
            expected = np.bincount(np.where(known, index, len(reference.edges[i])),
                                   minlength=len(reference.edges[i]) + 1)
            out_of_range[:, i] = ok & ~np.isin(column, reference.edges[i])
        np.testing.assert_array_equal(state.histogram(i), expected)
        assert state.count[i] == ok.sum()
        assert state.nan[i] == np.isnan(column).sum()
        assert state.inf[i] == np.isinf(column).sum()
        assert state.out_of_range[i] == out_of_range[:, i].sum()
        assert state.min[i] == values.min() and state.max[i] == values.max()
        assert state.mean[i] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
        assert state.std[i] == pytest.approx(values.std(), rel=1e-9)
        assert state.sum[i] == pytest.approx((values - state.shift[i]).sum(), rel=1e-9, abs=1e-9)

    distances = numpy_distances(reference, x)
    scored = finite[:, reference.mahalanobis_features].all(axis=1)  # rows with NaN/inf there are skipped
    outlier = scored & (np.where(scored, distances, 0.0) > reference.outlier_threshold)
    expected_flags = (
        out_of_range.any(axis=1) * FLAG_OUT_OF_RANGE + (~finite).any(axis=1) * FLAG_NONFINITE + outlier * FLAG_OUTLIER
    )
    np.testing.assert_array_equal(flags, expected_flags)
    assert state.out_of_range_rows == out_of_range.any(axis=1).sum()
    assert state.nonfinite_rows == (~finite).any(axis=1).sum()
    assert state.outlier_rows == outlier.sum()
    assert monitor.rows_observed == 3000
    assert monitor.anomalous_rows == np.count_nonzero(expected_flags)


def test_mahalanobis_distances_match_numpy() -> None:
    """Thresholds placed between consecutive numpy distances split the rows exactly."""
    rng = np.random.default_rng(2)
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    base = build_reference(rng.multivariate_normal([1, -1, 0], cov, 4000), ["numeric"] * 3)
    x = rng.multivariate_normal([1, -1, 0], cov, 200) * 1.5
    distances = np.sort(numpy_distances(base, x))
    for q in (0.1, 0.5, 0.9, 0.99):
        k = int(q * len(distances))
        threshold = (distances[k - 1] + distances[k]) / 2
        reference = _core.Reference(
            kinds=list(base.kinds), edges=list(base.edges), probabilities=list(base.probabilities),
            mean=base.mean, std=base.std, min=base.min, max=base.max, rows=base.rows,
            mahalanobis_features=base.mahalanobis_features, mahalanobis_mean=base.mahalanobis_mean,
            precision=base.precision, outlier_threshold=threshold,
        )  # fmt: skip
        monitor = make_monitor(numeric_features(3))
        monitor.set_reference(reference)
        flags = monitor.observe([x])
        np.testing.assert_array_equal((flags & FLAG_OUTLIER) != 0, numpy_distances(base, x) > threshold)
        assert ((flags & FLAG_OUTLIER) != 0).sum() == len(distances) - k


def test_every_numeric_dtype_is_read_as_double() -> None:
    values = np.array([[0, 1], [3, 2], [1, 0]])
    for dtype in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.bool_):
        monitor = make_monitor(numeric_features(2), reference_rows=3)
        data = values.astype(dtype)
        monitor.observe([data])
        np.testing.assert_array_equal(monitor.take_reference_rows(), data.astype(np.float64))
    half = make_monitor(numeric_features(1), reference_rows=2)
    half.observe([np.array([[1.5], [-2.25]], dtype=np.float16)])
    np.testing.assert_array_equal(half.take_reference_rows(), [[1.5], [-2.25]])


def test_derived_classifier_features() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((64, 5)).astype(np.float32)
    logits[3, 2] = np.nan
    probs = np.exp(logits - np.nanmax(logits, axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    features = [
        {"name": "p:class", "source": "output", "tensor": 0, "derive": "predicted_class"},
        {"name": "p:confidence", "source": "output", "tensor": 0, "derive": "confidence"},
        {"name": "l:confidence", "source": "output", "tensor": 1, "derive": "confidence_from_logits"},
    ]
    monitor = make_monitor(features, reference_rows=64)
    assert [f["kind"] for f in monitor.features] == ["categorical", "numeric", "numeric"]
    monitor.observe([], [probs, logits])
    rows = monitor.take_reference_rows()
    ok = np.all(np.isfinite(logits), axis=1)
    np.testing.assert_array_equal(rows[ok, 0], probs[ok].argmax(axis=1))
    np.testing.assert_allclose(rows[ok, 1], probs[ok].max(axis=1), rtol=1e-6)
    softmax = special.softmax(logits[ok].astype(np.float64), axis=1).max(axis=1)
    np.testing.assert_allclose(rows[ok, 2], softmax, rtol=1e-12)
    assert np.isnan(rows[~ok]).all()


def test_live_reference_is_collected_then_built() -> None:
    rng = np.random.default_rng(4)
    monitor = make_monitor(MIXED_FEATURES, reference_rows=1000)
    first = mixed_data(rng, 1500)
    np.testing.assert_array_equal(monitor.observe([first[:600]]), 0)
    monitor.observe([first[600:]])
    assert not monitor.reference_ready and monitor.collected_rows == 1000
    rows = monitor.take_reference_rows()
    np.testing.assert_array_equal(rows, first[:1000])
    monitor.set_reference(build_reference(rows, MIXED_KINDS))
    assert monitor.reference_ready and monitor.take_reference_rows().shape == (0, 6)
    monitor.observe([first[:10]])
    assert monitor.window("rows").rows == 10


# ---- windows ----


def test_rows_window_keeps_the_last_sub_windows() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((255, 1))
    monitor = make_monitor(numeric_features(1), window_rows=100, sub_windows=10)
    reference = build_reference(rng.standard_normal((1000, 1)), ["numeric"])
    monitor.set_reference(reference)

    def histogram(rows: np.ndarray) -> np.ndarray:
        return np.bincount(np.searchsorted(reference.edges[0], rows[:, 0], side="right"), minlength=20)

    for start in range(0, 250, 7):
        monitor.observe([x[start : min(start + 7, 250)]])
    np.testing.assert_array_equal(monitor.window("rows").histogram(0), histogram(x[150:250]))
    monitor.observe([x[250:255]])  # a new sub-window replaces rows 150..159
    state = monitor.window("rows")
    assert state.rows == 95
    np.testing.assert_array_equal(state.histogram(0), histogram(x[160:255]))


def test_time_window_by_explicit_time() -> None:
    monitor = make_monitor(numeric_features(1), window_seconds=10.0, sub_windows=10)  # 1 s sub-windows
    monitor.set_reference(build_reference(np.arange(100.0)[:, None], ["numeric"]))
    batches = {0.5: 1.0, 3.5: 2.0, 9.5: 3.0, 12.5: 4.0}
    for t, value in batches.items():
        monitor.observe([np.full((int(value), 1), value)], now_ns=int(t * SECOND))
    state = monitor.window("time", now_ns=int(12.5 * SECOND))  # sub-windows 3..12
    assert state.rows == 2 + 3 + 4
    assert state.start_ns == int(3.5 * SECOND) and state.end_ns == int(12.5 * SECOND)
    assert state.mean[0] == pytest.approx((4 + 9 + 16) / 9)
    assert monitor.window("time", now_ns=int(22.9 * SECOND)).rows == 0  # sub-window 12 has left
    assert monitor.window("rows").rows == 10


def test_merge_equals_observing_the_union_and_bytes_round_trip() -> None:
    rng = np.random.default_rng(6)
    reference = build_reference(mixed_data(rng, 3000), MIXED_KINDS)
    a, b, union = (make_monitor(MIXED_FEATURES, window_rows=5000, sub_windows=5) for _ in range(3))
    for m in (a, b, union):
        m.set_reference(reference)
    x, y = mixed_data(rng, 800, shift=1.0), mixed_data(rng, 1200)
    a.observe([x], now_ns=10)
    b.observe([y], now_ns=20)
    union.observe([x], now_ns=10)
    union.observe([y], now_ns=20)
    merged = _core.WindowState.from_bytes(a.window("rows").to_bytes())
    merged.merge(_core.WindowState.from_bytes(b.window("rows").to_bytes()))
    expected = union.window("rows")
    for field in ("rows", "outlier_rows", "out_of_range_rows", "nonfinite_rows", "start_ns", "end_ns"):
        assert getattr(merged, field) == getattr(expected, field), field
    for field in ("count", "nan", "inf", "out_of_range", "min", "max", "bin_counts"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(expected, field), err_msg=field)
    for field in ("sum", "sum_sq", "mean", "std"):
        np.testing.assert_allclose(getattr(merged, field), getattr(expected, field), rtol=1e-12, err_msg=field)

    data = bytearray(expected.to_bytes())
    data[len(data) // 2] ^= 0x10
    with pytest.raises(InvalidInput, match="corrupt"):
        _core.WindowState.from_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="not a window state"):
        _core.WindowState.from_bytes(b"not a state at all")
    other = make_monitor(MIXED_FEATURES)
    other.set_reference(build_reference(mixed_data(rng, 3000), MIXED_KINDS))
    with pytest.raises(InvalidInput, match="different references"):
        merged.merge(other.window("rows"))


# ---- evaluation ----


def test_evaluate_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    ref_rows = mixed_data(rng, 10_000)
    reference = build_reference(ref_rows, MIXED_KINDS, mahalanobis_features=[])
    window = mixed_data(rng, 2000, shift=0.2)
    monitor = make_monitor(MIXED_FEATURES, window_rows=2000, sub_windows=10)
    monitor.set_reference(reference)
    monitor.observe([window])
    state = monitor.window("rows")
    eps = 1e-4
    report = _core.evaluate_drift(reference, state, correction="none", eps=eps)
    n, m = 2000, 10_000
    for i, kind in enumerate(MIXED_KINDS):
        p = reference.probabilities[i]
        counts = state.histogram(i)
        bins = len(p)
        q = counts / counts.sum()
        ps, qs = (p + eps) / (1 + bins * eps), (q + eps) / (1 + bins * eps)
        assert report.psi[i] == pytest.approx(np.sum((qs - ps) * np.log(qs / ps)), rel=1e-9)
        assert report.js[i] == pytest.approx(spatial.distance.jensenshannon(p, q, base=2), rel=1e-6, abs=1e-9)
        if kind == "numeric":
            exact = stats.ks_2samp(ref_rows[:, i], window[:, i]).statistic
            assert report.ks[i] <= exact + 1e-12
            assert exact <= report.ks[i] + report.ks_error_bound[i] + 1e-12
            n_eff = n * m / (n + m)
            root = math.sqrt(n_eff)  # Stephens' form of the asymptotic Kolmogorov distribution
            expected_p = special.kolmogorov((root + 0.12 + 0.11 / root) * report.ks[i])
            assert report.p_value[i] == pytest.approx(expected_p, rel=1e-9)
            w = stats.wasserstein_distance(ref_rows[:, i], window[:, i]) / reference.std[i]
            assert report.wasserstein[i] == pytest.approx(w, abs=0.05)
            assert math.isnan(report.chi2[i])
        else:
            expected = n * ps
            chi = stats.chisquare(counts, expected)
            assert report.chi2[i] == pytest.approx(chi.statistic, rel=1e-9)
            assert report.p_value[i] == pytest.approx(chi.pvalue, rel=1e-6)
            assert math.isnan(report.ks[i]) and math.isnan(report.wasserstein[i])
        assert report.mean[i] == pytest.approx(window[:, i].mean())
        assert report.std[i] == pytest.approx(window[:, i].std())
    np.testing.assert_allclose(report.adjusted_p_value, report.p_value)
    bh = _core.evaluate_drift(reference, state)
    np.testing.assert_allclose(bh.adjusted_p_value, stats.false_discovery_control(report.p_value), rtol=1e-9)
    bonferroni = _core.evaluate_drift(monitor, state, correction="bonferroni")
    np.testing.assert_allclose(bonferroni.adjusted_p_value, np.minimum(report.p_value * 6, 1.0), rtol=1e-12)
    assert report.rows == 2000 and report.missing_ratio.tolist() == [0.0] * 6
    assert bh.status[2] == "alert" and 2 in bh.alerting and bh.alert


def test_evaluate_status_rules_and_arguments() -> None:
    rng = np.random.default_rng(8)
    reference = build_reference(rng.standard_normal((10_000, 2)), ["numeric"] * 2)
    monitor = make_monitor(numeric_features(2))
    monitor.set_reference(reference)
    empty = _core.evaluate_drift(monitor, monitor.window("rows"))
    assert np.isnan(empty.psi).all() and np.isnan(empty.p_value).all() and empty.status == ["ok", "ok"]
    assert not empty.alert and math.isnan(empty.outlier_rate)
    x = rng.standard_normal((1000, 2))
    x[:, 1] += 0.4
    monitor.observe([x])
    state = monitor.window("rows")
    # Loose p-value rules: the status follows PSI alone.
    psi = _core.evaluate_drift(monitor, state).psi
    assert psi[0] < 0.05 < psi[1] < 0.5
    report = _core.evaluate_drift(monitor, state, alpha=1e-300, psi_warn=0.05, psi_alert=10.0)
    assert report.status == ["ok", "warn"] and report.warning == [1] and not report.alert
    report = _core.evaluate_drift(monitor, state, alpha=1e-300, psi_warn=0.05, psi_alert=psi[1])
    assert report.status == ["ok", "alert"] and report.alerting == [1] and report.alert
    with pytest.raises(InvalidInput, match="correction"):
        _core.evaluate_drift(monitor, state, correction="holm")
    with pytest.raises(InvalidInput, match="alpha"):
        _core.evaluate_drift(monitor, state, alpha=1.5)
    with pytest.raises(InvalidInput, match="no reference"):
        _core.evaluate_drift(make_monitor(numeric_features(2)), state)
    other = build_reference(rng.standard_normal((100, 2)), ["numeric"] * 2)
    with pytest.raises(InvalidInput, match="not made over this reference"):
        _core.evaluate_drift(other, state)


# ---- the synthetic scenarios ----

FEATURES_50 = numeric_features(50)


def test_half_sd_shift_in_one_of_50_features_alerts_within_two_windows() -> None:
    rng = np.random.default_rng(20)
    reference = build_reference(rng.standard_normal((10_000, 50)), ["numeric"] * 50)
    monitor = make_monitor(FEATURES_50, window_rows=1000, sub_windows=10)
    monitor.set_reference(reference)
    reports = []
    for _ in range(2):
        x = rng.standard_normal((1000, 50))
        x[:, 17] += 0.5
        monitor.observe([x])
        reports.append(_core.evaluate_drift(monitor, monitor.window("rows")))
    assert any(r.alert and r.status[17] == "alert" for r in reports)
    assert reports[-1].alerting == [17]


def test_false_alarm_rate_without_shift_is_at_most_alpha() -> None:
    rng = np.random.default_rng(21)
    reference = build_reference(rng.standard_normal((10_000, 50)), ["numeric"] * 50)
    monitor = make_monitor(FEATURES_50, window_rows=1000, sub_windows=10)
    monitor.set_reference(reference)
    alarms = 0
    windows = 1000
    for _ in range(windows // 100):
        block = rng.standard_normal((100_000, 50))
        for start in range(0, 100_000, 1000):
            monitor.observe([block[start : start + 1000]])
            alarms += _core.evaluate_drift(monitor, monitor.window("rows")).alert
    assert monitor.rows_observed == windows * 1000
    assert alarms / windows <= 0.05, alarms


# ---- bounds ----


def test_memory_of_50_features_is_well_under_8_mb() -> None:
    rng = np.random.default_rng(22)
    monitor = make_monitor(FEATURES_50)
    collecting = monitor.memory_bytes  # the live-reference buffer: 10,000 rows x 50
    monitor.set_reference(build_reference(rng.standard_normal((10_000, 50)), ["numeric"] * 50))
    rings = monitor.memory_bytes  # both rings of 10 sub-windows, 20 bins a feature
    assert 4_000_000 <= collecting < 4_100_000
    assert rings < 500_000
    assert collecting + rings < 8 * 1024 * 1024


def test_reference_file_round_trip_is_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    values = np.column_stack([rng.standard_normal((10_000, 49)), rng.integers(0, 12, 10_000)])
    names = [f"x[{i}]" for i in range(50)]
    reference = build_reference(values, ["numeric"] * 49 + ["categorical"], names=names)
    path = tmp_path / "reference.npz"
    reference.save(path)
    assert path.stat().st_size < 1024 * 1024
    loaded = Reference.load(path)
    assert loaded.names == tuple(names) and loaded.kinds == reference.kinds and loaded.rows == 10_000
    for a, b in zip(loaded.edges + loaded.probabilities, reference.edges + reference.probabilities):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.precision, reference.precision)
    assert loaded.outlier_threshold == reference.outlier_threshold
    assert loaded.to_core().layout == reference.to_core().layout


def test_reference_file_errors_name_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    reference = build_reference(rng.standard_normal((500, 3)), ["numeric"] * 3)
    good = tmp_path / "good.npz"
    reference.save(good)
    with np.load(good) as data:
        arrays = dict(data)
    bad_cases = {
        "missing.npz": {k: v for k, v in arrays.items() if k != "precision"},
        "unsorted.npz": {**arrays, "edges": arrays["edges"][::-1].copy()},
        "short.npz": {**arrays, "mean": arrays["mean"][:2]},
        "version.npz": {**arrays, "format_version": np.int64(99)},
    }
    for name, content in bad_cases.items():
        np.savez(tmp_path / name, **content)
        with pytest.raises(ConfigError, match=name):
            Reference.load(tmp_path / name)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="garbage.npz"):
        Reference.load(tmp_path / "garbage.npz")
    with pytest.raises(ConfigError, match="absent.npz"):
        Reference.load(tmp_path / "absent.npz")


# ---- the reference builder ----


def test_reference_bins_match_the_cpp_binning() -> None:
    rng = np.random.default_rng(25)
    values = np.column_stack([
        rng.standard_normal(4000),
        rng.integers(0, 3, 4000).astype(float),  # discrete: deduplicated edges
        rng.integers(0, 80, 4000).astype(float),  # 80 categories, capped at 50
    ])
    values[::97, 0] = np.nan
    reference = build_reference(values, ["numeric", "numeric", "categorical"], bins=10, max_categories=50)
    assert len(reference.edges[0]) == 9
    np.testing.assert_array_equal(reference.edges[1], [1.0, 2.0])
    assert len(reference.edges[2]) == 50 and reference.probabilities[2][-1] > 0
    assert reference.std[0] == pytest.approx(np.nanstd(values[:, 0]))
    monitor = make_monitor([
        {"name": "a", "column": 0}, {"name": "b", "column": 1}, {"name": "c", "column": 2, "kind": "categorical"},
    ], window_rows=4000, sub_windows=1)  # fmt: skip
    monitor.set_reference(reference)
    monitor.observe([values])
    state = monitor.window("rows")
    for i in range(3):
        np.testing.assert_allclose(state.histogram(i) / state.count[i], reference.probabilities[i], rtol=1e-12)


def test_build_reference_arguments() -> None:
    x = np.zeros((10, 2))
    with pytest.raises(InvalidInput, match="kinds"):
        build_reference(x, ["numeric"])
    with pytest.raises(InvalidInput, match="kinds"):
        build_reference(x, ["numeric", "ordinal"])
    with pytest.raises(InvalidInput, match="mahalanobis_features"):
        build_reference(x, ["numeric", "categorical"], mahalanobis_features=[1])
    with pytest.raises(InvalidInput, match="values"):
        build_reference(np.zeros(5), ["numeric"])
    all_nan = build_reference(np.full((5, 1), np.nan), ["numeric"])
    assert all_nan.edges[0].size == 0 and all_nan.mahalanobis_features.size == 0 and np.isnan(all_nan.mean[0])


def test_monitor_arguments_are_checked() -> None:
    with pytest.raises(InvalidInput, match="colum"):
        _core.Monitor(features=[{"name": "x", "colum": 1}])
    with pytest.raises(InvalidInput, match="derive"):
        _core.Monitor(features=[{"name": "x", "derive": "mode"}])
    with pytest.raises(InvalidInput, match="window_rows"):
        _core.Monitor(features=[{"name": "x"}], window_rows=1001)
    monitor = _core.Monitor(features=numeric_features(2))
    with pytest.raises(InvalidInput, match="column 1"):
        monitor.observe([np.zeros((4, 1))])
    with pytest.raises(InvalidInput, match="kind"):
        monitor.window("sessions")
    with pytest.raises(InvalidInput, match="'mean'"):
        _core.Reference(kinds=["numeric"], edges=[[0.0]], probabilities=[[0.5, 0.5]], mean=[0.0, 1.0], std=[1.0],
                        min=[0.0], max=[1.0], rows=10)
    with pytest.raises(InvalidInput, match="reference feature 0"):
        _core.Reference(kinds=["numeric"], edges=[[0.0]], probabilities=[[0.5]], mean=[0.0], std=[1.0],
                        min=[0.0], max=[1.0], rows=10)


# ---- in the batcher ----


def test_batcher_with_monitor_appends_flags_and_keeps_outputs() -> None:
    rng = np.random.default_rng(27)
    monitor = make_monitor(numeric_features(4))
    monitor.set_reference(build_reference(rng.standard_normal((2000, 4)), ["numeric"] * 4))
    batcher = _core.Batcher(
        model_name="m", inputs=[("x", "FP32", [4])],
        outputs=[("y", "FP32", [4]), ("__monitor_flags", "UINT8", [1])],
        executor=lambda inputs, instance: [inputs[0] * 2], max_batch_size=8, monitor=monitor,
    )  # fmt: skip
    try:
        x = rng.standard_normal((3, 4)).astype(np.float32)
        x[1, 2] = 50.0
        x[2, 0] = np.nan
        (y, flags), offset, rows = batcher.infer((x,))
        np.testing.assert_array_equal(y[offset : offset + rows], x * 2)
        assert flags.dtype == np.uint8 and flags.shape == (3, 1)
        assert flags[:, 0].tolist() == [0, FLAG_OUT_OF_RANGE | FLAG_OUTLIER, FLAG_NONFINITE]
        assert monitor.rows_observed == 3 and monitor.failed_batches == 0
    finally:
        batcher.stop()
    with pytest.raises(InvalidInput, match="__monitor_flags"):
        _core.Batcher(model_name="m", inputs=[("x", "FP32", [4])], outputs=[("y", "FP32", [4])],
                      executor=lambda inputs, instance: [inputs[0]], max_batch_size=8, monitor=monitor)


def test_batcher_with_monitor_for_a_model_without_batch_dimension() -> None:
    monitor = make_monitor(numeric_features(3), reference_rows=2)
    batcher = _core.Batcher(
        model_name="m", inputs=[("x", "FP64", [3])],
        outputs=[("y", "FP64", [3]), ("__monitor_flags", "UINT8", [1])],
        executor=lambda inputs, instance: [inputs[0] + 1], max_batch_size=0, monitor=monitor,
    )  # fmt: skip
    try:
        (y, flags), _, _ = batcher.infer((np.array([1.0, 2.0, 3.0]),))
        np.testing.assert_array_equal(y, [2.0, 3.0, 4.0])
        assert flags.shape == (1,) and flags[0] == 0
        np.testing.assert_array_equal(monitor.take_reference_rows(), [[1.0, 2.0, 3.0]])
    finally:
        batcher.stop()
