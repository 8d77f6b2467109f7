"""Framework objects that `conveyor import` converts to ONNX (backend onnx).

- scikit-learn estimators that are not tree ensembles, and Pipelines (one ending in a
  tree ensemble too), through skl2onnx (`pip install conveyor-serve[skl2onnx]`) with
  ZipMap off: a classifier answers `label` and `probabilities` as plain tensors;
- CatBoost models through CatBoost's own ONNX export (`conveyor-serve[catboost]`), which
  handles numeric features only; its ZipMap is taken out and its regressor's output
  shape (declared one-dimensional, answered as a column) is corrected;
- Keras 3 models through `Model.export(format="onnx")` (`conveyor-serve[keras]`, with the
  torch backend: KERAS_BACKEND=torch).
Each writes `model.onnx` with one FP32 input whose first dim is the batch, and returns
the source's own prediction for the parity check: a dict of output name -> answer.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.config import TENSOR_NAME_PATTERN
from conveyor.errors import ConfigError

__all__ = ["INPUT_NAME", "catboost_to_onnx", "keras_to_onnx", "sklearn_to_onnx"]

# The input's name in converted models, as the trees backend names its input.
INPUT_NAME = "features"

Predictor = Callable[[np.ndarray], dict[str, np.ndarray]]


def sklearn_to_onnx(model: Any, path: Path) -> Predictor:
    """A fitted scikit-learn estimator or Pipeline as `path` (ONNX), through skl2onnx with ZipMap off."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise ConfigError(
            f"importing a scikit-learn {type(model).__name__} converts it to ONNX with skl2onnx, which is not "
            f"installed ({exc}); install it with: pip install conveyor-serve[skl2onnx]"
        ) from exc
    features = getattr(model, "n_features_in_", None)
    if features is None:
        raise ConfigError(
            f"cannot import the scikit-learn {type(model).__name__}: it is not fitted (it has no n_features_in_); "
            "fit it first"
        )
    classifier = hasattr(model, "classes_")
    initial_types = [(INPUT_NAME, FloatTensorType([None, int(features)]))]
    try:
        with _converter_notices_quiet():
            try:
                onnx_model = convert_sklearn(model, initial_types=initial_types,
                                             options={"zipmap": False} if classifier else None)  # fmt: skip
            except NameError as exc:  # a classifier whose converter has no ZipMap (and no such option)
                if "zipmap" not in str(exc):
                    raise
                onnx_model = convert_sklearn(model, initial_types=initial_types)
    except Exception as exc:  # skl2onnx's failures have no common base class (RuntimeError, NotImplementedError, its own)
        raise ConfigError(
            f"skl2onnx cannot convert the scikit-learn {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "Conveyor imports estimators and pipelines that take one table of numbers and that skl2onnx "
            "supports (a custom step needs its own skl2onnx converter); or export the model to ONNX yourself "
            "and import the .onnx file"
        ) from exc
    path.write_bytes(onnx_model.SerializeToString())

    def predict(rows: np.ndarray) -> dict[str, np.ndarray]:
        if not classifier:
            return {_single_output(path): np.asarray(model.predict(rows))}
        answer = {"label": np.asarray(model.predict(rows))}
        if hasattr(model, "predict_proba"):
            answer["probabilities"] = np.asarray(model.predict_proba(rows))
        return answer

    return predict


def catboost_to_onnx(model: Any, path: Path) -> Predictor:
    """A fitted CatBoost model with numeric features only, through CatBoost's own ONNX export."""
    categorical = list(model.get_cat_feature_indices())
    text = list(model.get_text_feature_indices()) if hasattr(model, "get_text_feature_indices") else []
    embedding = list(model.get_embedding_feature_indices()) if hasattr(model, "get_embedding_feature_indices") else []
    if categorical or text or embedding:
        names = list(getattr(model, "feature_names_", None) or [])
        kinds = [(kind, [names[i] if i < len(names) else str(i) for i in indices])
                 for kind, indices in (("categorical", categorical), ("text", text), ("embedding", embedding))
                 if indices]  # fmt: skip
        listed = "; ".join(f"{kind} features {', '.join(found)}" for kind, found in kinds)
        raise ConfigError(
            f"cannot import the CatBoost {type(model).__name__}: CatBoost's ONNX export handles numeric features "
            f"only, and this model has {listed}; encode them as numbers (one-hot or ordinal codes) and retrain, "
            "or serve the model through the python backend"
        )
    try:
        model.save_model(str(path), format="onnx")
    except Exception as exc:  # CatBoostError
        raise ConfigError(f"CatBoost cannot export its {type(model).__name__} to ONNX: {exc}") from exc
    classifier = hasattr(model, "predict_proba") and _catboost_is_classifier(model)
    _tidy_catboost_graph(path)

    def predict(rows: np.ndarray) -> dict[str, np.ndarray]:
        if classifier:
            return {"label": np.asarray(model.predict(rows)), "probabilities": np.asarray(model.predict_proba(rows))}
        return {_single_output(path): np.asarray(model.predict(rows))}

    return predict


