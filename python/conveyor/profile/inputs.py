"""What `conveyor bench` sends, and whether the answers are still right.

- A model's signature (`ModelSignature`): from its config in a repository, or from a
  KServe v2 server's model metadata and config (`fetch_signature`).
- Samples (one request's inputs each, with its batch dimension when the model batches):
  generated from the signature with a seed (variable dims filled with a size the user
  chooses), or read from the user's .npy / .npz / Parquet file and checked against it.
- Accuracy: a reference file (.npz: each sample's inputs and the outputs it should give)
  is written once (`write_reference`) and later compared with what this machine and
  configuration answer (`check_accuracy`): max absolute difference, top-1 agreement for
  classifiers. A configuration that changes answers is flagged, not ranked.
- `ModelClient`: the reference set's requests in-process (the Runtime) or over the
  network (KServe v2 HTTP with the standard library, or gRPC with the protocol's stubs);
  the load itself goes through the native generator, not through this.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.config import NUMPY_DTYPE_BY_DATATYPE
from conveyor.errors import ConveyorError

REFERENCE_FORMAT = "conveyor-bench-reference"
REFERENCE_FORMAT_VERSION = 1
DEFAULT_TOLERANCE = 1e-3  # max absolute output difference that still counts as the same answer
DEFAULT_MIN_TOP1_AGREEMENT = 0.99  # share of samples whose top class must agree (MLPerf keeps 99% of accuracy)
_INTEGER_RANGE = 16  # generated integer inputs lie in [0, 16): safe for small vocabularies and category ids


class InputError(ConveyorError, ValueError):
    """Samples, a reference or a model signature that cannot be used; the message says what and how to fix it."""


class TargetUnreachable(ConveyorError):
    """The server at --url could not be reached or answered something that is not a KServe v2 server's answer."""


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 variable


@dataclass(frozen=True)
class ModelSignature:
    """A model's inputs and outputs as a client sees them."""

    model: str
    version: int | str | None
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_config(cls, config: Any, version: int | None = None) -> ModelSignature:
        """From a conveyor ModelConfig (as the runtime loaded it: an onnx model's tensors filled in)."""
        def specs(tensors: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(t.dims)) for t in tensors)

        return cls(config.name, version, config.max_batch_size, specs(config.inputs), specs(config.outputs))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], config: Mapping[str, Any] | None) -> ModelSignature:
        """From v2 model metadata (shapes include the batch dim) and, if served, the model config's max_batch_size."""
        try:
            batch = int((config or {}).get("max_batch_size", 0))
            if config is None:  # no config endpoint: a leading -1 on every input means the server batches
                batch = 1 if metadata["inputs"] and all(i["shape"][:1] == [-1] for i in metadata["inputs"]) else 0

            def specs(key: str) -> tuple[TensorSpec, ...]:
                # Outputs are optional here: some servers (MLServer) leave undeclared ones out,
                # and the generator needs only the inputs.
                tensors = metadata[key] if key == "inputs" else metadata.get(key) or []
                return tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"][1:] if batch else t["shape"]))
                             for t in tensors)  # fmt: skip

            versions = metadata.get("versions") or [None]
            return cls(metadata["name"], versions[-1], batch, specs("inputs"), specs("outputs"))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TargetUnreachable(f"the server's model metadata is not in the KServe v2 shape ({exc!r})") from None

    def sample_shape(self, spec: TensorSpec, variable_dim: int) -> tuple[int, ...]:
        """One request's shape of an input: batch of 1 (when batching), -1 dims as `variable_dim`."""
        dims = tuple(variable_dim if d == -1 else d for d in spec.dims)
        return (1, *dims) if self.max_batch_size > 0 else dims


def _dtype(spec: TensorSpec) -> np.dtype:
    dtype = NUMPY_DTYPE_BY_DATATYPE.get(spec.datatype)
    if dtype is None:
        raise InputError(f"input '{spec.name}' is {spec.datatype}, which numpy cannot generate: pass --inputs with "
                         "the data to send")
    return dtype


# ---------------------------------------------------------------- samples


Sample = dict[str, np.ndarray]


