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
- When the decision says copy, the request is tagged for the shadow and the champion
  answers it as usual: the copy is made in the core, batch by batch (see below). The
  answer never waits for its copy.

Shadow copies (`_core.Mirror`, conveyor/mirror.h). The champion's batcher, once a batch
has run, submits that batch's tagged rows, already gathered into its pooled input
tensors, to the challenger's batcher as one request, and pairs both versions' outputs
row by row when the challenger answers: no task, future or Python call per copied
request, and nothing of it on the event loop. The copy is of the gathered batch, so a
caller may reuse its input buffers as soon as `infer` returns. At most
`shadow_queue_size` copied rows are in flight per rollout; past that, or when the
challenger's queue is full, a copy is dropped and counted.

CPU priority. While it answers copies, the challenger's batcher is in background mode
(`Batcher.set_background`): its instance threads run in the OS's idle scheduling class, so
they take only CPU time the champion and everything else leave, and a copy never delays
an answer; on a saturated machine copies queue up and are dropped, counted. That is the
rollout's `shadow_cpu_priority` ("idle"; "auto", the default, is idle unless a check times
the versions: latency, queue time or paired latency compare fairly only at equal priority;
"normal" never). In background mode a batching challenger also gathers its copies into
batches for up to 1 ms, so that they cost a wake-up and a batch's fixed cost per batch of
its own rather than per champion batch. The challenger leaves background mode, on new
threads at normal priority, as soon as the mirror is unlinked or the challenger answers a
routed request itself (a blue-green switch, a promotion), and when the rollout ends or is
detached. Requests that name the challenger's version while it copies run at its idle
priority, and are gathered, too.

Pairs. Each paired row carries both sides' latencies (the champion's: queued and computed;
the challenger's: the same queue wait, then the copy's own batch, from its start to its
answer: its wait in the challenger's queue is the mirror's doing) and the compared output's
values (see `OutputComparison`). They are recorded into `controller.statistics.paired`
every `PAIR_RECORD_DELAY_S` on the event loop that made the first copy (`drain_shadows`
records at once): numpy's fixed cost is paid per recording, not per request. For a
champion that takes delayed labels, the latest pairs' top values are kept by request id
(`shadow_prediction`), for the label join.

