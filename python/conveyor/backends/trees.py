"""Serve tree ensembles (XGBoost, LightGBM, scikit-learn) on Conveyor's own C++ evaluator.

A version directory holds exactly one of model.json / model.ubj (XGBoost), model.txt
(LightGBM) or model.tl (a Treelite checkpoint: `treelite.sklearn.import_model(est)
.serialize("model.tl")` for scikit-learn forests and gradient boosting). Treelite reads
it once at load (trees_import.py); the trees become a C++ TreeEnsemble that the runtime
hands to the batcher as its executor (`native_executor`), so every batch is evaluated
on the instance thread without the GIL.

The signature is the same for every library, and filled in when config.toml omits it:

- input `features`: FP32 [num_feature]; NaN marks a missing value.
- classifiers: `probabilities` FP32 [classes] (a binary model gives two columns,
  [1 - p, p]), `label` INT64 [] (the argmax), `raw_margin` FP32 [margins] (before the
  sigmoid or softmax).
- regressors: `prediction` FP32 [] (one value per row, as the libraries' predict
  returns it), `raw_margin` FP32 [1].
- `leaf_ids` INT32 [trees], the leaf each tree reached, only when the config lists it.

Dims exclude the batch dimension when max_batch_size > 0; with max_batch_size = 0 each
request carries its own rows and every tensor leads with -1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.backends.base import CoreExecutorBackend
from conveyor.backends.trees_import import (
    TreeModel,
    find_tree_model_file,
    load_tree_model,
)
from conveyor.config import ModelConfig, TensorConfig
from conveyor.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_INPUT_NAME", "TreesBackend", "fill_config_from_trees", "find_tree_model_file", "tree_signature"]

DEFAULT_INPUT_NAME = "features"


class TreesBackend(CoreExecutorBackend):
    kind = "trees"
    # TreeEnsemble.run keeps no state between calls: one ensemble serves every instance.
    thread_safe = True

    def __init__(self, config: ModelConfig, model_path: Path, *, version: int | None = None) -> None:
        model_path = Path(model_path)
        model = load_tree_model(model_path)
        config = complete_tree_config(config, model, source=str(model_path))
        super().__init__(config, version)
        self.model_path = model_path
        # The batcher's executor: evaluated in C++ on the instance threads.
        roles = config.trees.outputs
        self.native_executor: Any = model.build([roles.get(name, name) for name in self.output_names])
        logger.debug(
            "%s: loaded %d trees (%d features, %d margins, %s) from %s",
            self.label, model.num_tree, model.num_feature, model.num_margin, model.postprocessor, model_path,
        )  # fmt: skip

    def _arrays(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(inputs[0], dtype=np.float32)]


def fill_config_from_trees(config: ModelConfig, model_path: Path) -> ModelConfig:
    """`config` with omitted inputs/outputs read from the tree model (as the onnx backend's auto-complete)."""
    if config.inputs and config.outputs:
        return config
    return complete_tree_config(config, load_tree_model(Path(model_path)), source=str(model_path))


def tree_signature(model: TreeModel, max_batch_size: int) -> tuple[TensorConfig, dict[str, TensorConfig]]:
    """The model's input, and every output it can give by name (leaf_ids included)."""
    batch = [] if max_batch_size > 0 else [-1]

    def tensor(name: str, datatype: str, dims: list[int]) -> TensorConfig:
        return TensorConfig(name=name, datatype=datatype, dims=batch + dims)

    outputs = {}
    if model.classifier:
        outputs["probabilities"] = tensor("probabilities", "FP32", [model.num_class])
        outputs["label"] = tensor("label", "INT64", [])
        outputs["class_index"] = tensor("class_index", "FP32", [1])
    else:
        outputs["prediction"] = tensor("prediction", "FP32", [])
        outputs["prediction_column"] = tensor("prediction_column", "FP32", [1])
    outputs["raw_margin"] = tensor("raw_margin", "FP32", [model.num_margin])
    outputs["leaf_ids"] = tensor("leaf_ids", "INT32", [model.num_tree])
    return tensor(DEFAULT_INPUT_NAME, "FP32", [model.num_feature]), outputs


def complete_tree_config(config: ModelConfig, model: TreeModel, *, source: str) -> ModelConfig:
    """`config` with omitted inputs/outputs filled from the model; ConfigError where they disagree."""
    model_input, model_outputs = tree_signature(model, config.max_batch_size)
    updates: dict[str, list[TensorConfig]] = {}
    if not config.inputs:
        updates["inputs"] = [model_input]
    else:
        _check_input(config.inputs, model_input, source)
    if not config.outputs:
        # The default signature: Triton FIL's forms and leaf_ids only when listed.
        extra = ("leaf_ids", "class_index", "prediction_column")
        updates["outputs"] = [tensor for name, tensor in model_outputs.items() if name not in extra]
    else:
        roles = config.trees.outputs
        unused = sorted(set(roles) - {tensor.name for tensor in config.outputs})
        if unused:
            raise ConfigError(f"{source}: trees.outputs names {unused}, which are not outputs of the config")
        for tensor in config.outputs:
            role = roles.get(tensor.name, tensor.name)
            expected = model_outputs.get(role)
            if expected is None:
                raise ConfigError(
                    f"{source}: output '{tensor.name}': expected one of the model's outputs "
                    f"({', '.join(model_outputs)}), or a name given a role in [trees] outputs"
                )
            _check_tensor("output", tensor, expected.model_copy(update={"name": tensor.name}), source)
    if updates:
        logger.debug("%s: filled %s of model '%s' from the trees", source, " and ".join(updates), config.name)
    return config.model_copy(update=updates) if updates else config


def _check_input(inputs: list[TensorConfig], expected: TensorConfig, source: str) -> None:
    if len(inputs) != 1:
        names = ", ".join(tensor.name for tensor in inputs)
        raise ConfigError(
            f"{source}: expected one input (the FP32 feature rows, e.g. '{expected.name}'), got {len(inputs)} ({names})"
        )
    _check_tensor("input", inputs[0], expected.model_copy(update={"name": inputs[0].name}), source)


def _check_tensor(kind: str, tensor: TensorConfig, expected: TensorConfig, source: str) -> None:
    if tensor.datatype != expected.datatype:
        raise ConfigError(
            f"{source}: {kind} '{tensor.name}': expected datatype {expected.datatype} (the model's), "
            f"got {tensor.datatype} (the config's)"
        )
    compatible = len(tensor.dims) == len(expected.dims) and all(
        dim == want or want == -1 or dim == -1 for dim, want in zip(tensor.dims, expected.dims)
    )
    if not compatible:
        raise ConfigError(
            f"{source}: {kind} '{tensor.name}': expected dims {expected.dims} (the model's; the batch dim is "
            f"left out when max_batch_size > 0), got {tensor.dims} (the config's)"
        )
