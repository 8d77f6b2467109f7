"""Which models the server holds, and how they get there (Triton's model control modes).

- ``none``: load every model of the repository at start; the repository API may not
  load or unload.
- ``poll``: like ``none``, and the repository is re-scanned every poll interval: a
  changed model is loaded beside its serving versions and swapped in only once ready,
  so a broken new file never takes down a version that serves.
- ``explicit``: load only the models named at start; the repository API loads and
  unloads.

Loading blocks (it opens model files): the servers call it from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from conveyor.config import ModelConfig, parse_model_config
from conveyor.errors import ConfigError, ConveyorError, InvalidInput, ModelExecutionError, ModelNotFound, Unavailable
from conveyor.pipeline import read_labels_file
from conveyor.repository import ModelFingerprint, ModelRepository, ModelSource
from conveyor.runtime import Runtime

log = logging.getLogger(__name__)

# Backends whose model files run code when loaded (model.py, torch packages and their
# pickles, compiled libraries): their files come from the repository only, never from the
# `file:` parameters of a load request.
CODE_BEARING_BACKENDS = frozenset({"python", "torch"})

ControlMode = Literal["none", "poll", "explicit"]
CONTROL_MODES: tuple[ControlMode, ...] = ("none", "poll", "explicit")


class ModelListener(Protocol):
    """Told of every load, failed load and unload (on the loading thread, with the manager's lock held)."""

    def model_loaded(self, name: str, config: ModelConfig, versions: list[int]) -> None:
        """`name` now serves `versions` under `config`."""

    def model_load_failed(self, name: str, versions: list[int], reason: str) -> None:
        """A load of `name` failed; `versions` still serve."""

    def model_unloaded(self, name: str) -> None:
        """`name` serves no version any more."""


# The index's reason for a repository model the server was never asked to load (explicit mode).
NOT_LOADED = "not loaded"


@dataclass
class ModelRecord:
    """The server's view of one model of the repository."""

    name: str
    state: str = "UNAVAILABLE"  # READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str = ""
    versions: list[int] = field(default_factory=list)  # loaded and serving
    fingerprint: ModelFingerprint | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)  # output name -> class labels


