"""The `[rollout]` table of config.toml: how a new version of a model is rolled out.

A rollout runs between served versions of one model. Four strategies:

- ``canary``: the challenger answers a growing share of requests, step by step; each step
  bakes (a duration and a minimum number of challenger requests) and may stop at a manual
  gate until promoted.
- ``ab``: fixed weights over two or more versions (A/B/n), held until the rollout is stopped.
- ``shadow``: the champion answers every request; a sampled share is copied to the
  challenger off the request path, through a bounded queue.
- ``blue_green``: the challenger is reachable only by naming its version (preview), may
  receive shadow copies for its checks, then takes 100% at once; the champion stays
  loaded for a rollback window.

Interfaces:

- `RolloutConfig` is the validated table; `ModelConfig.rollout` holds one (or None).
  `parse_rollout_config(data, source=...)` validates a table given alone (an API body, a
  CLI argument) with the same messages as config.toml.
- `resolve_versions(rollout, served, source=...)` is called by whoever loads the model,
  with the versions actually loaded: it refuses a rollout naming a version that is not
  served and returns the champion and challengers (`RolloutVersions`).
- Checks (`[[rollout.checks]]`) stay raw dicts here; the judge owns their schema. It plugs
  in with `register_checks_validator(validator)`: from then on every `RolloutConfig`
  passes its checks to `validator`, which raises `InvalidCheck(index, key, expected, got)`
  for a bad one; the error is reported as the field `rollout.checks[index].key`.

Every failure is a `ConfigError` naming the file, the field (`rollout.steps[1].weight`),
what was expected and what was found. Weights are percentages of requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conveyor.config_errors import describe, describe_pattern, format_error, rule_error
from conveyor.errors import ConfigError

STRATEGIES = ("canary", "ab", "shadow", "blue_green")
Strategy = Literal["canary", "ab", "shadow", "blue_green"]

ROLLOUT_NAME_PATTERN = describe_pattern(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    "a rollout name: letters, digits, '_', '.' or '-', starting with a letter or digit, at most 64 characters",
)
# HTTP header names (and gRPC metadata keys) are compared lowercase.
ROUTE_KEY_HEADER_PATTERN = describe_pattern(
    r"^[a-z0-9][a-z0-9_.-]*$", "a lowercase header name: letters, digits, '_', '.' or '-'"
)
DEFAULT_ROUTE_KEY = "conveyor-route-key"

DEFAULT_SHADOW_PERCENT = {"shadow": 100.0, "blue_green": 0.0}
DEFAULT_ROLLBACK_WINDOW_S = 3600.0
# Weights are floats in TOML; a sum within this of 100 counts as 100.
WEIGHT_SUM_TOLERANCE = 1e-6


class InvalidCheck(ValueError):
    """Raised by a checks validator: check `index` has a bad `key` (see register_checks_validator)."""

    def __init__(self, index: int, key: str, expected: str, got: str) -> None:
        super().__init__(f"checks[{index}].{key}: expected {expected}, got {got}")
        self.index, self.key, self.expected, self.got = index, key, expected, got


ChecksValidator = Callable[[list[dict[str, Any]]], None]
_checks_validator: ChecksValidator | None = None


def register_checks_validator(validator: ChecksValidator | None) -> ChecksValidator | None:
    """Makes every later RolloutConfig validate its `checks` with `validator` (None: only tables).

    The validator takes the raw list of check tables and raises `InvalidCheck` for the
    first bad one; it must not modify the list. Returns the validator it replaces, so a
    caller (a test) can put it back.
    """
    global _checks_validator
    previous, _checks_validator = _checks_validator, validator
    return previous


class _Strict(BaseModel):
    # As in conveyor.config: TOML values are typed, so "5" for a number is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True)


class CanaryStep(_Strict):
    """One canary step: the challenger's weight, held until the bake condition and gate pass."""

    weight: float = Field(gt=0, le=100)  # the challenger's percent of requests
    duration_s: float = Field(default=0.0, ge=0)  # bake at least this long...
    min_requests: int = Field(default=0, ge=0)  # ...and until the challenger answered this many
    manual_gate: bool = False  # then wait for `promote` before the next step


