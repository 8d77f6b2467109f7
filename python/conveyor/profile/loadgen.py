"""The native load generator under `conveyor bench`: schedules, targets and runs.

Additions to the interface agreed for `conveyor bench` (nothing removed or renamed):
`run_open_loop(..., spin_us=10.0)`; `connect_timeout_s` on the network targets;
`sample_count` and `close()` (and `with`) on every target; LoadRun's `busy_ns`,
`active_ns`, `queries`, `offered_rate_qps`, `sent_rate_qps` and `error_count`. In a
closed loop a query's scheduled time is the moment the generator issues it, right after
the previous answer (as in MLPerf's single-stream), so the generator's wake-up is not
counted as the target's latency. `poisson_schedule` rescales its exponential gaps so that
the schedule spans exactly (count - 1) / rate: a schedule's offered rate is the target.

The hot loop is C++ (conveyor/loadgen.h): the calling thread becomes the generator, with
the GIL released for the whole run, and sends each query at its scheduled time (it sleeps
until `spin_us` before, then spins; the first sends follow the schedule, there is no
start-up burst). Latency is counted from the SCHEDULED time, so a send held back by a busy
generator or a full target still counts its wait (no coordinated omission). Each run
reports the generator's own overhead (the share of its wall time from the first due time
to its last send spent sending rather than waiting for a due time or a free slot: near 1
means it could not keep up; a CPU-starved generator shows it too) and its late sends (more
than 100 us after their due time).

Targets own a pool of samples, each one request's inputs (`{name: array}` with the batch
dimension), converted once: no Python runs per request.

- `InProcessTarget`: C++ submits straight to the model version's batcher. Python-backend
  models take the GIL once per batch on the batcher's threads. What the runtime does in
  Python after a batch (a pipeline's `finish`, per-request capture) is not run: this
  measures the batcher, the kernels and the backend.
- `HttpTarget`: a C++ HTTP/1.1 keep-alive client (epoll, one request in flight per
  connection, no pipelining), KServe v2 infer requests prebuilt per sample with Triton's
  binary tensor extension (binary outputs asked for). An answer is ok when it is 2xx with
  no "error" key. A closed or broken connection fails the request on it (counted) and is
  reopened; a keep-alive connection found closed before any answer is retried once.
- `GrpcTarget`: grpcio's `ModelInfer.future()` per request, called from the C++ schedule
  (the GIL is taken per send and per answer). Its ceiling is that of grpcio in Python:
  2,500 to 4,700 requests/s answered on a 2-vCPU machine, depending on what else runs
  there (bench/bench_loadgen.py: offline, 256 in flight, against a no-op servicer in a
  subprocess), and about 4,300/s sent with no bound on the requests in flight (grpcio's
  servers then cancel part of the flood); the native HTTP client did 65k-100k/s and the
  in-process target 460k-800k/s in the same runs. Use those beyond a few thousand per second.

Targets bound the requests in flight: the batcher's queue size (a full queue would
reject), the HTTP connections; the generator waits for a free slot (the wait counts as
latency) rather than overrunning them.
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np

from conveyor import _core
from conveyor.errors import InvalidInput, Unavailable
from conveyor.protocol.binary import serialize_bytes
from conveyor.protocol.datatypes import datatype_of
from conveyor.runtime import Runtime

NS_PER_S = 1_000_000_000
LATE_SEND_NS = 100_000  # a send this far past its due time counts as late
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0

Sample = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LoadRun:
    """One run: arrays of one entry per query, in schedule order; times in ns from the run start.

    A query never sent or never answered has -1 for those times and is not ok; every failed
    request is counted in `errors` under its (truncated) text.
    """

    scheduled_ns: np.ndarray  # int64: open loop, the schedule; closed loop, when it was issued
    sent_ns: np.ndarray  # int64: when it was sent (its first request)
    completed_ns: np.ndarray  # int64: when its last answer arrived
    ok: np.ndarray  # bool: every request of the query answered without error
    samples_per_query: int
    duration_ns: int  # first scheduled send to last answer
    generator_overhead: float  # busy_ns / active_ns
    late_sends: int  # sends more than 100 us after their scheduled time
    errors: dict[str, int]
    busy_ns: int = 0  # the generator thread's own work (sending)
    active_ns: int = 0  # from the first scheduled time to the last send (closed loop: to the end)

    @property
    def latency_ns(self) -> np.ndarray:
        """completed - scheduled per query (-1 where never answered): waiting to be sent counts."""
        return np.where(self.completed_ns >= 0, self.completed_ns - self.scheduled_ns, -1)

    @property
    def queries(self) -> int:
        return len(self.scheduled_ns)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def offered_rate_qps(self) -> float:
        """The schedule's rate: queries per second between its first and last due time (nan if one)."""
        return _rate(self.scheduled_ns)

    @property
    def sent_rate_qps(self) -> float:
        """The rate the queries actually went out at, over the queries sent (nan if fewer than two)."""
        return _rate(self.sent_ns[self.sent_ns >= 0])