class ModelManager:
    """Loads and unloads repository models into a Runtime and reports their states."""

    def __init__(
        self,
        repository: ModelRepository,
        runtime: Runtime,
        mode: ControlMode = "none",
        *,
        listener: ModelListener | None = None,
    ) -> None:
        """`listener` hears of loads and unloads (the server's rollouts); its failures are logged."""
        if mode not in CONTROL_MODES:
            raise ConfigError(f"model control mode must be one of {', '.join(CONTROL_MODES)}, got '{mode}'")
        self.repository = repository
        self.runtime = runtime
        self.mode = mode
        self.listener = listener
        # Loads are slow: _lock serialises loads, unloads and polls, while _state_lock only
        # guards the structure of _records and _expected, so that readiness and the index
        # answer at once (from the event loop) even while a load runs.
        self._lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._records: dict[str, ModelRecord] = {}
        self._expected: set[str] = set()  # models the operator wants serving (for readiness)
        # Told readiness after every change that can move it (the native front ends answer
        # readiness probes from it); _readiness_lock orders the tellings as the changes.
        self._readiness_listeners: list[Callable[[bool], None]] = []
        self._readiness_lock = threading.Lock()

    def start(self, models: list[str] | None = None) -> None:
        """Initial load: every repository model (none/poll), or `models` (explicit)."""
        names = self.repository.list_models() if self.mode != "explicit" else list(models or [])
        # A graph's steps load before it, and with it when only the graph is named (as Triton
        # loads an ensemble's composing models).
        for name in self.repository.with_graph_steps(names):
            try:
                self.load(name, _startup=True)
            except ConveyorError as exc:
                log.error("model %s failed to load: %s", name, exc)

    # -- loading -----------------------------------------------------------------------

    def load(
        self,
        name: str,
        config_override: dict[str, Any] | None = None,
        files: dict[str, bytes] | None = None,
        *,
        _startup: bool = False,
    ) -> None:
        """Load (or reload) a model; its serving versions keep serving if this fails."""
        if not _startup and self.mode != "explicit":
            raise Unavailable(
                f"loading models through the repository API needs --model-control-mode explicit "
                f"(the server runs in '{self.mode}' mode)"
            )
        if files and config_override is None:
            raise InvalidInput(f"model '{name}': files given without a config: pass the model's config too")
        if not files:
            self.repository.model_dir(name)  # InvalidInput or ModelNotFound before any state changes
        checked = _checked_files(name, files) if files else None  # InvalidInput before any state changes
        # The request's own faults (a bad config, files for a backend whose files run code) are
        # refused before any state changes too: the model is not expected to serve for them.
        config = self._override_config(name, config_override, uploaded=bool(files))
        with self._lock:
            # A graph's step models load first unless they serve already (Triton loads an
            # ensemble's composing models the same way).
            for step in sorted(self.repository.graph_steps(name) or ()) if not files else ():
                if not self._serves(step):
                    self.load(step, _startup=True)
            with self._state_lock:
                record = self._records.setdefault(name, ModelRecord(name))
                self._expected.add(name)
            previous_state = record.state
            record.state, record.reason = "LOADING", ""
            self._tell_readiness()  # a first load: not ready until it serves
            staging: Path | None = None
            try:
                fingerprint = self.repository.scan_model(name) if not files else None
                if checked is not None:
                    staging = _stage_files(name, checked)
                source = self._source(name, config, staging)
                self._apply(record, source, staging)
                record.fingerprint = fingerprint
                record.state = "READY"
                record.reason = ""
            except ConveyorError as exc:
                record.reason = str(exc)
                record.state = "READY" if record.versions and previous_state == "READY" else "UNAVAILABLE"
                self._tell("model_load_failed", name, list(record.versions), str(exc))
                if isinstance(exc, ModelExecutionError):
                    # The model's own code failed while loading: its files are wrong (400, as
                    # Triton answers a failed load), not the server (500).
                    raise ConfigError(str(exc)) from exc
                raise
            finally:
                if staging is not None:
                    shutil.rmtree(staging.parent, ignore_errors=True)
                self._tell_readiness()
            self._tell("model_loaded", name, source.config, list(record.versions))

    def add_readiness_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready())` now and after every change that can move readiness, in
        the order of the changes (from the loading thread; it must not block or load)."""
        with self._readiness_lock:
            self._readiness_listeners.append(listener)
            listener(self.ready())

    def remove_readiness_listener(self, listener: Callable[[bool], None]) -> None:
        with self._readiness_lock:
            if listener in self._readiness_listeners:
                self._readiness_listeners.remove(listener)

    def _tell_readiness(self) -> None:
        """Tells the readiness listeners what ready() answers now."""
        with self._readiness_lock:
            if not self._readiness_listeners:
                return
            ready = self.ready()
            for listener in self._readiness_listeners:
                try:
                    listener(ready)
                except Exception:
                    log.exception("a readiness listener failed")

    def _tell(self, event: str, *args: Any) -> None:
        """Passes a load or unload to the listener; its failure must not undo the load."""
        if self.listener is None:
            return
        try:
            getattr(self.listener, event)(*args)
        except Exception:
            log.exception("model %s: the model listener failed on %s", args[0], event)

    def _override_config(
        self, name: str, config_override: dict[str, Any] | None, *, uploaded: bool
    ) -> ModelConfig | None:
        """The load request's config override, parsed; None without one."""
        if config_override is None:
            return None
        override = dict(config_override)
        if "backend" not in override and not uploaded:
            # Triton's overrides often name no backend: keep the one the repository config names.
            override["backend"] = self.repository.load_model(name).config.backend
        config = parse_model_config(override, source=f"config override for model '{name}'", name=name)
        if uploaded and config.backend in CODE_BEARING_BACKENDS:
            raise InvalidInput(
                f"model '{name}': a load request cannot upload files for backend '{config.backend}': its model "
                "files run code when loaded (Python source, pickles, shared libraries); put the model in the "
                "repository instead"
            )
        return config

    def _source(self, name: str, config: ModelConfig | None, staging: Path | None) -> ModelSource:
        if config is None:
            return self.repository.load_model(name)
        root = staging if staging is not None else self.repository.model_dir(name)
        available = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")
        chosen = config.version_policy.select(available)
        if not chosen:
            # The directory is not named: errors go to clients, and paths on the server are none of theirs.
            where = "among the uploaded files" if staging is not None else "in its repository directory"
            raise ConfigError(f"model '{name}': no version directory to serve {where} (found {available})")
        return ModelSource(name=name, config=config, versions={v: root / str(v) for v in chosen})

    def _apply(self, record: ModelRecord, source: ModelSource, staging: Path | None) -> None:
        model_dir = staging if staging is not None else self.repository.model_dir(source.name)
        labels = _read_labels(source.config, model_dir)
        for version, version_dir in sorted(source.versions.items()):
            self.runtime.add_model(source.name, source.config, version=version, model_dir=version_dir)
        for stale in sorted(set(record.versions) - set(source.versions)):
            self.runtime.unload_model(source.name, stale)
        record.versions = sorted(source.versions)
        record.labels = labels

    def unload(self, name: str) -> None:
        """Stop serving a model; requests it already accepted finish first."""
        if self.mode != "explicit":
            raise Unavailable(
                f"unloading models through the repository API needs --model-control-mode explicit "
                f"(the server runs in '{self.mode}' mode)"
            )
        with self._lock:
            record = self._records.get(name)
            if record is None or not record.versions:
                raise ModelNotFound(f"model '{name}' is not loaded")
            record.state = "UNLOADING"
            with self._state_lock:
                self._expected.discard(name)
            try:
                self.runtime.unload_model(name)
            finally:
                record.versions = []
                record.state, record.reason = "UNAVAILABLE", "unloaded"
                self._tell_readiness()
                self._tell("model_unloaded", name)

    def poll(self) -> list[str]:
        """Reload models whose files changed, load new ones, unload removed ones.

        Returns the names acted on. A model that fails to reload keeps serving.
        """
        changed: list[str] = []
        current = self.repository.scan()
        with self._lock:
            for name in sorted(set(self._records) - set(current)):
                record = self._records[name]
                if record.versions:
                    self.runtime.unload_model(name)
                    changed.append(name)
                    self._tell("model_unloaded", name)
                with self._state_lock:
                    del self._records[name]
                    self._expected.discard(name)
                self._tell_readiness()
            stale = [
                name for name, fingerprint in sorted(current.items())
                if (record := self._records.get(name)) is None or record.fingerprint != fingerprint
            ]  # fmt: skip
            # Graphs last: a graph and its steps that appear together load steps first (only the
            # changed models' configs are read for that, not the whole repository every poll).
            for name in sorted(stale, key=self.repository.is_graph):
                fingerprint = current[name]
                changed.append(name)
                try:
                    self.load(name, _startup=True)
                except ConveyorError as exc:
                    self._records[name].fingerprint = fingerprint  # do not retry until it changes again
                    log.error("model %s failed to reload (serving versions %s stay): %s",
                              name, self._records[name].versions, exc)
        return changed

    # -- reporting ---------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index: every model in the repository or known to the server."""
        with self._state_lock:
            records = dict(self._records)
        rows = []
        for name in sorted(set(records) | set(self.repository.list_models())):
            record = records.get(name, ModelRecord(name, reason=NOT_LOADED))
            if ready_only and record.state != "READY":
                continue
            if record.versions:
                rows += [{"name": name, "version": str(v), "state": record.state, "reason": record.reason}
                         for v in record.versions]
            else:
                rows.append({"name": name, "state": record.state, "reason": record.reason})
        return rows

    def labels(self, name: str, output: str) -> list[str] | None:
        record = self._records.get(name)
        return None if record is None else record.labels.get(output)

    def _serves(self, name: str) -> bool:
        with self._state_lock:
            record = self._records.get(name)
            return record is not None and bool(record.versions)

    def ready(self) -> bool:
        """Every model the operator asked for serves (Triton's strict readiness).

        A model reloading beside the versions it serves counts as serving: a readiness probe
        must not take the server out of rotation for every reload.
        """
        with self._state_lock:
            return all(n in self._records and _serving(self._records[n]) for n in self._expected)


def _serving(record: ModelRecord) -> bool:
    return record.state == "READY" or (record.state == "LOADING" and bool(record.versions))


def _read_labels(config: ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    labels = {
        output.name: read_labels_file(model_dir / output.labels, where=f"model '{config.name}': output '{output.name}'")
        for output in config.outputs
        if output.labels is not None
    }
    for output in config.outputs:
        classes = output.dims[-1] if output.dims else -1
        if output.name in labels and classes > 0 and len(labels[output.name]) != classes:
            # Served anyway, as Triton does: classes past the labels read "score:index".
            log.warning(
                "model '%s': output '%s' has %d classes but its labels file %s has %d lines",
                config.name, output.name, classes, output.labels, len(labels[output.name]),
            )  # fmt: skip
    return labels


def _checked_files(name: str, files: dict[str, bytes | str]) -> list[tuple[Path, bytes]]:
    """The `file:<version>/<name>` parameters as (relative path, bytes); a bad key or content
    is an InvalidInput naming it (checked before a load changes any state)."""
    return [(_staged_path(name, key), _staged_bytes(name, key, content)) for key, content in files.items()]


def _stage_files(name: str, staged: list[tuple[Path, bytes]]) -> Path:
    """Write checked file parameters into a private directory laid out like a model."""
    root = Path(tempfile.mkdtemp(prefix="conveyor-load-")) / name
    try:
        root.mkdir()
        for relative, data in staged:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except OSError as exc:
        shutil.rmtree(root.parent, ignore_errors=True)
        raise InvalidInput(f"model '{name}': the file parameters cannot be written: {exc.strerror or exc}") from None
    return root


def _staged_path(name: str, key: str) -> Path:
    """The relative path of a `file:<version>/<name>` parameter, inside the model directory."""
    relative = key.removeprefix("file:")
    parts = relative.split("/")
    valid = (
        len(parts) >= 2
        and re.fullmatch(r"[1-9][0-9]*", parts[0]) is not None  # as the repository names versions
        and all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts)
        and "\0" not in relative
        and "\\" not in relative
    )
    if not valid:
        raise InvalidInput(
            f"model '{name}': file parameter {key!r} must look like 'file:<version>/<file name>' inside the "
            "model directory (a version number without leading zeros, no '..', no empty or over-long names)"
        )
    return Path(*parts)


def _staged_bytes(name: str, key: str, content: bytes | str) -> bytes:
    if isinstance(content, bytes):
        return content
    if not isinstance(content, str):
        raise InvalidInput(f"model '{name}': file parameter {key!r} must be the file's bytes as a base64 string")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"model '{name}': file parameter {key!r} is not valid base64") from None
