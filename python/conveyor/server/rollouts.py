"""Rollouts in the server: started, restored, ticked, steered and shown.

`RolloutManager` owns the server's `RolloutTraffic` (the data plane routes through it)
and one `RolloutController` per model with a rollout, under one lock: the controller has
none of its own, so ticks, imperative calls and `on_version_unavailable` (which the
traffic layer also calls, from requests) are serialized here.

- Start: a model whose config.toml has `[rollout]` starts it when loaded (every control
  mode; in poll mode a changed table replaces the running rollout, a removed one ends
  it). At the first load after a restart the saved state in `<data dir>/rollouts` is
  restored: resumed at its step, or champion-only with the reason
  (`RolloutController.restore`); a rollout started by API call (`start(model, table)`)
  comes back from the table saved with its state.
- Checks: `conveyor.server` registers the judge's check validation with the config at
  import, so `[[rollout.checks]]` errors name their field when config.toml loads.
- Refusals: a second rollout on a model with an active one is a `Conflict` (409) naming
  both; a bad table, an unserved version or an output that cannot be compared is a
  ConfigError naming the field; nothing changes on a refusal.
- Ticks: `tick(now)` feeds every active rollout its versions' batcher counters
  (`Runtime.model_stats(m, v)["raw"]`) and lets the controller judge; `start_ticking`
  runs it every `tick_interval_s` on the event loop. Tests call `tick` with a chosen
  `now` on the loop.
- Versions: a rollout version that is no longer loaded (unloaded, removed, failed to
  reload) reaches the controller through `on_version_unavailable`.
- Labels: `add_feedback` (the data plane's feedback route, for a model with a rollout)
  joins each delayed label at the version that answered it and feeds the judge's arms.
- Events: every decision record is logged as one JSON line on the `conveyor.events`
  logger and posted to the model's webhook when its `[monitor]` names one.
- `RolloutCollector` adds the rollout families to /metrics.

What is not about the server (building a controller, a tick, an action by name, the
controller that takes the lock) lives in `conveyor.deploy.rollouts`, shared with the
in-process `Rollouts`.

Threading: the controller's state changes on the event loop. Model loads run on worker
threads; their notifications are handed to the loop (`bind_loop`) and waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.config import ModelConfig
from conveyor.deploy.checks import parse_checks
from conveyor.deploy.controller import RolloutController
from conveyor.rollout_config import RolloutConfig, parse_rollout_config
from conveyor.deploy.rollout_state import UntrustedState, audit_path, load_state, read_audit, state_path
from conveyor.deploy.rollouts import (
    ACTIONS,
    STATE_SUBDIRECTORY,
    LockedController,
    add_rollout_feedback,
    apply_action,
    build_controller,
    rollout_members,
    tick_rollout,
)
from conveyor.deploy.traffic import RolloutTraffic
from conveyor.errors import ConfigError, Conflict, ConveyorError, InvalidInput, ModelNotFound
from conveyor.monitor.alerts import log_event

log = logging.getLogger(__name__)
events = logging.getLogger("conveyor.events")

__all__ = ["ACTIONS", "VERDICT_CODES", "RolloutCollector", "RolloutManager", "checked_tick_interval_s"]

DEFAULT_TICK_INTERVAL_S = 1.0
ACTION_BODY_KEYS = ("reason", "version", "full")
# The last verdict as a gauge value (HELP text of conveyor_rollout_last_verdict).
VERDICT_CODES = {"pass": 0, "inconclusive": 1, "fail": 2}
NO_VERDICT = -1
_WARNING_ACTIONS = frozenset({"rollback", "abort", "fallback"})


def checked_tick_interval_s(interval_s: Any) -> float:
    """`interval_s` as float seconds; ConfigError unless it is a finite number > 0."""
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0 < interval_s < math.inf:
        raise ConfigError(
            f"rollout tick interval: expected a finite number of seconds > 0 (--rollout-tick-interval-s, "
            f"CONVEYOR_ROLLOUT_TICK_INTERVAL_S), got {interval_s!r}"
        )
    return float(interval_s)


@dataclass
class _Served:
    controller: LockedController
    origin: str  # "config": started from config.toml's [rollout]; "api": by POST


class RolloutManager:
    """The server's rollouts: one controller per model, one RolloutTraffic, one lock.

    `runtime`: the Runtime serving the versions. `data_dir`: the server's data directory;
    state and decision logs go to `<data_dir>/rollouts`. `clock`: wall-clock seconds.
    """

    def __init__(self, runtime: Any, data_dir: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.state_directory = Path(data_dir) / STATE_SUBDIRECTORY
        self.traffic = RolloutTraffic(runtime)
        self.clock = clock
        self._lock = threading.RLock()
        self._rollouts: dict[str, _Served] = {}
        self._refused: dict[str, str] = {}  # model -> why its [rollout] table did not start
        self._loaded_once: set[str] = set()  # models loaded since the server started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._stopping: asyncio.Event | None = None

    # ---- the event loop --------------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Controller changes from other threads (model loads) run on `loop` from now on."""
        self._loop = loop

    def _on_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """Runs `function(*args)` on the bound loop and waits for it (directly when already there)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return function(*args)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(function(*args))
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result()

    def start_ticking(self, interval_s: float = DEFAULT_TICK_INTERVAL_S) -> None:
        """Ticks every active rollout each `interval_s` seconds from a task on the running loop."""
        interval_s = checked_tick_interval_s(interval_s)
        self._stopping = asyncio.Event()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_periodically(interval_s, self._stopping))

    async def _tick_periodically(self, interval_s: float, stopping: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                self.tick()
            except Exception:  # a failing tick must not end the ticking
                log.exception("rollout tick failed")

    async def close(self, timeout_s: float | None = None) -> None:
        """Stops ticking and waits for the shadow copies in flight (their pairs are recorded),
        at most `timeout_s` per rollout (None: as long as they take)."""
        if self._ticker is not None and self._stopping is not None:
            self._stopping.set()
            await self._ticker
            self._ticker = None
        await self.traffic.drain_shadows(timeout_s=timeout_s)

    # ---- events ----------------------------------------------------------------------------

    def _on_event(self, record: dict[str, Any]) -> None:
        level = logging.WARNING if record.get("action") in _WARNING_ACTIONS else logging.INFO
        log_event(events, record, level)
        webhook = self._webhook(record["model"])
        if webhook is not None:
            webhook.send(record)

    def _webhook(self, model: str) -> Any:
        """The webhook sender of the model's monitor ([monitor] webhook_url), or None."""
        for version in sorted(self.runtime.models().get(model, []), reverse=True):
            try:
                monitor = self.runtime.model(model, version).monitor
            except ModelNotFound:
                continue
            webhook = getattr(monitor, "webhook", None)
            if webhook is not None:
                return webhook
        return None

    # ---- notifications from the model manager (worker threads) -----------------------------

    def model_loaded(self, name: str, config: ModelConfig, versions: list[int]) -> None:
        """A load or reload of `name` succeeded: start, replace, end or check its rollout."""
        self._on_loop(self._loaded, name, config, sorted(versions))

    def model_load_failed(self, name: str, versions: list[int], reason: str) -> None:
        """A load of `name` failed; `versions` still serve. A rollout version gone aborts it."""
        self._on_loop(self._check_versions, name, sorted(versions), f"failed to load ({reason})")

    def model_unloaded(self, name: str) -> None:
        """`name` no longer serves: its rollout ends and its requests go straight to the runtime."""
        self._on_loop(self._unloaded, name)

    def _loaded(self, name: str, config: ModelConfig, versions: list[int]) -> None:
        table = config.rollout
        with self._lock:
            served = self._rollouts.get(name)
            if served is not None and served.controller.active:
                if table is not None and table != served.controller.config:
                    self._retire(name, "the [rollout] table of config.toml changed")
                elif table is None and served.origin == "config":
                    self._retire(name, "the [rollout] table was removed from config.toml")
                    return
                else:
                    self._check_versions(name, versions, "not loaded after a reload")
                    return
            elif served is not None and (table is None or table != served.controller.config):
                if table is None and served.origin == "api":
                    return  # a finished API rollout keeps its serving version
                self.traffic.detach(name)
                del self._rollouts[name]
            elif served is not None:
                return  # the same table, already finished: it stays finished
            first_load = name not in self._loaded_once
            self._loaded_once.add(name)
            if table is not None:
                self._restore(name, table, versions, "config", f"model {name!r} config.toml")
            elif first_load:
                self._restore_started_by_api(name, versions)

    def _restore_started_by_api(self, name: str, versions: list[int]) -> None:
        """At a model's first load: a rollout started by POST before a restart comes back from its saved table."""
        path = state_path(self.state_directory, name)
        try:
            body = load_state(path)
            if body is None:
                return
            table = parse_rollout_config(body["config"], source=str(path))
        except (UntrustedState, ConfigError, KeyError, TypeError) as exc:
            self._refused[name] = f"the saved rollout {path} cannot be restored: {exc}"
            log.error("model %s: %s; the model serves by its version policy", name, self._refused[name])
            return
        self._restore(name, table, versions, "api", str(path))

    def _restore(self, name: str, table: RolloutConfig, versions: list[int], origin: str, source: str) -> None:
        """Restores (or starts) `table` on `name`; a refusal is logged and shown by the status endpoint."""
        try:
            checks = parse_checks(table.checks, source=source)
            controller = LockedController.restore(
                name, table, checks, served_versions=versions, state_directory=self.state_directory,
                on_event=self._on_event, clock=self.clock,
            )  # fmt: skip
            controller.owner_lock = self._lock
            self._install(name, controller, origin)
            if controller.active:
                # Its counters from now on: requests before the first periodic tick count too.
                tick_rollout(self.runtime, controller, self.clock())
        except ConveyorError as exc:
            self._refused[name] = str(exc)
            log.error("model %s: its rollout (%s) was not started: %s", name, source, exc)

    def _check_versions(self, name: str, versions: list[int], reason: str) -> None:
        with self._lock:
            served = self._rollouts.get(name)
            if served is None:
                return
            for version in rollout_members(served.controller.versions):
                if version not in versions:
                    served.controller.on_version_unavailable(version, reason, now=self.clock())

    def _unloaded(self, name: str) -> None:
        with self._lock:
            served = self._rollouts.pop(name, None)
            if served is None:
                return
            if served.controller.active:
                served.controller.abort(f"model {name!r} was unloaded", now=self.clock())
            self.traffic.detach(name)

    def _retire(self, name: str, reason: str) -> None:
        served = self._rollouts.pop(name)
        if served.controller.active:
            served.controller.abort(reason, now=self.clock())
        self.traffic.detach(name)

    def _install(self, name: str, controller: LockedController, origin: str) -> None:
        previous = self._rollouts.pop(name, None)
        if previous is not None:
            self.traffic.detach(name)
        self.traffic.attach(controller)
        self._rollouts[name] = _Served(controller, origin)
        self._refused.pop(name, None)

    # ---- ticks -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Feeds every active rollout its counters and lets it judge; returns the records made.

        Call it on the event loop (the traffic layer records shadow pairs there). `now`:
        wall-clock seconds (default the clock).
        """
        now = self.clock() if now is None else float(now)
        records: list[dict[str, Any]] = []
        with self._lock:
            for name, served in list(self._rollouts.items()):
                if served.controller.active:
                    records += tick_rollout(self.runtime, served.controller, now)
        return records

    # ---- what the endpoints call (on the event loop) ----------------------------------------

    def _served(self, model: str) -> _Served:
        served = self._rollouts.get(model)
        if served is None:
            refused = self._refused.get(model)
            why = f"; its [rollout] table was refused: {refused}" if refused else ""
            raise ModelNotFound(
                f"model '{model}' has no rollout{why} (start one with POST /v2/models/{model}/rollout)"
            )
        return served

    def controller(self, model: str) -> RolloutController | None:
        """The controller of `model`'s rollout (active or finished), or None."""
        served = self._rollouts.get(model)
        return None if served is None else served.controller

    def status(self, model: str) -> dict[str, Any]:
        """GET /v2/models/{m}/rollout: the controller's status() and the model's traffic counters."""
        with self._lock:
            served = self._served(model)
            document = served.controller.status()
            document["traffic"] = self.traffic.counters().get(model, {})
            return document

    def decisions(self, model: str) -> dict[str, Any]:
        """GET /v2/models/{m}/rollout/decisions: every decision record, oldest first."""
        path = audit_path(self.state_directory, model)
        with self._lock:
            if model not in self._rollouts and not path.exists():
                self._served(model)  # raises the 404 that names what to do
            return {"decisions": read_audit(path) if path.exists() else []}

    def start(self, model: str, table: Mapping[str, Any] | None = None, *, now: float | None = None) -> dict[str, Any]:
        """Starts a rollout on `model`: `table` (the keys of a [rollout] table) or, when
        empty, the model's config.toml table. Returns the status.

        Raises Conflict when the model has an active rollout, ModelNotFound when it is
        not loaded, ConfigError naming the field for a bad table or an unserved version.
        """
        source = f"rollout of model {model!r}"
        with self._lock:
            served = self._rollouts.get(model)
            if served is not None and served.controller.active:
                running = served.controller
                raise Conflict(
                    f"model '{model}' already has an active rollout '{running.name}' ({running.strategy}, "
                    f"{running.state}): end it first with POST /v2/models/{model}/rollout/abort, "
                    "/rollback or /promote"
                )
            if not self.runtime.models().get(model):
                raise ModelNotFound(f"model '{model}' is not loaded: load it before starting a rollout")
            if table:
                config, origin = parse_rollout_config(table, source=source), "api"
            else:
                config, origin = self.runtime.config(model).rollout, "config"
                if config is None:
                    raise InvalidInput(
                        f"{source}: model '{model}' has no [rollout] table in its config.toml: send one as the "
                        "body (a JSON object with the keys of a [rollout] table)"
                    )
            controller = build_controller(
                self.runtime, model, config, source=source, now=self.clock() if now is None else float(now),
                lock=self._lock, state_directory=self.state_directory, on_event=self._on_event, clock=self.clock,
            )  # fmt: skip
            self._install(model, controller, origin)
            return self.status(model)

    def act(self, model: str, action: str, body: Mapping[str, Any] | None = None, *, now: float | None = None) -> dict[str, Any]:
        """POST /v2/models/{m}/rollout/{action}: one of ACTIONS; returns the status after it.

        `body`: optional {"reason": str, "version": int, "full": bool} ("version" and
        "full" for promote only). RolloutStateError when the state does not allow it.
        """
        if action not in ACTIONS:
            raise InvalidInput(f"rollout action '{action}' is unknown: use one of {', '.join(ACTIONS)}")
        reason, version, full = _action_arguments(model, action, body or {})
        with self._lock:
            controller = self._served(model).controller
            now = self.clock() if now is None else float(now)
            apply_action(controller, action, reason=reason, version=version, full=full, now=now)
            return self.status(model)

    def add_feedback(self, model: str, labels: Any, *, version: int | None = None) -> dict[str, Any]:
        """POST /v2/models/{m}[/versions/{v}]/feedback for a model with a rollout (active or ended).

        Each label joins at the version that answered its request id (every label counted
        once in the answer) and, while the rollout is active, the judge counts it in that
        version's arm (`add_rollout_feedback`). ModelNotFound when `model` has no rollout.
        """
        controller = self._served(model).controller
        return add_rollout_feedback(
            self.runtime, controller, labels, version=version, lock=self._lock,
            shadow_prediction=functools.partial(self.traffic.shadow_prediction, model),
        )  # fmt: skip

    def rollouts(self) -> dict[str, RolloutController]:
        """Every model's controller (active or finished), by model."""
        with self._lock:
            return {name: served.controller for name, served in self._rollouts.items()}

    def metrics_snapshot(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """(the traffic counters by model, one row per active rollout) read together for /metrics.

        A row: model, rollout, strategy, state, weights ({version: percent}), champion,
        step (canary: the index, else None) and verdict (the last look's, or None).
        """
        with self._lock:
            rows = []
            for model, served in sorted(self._rollouts.items()):
                controller = served.controller
                if not controller.active:
                    continue
                judgement = controller.last_judgement
                rows.append({
                    "model": model, "rollout": controller.name, "strategy": controller.strategy,
                    "state": controller.state, "weights": controller.weights(),
                    "champion": controller.versions.champion,
                    "step": controller.step_index if controller.strategy == "canary" else None,
                    "verdict": None if judgement is None else judgement.verdict,
                })  # fmt: skip
            return self.traffic.counters(), rows


def _action_arguments(model: str, action: str, body: Mapping[str, Any]) -> tuple[str | None, int | None, bool]:
    where = f"rollout {action} of model '{model}'"
    if not isinstance(body, Mapping):
        raise InvalidInput(f"{where}: expected a JSON object body {{\"reason\", \"version\", \"full\"}} or none")
    unknown = sorted(set(body) - set(ACTION_BODY_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {unknown} (known: {', '.join(ACTION_BODY_KEYS)})")
    reason, version, full = body.get("reason"), body.get("version"), body.get("full", False)
    if reason is not None and not isinstance(reason, str):
        raise InvalidInput(f"{where}: 'reason' must be a string, got {reason!r}")
    if version is not None and (type(version) is not int or version < 1):
        raise InvalidInput(f"{where}: 'version' must be a version number >= 1, got {version!r}")
    if type(full) is not bool:
        raise InvalidInput(f"{where}: 'full' must be true or false, got {full!r}")
    if action != "promote" and (version is not None or full):
        raise InvalidInput(f"{where}: 'version' and 'full' apply to promote only")
    return reason, version, full


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RolloutCollector(Collector):
    """The rollout families of /metrics, read from the traffic counters and controllers at scrape.

    - ``conveyor_rollout_requests_total{model,rollout,version,arm,routing}``: requests by the
      version that answered, its arm (champion, challenger, other) and routing (routed by
      the rollout, or named the version).
    - ``conveyor_rollout_fallbacks_total{model,rollout}``: routed to a version not loaded.
    - ``conveyor_rollout_shadow_requests_total{model,rollout,outcome}``: rows copied, by outcome
      (sent, dropped, failed, paired, incomparable, unrecorded); ``conveyor_rollout_shadow_in_flight``.
    - Per active rollout: ``conveyor_rollout_weight_percent{model,rollout,version,arm}``,
      ``conveyor_rollout_step{model,rollout}`` (canary step index),
      ``conveyor_rollout_last_verdict{model,rollout}`` (0 pass, 1 inconclusive, 2 fail, -1 no
      look yet), ``conveyor_rollout_active{model,rollout,strategy,state}`` (1).
    """

    def __init__(self, manager: RolloutManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        counters, rows = self._manager.metrics_snapshot()
        yield from _traffic_families(counters)
        yield from _rollout_families(rows)


def _traffic_families(counters: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "conveyor_rollout_requests", "Requests of models under a rollout, by the version that answered, its arm "
        "and how it was chosen (routed: by the rollout; named: the request named the version).",
        labels=("model", "rollout", "version", "arm", "routing"),
    )  # fmt: skip
    fallbacks = CounterMetricFamily(
        "conveyor_rollout_fallbacks", "Requests routed to a version that was not loaded, answered by the champion.",
        labels=("model", "rollout"),
    )  # fmt: skip
    shadow = CounterMetricFamily(
        "conveyor_rollout_shadow_requests", "Rows copied to the challenger: sent, dropped (no slot or its queue "
        "full), failed, paired with the champion's answer, incomparable (paired, outputs not comparable), "
        "unrecorded (paired while too many waited to be recorded).",
        labels=("model", "rollout", "outcome"),
    )  # fmt: skip
    in_flight = GaugeMetricFamily("conveyor_rollout_shadow_in_flight", "Rows copied to the challenger and not answered yet.", labels=("model", "rollout"))
    for model, entry in sorted(counters.items()):
        name = entry["rollout"]
        for row in entry["requests"]:
            requests.add_metric((model, name, str(row["version"]), row["arm"], row["routing"]), row["count"])
        fallbacks.add_metric((model, name), entry["fallbacks"])
        for outcome in ("sent", "dropped", "failed", "paired", "incomparable", "unrecorded"):
            shadow.add_metric((model, name, outcome), entry["shadow"][outcome])
        in_flight.add_metric((model, name), entry["shadow"]["in_flight"])
    yield from (requests, fallbacks, shadow, in_flight)


def _rollout_families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    active = GaugeMetricFamily(
        "conveyor_rollout_active", "1 for each active rollout, labelled by its strategy and state.",
        labels=("model", "rollout", "strategy", "state"),
    )  # fmt: skip
    weight = GaugeMetricFamily(
        "conveyor_rollout_weight_percent", "Percent of the requests the rollout routes to each of its versions.",
        labels=("model", "rollout", "version", "arm"),
    )  # fmt: skip
    step = GaugeMetricFamily("conveyor_rollout_step", "The canary step the rollout is at (0 first).", labels=("model", "rollout"))
    verdict = GaugeMetricFamily(
        "conveyor_rollout_last_verdict", "The judge's last verdict: 0 pass, 1 inconclusive, 2 fail, -1 no look yet.",
        labels=("model", "rollout"),
    )  # fmt: skip
    for row in rows:
        labels = (row["model"], row["rollout"])
        active.add_metric((*labels, row["strategy"], row["state"]), 1)
        for version, percent in sorted(row["weights"].items()):
            arm = "champion" if version == row["champion"] else "challenger"
            weight.add_metric((*labels, str(version), arm), percent)
        if row["step"] is not None:
            step.add_metric(labels, row["step"])
        verdict.add_metric(labels, NO_VERDICT if row["verdict"] is None else VERDICT_CODES.get(row["verdict"], NO_VERDICT))
    yield from (active, weight, step, verdict)
