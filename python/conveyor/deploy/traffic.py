"""The per-request side of rollouts, in front of the Runtime: route, fall back, copy, pair.

    traffic = RolloutTraffic(runtime)
    traffic.attach(controller)                   # a rollout on controller.model starts routing
    result = await traffic.infer("m", inputs, route_key=key, request_id="r-1")
    result.outputs, result.version, result.rollout_name
    traffic.counters()                           # for /metrics
    traffic.detach("m")

What a request gets:

- No rollout on the model: one dict lookup, then the runtime (`rollout_name` None). A
  server that resolves the handle itself asks `get(model)` (the same dict lookup) and
  keeps its own path when it is None: then a rollout-free model costs nothing more.
- A request naming a version bypasses routing and is served as asked (`rollout_name` None).
- A rollout that has ended (promoted, rolled back, aborted) no longer routes: a request
  naming no version goes to the outcome's version, `controller.serving_version` (the
  promoted challenger, or the champion), even where the version policy alone would pick
  another; its answer carries no rollout name (`rollout_name` None) and it is counted as
  routed to the version that answered. When that version is no longer loaded, the version
  policy's pick answers. This lasts until the rollout is detached (a new rollout, the model unloaded).
- Otherwise `controller.router` (re-read per request: the controller swaps in a new
  Router when weights change) picks the version. A routed version that is not loaded
  falls back to the champion, and the controller hears of it through
  `on_version_unavailable(version)` (or `(version, now, reason)`) when it has that method.
- When the decision says copy, the same inputs go to the shadow version from a task of
  their own. At most `shadow_queue_size` copies are in flight per rollout; past that a
  copy is dropped and counted. The answer never waits for its copy.

Shadow inputs are not copied: the batcher holds a reference to each request's arrays
(`hold_inputs` in the batcher binding) and copies them once, into the challenger's
batch. The server decodes fresh arrays per request, so nothing writes to them after the
call. An in-process caller that reuses its input buffers after `infer` returns passes
`copy_shadow_inputs=True` (one copy per shadowed request).

Pairs. Each copied request opens a pending pair keyed by its request id (with a serial
number, so a client reusing an id never crosses pairs). When both answers are in, the
pair feeds `controller.statistics.paired`: each side's latency (the time its own
`infer_async` took, measured on the event loop) and its outputs (see `OutputComparison`).
Pairs are recorded in groups (`PAIR_RECORD_DELAY_S` after the first, or at
`PAIR_RECORD_BATCH` pairs; `drain_shadows` records at once): numpy's fixed cost per call
is paid per group, not per request. Pending pairs are bounded (twice the shadow slots; the oldest is
evicted) and expire after `pair_ttl_s`; both count as "expired".

Errors of a copy. A copy the challenger's batcher failed, rejected or let expire is
already in its `Batcher.stats()`, which the controller reads for the challenger's error
rate. A copy that failed before reaching that batcher (the version is not loaded, the
inputs do not fit its config) is added to `statistics.challenger` as one answered request
and one error. Every failed copy is counted under "failed".

Threading: `infer` runs on event loops; counters are plain integers updated without a
lock (exact with one loop, as the servers run; the shadow admission alone is locked).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from conveyor.rollout_config import RolloutConfig, StickyConfig
from conveyor.errors import ConfigError, ConveyorError, ModelNotFound
from conveyor.runtime import new_request_id

log = logging.getLogger(__name__)

__all__ = ["OutputComparison", "RolloutTraffic", "RoutedResult", "route_key_from"]

DEFAULT_SHADOW_QUEUE_SIZE = RolloutConfig.model_fields["shadow_queue_size"].default
DEFAULT_PAIR_TTL_S = 60.0
# Recording costs tens of microseconds of numpy per call whatever its size, so completed
# pairs are recorded together: this long after the first of them, or at this many.
PAIR_RECORD_DELAY_S = 0.05
PAIR_RECORD_BATCH = 1024
_INTEGER_DATATYPES = frozenset({"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


class RoutedResult(NamedTuple):
    """One answered request: its outputs, the version that answered, the rollout that routed it."""

    outputs: dict[str, np.ndarray]
    version: int
    rollout_name: str | None  # None: no rollout routed it (none active, or a named version)


# Per request, `_new_result(RoutedResult, (...))` skips the generated __new__'s argument
# parsing: a third of the time the traffic layer adds when no rollout is active.
_new_result = tuple.__new__


def route_key_from(
    sticky: StickyConfig,
    headers: Mapping[str, str] | Callable[[str], str | None] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> str | None:
    """A request's routing key under a rollout's sticky settings, or None (route at random).

    The request parameter `sticky.parameter` wins over the header (HTTP) or metadata
    (gRPC) `sticky.header`: it is the most specific. Header names match in any case.
    Numbers are keyed by their decimal text; an empty value is no key. `headers` is a
    mapping, or a function giving one header's value by its lowercase name (so that a
    front end looks headers up only when the key is read from one).
    """
    if not sticky.enabled:
        return None
    if parameters:
        value = parameters.get(sticky.parameter)
        if value is not None and not isinstance(value, bool) and value != "":
            if not isinstance(value, (str, int)):
                raise ConfigError(
                    f"request parameter '{sticky.parameter}': expected a routing key (a string or an "
                    f"integer), got {type(value).__name__}"
                )
            return str(value)
    if callable(headers):
        return headers(sticky.header) or None
    if headers:
        value = headers.get(sticky.header)
        if value is None:
            value = next((v for k, v in headers.items() if k.lower() == sticky.header), None)
        if value:
            return value
    return None


@dataclass(frozen=True)
class OutputComparison:
    """Which output of two versions is compared on a shadow pair, and how.

    `kind` "classes": the top-1 class per row is compared (agreement and flips); an
    integer output gives it directly (its first value per row: argmax's index, or the
    best of a top-k), scores or probabilities by their argmax over the last axis, and a
    `classification` postprocess output ("score:index:label" text) by the index of its
    first entry. `kind` "scores": every value is compared (differences).

    `for_config` picks, unless told the output: the model's first output (a BYTES output
    is skipped unless a classification step made it; a softmax_topk's scores give way to
    its indices). It is a classifier when an integer, a softmax or classification step's
    output, a `[monitor] classifier_outputs` entry, or a classification `[feedback]` output.
    """

    output: str
    kind: str  # "classes" | "scores"
    top1: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False)

    @classmethod
    def for_config(cls, config: Any, output: str | None = None) -> OutputComparison | None:
        """The comparison for a version's ModelConfig (None: no output can be compared)."""
        tensors = {t.name: t for t in config.outputs}
        steps = {name: step for step in config.postprocess for name in step.outputs}
        if output is not None and output not in tensors:
            raise ConfigError(
                f"model '{config.name}': compared output '{output}' is not one of its outputs {sorted(tensors)}"
            )
        if output is None:
            output = next((t.name for t in config.outputs if _comparable(t, steps)), None)
            if output is None:
                return None
            step = steps.get(output)
            if step is not None and step.kind == "softmax_topk":
                output = step.outputs[1]  # the indices, best first
        tensor, step = tensors[output], steps.get(output)
        if step is not None and step.kind == "classification":
            return cls(output, "classes", _top1_of_classification_text)
        if tensor.datatype in _INTEGER_DATATYPES:
            return cls(output, "classes", _top1_of_indices)
        classifiers = {c.output for c in config.monitor.classifier_outputs} if config.monitor else set()
        if config.feedback is not None and config.feedback.kind == "classification":
            classifiers.add(config.feedback.output)
        if output in classifiers or (step is not None and step.kind == "softmax"):
            return cls(output, "classes", _top1_of_scores)
        if tensor.datatype == "BYTES":
            raise ConfigError(
                f"model '{config.name}': output '{output}' is BYTES; a shadow compares numbers or "
                "classes: name a numeric output to compare"
            )
        return cls(output, "scores")

    def values(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """What is compared for one answer: top-1 classes, or the values flattened."""
        array = outputs[self.output]
        return self.top1(array) if self.top1 is not None else np.asarray(array, np.float64).ravel()


def _comparable(tensor: Any, steps: Mapping[str, Any]) -> bool:
    step = steps.get(tensor.name)
    return tensor.datatype != "BYTES" or (step is not None and step.kind == "classification")


def _top1_of_indices(array: np.ndarray) -> np.ndarray:
    return (array[..., 0] if array.ndim > 1 else array).astype(np.int64).ravel()


def _top1_of_scores(array: np.ndarray) -> np.ndarray:
    return np.argmax(array, axis=-1).ravel()


def _top1_of_classification_text(array: np.ndarray) -> np.ndarray:
    firsts = array[..., 0] if array.ndim > 1 else array
    return np.array([int(_text(entry).split(":", 2)[1]) for entry in firsts.ravel()], np.int64)


def _text(entry: Any) -> str:
    return entry.decode() if isinstance(entry, bytes) else str(entry)


class _Pair:
    """Both halves of one shadowed request as they come in: (values, seconds) per side."""

    __slots__ = ("deadline", "champion", "challenger")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.champion: tuple[np.ndarray | None, float] | None = None
        self.challenger: tuple[np.ndarray | None, float] | None = None


def _unavailable_notifier(controller: Any) -> Callable[[int], Any] | None:
    """`controller.on_version_unavailable` as a one-argument call, or None when it has none.

    It takes `(version)`, or `(version, now, reason)` with `now` in wall-clock seconds (as
    the rollout controller records its events).
    """
    method = getattr(controller, "on_version_unavailable", None)
    if method is None:
        return None
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the one-argument form
        return method
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3:
        return lambda version: method(version, time.time(), "not loaded")
    return method


class _Rollout:
    """One attached rollout: its controller, counters, shadow slots and pending pairs."""

    def __init__(self, controller: Any, shadow_queue_size: int, comparison: OutputComparison | None) -> None:
        self.controller = controller
        self.name: str = controller.name
        self.shadow_queue_size = shadow_queue_size
        # A pending pair waits for its copy (at most shadow_queue_size in flight) or for its
        # answer: twice the slots leaves room for both before the oldest is evicted.
        self.max_pending_pairs = 2 * shadow_queue_size
        self.comparison = comparison
        self.notify_unavailable = _unavailable_notifier(controller)
        self.routed: defaultdict[int, int] = defaultdict(int)  # version -> requests the router (or serving_version) sent it
        self.named: defaultdict[int, int] = defaultdict(int)  # version -> requests naming it
        self.fallbacks = 0  # routed to a version that was not loaded: answered by the champion
        self.shadow = {"sent": 0, "dropped": 0, "failed": 0, "paired": 0, "expired": 0}
        self.shadow_in_flight = 0
        self.admission = threading.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.pending: dict[tuple[str, int], _Pair] = {}
        # Completed pairs waiting for the once-per-loop-turn record: (champion, challenger) halves.
        self.completed: list[tuple[tuple[np.ndarray | None, float], tuple[np.ndarray | None, float]]] = []


class RolloutTraffic:
    """Routes requests of models under a rollout and feeds their shadow pairs to the judge.

    `runtime`: the Runtime serving the versions. `pair_ttl_s`: how long a pending shadow
    pair waits for its other half. `clock`: monotonic seconds (tests pass a fake one).
    `statistics_lock`: a lock held while shadow results reach a controller's statistics
    (default none: the owner ticks on the requests' event loop, as the server does).
    """

    def __init__(
        self, runtime: Any, *, pair_ttl_s: float = DEFAULT_PAIR_TTL_S, copy_shadow_inputs: bool = False,
        clock: Callable[[], float] = time.monotonic, statistics_lock: Any = None,
    ) -> None:  # fmt: skip
        if not pair_ttl_s > 0:
            raise ConfigError(f"pair_ttl_s: expected seconds > 0 for a shadow pair to wait, got {pair_ttl_s!r}")
        self.runtime = runtime
        self.pair_ttl_s = float(pair_ttl_s)
        self.copy_shadow_inputs = copy_shadow_inputs
        self.clock = clock
        # Held while shadow results are added to a controller's statistics: an owner that
        # ticks from another thread than the requests' loop passes the lock its ticks hold.
        self.statistics_lock = statistics_lock if statistics_lock is not None else contextlib.nullcontext()
        self._rollouts: dict[str, _Rollout] = {}
        self._serials = itertools.count()

    # ---- the registry ---------------------------------------------------------------------

    def attach(
        self, controller: Any, *, shadow_queue_size: int | None = None, compared_output: str | None = None
    ) -> None:
        """Starts routing `controller.model`'s requests by `controller`.

        `shadow_queue_size`: shadow copies in flight at once (default: the
        `shadow_queue_size` of `controller.config` when it is a RolloutConfig, else of the
        champion config's `[rollout]`, else 1024). `compared_output`: the output
        shadow pairs compare (default: see `OutputComparison.for_config`). A model takes one
        rollout at a time: detach the old one first.
        """
        model = controller.model
        if model in self._rollouts:
            raise ConfigError(
                f"model '{model}' already has rollout '{self._rollouts[model].name}' attached: "
                "detach it before attaching another"
            )
        champion_config = self.runtime.model(model, controller.versions.champion).config
        if shadow_queue_size is None:
            rollout = getattr(controller, "config", None)
            if not isinstance(rollout, RolloutConfig):
                rollout = champion_config.rollout
            shadow_queue_size = rollout.shadow_queue_size if rollout is not None else DEFAULT_SHADOW_QUEUE_SIZE
        if isinstance(shadow_queue_size, bool) or not isinstance(shadow_queue_size, int) or shadow_queue_size < 1:
            raise ConfigError(f"shadow_queue_size: expected an integer >= 1, got {shadow_queue_size!r}")
        comparison = OutputComparison.for_config(champion_config, compared_output)
        self._rollouts[model] = _Rollout(controller, shadow_queue_size, comparison)

    def detach(self, model: str) -> None:
        """Stops routing `model`: its requests go straight to the runtime again.

        Shadow copies in flight finish; their pairs still feed the detached controller.
        """
        if self._rollouts.pop(model, None) is None:
            raise ModelNotFound(f"model '{model}' has no rollout attached (attached: {sorted(self._rollouts) or 'none'})")

    def get(self, model: str) -> Any:
        """The controller attached to `model`, or None."""
        entry = self._rollouts.get(model)
        return None if entry is None else entry.controller

    # ---- requests -------------------------------------------------------------------------

    async def infer(
        self, model: str, inputs: Mapping[str, Any], *, version: int | None = None, route_key: str | None = None,
        request_id: str | None, priority: int | None = None, timeout_us: int | None = None,
    ) -> RoutedResult:  # fmt: skip
        """Serves one request through the model's rollout, if it has one (see the module doc).

        `version`: served as named, bypassing routing. `route_key`: the sticky key
        (`route_key_from`). `request_id`: pairs a shadow copy with its answer and reaches
        the versions' capture and feedback; None gets a generated id when a copy is made.
        Raises what `Runtime.infer_async` raises; ModelNotFound when neither the routed
        version nor the champion is loaded.
        """
        runtime = self.runtime
        entry = self._rollouts.get(model)
        if entry is None:
            handle = runtime.model(model, version)
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return _new_result(RoutedResult, (outputs, handle.version, None))
        if version is not None:
            handle = runtime.model(model, version)
            entry.named[version] += 1
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return _new_result(RoutedResult, (outputs, version, None))
        controller = entry.controller
        if not controller.active:
            return await self._infer_ended(entry, model, inputs, request_id, priority, timeout_us)
        target, shadow_version = controller.router.route(route_key)
        try:
            handle = runtime.model(model, target)
        except ModelNotFound:
            handle = self._fall_back(entry, model, target)
        entry.routed[handle.version] += 1
        if shadow_version is None or shadow_version == handle.version:
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return _new_result(RoutedResult, (outputs, handle.version, entry.name))
        return await self._infer_shadowed(entry, handle, shadow_version, inputs, request_id, priority, timeout_us)

    async def _infer_ended(
        self, entry: _Rollout, model: str, inputs: Mapping[str, Any], request_id: str | None,
        priority: int | None, timeout_us: int | None,
    ) -> RoutedResult:  # fmt: skip
        """A request naming no version of a model whose rollout has ended: the outcome's version answers."""
        runtime = self.runtime
        try:
            handle = runtime.model(model, entry.controller.serving_version)
        except ModelNotFound:
            handle = runtime.model(model)
        entry.routed[handle.version] += 1
        outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
        return _new_result(RoutedResult, (outputs, handle.version, None))

    def _fall_back(self, entry: _Rollout, model: str, missing: int) -> Any:
        champion = entry.controller.versions.champion
        if missing == champion:
            raise ModelNotFound(
                f"rollout '{entry.name}': champion version {missing} of model '{model}' is not loaded "
                "and there is no version to fall back to: load it again or abort the rollout"
            )
        handle = self.runtime.model(model, champion)
        entry.fallbacks += 1
        self._tell_unavailable(entry, missing)
        return handle

    def _tell_unavailable(self, entry: _Rollout, version: int) -> None:
        notify = entry.notify_unavailable
        if notify is None:
            return
        try:
            notify(version)
        except Exception:  # the controller's trouble must not fail the request
            log.exception("rollout %s: telling the controller version %d is not loaded failed", entry.name, version)

    async def _infer_shadowed(
        self, entry: _Rollout, handle: Any, shadow_version: int, inputs: Mapping[str, Any],
        request_id: str | None, priority: int | None, timeout_us: int | None,
    ) -> RoutedResult:  # fmt: skip
        runtime = self.runtime
        key = self._admit_shadow(entry, shadow_version, inputs, request_id, priority, timeout_us)
        started = time.perf_counter()
        try:
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
        except BaseException:
            if key is not None:
                entry.pending.pop(key, None)
            raise
        if key is not None:
            self._add_half(entry, key, "champion", outputs, time.perf_counter() - started)
        return RoutedResult(outputs, handle.version, entry.name)

    def _admit_shadow(
        self, entry: _Rollout, shadow_version: int, inputs: Mapping[str, Any],
        request_id: str | None, priority: int | None, timeout_us: int | None,
    ) -> tuple[str, int] | None:  # fmt: skip
        """Takes a shadow slot and starts the copy's task; None (counted) when the slots are full."""
        with entry.admission:
            if entry.shadow_in_flight >= entry.shadow_queue_size:
                entry.shadow["dropped"] += 1
                return None
            entry.shadow_in_flight += 1
            entry.shadow["sent"] += 1
        if request_id is None:
            request_id = new_request_id()
        key = (request_id, next(self._serials))
        self._open_pair(entry, key)
        if self.copy_shadow_inputs:
            inputs = {name: np.array(value, copy=True) for name, value in inputs.items()}
        coroutine = self._shadow(entry, key, shadow_version, inputs, priority, timeout_us)
        task = asyncio.get_running_loop().create_task(coroutine)
        entry.tasks.add(task)
        task.add_done_callback(entry.tasks.discard)
        return key

    def _open_pair(self, entry: _Rollout, key: tuple[str, int]) -> None:
        pending, now = entry.pending, self.clock()
        while pending:
            oldest = next(iter(pending))
            if pending[oldest].deadline > now and len(pending) < entry.max_pending_pairs:
                break
            del pending[oldest]
            entry.shadow["expired"] += 1
        pending[key] = _Pair(now + self.pair_ttl_s)

    async def _shadow(
        self, entry: _Rollout, key: tuple[str, int], version: int, inputs: Mapping[str, Any],
        priority: int | None, timeout_us: int | None,
    ) -> None:  # fmt: skip
        runtime, controller = self.runtime, entry.controller
        try:
            try:
                handle = runtime.model(controller.model, version)
                arrays = dict(zip(handle.input_names, handle.order_inputs(inputs)))
            except ConveyorError as exc:  # never reached the challenger's batcher: counted here
                self._shadow_failed(entry, key, version, exc)
                with self.statistics_lock:
                    controller.statistics.challenger.add_counts(requests=1, errors=1)
                if isinstance(exc, ModelNotFound):
                    self._tell_unavailable(entry, version)
                return
            started = time.perf_counter()
            try:
                outputs = await runtime.infer_async(handle, arrays, priority=priority, timeout_us=timeout_us, request_id=key[0])
            except Exception as exc:  # in the challenger's Batcher.stats() already
                self._shadow_failed(entry, key, version, exc)
                return
            self._add_half(entry, key, "challenger", outputs, time.perf_counter() - started)
        finally:
            with entry.admission:
                entry.shadow_in_flight -= 1

    def _shadow_failed(self, entry: _Rollout, key: tuple[str, int], version: int, exc: Exception) -> None:
        entry.shadow["failed"] += 1
        entry.pending.pop(key, None)
        log.debug("rollout %s: shadow copy of request %s to version %d failed: %s", entry.name, key[0], version, exc)

    def _add_half(self, entry: _Rollout, key: tuple[str, int], side: str, outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        pair = entry.pending.get(key)
        if pair is None:  # expired, evicted, or the other side failed
            return
        values = None
        if entry.comparison is not None:
            try:
                values = entry.comparison.values(outputs)
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                log.warning("rollout %s: %s output of request %s cannot be compared: %s", entry.name, side, key[0], exc)
        setattr(pair, side, (values, seconds))
        if pair.champion is None or pair.challenger is None:
            return
        del entry.pending[key]
        entry.shadow["paired"] += 1
        completed = entry.completed
        if not completed:
            asyncio.get_running_loop().call_later(PAIR_RECORD_DELAY_S, self._record_pairs, entry)
        completed.append((pair.champion, pair.challenger))
        if len(completed) >= PAIR_RECORD_BATCH:
            self._record_pairs(entry)

    def _record_pairs(self, entry: _Rollout) -> None:
        """Feeds the pairs completed since the last record to the judge's statistics."""
        completed, entry.completed = entry.completed, []
        if not completed:
            return
        with self.statistics_lock:
            self._record_completed(entry, completed)

    def _record_completed(self, entry: _Rollout, completed: list) -> None:
        paired = entry.controller.statistics.paired
        paired.record_latencies(
            np.array([champion[1] for champion, _ in completed]), np.array([challenger[1] for _, challenger in completed])
        )
        comparison = entry.comparison
        if comparison is None:
            return
        champion_values, challenger_values = [], []
        for (champion, _), (challenger, _) in completed:
            if champion is not None and challenger is not None and champion.shape == challenger.shape:
                champion_values.append(champion)
                challenger_values.append(challenger)
        if not champion_values:
            return
        record = paired.record_classes if comparison.kind == "classes" else paired.record_scores
        record(np.concatenate(champion_values), np.concatenate(challenger_values))

    async def drain_shadows(self, model: str | None = None) -> None:
        """Waits for the shadow copies this event loop started (for `model`, or all) and
        records their pairs; for tests and an orderly shutdown."""
        loop = asyncio.get_running_loop()
        entries = list(self._rollouts.values()) if model is None else [self._rollouts[model]]
        for entry in entries:
            tasks = [task for task in entry.tasks if task.get_loop() is loop]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._record_pairs(entry)

    # ---- metrics --------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, Any]]:
        """Per model with a rollout: its name, requests per version and arm, shadow counts.

        `requests` rows: {"version", "arm" ("champion" | "challenger" | "other"),
        "routing" ("routed": by the router or serving_version, "named": the request named
        the version), "count"}; `fallbacks`: routed to a version not loaded, answered by
        the champion (counted under the champion's "routed" too); `shadow`: sent,
        dropped (slots full), failed, paired, expired, in_flight.
        """
        out = {}
        for model, entry in self._rollouts.items():
            versions = entry.controller.versions
            rows = []
            for routing, counts in (("routed", entry.routed), ("named", entry.named)):
                for version, count in sorted(counts.items()):
                    arm = "champion" if version == versions.champion else "challenger" if version in versions.challengers else "other"
                    rows.append({"version": version, "arm": arm, "routing": routing, "count": count})
            shadow = dict(entry.shadow, in_flight=entry.shadow_in_flight)
            out[model] = {"rollout": entry.name, "requests": rows, "fallbacks": entry.fallbacks, "shadow": shadow}
        return out
