"""Read a tree model through Treelite, once at load, into Conveyor's own C++ evaluator.

Treelite (`pip install conveyor-serve[trees]`) parses XGBoost JSON/UBJSON, LightGBM
text and its own checkpoints (what scikit-learn forests become through
`treelite.sklearn.import_model(...).serialize(path)`); its accessors hand back each
tree's node arrays, which `_core.TreeEnsemble` copies into its flat layout. Nothing is
unpickled and no framework code runs after load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.errors import ConfigError, ConveyorError

__all__ = ["TREE_MODEL_FILES", "TreeModel", "find_tree_model_file", "load_tree_model"]

# The file a trees version directory holds, and the library that wrote it; the second
# group are Triton FIL's default file names, so its model repositories load unchanged.
TREE_MODEL_FILES = {
    "model.json": "XGBoost (JSON)",
    "model.ubj": "XGBoost (UBJSON)",
    "model.txt": "LightGBM (text)",
    "model.tl": "Treelite checkpoint",
    "xgboost.json": "XGBoost (JSON)",
    "xgboost.ubj": "XGBoost (UBJSON)",
    "xgboost.model": "XGBoost (legacy binary)",
    "checkpoint.tl": "Treelite checkpoint",
}

# Treelite's task types (treelite/enum/task_type.h).
_BINARY_CLASSIFIER, _REGRESSOR, _MULTICLASS_CLASSIFIER, _LEARNING_TO_RANK, _ISOLATION_FOREST = range(5)
_CLASSIFIER_TASKS = (_BINARY_CLASSIFIER, _MULTICLASS_CLASSIFIER)
_TREE_FIELDS = (
    "cleft", "cright", "split_index", "default_left", "threshold", "cmp", "leaf_value", "leaf_vector",
    "leaf_vector_begin", "leaf_vector_end",
)  # fmt: skip


@dataclass(frozen=True)
class TreeModel:
    """A loaded tree ensemble: what its signature needs, and the arrays to build it from."""

    path: Path
    num_feature: int
    num_margin: int  # margins per row: classes of a multi-class model, else 1
    num_tree: int
    classifier: bool
    postprocessor: str
    treelite_model: Any  # the treelite.Model, kept until the evaluator is built

    @property
    def num_class(self) -> int:
        """Columns of `probabilities`: a binary model's one margin gives two."""
        return 2 if self.classifier and self.num_margin == 1 else self.num_margin

    def build(self, output_names: list[str]) -> Any:
        """The C++ TreeEnsemble returning `output_names` (a subset of the signature's outputs)."""
        model = self.treelite_model
        header = model.get_header_accessor()
        base_scores = np.asarray(header.get_field("base_scores"), dtype=np.float64)
        class_ids = np.asarray(header.get_field("class_id"), dtype=np.int32)
        try:
            ensemble = _core.TreeEnsemble(
                num_feature=self.num_feature,
                num_margin=self.num_margin,
                average_tree_output=bool(header.get_field("average_tree_output")[0]),
                base_scores=base_scores.tolist(),
                postprocessor=self.postprocessor,
                sigmoid_alpha=float(header.get_field("sigmoid_alpha")[0]),
                ratio_c=float(header.get_field("ratio_c")[0]),
            )
            for tree_id in range(self.num_tree):
                accessor = model.get_tree_accessor(tree_id)
                arrays = {name: accessor.get_field(name) for name in _TREE_FIELDS}
                ensemble.add_tree(**arrays, class_id=int(class_ids[tree_id]))
            ensemble.finalize(output_names, classifier=self.classifier)
        except ConveyorError as exc:  # the evaluator's own checks: a model it cannot run
            raise ConfigError(f"{self.path}: cannot serve this tree model: {exc}") from exc
        return ensemble


def find_tree_model_file(version_dir: Path) -> Path:
    """The one tree model file of a version directory; ConfigError for none or several."""
    version_dir = Path(version_dir)
    found = [version_dir / name for name in TREE_MODEL_FILES if (version_dir / name).is_file()]
    if len(found) == 1:
        return found[0]
    expected = ", ".join(f"{name} ({kind})" for name, kind in TREE_MODEL_FILES.items())
    got = "none" if not found else " and ".join(path.name for path in found)
    raise ConfigError(f"{version_dir}: expected exactly one tree model file of {expected}; found {got}")


