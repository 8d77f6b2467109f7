"""Result bundles: what `conveyor bench` writes and `conveyor compare` / `conveyor profile` read.

A bundle is a directory holding

- `bundle.json`: one JSON object with every metric, setting and seed of a bench run, the
  machine fingerprint and the software versions (the fields are listed in REQUIRED_FIELDS);
- `latencies.npz`: the raw per-query latencies, compressed: `run<i>_latency_ns` (int64,
  from each query's scheduled time, -1 for a query never answered) and `run<i>_ok` (bool)
  for each repetition, `trial<j>_latency_ns` / `trial<j>_ok` for each find-peak trial.

Bundles outlive the conveyor that wrote them: `format_version` says which layout a file
has; a reader migrates older layouts and refuses newer ones with a message saying so.
Both files are written atomically (temporary file, fsync, rename, directory fsync), the
JSON last, so a directory with a `bundle.json` always holds a complete bundle.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.durable_files import fsync_directory, write_all
from conveyor.errors import ConveyorError

BUNDLE_FORMAT = "conveyor-bench-bundle"
BUNDLE_FORMAT_VERSION = 1
DOCUMENT_FILE_NAME = "bundle.json"
LATENCIES_FILE_NAME = "latencies.npz"

TARGET_KINDS = ("in-process", "http", "grpc")
SCENARIO_NAMES = ("single-stream", "multi-stream", "server", "offline")
SUMMARY_METRICS = ("capacity_qps", "p90_ms", "p99_ms", "throughput_samples_per_s")

_OBJECT, _LIST, _TEXT, _INT, _NUMBER, _BOOL = dict, list, str, int, float, bool
_NULL = type(None)

# Field -> the types it may have; a nested mapping lists a sub-object's required fields.
# Extra fields are allowed everywhere (a newer writer of the same version may add some).
LATENCY_FIELDS = ("mean", "p50", "p90", "p95", "p99", "p999", "max")
RUN_FIELDS: dict[str, Any] = {
    "repetition": (_INT,), "seed": (_INT,), "queries": (_INT,), "samples": (_INT,), "errors": (_INT,),
    "duration_s": (_NUMBER, _NULL), "offered_qps": (_NUMBER, _NULL), "achieved_qps": (_NUMBER, _NULL),
    "throughput_samples_per_s": (_NUMBER, _NULL),
    "latency_ms": {name: (_NUMBER, _NULL) for name in LATENCY_FIELDS},
    "early_stopping": {"percentile": (_NUMBER,), "estimate_ms": (_NUMBER, _NULL),
                       "queries_needed": (_INT,), "enough": (_BOOL,)},
    "generator_overhead": (_NUMBER, _NULL), "late_sends": (_INT, _NULL), "latencies_key": (_TEXT,),
}  # fmt: skip
REQUIRED_FIELDS: dict[str, Any] = {
    "format": (_TEXT,),
    "format_version": (_INT,),
    "created": (_TEXT,),
    "software": {"conveyor_version": (_TEXT, _NULL), "git_commit": (_TEXT, _NULL), "python": (_TEXT,),
                 "numpy": (_TEXT, _NULL), "onnxruntime": (_TEXT, _NULL)},
    "target": {"kind": (_TEXT,), "url": (_TEXT, _NULL), "model": (_TEXT,), "version": (_INT, _TEXT, _NULL),
               "model_sha256": (_TEXT, _NULL), "config_sha256": (_TEXT, _NULL), "settings": (_OBJECT,)},
    "scenario": {"name": (_TEXT,), "seed": (_INT,), "warmup_s": (_NUMBER,), "min_duration_s": (_NUMBER,),
                 "min_queries": (_INT,), "samples_per_query": (_INT,), "target_qps": (_NUMBER, _NULL),
                 "slo_p99_ms": (_NUMBER, _NULL), "repetitions": (_INT,)},
    "runs": (_LIST,),
    "peak": (_OBJECT, _NULL),
    "summary": {"metric": (_TEXT,), "value": (_NUMBER, _NULL), "ci95": (_LIST, _NULL), "cv": (_NUMBER, _NULL)},
    "accuracy": (_OBJECT, _NULL),
    "batch_sizes": (_OBJECT, _NULL),
    "utilisation": {"cpu_percent": (_NUMBER, _NULL), "gpu_percent": (_NUMBER, _NULL)},
    "machine": (_OBJECT,),
}  # fmt: skip
PEAK_FIELDS: dict[str, Any] = {
    "slo_p99_ms": (_NUMBER,), "max_error_rate": (_NUMBER,), "capacity_qps": (_NUMBER, _NULL),
    "capacity_qps_per_repetition": (_LIST,), "trials": (_LIST,),
}  # fmt: skip
TRIAL_FIELDS: dict[str, Any] = {"rate_qps": (_NUMBER,), "p99_ms": (_NUMBER, _NULL), "error_rate": (_NUMBER,),
                                "passed": (_BOOL,)}  # fmt: skip
ACCURACY_FIELDS: dict[str, Any] = {
    "reference": (_TEXT,), "outputs_compared": (_INT,), "max_abs_difference": (_NUMBER, _NULL),
    "top1_agreement": (_NUMBER, _NULL), "tolerance": (_NUMBER,), "passed": (_BOOL,),
}  # fmt: skip
CHOICES = {("target", "kind"): TARGET_KINDS, ("scenario", "name"): SCENARIO_NAMES,
           ("summary", "metric"): SUMMARY_METRICS}  # fmt: skip


class BundleError(ConveyorError, ValueError):
    """A bundle that cannot be written or read; the message names the path, the field and the fix."""


# ---------------------------------------------------------------- reading


@dataclass
class Bundle:
    """One bundle read from disk: its JSON document, and its latency arrays loaded on first use."""

    path: Path  # the bundle's directory
    document: dict[str, Any]
    _arrays: Any = field(default=None, repr=False)

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """The arrays of latencies.npz by name (read from disk on first access, then kept)."""
        if self._arrays is None:
            self._arrays = _load_arrays(self.path / LATENCIES_FILE_NAME)
        return self._arrays

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.document["runs"]

    def run_latencies_ns(self, repetition: int) -> np.ndarray:
        """The per-query latencies (ns, -1 never answered) of the run with index `repetition` in `runs`."""
        return self.arrays[f"{self.runs[repetition]['latencies_key']}_latency_ns"]

    def run_ok(self, repetition: int) -> np.ndarray:
        """Which queries of that run succeeded (bool per query)."""
        return self.arrays[f"{self.runs[repetition]['latencies_key']}_ok"]

    def __getitem__(self, key: str) -> Any:
        return self.document[key]


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Reads the bundle at `path` (its directory, or its bundle.json), checked and migrated to this format.

    Raises BundleError naming the path and the fault: not a bundle, a format newer than this
    conveyor reads, a field missing or of the wrong type.
    """
    given = Path(path)
    directory = given.parent if given.name == DOCUMENT_FILE_NAME and given.is_file() else given
    document_path = directory / DOCUMENT_FILE_NAME
    if not directory.exists():
        raise BundleError(f"{given}: no such bundle; pass the directory that 'conveyor bench --out' wrote")
    if not document_path.is_file():
        raise BundleError(f"{directory} is not a bundle: it has no {DOCUMENT_FILE_NAME}; a bundle is the directory "
                          f"'conveyor bench --out DIR' writes ({DOCUMENT_FILE_NAME} + {LATENCIES_FILE_NAME})")
    try:
        document = json.loads(document_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {document_path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{document_path} is not valid JSON ({exc}); the bundle is damaged: run "
                          "'conveyor bench' again") from None
    document = _migrated(document, document_path)
    validate_document(document, document_path)
    bundle = Bundle(directory, document)
    _check_latency_keys(bundle)
    return bundle


def _migrated(document: Any, where: Path) -> dict[str, Any]:
    """`document` in the current format: identity check, version check, then each migration step in turn."""
    if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise BundleError(f"{where} is not a conveyor bench bundle: its 'format' is {found!r}, expected "
                          f"{BUNDLE_FORMAT!r}; a bundle is the directory 'conveyor bench --out DIR' writes")
    version = document.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: field 'format_version' is {version!r}, expected a positive integer")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{where} has bundle format_version {version}, newer than this conveyor reads (up to "
                          f"{BUNDLE_FORMAT_VERSION}): read it with the conveyor version that wrote it "
                          f"({_software_version(document)}) or newer, e.g. 'pip install -U conveyor-serve'")
    while version < BUNDLE_FORMAT_VERSION:
        document = MIGRATIONS[version](dict(document))
        version = document["format_version"]
    return document


