"""`conveyor import` and `conveyor.import_model`: a trained model into a repository, checked for parity.

A model trained elsewhere becomes a version directory and a config.toml:
- XGBoost (a Booster or a scikit-learn-API model; or a saved model.json / .ubj file),
  LightGBM (a Booster or an LGBM* model; or a saved .txt file) and scikit-learn forests
  and gradient boosting (through Treelite's checkpoint) are served by the trees backend;
- other scikit-learn estimators and Pipelines (through skl2onnx, ZipMap off), CatBoost
  models with numeric features (its own ONNX export) and Keras 3 models
  (`Model.export(format="onnx")`) are converted to ONNX for the onnx backend
  (conveyor.model_import_onnx);
- an ONNX file is served by the onnx backend, a PyTorch package (.pt2, torch.export +
  AOTInductor with a dynamic batch dim) by torch, a Treelite checkpoint (.tl) by trees.
A config.toml written by the import holds the signature the loaded model declared.
The server never unpickles anything: objects are saved here, in the caller's process,
in their library's own format.

Parity: the imported version is run by Conveyor on a sample (the caller's, or rows made
from the signature) and compared with the source's own prediction (the object's
predict_proba/predict, or the library reading the file, or onnxruntime). The largest
absolute difference and the agreement of predicted classes are printed and written
into the config's [parameters] (import_max_abs_difference, import_class_agreement);
an import whose difference exceeds the tolerance is refused, and what it wrote is
removed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import model_import_onnx
from conveyor.config import (
    CONFIG_FILE_NAME,
    MODEL_NAME_PATTERN,
    load_model_config,
    parse_model_config,
)
from conveyor.errors import ConfigError
from conveyor.toml_text import toml_text

__all__ = ["ImportResult", "import_model", "register_import_command"]

DEFAULT_TOLERANCE = 1e-4
SAMPLE_ROWS = 256
TREES_MAX_BATCH_SIZE = 1024
# max_batch_size of a model converted here to ONNX (its batch dim is variable).
CONVERTED_MAX_BATCH_SIZE = 1024
# A file's suffix -> (backend, the name it takes in the version directory).
_FILES = {".json": ("trees", "model.json"), ".ubj": ("trees", "model.ubj"), ".txt": ("trees", "model.txt"),
          ".tl": ("trees", "model.tl"), ".onnx": ("onnx", "model.onnx"), ".pt2": ("torch", "model.pt2")}  # fmt: skip
# A framework (its top-level module) -> the conveyor.model_import_onnx function converting its models.
_ONNX_CONVERTERS = {"sklearn": "sklearn_to_onnx", "catboost": "catboost_to_onnx", "keras": "keras_to_onnx"}
_SKLEARN_TREES = ("RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier", "ExtraTreesRegressor",
                  "GradientBoostingClassifier", "GradientBoostingRegressor")  # fmt: skip


@dataclass
class ImportResult:
    """Where the import went and how close Conveyor's answers are to the source's."""

    version_dir: Path
    backend: str
    max_abs_difference: float
    class_agreement: float | None  # classifiers only
    rows: int


def import_model(
    source: Any, *, repository: Path, name: str, sample: Any = None, tolerance: float = DEFAULT_TOLERANCE,
) -> ImportResult:  # fmt: skip
    """Write `source` (a model object or a file) as the next version of `name` in `repository`.

    `sample`: rows to check parity on (an array, or a .npy/.csv file); default rows made
    from the signature. ConfigError when the source is not supported, or its parity
    fails the tolerance (nothing is left behind then).
    """
    with new_version(repository, name) as (model_dir, version_dir, created_config):
        backend, predict, max_batch_size = _write(source, version_dir)
        settings = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
        config = write_config(model_dir, backend, created_config, settings)
        result, loaded = _parity(config, version_dir, predict, sample, backend)
        if not result.max_abs_difference <= tolerance:
            raise ConfigError(
                f"import of {_describe(source)} refused: Conveyor's answers differ from the source's by up to "
                f"{result.max_abs_difference:.3g} on {result.rows} rows, over the tolerance {tolerance:g}"
                + (f" (class agreement {result.class_agreement:.2%})" if result.class_agreement is not None else "")
            )
        recorded: dict[str, Any] = {"import_source": _describe(source),
                                    "import_max_abs_difference": result.max_abs_difference}  # fmt: skip
        if result.class_agreement is not None:
            recorded["import_class_agreement"] = result.class_agreement
        record_parameters(model_dir, recorded, signature=loaded if created_config else None)
        return result


@contextlib.contextmanager
def new_version(repository: Path, name: str) -> Iterator[tuple[Path, Path, bool]]:
    """Creates the next version directory of model `name`; yields (model dir, version dir, whether the
    model had no config.toml yet). On any error inside the block, the version directory and a config
    the block created are removed again, so a failed import or export leaves nothing behind."""
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ConfigError(f"invalid model name {name!r}: expected letters, digits, '_', '.' or '-'")
    model_dir = Path(repository) / name
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    version_dir = model_dir / str(max(versions, default=0) + 1)
    created_config = not (model_dir / CONFIG_FILE_NAME).is_file()
    created_dir = not model_dir.exists()
    version_dir.mkdir(parents=True)
    try:
        yield model_dir, version_dir, created_config
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        if created_config:
            (model_dir / CONFIG_FILE_NAME).unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise


# ---- writing the version ----------------------------------------------------------------------


def _write(source: Any, version_dir: Path) -> tuple[str, Any, int | None]:
    """Saves the source into `version_dir`; returns its backend, its own predict(rows) and the
    max_batch_size a new config takes (None: the backend's default)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: no such model file")
        if path.suffix not in _FILES:
            raise ConfigError(f"{path}: cannot import a {path.suffix or 'suffix-less'} file; expected one of "
                              f"{', '.join(_FILES)} (or pass the model object to conveyor.import_model)")  # fmt: skip
        backend, target = _FILES[path.suffix]
        shutil.copyfile(path, version_dir / target)
        max_batch_size = TREES_MAX_BATCH_SIZE if backend == "trees" else None
        return backend, _file_predictor(version_dir / target), max_batch_size
    kind = type(source)
    module = kind.__module__.split(".")[0]
    if module == "xgboost":
        booster = source.get_booster() if hasattr(source, "get_booster") else source
        booster.save_model(str(version_dir / "model.json"))
        return "trees", _object_predictor(source), TREES_MAX_BATCH_SIZE
    if module == "lightgbm":
        booster = source.booster_ if hasattr(source, "booster_") else source
        booster.save_model(str(version_dir / "model.txt"))
        return "trees", _object_predictor(source), TREES_MAX_BATCH_SIZE
    if module == "sklearn" and kind.__name__ in _SKLEARN_TREES:
        import treelite.sklearn

        treelite.sklearn.import_model(source).serialize(str(version_dir / "model.tl"))
        return "trees", _object_predictor(source), TREES_MAX_BATCH_SIZE
    converter = _ONNX_CONVERTERS.get(module)
    if converter is not None:
        predict = getattr(model_import_onnx, converter)(source, version_dir / "model.onnx")
        return "onnx", predict, CONVERTED_MAX_BATCH_SIZE
    raise ConfigError(
        f"cannot import {_describe(source)}: supported are XGBoost, LightGBM, scikit-learn, CatBoost and Keras 3 "
        f"models, and model files ({', '.join(_FILES)}); export other models to ONNX and import the .onnx file"
    )


def _object_predictor(model: Any) -> Any:
    def predict(rows: np.ndarray) -> np.ndarray:
        if hasattr(model, "predict_proba"):
            return np.asarray(model.predict_proba(rows))
        if type(model).__module__.startswith("xgboost"):  # a Booster
            import xgboost

            return np.asarray(model.predict(xgboost.DMatrix(rows)))
        return np.asarray(model.predict(rows))

    return predict


def _file_predictor(path: Path) -> Any:
    """The source library's own reading of a saved file (None when it is not installed)."""
    def predict(rows: np.ndarray) -> np.ndarray | None:
        try:
            if path.name in ("model.json", "model.ubj"):
                import xgboost

                return np.asarray(xgboost.Booster(model_file=str(path)).predict(xgboost.DMatrix(rows)))
            if path.name == "model.txt":
                import lightgbm

                return np.asarray(lightgbm.Booster(model_file=str(path)).predict(rows, num_threads=1))
            if path.name == "model.tl":
                import treelite

                return np.asarray(treelite.gtil.predict(treelite.Model.deserialize(str(path)), rows))
            if path.name == "model.pt2":
                import torch

                answer = torch._inductor.aoti_load_package(str(path))(torch.from_numpy(np.ascontiguousarray(rows)))
                first = answer[0] if isinstance(answer, (list, tuple)) else answer
                return first.detach().numpy()
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return np.asarray(session.run(None, {session.get_inputs()[0].name: rows})[0])
        except ImportError:
            return None

    return predict


def write_config(model_dir: Path, backend: str, create: bool, settings: dict[str, Any]) -> Any:
    """The model's config: written (backend and `settings`) when `create`, else read and checked to
    name the same backend."""
    path = model_dir / CONFIG_FILE_NAME
    if create:
        data: dict[str, Any] = {"backend": backend, **settings}
        path.write_text(toml_text(data), encoding="utf-8")
    config = load_model_config(path, name=model_dir.name)
    if config.backend != backend:
        raise ConfigError(f"{path}: the model is served by backend {config.backend!r}; this import is {backend!r}")
    return config


# ---- parity ------------------------------------------------------------------------------------


def _parity(config: Any, version_dir: Path, predict: Any, sample: Any, backend: str) -> tuple[ImportResult, Any]:
    """Conveyor's answers on the sample against the source's; also the config the model loaded with."""
    from conveyor.runtime import Runtime

    with Runtime() as runtime:
        runtime.add_model(config.name, config, model_dir=version_dir, version=int(version_dir.name))
        handle = runtime.model(config.name)
        loaded = handle.config
        input_tensor = loaded.inputs[0]
        rows = _sample_rows(sample, input_tensor, loaded.max_batch_size)
        batch = max(1, loaded.max_batch_size)
        answers = [runtime.infer(config.name, {input_tensor.name: rows[start : start + batch]})
                   for start in range(0, len(rows), batch)]  # fmt: skip
    ours = {key: np.concatenate([a[key] for a in answers]) for key in answers[0]}
    theirs = predict(rows)
    if theirs is None:  # the library that wrote the file is not installed: nothing to compare with
        return ImportResult(version_dir, backend, 0.0, None, len(rows)), loaded
    if isinstance(theirs, dict):
        difference, agreement = _compare_outputs(ours, theirs, len(rows))
        return ImportResult(version_dir, backend, difference, agreement, len(rows)), loaded
    compared = ours.get("probabilities", ours.get("prediction", next(iter(ours.values()))))
    compared = np.asarray(compared, np.float64).reshape(len(rows), -1)
    theirs = np.asarray(theirs, np.float64).reshape(len(rows), -1)
    if compared.shape[1] == 2 and theirs.shape[1] == 1:  # a binary library answer: P(class 1) only
        compared = compared[:, 1:]
    if compared.shape != theirs.shape:
        raise ConfigError(f"parity: Conveyor answers {compared.shape[1]} values per row, the source {theirs.shape[1]}")
    difference = float(np.max(np.abs(compared - theirs))) if len(rows) else 0.0
    agreement = None
    if "probabilities" in ours:
        mine = compared.argmax(axis=1) if compared.shape[1] > 1 else (compared[:, 0] > 0.5)
        source = theirs.argmax(axis=1) if theirs.shape[1] > 1 else (theirs[:, 0] > 0.5)
        agreement = float(np.mean(mine == source))
    return ImportResult(version_dir, backend, difference, agreement, len(rows)), loaded


def _compare_outputs(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], rows: int) -> tuple[float, Any]:
    """The source's answers by output name: `label` gives the class agreement, the others the difference.

    A classifier with labels only (no predict_proba) is compared on its labels: a difference
    of 0 when every label agrees, else the largest numeric gap (inf for text labels).
    """
    for name in theirs:
        if name not in ours:
            raise ConfigError(f"parity: the converted model has no output {name!r} (it has {', '.join(ours)})")
    agreement = None
    if "label" in theirs:
        mine, source = _labels(ours["label"]).reshape(rows), _labels(theirs["label"]).reshape(rows)
        agreement = float(np.mean(mine == source)) if rows else 1.0
    difference = 0.0
    for name, answer in theirs.items():
        if name == "label" and len(theirs) > 1:
            continue
        mine = np.asarray(ours[name]).reshape(rows, -1)
        source = np.asarray(answer).reshape(rows, -1)
        if mine.shape != source.shape:
            raise ConfigError(
                f"parity: Conveyor answers {mine.shape[1]} values per row in {name!r}, the source {source.shape[1]}"
            )
        if name == "label" and not (np.issubdtype(mine.dtype, np.number) and np.issubdtype(source.dtype, np.number)):
            difference = 0.0 if agreement == 1.0 else float("inf")
        elif rows:
            difference = max(difference, float(np.max(np.abs(mine.astype(np.float64) - source.astype(np.float64)))))
    return difference, agreement