class Arm(_Strict):
    """One version of an A/B/n rollout and its percent of requests."""

    version: int = Field(ge=1)
    weight: float = Field(ge=0, le=100)


class StickyConfig(_Strict):
    """How a request's routing key keeps it on one version."""

    enabled: bool = True
    header: str = Field(default=DEFAULT_ROUTE_KEY, pattern=ROUTE_KEY_HEADER_PATTERN)  # also gRPC metadata
    parameter: str = Field(default=DEFAULT_ROUTE_KEY, min_length=1)  # a v2 request parameter
    salt: str | None = None  # mixed into the hash; default: the rollout's name


class RolloutConfig(_Strict):
    """[rollout]: a strategy between served versions, its steps or weights, and its checks."""

    strategy: Strategy
    name: str | None = Field(default=None, pattern=ROLLOUT_NAME_PATTERN)
    champion: int | None = Field(default=None, ge=1)
    challenger: int | None = Field(default=None, ge=1)
    arms: list[Arm] = []
    steps: list[CanaryStep] = []
    shadow_percent: float | None = Field(default=None, ge=0, le=100)
    shadow_queue_size: int = Field(default=1024, ge=1)
    # The challenger's CPU priority while it answers shadow copies: "idle" (the OS's idle
    # scheduling class: only CPU time nothing else wants), "normal", or "auto": idle unless
    # a check compares latency or queue time, which needs both versions on equal footing.
    shadow_cpu_priority: Literal["auto", "idle", "normal"] = "auto"
    rollback_window_s: float | None = Field(default=None, ge=0)
    interval_s: float = Field(default=10.0, gt=0)
    sticky: StickyConfig = Field(default_factory=StickyConfig)
    checks: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _strategy_rules(self) -> RolloutConfig:
        strategy = self.strategy
        self._refuse_keys_of_other_strategies()
        if strategy == "ab":
            self._check_arms()
        else:
            if self.challenger is None:
                raise rule_error(f"the version to roll out ({strategy} needs one)", None, field="challenger", got_text="none")
            if self.champion is not None and self.champion == self.challenger:
                raise rule_error(f"a version other than champion ({self.champion})", self.challenger, field="challenger")
        if strategy == "canary":
            self._check_steps()
        if strategy in DEFAULT_SHADOW_PERCENT and self.shadow_percent is None:
            self.shadow_percent = DEFAULT_SHADOW_PERCENT[strategy]
        if strategy == "blue_green" and self.rollback_window_s is None:
            self.rollback_window_s = DEFAULT_ROLLBACK_WINDOW_S
        self._check_checks()
        return self

    def _refuse_keys_of_other_strategies(self) -> None:
        owners = {
            "champion": ("canary", "shadow", "blue_green"),
            "challenger": ("canary", "shadow", "blue_green"),
            "arms": ("ab",),
            "steps": ("canary",),
            "shadow_percent": ("shadow", "blue_green"),
            "rollback_window_s": ("blue_green",),
        }
        for key, strategies in owners.items():
            value = getattr(self, key)
            if self.strategy not in strategies and value not in (None, []):
                used_by = " and ".join(strategies)
                raise rule_error(f"no {key} (only {used_by} use it; strategy is {self.strategy!r})", value, field=key)

    def _check_arms(self) -> None:
        if len(self.arms) < 2:
            raise rule_error("at least two arms ({ version = N, weight = percent })", self.arms, field="arms", got_text=f"{len(self.arms)} arm(s)")
        seen: set[int] = set()
        for index, arm in enumerate(self.arms):
            if arm.version in seen:
                raise rule_error("a version no other arm uses", arm.version, field=f"arms[{index}].version")
            seen.add(arm.version)
        total = math.fsum(arm.weight for arm in self.arms)
        if abs(total - 100.0) > WEIGHT_SUM_TOLERANCE:
            weights = " + ".join(format(arm.weight, "g") for arm in self.arms)
            raise rule_error("weights adding up to 100 (percent of requests)", None, field="arms", got_text=f"{weights} = {total:g}")

    def _check_steps(self) -> None:
        if not self.steps:
            raise rule_error("at least one step ([[rollout.steps]] with a weight)", [], field="steps")
        for index in range(1, len(self.steps)):
            before, weight = self.steps[index - 1].weight, self.steps[index].weight
            if weight <= before:
                raise rule_error(
                    f"a weight above steps[{index - 1}].weight ({before:g}): steps go up in order",
                    None,
                    field=f"steps[{index}].weight",
                    got_text=format(weight, "g"),
                )

    def _check_checks(self) -> None:
        if _checks_validator is None or not self.checks:
            return
        try:
            _checks_validator(self.checks)
        except InvalidCheck as bad:
            raise rule_error(bad.expected, None, field=f"checks[{bad.index}].{bad.key}", got_text=bad.got) from None

    def rollout_name(self, model: str) -> str:
        """The rollout's name: `name`, else "<model>-<strategy>" (labels metrics and responses)."""
        return self.name if self.name is not None else f"{model}-{self.strategy}"

    def sticky_salt(self, model: str) -> str:
        """What the routing-key hash is salted with: `sticky.salt`, else the rollout's name.

        A salt per rollout gives each rollout its own split of the keys, stable across restarts.
        """
        return self.sticky.salt if self.sticky.salt is not None else self.rollout_name(model)