def generate_samples(signature: ModelSignature, count: int, seed: int, *, variable_dim: int = 8) -> list[Sample]:
    """`count` seeded samples matching the signature: normal floats, integers in [0, 16), random bools and text."""
    if count < 1 or variable_dim < 1:
        raise InputError(f"the sample count ({count}) and the variable dim size ({variable_dim}) must be >= 1")
    generator = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in signature.inputs:
            sample[spec.name] = _random_array(generator, spec, signature.sample_shape(spec, variable_dim))
        samples.append(sample)
    return samples


def _random_array(generator: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = _dtype(spec)
    if dtype.kind == "f":
        return generator.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        high = 256 if dtype == np.uint8 else _INTEGER_RANGE
        return generator.integers(0, high, size=shape).astype(dtype)
    if dtype.kind == "b":
        return generator.integers(0, 2, size=shape).astype(bool)
    words = generator.integers(0, 26, size=(math.prod(shape), 8))
    text = np.empty(math.prod(shape), dtype=object)
    text[:] = [(97 + row).tobytes() for row in words.astype(np.uint8)]
    return text.reshape(shape)


def read_samples(path: Path, signature: ModelSignature) -> list[Sample]:
    """The samples of a user's file, checked against the signature (InputError naming input, shape and dtype).

    .npy: one array of rows, for a model with a single input. .npz: one array of rows per
    input, named like the input. .parquet: one column per input, a row per sample (list
    cells for tensors). Each row becomes one request.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"--inputs {path} does not exist; pass a .npy, .npz or .parquet file")
    if suffix == ".npy":
        if len(signature.inputs) != 1:
            raise InputError(f"--inputs {path}: a .npy file holds one array, but model '{signature.model}' has "
                             f"inputs {[s.name for s in signature.inputs]}: pass an .npz with one array per input")
        columns = {signature.inputs[0].name: _rows_of(_load_numpy(path, lambda data: data), path)}
    elif suffix == ".npz":
        columns = _load_numpy(path, lambda data: {name: _rows_of(data[name], path) for name in data.files})
    elif suffix in (".parquet", ".pq"):
        columns = _read_parquet(path)
    else:
        raise InputError(f"--inputs {path}: unknown file type {suffix or '(none)'}; pass .npy, .npz or .parquet")
    return _samples_from_columns(columns, signature, path)


def _load_numpy(path: Path, read: Callable[[Any], Any]) -> Any:
    try:
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            return read(loaded) if not hasattr(loaded, "close") else _with_close(loaded, read)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read {path} as numpy data: {exc}") from None


def _with_close(archive: Any, read: Callable[[Any], Any]) -> Any:
    with archive:
        return read(archive)


def _rows_of(array: np.ndarray, path: Path) -> list[np.ndarray]:
    if array.ndim == 0:
        raise InputError(f"--inputs {path}: an array is a scalar; it needs one row per sample")
    return list(array)


def _read_parquet(path: Path) -> dict[str, list[np.ndarray]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise InputError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = parquet.read_table(path)
    except Exception as exc:  # pyarrow raises its own types for damaged files
        raise InputError(f"cannot read {path} as Parquet: {exc}") from None
    return {name: [np.asarray(value) for value in table.column(name).to_pylist()] for name in table.column_names}


def _samples_from_columns(
    columns: Mapping[str, list[np.ndarray]], signature: ModelSignature, path: Path
) -> list[Sample]:
    expected = [spec.name for spec in signature.inputs]
    if sorted(columns) != sorted(expected):
        raise InputError(f"--inputs {path} holds {sorted(columns)}, but model '{signature.model}' takes inputs "
                         f"{expected}: name the arrays (or columns) like the inputs")
    counts = {name: len(rows) for name, rows in columns.items()}
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise InputError(f"--inputs {path}: every input needs the same number of rows (at least one), got {counts}")
    samples: list[Sample] = [{} for _ in range(next(iter(counts.values())))]
    for spec in signature.inputs:
        for index, row in enumerate(columns[spec.name]):
            samples[index][spec.name] = _checked_row(np.asarray(row), spec, signature, f"--inputs {path}, row {index}")
    return samples


def _checked_row(row: np.ndarray, spec: TensorSpec, signature: ModelSignature, where: str) -> np.ndarray:
    """One row as a request's input: the dims and dtype the model expects, with its batch dimension."""
    dims = spec.dims
    if len(row.shape) != len(dims) or any(d != -1 and d != n for d, n in zip(dims, row.shape)):
        raise InputError(f"{where}: input '{spec.name}' has shape {list(row.shape)}, but the model expects "
                         f"{list(dims)} per sample ({spec.datatype}; -1 is any size)")
    dtype = _dtype(spec)
    if spec.datatype == "BYTES":
        if row.dtype.kind not in "SUO":
            raise InputError(f"{where}: input '{spec.name}' is BYTES (text), got {row.dtype} values")
        converted = np.empty(row.shape, dtype=object)
        converted[...] = [v.encode() if isinstance(v, str) else bytes(v) for v in row.ravel().tolist()] or []
        row = converted
    elif not np.can_cast(row.dtype, dtype, "same_kind") and not (row.dtype.kind in "iub" and dtype.kind in "iuf"):
        raise InputError(f"{where}: input '{spec.name}' holds {row.dtype} values, but the model expects "
                         f"{spec.datatype} ({dtype}); convert the data")
    else:
        row = np.ascontiguousarray(row, dtype=dtype)
    return row[None, ...] if signature.max_batch_size > 0 else row


# ---------------------------------------------------------------- reference outputs


@dataclass
class Reference:
    """A reference set: each sample's inputs and the outputs it should give."""

    inputs: list[Sample]
    outputs: list[Sample]


def write_reference(path: Path, samples: Sequence[Sample], outputs: Sequence[Sample]) -> None:
    """Writes the samples and their outputs as a reference .npz (atomically), for later --reference checks."""
    from conveyor.profile.bundle import write_file_atomically

    arrays: dict[str, np.ndarray] = {"format": np.array(REFERENCE_FORMAT),
                                     "format_version": np.array(REFERENCE_FORMAT_VERSION)}  # fmt: skip
    for index, (sample, output) in enumerate(zip(samples, outputs, strict=True)):
        for kind, tensors in (("input", sample), ("output", output)):
            for name, array in tensors.items():
                array = np.asarray(array)
                if array.dtype == object:  # BYTES: fixed-width bytes, so reading needs no pickle
                    array = np.array([bytes(v) if not isinstance(v, str) else v.encode() for v in array.ravel()],
                                     dtype=np.bytes_).reshape(array.shape)  # fmt: skip
                arrays[f"{kind}/{index}/{name}"] = array
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, buffer.getvalue())
    except OSError as exc:
        raise InputError(f"cannot write the reference to {path}: {exc.strerror or exc}") from None