def _rate(times_ns: np.ndarray) -> float:
    if len(times_ns) < 2 or times_ns[-1] <= times_ns[0]:
        return float("nan")
    return (len(times_ns) - 1) * NS_PER_S / float(times_ns[-1] - times_ns[0])


def poisson_schedule(rate_qps: float, count: int, seed: int) -> np.ndarray:
    """`count` Poisson arrival offsets (int64 ns from the run start, ascending, the first 0).

    Exponential gaps from a seeded splitmix64 generator, identical on every machine, rescaled
    so the schedule spans exactly (count - 1) / rate_qps seconds: its offered rate is the
    target, not the target +- 1/sqrt(count).
    """
    return _core.poisson_schedule(float(rate_qps), int(count), int(seed))


class Target(Protocol):
    """What the run functions accept: a target wrapping a native one."""

    sample_count: int

    def native(self) -> Any: ...


class _TargetBase:
    """The native target's owner: `close()` (or leaving `with`) releases it and its connections."""

    kind = ""

    def __init__(self, native: Any, sample_count: int) -> None:
        self._native = native
        self.sample_count = sample_count

    def native(self) -> Any:
        if self._native is None:
            raise Unavailable(f"this {self.kind} load target is closed; create a new one")
        return self._native

    def close(self) -> None:
        self._native = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class InProcessTarget(_TargetBase):
    """Submits from C++ straight to a loaded model version's batcher: no network, no Python per request."""

    kind = "in-process"

    def __init__(self, runtime: Runtime, model: str, samples: Sequence[Sample], *, version: int | None = None) -> None:
        handle = runtime.model(model, version)
        where = f"model '{model}'"
        ordered = [_in_process_sample(handle, sample, index, where) for index, sample in enumerate(_checked(samples))]
        super().__init__(_core.BatcherLoadTarget(handle.batcher, ordered), len(ordered))
        self.model = model
        self.version = handle.version


def _in_process_sample(handle: Any, sample: Sample, index: int, where: str) -> tuple[np.ndarray, ...]:
    """The sample as a tuple in the model's input order, private copies of the right dtypes and ranks."""
    if not isinstance(sample, Mapping):
        raise InvalidInput(f"sample {index}: expected a mapping of input name to array, got {type(sample).__name__}")
    arrays = handle.order_inputs(sample)
    batching = handle.config.max_batch_size > 0
    out = []
    for tensor, array in zip(handle.config.inputs, arrays):
        expected = tensor.numpy_dtype
        if array.dtype != expected:
            raise InvalidInput(
                f"{where}, sample {index}, input '{tensor.name}': expected dtype {expected} ({tensor.datatype}), "
                f"got {array.dtype}; convert it with .astype(np.{expected})"
            )
        rank = len(tensor.dims) + (1 if batching else 0)
        if array.ndim != rank or (batching and array.shape[0] < 1):
            layout = "[batch, " + ", ".join(map(str, tensor.dims)) + "]" if batching else str(list(tensor.dims))
            raise InvalidInput(
                f"{where}, sample {index}, input '{tensor.name}': expected shape {layout}, got {list(array.shape)}"
            )
        out.append(np.array(array, order="C", copy=True))
    return tuple(out)


def _checked(samples: Sequence[Sample]) -> Sequence[Sample]:
    if isinstance(samples, Mapping) or not isinstance(samples, Sequence) or len(samples) == 0:
        raise InvalidInput("samples: expected a non-empty list of {input name: array} dicts, one per request")
    return samples


def wire_tensors(samples: Sequence[Sample]) -> list[list[tuple[str, str, list[int], bytes]]]:
    """Per sample: (name, v2 datatype, shape, little-endian bytes) per input, as they travel."""
    wire = []
    for index, sample in enumerate(_checked(samples)):
        if not isinstance(sample, Mapping) or not sample:
            raise InvalidInput(f"sample {index}: expected a non-empty mapping of input name to array")
        tensors = []
        for name, value in sample.items():
            array = np.asarray(value)
            where = f"sample {index}, input '{name}'"
            if array.ndim == 0:
                raise InvalidInput(f"{where}: expected an array with a batch dimension, got a scalar")
            try:
                datatype = datatype_of(array.dtype)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc}") from None
            if datatype == "BYTES":
                payload = serialize_bytes(array, where=where)
            else:
                payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensors.append((str(name), datatype, [int(d) for d in array.shape], payload))
        wire.append(tensors)
    return wire


