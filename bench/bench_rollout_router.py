"""The routing decision's cost per request, against same-run baselines.

    PYTHONPATH=python python -m pytest bench/bench_rollout_router.py --benchmark-enable

Goal (issue 10): routing adds at most 0.5 us per request in-process, and nothing
measurable when no rollout is active. Every case times one loop over 1000 requests, so
the loop's own cost cancels in the differences; the end of the run prints each median
against its baseline, the ratio, and the nanoseconds added per request:

- "no rollout active": the serving path's check `router is None` (the champion answers)
  against the bare loop without it;
- "<table>, keyed | no key [native | python]": `router.route(key)` against the no-rollout
  loop, for a canary, a shadow and an A/B/n table, in C++ (when the compiled module has
  the router) and in the Python reference.

Nothing here asserts a timing.
"""

from __future__ import annotations

import pytest

from conveyor.deploy.router import Router, RouteTable, _NativeRouter

REQUESTS = 1000
KEYS = [f"user-{index}" for index in range(REQUESTS)]
NO_KEYS = [None] * REQUESTS
IMPLEMENTATIONS = (["native"] if _NativeRouter is not None else []) + ["python"]
TABLES = {
    "canary 10%": RouteTable.canary(1, 2, 10, salt="m-canary"),
    "shadow 50%": RouteTable.shadow(1, 2, 50, salt="m-shadow"),
    "ab/n 3 arms": RouteTable.weighted([(1, 50), (2, 30), (3, 20)], salt="m-ab"),
}
CASES = [(name, keyed) for name in TABLES for keyed in (True, False)]
GROUP = "routing 1000 requests"


def bare_loop(keys: list) -> int:
    """The loop alone: what a server without rollouts does per request here."""
    version = 0
    for _key in keys:
        version = 1
    return version


def serve_without_rollout(router: Router | None, keys: list) -> int:
    """The serving path with no rollout active: one None check per request."""
    version = 0
    for key in keys:
        version = 1 if router is None else router.route(key).version
    return version


def serve_with_rollout(router: Router, keys: list) -> int:
    """The serving path with a rollout: one decision per request."""
    version = 0
    for key in keys:
        version = router.route(key).version
    return version


def case_name(name: str, keyed: bool) -> str:
    return f"{name}, {'keyed' if keyed else 'no key'}"


def test_bare_loop(benchmark, ratio_report) -> None:
    benchmark.group = GROUP
    benchmark(bare_loop, KEYS)
    ratio_report.baseline("no rollout active", benchmark, label="bare loop")


def test_no_rollout(benchmark, ratio_report) -> None:
    benchmark.group = GROUP
    benchmark(serve_without_rollout, None, KEYS)
    ratio_report.candidate("no rollout active", benchmark, label="router is None", calls=REQUESTS)
    for name, keyed in CASES:
        for implementation in IMPLEMENTATIONS:
            ratio_report.baseline(f"{case_name(name, keyed)} [{implementation}]", benchmark, label="no rollout")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("name", "keyed"), CASES, ids=[case_name(*case) for case in CASES])
def test_routed(benchmark, ratio_report, implementation: str, name: str, keyed: bool) -> None:
    benchmark.group = GROUP
    router = Router(TABLES[name], seed=1, implementation=implementation)
    benchmark(serve_with_rollout, router, KEYS if keyed else NO_KEYS)
    ratio_report.candidate(f"{case_name(name, keyed)} [{implementation}]", benchmark, label=f"routed ({implementation})", calls=REQUESTS)