def _software_version(document: dict[str, Any]) -> str:
    software = document.get("software")
    version = software.get("conveyor_version") if isinstance(software, dict) else None
    return f"conveyor {version}" if isinstance(version, str) else "its version is not recorded"


# format_version N -> a function turning an N document into an N+1 one. Version 1 is the first.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _load_arrays(path: Path) -> Mapping[str, np.ndarray]:
    if not path.is_file():
        raise BundleError(f"{path} is missing: the bundle's raw latencies are gone; copy the whole bundle directory")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}; the bundle is damaged: run 'conveyor bench' again") from None


def _check_latency_keys(bundle: Bundle) -> None:
    """Each run's and trial's arrays are named in latencies.npz (its directory only is read, not the data)."""
    keys = list(iter_latency_keys(bundle.document))
    if not keys:
        return
    path = bundle.path / LATENCIES_FILE_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing: the bundle's raw latencies are gone; copy the whole bundle directory")
    try:
        with np.load(path, allow_pickle=False) as archive:
            present = set(archive.files)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}; the bundle is damaged: run 'conveyor bench' again") from None
    for key in keys:
        for suffix in ("_latency_ns", "_ok"):
            if key + suffix not in present:
                raise BundleError(f"{path} has no array {key + suffix!r}, which {DOCUMENT_FILE_NAME} refers to; "
                                  "the bundle is damaged: run 'conveyor bench' again")


