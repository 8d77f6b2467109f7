"""The trees backend against each library's own predict and Treelite's GTIL, through the runtime.

Models are trained here on data with missing values (NaN), saved as the library saves
them, and served from a repository; every output is compared at request sizes of 1
row, an odd count and max_batch_size. A library that is not installed skips its tests.
"""

from __future__ import annotations

import http.client
import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import conveyor
from conveyor.backends import TreesBackend, create_backend, model_file_path
from conveyor.config import parse_model_config
from conveyor.errors import ConfigError, InvalidInput
from conveyor.server.serve import ServeOptions
from server_thread import ServerThread

treelite = pytest.importorskip("treelite", reason="the trees backend needs treelite (pip install conveyor-serve[trees])")
gtil = pytest.importorskip("treelite.gtil")

FEATURES = 6
MAX_BATCH = 16
REQUEST_ROWS = (1, 7, MAX_BATCH)
# Relative tolerance 1e-5; the absolute floor covers margins and probabilities that sum to ~0.
RTOL, ATOL = 1e-5, 1e-6


def training_data(rows: int = 400, *, missing: bool = True, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    if missing:
        x[rng.random(x.shape) < 0.1] = np.nan
    score = np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 1]) - np.nan_to_num(x[:, 2]) ** 2
    return x, score.astype(np.float32)


def serving_rows(*, missing: bool = True) -> np.ndarray:
    """Rows to serve: fresh ones with NaNs, plus an all-NaN row and exact thresholds' neighbours."""
    x, _ = training_data(MAX_BATCH * 3 + 5, missing=missing, seed=11)
    if missing:
        x[0, :] = np.nan
    return np.ascontiguousarray(x)


def classes_of(score: np.ndarray, count: int) -> np.ndarray:
    edges = np.quantile(score, np.linspace(0, 1, count + 1)[1:-1])
    return np.searchsorted(edges, score).astype(np.int64)


def write_model(root: Path, name: str, file_name: str, save: Callable[[Path], None], config: str = "") -> Path:
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    save(version_dir / file_name)
    (root / name / "config.toml").write_text(f'backend = "trees"\nmax_batch_size = {MAX_BATCH}\n{config}')
    return version_dir / file_name