def _labels(values: np.ndarray) -> np.ndarray:
    """Class labels comparable across sources: text as str (a BYTES output holds bytes)."""
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind in "SU":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)])
    return values


def _sample_rows(sample: Any, tensor: Any, max_batch_size: int) -> np.ndarray:
    if sample is None:
        features = tensor.dims[-1] if tensor.dims and tensor.dims[-1] > 0 else 1
        rows = np.random.default_rng(0).standard_normal((SAMPLE_ROWS, features))
        return rows.astype(tensor.numpy_dtype)
    if isinstance(sample, (str, Path)):
        path = Path(sample)
        try:
            data = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the sample rows (a .npy array or a CSV of numbers): {exc}") from exc
        sample = data
    rows = np.asarray(sample, dtype=tensor.numpy_dtype)
    if rows.ndim != 2 or (tensor.dims and tensor.dims[-1] > 0 and rows.shape[1] != tensor.dims[-1]):
        raise ConfigError(
            f"the sample has shape {list(rows.shape)}; the model takes rows of {tensor.dims[-1]} features"
        )
    return rows


def record_parameters(model_dir: Path, values: dict[str, Any], *, signature: Any = None) -> None:
    """Writes `values` into the config's [parameters] (the rest of the file kept as it was), and
    `signature`'s inputs and outputs (the config the model loaded with) into a config this import wrote."""
    path = model_dir / CONFIG_FILE_NAME
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    if signature is not None:
        data.setdefault("max_batch_size", signature.max_batch_size)
        data["inputs"] = [tensor.model_dump(exclude_none=True) for tensor in signature.inputs]
        data["outputs"] = [tensor.model_dump(exclude_none=True) for tensor in signature.outputs]
    data.setdefault("parameters", {}).update(values)
    text = toml_text(data)
    parse_model_config(tomllib.loads(text), source=str(path), name=model_dir.name)
    path.write_text(text, encoding="utf-8")


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"a {type(source).__module__}.{type(source).__name__}"