def read_reference(path: Path, signature: ModelSignature) -> Reference:
    """A reference .npz written by write_reference, with its inputs checked against the signature."""
    if not path.is_file():
        raise InputError(f"--reference {path} does not exist; write one first with --write-reference {path}")

    def read(archive: Any) -> Reference:
        if "format" not in archive.files or str(archive["format"]) != REFERENCE_FORMAT:
            raise InputError(f"--reference {path} is not a bench reference file (written by --write-reference)")
        if int(archive["format_version"]) > REFERENCE_FORMAT_VERSION:
            raise InputError(f"--reference {path} has format_version {int(archive['format_version'])}, newer than "
                             f"this conveyor reads ({REFERENCE_FORMAT_VERSION}): upgrade conveyor")
        found: dict[tuple[str, int], Sample] = {}
        for key in archive.files:
            kind, _, rest = key.partition("/")
            index, _, name = rest.partition("/")
            if kind in ("input", "output") and index.isdigit():
                array = archive[key]
                if array.dtype.kind == "S":  # BYTES were stored fixed-width
                    array = array.astype(object)
                found.setdefault((kind, int(index)), {})[name] = array
        count = 1 + max((i for _, i in found), default=-1)
        inputs = [found.get(("input", i), {}) for i in range(count)]
        outputs = [found.get(("output", i), {}) for i in range(count)]
        return Reference(inputs, outputs)

    reference = _load_numpy(path, read)
    if not reference.inputs:
        raise InputError(f"--reference {path} holds no samples")
    expected = {spec.name: spec for spec in signature.inputs}
    for index, sample in enumerate(reference.inputs):
        if sorted(sample) != sorted(expected):
            raise InputError(f"--reference {path}, sample {index}: inputs {sorted(sample)}, but model "
                             f"'{signature.model}' takes {sorted(expected)}: the reference was written for another "
                             "model")
    return reference