Errors of a copy. A copy the challenger's batcher failed, rejected or let expire is
already in its `Batcher.stats()`, which the controller reads for the challenger's error
rate. A copy that could not be made at all (the version is not loaded, or does not take
the champion's inputs) is added to `statistics.challenger` as one answered request and one
error. Every failed copy is counted under "failed". A challenger that is reloaded is
mirrored anew; one that is unloaded is reported to the controller.

Threading: `infer` runs on event loops; counters are plain integers updated without a
lock (exact with one loop, as the servers run); the mirrors count in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from conveyor import _core
from conveyor.deploy.checks import TIMING_METRICS
from conveyor.errors import ConfigError, ConveyorError, ModelNotFound
from conveyor.rollout_config import RolloutConfig, StickyConfig
from conveyor.runtime import new_request_id, notify_listeners

log = logging.getLogger(__name__)

__all__ = ["NativeRoute", "OutputComparison", "RolloutTraffic", "RoutedResult", "route_key_from"]

DEFAULT_SHADOW_QUEUE_SIZE = RolloutConfig.model_fields["shadow_queue_size"].default
# A recording blocks the event loop: some 0.15 ms of numpy per call whatever its size,
# plus about 0.3 us per pair. Every 50 ms, at 7k copies/s, that is under 1% of the loop's
# time in stalls of about 0.3 ms; every 250 ms the stalls grew to a millisecond and the
# champion's p99 with them, every 20 ms it was no better (bench/shadow_overhead.sh).
PAIR_RECORD_DELAY_S = 0.05
# Paired rows a mirror keeps between two recordings: some 10 s of copies at 6k/s.
DEFAULT_MAX_UNREAD_PAIRS = 65536
# Shadow pairs kept by request id for the delayed-label join.
MAX_REMEMBERED_IDS = 65536
SHADOW_COUNTS = ("sent", "dropped", "failed", "paired", "incomparable", "unrecorded", "in_flight")
_INTEGER_DATATYPES = frozenset({"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


class RoutedResult(NamedTuple):
    """One answered request: its outputs, the version that answered, the rollout that routed
    it, and that version's handle (its config names the outputs' datatypes)."""

    outputs: dict[str, np.ndarray]
    version: int
    rollout_name: str | None  # None: no rollout routed it (none active, or a named version)
    handle: Any = None


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
    `classification` postprocess output ("score:index:label" text) by its index, which
    the batch carries as the INT64 output "<name>:index". `kind` "scores": every value is
    compared (differences). `batch_output` names the output in the batchers' outputs and
    `reading` how the core reads it (`_core.Mirror`'s compare: "first_value", "argmax",
    "values").

    `for_config` picks, unless told the output: the model's first output (a BYTES output
    is skipped unless a classification step made it; a softmax_topk's scores give way to
    its indices). It is a classifier when an integer, a softmax or classification step's
    output, a `[monitor] classifier_outputs` entry, or a classification `[feedback]` output.
    """

    output: str
    kind: str  # "classes" | "scores"
    reading: str = field(default="values", compare=False)
    batch_output: str = field(default="", compare=False)

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
            return cls(output, "classes", "first_value", f"{output}:index")
        if tensor.datatype in _INTEGER_DATATYPES:
            return cls(output, "classes", "first_value", output)
        classifiers = {c.output for c in config.monitor.classifier_outputs} if config.monitor else set()
        if config.feedback is not None and config.feedback.kind == "classification":
            classifiers.add(config.feedback.output)
        if output in classifiers or (step is not None and step.kind == "softmax"):
            return cls(output, "classes", "argmax", output)
        if tensor.datatype == "BYTES":
            raise ConfigError(
                f"model '{config.name}': output '{output}' is BYTES; a shadow compares numbers or "
                "classes: name a numeric output to compare"
            )
        return cls(output, "scores", "values", output)


def shadow_runs_idle(rollout: RolloutConfig | None) -> bool:
    """Whether the challenger answers shadow copies in the idle scheduling class: the
    rollout's `shadow_cpu_priority`, where "auto" is idle unless a check times the versions."""
    priority = "auto" if rollout is None else rollout.shadow_cpu_priority
    if priority != "auto":
        return priority == "idle"
    checks = () if rollout is None else rollout.checks
    return not any(isinstance(check, Mapping) and check.get("metric") in TIMING_METRICS for check in checks)


def _comparable(tensor: Any, steps: Mapping[str, Any]) -> bool:
    step = steps.get(tensor.name)
    return tensor.datatype != "BYTES" or (step is not None and step.kind == "classification")


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
    """One attached rollout: its controller, counters and shadow mirror."""

    def __init__(
        self, controller: Any, shadow_queue_size: int, comparison: OutputComparison | None, remember_ids: bool,
        shadow_idle: bool,
    ) -> None:  # fmt: skip
        self.controller = controller
        self.name: str = controller.name
        self.shadow_queue_size = shadow_queue_size
        self.shadow_idle = shadow_idle  # the challenger answers copies in the idle scheduling class
        self.comparison = comparison
        self.notify_unavailable = _unavailable_notifier(controller)
        self.routed: defaultdict[int, int] = defaultdict(int)  # version -> requests the router (or serving_version) sent it
        self.named: defaultdict[int, int] = defaultdict(int)  # version -> requests naming it
        # version -> the requests native front ends answered (`native_counts`)
        self.native: dict[int, Any] = {}
        self.on_routing: Callable[[Any], None] | None = None  # tells the listeners of each new route table
        self.fallbacks = 0  # routed to a version that was not loaded: answered by the champion
        # Copies that never reached a mirror (the challenger not loaded, or not taking the
        # champion's inputs); the mirrors count the rest.
        self.unlinked_failures = 0
        self.link: _Link | None = None
        # Routes the model's graph steps by each new table (the controller's listener), if attached.
        self.route_graph_steps: Callable[[Any], None] | None = None
        self.retired: list[_Link] = []  # earlier links whose copies may still be in flight
        self.retired_counts: Counter[str] = Counter()  # the counts of earlier links, forgotten since
        self.tags = itertools.count(1)
        # With delayed labels to pair (the champion takes feedback): tag -> request id, and
        # the latest shadow pairs' top values by request id, both bounded.
        self.remember_ids = remember_ids
        self.tag_ids: dict[int, str] = {}
        self.predictions: dict[str, tuple[float, float]] = {}
        self.recording: asyncio.TimerHandle | None = None
        self.attached = True
        self.warned_no_idle = False


@dataclass(frozen=True)
class NativeRoute:
    """A running rollout's routing, for a native front end: the table its router decides
    by, each arm's (version, handle or None for an arm at 0 % not loaded, RolloutCounts),
    where the routing key is read (both empty: no key can change a decision), and, when
    the table copies to a shadow, the arm whose batcher holds the rollout's mirror: a
    request routed there that the decision copies is tagged for it (-1: none copies)."""

    rollout: str
    table: Any  # deploy.router.RouteTable
    arms: list[tuple[int, Any, Any]]
    key_parameter: str
    key_header: str
    copying_arm: int = -1


@dataclass
class _Link:
    """A champion batcher mirrored to a challenger batcher, and what it compares."""

    champion_batcher: Any
    challenger_batcher: Any
    challenger_version: int
    mirror: Any  # _core.Mirror


class RolloutTraffic:
    """Routes requests of models under a rollout and feeds their shadow pairs to the judge.

    `runtime`: the Runtime serving the versions. `statistics_lock`: a lock held while
    shadow pairs reach a controller's statistics (default none: the owner ticks on the
    requests' event loop, as the server does). `max_unread_pairs`: paired rows a mirror
    keeps between two recordings (past that they are counted as unrecorded).
    """

    def __init__(
        self, runtime: Any, *, statistics_lock: Any = None, max_unread_pairs: int = DEFAULT_MAX_UNREAD_PAIRS,
    ) -> None:  # fmt: skip
        if isinstance(max_unread_pairs, bool) or not isinstance(max_unread_pairs, int) or max_unread_pairs < 1:
            raise ConfigError(f"max_unread_pairs: expected an integer >= 1, got {max_unread_pairs!r}")
        self.runtime = runtime
        self.max_unread_pairs = max_unread_pairs
        # Held while shadow results are added to a controller's statistics: an owner that
        # ticks from another thread than the requests' loop passes the lock its ticks hold.
        self.statistics_lock = statistics_lock if statistics_lock is not None else contextlib.nullcontext()
        self._rollouts: dict[str, _Rollout] = {}
        self._detached: list[_Rollout] = []  # detached with copies whose pairs are not recorded yet
        # Called with a model's name once a rollout routes its requests, and once none does.
        self.change_listeners: list[Callable[[str], None]] = []
        # The event loop the rollouts' requests and recordings run on (the last one seen):
        # a native route asked for from another thread is linked to its shadow there.
        self._loop: asyncio.AbstractEventLoop | None = None

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
        self._on_loop()
        if model in self._rollouts:
            raise ConfigError(
                f"model '{model}' already has rollout '{self._rollouts[model].name}' attached: "
                "detach it before attaching another"
            )
        champion_config = self.runtime.model(model, controller.versions.champion).config
        rollout = getattr(controller, "config", None)
        if not isinstance(rollout, RolloutConfig):
            rollout = champion_config.rollout
        if shadow_queue_size is None:
            shadow_queue_size = rollout.shadow_queue_size if rollout is not None else DEFAULT_SHADOW_QUEUE_SIZE
        if isinstance(shadow_queue_size, bool) or not isinstance(shadow_queue_size, int) or shadow_queue_size < 1:
            raise ConfigError(f"shadow_queue_size: expected an integer >= 1, got {shadow_queue_size!r}")
        comparison = OutputComparison.for_config(champion_config, compared_output)
        # Shadow pairs pair delayed labels (McNemar's test) when they compare the output the
        # champion's [feedback] judges, read the same way (argmax / index, or the value).
        feedback = champion_config.feedback
        remember_ids = feedback is not None and comparison is not None and comparison.output == feedback.output
        self._rollouts[model] = _Rollout(controller, shadow_queue_size, comparison, remember_ids, shadow_runs_idle(rollout))
        # Graphs whose steps run this model follow the rollout's split too (none copy to a shadow).
        listeners = getattr(controller, "routing_listeners", None)
        if listeners is not None:
            # A new table (a step, a switch, the end) may change what a native front end can serve.
            self._rollouts[model].on_routing = lambda table: self._notify(model)
            listeners.append(self._rollouts[model].on_routing)
            runtime = self.runtime

            def route_graph_steps(table: Any) -> None:  # a deploy.router.RouteTable
                runtime.route_graph_steps(model, list(zip([version for version, _ in table.arms], table.arm_bounds())))

            self._rollouts[model].route_graph_steps = route_graph_steps
            listeners.append(route_graph_steps)
            route_graph_steps(controller.router.table)
        self._notify(model)

    def detach(self, model: str) -> None:
        """Stops routing `model`: its requests go straight to the runtime again.

        No request is copied any more; copies in flight finish, and their pairs still feed
        the detached controller (at its next recording, or `drain_shadows`).
        """
        entry = self._rollouts.pop(model, None)
        if entry is None:
            raise ModelNotFound(f"model '{model}' has no rollout attached (attached: {sorted(self._rollouts) or 'none'})")
        if entry.route_graph_steps is not None:
            entry.controller.routing_listeners.remove(entry.route_graph_steps)
            self.runtime.route_graph_steps(model, None)
        if entry.on_routing is not None:
            entry.controller.routing_listeners.remove(entry.on_routing)
        entry.attached = False
        self._unlink(entry)
        if entry.retired:
            self._detached.append(entry)
        self._notify(model)

    def _notify(self, model: str) -> None:
        notify_listeners(self.change_listeners, model, "rollout routing")

    def get(self, model: str) -> Any:
        """The controller attached to `model`, or None."""
        entry = self._rollouts.get(model)
        return None if entry is None else entry.controller

    def native_counts(self, model: str, version: int) -> Any:
        """Where native front ends count the requests they answer with `version` of `model`
        under its rollout, routed or once it has ended (a `_core.RolloutCounts`, one per
        version, shared by every front end); `counters()` adds them to the rollout's own.
        ModelNotFound when no rollout is attached to `model`."""
        entry = self._rollouts.get(model)
        if entry is None:
            raise ModelNotFound(f"model '{model}' has no rollout attached (attached: {sorted(self._rollouts) or 'none'})")
        counts = entry.native.get(version)
        if counts is None:
            counts = entry.native[version] = _core.RolloutCounts()
        return counts

    def native_route(self, model: str) -> tuple[NativeRoute | None, str | None]:
        """How a native front end routes `model`'s requests naming no version as `infer`
        does, while its rollout runs; or (None, why only `infer` can).

        A rollout that copies to a shadow version is routed natively too: its mirror is
        linked here (on the requests' event loop: asked from another thread, it is linked
        there, and the listeners are told again), and the copying arm's requests are tagged
        for it by the front end. Only `infer` can while an arm with a share of the requests
        is not loaded (`infer` falls back to the champion and tells the controller), while
        the shadow version is not loaded or cannot take the champion's inputs (`infer`
        counts each copy as a challenger error), while requests of more than one version
        are copied, or while shadow pairs are kept by request id (the champion takes
        delayed labels: `infer` keeps each copied request's id).
        """
        entry = self._rollouts.get(model)
        if entry is None or not entry.controller.active:
            return None, "no rollout routes its requests"
        router = entry.controller.router
        table = router.table
        copying_arm = -1
        if table.shadow_version is not None and table.shadow_percent > 0:
            if entry.remember_ids:
                return None, "its shadow pairs are kept by request id, for delayed labels"
            shadow = table.shadow_version
            copying = [i for i, (version, percent) in enumerate(table.arms) if percent > 0 and version != shadow]
            if len(copying) > 1:
                return None, "its rollout copies the requests of more than one version to a shadow"
            copying_arm = copying[0] if copying else -1
        arms = []
        for version, percent in table.arms:
            try:
                handle = self.runtime.model(model, version)
            except ModelNotFound:
                if percent > 0:
                    return None, f"its rollout routes requests to version {version}, which is not loaded"
                handle = None  # never picked
            arms.append((version, handle, None if handle is None else self.native_counts(model, version)))
        reason = self._link_natively(entry, arms[copying_arm][1] if copying_arm >= 0 else None, table.shadow_version)
        if reason is not None:
            return None, reason
        sticky = getattr(entry.controller.config, "sticky", None)
        keyed = router.keyed and sticky is not None and sticky.enabled
        return NativeRoute(
            rollout=entry.name, table=table, arms=arms, key_parameter=sticky.parameter if keyed else "",
            key_header=sticky.header.lower() if keyed else "", copying_arm=copying_arm,
        ), None  # fmt: skip

    def _link_natively(self, entry: _Rollout, champion: Any, version: int | None) -> str | None:
        """Leaves `entry`'s mirror linked from `champion` (a handle; None: no copies) to
        `version`, for a native route; or says why it cannot. Links and unlinks only on the
        event loop, telling no listener: a front end's refresh asks, and every front end is
        refreshing for the same change."""
        link = entry.link
        if champion is None:
            if link is None:
                return None
            reason = "its rollout's shadow copies are still linked"
        else:
            try:
                challenger = self.runtime.model(entry.controller.model, version)
            except ModelNotFound:
                return f"its rollout copies requests to version {version}, which is not loaded"
            if (
                link is not None and link.champion_batcher is champion.batcher
                and link.challenger_batcher is challenger.batcher
            ):  # fmt: skip
                return None
            reason = "its rollout's shadow copies are being linked"
        if not self._on_loop():
            # Linked on the loop, whose refresh then serves the model natively.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._notify_if_attached, entry)
            return reason
        if champion is None:
            self._unlink(entry, notify=False)  # no more copies (a switch, the share at 0 %)
            return None
        try:
            mirror = self._mirror(entry, champion, challenger)
        except ConfigError as exc:
            return f"its shadow copies fail: {exc}"
        self._attach_mirror(entry, champion, challenger, version, mirror, notify=False)
        return None

    def _on_loop(self) -> bool:
        """Whether this thread runs an event loop (then remembered as the rollouts' loop)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _notify_if_attached(self, entry: _Rollout) -> None:
        if entry.attached:
            self._notify(entry.controller.model)

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
            return _new_result(RoutedResult, (outputs, handle.version, None, handle))
        if version is not None:
            handle = runtime.model(model, version)
            entry.named[version] += 1
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return _new_result(RoutedResult, (outputs, version, None, handle))
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
            link = entry.link
            if link is not None and link.challenger_batcher is handle.batcher:
                self._unlink(entry)  # the challenger answers for itself now (a switch): at normal priority
            outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return _new_result(RoutedResult, (outputs, handle.version, entry.name, handle))
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
        if entry.link is not None:
            self._unlink(entry)  # no more copies; a promoted challenger answers at normal priority
        entry.routed[handle.version] += 1
        outputs = await runtime.infer_async(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
        return _new_result(RoutedResult, (outputs, handle.version, None, handle))

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
        """The champion answers; its batcher copies the request to the challenger's (a `_core.Mirror`)."""
        link = entry.link
        if link is None or link.champion_batcher is not handle.batcher or link.challenger_version != shadow_version:
            link = self._link(entry, handle, shadow_version)
        tag = 0
        if link is not None:
            tag = next(entry.tags)
            if entry.remember_ids:
                self._remember(entry, tag, request_id)
        outputs = await self.runtime.infer_async(
            handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id, mirror_tag=tag
        )
        return _new_result(RoutedResult, (outputs, handle.version, entry.name, handle))

    # ---- the shadow mirror ---------------------------------------------------------------

    def _link(self, entry: _Rollout, champion: Any, version: int) -> _Link | None:
        """Mirrors the champion's batcher to version `version`'s; None (the copy counted as
        a challenger error) when that version is not loaded or does not take the champion's inputs."""
        runtime, controller = self.runtime, entry.controller
        try:
            challenger = runtime.model(controller.model, version)
            mirror = self._mirror(entry, champion, challenger)
        except ConveyorError as exc:
            self._unlinked_failure(entry, version, exc)
            return None
        return self._attach_mirror(entry, champion, challenger, version, mirror, notify=True)

    def _attach_mirror(
        self, entry: _Rollout, champion: Any, challenger: Any, version: int, mirror: Any, *, notify: bool
    ) -> _Link:
        """Replaces `entry`'s link by `mirror`, from `champion`'s batcher to `challenger`'s
        (version `version`); on the event loop, where its pairs are recorded. `notify`: tell
        the listeners (a native front end may route the copies itself now)."""
        self._on_loop()
        self._unlink(entry, notify=False)
        champion.batcher.set_mirror(mirror)
        entry.link = _Link(champion.batcher, challenger.batcher, version, mirror)
        if entry.shadow_idle and not challenger.batcher.set_background(True) and not entry.warned_no_idle:
            entry.warned_no_idle = True
            log.warning(
                "rollout %s: this machine has no idle CPU scheduling class: version %d answers shadow copies "
                "at normal priority, competing with the champion for CPU", entry.name, version,
            )  # fmt: skip
        if entry.recording is None:
            self._schedule_recording(entry)
        if notify:
            self._notify_if_attached(entry)
        return entry.link

    def _mirror(self, entry: _Rollout, champion: Any, challenger: Any) -> Any:
        """A `_core.Mirror` copying the champion's rows to the challenger; ConfigError when
        the challenger cannot take them (other inputs, or batching where the champion does not)."""
        mine, theirs = champion.config, challenger.config
        signature = [(t.name, t.datatype, list(t.dims)) for t in mine.inputs]
        if [(t.name, t.datatype, list(t.dims)) for t in theirs.inputs] != signature:
            raise ConfigError(
                f"rollout '{entry.name}': version {challenger.version} takes inputs "
                f"{[(t.name, t.datatype, list(t.dims)) for t in theirs.inputs]}, the champion {signature}: "
                "a shadow copy needs the same inputs"
            )
        if (mine.max_batch_size > 0) != (theirs.max_batch_size > 0):
            raise ConfigError(
                f"rollout '{entry.name}': version {challenger.version} has max_batch_size {theirs.max_batch_size}, "
                f"the champion {mine.max_batch_size}: a shadow copy needs both to batch, or neither"
            )
        comparison, compare, indices = entry.comparison, "none", (-1, -1)
        if comparison is not None:
            try:
                indices = (
                    champion.batch_output_names.index(comparison.batch_output),
                    challenger.batch_output_names.index(comparison.batch_output),
                )
                compare = comparison.reading
            except ValueError:
                log.warning(
                    "rollout %s: version %d has no output '%s' to compare: its shadow pairs compare latency only",
                    entry.name, challenger.version, comparison.output,
                )  # fmt: skip
                indices = (-1, -1)
        return _core.Mirror(
            challenger=challenger.batcher, slots=entry.shadow_queue_size, champion_output=indices[0],
            challenger_output=indices[1], compare=compare, max_unread_rows=self.max_unread_pairs,
        )  # fmt: skip

    def _unlink(self, entry: _Rollout, *, notify: bool = True) -> None:
        """Stops `entry`'s copies (those in flight finish, and their pairs are recorded).
        `notify`: tell the listeners (a native front end routes the requests anew)."""
        link = entry.link
        if link is None:
            return
        link.champion_batcher.set_mirror(None)
        entry.retired.append(link)
        entry.link = None
        if entry.shadow_idle:
            self._leave_background(entry, link)
        if notify:
            self._notify_if_attached(entry)

    def _leave_background(self, entry: _Rollout, link: _Link) -> None:
        try:
            link.challenger_batcher.set_background(False)
        except ConveyorError as exc:  # no threads to be had: it keeps serving, in the idle class
            log.error("rollout %s: version %d stays at idle CPU priority: %s", entry.name, link.challenger_version, exc)

    def _unlinked_failure(self, entry: _Rollout, version: int, exc: ConveyorError) -> None:
        entry.unlinked_failures += 1
        with self.statistics_lock:
            entry.controller.statistics.challenger.add_counts(requests=1, errors=1)
        if entry.unlinked_failures == 1:
            log.warning("rollout %s: shadow copies to version %d fail: %s", entry.name, version, exc)
        if isinstance(exc, ModelNotFound):
            self._tell_unavailable(entry, version)

    def _remember(self, entry: _Rollout, tag: int, request_id: str | None) -> None:
        tag_ids = entry.tag_ids
        if len(tag_ids) >= MAX_REMEMBERED_IDS:
            del tag_ids[next(iter(tag_ids))]
        tag_ids[tag] = request_id if request_id is not None else new_request_id()

    def shadow_prediction(self, model: str, request_id: str) -> tuple[float, float] | None:
        """The (champion, challenger) top value of a recent shadow pair by its request id
        (a class, or the first output value), for pairing delayed labels; None when unknown.

        Kept only for models whose champion takes feedback, for the last
        `MAX_REMEMBERED_IDS` pairs.
        """
        entry = self._rollouts.get(model)
        return None if entry is None else entry.predictions.get(request_id)

    def _schedule_recording(self, entry: _Rollout) -> None:
        loop = asyncio.get_running_loop()
        entry.recording = loop.call_later(PAIR_RECORD_DELAY_S, self._recording_due, entry)

    def _recording_due(self, entry: _Rollout) -> None:
        entry.recording = None
        if entry.link is not None and not entry.controller.active:
            self._unlink(entry)  # the rollout ended: no more copies; the challenger back to normal priority
        self._check_challenger(entry)
        self._record(entry)
        busy = entry.link is not None or any(link.mirror.stats()["in_flight"] for link in entry.retired)
        if busy:
            self._schedule_recording(entry)
        elif not entry.attached and entry in self._detached:
            self._detached.remove(entry)

    def _check_challenger(self, entry: _Rollout) -> None:
        """Unlinks a mirror whose challenger was unloaded or reloaded (the next copy links anew)."""
        link = entry.link
        if link is None:
            return
        try:
            current = self.runtime.model(entry.controller.model, link.challenger_version).batcher
        except ModelNotFound:
            current = None
        if current is not link.challenger_batcher:
            self._unlink(entry)

    def _record(self, entry: _Rollout) -> None:
        """Feeds the rows paired since the last recording to the judge's statistics; forgets
        retired mirrors with nothing left in flight (keeping their counts)."""
        finished = [link for link in entry.retired if not link.mirror.stats()["in_flight"]]
        links = ([entry.link] if entry.link is not None else []) + entry.retired
        for link in links:
            pairs = link.mirror.drain()
            if len(pairs["tags"]):
                with self.statistics_lock:
                    self._record_pairs(entry, pairs)
        for link in finished:
            entry.retired.remove(link)
            for key, value in link.mirror.stats().items():
                entry.retired_counts[key] += value

    def _record_pairs(self, entry: _Rollout, pairs: Mapping[str, np.ndarray]) -> None:
        paired = entry.controller.statistics.paired
        paired.record_latencies(pairs["champion_ns"] * 1e-9, pairs["challenger_ns"] * 1e-9)
        comparison = entry.comparison
        if comparison is not None and len(pairs["champion_values"]):
            # Output drift counts one value per request: the first compared one.
            drift_values = pairs["champion_first"], pairs["challenger_first"]
            if comparison.kind == "classes":
                paired.record_classes(
                    pairs["champion_values"].astype(np.int64), pairs["challenger_values"].astype(np.int64),
                    drift_values=(drift_values[0].astype(np.int64), drift_values[1].astype(np.int64)),
                )  # fmt: skip
            else:
                paired.record_scores(pairs["champion_values"], pairs["challenger_values"], drift_values=drift_values)
        if entry.remember_ids:
            self._keep_predictions(entry, pairs)

    def _keep_predictions(self, entry: _Rollout, pairs: Mapping[str, np.ndarray]) -> None:
        """Keeps the compared rows' top values by the ids the feedback store records: the
        request id for a one-row request, "<id>/<row>" for each row of a larger one."""
        tags, compared = pairs["tags"], pairs["compared"]
        if not len(tags):
            return
        # A request's rows are consecutive and share its tag: runs of equal tags.
        starts = np.flatnonzero(np.r_[True, tags[1:] != tags[:-1]])
        lengths = np.diff(np.r_[starts, len(tags)])
        row_in_request = np.arange(len(tags)) - np.repeat(starts, lengths)
        request_rows = np.repeat(lengths, lengths)
        tag_ids, predictions = entry.tag_ids, entry.predictions
        columns = (
            tags[compared].tolist(), row_in_request[compared].tolist(), request_rows[compared].tolist(),
            pairs["champion_first"].tolist(), pairs["challenger_first"].tolist(),
        )  # fmt: skip
        for tag, row, rows, mine, theirs in zip(*columns):
            request_id = tag_ids.get(tag)
            if request_id is None:
                continue
            if len(predictions) >= MAX_REMEMBERED_IDS:
                del predictions[next(iter(predictions))]
            predictions[request_id if rows == 1 else f"{request_id}/{row}"] = (mine, theirs)
        for tag in tags[starts].tolist():
            tag_ids.pop(tag, None)

    async def drain_shadows(self, model: str | None = None, *, timeout_s: float | None = None) -> bool:
        """Waits for the shadow copies in flight (of `model`, or all) and records their
        pairs; for tests and an orderly shutdown. `timeout_s`: the longest wait for each
        rollout's copies (None: as long as they take); returns False when copies were
        still in flight at the end (their pairs are not recorded: logged)."""
        loop = asyncio.get_running_loop()
        if model is None:
            entries = list(self._rollouts.values()) + list(self._detached)
        else:
            entries = [self._rollouts[model]] + [e for e in self._detached if e.controller.model == model]
        wait_s = -1.0 if timeout_s is None else float(timeout_s)
        idle = True
        for entry in entries:
            links = ([entry.link] if entry.link is not None else []) + entry.retired
            for link in links:
                if not await loop.run_in_executor(None, link.mirror.wait_idle, wait_s):
                    idle = False
                    log.warning(
                        "rollout %s: %d shadow rows still in flight after %.1f s; their pairs are not recorded",
                        entry.name, link.mirror.stats()["in_flight"], wait_s,
                    )  # fmt: skip
            self._record(entry)
            if not entry.attached and entry in self._detached:
                self._detached.remove(entry)
        return idle

    # ---- metrics --------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, Any]]:
        """Per model with a rollout: its name, requests per version and arm, shadow counts.

        `requests` rows: {"version", "arm" ("champion" | "challenger" | "other"),
        "routing" ("routed": by the router or serving_version, "named": the request named
        the version), "count"}; `fallbacks`: routed to a version not loaded, answered by
        the champion (counted under the champion's "routed" too); `shadow`, in rows
        copied: sent, dropped (no slot, or the challenger's queue full), failed (the
        challenger failed it, refused it, or was not there to take it), paired (answered by
        both), incomparable (paired without comparable outputs), unrecorded (paired while
        too many pairs waited to be recorded), in_flight.
        """
        out = {}
        for model, entry in self._rollouts.items():
            versions = entry.controller.versions
            rows = []
            routed, named = Counter(entry.routed), Counter(entry.named)
            for version, native in list(entry.native.items()):
                routed[version] += native.routed
                named[version] += native.named
            for routing, counts in (("routed", routed), ("named", named)):
                for version, count in sorted(counts.items()):
                    if not count:
                        continue
                    arm = "champion" if version == versions.champion else "challenger" if version in versions.challengers else "other"
                    rows.append({"version": version, "arm": arm, "routing": routing, "count": count})
            out[model] = {"rollout": entry.name, "requests": rows, "fallbacks": entry.fallbacks, "shadow": _shadow_counts(entry)}
        return out


def _shadow_counts(entry: _Rollout) -> dict[str, int]:
    totals = Counter(entry.retired_counts)
    for link in ([entry.link] if entry.link is not None else []) + entry.retired:
        totals.update(link.mirror.stats())
    totals["failed"] += entry.unlinked_failures
    return {key: int(totals[key]) for key in SHADOW_COUNTS}
