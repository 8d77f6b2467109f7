"""Rollouts over a Runtime, in-process: start, steer, tick and serve requests through them.

    rollouts = Rollouts(runtime, data_dir="state")     # state and decision logs in state/rollouts
    rollouts.start("m", {"strategy": "canary", "challenger": 2, "steps": [{"weight": 10}]})
    result = rollouts.infer("m", {"x": batch}, route_key="user-7")   # or await infer_async(...)
    result.outputs, result.version, result.rollout_name
    rollouts.tick()                     # feeds counters to every active rollout and lets it judge
    rollouts.promote("m") / pause("m") / resume("m") / abort("m", reason) / rollback("m", reason)
    rollouts.add_feedback("m", [{"id": "r-1", "label": 3}])   # delayed labels reach the judge
    rollouts.status("m")                # the same document as GET /v2/models/{m}/rollout
    rollouts.close()

The same `RolloutController` and `RolloutTraffic` the server's `RolloutManager` uses, and
the same helpers (`build_controller`, `tick_rollout`, `apply_action`), which live here so
that both share them (the runtime layer below does not import deploy).

- Requests: a request naming no version of a model under a rollout is routed by it
  (`route_key`: the sticky key); naming a version bypasses routing. A model without a
  rollout goes straight to the runtime. Once a rollout has ended, its model's requests go
  to the outcome's version (`serving_version`) and carry no rollout name; see
  `RolloutTraffic`.
- Labels: `add_feedback` joins each delayed label at the version that answered its
  request (every label counted once) and, while the rollout is active, adds it to that
  version's arm of the judge's statistics: the unpaired `accuracy` and `mae` checks of a
  canary or A/B/n rollout read them. In shadow mode the champion answered, so its store
  joins the label; when the shadow challenger answered the same request, the label also
  feeds the paired evidence (McNemar's test) with both predictions.
- Ticks: `tick(now=None)` is explicit; `start_ticking(interval_s)` runs it from a daemon
  thread until `stop_ticking()` or `close()`. A tick looks at a rollout's checks every
  `interval_s` of its table, so ticking more often only reads counters more often.
- Threads: one lock serializes ticks, imperative calls, the traffic layer's recording of
  shadow pairs and `on_version_unavailable`. `infer_async` runs on the caller's event loop
  (shadow copies run there too; `await drain_shadows()` waits for them). `infer` (blocking)
  runs the request on a private event-loop thread started at the first blocking call of a
  model under a rollout, so its shadow copies outlive the call; `close()` stops it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.deploy.checks import parse_checks
from conveyor.deploy.controller import RolloutController
from conveyor.rollout_config import RolloutConfig, RolloutVersions, parse_rollout_config, resolve_versions
from conveyor.deploy.rollout_state import audit_path, read_audit
from conveyor.deploy.traffic import OutputComparison, RolloutTraffic, RoutedResult
from conveyor.errors import ConfigError, Conflict, InvalidInput, ModelNotFound

__all__ = [
    "LockedController",
    "Rollouts",
    "add_rollout_feedback",
    "apply_action",
    "build_controller",
    "feedback_stores",
    "record_joined_labels",
    "rollout_members",
    "tick_rollout",
    "version_counters",
]

log = logging.getLogger(__name__)

STATE_SUBDIRECTORY = "rollouts"
ACTIONS = ("promote", "pause", "resume", "abort", "rollback")

EventCallback = Callable[[dict[str, Any]], None]


class LockedController(RolloutController):
    """A controller whose `on_version_unavailable` takes its owner's lock.

    The traffic layer calls that method from requests, outside the owner; every other
    call goes through the owner, which holds the lock. `owner_lock` is set right after
    construction, before the controller is attached.
    """

    owner_lock: Any  # the owner's threading.RLock

    def on_version_unavailable(self, version: int, reason: str = "unavailable", *, now: float | None = None) -> dict[str, Any] | None:
        with self.owner_lock:
            return super().on_version_unavailable(version, reason, now=now)


def rollout_members(versions: RolloutVersions) -> tuple[int, ...]:
    """The champion, then the challengers."""
    return (versions.champion, *versions.challengers)


def version_counters(runtime: Any, model: str, version: int) -> dict[str, Any] | None:
    """The version's Batcher.stats() (`Runtime.model_stats(...)["raw"]`), or None when it is not loaded."""
    try:
        return runtime.model_stats(model, version)["raw"]
    except ModelNotFound:
        return None