# ---- the command -----------------------------------------------------------------------------


def register_import_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import",
        help="add a trained model file to a repository, checked for parity",
        description="Copy SOURCE (XGBoost model.json/.ubj, LightGBM .txt, a Treelite checkpoint .tl, an .onnx "
        "file or a PyTorch .pt2 package) into --repository as the next version of --name, with a config.toml when the model has "
        "none; then run it with Conveyor on a sample and compare with the source library's own prediction. "
        "Model objects (XGBoost, LightGBM, scikit-learn estimators and pipelines, CatBoost, Keras 3) import from "
        "Python with conveyor.import_model.",
        epilog="Exit status: 0 imported (the parity is printed and written into the config's [parameters]), "
        "1 refused (the parity failed the tolerance; nothing is left behind), 2 a usage error.",
    )
    p.add_argument("source", type=Path, metavar="SOURCE", help="the model file to import")
    p.add_argument("--repository", type=Path, required=True, metavar="REPO", help="the model repository")
    p.add_argument("--name", required=True, help="the model's name in the repository")
    p.add_argument("--sample", type=Path, metavar="FILE",
                   help="rows to check parity on: a .npy array or a CSV of numbers (default: generated rows)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"the largest absolute difference accepted (default {DEFAULT_TOLERANCE:g})")
    p.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    try:
        result = import_model(args.source, repository=args.repository, name=args.name, sample=args.sample,
                              tolerance=args.tolerance)  # fmt: skip
    except ConfigError as exc:
        refused = "refused" in str(exc)
        print(f"conveyor import: {'' if refused else 'error: '}{exc}", file=sys.stderr)
        return 1 if refused else 2
    agreement = f", class agreement {result.class_agreement:.2%}" if result.class_agreement is not None else ""
    print(f"imported {args.source} as {result.version_dir} (backend {result.backend}): parity on {result.rows} rows, "
          f"max |difference| {result.max_abs_difference:.3g}{agreement}")  # fmt: skip
    return 0
