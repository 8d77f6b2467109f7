"""The router: sticky keys, shares within binomial bands, monotone canary steps, A/B/n,
shadow sampling, and the same decisions from the C++ and the Python implementations.

Seeded and deterministic: every share is checked against the two-sided 99% band of
the binomial distribution its weight implies.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import binom

import conveyor

from conveyor.rollout_config import RolloutConfig, resolve_versions
from conveyor.deploy.router import (
    POINT_LIMIT,
    RouteDecision,
    Router,
    RouteTable,
    _NativeRouter,
    fnv1a64,
    route_key_hash,
)
from conveyor.errors import ConfigError

IMPLEMENTATIONS = ["python"] + (["native"] if _NativeRouter is not None else [])
KEYS = [f"user-{index}" for index in range(20_000)]
# The fresh process imports the same conveyor package as this one (a dev build may sit elsewhere).
PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    return request.param


def assert_within_band(count: int, trials: int, percent: float) -> None:
    low, high = binom.interval(0.99, trials, percent / 100)
    assert low <= count <= high, f"{count} of {trials} outside the 99% band [{low:g}, {high:g}] of {percent}%"


# ---- the hash ----


def test_key_hash_is_fixed() -> None:
    # Stable across processes, versions and machines: these values must never change,
    # or every sticky key moves at the next upgrade.
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C  # the published FNV-1a 64 test vector
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    assert route_key_hash("") == 0xF52A15E9A9B5E89B
    assert route_key_hash("user-1", "m-canary") == route_key_hash(b"user-1", "m-canary")
    assert route_key_hash("user-1", "m-canary") != route_key_hash("user-1", "other")
    assert route_key_hash("\u00e9t\u00e9") == route_key_hash("\u00e9t\u00e9".encode())


# ---- sticky ----


def test_same_key_same_version_for_10000_requests(implementation: str) -> None:
    router = Router(RouteTable.canary(1, 2, 50, salt="m-canary"), seed=7, implementation=implementation)
    for key in ("user-1", "user-2", b"device-9", "\u00e9t\u00e9"):
        first = router.route(key)
        assert all(router.route(key) == first for _ in range(10_000))


def test_same_key_same_version_in_a_fresh_process(implementation: str) -> None:
    keys = KEYS[:500]
    here = [Router(RouteTable.canary(1, 2, 30, salt="m-canary"), implementation=implementation).route(key).version for key in keys]
    script = (
        "import sys\n"
        "from conveyor.deploy.router import Router, RouteTable\n"
        f"router = Router(RouteTable.canary(1, 2, 30, salt='m-canary'), implementation={implementation!r})\n"
        "print(''.join(str(router.route(line.strip()).version) for line in sys.stdin))\n"
    )
    env = {"PYTHONPATH": str(PACKAGE_PARENT), "PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], input="\n".join(keys), capture_output=True, text=True, env=env, check=True, timeout=120
    )
    assert result.stdout.strip() == "".join(map(str, here))


def test_keyed_shares_match_the_weights(implementation: str) -> None:
    router = Router(RouteTable.canary(1, 2, 10, salt="m-canary"), implementation=implementation)
    on_challenger = sum(router.route(key).version == 2 for key in KEYS)
    assert_within_band(on_challenger, len(KEYS), 10)


def test_raising_the_weight_only_moves_keys_to_the_challenger(implementation: str) -> None:
    previous: set[str] = set()
    for percent in (1, 5, 10, 25, 50, 75, 100):
        router = Router(RouteTable.canary(1, 2, percent, salt="m-canary"), implementation=implementation)
        on_challenger = {key for key in KEYS if router.route(key).version == 2}
        assert previous <= on_challenger, f"{len(previous - on_challenger)} keys left the challenger at {percent}%"
        assert_within_band(len(on_challenger), len(KEYS), percent) if percent < 100 else None
        previous = on_challenger
    assert previous == set(KEYS)


def test_salt_reshuffles_the_keys(implementation: str) -> None:
    first = Router(RouteTable.canary(1, 2, 50, salt="rollout-a"), implementation=implementation)
    second = Router(RouteTable.canary(1, 2, 50, salt="rollout-b"), implementation=implementation)
    same = sum(first.route(key) == second.route(key) for key in KEYS)
    assert_within_band(same, len(KEYS), 50)  # independent splits agree half the time


def test_sticky_off_ignores_the_key(implementation: str) -> None:
    router = Router(RouteTable.canary(1, 2, 50, sticky=False), seed=3, implementation=implementation)
    versions = Counter(router.route("user-1").version for _ in range(2000))
    assert set(versions) == {1, 2}


# ---- without a key ----


def test_keyless_shares_match_the_weights_and_the_seed_repeats(implementation: str) -> None:
    router = Router(RouteTable.canary(1, 2, 25), seed=11, implementation=implementation)
    decisions = [router.route().version for _ in range(20_000)]
    assert_within_band(decisions.count(2), len(decisions), 25)
    again = Router(RouteTable.canary(1, 2, 25), seed=11, implementation=implementation)
    assert [again.route(None).version for _ in range(20_000)] == decisions
    empty_key = Router(RouteTable.canary(1, 2, 25), seed=11, implementation=implementation)
    assert [empty_key.route("").version for _ in range(100)] == decisions[:100]  # an empty key is no key


def test_ab_n_with_three_versions(implementation: str) -> None:
    table = RouteTable.weighted([(1, 50), (2, 30), (3, 20)], salt="m-ab")
    keyed = Counter(Router(table, implementation=implementation).route(key).version for key in KEYS)
    keyless_router = Router(table, seed=5, implementation=implementation)
    keyless = Counter(keyless_router.route().version for _ in KEYS)
    for counts in (keyed, keyless):
        for version, percent in ((1, 50), (2, 30), (3, 20)):
            assert_within_band(counts[version], len(KEYS), percent)


def test_an_arm_at_zero_gets_nothing(implementation: str) -> None:
    router = Router(RouteTable.weighted([(1, 0), (2, 100), (3, 0)]), seed=2, implementation=implementation)
    assert {router.route(key).version for key in KEYS[:5000]} == {2}
    assert {router.route().version for _ in range(5000)} == {2}


# ---- shadow ----


@pytest.mark.parametrize("percent", [0, 5, 50, 100])
def test_shadow_share_within_its_band(implementation: str, percent: float) -> None:
    router = Router(RouteTable.shadow(1, 2, percent, salt="m-shadow"), seed=9, implementation=implementation)
    keyless = [router.route() for _ in range(20_000)]
    keyed = [router.route(key) for key in KEYS]
    for decisions in (keyless, keyed):
        assert {decision.version for decision in decisions} == {1}
        copied = sum(decision.shadow_version == 2 for decision in decisions)
        assert_within_band(copied, len(decisions), percent)
    assert all(router.route("user-1") == keyed[1] for _ in range(1000))  # a key is copied always or never


def test_decisions_are_shared_objects(implementation: str) -> None:
    router = Router(RouteTable.shadow(1, 2, 50), seed=1, implementation=implementation)
    assert set(map(id, (router.route() for _ in range(100)))) <= {id(d) for d in router._decisions}
    assert RouteDecision(1, 2) in router._decisions


@pytest.mark.skipif(_NativeRouter is None, reason="the compiled module has no native router")
def test_native_and_python_decide_the_same() -> None:
    for table in (
        RouteTable.canary(1, 2, 12.5, salt="s"),
        RouteTable.weighted([(1, 33.3), (2, 33.3), (3, 33.4)], salt=""),
        RouteTable.shadow(1, 2, 37, salt="x"),
    ):
        native = Router(table, seed=42, implementation="native")
        python = Router(table, seed=42, implementation="python")
        assert [native.route(key) for key in KEYS] == [python.route(key) for key in KEYS]
        assert [native.route() for _ in KEYS] == [python.route() for _ in KEYS]


# ---- tables ----


def test_table_bounds_are_exact_at_the_edges() -> None:
    assert RouteTable.canary(1, 2, 0).arm_bounds() == [0, POINT_LIMIT]
    assert RouteTable.canary(1, 2, 100).arm_bounds() == [POINT_LIMIT, POINT_LIMIT]
    assert RouteTable.canary(1, 2, 50).arm_bounds() == [POINT_LIMIT // 2, POINT_LIMIT]
    assert RouteTable.shadow(1, 2, 100).shadow_bound() == POINT_LIMIT


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RouteTable(()), "at least one arm"),
        (lambda: RouteTable.weighted([(1, 60), (2, 30)]), "adding up to 100, got 90"),
        (lambda: RouteTable.weighted([(1, 50), (1, 50)]), "each version in one arm"),
        (lambda: RouteTable.canary(1, 2, 120), r"in \[0, 100\]"),
        (lambda: RouteTable(((1, 100.0),), shadow_percent=5), "needs a shadow_version"),
        (lambda: RouteTable.shadow(1, 2, 150), r"shadow_percent in \[0, 100\]"),
        (lambda: Router(RouteTable.canary(1, 2, 5), implementation="fast"), "expected implementation 'native' or 'python'"),
    ],
)
def test_bad_tables_are_refused(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_initial_tables_from_the_config() -> None:
    canary = RolloutConfig(strategy="canary", challenger=2, steps=[{"weight": 5}, {"weight": 50}])
    table = RouteTable.initial(canary, resolve_versions(canary, [1, 2], source="m"), "m")
    assert (table.arms, table.salt, table.sticky) == (((2, 5.0), (1, 95.0)), "m-canary", True)
    ab = RolloutConfig(strategy="ab", arms=[{"version": 1, "weight": 70}, {"version": 3, "weight": 30}], sticky={"enabled": False})
    table = RouteTable.initial(ab, resolve_versions(ab, [1, 3], source="m"), "m")
    assert (table.arms, table.sticky) == (((1, 70.0), (3, 30.0)), False)
    shadow = RolloutConfig(strategy="shadow", challenger=2, shadow_percent=20, sticky={"salt": "fixed"})
    table = RouteTable.initial(shadow, resolve_versions(shadow, [1, 2], source="m"), "m")
    assert (table.arms, table.shadow_version, table.shadow_percent, table.salt) == (((1, 100.0),), 2, 20.0, "fixed")
    blue_green = RolloutConfig(strategy="blue_green", challenger=2)
    table = RouteTable.initial(blue_green, resolve_versions(blue_green, [1, 2], source="m"), "m")
    assert (table.arms, table.shadow_version, table.shadow_percent) == (((1, 100.0),), 2, 0.0)
    assert {Router(table, seed=1).route().shadow_version for _ in range(1000)} == {None}


@pytest.mark.parametrize(
    ("table", "keyed"),
    [
        (RouteTable.shadow(1, 2, 100.0), False),  # every request copied, the champion answers all
        (RouteTable.shadow(1, 2, 0.0), False),
        (RouteTable.shadow(1, 2, 30.0), True),  # a key decides whether it is copied
        (RouteTable.canary(1, 2, 100.0), False),
        (RouteTable.canary(1, 2, 10.0), True),
        (RouteTable.canary(1, 2, 10.0, sticky=False), False),
        (RouteTable.weighted([(1, 50.0), (2, 50.0)]), True),
    ],
)
def test_a_router_says_whether_a_key_can_change_its_decision(table: RouteTable, keyed: bool) -> None:
    router = Router(table, seed=5)
    assert router.keyed is keyed
    if not keyed and table.sticky:  # then every key gets the same decision
        assert {router.route(f"user-{i}") for i in range(200)} == {router.route(None)}