def tick_rollout(runtime: Any, controller: RolloutController, now: float) -> list[dict[str, Any]]:
    """One rollout's tick (its owner's lock held): its versions' counters, or the news that one is gone."""
    stats = {version: version_counters(runtime, controller.model, version) for version in rollout_members(controller.versions)}
    missing = [version for version, raw in stats.items() if raw is None]
    if missing:
        records = [controller.on_version_unavailable(version, "not loaded", now=now) for version in missing]
        return [record for record in records if record is not None]
    challengers = [stats[version] for version in controller.versions.challengers]
    record = controller.tick(now, stats[controller.versions.champion], challengers if len(challengers) > 1 else challengers[0])
    return [] if record is None else [record]


def record_joined_labels(
    controller: RolloutController, rows: list[dict[str, Any]],
    shadow_prediction: Callable[[str], tuple[float, float] | None] | None = None,
) -> None:  # fmt: skip
    """Adds joined feedback rows (`FeedbackStore` sink rows) to the arm of the version that
    answered each (the champion's arm or the challengers') and to that version's own
    statistics (its realized accuracy or MAE in the status). Rows of other versions, rows
    whose prediction is not finite (the store keeps them out of its metric too), and
    rows after the rollout ended are left out. The caller holds the owner's lock.

    `shadow_prediction(request_id)`: the (champion, challenger) prediction of a shadow
    pair (`RolloutTraffic.shadow_prediction`); a champion's row that has one also feeds the
    paired evidence (McNemar's discordant pairs, paired absolute errors)."""
    if not controller.active:
        return
    if shadow_prediction is not None:
        record_paired_labels(controller, rows, shadow_prediction)
    arms = {controller.versions.champion: controller.statistics.champion}
    arms.update((version, controller.statistics.challenger) for version in controller.versions.challengers)
    # (version, classification?) -> (predictions, labels): one record call per version and kind.
    gathered: dict[tuple[int, bool], tuple[list[float], list[float]]] = {}
    for row in rows:
        if row["version"] not in arms or not math.isfinite(row["prediction"]):
            continue
        predicted, labels = gathered.setdefault((row["version"], "correct" in row), ([], []))
        predicted.append(row["prediction"])
        labels.append(row["label"])
    for (version, classification), (predicted, labels) in gathered.items():
        values = np.asarray(predicted, np.float64), np.asarray(labels, np.float64)
        for arm in (arms[version], controller.version_statistics[version]):
            (arm.record_classification_labels if classification else arm.record_regression_labels)(*values)


def record_paired_labels(
    controller: RolloutController, rows: list[dict[str, Any]], shadow_prediction: Callable[[str], tuple[float, float] | None],
) -> None:  # fmt: skip
    """The champion's joined labels whose requests were also answered by the shadow
    challenger, added to the paired evidence with both predictions."""
    champion = controller.versions.champion
    gathered: dict[bool, tuple[list[float], list[float], list[float]]] = {}
    for row in rows:
        if row["version"] != champion:
            continue
        pair = shadow_prediction(row["request_id"])
        if pair is None or not math.isfinite(pair[1]) or not math.isfinite(row["prediction"]):
            continue
        mine, theirs, labels = gathered.setdefault("correct" in row, ([], [], []))
        mine.append(row["prediction"])
        theirs.append(pair[1])
        labels.append(row["label"])
    paired = controller.statistics.paired
    for classification, columns in gathered.items():
        mine, theirs, labels = (np.asarray(column, np.float64) for column in columns)
        (paired.record_classification_labels if classification else paired.record_regression_labels)(mine, theirs, labels)


def feedback_stores(runtime: Any, controller: RolloutController, version: int | None) -> list[Any]:
    """The feedback stores labels for `controller`'s model may join in, the first to try first.

    `version` given: that version's store alone (ModelNotFound when it is not loaded).
    Otherwise the rollout's champion, its challengers, then the model's other loaded
    versions, newest first: a label reaches the version that answered its request even
    when the request named a version outside the rollout. Versions without [feedback]
    are skipped; InvalidInput when none has it.
    """
    model = controller.model
    if version is not None:
        candidates = [version]
    else:
        members = rollout_members(controller.versions)
        others = sorted(set(runtime.models().get(model, [])) - set(members), reverse=True)
        candidates = [*members, *others]
    stores = []
    for candidate in candidates:
        try:
            monitor = runtime.model(model, candidate).monitor
        except ModelNotFound:
            if version is not None:
                raise
            continue
        store = getattr(monitor, "feedback", None)
        if store is not None:
            stores.append(store)
    if not stores:
        named = f" version {version}" if version is not None else ""
        raise InvalidInput(f"model '{model}'{named} takes no feedback: add a [feedback] table to its config.toml")
    return stores


