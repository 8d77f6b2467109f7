"""Deployment between versions of a model: rollout configuration and request routing.

- `rollout_config`: the `[rollout]` table of config.toml (`RolloutConfig`) and the check
  of the versions it names against the served ones (`resolve_versions`).
- `router`: per request, the version that answers and whether a shadow copy is made
  (`RouteTable`, `Router`, `RouteDecision`).
- `judge`: the rollout's checks (`parse_checks`), their evidence (`RolloutStatistics`) and
  the verdict at each look (`evaluate` -> `Judgement`); statistics in `sequential`.
- `controller`: one rollout moved through its strategy on the judge's verdicts, its
  decision log and its crash-safe saved state (`RolloutController`); files in `rollout_state`.
- `traffic`: requests in front of the Runtime under a rollout: routing, fallback, shadow
  copies paired for the judge, counters (`RolloutTraffic`, `route_key_from`).
- `rollouts`: rollouts of a Runtime in-process (`Rollouts`: start, promote, pause, resume,
  abort, rollback, status, tick, infer) and the pieces the server's manager shares with it.

Names are loaded on first use: conveyor.config imports `rollout_config` to build
ModelConfig, and importing every sibling here would pull them (and their imports) into
every config load.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RolloutConfig": "rollout_config",
    "RolloutVersions": "rollout_config",
    "CanaryStep": "rollout_config",
    "Arm": "rollout_config",
    "StickyConfig": "rollout_config",
    "InvalidCheck": "rollout_config",
    "parse_rollout_config": "rollout_config",
    "register_checks_validator": "rollout_config",
    "resolve_versions": "rollout_config",
    "RouteDecision": "router",
    "RouteTable": "router",
    "Router": "router",
    "route_key_hash": "router",
    "Check": "judge",
    "CheckDecision": "judge",
    "Judgement": "judge",
    "RolloutStatistics": "judge",
    "evaluate": "judge",
    "parse_checks": "judge",
    "validate_check_tables": "judge",
    "RolloutTraffic": "traffic",
    "RoutedResult": "traffic",
    "OutputComparison": "traffic",
    "route_key_from": "traffic",
    "RolloutController": "controller",
    "RolloutStateError": "controller",
    "Rollouts": "rollouts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'conveyor.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"conveyor.deploy.{module}"), name)