@dataclass(frozen=True)
class RolloutVersions:
    """The versions a rollout runs between, resolved against the served ones."""

    champion: int  # answers when the rollout ends without promotion (the first arm for ab)
    challengers: tuple[int, ...]  # one, or for ab the other arms in order


def resolve_versions(rollout: RolloutConfig, served: Iterable[int], *, source: str) -> RolloutVersions:
    """Checks every version the rollout names is served and picks the champion.

    `served` are the versions loaded and ready. Without `champion`, the champion is the
    highest served version other than the challenger. Raises ConfigError naming the field.
    """
    available = sorted(set(served))
    listing = ", ".join(map(str, available)) or "none"

    def refuse(field: str, expected: str, got: str) -> ConfigError:
        return ConfigError(f"{source}: field 'rollout.{field}': expected {expected}, got {got}")

    if rollout.strategy == "ab":
        for index, arm in enumerate(rollout.arms):
            if arm.version not in available:
                raise refuse(f"arms[{index}].version", f"a served version ({listing})", str(arm.version))
        versions = [arm.version for arm in rollout.arms]
        return RolloutVersions(champion=versions[0], challengers=tuple(versions[1:]))
    challenger = rollout.challenger
    assert challenger is not None  # RolloutConfig requires it for every strategy but ab
    if challenger not in available:
        raise refuse("challenger", f"a served version ({listing})", str(challenger))
    champion = rollout.champion
    if champion is None:
        others = [version for version in available if version != challenger]
        if not others:
            raise refuse("champion", f"a served version besides the challenger ({challenger}) to compare it with", "only the challenger")
        champion = others[-1]
    elif champion not in available:
        raise refuse("champion", f"a served version ({listing})", str(champion))
    return RolloutVersions(champion=champion, challengers=(challenger,))


def parse_rollout_config(data: Mapping[str, Any], *, source: str) -> RolloutConfig:
    """Validates a `[rollout]` table given on its own; errors read as in config.toml."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: field 'rollout': expected a table, got {describe(data)}")
    try:
        return RolloutConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = [format_error(error, RolloutConfig, prefix=("rollout",)) for error in exc.errors()]
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems)) from None