def keras_to_onnx(model: Any, path: Path) -> Predictor:
    """A built Keras 3 model with one input, through `Model.export(format="onnx")`."""
    inputs = getattr(model, "inputs", None)
    if not getattr(model, "built", False) or not inputs:
        raise ConfigError(
            f"cannot import the Keras {type(model).__name__}: it has not been built; give it a keras.Input (or "
            "call it once on a batch) before importing"
        )
    if len(inputs) != 1:
        raise ConfigError(
            f"cannot import the Keras {type(model).__name__}: it takes {len(inputs)} inputs; conveyor import "
            "handles models with one input (export it yourself with model.export(path, format='onnx') and "
            "import the .onnx file)"
        )
    shape = tuple(inputs[0].shape)
    try:
        with _converter_notices_quiet():
            if all(isinstance(dim, int) for dim in shape[1:]):
                # The exporter takes only a model that has been called once; one zero row does it.
                model(np.zeros((1, *shape[1:]), dtype=str(inputs[0].dtype)), training=False)
            model.export(str(path), format="onnx", verbose=False)
    except ImportError as exc:
        raise ConfigError(
            f"Keras' ONNX export needs a package that is not installed ({exc}); with KERAS_BACKEND=torch it "
            "needs torch: pip install conveyor-serve[keras,torch]"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"Keras cannot export the {type(model).__name__} to ONNX ({type(exc).__name__}: {exc}); call the "
            "model once on a batch before importing, and use the torch or tensorflow Keras backend "
            "(KERAS_BACKEND=torch)"
        ) from exc
    _name_keras_outputs(path, _keras_output_names(model))

    def predict(rows: np.ndarray) -> dict[str, np.ndarray]:
        with _converter_notices_quiet():
            answer = model.predict(rows, verbose=0)
        answers = answer if isinstance(answer, (list, tuple)) else [answer]
        return dict(zip(_output_names(path), (np.asarray(a) for a in answers)))

    return predict


# ---- helpers ------------------------------------------------------------------------------------


@contextmanager
def _converter_notices_quiet() -> Iterator[None]:
    """Silences the converters' own deprecation and tracing notices, which the caller cannot act on
    (the parity check judges the converted model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _catboost_is_classifier(model: Any) -> bool:
    name = type(model).__name__
    if name in ("CatBoostClassifier", "CatBoostRegressor", "CatBoostRanker"):
        return name == "CatBoostClassifier"
    loss = str(model.get_all_params().get("loss_function", ""))
    return loss in ("Logloss", "CrossEntropy", "MultiClass", "MultiClassOneVsAll")


def _tidy_catboost_graph(path: Path) -> None:
    """Plain tensors out: the ZipMap's input becomes `probabilities`; a [N] output declared for a [N, 1] answer."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    zipmaps = [node for node in graph.node if node.op_type == "ZipMap"]
    for zipmap in zipmaps:
        output = zipmap.output[0]
        graph.node.remove(zipmap)
        probabilities = zipmap.input[0]
        for node in graph.node:
            node.output[:] = [output if name == probabilities else name for name in node.output]
        classes = len(zipmap.attribute[0].ints) or len(zipmap.attribute[0].strings)
        index = next(i for i, out in enumerate(graph.output) if out.name == output)
        graph.output.remove(graph.output[index])
        graph.output.insert(index, onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["N", classes]))
    for node in graph.node:
        if node.op_type == "TreeEnsembleRegressor":
            targets = next((a.i for a in node.attribute if a.name == "n_targets"), 1)
            for out in graph.output:
                if out.name == node.output[0] and len(out.type.tensor_type.shape.dim) == 1:
                    out.type.tensor_type.shape.dim.add().dim_value = targets
    onnx.save(model, str(path))


def _keras_output_names(model: Any) -> list[str]:
    """The names of the layers whose outputs the model returns ([] when Keras does not say)."""
    names = []
    for tensor in getattr(model, "outputs", None) or []:
        history = getattr(tensor, "_keras_history", None)  # (operation, node index, tensor index)
        operation = history[0] if history else None
        names.append(getattr(operation, "name", ""))
    return names if all(re.fullmatch(TENSOR_NAME_PATTERN, name) for name in names) else []


def _name_keras_outputs(path: Path, names: list[str]) -> None:
    """The exporter names outputs by trace node number ("23"); they take the model's output names."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    if len(names) != len(graph.output) or len(set(names)) != len(names):
        names = ["output"] if len(graph.output) == 1 else [f"output_{i}" for i in range(len(graph.output))]
    taken = {value for node in graph.node for value in (*node.input, *node.output)} | {i.name for i in graph.input}
    renames = {out.name: new for out, new in zip(graph.output, names) if out.name != new and new not in taken}
    if not renames:
        return
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for out in graph.output:
        out.name = renames.get(out.name, out.name)
    onnx.save(model, str(path))


def _output_names(path: Path) -> list[str]:
    import onnx

    return [out.name for out in onnx.load(str(path)).graph.output]


def _single_output(path: Path) -> str:
    names = _output_names(path)
    return names[0]