# ---------------------------------------------------------------- accuracy


def check_accuracy(reference: Reference, infer: Callable[[Sample], Sample], *, reference_path: Path,
                   tolerance: float = DEFAULT_TOLERANCE,
                   min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT) -> dict[str, Any]:  # fmt: skip
    """Runs the reference inputs and compares the answers: the bundle's "accuracy" block.

    Numeric outputs: the largest absolute difference (must be <= tolerance). Outputs that
    rank classes (a last dim of several scores, or "score:index:label" strings): the share of
    samples whose top class agrees (must be >= min_top1_agreement). Other text: exact equality.
    A missing output or a changed shape fails the check and is named in "problems".
    """
    difference, top1 = 0.0, [0, 0]  # top1: [agreeing, compared]
    exact = [0, 0]
    problems: list[str] = []
    compared = 0
    for index, (sample, expected) in enumerate(zip(reference.inputs, reference.outputs)):
        actual = infer(sample)
        for name, want in expected.items():
            got = actual.get(name)
            compared += 1
            if got is None or np.shape(got) != np.shape(want):
                problems.append(f"sample {index}, output '{name}': expected shape {list(np.shape(want))}, got "
                                f"{'nothing' if got is None else list(np.shape(got))}")  # fmt: skip
                continue
            got, want = np.asarray(got), np.asarray(want)
            if want.dtype.kind in "biuf" and got.dtype.kind in "biuf":
                if want.size:
                    gap = np.abs(got.astype(np.float64) - want.astype(np.float64))
                    difference = max(difference, float(np.max(gap)))
                if want.ndim >= 1 and want.shape[-1] > 1 and want.dtype.kind == "f":
                    top1[0] += int(np.count_nonzero(np.argmax(got, -1) == np.argmax(want, -1)))
                    top1[1] += int(np.prod(want.shape[:-1]))
            else:
                classes = _top_classes(want), _top_classes(got)
                if classes[0] is not None and classes[1] is not None:
                    top1[0] += int(classes[0] == classes[1])
                    top1[1] += 1
                else:
                    exact[0] += int(np.array_equal(got.astype(object), want.astype(object)))
                    exact[1] += 1
    agreement = top1[0] / top1[1] if top1[1] else None
    passed = (not problems and difference <= tolerance and (agreement is None or agreement >= min_top1_agreement)
              and exact[0] == exact[1])  # fmt: skip
    return {"reference": str(reference_path), "outputs_compared": compared, "max_abs_difference": difference,
            "top1_agreement": agreement, "tolerance": tolerance, "min_top1_agreement": min_top1_agreement,
            "exact_agreement": exact[0] / exact[1] if exact[1] else None, "problems": problems[:20],
            "passed": bool(passed)}  # fmt: skip


def _top_classes(array: np.ndarray) -> tuple[int, ...] | None:
    """The class index of the first "score:index:label" entry of each row of a classification output, else None."""
    if array.ndim == 0 or array.shape[-1] < 1:
        return None
    rows = array.reshape(-1, array.shape[-1])[:, 0]
    classes = []
    for entry in rows.tolist():
        text = entry.decode("utf-8", "replace") if isinstance(entry, (bytes, bytearray)) else str(entry)
        parts = text.split(":")
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            return None
        classes.append(int(parts[1]))
    return tuple(classes)


# ---------------------------------------------------------------- reaching the model (reference set, signature)


class InProcessClient:
    """The model of a Runtime in this process: its config is the signature, requests go through its batcher."""

    def __init__(self, runtime: Any, model: str, version: int | None = None) -> None:
        self.runtime = runtime
        self.handle = runtime.model(model, version)  # ModelNotFound names the loaded models

    def signature(self) -> ModelSignature:
        return ModelSignature.from_config(self.handle.config, self.handle.version)

    def server_config(self) -> dict[str, Any] | None:
        return None  # the caller has the ModelConfig itself

    def batch_counts(self) -> dict[int, int] | None:
        """Batches run so far by size, from the batcher's statistics."""
        histogram = self.runtime.model_stats(self.handle).get("batch_size_histogram") or {}
        return {int(size): int(count) for size, count in histogram.items()}

    def infer(self, sample: Sample) -> Sample:
        # Copies: the runtime hands out views of a pooled batch output.
        return {name: np.array(array) for name, array in self.runtime.infer(self.handle, sample).items()}

    def close(self) -> None:
        return None


