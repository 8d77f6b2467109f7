"""Deployment between versions of a model: rollout configuration and request routing.

- `conveyor.rollout_config` (beside conveyor.config, re-exported here): the `[rollout]`
  table of config.toml (`RolloutConfig`) and the check of the versions it names against
  the served ones (`resolve_versions`).
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

Names are loaded on first use, so that importing one module of the package does not pull
every sibling (and scipy, which the judge needs) with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RolloutConfig": "conveyor.rollout_config",
    "RolloutVersions": "conveyor.rollout_config",
    "CanaryStep": "conveyor.rollout_config",
    "Arm": "conveyor.rollout_config",
    "StickyConfig": "conveyor.rollout_config",
    "InvalidCheck": "conveyor.rollout_config",
    "parse_rollout_config": "conveyor.rollout_config",
    "register_checks_validator": "conveyor.rollout_config",
    "resolve_versions": "conveyor.rollout_config",
    "RouteDecision": "conveyor.deploy.router",
    "RouteTable": "conveyor.deploy.router",
    "Router": "conveyor.deploy.router",
    "route_key_hash": "conveyor.deploy.router",
    "Check": "conveyor.deploy.judge",
    "CheckDecision": "conveyor.deploy.judge",
    "Judgement": "conveyor.deploy.judge",
    "RolloutStatistics": "conveyor.deploy.judge",
    "evaluate": "conveyor.deploy.judge",
    "parse_checks": "conveyor.deploy.judge",
    "validate_check_tables": "conveyor.deploy.judge",
    "RolloutTraffic": "conveyor.deploy.traffic",
    "RoutedResult": "conveyor.deploy.traffic",
    "OutputComparison": "conveyor.deploy.traffic",
    "route_key_from": "conveyor.deploy.traffic",
    "RolloutController": "conveyor.deploy.controller",
    "RolloutStateError": "conveyor.deploy.controller",
    "Rollouts": "conveyor.deploy.rollouts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'conveyor.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
