"""The trees backend's evaluator against Treelite's GTIL and each library's own predict.

    PYTHONPATH=python python -m pytest bench/bench_trees.py --benchmark-enable

Two models on 32 float features (10% missing): XGBoost, 200 trees of depth 6, and
LightGBM, 200 trees of 31 leaves, both binary classifiers. One thread on every side:
Conveyor's TreeEnsemble.run (what the batcher calls, without the GIL), GTIL with
nthread=1, xgboost's inplace_predict with nthread=1 and lightgbm's
predict(num_threads=1). Each is timed per call at batch 1 and per call of 1024 rows
(the ratio is the per-row ratio). Ratios are printed at the end; nothing here asserts
a timing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.backends import create_backend
from conveyor.config import parse_model_config

treelite = pytest.importorskip("treelite", reason="the trees backend needs treelite (pip install conveyor-serve[trees])")
gtil = pytest.importorskip("treelite.gtil")

FEATURES = 32
TREES = 200
TRAIN_ROWS = 20_000
BATCHES = (1, 1024)
# Calls per timed round: enough that a batch-1 round is well above the timer's resolution.
CALLS_PER_ROUND = {1: 200, 1024: 1}
GOAL_VS_GTIL = {1024: 5.0}


def _data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    y = (x[:, :8].sum(axis=1) + 0.5 * rng.standard_normal(rows) > 0).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    return x, y


def _xgboost(directory: Path) -> tuple[Path, Callable[[np.ndarray], Any]]:
    xgb = pytest.importorskip("xgboost")
    x, y = _data(TRAIN_ROWS, 0)
    params = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.1, "nthread": 2, "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=TREES)
    booster.set_param({"nthread": 1})
    path = directory / "model.json"
    booster.save_model(str(path))
    return path, lambda rows: booster.inplace_predict(rows)


def _lightgbm(directory: Path) -> tuple[Path, Callable[[np.ndarray], Any]]:
    lgb = pytest.importorskip("lightgbm")
    x, y = _data(TRAIN_ROWS, 0)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "num_threads": 2, "verbose": -1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=TREES)
    path = directory / "model.txt"
    booster.save_model(str(path))
    return path, lambda rows: booster.predict(rows, num_threads=1)


@pytest.fixture(scope="module", params=["xgboost", "lightgbm"])
def sides(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three predictors of one framework's model, keyed by side."""
    framework = request.param
    directory = tmp_path_factory.mktemp(framework)
    path, library = (_xgboost if framework == "xgboost" else _lightgbm)(directory)
    config = parse_model_config({"backend": "trees", "max_batch_size": 1024}, source="bench", name=framework)
    ensemble = create_backend(config, directory).native_executor
    model = treelite.frontend.load_lightgbm_model(path) if path.suffix == ".txt" else treelite.frontend.load_xgboost_model(path)
    x, _ = _data(max(BATCHES), 1)
    # The sides must agree before their speed means anything.
    np.testing.assert_allclose(ensemble.run([x])[0][:, 1], gtil.predict(model, x, nthread=1).reshape(-1), rtol=1e-5, atol=1e-6)
    return {
        "framework": framework,
        "x": x,
        "conveyor": lambda rows: ensemble.run([rows]),
        "gtil": lambda rows: gtil.predict(model, rows, nthread=1),
        framework: library,
    }


@pytest.mark.parametrize("side", ["conveyor", "gtil", "library"])
@pytest.mark.parametrize("batch", BATCHES)
def test_predict(benchmark: Any, ratio_report: Any, sides: dict[str, Any], batch: int, side: str) -> None:
    framework = sides["framework"]
    label = framework if side == "library" else side
    predict = sides[label]
    rows = np.ascontiguousarray(sides["x"][:batch])
    calls = CALLS_PER_ROUND[batch]

    def run() -> None:
        for _ in range(calls):
            predict(rows)

    benchmark.group = f"{framework}, batch {batch}"
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_row"] = benchmark.stats.stats.median / calls / batch * 1e6
    unit = "per row" if batch > 1 else "per call"
    for baseline in ("gtil", framework):
        name = f"{framework} {TREES} trees, batch {batch} ({unit}), Conveyor vs {baseline}"
        if side == "conveyor":
            goal = GOAL_VS_GTIL.get(batch) if baseline == "gtil" else None
            ratio_report.candidate(name, benchmark, label="TreeEnsemble.run", goal_speedup=goal)
        elif label == baseline:
            ratio_report.baseline(name, benchmark, label=baseline)