def serve(root: Path, name: str, x: np.ndarray, *, rows_per_request: int) -> dict[str, np.ndarray]:
    """Every output of `name` for the rows of x, sent in requests of `rows_per_request` rows."""
    with conveyor.Runtime.from_repository(root) as runtime:
        parts = [runtime.infer(name, {"features": x[i : i + rows_per_request]}) for i in range(0, len(x), rows_per_request)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def gtil_outputs(model_file: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(postprocessed, margins) from Treelite's reference predictor, as [rows, outputs]."""
    if model_file.suffix == ".txt":
        model = treelite.frontend.load_lightgbm_model(model_file)
    elif model_file.suffix == ".tl":
        model = treelite.Model.deserialize(model_file)
    else:
        model = treelite.frontend.load_xgboost_model(model_file)
    rows = len(x)
    return (
        gtil.predict(model, x).reshape(rows, -1),
        gtil.predict(model, x, pred_margin=True).reshape(rows, -1),
    )


def check_classifier(root: Path, name: str, model_file: Path, x: np.ndarray, proba: np.ndarray, margin: np.ndarray) -> None:
    """Served outputs against the library's (proba [rows, classes], margin [rows, margins]) and GTIL's."""
    reference, reference_margin = gtil_outputs(model_file, x)
    if proba.shape[1] == 2 and reference.shape[1] == 1:  # a binary model's GTIL output is p alone
        reference = np.column_stack([1 - reference[:, 0], reference[:, 0]])
    for rows in REQUEST_ROWS:
        got = serve(root, name, x, rows_per_request=rows)
        assert sorted(got) == ["label", "probabilities", "raw_margin"]
        assert got["probabilities"].dtype == np.float32 and got["label"].dtype == np.int64
        np.testing.assert_allclose(got["probabilities"], proba, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["probabilities"], reference, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["raw_margin"], margin.reshape(len(x), -1), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["raw_margin"], reference_margin, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(got["label"], np.argmax(got["probabilities"], axis=1))
        decided = np.sort(proba, axis=1)[:, -1] - np.sort(proba, axis=1)[:, -2] > 1e-4  # not a near tie
        np.testing.assert_array_equal(got["label"][decided], np.argmax(proba, axis=1)[decided])


def check_regressor(root: Path, name: str, model_file: Path, x: np.ndarray, prediction: np.ndarray) -> None:
    reference, reference_margin = gtil_outputs(model_file, x)
    for rows in REQUEST_ROWS:
        got = serve(root, name, x, rows_per_request=rows)
        assert sorted(got) == ["prediction", "raw_margin"]
        assert got["prediction"].shape == (len(x),)
        np.testing.assert_allclose(got["prediction"], prediction, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["prediction"], reference[:, 0], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["raw_margin"], reference_margin, rtol=RTOL, atol=ATOL)


# ---- XGBoost ------------------------------------------------------------------------------


def xgboost_booster(objective: str, target: np.ndarray, x: np.ndarray, **params: Any) -> Any:
    xgb = pytest.importorskip("xgboost")
    params = {"objective": objective, "max_depth": 4, "eta": 0.3, "nthread": 1, "seed": 0, **params}
    return xgb.train(params, xgb.DMatrix(x, label=target, missing=np.nan), num_boost_round=12)


@pytest.mark.parametrize("file_name", ["model.json", "model.ubj"])
def test_xgboost_binary_classifier(tmp_path: Path, file_name: str) -> None:
    xgb = pytest.importorskip("xgboost")
    x_train, score = training_data()
    booster = xgboost_booster("binary:logistic", (score > 0).astype(np.float32), x_train)
    model_file = write_model(tmp_path, "xgb", file_name, lambda path: booster.save_model(str(path)))
    x = serving_rows()
    p = booster.predict(xgb.DMatrix(x, missing=np.nan))
    margin = booster.predict(xgb.DMatrix(x, missing=np.nan), output_margin=True)
    check_classifier(tmp_path, "xgb", model_file, x, np.column_stack([1 - p, p]), margin)


def test_xgboost_multiclass_softprob(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    x_train, score = training_data()
    booster = xgboost_booster("multi:softprob", classes_of(score, 3), x_train, num_class=3)
    model_file = write_model(tmp_path, "xgb3", "model.json", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    proba = booster.predict(xgb.DMatrix(x, missing=np.nan))
    margin = booster.predict(xgb.DMatrix(x, missing=np.nan), output_margin=True)
    check_classifier(tmp_path, "xgb3", model_file, x, proba, margin)


def test_xgboost_regressor(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    x_train, score = training_data()
    booster = xgboost_booster("reg:squarederror", score, x_train)
    model_file = write_model(tmp_path, "xgbr", "model.ubj", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    check_regressor(tmp_path, "xgbr", model_file, x, booster.predict(xgb.DMatrix(x, missing=np.nan)))


def test_leaf_ids_when_listed_are_the_libraries_node_ids(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    x_train, score = training_data()
    booster = xgboost_booster("binary:logistic", (score > 0).astype(np.float32), x_train)
    config = '[[outputs]]\nname = "leaf_ids"\ndatatype = "INT32"\ndims = [12]\n'
    config += '[[outputs]]\nname = "label"\ndatatype = "INT64"\ndims = []\n'
    model_file = write_model(tmp_path, "leaves", "model.json", lambda path: booster.save_model(str(path)), config)
    x = serving_rows()
    got = serve(tmp_path, "leaves", x, rows_per_request=7)
    assert sorted(got) == ["label", "leaf_ids"]
    assert got["leaf_ids"].dtype == np.int32 and got["leaf_ids"].shape == (len(x), 12)
    np.testing.assert_array_equal(got["leaf_ids"], booster.predict(xgb.DMatrix(x, missing=np.nan), pred_leaf=True))
    model = treelite.frontend.load_xgboost_model(model_file)
    np.testing.assert_array_equal(got["leaf_ids"], gtil.predict_leaf(model, x))


# ---- LightGBM -----------------------------------------------------------------------------


def lightgbm_booster(params: dict[str, Any], target: np.ndarray, x: np.ndarray) -> Any:
    lgb = pytest.importorskip("lightgbm")
    params = {"num_leaves": 15, "learning_rate": 0.2, "num_threads": 1, "verbose": -1, "seed": 0, **params}
    return lgb.train(params, lgb.Dataset(x, label=target), num_boost_round=12)


def test_lightgbm_binary_classifier(tmp_path: Path) -> None:
    x_train, score = training_data()
    booster = lightgbm_booster({"objective": "binary"}, (score > 0).astype(np.float32), x_train)
    model_file = write_model(tmp_path, "lgb", "model.txt", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    p = booster.predict(x)
    check_classifier(tmp_path, "lgb", model_file, x, np.column_stack([1 - p, p]), booster.predict(x, raw_score=True))


def test_lightgbm_multiclass(tmp_path: Path) -> None:
    x_train, score = training_data()
    booster = lightgbm_booster({"objective": "multiclass", "num_class": 3}, classes_of(score, 3), x_train)
    model_file = write_model(tmp_path, "lgb3", "model.txt", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    check_classifier(tmp_path, "lgb3", model_file, x, booster.predict(x), booster.predict(x, raw_score=True))


def test_lightgbm_regressor(tmp_path: Path) -> None:
    x_train, score = training_data()
    booster = lightgbm_booster({"objective": "regression"}, score, x_train)
    model_file = write_model(tmp_path, "lgbr", "model.txt", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    check_regressor(tmp_path, "lgbr", model_file, x, booster.predict(x))


def _relevance(score: np.ndarray) -> np.ndarray:
    """Graded relevance 0-3 from the score, for the ranking objectives."""
    return np.digitize(score, np.quantile(score, [0.25, 0.5, 0.75])).astype(np.float32)


def test_xgboost_ranker_serves_its_scores(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    x_train, score = training_data()
    train = xgb.DMatrix(x_train, label=_relevance(score), missing=np.nan)
    train.set_group([20] * (len(x_train) // 20))  # 20 queries of 20 documents
    params = {"objective": "rank:pairwise", "max_depth": 4, "eta": 0.3, "nthread": 1, "seed": 0}
    booster = xgb.train(params, train, num_boost_round=12)
    model_file = write_model(tmp_path, "xgbrank", "model.json", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    check_regressor(tmp_path, "xgbrank", model_file, x, booster.predict(xgb.DMatrix(x, missing=np.nan)))


def test_lightgbm_ranker_serves_its_scores(tmp_path: Path) -> None:
    lgb = pytest.importorskip("lightgbm")
    x_train, score = training_data()
    params = {"objective": "lambdarank", "num_leaves": 15, "learning_rate": 0.2, "num_threads": 1, "verbose": -1,
              "seed": 0, "min_data_in_leaf": 5}  # fmt: skip
    train = lgb.Dataset(x_train, label=_relevance(score), group=[20] * (len(x_train) // 20))
    booster = lgb.train(params, train, num_boost_round=12)
    model_file = write_model(tmp_path, "lgbrank", "model.txt", lambda path: booster.save_model(str(path)))
    x = serving_rows()
    check_regressor(tmp_path, "lgbrank", model_file, x, booster.predict(x))


def test_lightgbm_zero_as_missing_is_refused_with_what_to_do(tmp_path: Path) -> None:
    x_train, score = training_data(missing=False)
    x_train[np.random.default_rng(0).random(x_train.shape) < 0.2] = 0.0
    booster = lightgbm_booster({"objective": "binary", "zero_as_missing": True}, (score > 0).astype(np.float32), x_train)
    write_model(tmp_path, "zeros", "model.txt", lambda path: booster.save_model(str(path)))
    with pytest.raises(ConfigError, match="zero_as_missing=true.*retrain with zero_as_missing=false"):
        create_backend(trees_config(), tmp_path / "zeros" / "1")


# ---- scikit-learn (through a Treelite checkpoint) -------------------------------------------


def save_sklearn(estimator: Any) -> Callable[[Path], None]:
    pytest.importorskip("treelite.sklearn")
    import treelite.sklearn

    return lambda path: treelite.sklearn.import_model(estimator).serialize(path)


def test_sklearn_random_forest_classifier(tmp_path: Path) -> None:
    ensemble = pytest.importorskip("sklearn.ensemble")
    x_train, score = training_data()
    forest = ensemble.RandomForestClassifier(n_estimators=8, max_depth=6, random_state=0).fit(x_train, classes_of(score, 3))
    model_file = write_model(tmp_path, "rf", "model.tl", save_sklearn(forest))
    x = serving_rows()
    proba = forest.predict_proba(x)
    check_classifier(tmp_path, "rf", model_file, x, proba, proba)  # averaged leaf vectors: the margin is the proba


def test_sklearn_random_forest_regressor(tmp_path: Path) -> None:
    ensemble = pytest.importorskip("sklearn.ensemble")
    x_train, score = training_data()
    forest = ensemble.RandomForestRegressor(n_estimators=8, max_depth=6, random_state=0).fit(x_train, score)
    model_file = write_model(tmp_path, "rfr", "model.tl", save_sklearn(forest))
    x = serving_rows()
    check_regressor(tmp_path, "rfr", model_file, x, forest.predict(x))


def test_sklearn_gradient_boosting_classifier(tmp_path: Path) -> None:
    ensemble = pytest.importorskip("sklearn.ensemble")
    # scikit-learn's GradientBoostingClassifier does not accept NaN: trained and served without.
    x_train, score = training_data(missing=False)
    gbm = ensemble.GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=0).fit(x_train, score > 0)
    model_file = write_model(tmp_path, "gbc", "model.tl", save_sklearn(gbm))
    x = serving_rows(missing=False)
    check_classifier(tmp_path, "gbc", model_file, x, gbm.predict_proba(x), gbm.decision_function(x))


# ---- signature, configuration and errors ----------------------------------------------------


@pytest.fixture
def binary_model(tmp_path: Path) -> Path:
    """A repository holding model 'xgb', an XGBoost binary classifier; returns its model file."""
    x_train, score = training_data()
    booster = xgboost_booster("binary:logistic", (score > 0).astype(np.float32), x_train)
    return write_model(tmp_path, "xgb", "model.json", lambda path: booster.save_model(str(path)))


def trees_config(**fields: Any) -> Any:
    return parse_model_config({"backend": "trees", **fields}, source="test", name="m")


def test_the_signature_is_filled_from_the_model(binary_model: Path) -> None:
    with conveyor.Runtime.from_repository(binary_model.parents[2]) as runtime:
        config = runtime.model("xgb").config
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("features", "FP32", [FEATURES])]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [
        ("probabilities", "FP32", [2]), ("label", "INT64", []), ("raw_margin", "FP32", [1]),
    ]  # fmt: skip
    # The repository fills it too (what the server's model listeners see before loading).
    source = conveyor.repository.ModelRepository(binary_model.parents[2]).load_model("xgb")
    assert source.config.inputs == config.inputs and source.config.outputs == config.outputs


def test_without_batching_every_tensor_leads_with_a_variable_row_dim(binary_model: Path) -> None:
    backend = create_backend(trees_config(), binary_model.parent)
    assert backend.config.inputs[0].dims == [-1, FEATURES]
    assert {t.name: t.dims for t in backend.config.outputs} == {"probabilities": [-1, 2], "label": [-1], "raw_margin": [-1, 1]}
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", trees_config(), model_dir=binary_model.parent)
        got = runtime.infer("m", {"features": serving_rows()[:5]})
    assert got["probabilities"].shape == (5, 2)


def test_a_listed_input_may_take_another_name_and_outputs_a_subset(binary_model: Path) -> None:
    config = trees_config(
        max_batch_size=8,
        inputs=[{"name": "input__0", "datatype": "FP32", "dims": [FEATURES]}],
        outputs=[{"name": "label", "datatype": "INT64", "dims": []}],
    )
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", config, model_dir=binary_model.parent)
        got = runtime.infer("m", {"input__0": serving_rows()[:3]})
    assert list(got) == ["label"] and got["label"].shape == (3,)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"inputs": [{"name": "features", "datatype": "FP32", "dims": [FEATURES + 1]}]}, r"expected dims \[6\]"),
        ({"inputs": [{"name": "features", "datatype": "FP64", "dims": [FEATURES]}]}, "expected datatype FP32"),
        ({"outputs": [{"name": "prediction", "datatype": "FP32", "dims": []}]}, "expected one of the model's outputs"),
        ({"outputs": [{"name": "probabilities", "datatype": "FP32", "dims": [3]}]}, r"expected dims \[2\]"),
    ],
)
def test_a_config_that_disagrees_with_the_model_fails_to_load(binary_model: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_backend(trees_config(max_batch_size=4, **fields), binary_model.parent)


def test_a_row_with_the_wrong_number_of_features_is_invalid_input(binary_model: Path) -> None:
    with conveyor.Runtime.from_repository(binary_model.parents[2]) as runtime:
        with pytest.raises(InvalidInput):
            runtime.infer("xgb", {"features": np.zeros((2, FEATURES - 1), dtype=np.float32)})
        assert runtime.infer("xgb", {"features": serving_rows()[:2]})["label"].shape == (2,)
    backend = create_backend(trees_config(), binary_model.parent)
    with pytest.raises(InvalidInput, match=r"expected float32 features \[rows, 6\]"):
        backend.execute([np.zeros((2, FEATURES + 1), dtype=np.float32)])


def test_batches_run_in_cpp_without_calling_python(binary_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    execute = TreesBackend.execute

    def counted(self: TreesBackend, inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(threading.get_ident())
        return execute(self, inputs)

    monkeypatch.setattr(TreesBackend, "execute", counted)
    x = serving_rows()
    direct = create_backend(trees_config(), binary_model.parent).native_executor.run([x])[0]
    results: dict[int, np.ndarray] = {}
    with conveyor.Runtime.from_repository(binary_model.parents[2]) as runtime:

        def call(i: int) -> None:
            results[i] = runtime.infer("xgb", {"features": x[i : i + 1 + i % 3]})["probabilities"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # Backend.execute ran once, on this thread: the probe batch at load. The batches ran in C++.
    assert calls == [threading.get_ident()]
    assert sorted(results) == list(range(32))
    for i, got in results.items():
        np.testing.assert_array_equal(got, direct[i : i + 1 + i % 3])


def test_run_outputs_outlive_the_call_and_each_other(binary_model: Path) -> None:
    # One pooled block holds every output of a call; each array keeps it alive on its own.
    ensemble = create_backend(trees_config(), binary_model.parent).native_executor
    x = serving_rows()
    probabilities, label, raw_margin = ensemble.run([x])
    expected = probabilities.copy()
    np.testing.assert_array_equal(label, expected.argmax(axis=1))
    del label, raw_margin
    for _ in range(4):  # calls that would reuse the block, had it gone back to the pool
        ensemble.run([x[:1]])
        ensemble.run([x])
    np.testing.assert_array_equal(probabilities, expected)
    np.testing.assert_array_equal(ensemble.run([x[:1]])[0], expected[:1])


def test_a_bad_model_file_fails_to_load_while_the_others_serve(binary_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = binary_model.parents[2]
    write_model(root, "broken", "model.json", lambda path: path.write_text('{"learner": "not a model"}'))
    with pytest.raises(ConfigError, match=r"Treelite cannot read it as a XGBoost \(JSON\) model"):
        create_backend(trees_config(), root / "broken" / "1")
    with caplog.at_level(logging.ERROR, logger="conveyor.runtime"), conveyor.Runtime.from_repository(root) as runtime:
        assert runtime.infer("xgb", {"features": serving_rows()[:1]})["label"].shape == (1,)
        with pytest.raises(conveyor.errors.ModelNotFound):
            runtime.model("broken")
    assert "model broken failed to load" in caplog.text


def test_a_version_needs_exactly_one_tree_model_file(binary_model: Path) -> None:
    version_dir = binary_model.parent
    (version_dir / "model.txt").write_text("tree\n")
    with pytest.raises(ConfigError, match=r"expected exactly one tree model file of model.json .*found model.json and model.txt"):
        model_file_path("trees", version_dir)
    empty = version_dir.parent / "2"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint.tl \(Treelite checkpoint\); found none"):
        create_backend(trees_config(), empty)
    problems = [entry.reason for entry in conveyor.repository.ModelRepository(version_dir.parents[1]).index()]
    assert any("found none" in reason for reason in problems)


def test_an_unsupported_model_kind_names_what_is_unsupported(tmp_path: Path) -> None:
    ensemble = pytest.importorskip("sklearn.ensemble")
    x_train, _ = training_data(missing=False)
    forest = ensemble.IsolationForest(n_estimators=4, random_state=0).fit(x_train)
    write_model(tmp_path, "iso", "model.tl", save_sklearn(forest))
    with pytest.raises(ConfigError, match="isolation forests are not supported by the trees backend"):
        create_backend(trees_config(), tmp_path / "iso" / "1")


def test_without_treelite_loading_says_how_to_install_it(binary_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "treelite", None)
    with pytest.raises(ConfigError, match=r"pip install conveyor-serve\[trees\]"):
        create_backend(trees_config(), binary_model.parent)


def test_trees_runs_only_on_the_cpu() -> None:
    with pytest.raises(ConfigError, match="the trees backend runs on the CPU"):
        trees_config(instance_group={"device": "cuda"})


def test_over_http_a_row_of_the_wrong_width_is_a_400_and_the_metadata_names_the_backend(
    binary_model: Path, tmp_path: Path
) -> None:
    def post(port: int, rows: np.ndarray) -> tuple[int, dict[str, Any]]:
        body = {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32",
                            "data": np.nan_to_num(rows).reshape(-1).tolist()}]}  # fmt: skip
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/v2/models/xgb/infer", body=json.dumps(body))
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    options = ServeOptions(repository=binary_model.parents[2], http_port=0, grpc_port=0, data_dir=tmp_path / "data",
                           grace_period_s=30, server_version="test")  # fmt: skip
    thread = ServerThread(options)
    try:
        status, answer = post(thread.port, np.zeros((2, FEATURES - 1), dtype=np.float32))
        assert status == 400 and "features" in answer["error"], answer
        status, answer = post(thread.port, serving_rows()[:3])
        assert status == 200, answer
        assert [output["name"] for output in answer["outputs"]] == ["probabilities", "label", "raw_margin"]
        connection = http.client.HTTPConnection("127.0.0.1", thread.port, timeout=30)
        connection.request("GET", "/v2/models/xgb")
        metadata = json.loads(connection.getresponse().read())
        connection.close()
        assert metadata["platform"] == "trees"
        assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURES]}]
    finally:
        thread.stop()
