"""A rollout's files in the state directory: its saved state and its decision log.

- ``rollout-<model>.json``: the controller's state (strategy, step, weights, times, the
  judge's statistics), rewritten after every change. Written to ``rollout-<model>.json.tmp``,
  fsynced, renamed over the old file and the directory fsynced: after a crash, SIGKILL
  included, the file is the old state or the new one, whole. A stale ``.tmp`` left by a
  crash is ignored (and overwritten by the next save).
- ``rollout-<model>.audit.jsonl``: one JSON object per line, one line per decision,
  appended with a single write on a descriptor opened with O_APPEND and fsynced. A crash in
  the middle of a write can leave a torn line; the next append ends it first, and
  `read_audit` skips it.

The state document is ``{"format": STATE_FORMAT, "format_version": 1, "checksum": "<sha256
of the canonical body>", "body": {...}}``; `load_state` refuses a file that does not parse,
has another format or version, or whose body does not match its checksum, with
`UntrustedState` naming the file and what is wrong. What the body holds is the
controller's business: `state_body` writes it and `saved_fields` reads it back;
`status_document` is the same state as the rollout endpoint shows it.

After a restart, `plan_restore` reads the saved state against the configuration and the
served versions and says whether the rollout resumes, starts, or falls back to its
champion alone, and why (`RestorePlan`); the controller acts on the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.config import MODEL_NAME_PATTERN
from conveyor.deploy.evidence import ArmStatistics, RolloutStatistics
from conveyor.deploy.judge import CheckDecision, Judgement
from conveyor.durable_files import fsync_directory, write_all
from conveyor.errors import ConfigError
from conveyor.rollout_config import RolloutConfig, RolloutVersions

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "RestorePlan",
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "UntrustedState",
    "append_audit_record",
    "audit_path",
    "config_fingerprint",
    "load_state",
    "plan_restore",
    "read_audit",
    "save_state",
    "saved_fields",
    "state_body",
    "state_path",
    "status_document",
]

ACTIVE_STATES = ("running", "paused", "switched")
FINAL_STATES = ("promoted", "rolled_back", "aborted")
STATE_FORMAT = "conveyor.rollout-state"
STATE_FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"


class UntrustedState(ValueError):
    """A saved state that cannot be trusted: unreadable, torn, altered or of another format."""


def _checked_model(model: str) -> str:
    # The model name becomes part of a file name: only names a repository accepts.
    if not isinstance(model, str) or re.fullmatch(MODEL_NAME_PATTERN, model) is None:
        raise ConfigError(f"rollout state: expected a model name matching {MODEL_NAME_PATTERN}, got {model!r}")
    return model


def state_path(directory: str | os.PathLike, model: str) -> Path:
    """Where the state of `model`'s rollout is saved."""
    return Path(directory) / f"rollout-{_checked_model(model)}.json"


def audit_path(directory: str | os.PathLike, model: str) -> Path:
    """Where the decisions of `model`'s rollouts are appended, one JSON line each."""
    return Path(directory) / f"rollout-{_checked_model(model)}.audit.jsonl"


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys and no NaN or infinity: the form checksums are taken of."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_fields(check: Any) -> dict[str, Any]:
    """A check's fields, without the output_drift settings other metrics leave unset: the
    fingerprints of checks saved before those settings existed stay the same."""
    fields = dataclasses.asdict(check)
    for key in ("statistic", "bins", "reference_size"):
        if fields.get(key, 0) is None:
            del fields[key]
    return fields


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(config: RolloutConfig, checks: Iterable[Any]) -> str:
    """A digest of the [rollout] table and its parsed checks: equal exactly when both are.

    A saved rollout resumes only under the configuration it was started with.
    """
    described = {
        "config": config.model_dump(mode="json"),
        "checks": [_check_fields(check) for check in checks],
    }
    return _sha256(canonical_json(described))


