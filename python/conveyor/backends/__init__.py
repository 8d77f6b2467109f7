"""Backends execute whole batches of one model version; `create_backend` picks one."""

from __future__ import annotations

import logging
from pathlib import Path

from conveyor.backends.base import Backend, version_of
from conveyor.backends.native import NativeBackend, UnsupportedGraph
from conveyor.backends.onnx import OnnxBackend, fill_config_from_onnx
from conveyor.backends.python import CallableBackend, ModelFunction, PythonBackend
from conveyor.backends.torch_aoti import TorchBackend
from conveyor.backends.trees import TreesBackend, fill_config_from_trees
from conveyor.backends.trees_import import TREE_MODEL_FILES, find_tree_model_file
from conveyor.config import ModelConfig
from conveyor.errors import ConfigError

# The file(s) a version directory may hold, by config `backend`; a trees version holds
# exactly one of its names (model_file_path finds which).
MODEL_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "onnx": ("model.onnx",),
    "python": ("model.py",),
    "native": ("model.onnx",),
    "trees": tuple(TREE_MODEL_FILES),
    "torch": ("model.pt2",),
}

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE_NAMES",
    "Backend",
    "CallableBackend",
    "ModelFunction",
    "NativeBackend",
    "OnnxBackend",
    "PythonBackend",
    "TorchBackend",
    "TreesBackend",
    "create_backend",
    "fill_config_from_onnx",
    "fill_config_from_trees",
    "model_file_path",
]


def model_file_path(backend: str, version_dir: Path) -> Path:
    """The model file of a version directory for `backend` (it may not exist, except for trees).

    A trees version must hold exactly one of its file names: ConfigError names them otherwise.
    A graph has no model file (its steps are models of their own): ConfigError says so.
    """
    if backend == "graph":
        raise ConfigError(f"{version_dir}: a graph has no model file: its steps' models run its rows")
    if backend == "trees":
        return find_tree_model_file(Path(version_dir))
    return Path(version_dir) / MODEL_FILE_NAMES[backend][0]


def create_backend(config: ModelConfig, version_dir: Path | None, *, fn: ModelFunction | None = None) -> Backend:
    """The backend for one model version: `fn` if given, else the version dir's model file."""
    if config.backend == "graph":
        # A graph's rows run in its steps' models, planned by conveyor.graph_plan.
        raise ConfigError(f"model '{config.name}': a graph has no backend: its steps' models run its rows")
    if fn is not None:
        return CallableBackend(config, fn, version=None if version_dir is None else version_of(version_dir))
    if version_dir is None:
        raise ConfigError(f"model '{config.name}': expected a version directory or a callable, got neither")
    version_dir = Path(version_dir)
    model_path = model_file_path(config.backend, version_dir)
    if config.backend == "trees":
        return TreesBackend(config, model_path, version=version_of(version_dir))
    if config.backend == "onnx":
        return OnnxBackend(config, model_path, version=version_of(version_dir))
    if config.backend == "native":
        try:
            return NativeBackend(config, model_path, version=version_of(version_dir))
        except UnsupportedGraph as exc:
            if config.fallback != "onnx":
                raise
            logger.warning("model '%s': running on onnxruntime (fallback = \"onnx\"): %s", config.name, exc)
            return OnnxBackend(config, model_path, version=version_of(version_dir))
    if config.backend == "torch":
        return TorchBackend(config, model_path, version=version_of(version_dir))
    return PythonBackend(config, model_path, version=version_of(version_dir))