class HttpClient:
    """A KServe v2 server over HTTP/1.1 with the standard library (JSON tensors)."""

    def __init__(self, url: str, model: str, version: str | None = None, *, timeout_s: float = 30.0) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise InputError(f"--url {url!r} is not an HTTP address: pass one like http://127.0.0.1:8000")
        self.url, self.model, self.version, self.timeout_s = url.rstrip("/"), model, version, timeout_s

    def _model_path(self, suffix: str = "") -> str:
        path = "/v2/models/" + urllib.parse.quote(self.model, safe="")
        if self.version:
            path += "/versions/" + urllib.parse.quote(str(self.version), safe="")
        return path + suffix

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; TargetUnreachable when the server cannot be reached, InputError for its refusals."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc, method, path) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TargetUnreachable(f"the server is not reachable at {self.url} ({reason}); start it (e.g. 'conveyor "
                                    "serve') or pass --url with its address") from None
        try:
            return json.loads(answer)
        except ValueError:
            raise TargetUnreachable(f"{self.url}{path} answered with a body that is not JSON; check that {self.url} "
                                    "is a KServe v2 server") from None

    def _refusal(self, exc: urllib.error.HTTPError, method: str, path: str) -> ConveyorError:
        try:
            message = str(json.loads(exc.read(4000))["error"])
        except (ValueError, KeyError, TypeError, OSError):
            message = str(exc.reason)
        if exc.code == 404 and method == "GET" and path.startswith(self._model_path()):
            return InputError(f"model '{self.model}' is not served at {self.url} ({message}); models there: "
                              f"{', '.join(self.model_names()) or 'none'}")
        return InputError(f"{method} {self.url}{path} answered {exc.code}: {message}")

    def model_names(self) -> list[str]:
        try:
            listed = self.call("GET", "/v2/models")
        except ConveyorError:
            return []
        models = listed.get("models", []) if isinstance(listed, dict) else listed
        return sorted({m.get("name", "?") if isinstance(m, dict) else str(m) for m in models or []})

    def server_config(self) -> dict[str, Any] | None:
        try:
            config = self.call("GET", self._model_path("/config"))
        except InputError:
            return None  # not every v2 server has the model configuration extension
        return config.get("config", config) if isinstance(config, dict) else None

    def signature(self) -> ModelSignature:
        return ModelSignature.from_metadata(self.call("GET", self._model_path()), self.server_config())

    def batch_counts(self) -> dict[int, int] | None:
        """Batches run so far by size, from the statistics extension (None where the server has none)."""
        try:
            return batch_counts_of(self.call("GET", self._model_path("/stats")))
        except InputError:
            return None

    def infer(self, sample: Sample) -> Sample:
        from conveyor.protocol.json_tensors import array_from_json, utf8_strings

        inputs = []
        for name, array in sample.items():
            array = np.asarray(array)
            if array.dtype == object:
                data, datatype = utf8_strings(array, where=f"input '{name}'"), "BYTES"
                if data is None:
                    raise InputError(f"input '{name}' holds bytes that are not UTF-8, which JSON cannot carry: "
                                     "bench this model in-process or over --protocol grpc")
            else:
                data, datatype = array.ravel().tolist(), _datatype_of(array)
            inputs.append({"name": name, "shape": list(array.shape), "datatype": datatype, "data": data})
        answer = self.call("POST", self._model_path("/infer"), {"inputs": inputs})
        try:
            return {o["name"]: array_from_json(o["data"], o["datatype"], o["shape"], where=f"output '{o['name']}'")
                    for o in answer["outputs"]}  # fmt: skip
        except (KeyError, TypeError, ConveyorError) as exc:
            raise TargetUnreachable(f"{self.url}: the infer answer is not in the KServe v2 shape ({exc})") from None

    def close(self) -> None:
        return None