def load_tree_model(path: Path) -> TreeModel:
    """Parse `path` with Treelite and check that Conveyor's evaluator can run it."""
    path = Path(path)
    treelite = _import_treelite()
    if path.name not in TREE_MODEL_FILES:
        raise ConfigError(f"{path}: not a tree model file; expected one of {', '.join(TREE_MODEL_FILES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    kind = TREE_MODEL_FILES[path.name]
    if kind.startswith("LightGBM"):
        _check_lightgbm_missing_values(path)
    try:
        if kind.startswith("LightGBM"):
            model = treelite.frontend.load_lightgbm_model(path)
        elif kind == "Treelite checkpoint":
            model = treelite.Model.deserialize(path)
        elif kind == "XGBoost (legacy binary)":
            model = treelite.frontend.load_xgboost_model_legacy_binary(path)
        else:
            model = treelite.frontend.load_xgboost_model(path, format_choice="use_suffix")
    except Exception as exc:  # treelite raises TreeliteError, ValueError or OSError for unreadable files
        raise ConfigError(
            f"{path}: Treelite cannot read it as a {TREE_MODEL_FILES[path.name]} model: {exc}; save the model "
            "with its library's own save_model (or treelite.Model.serialize for scikit-learn) under this name"
        ) from exc
    return _describe(path, model)


def _import_treelite() -> ModuleType:
    try:
        import treelite
        import treelite.frontend
    except ImportError as exc:
        raise ConfigError(
            f"the trees backend reads models through Treelite, which is not installed ({exc}); "
            "install it with: pip install conveyor-serve[trees]"
        ) from exc
    return treelite


def _check_lightgbm_missing_values(path: Path) -> None:
    """Refuse splits that treat zero as missing (zero_as_missing=true): Treelite reads them as plain splits.

    LightGBM's text format keeps each split's missing-value rule in bits 2-3 of its
    decision_type (0: none, 1: zero, 2: NaN).
    """
    try:
        with path.open("r", encoding="utf-8", errors="replace") as file:
            for line in file:
                if not line.startswith("decision_type="):
                    continue
                for field in line.partition("=")[2].split():
                    if field.lstrip("-").isdigit() and (int(field) >> 2) & 3 == 1:
                        raise ConfigError(
                            f"{path}: the LightGBM model treats zero as a missing value (trained with "
                            "zero_as_missing=true), which the trees backend cannot reproduce; retrain with "
                            "zero_as_missing=false and send missing values as NaN"
                        )
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _describe(path: Path, model: Any) -> TreeModel:
    header = model.get_header_accessor()
    task = int(header.get_field("task_type")[0])
    num_target = int(header.get_field("num_target")[0])
    num_class = [int(n) for n in header.get_field("num_class")]
    if task == _ISOLATION_FOREST:
        raise ConfigError(
            f"{path}: isolation forests are not supported by the trees backend; serve the model's "
            "score_samples through the python backend instead"
        )
    if num_target != 1:
        raise ConfigError(
            f"{path}: multi-target tree models ({num_target} targets) are not supported; "
            "train one model per target and serve each as its own model"
        )
    num_tree = int(model.num_tree)
    if num_tree < 1:
        raise ConfigError(f"{path}: the model has no trees; train it for at least one round")
    for tree_id in range(num_tree):
        if int(model.get_tree_accessor(tree_id).get_field("has_categorical_split")[0]):
            raise ConfigError(
                f"{path}: tree {tree_id} has a categorical split, which the trees backend does not support; "
                "encode categorical features as numbers (one-hot or ordinal codes) and retrain"
            )
    classifier = task in _CLASSIFIER_TASKS
    num_margin = num_class[0]
    postprocessor = str(header.get_field("postprocessor"))
    if not classifier and num_margin != 1:
        raise ConfigError(
            f"{path}: a {num_margin}-output regressor is not supported; the trees backend serves regressors "
            "with one output"
        )
    return TreeModel(
        path=path,
        num_feature=int(header.get_field("num_feature")[0]),
        num_margin=num_margin,
        num_tree=num_tree,
        classifier=classifier,
        postprocessor=postprocessor,
        treelite_model=model,
    )