# ---------------------------------------------------------------- validation


def validate_document(document: Mapping[str, Any], where: str | os.PathLike[str]) -> None:
    """Raises BundleError naming `where` and the first field that is missing, mistyped or not a known choice."""
    _check_fields(document, REQUIRED_FIELDS, (), where)
    for index, run in enumerate(document["runs"]):
        _check_fields(run, RUN_FIELDS, ("runs", index), where)
    if document["peak"] is not None:
        _check_fields(document["peak"], PEAK_FIELDS, ("peak",), where)
        for index, trial in enumerate(document["peak"]["trials"]):
            _check_fields(trial, TRIAL_FIELDS, ("peak", "trials", index), where)
    if document["accuracy"] is not None:
        _check_fields(document["accuracy"], ACCURACY_FIELDS, ("accuracy",), where)
    for (section, name), allowed in CHOICES.items():
        if document[section][name] not in allowed:
            raise BundleError(f"{where}: field '{section}.{name}' is {document[section][name]!r}, expected one of "
                              f"{', '.join(allowed)}")


def _check_fields(value: Any, spec: Mapping[str, Any], trail: tuple[Any, ...], where: Any) -> None:
    if not isinstance(value, dict):
        raise BundleError(f"{where}: field '{_dotted(trail)}' is {type(value).__name__}, expected an object")
    for name, expected in spec.items():
        here = (*trail, name)
        if name not in value:
            raise BundleError(f"{where}: field '{_dotted(here)}' is missing; the file is not a complete bundle "
                              f"(format_version {BUNDLE_FORMAT_VERSION} needs it)")
        if isinstance(expected, dict):
            _check_fields(value[name], expected, here, where)
        elif not _has_type(value[name], expected):
            names = " or ".join("null" if t is _NULL else t.__name__.replace("dict", "object") for t in expected)
            raise BundleError(f"{where}: field '{_dotted(here)}' is {value[name]!r:.60}, expected {names}")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return _BOOL in types
    if isinstance(value, int) and _NUMBER in types:
        return True
    return isinstance(value, types)


def _dotted(trail: tuple[Any, ...]) -> str:
    text = ""
    for part in trail:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "(the document)"


# ---------------------------------------------------------------- writing


def write_bundle(directory: str | os.PathLike[str], document: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    """Writes a bundle into `directory` (created if needed) and returns the directory.

    `document` gets `format`, `format_version` and `created` when it lacks them; numpy
    values become plain JSON numbers and non-finite floats null. The document is
    validated first (BundleError naming the field), the arrays must hold each run's and
    trial's `<key>_latency_ns` and `<key>_ok`. An existing bundle there is replaced.
    """
    directory = Path(directory)
    document = _jsonable(document)
    document.setdefault("format", BUNDLE_FORMAT)
    document.setdefault("format_version", BUNDLE_FORMAT_VERSION)
    document.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    where = directory / DOCUMENT_FILE_NAME
    validate_document(document, where)
    _check_arrays(document, arrays, directory / LATENCIES_FILE_NAME)
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"--out {directory} is a file; pass a directory for the bundle")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(array) for name, array in arrays.items()})
        write_file_atomically(directory / LATENCIES_FILE_NAME, buffer.getvalue())
        text = json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n"
        write_file_atomically(where, text.encode("utf-8"))
    except OSError as exc:
        raise BundleError(f"cannot write the bundle to {directory}: {exc.strerror or exc}; "
                          "pass another --out") from None
    return directory


def _check_arrays(document: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: Path) -> None:
    for key in iter_latency_keys(document):
        latency, ok = arrays.get(key + "_latency_ns"), arrays.get(key + "_ok")
        if latency is None or ok is None:
            raise BundleError(f"{where}: arrays {key}_latency_ns and {key}_ok are both needed, as the document "
                              f"refers to {key!r}")
        if np.shape(latency) != np.shape(ok):
            raise BundleError(f"{where}: {key}_latency_ns has shape {np.shape(latency)} but {key}_ok has "
                              f"{np.shape(ok)}; they hold one entry per query")


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replaces `path` with `data`: temporary file, fsync, rename, directory fsync."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays as plain Python, paths as text and non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def iter_latency_keys(document: Mapping[str, Any]) -> Iterator[str]:
    """The array keys (`run<i>`, `trial<j>`) a document refers to, runs first."""
    yield from (run["latencies_key"] for run in document["runs"])
    if document.get("peak"):
        yield from (f"trial{j}" for j in range(len(document["peak"]["trials"])))
