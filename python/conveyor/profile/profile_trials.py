"""One trial of `conveyor profile`: a configuration applied to the model in-process, and its capacity measured.

A trial loads the model with the configuration's knobs into a fresh Runtime (its own memory
pool), drives it with the native generator's Poisson load through find-peak (short probes:
the highest rate whose p99 meets the objective with errors under 0.1%), and records the
capacity, the p99 there, the lowest p99 any probe saw (how far an unmet objective is), and
the memory it took (peak RSS growth while it ran, and the pool's reserved bytes).

Trials run in a worker process (spawned, so no thread state is inherited), one at a time,
under a time limit: a trial that raises, crashes the worker or outlives the limit is
recorded as failed, crashed or timed out, the worker is replaced, and the search goes on.
Calibration (compute time per batch size, for the cost model) runs in the same worker.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from conveyor.errors import ConfigError, ConveyorError
from conveyor.profile.search import (
    Configuration,
    CostModel,
    batch_sizes_up_to,
    configuration_key,
    preferred_sizes,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_SAMPLE_INTERVAL_S = 0.01  # how often the memory sampler reads the resident set


class TrialTimeout(ConveyorError):
    """A trial ran past its time limit; its worker was stopped."""


class TrialCrashed(ConveyorError):
    """The worker process died during a trial (a crash in native code, or killed for memory)."""


class TrialFailed(ConveyorError):
    """A trial raised; the message is the worker's error."""


# ---------------------------------------------------------------- the model and its configurations


@dataclass(frozen=True)
class ProfiledModel:
    """The model being profiled: where it lives, its loaded config, its config.toml as written, its backends."""

    repository: Path
    name: str
    version: int
    version_dir: Path
    config_data: dict[str, Any]  # the loaded config (onnx tensors filled in), TOML-shaped
    file_data: dict[str, Any]  # config.toml as the user wrote it: what the recommendation edits
    backends: tuple[str, ...]  # backends that can run it
    unavailable: dict[str, str]  # backend -> why it cannot

    @property
    def max_batch_size(self) -> int:
        return int(self.config_data.get("max_batch_size", 0))


def describe_model(repository: Path, name: str, version: int | None = None) -> ProfiledModel:
    """Loads a model's description from its repository; ConfigError/ModelNotFound say what is wrong."""
    import tomllib

    from conveyor.config import CONFIG_FILE_NAME
    from conveyor.repository import ModelRepository

    source = ModelRepository(Path(repository)).load_model(name)
    if source.config.graph is not None:
        steps = ", ".join(sorted({step.model for step in source.config.graph.step}))
        raise ConfigError(
            f"model '{name}' is a graph: it has no batching or threads of its own to tune (each step runs in its "
            f"model's batcher); profile its step models instead ({steps}), and measure the graph with conveyor bench"
        )
    chosen = version if version is not None else max(source.versions)
    if chosen not in source.versions:
        raise ConfigError(f"model '{name}' has no version {chosen} to serve in {repository}; versions: "
                          f"{', '.join(map(str, sorted(source.versions)))}")  # fmt: skip
    with (Path(repository) / name / CONFIG_FILE_NAME).open("rb") as file:
        file_data = tomllib.load(file)
    backends, unavailable = _backends(source.config, source.versions[chosen])
    return ProfiledModel(Path(repository), name, chosen, source.versions[chosen], source.config.to_dict(),
                         file_data, backends, unavailable)  # fmt: skip


