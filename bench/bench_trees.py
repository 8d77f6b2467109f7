"""The trees backend's evaluator against Treelite's GTIL, onnxruntime, lleaves and each library's own predict.

    PYTHONPATH=python python -m pytest bench/bench_trees.py --benchmark-enable

Two models on 32 float features (10% missing): XGBoost, 200 trees of depth 6, and
LightGBM, 200 trees of 31 leaves, both binary classifiers. One thread on every side:
Conveyor's TreeEnsemble.run (what the batcher calls, without the GIL; configured to
return the probabilities alone, the one output onnxruntime is asked for), GTIL with
nthread=1, xgboost's inplace_predict with nthread=1, lightgbm's predict(num_threads=1),
onnxruntime on the model converted by onnxmltools (intra- and inter-op threads 1,
sequential execution) and, for LightGBM, lleaves (the model compiled with LLVM for this
machine's CPU, predict(n_jobs=1)). onnxmltools and lleaves are bench-only packages
(bench/README.md); a side whose package is missing is skipped. Each is timed per call at
batch 1 and per call of 1024 rows (the ratio is the per-row ratio). Ratios are printed
at the end; nothing here asserts a timing.
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
# The goals: baseline time / Conveyor's time, per batch size.
GOALS = {"gtil": {1024: 5.0}, "onnxruntime": {1: 3.0, 1024: 2.0}}
SIDES = ("conveyor", "gtil", "library", "onnxruntime", "lleaves")


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


def _onnxruntime(framework: str, path: Path) -> tuple[Callable[[np.ndarray], Any] | str, str]:
    """The model converted by onnxmltools, run by onnxruntime on one thread; or why it cannot be.

    Also returns a note on the converted model's declared output shapes where onnxruntime's
    answer disagrees with them (onnxruntime then logs a VerifyOutputSizes warning on every run;
    the timed session logs errors only, so the log line is not part of its time).
    """
    try:
        import onnxmltools
        import onnxruntime as ort
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as exc:
        return f"onnxmltools is not installed ({exc}); pip install onnxmltools", ""
    initial_types = [("features", FloatTensorType([None, FEATURES]))]
    if framework == "xgboost":
        import xgboost as xgb

        converted = onnxmltools.convert_xgboost(xgb.Booster(model_file=str(path)), initial_types=initial_types)
    else:
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(path))
        converted = onnxmltools.convert_lightgbm(booster, initial_types=initial_types, zipmap=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(converted.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows = np.zeros((3, FEATURES), np.float32)
    answers = session.run(None, {"features": rows})
    notes = []
    for output, answer in zip(session.get_outputs(), answers):
        declared = [dim if isinstance(dim, int) else None for dim in output.shape]
        if len(declared) != answer.ndim or any(d is not None and d != a for d, a in zip(declared, answer.shape)):
            notes.append(f"{output.name} declared {output.shape}, answered {list(answer.shape)} for 3 rows")
    note = f"the onnxmltools-converted {framework} model's output shape is wrong: " + "; ".join(notes) if notes else ""
    probabilities = session.get_outputs()[1].name
    return (lambda rows: session.run([probabilities], {"features": rows})), note


def _lleaves(path: Path, directory: Path) -> Callable[[np.ndarray], Any] | str:
    """The LightGBM model compiled by lleaves, predicting on one thread; or why it cannot be."""
    try:
        import lleaves
    except ImportError as exc:
        return f"lleaves is not installed ({exc}); see bench/README.md"
    model = lleaves.Model(model_file=str(path))
    try:
        model.compile(cache=str(directory / "lleaves.so"))
    except AttributeError as exc:  # lleaves 1.3 uses llvmlite's legacy pass manager, gone in llvmlite 0.45
        return f"lleaves cannot compile with this llvmlite ({exc}); pip install 'llvmlite<0.45'"
    return lambda rows: model.predict(rows, n_jobs=1)


def _lightgbm(directory: Path) -> tuple[Path, Callable[[np.ndarray], Any]]:
    lgb = pytest.importorskip("lightgbm")
    x, y = _data(TRAIN_ROWS, 0)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "num_threads": 2, "verbose": -1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=TREES)
    path = directory / "model.txt"
    booster.save_model(str(path))
    return path, lambda rows: booster.predict(rows, num_threads=1)


@pytest.fixture(scope="module", params=["xgboost", "lightgbm"])
def sides(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ratio_report: Any
) -> dict[str, Any]:
    """The predictors of one framework's model, keyed by side (a string: why that side is skipped)."""
    framework = request.param
    directory = tmp_path_factory.mktemp(framework)
    path, library = (_xgboost if framework == "xgboost" else _lightgbm)(directory)
    # onnxruntime is asked for the probabilities alone; Conveyor's config lists that one
    # output too, so each side hands one array back per call (the default signature would
    # add label and raw_margin: two more arrays, computed and returned).
    probabilities = {"name": "probabilities", "datatype": "FP32", "dims": [2]}
    config = parse_model_config(
        {"backend": "trees", "max_batch_size": 1024, "outputs": [probabilities]}, source="bench", name=framework
    )
    ensemble = create_backend(config, directory).native_executor
    model = treelite.frontend.load_lightgbm_model(path) if path.suffix == ".txt" else treelite.frontend.load_xgboost_model(path)
    x, _ = _data(max(BATCHES), 1)
    onnxruntime, note = _onnxruntime(framework, path)
    predictors = {
        "framework": framework,
        "x": x,
        "conveyor": lambda rows: ensemble.run([rows]),
        "gtil": lambda rows: gtil.predict(model, rows, nthread=1),
        framework: library,
        "onnxruntime": onnxruntime,
        "lleaves": _lleaves(path, directory) if framework == "lightgbm" else "lleaves compiles LightGBM models only",
    }
    # The sides must agree before their speed means anything.
    ours = ensemble.run([x])[0][:, 1]
    np.testing.assert_allclose(ours, gtil.predict(model, x, nthread=1).reshape(-1), rtol=1e-5, atol=1e-6)
    if callable(onnxruntime):
        np.testing.assert_allclose(ours, onnxruntime(x)[0][:, 1], rtol=1e-4, atol=1e-5)
    if callable(predictors["lleaves"]):
        np.testing.assert_allclose(ours, predictors["lleaves"](x), rtol=1e-5, atol=1e-6)
    if note:
        ratio_report.note(note)
    return predictors


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("batch", BATCHES)
def test_predict(benchmark: Any, ratio_report: Any, sides: dict[str, Any], batch: int, side: str) -> None:
    framework = sides["framework"]
    label = framework if side == "library" else side
    predict = sides[label]
    if isinstance(predict, str):
        pytest.skip(predict)
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
    for baseline in ("gtil", framework, "onnxruntime", "lleaves"):
        if baseline == "lleaves" and framework != "lightgbm":
            continue
        name = f"{framework} {TREES} trees, batch {batch} ({unit}), Conveyor vs {baseline}"
        if side == "conveyor":
            goal = GOALS.get(baseline, {}).get(batch)
            ratio_report.candidate(name, benchmark, label="TreeEnsemble.run", goal_speedup=goal)
        elif label == baseline:
            ratio_report.baseline(name, benchmark, label=baseline)