def add_rollout_feedback(
    runtime: Any, controller: RolloutController, labels: Any, *, version: int | None, lock: Any,
    shadow_prediction: Callable[[str], tuple[float, float] | None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Delayed labels for a model with a rollout (active or ended): POST .../feedback.

    Each label joins in the store of the version that answered its request id (see
    `feedback_stores`; `version` names one), every label counted once in the answer (the
    counts of joined, duplicate, late, unknown and invalid labels, and `errors`). While
    the rollout is active the joined labels also reach its judge, under `lock`: each in
    the arm of the version that answered, where the `accuracy` and `mae` checks read them,
    and, for requests a shadow challenger answered too (`shadow_prediction`), the paired
    evidence of McNemar's test.
    """
    first, *others = feedback_stores(runtime, controller, version)

    def judge_them(rows: list[dict[str, Any]]) -> None:
        with lock:
            record_joined_labels(controller, rows, shadow_prediction)

    return first.add_labels(labels, then=others, on_joined=judge_them)


def build_controller(
    runtime: Any, model: str, config: RolloutConfig, *, source: str, now: float, lock: Any,
    state_directory: Path | None, on_event: EventCallback | None, clock: Callable[[], float],
) -> LockedController:  # fmt: skip
    """A new rollout of `config` on `model`, its counters taken at `now`; not yet attached.

    Raises ModelNotFound when the model is not loaded, ConfigError naming the field for an
    unserved version, a bad check or an output shadow pairs cannot compare. Nothing is
    saved before every check has passed.
    """
    loaded = sorted(runtime.models().get(model, []))
    if not loaded:
        raise ModelNotFound(f"model '{model}' is not loaded: load it before starting a rollout")
    versions = resolve_versions(config, loaded, source=source)
    checks = parse_checks(config.checks, source=source)
    OutputComparison.for_config(runtime.config(model, versions.champion))
    challenger_stats = [version_counters(runtime, model, version) for version in versions.challengers]
    controller = LockedController(
        model, config, versions, checks, now, state_directory, on_event,
        champion_stats=version_counters(runtime, model, versions.champion),
        challenger_stats=challenger_stats if len(challenger_stats) > 1 else challenger_stats[0],
        clock=clock,
    )  # fmt: skip
    controller.owner_lock = lock
    return controller


def apply_action(
    controller: RolloutController, action: str, *, reason: str | None = None, version: int | None = None,
    full: bool = False, now: float,
) -> dict[str, Any]:  # fmt: skip
    """One imperative call by name (one of ACTIONS); returns its decision record.

    `version` and `full` apply to promote only. RolloutStateError when the state does
    not allow it.
    """
    if action == "promote":
        return controller.promote(version=version, full=full, now=now)
    if action == "pause":
        return controller.pause(now=now)
    if action == "resume":
        return controller.resume(now=now)
    if action == "abort":
        return controller.abort(reason or "by the operator", now=now)
    if action == "rollback":
        return controller.rollback(reason or "by the operator", now=now)
    raise InvalidInput(f"rollout action '{action}' is unknown: use one of {', '.join(ACTIONS)}")


class Rollouts:
    """Rollouts of a Runtime's models, in-process (see the module docstring).

    `runtime`: the Runtime serving the versions. `data_dir`: state and decision logs go
    to `<data_dir>/rollouts` (default: the runtime's `data_dir`; with neither, nothing is
    saved and a rollout does not survive the process). `clock`: wall-clock seconds for
    calls made without `now`. `on_event`: receives every decision record. Shadow
    copies are made from the batch's own copy of the inputs: a caller may reuse its input
    buffers as soon as a call returns.
    """

    def __init__(
        self, runtime: Any, data_dir: str | Path | None = None, *, clock: Callable[[], float] = time.time,
        on_event: EventCallback | None = None,
    ) -> None:  # fmt: skip
        self.runtime = runtime
        base = data_dir if data_dir is not None else getattr(runtime, "data_dir", None)
        self.state_directory = None if base is None else Path(base) / STATE_SUBDIRECTORY
        self.clock = clock
        self.on_event = on_event
        self._lock = threading.RLock()
        self.traffic = RolloutTraffic(runtime, statistics_lock=self._lock)
        self._controllers: dict[str, LockedController] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stop_ticking = threading.Event()

    # ---- control ---------------------------------------------------------------------------

    def start(self, model: str, table: Mapping[str, Any] | None = None, *, now: float | None = None) -> dict[str, Any]:
        """Starts a rollout on `model` and returns its status.

        `table`: the keys of a `[rollout]` table (a dict); None takes the model's own
        config.toml table. Raises Conflict when the model has an active rollout,
        ModelNotFound when it is not loaded, ConfigError naming the field for a bad table.
        """
        source = f"rollout of model {model!r}"
        with self._lock:
            running = self._controllers.get(model)
            if running is not None and running.active:
                raise Conflict(
                    f"model '{model}' already has an active rollout '{running.name}' ({running.strategy}, "
                    f"{running.state}): end it first with abort(), rollback() or promote()"
                )
            if table:
                config = parse_rollout_config(table, source=source)
            else:
                if not self.runtime.models().get(model):
                    raise ModelNotFound(f"model '{model}' is not loaded: load it before starting a rollout")
                config = self.runtime.config(model).rollout
                if config is None:
                    raise InvalidInput(
                        f"{source}: model '{model}' has no [rollout] table in its config: pass one as `table` "
                        "(a dict with the keys of a [rollout] table)"
                    )
            controller = build_controller(
                self.runtime, model, config, source=source, now=self._now(now), lock=self._lock,
                state_directory=self.state_directory, on_event=self.on_event, clock=self.clock,
            )  # fmt: skip
            if running is not None:
                self.traffic.detach(model)
            self.traffic.attach(controller)
            self._controllers[model] = controller
            return self.status(model)

    def promote(self, model: str, *, version: int | None = None, full: bool = False, now: float | None = None) -> dict[str, Any]:
        """Promotes (canary at a manual gate: passes the gate unless `full`); returns the status."""
        return self._act(model, "promote", version=version, full=full, now=now)

    def pause(self, model: str, *, now: float | None = None) -> dict[str, Any]:
        """Holds the current weights (a failing check still rolls back); returns the status."""
        return self._act(model, "pause", now=now)

    def resume(self, model: str, *, now: float | None = None) -> dict[str, Any]:
        """Continues a rollout paused by `pause`; returns the status."""
        return self._act(model, "resume", now=now)

    def abort(self, model: str, reason: str = "by the operator", *, now: float | None = None) -> dict[str, Any]:
        """Ends the rollout with the champion answering everything; returns the status."""
        return self._act(model, "abort", reason=reason, now=now)

    def rollback(self, model: str, reason: str = "by the operator", *, now: float | None = None) -> dict[str, Any]:
        """Returns everything to the champion (blue-green: switches back); returns the status."""
        return self._act(model, "rollback", reason=reason, now=now)

    def _act(self, model: str, action: str, *, now: float | None, **arguments: Any) -> dict[str, Any]:
        with self._lock:
            apply_action(self._controller(model), action, now=self._now(now), **arguments)
            return self.status(model)

    def _controller(self, model: str) -> LockedController:
        controller = self._controllers.get(model)
        if controller is None:
            raise ModelNotFound(f"model '{model}' has no rollout: start one with Rollouts.start('{model}', table)")
        return controller

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else float(now)

    # ---- reading ---------------------------------------------------------------------------

    def controller(self, model: str) -> RolloutController | None:
        """The controller of `model`'s rollout (active or ended), or None."""
        return self._controllers.get(model)

    def status(self, model: str) -> dict[str, Any]:
        """The rollout's status (the controller's `status()`) with the model's traffic counters."""
        with self._lock:
            document = self._controller(model).status()
            document["traffic"] = self.traffic.counters().get(model, {})
            return document

    def decisions(self, model: str) -> list[dict[str, Any]]:
        """Every decision record of `model`'s rollouts, oldest first (empty without a data dir)."""
        with self._lock:
            self._controller(model)
            if self.state_directory is None:
                return []
            path = audit_path(self.state_directory, model)
            return read_audit(path) if path.exists() else []

    # ---- ticks -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Feeds every active rollout its versions' counters and lets it judge; returns the records made.

        `now`: wall-clock seconds (default the clock). Shadow pairs still in flight are
        not waited for: `await drain_shadows()` first when they must count.
        """
        now = self._now(now)
        records: list[dict[str, Any]] = []
        with self._lock:
            for controller in list(self._controllers.values()):
                if controller.active:
                    records += tick_rollout(self.runtime, controller, now)
        return records

    def start_ticking(self, interval_s: float = 1.0) -> None:
        """Calls `tick()` every `interval_s` seconds from a daemon thread until `stop_ticking()`.

        A failing tick is logged by the thread and the next one still runs.
        """
        if not 0 < interval_s < math.inf:
            raise ConfigError(f"rollout tick interval: expected a finite number of seconds > 0, got {interval_s!r}")
        with self._lock:
            if self._ticker is not None:
                raise Conflict("rollouts are already ticking: call stop_ticking() before starting again")
            self._stop_ticking.clear()
            self._ticker = threading.Thread(
                target=self._tick_periodically, args=(float(interval_s),), name="conveyor-rollout-ticks", daemon=True
            )
            self._ticker.start()

    def _tick_periodically(self, interval_s: float) -> None:
        while not self._stop_ticking.wait(interval_s):
            try:
                self.tick()
            except Exception:  # a failing tick must not end the ticking
                log.exception("rollout tick failed")

    def stop_ticking(self) -> None:
        """Stops the thread `start_ticking` started and waits for it; nothing when none runs."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._stop_ticking.set()
            ticker.join()

    # ---- requests --------------------------------------------------------------------------

    async def infer_async(
        self, model: str, inputs: Mapping[str, Any], *, version: int | None = None, route_key: str | None = None,
        request_id: str | None = None, priority: int | None = None, timeout_us: int | None = None,
    ) -> RoutedResult:  # fmt: skip
        """One request through `model`'s rollout, if it has one: (outputs, version, rollout_name).

        `version`: served as named, bypassing routing. `route_key`: the sticky key (the
        same key always reaches the same version). Raises what `Runtime.infer_async` raises.
        """
        return await self.traffic.infer(
            model, inputs, version=version, route_key=route_key, request_id=request_id, priority=priority,
            timeout_us=timeout_us,
        )  # fmt: skip

    def infer(
        self, model: str, inputs: Mapping[str, Any], *, version: int | None = None, route_key: str | None = None,
        request_id: str | None = None, priority: int | None = None, timeout_us: int | None = None,
    ) -> RoutedResult:  # fmt: skip
        """`infer_async`, blocking: do not call it from a running event loop (await infer_async there)."""
        if self.traffic.get(model) is None:
            handle = self.runtime.model(model, version)
            outputs = self.runtime.infer(handle, inputs, priority=priority, timeout_us=timeout_us, request_id=request_id)
            return RoutedResult(outputs, handle.version, None, handle)
        coroutine = self.infer_async(
            model, inputs, version=version, route_key=route_key, request_id=request_id, priority=priority,
            timeout_us=timeout_us,
        )  # fmt: skip
        return asyncio.run_coroutine_threadsafe(coroutine, self._request_loop()).result()

    def _request_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="conveyor-rollout-requests", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def add_feedback(self, model: str, labels: Any, *, version: int | None = None) -> dict[str, Any]:
        """Delayed labels (`[{"id": request id, "label": ...}, ...]`) for earlier requests.

        For a model with a rollout each label joins at the version that answered its
        request, and while the rollout is active its judge counts it in that version's arm
        (`add_rollout_feedback`); `Runtime.add_feedback` would try one version only. A
        model without a rollout: `Runtime.add_feedback`. Returns the counts of joined,
        duplicate, late, unknown and invalid labels.
        """
        controller = self._controllers.get(model)
        if controller is None:
            return self.runtime.add_feedback(model, labels, version=version)
        return add_rollout_feedback(
            self.runtime, controller, labels, version=version, lock=self._lock,
            shadow_prediction=functools.partial(self.traffic.shadow_prediction, model),
        )  # fmt: skip

    async def drain_shadows(self, model: str | None = None) -> None:
        """Waits for the shadow copies started on this event loop and records their pairs."""
        await self.traffic.drain_shadows(model)

    def close(self) -> None:
        """Stops ticking, finishes the blocking calls' shadow copies (their pairs are recorded)
        and stops their event-loop thread. The runtime stays open; the rollouts stay as they are."""
        self.stop_ticking()
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.traffic.drain_shadows(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._loop_thread = None