class GrpcClient:
    """A KServe v2 server over gRPC, with the protocol's own stubs (raw tensor contents)."""

    def __init__(self, url: str, model: str, version: str | None = None, *, timeout_s: float = 30.0) -> None:
        import grpc

        from conveyor.protocol.grpc import inference_pb2, inference_pb2_grpc

        self._grpc, self._pb = grpc, inference_pb2
        self.url, self.model, self.version, self.timeout_s = url, model, version or "", timeout_s
        target = url.split("://", 1)[-1].rstrip("/")
        self.channel = grpc.insecure_channel(target)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=min(timeout_s, 10.0))
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise TargetUnreachable(f"no gRPC server answers at {url}; start it (e.g. 'conveyor serve') or pass "
                                    "--url with its gRPC address (host:port)") from None
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == self._grpc.StatusCode.NOT_FOUND and method != "ModelInfer":
                return self._missing(details)
            if code in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TargetUnreachable(f"the gRPC server at {self.url} did not answer {method}: {details}") from None
            raise InputError(f"{method} at {self.url} failed ({code.name}): {details}") from None

    def _missing(self, details: str) -> Any:
        try:
            index = self.stub.RepositoryIndex(self._pb.RepositoryIndexRequest(ready=True), timeout=self.timeout_s)
            names = sorted({m.name for m in index.models})
        except self._grpc.RpcError:
            names = []
        raise InputError(f"model '{self.model}' is not served at {self.url} ({details}); models there: "
                         f"{', '.join(names) or 'none'}")

    def server_config(self) -> dict[str, Any] | None:
        from google.protobuf import json_format

        try:
            response = self._call("ModelConfig", self._pb.ModelConfigRequest(name=self.model, version=self.version))
        except InputError:
            return None
        # Zeros too (a max_queue_delay of 0 is a setting, not an absence).
        return json_format.MessageToDict(response.config, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)  # fmt: skip

    def signature(self) -> ModelSignature:
        from google.protobuf import json_format

        metadata = self._call("ModelMetadata", self._pb.ModelMetadataRequest(name=self.model, version=self.version))
        document = json_format.MessageToDict(metadata, preserving_proto_field_name=True)
        for tensor in document.get("inputs", []) + document.get("outputs", []):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
        config = self.server_config()
        if config is not None:
            config["max_batch_size"] = int(config.get("max_batch_size", 0))
        return ModelSignature.from_metadata(document, config)

    def batch_counts(self) -> dict[int, int] | None:
        from google.protobuf import json_format

        try:
            response = self._call("ModelStatistics", self._pb.ModelStatisticsRequest(name=self.model,
                                                                                     version=self.version))
        except InputError:
            return None
        return batch_counts_of(json_format.MessageToDict(response, preserving_proto_field_name=True))

    def infer(self, sample: Sample) -> Sample:
        from conveyor.protocol.binary import array_from_raw, raw_view, serialize_bytes

        request = self._pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        for name, array in sample.items():
            array = np.asarray(array)
            datatype = "BYTES" if array.dtype == object else _datatype_of(array)
            request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            raw = serialize_bytes(array, where=f"input '{name}'") if datatype == "BYTES" else bytes(
                raw_view(array, datatype, where=f"input '{name}'"))  # fmt: skip
            request.raw_input_contents.append(raw)
        response = self._call("ModelInfer", request)
        return {o.name: array_from_raw(raw, o.datatype, list(o.shape), where=f"output '{o.name}'")
                for o, raw in zip(response.outputs, response.raw_output_contents)}  # fmt: skip

    def close(self) -> None:
        self.channel.close()


def batch_counts_of(statistics: Any) -> dict[int, int] | None:
    """Batches by size from a v2 statistics document (Triton's batch_stats), summed over versions; None if absent."""
    try:
        counts: dict[int, int] = {}
        for model in statistics["model_stats"]:
            for entry in model.get("batch_stats") or []:
                size = int(entry["batch_size"])
                counts[size] = counts.get(size, 0) + int(entry["compute_infer"]["count"])
        return counts
    except (KeyError, TypeError, ValueError):
        return None


def _datatype_of(array: np.ndarray) -> str:
    from conveyor.protocol.datatypes import datatype_of

    return datatype_of(array.dtype)