def _backends(config: Any, version_dir: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which backends can run the model: onnx for a model.onnx, native when its graph plans on our kernels."""
    if config.backend == "trees":
        return ("trees",), {
            "onnx": "the model is a tree ensemble",
            "native": "the model is a tree ensemble",
        }
    if config.backend == "python":
        return ("python",), {
            "onnx": "the model is Python code",
            "native": "the model is Python code",
        }
    model_file = version_dir / "model.onnx"
    try:
        import onnx

        from conveyor.backends.native_plan import plan_graph

        plan_graph(onnx.load(str(model_file)), str(model_file))
    except ConfigError as exc:  # UnsupportedGraph names the node and op the kernels lack
        return ("onnx",), {"native": str(exc)}
    except Exception as exc:  # noqa: BLE001  (an unreadable graph: onnxruntime will say more when it loads)
        return ("onnx",), {"native": f"the graph could not be planned ({exc})"}
    return ("onnx", "native"), {}


def apply_knobs(data: Mapping[str, Any], configuration: Configuration) -> dict[str, Any]:
    """A TOML-shaped config with the configuration's knobs set (the rest as given)."""
    result = {key: (dict(value) if isinstance(value, Mapping) else value) for key, value in data.items()}
    backend = configuration["backend"]
    result["backend"] = backend
    if backend != "native":
        result.pop("fallback", None)
    batches = int(data.get("max_batch_size", 0)) > 0
    result["max_batch_size"] = configuration["max_batch_size"] if batches else 0
    batching = result.setdefault("dynamic_batching", {})
    batching["max_queue_delay_us"] = configuration["max_queue_delay_us"] if batches else 0
    batching["preferred_batch_sizes"] = preferred_sizes(configuration["preferred_batch_sizes"],
                                                        result["max_batch_size"])  # fmt: skip
    group = result.setdefault("instance_group", {})
    group["count"] = configuration["instance_count"]
    group["device"] = configuration["device"]
    group["cpu_pinning"] = configuration.get("pinning", "none")
    if backend == "onnx":
        onnx_options = result.setdefault("onnx", {})
        onnx_options["intra_op_threads"] = configuration["threads"]
        onnx_options["inter_op_threads"] = configuration["inter_op_threads"]
    elif backend == "native":
        result.setdefault("native", {})["threads"] = configuration["threads"]
    return result


def model_config_for(model: ProfiledModel, configuration: Configuration) -> Any:
    """The validated ModelConfig of the model with the configuration's knobs ({}: as configured)."""
    from conveyor.config import parse_model_config

    data = apply_knobs(model.config_data, configuration) if configuration else dict(model.config_data)
    what = configuration_key(configuration) if configuration else "its own configuration"
    return parse_model_config(data, source=f"model '{model.name}' with {what}", name=model.name)


# ---------------------------------------------------------------- what a trial records


@dataclass(frozen=True)
class TrialSettings:
    """How each trial measures: find-peak's probes, and the limits that keep a bad configuration from stalling."""

    slo_p99_ms: float
    probe_duration_s: float = 0.4  # each find-peak probe's minimum duration
    min_queries: int = 200  # each probe's minimum query count
    warmup_s: float = 0.2
    precision: float = 0.05  # find-peak stops when the bracket is within 5%
    max_probes: int = 14
    max_halvings: int = 6  # find-peak goes at most 2^6 below its start rate before calling the objective unmet
    samples: int = 32  # distinct requests generated from the signature
    timeout_s: float = 120.0  # the whole trial (load, probes, unload)


@dataclass
class TrialRecord:
    """One configuration's measurement, as the checkpoint stores it."""

    configuration: Configuration
    status: str  # ok (met at some rate), unmet (met at no rate), failed, crashed, timed out
    capacity_qps: float = 0.0
    p99_ms: float | None = None  # at the capacity
    best_p99_ms: float | None = None  # the lowest p99 of any probe: how close an unmet objective came
    lowest_rate_qps: float | None = None
    memory_mb: float | None = None  # peak resident-set growth while loaded and under load
    pool_reserved_mb: float | None = None
    mean_batch_size: float | None = None
    probes: int = 0
    seconds: float = 0.0
    seed: int = 0
    purpose: str = "search"  # search, or rerun (the winner measured again)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return configuration_key(self.configuration)

    @property
    def score(self) -> float:
        return self.capacity_qps if self.status == "ok" else 0.0

    def document(self) -> dict[str, Any]:
        return {"key": self.key, **asdict(self)}

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> TrialRecord:
        fields = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
        return cls(**fields)


# ---------------------------------------------------------------- inside the worker


class MemorySampler:
    """The peak resident set of this process while it runs, sampled from /proc/self/statm every 10 ms."""

    def __init__(self) -> None:
        self.baseline_bytes = self.peak_bytes = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="profile-memory", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self.peak_bytes = max(self.peak_bytes, _resident_bytes())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _resident_bytes())

    @property
    def growth_mb(self) -> float:
        return max(0, self.peak_bytes - self.baseline_bytes) / MIB


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _prepare_worker() -> None:
    """Quiets the config's thread warning and imports the serving modules before memory is measured."""
    # Thread counts over the cores are searched on purpose: the warning would repeat per trial.
    logging.getLogger("conveyor.config").setLevel(logging.ERROR)
    import scipy.stats  # noqa: F401  (find-peak's statistics)

    import conveyor
    import conveyor.backends
    import conveyor.memory
    import conveyor.profile.loadgen  # noqa: F401


@contextmanager
def _loaded(model: ProfiledModel, configuration: Configuration) -> Iterator[tuple[Any, Any]]:
    """A Runtime (own memory pool) serving the model with the configuration's knobs; closed on exit."""
    from conveyor import Runtime
    from conveyor.memory import MemoryPool

    config = model_config_for(model, configuration)
    pool = MemoryPool("cpu")
    with tempfile.TemporaryDirectory(prefix="conveyor-profile-") as data_dir:
        runtime = Runtime(pool=pool, data_dir=data_dir)
        try:
            runtime.add_model(model.name, config, version=model.version, model_dir=model.version_dir)
            yield runtime, pool
        finally:
            runtime.close()


