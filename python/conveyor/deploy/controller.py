"""The rollout controller: moves one rollout through its strategy on the judge's verdicts.

Pure logic on an injected clock, no threads: the server calls `tick` from a periodic task
and the imperative methods from its endpoints, under one lock of its own.

    controller = RolloutController(model, config, versions, checks, time.time(),
                                   state_directory=data_dir, on_event=log_and_post)
    controller.router.route(key)      # the current routing; replaced (not changed) on a new weight
    controller.statistics             # the judge's evidence: the traffic layer adds shadow pairs
    controller.tick(now, runtime.model_stats(m, champion)["raw"], runtime.model_stats(m, challenger)["raw"])
    controller.promote() / pause() / resume() / abort(reason) / rollback(reason)
    controller.on_version_unavailable(version, "crashed")
    controller.status()               # GET /v2/models/{m}/rollout
    controller.active, controller.serving_version
    RolloutController.restore(model, config, checks, served_versions=[1, 2], state_directory=data_dir)

Every method takes `now=` (seconds); left out, the controller's `clock` (time.time) gives it.
Each returns its decision record, and an imperative call the state does not allow raises
`RolloutStateError` (an InvalidInput) saying what the state is and what would work.

States: ``running``, ``paused`` (by the operator, or at a canary step's manual gate),
``switched`` (blue-green after promote: the challenger answers 100% and the champion stays
loaded until the rollback window closes), and the final ``promoted``, ``rolled_back`` and
``aborted``. A final controller is inactive: traffic goes to `serving_version` alone.

Strategies:
- canary: a step advances when it has baked `duration_s`, its challenger answered at least
  `min_requests` (and at least one request: no data never advances) and the judge says
  advance; a `manual_gate` step then pauses until `promote()`; after the last step the
  challenger is promoted.
- ab: the weights never move; the judge looks and records, and a failing check rolls back.
- shadow: the champion answers; the rollout is promoted when every gating check passes
  (with no gating checks it waits for `promote()`), rolled back when one fails.
- blue_green: the challenger gets 0% (reachable by version, and shadow copies) until
  `promote()` switches it to 100%; `rollback()` (or a failing check) switches back within
  `rollback_window_s`, after which the rollout is promoted.

A failing gating check rolls back in every active state, paused included: a pause holds
the weights, never the safety net. `now` is wall-clock seconds (Unix time), so that times
saved before a restart mean the same after it.

Every decision is a record: event ("rollout"), time, model, rollout, strategy, action
(start, hold, advance, wait_at_gate, promote, switch, finish, rollback, pause, resume,
abort, restore, fallback), trigger (judge, operator, clock, version_unavailable,
restart), reason, previous_state, state, step, weights, serving_version, judgement (every
check's inputs, statistic, bounds, limit and verdict at that look, or null) and details
(a canary step's bake: elapsed time and requests against their minimums). It is appended
to ``rollout-<model>.audit.jsonl`` in the state directory and passed to `on_event`; the
state is saved after every decision (files: `conveyor.deploy.rollout_state`). Counters
fed by `tick` between two looks are saved with the next look.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conveyor.deploy.counter_feed import CounterFeed
from conveyor.deploy.evidence import ArmStatistics, RolloutStatistics
from conveyor.deploy.judge import Check, Judgement, evaluate
from conveyor.rollout_config import RolloutConfig, RolloutVersions, resolve_versions
from conveyor.deploy.rollout_state import (
    ACTIVE_STATES,
    FINAL_STATES,
    append_audit_record,
    audit_path,
    plan_restore,
    save_state,
    state_body,
    state_path,
    status_document,
)
from conveyor.deploy.router import Router, RouteTable
from conveyor.errors import InvalidInput

logger = logging.getLogger(__name__)

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "RolloutController", "RolloutStateError"]

PAUSED_BY_OPERATOR = "operator"
PAUSED_AT_GATE = "manual_gate"
EVENT_NAME = "rollout"
# An unchanged hold is recorded again only after this long: a heartbeat in the decision log.
REPEATED_HOLD_RECORD_S = 600.0

EventCallback = Callable[[dict[str, Any]], None]
BatcherStats = Mapping[str, Any]


class RolloutStateError(InvalidInput):
    """An imperative call the rollout's current state does not allow; the message says what does."""