def split_url(url: str, default_port: int, what: str) -> tuple[str, str, str]:
    """(host, port, path prefix) of `url` ("http://host:port[/prefix]" or "host:port")."""
    text = url if "://" in url else f"http://{url}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http" and not (what == "gRPC" and parts.scheme == "grpc"):
        raise InvalidInput(
            f"{what} target URL {url!r}: scheme '{parts.scheme}' is not supported; use http://host:port"
            + (" (the native client speaks plain HTTP/1.1, no TLS)" if parts.scheme == "https" else "")
        )
    try:
        port = parts.port or default_port
    except ValueError:
        raise InvalidInput(f"{what} target URL {url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise InvalidInput(f"{what} target URL {url!r}: no host name; expected http://host:port")
    return parts.hostname, str(port), parts.path.rstrip("/")


def model_path(model: str, version: str | None) -> str:
    """The KServe v2 path of a model (and version), quoted: "/v2/models/{m}[/versions/{v}]"."""
    path = "/v2/models/" + urllib.parse.quote(model, safe="")
    if version is not None:
        path += "/versions/" + urllib.parse.quote(str(version), safe="")
    return path


def http_infer_request(host: str, port: str, path: str, tensors: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """One whole KServe v2 infer request (request line to body) with binary inputs and outputs."""
    header = {
        "inputs": [
            {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(payload)}}
            for name, datatype, shape, payload in tensors
        ],
        "parameters": {"binary_data_output": True},
    }
    json_bytes = json.dumps(header, separators=(",", ":")).encode()
    body = json_bytes + b"".join(payload for *_, payload in tensors)
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(json_bytes)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HttpTarget(_TargetBase):
    """A KServe v2 server over HTTP/1.1, from the native keep-alive client (`connections` sockets)."""

    kind = "http"

    def __init__(
        self, url: str, model: str, samples: Sequence[Sample], *, version: str | None = None, connections: int = 16,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:  # fmt: skip
        if connections < 1:
            raise InvalidInput(f"connections must be >= 1, got {connections}")
        host, port, prefix = split_url(url, 80, "HTTP")
        path = prefix + model_path(model, version) + "/infer"
        requests = [http_infer_request(host, port, path, tensors) for tensors in wire_tensors(samples)]
        try:
            native = _core.HttpLoadTarget(host, port, requests, connections, max(1, round(connect_timeout_s * 1000)))
        except Unavailable as exc:
            raise Unavailable(f"HTTP target {url}: {exc}") from None
        super().__init__(native, len(requests))
        self.url = url
        self.model = model

    def reconnects(self) -> int:
        """Connections reopened after the first ones (a server closing them shows here)."""
        return self.native().reconnects()


class GrpcTarget(_TargetBase):
    """A KServe v2 server over gRPC: grpcio futures called from the native schedule (see the module docstring)."""

    kind = "grpc"

    def __init__(
        self, url: str, model: str, samples: Sequence[Sample], *, version: str | None = None, channels: int = 4,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:  # fmt: skip
        import grpc

        from conveyor.protocol.grpc import inference_pb2, inference_pb2_grpc

        if channels < 1:
            raise InvalidInput(f"channels must be >= 1, got {channels}")
        host, port, _ = split_url(url, 8001, "gRPC")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        requests = [grpc_infer_request(inference_pb2, model, version, t) for t in wire_tensors(samples)]
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        # Distinct channel arguments keep grpcio from sharing one subchannel (one TCP connection).
        self._channels = [
            grpc.insecure_channel(address, options=[*options, ("conveyor.channel_index", i)]) for i in range(channels)
        ]  # fmt: skip
        try:
            for channel in self._channels:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._close_channels()
            raise Unavailable(
                f"gRPC target {url}: cannot connect to {address} within {connect_timeout_s} s: is the server "
                "running, and is this its gRPC port (conveyor serve: 8001 by default)?"
            ) from None
        calls = [inference_pb2_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in self._channels]
        super().__init__(_core.CallbackLoadTarget(_grpc_sender(calls, requests), len(requests), 0), len(requests))
        self.url = url
        self.model = model

    def _close_channels(self) -> None:
        for channel in self._channels:
            channel.close()

    def close(self) -> None:
        if self._native is not None:
            self._close_channels()
        super().close()


def _grpc_sender(calls: list[Any], requests: list[Any]) -> Callable[[int, Any], None]:
    """send(sample, ticket) over the channels in turn. A closure, not a method: the native
    target holds it, and a reference back to the GrpcTarget would be a cycle no GC sees."""
    in_flight: set[Any] = set()  # grpcio cancels a call whose future is garbage-collected
    turn = itertools.cycle(calls)

    def send(sample: int, ticket: Any) -> None:
        # Called by the generator with the GIL taken, once per request.
        future = next(turn).future(requests[sample])
        in_flight.add(future)
        future.add_done_callback(_grpc_done(ticket, in_flight))

    return send


def grpc_infer_request(pb2: Any, model: str, version: str | None, tensors: list) -> Any:
    """A ModelInferRequest of `pb2` (the v2 protocol's messages) carrying `wire_tensors` rows as raw contents."""
    request = pb2.ModelInferRequest(model_name=model, model_version="" if version is None else str(version))
    for name, datatype, shape, payload in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(payload)
    return request


def _grpc_done(ticket: Any, in_flight: set[Any]) -> Callable[[Any], None]:
    def done(future: Any) -> None:
        in_flight.discard(future)
        if future.cancelled():
            ticket.complete(False, "gRPC call cancelled")
            return
        error = future.exception()
        if error is None:
            ticket.complete(True)
        else:
            code = getattr(error, "code", lambda: None)()
            details = getattr(error, "details", lambda: str(error))()
            ticket.complete(False, f"gRPC {getattr(code, 'name', 'error')}: {details}")

    return done


def _native(target: Target) -> Any:
    native = getattr(target, "native", None)
    if not callable(native):
        raise InvalidInput(
            f"target: expected an InProcessTarget, HttpTarget or GrpcTarget, got {type(target).__name__}"
        )
    return native()


def _timeout_ns(timeout_s: float) -> int:
    if not timeout_s > 0:
        raise InvalidInput(f"timeout_s must be > 0, got {timeout_s}")
    return max(1, round(timeout_s * NS_PER_S))


def run_open_loop(
    target: Target, schedule_ns: np.ndarray, *, sample_indices: np.ndarray | None = None,
    max_outstanding: int = 65536, timeout_s: float = DEFAULT_TIMEOUT_S, spin_us: float = 10.0,
) -> LoadRun:  # fmt: skip
    """Send query i at schedule_ns[i] (sample sample_indices[i], or i % sample_count).

    A schedule of zeros is the offline shape: everything due at once, sent as fast as the
    target takes it. At most `max_outstanding` requests (and the target's own bound) are in
    flight; a query waits for a free slot up to `timeout_s`, and answers are waited for up
    to `timeout_s` after the last send. `spin_us`: how long before each due time the
    generator stops sleeping and spins. More means fewer late sends and more CPU taken from
    the target: on 2 vCPUs, 10 us sends on time at the median and within about 20 us at
    p99; 50 us halves that p99 for about twice the client CPU per request at 10k/s.
    """
    if max_outstanding < 1:
        raise InvalidInput(f"max_outstanding must be >= 1, got {max_outstanding}")
    if not spin_us >= 0:
        raise InvalidInput(f"spin_us must be >= 0, got {spin_us}")
    schedule = np.ascontiguousarray(schedule_ns, dtype=np.int64)
    indices = None if sample_indices is None else np.ascontiguousarray(sample_indices, dtype=np.int64)
    result = _core.run_open_loop(
        _native(target), schedule, indices, max_outstanding, _timeout_ns(timeout_s), round(spin_us * 1000)
    )
    return LoadRun(**result)


def run_closed_loop(
    target: Target, *, queries: int, samples_per_query: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S
) -> LoadRun:
    """`queries` queries one after another, each `samples_per_query` requests sent together.

    Single-stream is samples_per_query=1; multi-stream 8: a query completes when all of its
    requests are answered, and the next is issued then. A query unanswered after `timeout_s`
    ends the run (it and the rest are recorded as not answered).
    """
    if queries < 0:
        raise InvalidInput(f"queries must be >= 0, got {queries}")
    if samples_per_query < 1:
        raise InvalidInput(f"samples_per_query must be >= 1, got {samples_per_query}")
    result = _core.run_closed_loop(_native(target), queries, samples_per_query, _timeout_ns(timeout_s))
    return LoadRun(**result)
