"""Triton FIL model repositories served unchanged on the trees backend: output__0 as FIL gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conveyor.errors import ConfigError
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime

pytest.importorskip("treelite", reason="the trees backend reads models through treelite (conveyor-serve[trees])")
xgboost = pytest.importorskip("xgboost")

FEATURES = 8


def fil_pbtxt(model_type: str, output_dims: int, *, output_class: bool, predict_proba: bool = False,
              extra: str = "") -> str:  # fmt: skip
    return f"""
backend: "fil"
max_batch_size: 4096
input [ {{ name: "input__0" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]
output [ {{ name: "output__0" data_type: TYPE_FP32 dims: [ {output_dims} ] }} ]
instance_group [ {{ kind: KIND_CPU }} ]
parameters [
  {{ key: "model_type" value: {{ string_value: "{model_type}" }} }},
  {{ key: "output_class" value: {{ string_value: "{str(output_class).lower()}" }} }},
  {{ key: "predict_proba" value: {{ string_value: "{str(predict_proba).lower()}" }} }},
  {{ key: "storage_type" value: {{ string_value: "AUTO" }} }}
  {extra}
]
dynamic_batching {{ }}
"""


def rows(count: int = 200, seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((count, FEATURES)).astype(np.float32)
    x[::7, 2] = np.nan  # missing values take each tree's default branch
    return x


@pytest.fixture(scope="module")
def classifier() -> object:
    x = rows(600, seed=1)
    y = (np.nan_to_num(x[:, 0]) + x[:, 1] > 0).astype(np.int64)
    params = {"objective": "binary:logistic", "max_depth": 4, "nthread": 1}
    return xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=20)


def write(root: Path, name: str, pbtxt: str, save: object) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(pbtxt)
    save(root / name / "1")


def serve(root: Path, name: str, x: np.ndarray) -> np.ndarray:
    with Runtime.from_repository(root, models=[name]) as runtime:
        return runtime.infer(name, {"input__0": x})["output__0"]


def test_a_fil_classifier_answers_the_class_index_or_its_probabilities(tmp_path: Path, classifier) -> None:
    save = lambda directory: classifier.save_model(str(directory / "xgboost.json"))  # noqa: E731
    write(tmp_path, "classes", fil_pbtxt("xgboost_json", 1, output_class=True), save)
    write(tmp_path, "proba", fil_pbtxt("xgboost_json", 2, output_class=True, predict_proba=True), save)
    x = rows()
    expected = classifier.predict(xgboost.DMatrix(x))
    classes = serve(tmp_path, "classes", x)
    assert classes.dtype == np.float32 and classes.shape == (len(x), 1)
    np.testing.assert_array_equal(classes[:, 0], (expected > 0.5).astype(np.float32))
    probabilities = serve(tmp_path, "proba", x)
    np.testing.assert_allclose(probabilities[:, 1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_a_fil_regressor_answers_one_column(tmp_path: Path) -> None:
    lightgbm = pytest.importorskip("lightgbm")
    x = rows(600, seed=2)
    model = lightgbm.train({"objective": "regression", "num_leaves": 15, "verbose": -1, "num_threads": 1},
                           lightgbm.Dataset(x, label=np.nan_to_num(x[:, 0]) * 2.0), num_boost_round=20)  # fmt: skip
    save = lambda directory: model.save_model(str(directory / "model.txt"))  # noqa: E731
    write(tmp_path, "reg", fil_pbtxt("lightgbm", 1, output_class=False), save)
    x = rows()
    got = serve(tmp_path, "reg", x)
    assert got.shape == (len(x), 1)
    np.testing.assert_allclose(got[:, 0], model.predict(x, num_threads=1), rtol=1e-5, atol=1e-5)


def test_fil_tuning_parameters_are_listed_and_a_threshold_is_refused(tmp_path: Path, classifier) -> None:
    save = lambda directory: classifier.save_model(str(directory / "xgboost.json"))  # noqa: E731
    write(tmp_path, "m", fil_pbtxt("xgboost_json", 1, output_class=True), save)
    write(tmp_path, "t", fil_pbtxt("xgboost_json", 1, output_class=True,
                                   extra=', { key: "threshold" value: { string_value: "0.3" } }'), save)  # fmt: skip
    repository = ModelRepository(tmp_path)
    states = {(e.name, e.version): e for e in repository.index()}
    assert states[("m", 1)].state == "READY"
    assert "parameters.threshold" in states[("t", None)].reason
    from conveyor.protocol.triton_pbtxt import read_config_pbtxt

    ignored = read_config_pbtxt(tmp_path / "m" / "config.pbtxt", name="m").ignored
    assert any(entry.startswith("parameters.storage_type") for entry in ignored)
    with pytest.raises(ConfigError, match=r"parameters.model_type"):
        (tmp_path / "m" / "config.pbtxt").write_text(fil_pbtxt("catboost", 1, output_class=True))
        read_config_pbtxt(tmp_path / "m" / "config.pbtxt", name="m")