class RolloutController:
    """One model's rollout: its state, routing, evidence, decisions and saved state.

    Public attributes (read them; change them only through the methods): `model`, `name`,
    `config`, `versions`, `checks`, `strategy`, `state`, `router`, `statistics`,
    `version_statistics` (per version: requests, errors, request and queue time since the
    start), `serving_version`, `last_judgement`. See the module docstring for the behaviour.
    """

    def __init__(
        self,
        model: str,
        config: RolloutConfig,
        versions: RolloutVersions,
        checks: Sequence[Check],
        now: float,
        state_directory: str | os.PathLike | None = None,
        on_event: EventCallback | None = None,
        *,
        champion_stats: BatcherStats | None = None,
        challenger_stats: BatcherStats | Sequence[BatcherStats | None] | None = None,
        router_seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Starts the rollout at `now`: first step (canary), weights (ab) or champion only.

        `checks` come from `parse_checks(config.checks)`. `champion_stats` and
        `challenger_stats` (Batcher.stats() dicts; a list in `versions.challengers` order
        for A/B/n) are the counters at the start; without them the first `tick` takes its
        counters as the start. `clock` gives the time when a method is called without `now`
        (wall-clock seconds). `router_seed` makes routing repeatable (tests). Overwrites a
        saved state of the same model.
        """
        self._setup(model, config, versions, checks, now, state_directory, on_event, router_seed, clock)
        self._ingest(champion_stats, challenger_stats)
        self._commit(now, "start", "operator", "none", f"{config.strategy} rollout started")

    def _setup(
        self,
        model: str,
        config: RolloutConfig,
        versions: RolloutVersions,
        checks: Sequence[Check],
        now: float,
        state_directory: str | os.PathLike | None,
        on_event: EventCallback | None,
        router_seed: int | None,
        clock: Callable[[], float],
    ) -> None:
        self.model, self.config, self.versions, self.checks = model, config, versions, tuple(checks)
        self.name, self.strategy, self.clock = config.rollout_name(model), config.strategy, clock
        self.state_directory = Path(state_directory) if state_directory is not None else None
        if self.state_directory is not None:
            state_path(self.state_directory, model)  # refuses a model name unfit for a file name
        self.on_event, self.router_seed = on_event, router_seed
        self.state, self.paused_by, self.reason = "running", None, ""
        self.serving_version = versions.champion
        self.step_index, self.step_started_at, self.step_requests_at_start = 0, now, 0
        self.started_at = self.updated_at = now
        self.next_look_at = now + config.interval_s
        self.rollback_window_ends_at: float | None = None
        self.looks, self.action_counts = 0, {}
        self.last_judgement: Judgement | None = None
        self.last_record: dict[str, Any] | None = None  # the latest decision
        # (what a hold looked like, when it was recorded): identical holds are recorded at
        # most every REPEATED_HOLD_RECORD_S, so a rollout waiting at a gate for weeks
        # does not grow its decision log (and the events log) by a line every look.
        self._recorded_hold: tuple[tuple[Any, ...], float] | None = None
        self.restore_info: dict[str, str] | None = None
        self.statistics = RolloutStatistics.for_checks(self.checks)
        # Each version's own counters and latency histograms since the rollout started (the
        # judge's challenger arm pools the challengers): what the status shows per version.
        self.version_statistics = {version: ArmStatistics() for version in (versions.champion, *versions.challengers)}
        self._counters = CounterFeed()
        self._table: RouteTable | None = None
        # Told of every new table (RolloutTraffic routes the model's graph steps by it).
        self.routing_listeners: list[Callable[[RouteTable], None]] = []
        self._apply_routing()

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else float(now)

    # ---- what the traffic layer reads ------------------------------------------------------

    @property
    def active(self) -> bool:
        """False once promoted, rolled back or aborted: traffic then goes to `serving_version`."""
        return self.state in ACTIVE_STATES

    @property
    def challenger(self) -> int:
        """The (first) challenger's version."""
        return self.versions.challengers[0]

    def weights(self) -> dict[int, float]:
        """Each version's percent of the requests the router places (0 for a version it skips)."""
        weights = {version: 0.0 for version in (self.versions.champion, *self.versions.challengers)}
        weights.update(self._route_table().arms)
        return weights

    def _route_table(self) -> RouteTable:
        config, versions = self.config, self.versions
        salt, sticky = config.sticky_salt(self.model), config.sticky.enabled
        if not self.active:
            return RouteTable.weighted([(self.serving_version, 100.0)], salt=salt, sticky=sticky)
        if self.strategy == "ab":
            return RouteTable.weighted([(arm.version, arm.weight) for arm in config.arms], salt=salt, sticky=sticky)
        if self.strategy == "canary":
            weight = config.steps[self.step_index].weight
            return RouteTable.canary(versions.champion, self.challenger, weight, salt=salt, sticky=sticky)
        if self.state == "switched":
            return RouteTable.canary(versions.champion, self.challenger, 100.0, salt=salt, sticky=sticky)
        return RouteTable.shadow(versions.champion, self.challenger, config.shadow_percent or 0.0, salt=salt, sticky=sticky)

    def _apply_routing(self) -> None:
        """Assigns a new Router when the table changed (the assignment is the atomic swap)."""
        table = self._route_table()
        if table != self._table:
            self.router = Router(table, seed=self.router_seed)
            self._table = table
            for listener in self.routing_listeners:
                try:
                    listener(table)
                except Exception:  # routing the graphs beneath must never stop the rollout itself
                    logger.exception("rollout %s: a routing listener failed on the new table", self.name)

    # ---- evidence and looks ----------------------------------------------------------------

    def _ingest(self, champion_stats: BatcherStats | None, challenger_stats: Any) -> None:
        if champion_stats is not None:
            champion = self.versions.champion
            self._counters.add(champion, champion_stats, self.statistics.champion, self.version_statistics[champion])
        if challenger_stats is None:
            return
        per_challenger = [challenger_stats] if isinstance(challenger_stats, Mapping) else list(challenger_stats)
        if len(per_challenger) != len(self.versions.challengers):
            raise InvalidInput(
                f"rollout {self.name!r}: expected counters for {len(self.versions.challengers)} challenger(s) "
                f"{list(self.versions.challengers)} in that order, got {len(per_challenger)}"
            )
        for version, stats in zip(self.versions.challengers, per_challenger):
            if stats is not None:
                self._counters.add(version, stats, self.statistics.challenger, self.version_statistics[version])

    def tick(
        self,
        now: float | None = None,
        champion_stats: BatcherStats | None = None,
        challenger_stats: BatcherStats | Sequence[BatcherStats | None] | None = None,
    ) -> dict[str, Any] | None:
        """Adds the versions' counters, and when `interval_s` has passed, judges and acts.

        `champion_stats`/`challenger_stats` are `Batcher.stats()` dicts (cumulative; None
        when not read this time); for A/B/n, `challenger_stats` is a list in
        `versions.challengers` order. Returns the decision record when the judge looked or
        the blue-green window closed, else None; None too for a hold identical to the
        last hold recorded (same state, step and verdicts) less than
        REPEATED_HOLD_RECORD_S before, which is counted but neither logged nor handed
        on. An inactive controller does nothing.
        """
        if not self.active:
            return None
        now = self._now(now)
        self._ingest(champion_stats, challenger_stats)
        if self.state == "switched" and self.rollback_window_ends_at is not None and now >= self.rollback_window_ends_at:
            self._end("promoted", self.challenger, "the rollback window closed")
            return self._commit(now, "finish", "clock", "switched", self.reason)
        if now < self.next_look_at:
            return None
        self.next_look_at = now + self.config.interval_s
        judgement = evaluate(self.checks, self.statistics, now)
        self.last_judgement = judgement
        self.looks += 1
        previous_state = self.state
        if judgement.action == "rollback":
            self._end("rolled_back", self.versions.champion, f"the judge rolled back: {judgement.reason}")
            return self._commit(now, "rollback", "judge", previous_state, self.reason, judgement)
        action, reason, details = self._act_on_pass_or_hold(judgement, now)
        return self._commit(now, action, "judge", previous_state, reason, judgement, details)

    def _act_on_pass_or_hold(self, judgement: Judgement, now: float) -> tuple[str, str, dict[str, Any]]:
        """The action for a look that did not roll back: (action, reason, details)."""
        if self.state == "paused":
            return "hold", f"{self._pause_text()}; judge: {judgement.reason}", {}
        if self.state == "switched":
            return "hold", f"switched: rollback() switches back until {self.rollback_window_ends_at:g}", {}
        if self.strategy == "canary":
            return self._canary_look(judgement, now)
        if self.strategy == "shadow":
            gating = any(not check.report_only for check in self.checks)
            if judgement.action == "advance" and gating:
                self._end("promoted", self.challenger, f"every gating check passed: {judgement.reason}")
                return "promote", self.reason, {}
            waiting = judgement.reason if gating else "no gating checks: promote() or rollback() ends the shadow"
            return "hold", waiting, {}
        if self.strategy == "ab":
            return "hold", f"A/B keeps its weights until promote() or abort(); judge: {judgement.reason}", {}
        return "hold", f"blue-green preview: promote() switches to the challenger; judge: {judgement.reason}", {}

    def _canary_look(self, judgement: Judgement, now: float) -> tuple[str, str, dict[str, Any]]:
        step = self.config.steps[self.step_index]
        elapsed_s = now - self.step_started_at
        step_requests = self.statistics.challenger.requests - self.step_requests_at_start
        needed_requests = max(step.min_requests, 1)  # no data never advances
        bake = {
            "step_elapsed_s": elapsed_s, "duration_s": step.duration_s,
            "step_requests": step_requests, "min_requests": needed_requests,
        }  # fmt: skip
        if judgement.action != "advance":
            return "hold", judgement.reason, bake
        if elapsed_s < step.duration_s:
            return "hold", f"step {self.step_index} bakes: {elapsed_s:g} of {step.duration_s:g} s", bake
        if step_requests < needed_requests:
            text = f"step {self.step_index}: the challenger answered {step_requests} requests, needs {needed_requests}"
            return "hold", text, bake
        if step.manual_gate:
            self.state, self.paused_by = "paused", PAUSED_AT_GATE
            return "wait_at_gate", f"step {self.step_index} passed; {self._pause_text()}", bake
        passed = self.step_index
        action = self._advance(now)
        return action, self.reason if action == "promote" else f"step {passed} passed", bake

    def _advance(self, now: float) -> str:
        """Moves to the next canary step, or promotes after the last; returns the action."""
        self.state, self.paused_by = "running", None
        if self.step_index + 1 >= len(self.config.steps):
            self._end("promoted", self.challenger, f"the last step ({self.step_index}) passed")
            return "promote"
        self.step_index += 1
        self.step_started_at = now
        self.step_requests_at_start = self.statistics.challenger.requests
        self.reason = ""
        self._apply_routing()
        return "advance"

    def _end(self, state: str, serving_version: int, reason: str) -> None:
        # The version first: a reader on another thread that sees the state final reads it next.
        self.serving_version = serving_version
        self.state, self.paused_by = state, None
        self.reason = reason
        self._apply_routing()

    def _pause_text(self) -> str:
        if self.paused_by == PAUSED_AT_GATE:
            return f"waiting at the manual gate of step {self.step_index}: promote() passes it, abort() ends the rollout"
        return "paused by the operator: resume() continues, promote() or abort() ends the rollout"

    # ---- imperative ------------------------------------------------------------------------

    def _require_active(self, verb: str) -> None:
        if not self.active:
            raise RolloutStateError(
                f"rollout {self.name!r} of model {self.model!r} cannot {verb}: it has ended ({self.state}"
                f"{': ' + self.reason if self.reason else ''}); start a new rollout to change the serving version"
            )

    def promote(self, *, version: int | None = None, full: bool = False, now: float | None = None) -> dict[str, Any]:
        """Moves the rollout forward by operator decision and returns the record.

        canary: at a manual gate, passes it (`full=True`: promotes at once); elsewhere
        promotes the challenger at once. ab: ends with `version` (needed when there are
        several challengers) answering everything. shadow: promotes the challenger.
        blue_green: switches to the challenger and opens the rollback window.
        """
        self._require_active("be promoted")
        now, previous_state = self._now(now), self.state
        if self.state == "switched":
            raise RolloutStateError(
                f"rollout {self.name!r} has already switched to version {self.challenger}: it is promoted when the "
                f"rollback window closes at {self.rollback_window_ends_at:g}; rollback() switches back before that"
            )
        if version is not None and self.strategy != "ab":
            raise RolloutStateError(f"rollout {self.name!r}: promote(version=...) is for A/B/n rollouts; {self.strategy} promotes its challenger")
        if self.strategy == "canary" and self.paused_by == PAUSED_AT_GATE and not full:
            gate = self.step_index
            action = self._advance(now)
            return self._commit(now, action, "operator", previous_state, f"the operator passed the manual gate of step {gate}")
        if self.strategy == "ab":
            chosen = self._promoted_arm(version)
            self._end("promoted", chosen, f"the operator promoted version {chosen}")
            return self._commit(now, "promote", "operator", previous_state, self.reason)
        if self.strategy == "blue_green":
            window_s = float(self.config.rollback_window_s or 0.0)
            if window_s <= 0.0:
                self._end("promoted", self.challenger, "the operator switched to the challenger (no rollback window)")
                return self._commit(now, "promote", "operator", previous_state, self.reason)
            self.state, self.paused_by = "switched", None
            self.serving_version = self.challenger
            self.rollback_window_ends_at = now + window_s
            self.reason = f"switched to version {self.challenger}; champion {self.versions.champion} kept loaded for {window_s:g} s"
            self._apply_routing()
            return self._commit(now, "switch", "operator", previous_state, self.reason)
        self._end("promoted", self.challenger, "the operator promoted the challenger")
        return self._commit(now, "promote", "operator", previous_state, self.reason)

    def _promoted_arm(self, version: int | None) -> int:
        arms = [arm.version for arm in self.config.arms]
        if version is None:
            if len(self.versions.challengers) != 1:
                raise RolloutStateError(f"rollout {self.name!r}: say which arm to promote: promote(version=...) with one of {arms}")
            return self.challenger
        if version not in arms:
            raise RolloutStateError(f"rollout {self.name!r}: version {version} is not one of its arms {arms}")
        return version

    def pause(self, *, now: float | None = None) -> dict[str, Any]:
        """Holds the current weights (checks still run, and a failing one still rolls back)."""
        self._require_active("be paused")
        if self.state == "paused":
            raise RolloutStateError(f"rollout {self.name!r} is already paused ({self._pause_text()})")
        if self.state == "switched":
            raise RolloutStateError(
                f"rollout {self.name!r} has switched to version {self.challenger}: there is nothing to pause; "
                "rollback() switches back, or wait for the rollback window to close"
            )
        self.state, self.paused_by = "paused", PAUSED_BY_OPERATOR
        return self._commit(self._now(now), "pause", "operator", "running", "paused by the operator")

    def resume(self, *, now: float | None = None) -> dict[str, Any]:
        """Continues a rollout the operator paused."""
        self._require_active("be resumed")
        if self.state != "paused":
            raise RolloutStateError(f"rollout {self.name!r} cannot be resumed: it is {self.state}, not paused")
        if self.paused_by == PAUSED_AT_GATE:
            raise RolloutStateError(f"rollout {self.name!r} is not paused by the operator but {self._pause_text()}")
        self.state, self.paused_by = "running", None
        return self._commit(self._now(now), "resume", "operator", "paused", "resumed by the operator")

    def abort(self, reason: str, *, now: float | None = None) -> dict[str, Any]:
        """Stops the rollout: the champion answers everything. `reason` goes into the record."""
        self._require_active("be aborted")
        now, previous_state = self._now(now), self.state
        self._end("aborted", self.versions.champion, f"aborted: {reason or 'by the operator'}")
        return self._commit(now, "abort", "operator", previous_state, self.reason)

    def rollback(self, reason: str = "by the operator", *, now: float | None = None) -> dict[str, Any]:
        """Returns everything to the champion (in blue-green's window: switches back)."""
        self._require_active("be rolled back")
        now, previous_state = self._now(now), self.state
        self._end("rolled_back", self.versions.champion, f"rolled back: {reason}")
        return self._commit(now, "rollback", "operator", previous_state, self.reason)

    def on_version_unavailable(self, version: int, reason: str = "unavailable", *, now: float | None = None) -> dict[str, Any] | None:
        """A version of the rollout failed to load, crashed or was unloaded: abort to the other one.

        The remaining version (the champion, or when the champion is gone the first
        challenger) answers everything. In blue-green's window, losing the champion only
        ends the window (promoted). Returns the record; None when the controller is
        inactive or `version` is not part of it.
        """
        members = (self.versions.champion, *self.versions.challengers)
        if not self.active or version not in members:
            return None
        now, previous_state = self._now(now), self.state
        text = f"version {version} is {reason}"
        if self.state == "switched" and version == self.versions.champion:
            self._end("promoted", self.challenger, f"{text}: the rollback window ends early")
            return self._commit(now, "finish", "version_unavailable", previous_state, self.reason)
        remaining = [member for member in members if member != version]
        serving = self.versions.champion if version != self.versions.champion else remaining[0]
        self._end("aborted", serving, f"{text}: version {serving} answers everything")
        return self._commit(now, "abort", "version_unavailable", previous_state, self.reason)

    # ---- records, state, status ------------------------------------------------------------

    def _commit(
        self,
        now: float,
        action: str,
        trigger: str,
        previous_state: str,
        reason: str,
        judgement: Judgement | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Records one decision: appended to the decision log, state saved, event handed on."""
        self.updated_at = now
        self.action_counts[action] = self.action_counts.get(action, 0) + 1
        record = {
            "event": EVENT_NAME, "time": now, "model": self.model, "rollout": self.name,
            "strategy": self.strategy, "action": action, "trigger": trigger, "reason": reason,
            "previous_state": previous_state, "state": self.state,
            "step": self.step_index if self.strategy == "canary" else None,
            "weights": {str(v): w for v, w in sorted(self.weights().items())},
            "serving_version": self.serving_version,
            "judgement": judgement.to_dict() if judgement is not None else None,
            "details": details or {},
        }  # fmt: skip
        if self._repeats_recorded_hold(record, now):
            if self.state_directory is not None:  # the evidence moved on: the saved state follows
                save_state(state_path(self.state_directory, self.model), state_body(self))
            return None
        self.last_record = record
        if self.state_directory is not None:
            append_audit_record(audit_path(self.state_directory, self.model), record)
            save_state(state_path(self.state_directory, self.model), state_body(self))
        if self.on_event is not None:
            try:
                self.on_event(record)
            except Exception:  # the sink's failure must not undo or block the decision
                logger.exception("rollout %s: the event callback failed on a %s record", self.name, action)
        return record

    def _repeats_recorded_hold(self, record: dict[str, Any], now: float) -> bool:
        """True for a hold like the last one recorded (same state, step and verdicts) within
        REPEATED_HOLD_RECORD_S of it: counted, but neither logged nor handed on."""
        if record["action"] != "hold":
            self._recorded_hold = None
            return False
        decisions = (record["judgement"] or {}).get("decisions", [])
        signature = (record["state"], record["step"], tuple((d["check"], d["verdict"]) for d in decisions))
        if self._recorded_hold is not None:
            last_signature, recorded_at = self._recorded_hold
            if signature == last_signature and now - recorded_at < REPEATED_HOLD_RECORD_S:
                return True
        self._recorded_hold = (signature, now)
        return False

    def status(self) -> dict[str, Any]:
        """The rollout's state as plain JSON types: what GET /v2/models/{m}/rollout returns.

        Keys: model, rollout (its name), strategy, state, active, paused_by, reason,
        champion, challengers, serving_version, step (canary: index, count, weight,
        started_at, duration_s, min_requests, manual_gate, challenger_requests; else null),
        weights ({"version": percent}), shadow ({version, percent} or null), started_at,
        updated_at, next_look_at, rollback_window_ends_at, last_judgement (every check's
        decision and statistic, or null), counts (looks, actions, requests and errors per
        side, pairs), restore ({outcome, reason} after a restart, else null) and
        per_version ({"version": {requests, errors, request_time, queue_time, labelled,
        accuracy, regression_labels, mae}}: each version's answered requests, errors and
        histograms of request and queue time in seconds since the rollout started, as
        `evidence.Histogram.to_dict` writes them, fed from its batcher counters at every
        tick; and its realized accuracy or MAE over the delayed labels joined since the
        start, null before any).
        """
        return status_document(self)

    # ---- restart ---------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        model: str,
        config: RolloutConfig,
        checks: Sequence[Check],
        *,
        served_versions: Iterable[int],
        state_directory: str | os.PathLike,
        now: float | None = None,
        on_event: EventCallback | None = None,
        router_seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> RolloutController:
        """The rollout of `model` after a restart; always a controller, never None.

        - No saved state: a new rollout starts now (resolve_versions may raise ConfigError).
        - Saved, intact, started under this same [rollout] table and checks, every version
          it names served: resumed as saved (step, weights, times, statistics). A final
          one stays final.
        - A final saved rollout under another table: the new table starts a new rollout.
        - Otherwise (torn or altered file, a version no longer served, the table changed
          while it ran): a controller in state "aborted" with the champion answering
          everything. A file that cannot be trusted is kept beside as
          ``rollout-<model>.json.untrusted-<time>``.
        `status()["restore"]` holds the outcome ("started", "resumed" or "fallback") and
        the reason. Raises ConfigError only when a fallback finds no served version
        besides the challenger.
        """
        served, now = sorted(set(served_versions)), clock() if now is None else now
        plan = plan_restore(model, config, checks, served_versions=served, now=now, state_directory=state_directory)
        versions = plan.versions or resolve_versions(config, served, source=f"rollout of model {model!r}")
        controller = cls.__new__(cls)
        controller._setup(model, config, versions, checks, now, state_directory, on_event, router_seed, clock)
        if plan.fields is not None:
            vars(controller).update(plan.fields)
            for version in (controller.versions.champion, *controller.versions.challengers):
                controller.version_statistics.setdefault(version, ArmStatistics())  # a file from before they were saved
            controller._apply_routing()
        controller.restore_info = {"outcome": plan.outcome, "reason": plan.reason}
        if plan.outcome == "fallback":
            controller._end("aborted", versions.champion, f"champion only after a restart: {plan.reason}")
        action = {"started": "start", "resumed": "restore", "fallback": "fallback"}[plan.outcome]
        reason = controller.reason if plan.outcome == "fallback" else plan.reason
        controller._commit(now, action, "restart", plan.previous_state, reason)
        return controller