def _samples(runtime: Any, model: ProfiledModel, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    from conveyor.profile.inputs import ModelSignature, generate_samples

    handle = runtime.model(model.name, model.version)
    return generate_samples(ModelSignature.from_config(handle.config, model.version), count, seed)


def run_trial_in_process(model: ProfiledModel, configuration: Configuration, settings: TrialSettings, seed: int,
                         start_qps: float | None) -> dict[str, Any]:  # fmt: skip
    """One trial in this process: load, find the peak under the objective, unload. Returns the TrialRecord's fields."""
    from conveyor.profile.loadgen import InProcessTarget
    from conveyor.profile.scenarios import LoadgenDriver, ScenarioSettings

    _prepare_worker()
    scenario = ScenarioSettings(name="server", seed=seed, warmup_s=settings.warmup_s,
                                min_duration_s=settings.probe_duration_s, min_queries=settings.min_queries,
                                target_qps=start_qps if start_qps and start_qps > 0 else None,
                                slo_p99_ms=settings.slo_p99_ms, repetitions=1, find_peak=True,
                                peak_precision=settings.precision, max_peak_trials=settings.max_probes)  # fmt: skip
    with MemorySampler() as memory, _loaded(model, configuration) as (runtime, pool):
        samples = _samples(runtime, model, settings.samples, seed)
        driver = LoadgenDriver(InProcessTarget(runtime, model.name, samples, version=model.version), len(samples),
                               timeout_s=max(1.0, min(30.0, settings.timeout_s / 4)))  # fmt: skip
        try:
            peak = bounded_peak(driver, scenario, seed, settings.max_halvings)
        finally:
            driver.close()
        stats = runtime.model_stats(model.name, model.version)
        reserved = pool.stats()["bytes_reserved"]
    return {**peak, "memory_mb": memory.growth_mb, "pool_reserved_mb": reserved / MIB,
            "mean_batch_size": stats["mean_batch_size"]}  # fmt: skip


def bounded_peak(driver: Any, scenario: Any, seed: int, max_halvings: int) -> dict[str, Any]:
    """find-peak's bracket and bisection (scenarios.search_peak), going at most `max_halvings` below the start.

    A configuration that misses the objective far below its predicted rate is not worth
    minutes of ever-slower probes (at 1 query/s a 200-query probe takes 200 s): it is
    recorded as meeting the objective at no rate, with the lowest p99 it reached.
    """
    from conveyor.profile.scenarios import (
        PeakTrials,
        search_peak,
        start_rate,
        warm_up,
        warnings_of,
    )

    start = start_rate(driver, scenario)
    warm_up(driver, scenario, start)
    trials = PeakTrials(driver, scenario, lambda text, done: None)
    passing: dict[float, Any] = {}

    def passes(rate: float) -> bool:
        passed, measurement = trials.run(rate, 0, seed)
        if passed:
            passing[rate] = measurement
        return passed

    search = search_peak(passes, start, precision=scenario.peak_precision, step=2.0,
                         max_trials=scenario.max_peak_trials, floor_ratio=2.0**-max_halvings)  # fmt: skip
    probes = trials.documents
    finite = [p["p99_ms"] for p in probes if p["p99_ms"] is not None and math.isfinite(p["p99_ms"])]
    capacity = search.capacity_qps
    at_capacity = passing.get(capacity) if capacity is not None else None
    return {
        "status": "ok" if capacity else "unmet", "capacity_qps": float(capacity or 0.0),
        "p99_ms": at_capacity.percentile_ms(0.99) if at_capacity is not None else None,
        "best_p99_ms": min(finite) if finite else None,
        "lowest_rate_qps": min((p["rate_qps"] for p in probes), default=None), "probes": len(probes),
        "warnings": warnings_of(at_capacity, capacity, "at capacity") if at_capacity is not None else [],
    }  # fmt: skip


def calibrate_in_process(model: ProfiledModel, keys: Sequence[tuple[str, str, int]], max_batch_size: int,
                         repeats: int = 5) -> list[tuple[str, str, int, int, float]]:  # fmt: skip
    """Compute time per batch: for each (backend, device, threads), the median time of `repeats` b-row requests.

    A request of b rows is one batch of b (the batcher runs it alone, with no queue delay),
    so the time is the batcher's and backend's work for that batch size, pre- and
    post-processing included. Rows: (backend, device, threads, batch size, seconds).
    """
    _prepare_worker()
    sizes = batch_sizes_up_to(max_batch_size)
    rows: list[tuple[str, str, int, int, float]] = []
    for backend, device, threads in keys:
        configuration = {"backend": backend, "device": device, "max_batch_size": max(sizes),
                         "max_queue_delay_us": 0, "preferred_batch_sizes": "none", "instance_count": 1,
                         "threads": threads, "inter_op_threads": 1, "pinning": "none"}  # fmt: skip
        with _loaded(model, configuration) as (runtime, _):
            sample = _samples(runtime, model, 1, 0)[0]
            batches = model.max_batch_size > 0
            for size in sizes:
                request = {name: np.repeat(array, size, axis=0) if batches else array for name, array in sample.items()}
                for _ in range(2):  # warm: first runs allocate and fill caches
                    runtime.infer(model.name, request, version=model.version)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    runtime.infer(model.name, request, version=model.version)
                    times.append(time.perf_counter() - started)
                rows.append((backend, device, threads, size, float(np.median(times))))
    return rows


def cost_model_from(rows: Sequence[Sequence[Any]], slo_p99_ms: float, cpus: int) -> CostModel:
    """The CostModel of calibration rows (as calibrate_in_process returns and the checkpoint stores them)."""
    compute: dict[tuple[str, str, int], dict[int, float]] = {}
    for backend, device, threads, size, seconds in rows:
        compute.setdefault((str(backend), str(device), int(threads)), {})[int(size)] = float(seconds)
    return CostModel(compute, slo_p99_ms / 1000, cpus)


# ---------------------------------------------------------------- the worker process


def _serve(connection: Any) -> None:
    """The worker's loop: run (function, args) requests one at a time, answer ("ok", result) or ("error", text)."""
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        function, args = request
        try:
            answer = ("ok", function(*args))
        except BaseException as exc:  # noqa: BLE001  (everything goes back to the parent, which records it)
            answer = ("error", f"{type(exc).__name__}: {exc}")
        connection.send(answer)


class TrialWorker:
    """A spawned process that runs functions one at a time under a time limit, replaced when it hangs or dies."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._connection: Any = None

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child,), name="conveyor-profile-worker",
                                              daemon=True)  # fmt: skip
        self._process.start()
        child.close()
        self._connection = parent

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
        """`function(*args)` in the worker; TrialTimeout, TrialCrashed or TrialFailed when it does not return."""
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._connection.send((function, args))
            ready = self._connection.poll(timeout_s)
            answer = self._connection.recv() if ready else None
        except (EOFError, OSError, BrokenPipeError):
            code = self._stop()
            raise TrialCrashed(f"the trial's worker process died (exit status {code})") from None
        if answer is None:
            self._stop()
            raise TrialTimeout(f"the trial did not finish within {timeout_s:g} s; it was stopped")
        kind, value = answer
        if kind == "error":
            raise TrialFailed(value)
        return value

    def _stop(self) -> int | None:
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
        return process.exitcode

    def close(self) -> None:
        """Asks the worker to finish, and stops it if it does not."""
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            try:
                self._connection.send(None)
                self._process.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._stop()


class TrialRunner:
    """Runs calibration and trials of one model in a worker process, turning every failure into a record."""

    def __init__(self, model: ProfiledModel, settings: TrialSettings) -> None:
        self.model = model
        self.settings = settings
        self.worker = TrialWorker()

    def calibrate(self, keys: Sequence[tuple[str, str, int]], max_batch_size: int) -> list[list[Any]]:
        """Compute time per batch size for each (backend, device, threads); ConveyorError if it cannot be measured."""
        try:
            rows = self.worker.call(calibrate_in_process, (self.model, list(keys), max_batch_size),
                                    self.settings.timeout_s * max(1, len(keys)))  # fmt: skip
        except (TrialTimeout, TrialCrashed, TrialFailed) as exc:
            raise ConveyorError(f"measuring the compute time per batch size failed: {exc}") from None
        return [list(row) for row in rows]

    def run(
        self,
        configuration: Configuration,
        seed: int,
        start_qps: float | None,
        purpose: str = "search",
    ) -> TrialRecord:
        """One trial; never raises for the configuration's sake (a failure is the record's status and error)."""
        started = time.monotonic()
        record = TrialRecord(dict(configuration), "failed", seed=seed, purpose=purpose)
        try:
            fields = self.worker.call(run_trial_in_process, (self.model, dict(configuration), self.settings, seed,
                                                             start_qps), self.settings.timeout_s)  # fmt: skip
            for name, value in fields.items():
                setattr(record, name, value)
        except TrialTimeout as exc:
            record.status, record.error = "timed out", str(exc)
        except TrialCrashed as exc:
            record.status, record.error = "crashed", str(exc)
        except TrialFailed as exc:
            record.status, record.error = "failed", str(exc)
        record.seconds = time.monotonic() - started
        return record

    def close(self) -> None:
        self.worker.close()