def save_state(path: Path, body: Mapping[str, Any]) -> None:
    """Replaces the state at `path` with `body`, crash-safely (tmp, fsync, rename, fsync dir).

    Raises OSError naming the file when it cannot be written; the old state is then intact.
    """
    document = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "checksum": _sha256(canonical_json(body)),
        "body": body,
    }
    data = (json.dumps(document, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()
    temporary = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot save the rollout state {path}: {reason}") from exc


def load_state(path: Path) -> dict[str, Any] | None:
    """The body saved at `path`; None when there is no file (a stale .tmp beside it is ignored).

    Raises UntrustedState naming the file and the problem when the file cannot be trusted.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UntrustedState(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UntrustedState(f"{path}: not valid JSON (truncated or corrupt: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise UntrustedState(f"{path}: not a rollout state (expected format {STATE_FORMAT!r})")
    if document.get("format_version") != STATE_FORMAT_VERSION:
        raise UntrustedState(
            f"{path}: format version {document.get('format_version')!r}, expected {STATE_FORMAT_VERSION}"
        )
    body = document.get("body")
    if not isinstance(body, dict):
        raise UntrustedState(f"{path}: expected a 'body' object")
    if _sha256(canonical_json(body)) != document.get("checksum"):
        raise UntrustedState(f"{path}: the body does not match its checksum (altered or corrupt)")
    return body


# The controller's attributes saved as they are; `state_body` adds the rest.
SAVED_ATTRIBUTES = (
    "state", "paused_by", "reason", "serving_version", "step_index", "step_started_at",
    "step_requests_at_start", "started_at", "updated_at", "next_look_at", "rollback_window_ends_at",
    "looks", "action_counts",
)  # fmt: skip


def state_body(controller: Any) -> dict[str, Any]:
    """What is saved of a RolloutController: identity, configuration, position, evidence.

    Besides SAVED_ATTRIBUTES: model, name, strategy, the config's fingerprint and the config
    itself (for a reader), the versions, the last judgement, the statistics (`to_dict`),
    how the controller came back after its last restart (`restore`) and each version's own
    counters and latency histograms (`version_statistics`; absent from older files).
    """
    judgement = controller.last_judgement
    return {
        "model": controller.model, "name": controller.name, "strategy": controller.strategy,
        "fingerprint": config_fingerprint(controller.config, controller.checks),
        "config": controller.config.model_dump(mode="json"),
        "versions": {"champion": controller.versions.champion, "challengers": list(controller.versions.challengers)},
        **{name: getattr(controller, name) for name in SAVED_ATTRIBUTES},
        "last_judgement": judgement.to_dict() if judgement is not None else None,
        "statistics": controller.statistics.to_dict(), "restore": controller.restore_info,
        "version_statistics": {str(v): arm.to_dict() for v, arm in sorted(controller.version_statistics.items())},
    }  # fmt: skip


def status_document(controller: Any) -> dict[str, Any]:
    """A RolloutController's state in plain JSON types (see `RolloutController.status`)."""
    statistics, versions, config = controller.statistics, controller.versions, controller.config
    step = None
    if controller.strategy == "canary":
        current = config.steps[controller.step_index]
        step = {
            "index": controller.step_index, "count": len(config.steps), "weight": current.weight,
            "started_at": controller.step_started_at, "duration_s": current.duration_s,
            "min_requests": current.min_requests, "manual_gate": current.manual_gate,
            "challenger_requests": statistics.challenger.requests - controller.step_requests_at_start,
        }  # fmt: skip
    table = controller.router.table
    shadow = {"version": table.shadow_version, "percent": table.shadow_percent} if table.shadow_version else None
    judgement = controller.last_judgement
    champion, challenger, paired = statistics.champion, statistics.challenger, statistics.paired
    return {
        "model": controller.model, "rollout": controller.name, "strategy": controller.strategy,
        "state": controller.state, "active": controller.active, "paused_by": controller.paused_by,
        "reason": controller.reason, "champion": versions.champion, "challengers": list(versions.challengers),
        "serving_version": controller.serving_version, "step": step,
        "weights": {str(version): percent for version, percent in sorted(controller.weights().items())},
        "shadow": shadow, "started_at": controller.started_at, "updated_at": controller.updated_at,
        "next_look_at": controller.next_look_at, "rollback_window_ends_at": controller.rollback_window_ends_at,
        "last_judgement": judgement.to_dict() if judgement is not None else None,
        "counts": {
            "looks": controller.looks, "actions": dict(controller.action_counts),
            "champion_requests": champion.requests, "champion_errors": champion.errors,
            "challenger_requests": challenger.requests, "challenger_errors": challenger.errors,
            "pairs": {"latency": paired.latency_log_ratio.count, "classes": paired.compared_classes,
                      "outputs": paired.output_difference.count, "labelled": paired.labelled_pairs},
        },
        "restore": controller.restore_info,
        "per_version": {str(v): _version_document(arm) for v, arm in sorted(controller.version_statistics.items())},
    }  # fmt: skip


def _version_document(arm: ArmStatistics) -> dict[str, Any]:
    """One version's entry of the status's per_version: counters, latency histograms and
    the realized quality of its delayed labels (null before any)."""
    errors = arm.absolute_error
    return {
        "requests": arm.requests, "errors": arm.errors,
        "request_time": arm.request_time.to_dict(), "queue_time": arm.queue_time.to_dict(),
        "labelled": arm.labelled, "accuracy": arm.correct / arm.labelled if arm.labelled else None,
        "regression_labels": errors.count, "mae": errors.mean if errors.count else None,
    }  # fmt: skip


def saved_fields(body: Mapping[str, Any], config: RolloutConfig) -> dict[str, Any]:
    """The controller attributes a saved body gives back, typed and checked.

    Raises KeyError, TypeError or ValueError for a field that is missing or malformed.
    """
    state = str(body["state"])
    if state not in ACTIVE_STATES + FINAL_STATES:
        raise ValueError(f"unknown state {state!r}")
    step_index = int(body["step_index"])
    if config.strategy == "canary" and not 0 <= step_index < len(config.steps):
        raise ValueError(f"step_index {step_index} outside the {len(config.steps)} steps")
    window = body["rollback_window_ends_at"]
    judgement = body["last_judgement"]
    if judgement is not None:
        decisions = [CheckDecision(**decision) for decision in judgement["decisions"]]
        judgement = Judgement(**{**judgement, "decisions": decisions})
    paused_by = body["paused_by"]
    return {
        "state": state, "paused_by": str(paused_by) if paused_by is not None else None,
        "reason": str(body["reason"]), "serving_version": int(body["serving_version"]), "step_index": step_index,
        "step_started_at": float(body["step_started_at"]), "step_requests_at_start": int(body["step_requests_at_start"]),
        "started_at": float(body["started_at"]), "updated_at": float(body["updated_at"]),
        "next_look_at": float(body["next_look_at"]),
        "rollback_window_ends_at": float(window) if window is not None else None, "looks": int(body["looks"]),
        "action_counts": {str(action): int(n) for action, n in body["action_counts"].items()},
        "last_judgement": judgement, "statistics": RolloutStatistics.from_dict(body["statistics"]),
        "version_statistics": {int(v): ArmStatistics.from_dict(arm) for v, arm in body.get("version_statistics", {}).items()},
    }  # fmt: skip


def append_audit_record(path: Path, record: Mapping[str, Any]) -> None:
    """Appends `record` as one JSON line (one write, O_APPEND) and fsyncs it.

    A line torn by a crash is ended first, so the new record starts a line of its own.
    Raises OSError naming the file when it cannot be written.
    """
    line = (canonical_json(record) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(descriptor).st_size
            if size and os.pread(descriptor, 1, size - 1) != b"\n":
                line = b"\n" + line
            write_all(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if not existed:
            fsync_directory(path.parent)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot append to the rollout decision log {path}: {reason}") from exc


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a decision log, in order (none when there is no log).

    A line that does not parse is what a crash left in the middle of a write (the log is
    written only by `append_audit_record`): it is skipped.
    """
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            if line:
                records.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return records


# ---- after a restart ---------------------------------------------------------------------

RESTORE_OUTCOMES = ("started", "resumed", "fallback")


@dataclass(frozen=True)
class RestorePlan:
    """What a restart does with a model's saved rollout (see `plan_restore`)."""

    outcome: str  # "started" (nothing saved, or a finished rollout under another table), "resumed", "fallback"
    reason: str
    versions: RolloutVersions | None  # resumed: the saved ones; fallback: the champion to serve; started: None
    fields: dict[str, Any] | None = None  # resumed: the controller attributes saved (see `saved_fields`)
    previous_state: str = "none"  # the saved state's state, or "unknown" when unreadable


def _saved_versions(body: Mapping[str, Any]) -> RolloutVersions:
    versions = body["versions"]
    return RolloutVersions(champion=int(versions["champion"]), challengers=tuple(int(v) for v in versions["challengers"]))


def _fallback(
    config: RolloutConfig, served: list[int], saved: RolloutVersions | None, reason: str, previous_state: str, model: str
) -> RestorePlan:
    """Champion only: the saved champion, else the configured one, else the highest other served version."""
    if config.strategy == "ab":
        configured_champion, challengers = config.arms[0].version, tuple(arm.version for arm in config.arms[1:])
    else:
        configured_champion, challengers = config.champion, tuple(v for v in (config.challenger,) if v is not None)
    if saved is not None:
        challengers = saved.challengers
    candidates = [saved.champion if saved else None, configured_champion]
    candidates += [version for version in reversed(served) if version not in challengers]
    champion = next((version for version in candidates if version is not None and version in served), None)
    if champion is None:
        listing = ", ".join(map(str, served)) or "none"
        raise ConfigError(
            f"rollout of model {model!r}: {reason}; and no served version besides the challenger "
            f"{list(challengers)} can take the traffic (served: {listing}): load the champion"
        )
    others = tuple(version for version in challengers if version != champion)
    return RestorePlan("fallback", reason, RolloutVersions(champion, others), previous_state=previous_state)


def _set_aside(path: Path, now: float) -> str:
    """Keeps an untrusted state file beside, for diagnosis; returns what became of it."""
    kept = path.with_name(f"{path.name}.untrusted-{int(now)}")
    try:
        os.replace(path, kept)
    except OSError as exc:
        return f"it could not be kept aside ({exc.strerror or exc})"
    return f"kept as {kept.name}"


def plan_restore(
    model: str,
    config: RolloutConfig,
    checks: Sequence[Any],
    *,
    served_versions: Iterable[int],
    now: float,
    state_directory: str | os.PathLike,
) -> RestorePlan:
    """Decides, from the saved state and what is served now, how a rollout comes back.

    Resumed only when the file is intact, was written for this model under this same
    [rollout] table and checks, and every version it names (for a finished rollout, the
    version it serves) is served; see `RolloutController.restore` for the other cases.
    Raises ConfigError when a fallback is needed and no version besides the challenger is
    served.
    """
    served = sorted({int(version) for version in served_versions})
    path = state_path(state_directory, model)
    try:
        body = load_state(path)
    except UntrustedState as problem:
        return _fallback(config, served, None, f"{problem}; {_set_aside(path, now)}", "unknown", model)
    if body is None:
        return RestorePlan("started", f"no saved state at {path}: the rollout starts now", None)
    try:
        saved = _saved_versions(body)
        saved_state = str(body["state"])
        same_table = body["fingerprint"] == config_fingerprint(config, checks) and body["model"] == model
        serving = int(body["serving_version"])
    except (KeyError, TypeError, ValueError) as exc:
        return _fallback(config, served, None, f"{path}: a saved field is missing or malformed ({exc!r})", "unknown", model)
    if not same_table:
        if saved_state in FINAL_STATES:
            return RestorePlan("started", f"the saved rollout had ended ({saved_state}) under another [rollout] table: this one starts now", None)
        reason = f"the [rollout] table or its checks changed while the rollout was {saved_state} ({path})"
        return _fallback(config, served, saved, reason, saved_state, model)
    needed = [serving] if saved_state in FINAL_STATES else [saved.champion, *saved.challengers]
    missing = [version for version in needed if version not in served]
    if missing:
        listing = ", ".join(map(str, served)) or "none"
        reason = f"version(s) {missing} of the saved rollout are no longer served (served: {listing})"
        return _fallback(config, served, saved, reason, saved_state, model)
    try:
        fields = saved_fields(body, config)
    except (KeyError, TypeError, ValueError) as exc:
        return _fallback(config, served, saved, f"{path}: a saved field is missing or malformed ({exc!r})", saved_state, model)
    return RestorePlan("resumed", f"resumed from {path}", saved, fields, saved_state)
