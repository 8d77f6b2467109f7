"""The model repository: a Triton-style directory tree of models and versions.

```
<root>/<name>/config.toml
<root>/<name>/<version>/model.onnx   (backends onnx and native; model.py for backend python;
                                      model.pt2 for backend torch)
```
Versions are directories named by a positive integer; anything else is ignored.
A graph (a config with `[graph]`) has no model file and no version directories (an
empty one, as a Triton ensemble has, is ignored): it is served as version 1, whose
directory is the model directory itself.
A model laid out for Triton loads unchanged: config.pbtxt stands in for config.toml
(protocol/triton_pbtxt.py), and a directory with neither whose versions hold
model.onnx is served as Triton auto-completes it (backend onnx, the graph's signature).
The repository only reads files: it finds, validates and describes models, and the
runtime loads them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from conveyor.backends import MODEL_FILE_NAMES, fill_config_from_onnx, fill_config_from_trees, model_file_path
from conveyor.config import CONFIG_FILE_NAME, MODEL_NAME_PATTERN, ModelConfig, load_model_config, parse_model_config
from conveyor.errors import ConfigError, InvalidInput, ModelNotFound
from conveyor.protocol.triton_pbtxt import TRITON_CONFIG_FILE_NAME, read_config_pbtxt

logger = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"

# Positive integers without leading zeros, so "1" and "01" cannot both be version 1.
_VERSION_DIR_PATTERN = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class ModelSource:
    """What the runtime needs to load a model: its config and served version dirs."""

    name: str
    config: ModelConfig
    versions: dict[int, Path]  # version -> version directory, per the version policy


@dataclass(frozen=True)
class RepositoryEntry:
    """One row of the repository index (the v2 repository extension's shape)."""

    name: str
    version: int | None  # None: the problem concerns the whole model
    state: str  # READY or UNAVAILABLE
    reason: str = ""


@dataclass(frozen=True)
class FileStamp:
    name: str
    mtime_ns: int
    size_bytes: int


@dataclass(frozen=True)
class ModelFingerprint:
    """Changes whenever a model's config or a file in a version dir changes."""

    config: FileStamp | None  # None: no config.toml (nor config.pbtxt)
    versions: tuple[tuple[int, tuple[FileStamp, ...]], ...]  # (version, files) ascending


@dataclass(frozen=True)
class _Inspection:
    config: ModelConfig
    served: dict[int, Path]  # selected by the policy and holding the model file
    problems: dict[int, str]  # selected by the policy but not loadable
    ignored: tuple[str, ...] = ()  # config.pbtxt fields Conveyor does not honour


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: expected a model repository directory, found none")

    def list_models(self) -> list[str]:
        """Names of the model directories, sorted; directories with invalid names are skipped."""
        return sorted(entry.name for entry in self._subdirectories(self.root) if _is_model_name(entry.name))

    def model_dir(self, name: str) -> Path:
        """The directory of model `name`; its name is validated, so it is always inside the root."""
        if not isinstance(name, str) or not _is_model_name(name):
            raise InvalidInput(f"invalid model name {name!r}: expected letters, digits, '_', '.' or '-'")
        directory = self.root / name
        if not directory.is_dir():
            # The repository's path is left out: this message reaches clients of the servers.
            raise ModelNotFound(f"model '{name}' is not in the repository (no directory of that name)")
        return directory

    def load_model(self, name: str) -> ModelSource:
        """Config and served versions of `name`; raises ConfigError when none can be served."""
        inspection = self._inspect(name)
        if inspection.ignored:
            logger.warning(
                "model '%s': %s sets fields Conveyor does not honour, served without them: %s",
                name, TRITON_CONFIG_FILE_NAME, "; ".join(inspection.ignored),
            )  # fmt: skip
        for version, problem in inspection.problems.items():
            logger.warning("model '%s' version %d is not loaded: %s", name, version, problem)
        if not inspection.served:
            reasons = "; ".join(f"version {version}: {problem}" for version, problem in inspection.problems.items())
            raise ConfigError(f"{self.root / name}: no version to serve ({reasons or 'no version directories'})")
        config = inspection.config
        if config.backend in ("onnx", "native", "trees") and not (config.inputs and config.outputs):
            newest = inspection.served[max(inspection.served)]
            fill = fill_config_from_trees if config.backend == "trees" else fill_config_from_onnx
            config = fill(config, model_file_path(config.backend, newest))
        return ModelSource(name=name, config=config, versions=inspection.served)

    def is_graph(self, name: str) -> bool:
        """Whether `name` is a model graph (False when its config cannot be read: loading it says why)."""
        return self.graph_steps(name) is not None

    def with_graph_steps(self, names: list[str]) -> list[str]:
        """`names` and the models their graphs run, steps first (a graph loads after its steps)."""
        steps_of = {name: self.graph_steps(name) for name in names}  # each config read once
        ordered: list[str] = []
        for name in names:
            for step in sorted(steps_of[name] or ()):
                if step not in ordered and step not in steps_of:
                    ordered.append(step)
        return ordered + sorted(names, key=lambda name: steps_of[name] is not None)

    def graph_steps(self, name: str) -> set[str] | None:
        """The models a graph's steps run; None for a model that is not a graph (or is unreadable)."""
        try:
            config = self._config(self.model_dir(name), name)[0]
        except (ConfigError, InvalidInput, ModelNotFound):
            return None
        return None if config.graph is None else {step.model for step in config.graph.step}

    def index(self) -> list[RepositoryEntry]:
        """Every model and version with its state; a broken model never hides the others."""
        entries: list[RepositoryEntry] = []
        for name in self.list_models():
            try:
                inspection = self._inspect(name)
            except ConfigError as exc:
                entries.append(RepositoryEntry(name, None, UNAVAILABLE, str(exc)))
                continue
            if not inspection.served and not inspection.problems:
                entries.append(RepositoryEntry(name, None, UNAVAILABLE, "no version directories"))
            for version in sorted(inspection.served.keys() | inspection.problems.keys()):
                problem = inspection.problems.get(version)
                entries.append(RepositoryEntry(name, version, UNAVAILABLE if problem else READY, problem or ""))
        return entries

    def scan(self) -> dict[str, ModelFingerprint]:
        """A fingerprint per model, to compare with a later scan and reload what changed."""
        return {name: self._fingerprint(self.root / name) for name in self.list_models()}

    def scan_model(self, name: str) -> ModelFingerprint:
        """The fingerprint of one model (see scan)."""
        return self._fingerprint(self.model_dir(name))

    def _inspect(self, name: str) -> _Inspection:
        directory = self.model_dir(name)
        config, ignored = self._config(directory, name)
        version_dirs = self._version_dirs(directory)
        if config.backend == "graph":
            return _Inspection(config, self._graph_version(directory, version_dirs), {}, ignored)
        selected = config.version_policy.select(list(version_dirs))
        served: dict[int, Path] = {}
        problems: dict[int, str] = {}
        for version in selected:
            try:
                model_file = model_file_path(config.backend, version_dirs[version])
            except ConfigError as exc:  # a trees version with no model file, or several
                problems[version] = str(exc)
                continue
            if model_file.is_file():
                served[version] = version_dirs[version]
            else:
                problems[version] = f"missing {model_file.name} in {version_dirs[version]}"
        for version in config.version_policy.specific or ():
            if version not in version_dirs:
                problems[version] = f"no version directory {directory / str(version)}"
        return _Inspection(config, served, problems, ignored)

    @staticmethod
    def _graph_version(directory: Path, version_dirs: dict[int, Path]) -> dict[int, Path]:
        """A graph's one version: its steps are the models, so a version directory would hold
        nothing the graph reads, and serving it would only hide a misplaced model. An empty one
        (a Triton ensemble's `1/`) holds nothing to hide and is ignored."""
        occupied = {version: path for version, path in version_dirs.items() if any(path.iterdir())}
        if occupied:
            found = ", ".join(str(version) for version in sorted(occupied))
            raise ConfigError(
                f"{directory}: a graph has no version directories (found {found}); its version 1 is the "
                "model directory itself: move the directories out (a step's model is a model directory of its own)"
            )
        return {1: directory}

    def _config(self, directory: Path, name: str) -> tuple[ModelConfig, tuple[str, ...]]:
        """The model's config.toml, else its Triton config.pbtxt, else Triton's auto-complete
        of an ONNX model; with the config.pbtxt fields not honoured."""
        config_path = directory / CONFIG_FILE_NAME
        if config_path.is_file():
            return load_model_config(config_path, name=name), ()
        triton_path = directory / TRITON_CONFIG_FILE_NAME
        if triton_path.is_file():
            triton = read_config_pbtxt(triton_path, name=name)
            return parse_model_config(triton.fields, source=str(triton_path), name=name), tuple(triton.ignored)
        if any((version / MODEL_FILE_NAMES["onnx"][0]).is_file() for version in self._version_dirs(directory).values()):
            return parse_model_config({"backend": "onnx"}, source=str(directory), name=name), ()
        raise ConfigError(
            f"{config_path}: missing; every model needs a {CONFIG_FILE_NAME} (or Triton's {TRITON_CONFIG_FILE_NAME}, "
            f"or version directories holding {MODEL_FILE_NAMES['onnx'][0]})"
        )

    def _version_dirs(self, directory: Path) -> dict[int, Path]:
        return {
            int(entry.name): Path(entry.path)
            for entry in self._subdirectories(directory)
            if _VERSION_DIR_PATTERN.fullmatch(entry.name)
        }

    def _fingerprint(self, directory: Path) -> ModelFingerprint:
        config_stamp = _stamp(directory / CONFIG_FILE_NAME) or _stamp(directory / TRITON_CONFIG_FILE_NAME)
        versions = []
        for version, version_dir in sorted(self._version_dirs(directory).items()):
            stamps = (_stamp(path) for path in version_dir.iterdir() if path.is_file())
            files = sorted((stamp for stamp in stamps if stamp is not None), key=lambda stamp: stamp.name)
            versions.append((version, tuple(files)))
        return ModelFingerprint(config_stamp, tuple(versions))

    @staticmethod
    def _subdirectories(directory: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as entries:
                return [entry for entry in entries if entry.is_dir()]
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot list: {exc.strerror or exc}") from exc


def _is_model_name(name: str) -> bool:
    return name not in (".", "..") and re.fullmatch(MODEL_NAME_PATTERN, name) is not None


def _stamp(path: Path) -> FileStamp | None:
    """The file's stamp, or None when it is gone (a scan races with edits)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return FileStamp(path.name, status.st_mtime_ns, status.st_size)
