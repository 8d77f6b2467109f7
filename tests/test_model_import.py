"""conveyor.import_model and `conveyor import`: trained models into a repository, checked for parity."""

from __future__ import annotations

import tomllib
from pathlib import Path

import conveyor
import numpy as np
import pytest
from conveyor.errors import ConfigError
from conveyor.repository import ModelRepository

pytest.importorskip("treelite", reason="the trees backend reads models through treelite (conveyor-serve[trees])")


def data(rows: int = 400, features: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)


def parameters(root: Path, name: str) -> dict:
    return tomllib.loads((root / name / "config.toml").read_text())["parameters"]


def test_an_xgboost_classifier_object_imports_as_trees_with_its_parity_recorded(tmp_path: Path) -> None:
    xgboost = pytest.importorskip("xgboost")
    x, y = data()
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=4, n_jobs=1).fit(x, y)
    result = conveyor.import_model(model, repository=tmp_path, name="churn", sample=x[:100])
    assert result.version_dir == tmp_path / "churn" / "1" and result.backend == "trees"
    assert (tmp_path / "churn" / "1" / "model.json").is_file()
    assert result.max_abs_difference <= 1e-4 and result.class_agreement == 1.0
    recorded = parameters(tmp_path, "churn")
    assert recorded["import_max_abs_difference"] == pytest.approx(result.max_abs_difference)
    assert recorded["import_source"] == "a xgboost.sklearn.XGBClassifier"
    source = ModelRepository(tmp_path).load_model("churn")
    assert source.config.backend == "trees" and source.config.max_batch_size == 1024
    # A second import is the next version; the config (and its parity record) is kept and updated.
    again = conveyor.import_model(model, repository=tmp_path, name="churn")
    assert again.version_dir.name == "2" and again.rows == 256


def test_a_lightgbm_regressor_and_a_scikit_learn_forest_import(tmp_path: Path) -> None:
    lightgbm = pytest.importorskip("lightgbm")
    ensemble = pytest.importorskip("sklearn.ensemble")
    x, y = data()
    regressor = lightgbm.LGBMRegressor(n_estimators=20, num_leaves=8, n_jobs=1, verbose=-1).fit(x, y.astype(float))
    result = conveyor.import_model(regressor, repository=tmp_path, name="price")
    assert result.max_abs_difference <= 1e-4 and result.class_agreement is None
    forest = ensemble.RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x, y)
    result = conveyor.import_model(forest, repository=tmp_path, name="forest", sample=x[:50])
    assert (tmp_path / "forest" / "1" / "model.tl").is_file()
    assert result.max_abs_difference <= 1e-4 and result.class_agreement == 1.0


def test_the_command_imports_a_saved_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xgboost = pytest.importorskip("xgboost")
    from conveyor.cli import main

    x, y = data()
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
                            xgboost.DMatrix(x, label=y), num_boost_round=10)  # fmt: skip
    booster.save_model(str(tmp_path / "trained.json"))
    np.save(tmp_path / "rows.npy", x[:64])
    code = main(["import", str(tmp_path / "trained.json"), "--repository", str(tmp_path / "repo"), "--name", "m",
                 "--sample", str(tmp_path / "rows.npy")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "parity on 64 rows" in out and "class agreement 100.00%" in out
    assert (tmp_path / "repo" / "m" / "1" / "model.json").is_file()


def test_a_parity_failure_refuses_the_import_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xgboost = pytest.importorskip("xgboost")
    import conveyor.model_import as model_import

    x, y = data()
    model = xgboost.XGBClassifier(n_estimators=5, max_depth=3, n_jobs=1).fit(x, y)
    real = model_import._object_predictor

    def off_by_a_bit(source):
        predict = real(source)
        return lambda rows: predict(rows) + 0.01

    monkeypatch.setattr(model_import, "_object_predictor", off_by_a_bit)
    with pytest.raises(ConfigError, match=r"refused: .*differ from the source's by up to 0\.01 .* tolerance 0\.0001"):
        conveyor.import_model(model, repository=tmp_path, name="m")
    assert not (tmp_path / "m" / "1").exists() and not (tmp_path / "m" / "config.toml").exists()


def test_unsupported_sources_are_refused_with_what_to_do(tmp_path: Path) -> None:
    x, y = data()
    with pytest.raises(ConfigError, match="export other models to ONNX"):
        conveyor.import_model(np.polynomial.Polynomial([1.0, 2.0]), repository=tmp_path, name="m")
    (tmp_path / "model.pkl").write_bytes(b"not imported")
    with pytest.raises(ConfigError, match=r"cannot import a \.pkl file"):
        conveyor.import_model(tmp_path / "model.pkl", repository=tmp_path, name="m")
    with pytest.raises(ConfigError, match="rows of 6 features"):
        model = pytest.importorskip("xgboost").XGBRegressor(n_estimators=3, n_jobs=1).fit(x, y)
        conveyor.import_model(model, repository=tmp_path, name="m", sample=x[:, :3])
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_a_pytorch_package_imports_as_torch_with_its_parity(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="the torch backend needs torch (conveyor-serve[torch])")
    import warnings

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.randn(2, 6),), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "net.pt2"))
    x, _ = data(features=6)
    result = conveyor.import_model(tmp_path / "net.pt2", repository=tmp_path / "repo", name="net", sample=x[:64])
    assert result.backend == "torch" and (tmp_path / "repo" / "net" / "1" / "model.pt2").is_file()
    assert result.max_abs_difference <= 1e-4 and result.rows == 64
