"""conveyor.import_model for models converted to ONNX: scikit-learn, CatBoost, Keras 3."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import conveyor
import numpy as np
import pytest
from conveyor.errors import ConfigError
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime


SKL2ONNX_MISSING = "scikit-learn estimators convert through skl2onnx (conveyor-serve[skl2onnx])"


def data(rows: int = 300, features: int = 5, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    return x, (x[:, 0] - 0.5 * x[:, 2] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def config(root: Path, name: str) -> dict:
    return tomllib.loads((root / name / "config.toml").read_text())


def signature(root: Path, name: str) -> tuple[list, list]:
    written = config(root, name)
    return ([(t["name"], t["datatype"], t["dims"]) for t in written["inputs"]],
            [(t["name"], t["datatype"], t["dims"]) for t in written["outputs"]])  # fmt: skip


def serve(root: Path, name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    with Runtime() as runtime:
        source = ModelRepository(root).load_model(name)
        version, version_dir = max(source.versions.items())
        runtime.add_model(name, source.config, model_dir=version_dir, version=version)
        return runtime.infer(name, {"features": rows})


def test_a_scikit_learn_pipeline_ending_in_a_forest_imports_as_onnx_with_plain_tensors(tmp_path: Path) -> None:
    pytest.importorskip("skl2onnx", reason=SKL2ONNX_MISSING)
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = data()
    pipeline = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0))
    result = conveyor.import_model(pipeline.fit(x, y), repository=tmp_path, name="churn", sample=x[:100])
    assert result.backend == "onnx" and (tmp_path / "churn" / "1" / "model.onnx").is_file()
    assert result.max_abs_difference <= 1e-5 and result.class_agreement == 1.0
    assert signature(tmp_path, "churn") == (
        [("features", "FP32", [5])], [("label", "INT64", []), ("probabilities", "FP32", [3])]
    )
    written = config(tmp_path, "churn")
    assert written["max_batch_size"] == 1024
    assert written["parameters"]["import_source"] == "a sklearn.pipeline.Pipeline"
    answer = serve(tmp_path, "churn", x[:7])
    np.testing.assert_array_equal(answer["label"], pipeline.predict(x[:7]))
    np.testing.assert_allclose(answer["probabilities"], pipeline.predict_proba(x[:7]), atol=1e-6)


def test_scikit_learn_linear_models_import_and_their_errors_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("skl2onnx", reason=SKL2ONNX_MISSING)
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.svm import LinearSVC

    x, y = data()
    result = conveyor.import_model(Ridge().fit(x, x @ np.arange(5.0)), repository=tmp_path, name="price")
    assert result.max_abs_difference <= 1e-4 and result.class_agreement is None
    assert signature(tmp_path, "price")[1] == [("variable", "FP32", [1])]
    # Labels only (no predict_proba): compared on the labels.
    result = conveyor.import_model(LinearSVC().fit(x, y), repository=tmp_path, name="svm")
    assert result.max_abs_difference == 0.0 and result.class_agreement == 1.0
    with pytest.raises(ConfigError, match="not fitted .* fit it first"):
        conveyor.import_model(LogisticRegression(), repository=tmp_path, name="m")
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    custom = make_pipeline(FunctionTransformer(np.abs), LogisticRegression()).fit(x, y)
    with pytest.raises(ConfigError, match=r"skl2onnx cannot convert the scikit-learn Pipeline \(RuntimeError: .*own "
                                          r"skl2onnx converter"):
        conveyor.import_model(custom, repository=tmp_path, name="custom")
    assert not (tmp_path / "custom").exists() or not any((tmp_path / "custom").iterdir())
    monkeypatch.setitem(sys.modules, "skl2onnx", None)
    missing = r"skl2onnx, which is not installed .*pip install conveyor-serve\[skl2onnx\]"
    with pytest.raises(ConfigError, match=missing):
        conveyor.import_model(LogisticRegression().fit(x, y), repository=tmp_path, name="m")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_catboost_models_import_through_their_onnx_export_and_categorical_features_are_refused(
    tmp_path: Path,
) -> None:
    catboost = pytest.importorskip("catboost", reason="CatBoost models need catboost (conveyor-serve[catboost])")
    x, y = data()
    options = {"verbose": False, "thread_count": 1, "allow_writing_files": False, "random_seed": 0}
    classifier = catboost.CatBoostClassifier(iterations=20, depth=4, **options)
    result = conveyor.import_model(classifier.fit(x, y), repository=tmp_path, name="classes", sample=x[:100])
    assert result.max_abs_difference <= 1e-5 and result.class_agreement == 1.0
    assert signature(tmp_path, "classes")[1] == [("label", "INT64", []), ("probabilities", "FP32", [3])]
    regressor = catboost.CatBoostRegressor(iterations=20, depth=4, **options)
    result = conveyor.import_model(regressor.fit(x, x[:, 3]), repository=tmp_path, name="amount")
    assert result.max_abs_difference <= 1e-5
    # CatBoost declares the regressor's output [N] and answers [N, 1]: the written signature is what it answers.
    assert signature(tmp_path, "amount")[1] == [("predictions", "FP32", [1])]
    assert serve(tmp_path, "amount", x[:3])["predictions"].shape == (3, 1)

    rows = [[float(v), "red" if v > 0 else "blue"] for v in x[:, 0]]
    categorical = catboost.CatBoostClassifier(iterations=5, cat_features=[1], **options)
    with pytest.raises(ConfigError, match="numeric features only, and this model has categorical features 1"):
        conveyor.import_model(categorical.fit(rows, y), repository=tmp_path, name="colour")
    assert not (tmp_path / "colour" / "1").exists()


def test_a_keras_model_imports_through_its_onnx_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="Keras runs here on its torch backend (conveyor-serve[torch])")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 models need keras (conveyor-serve[keras])")
    if keras.backend.backend() not in ("torch", "tensorflow"):
        pytest.skip(f"Keras was imported with the {keras.backend.backend()} backend, which has no ONNX export here")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), name="features"), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3, activation="softmax", name="scores")])  # fmt: skip
    x, _ = data()
    result = conveyor.import_model(model, repository=tmp_path, name="net", sample=x[:64])
    assert result.backend == "onnx" and result.max_abs_difference <= 1e-5 and result.rows == 64
    assert signature(tmp_path, "net") == ([("features", "FP32", [5])], [("scores", "FP32", [3])])
    with pytest.raises(ConfigError, match="has not been built; give it a keras.Input"):
        conveyor.import_model(keras.Sequential([keras.layers.Dense(2)]), repository=tmp_path, name="unbuilt")
