"""The [rollout] table: defaults per strategy, every field read, and every bad input
refused with a ConfigError naming the file, the dotted field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.config import load_model_config
from conveyor.rollout_config import (
    InvalidCheck,
    RolloutConfig,
    RolloutVersions,
    parse_rollout_config,
    register_checks_validator,
    resolve_versions,
)
from conveyor.errors import ConfigError
from config_files import config_error, write_config


@pytest.fixture(autouse=True)
def table_rules_only():
    """These tests read the table alone: the judge's check validation (which importing
    conveyor.server registers for the whole process) is off while they run."""
    previous = register_checks_validator(None)
    yield
    register_checks_validator(previous)

MODEL = """
backend = "python"
max_batch_size = 8
version_policy = { all = true }

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [1]
"""

CANARY = MODEL + """
[rollout]
strategy = "canary"
name = "m-v2"
champion = 1
challenger = 2
interval_s = 5

[[rollout.steps]]
weight = 5
duration_s = 60
min_requests = 200

[[rollout.steps]]
weight = 25.5
duration_s = 300
min_requests = 1000
manual_gate = true

[[rollout.steps]]
weight = 100

[rollout.sticky]
header = "x-user"
parameter = "user"
salt = "fixed"

[[rollout.checks]]
metric = "error_rate"
max_increase = 0.01

[[rollout.checks]]
metric = "latency_p99_us"
max_ratio = 1.2
"""


def rollout_of(tmp_path: Path, text: str) -> RolloutConfig:
    rollout = load_model_config(write_config(tmp_path, text)).rollout
    assert rollout is not None
    return rollout


# ---- reading ----


def test_no_rollout_by_default(tmp_path: Path) -> None:
    assert load_model_config(write_config(tmp_path, MODEL)).rollout is None


def test_canary_reads_every_field(tmp_path: Path) -> None:
    rollout = rollout_of(tmp_path, CANARY)
    assert (rollout.strategy, rollout.name, rollout.champion, rollout.challenger) == ("canary", "m-v2", 1, 2)
    assert [(s.weight, s.duration_s, s.min_requests, s.manual_gate) for s in rollout.steps] == [
        (5, 60, 200, False),
        (25.5, 300, 1000, True),
        (100, 0, 0, False),
    ]
    assert (rollout.sticky.enabled, rollout.sticky.header, rollout.sticky.parameter, rollout.sticky.salt) == (
        True, "x-user", "user", "fixed",
    )  # fmt: skip
    assert rollout.interval_s == 5
    # Checks stay raw tables: the judge owns their schema.
    assert rollout.checks == [{"metric": "error_rate", "max_increase": 0.01}, {"metric": "latency_p99_us", "max_ratio": 1.2}]
    assert rollout.shadow_percent is None and rollout.rollback_window_s is None and rollout.arms == []


def test_defaults_per_strategy() -> None:
    shadow = RolloutConfig(strategy="shadow", challenger=2)
    assert (shadow.shadow_percent, shadow.shadow_queue_size, shadow.rollback_window_s) == (100.0, 1024, None)
    blue_green = RolloutConfig(strategy="blue_green", challenger=2)
    assert (blue_green.shadow_percent, blue_green.rollback_window_s) == (0.0, 3600.0)
    assert blue_green.interval_s == 10.0 and blue_green.checks == []
    sticky = blue_green.sticky
    assert (sticky.enabled, sticky.header, sticky.parameter, sticky.salt) == (True, "conveyor-route-key", "conveyor-route-key", None)
    assert blue_green.rollout_name("m") == "m-blue_green" and blue_green.sticky_salt("m") == "m-blue_green"


def test_ab_with_three_arms(tmp_path: Path) -> None:
    text = MODEL + """
    [rollout]
    strategy = "ab"
    arms = [{ version = 1, weight = 50 }, { version = 2, weight = 30 }, { version = 3, weight = 20 }]
    """
    rollout = rollout_of(tmp_path, text)
    assert [(arm.version, arm.weight) for arm in rollout.arms] == [(1, 50), (2, 30), (3, 20)]
    assert resolve_versions(rollout, [1, 2, 3], source="m") == RolloutVersions(champion=1, challengers=(2, 3))


def test_shadow_and_blue_green_tables(tmp_path: Path) -> None:
    shadow = rollout_of(tmp_path, MODEL + '[rollout]\nstrategy = "shadow"\nchallenger = 2\nshadow_percent = 12.5\nshadow_queue_size = 64\n')
    assert (shadow.shadow_percent, shadow.shadow_queue_size) == (12.5, 64)
    blue_green = rollout_of(tmp_path, MODEL + '[rollout]\nstrategy = "blue_green"\nchallenger = 3\nrollback_window_s = 0\n')
    assert blue_green.rollback_window_s == 0


# ---- served versions ----


def test_champion_defaults_to_the_highest_other_served_version() -> None:
    rollout = RolloutConfig(strategy="canary", challenger=2, steps=[{"weight": 10}])
    assert resolve_versions(rollout, [1, 2, 3], source="m") == RolloutVersions(champion=3, challengers=(2,))
    assert resolve_versions(rollout, [2, 1], source="m") == RolloutVersions(champion=1, challengers=(2,))


@pytest.mark.parametrize(
    ("table", "served", "field", "expected"),
    [
        ({"strategy": "canary", "challenger": 4, "steps": [{"weight": 10}]}, [1, 2], "rollout.challenger", "a served version (1, 2), got 4"),
        ({"strategy": "shadow", "challenger": 2, "champion": 7}, [1, 2], "rollout.champion", "a served version (1, 2), got 7"),
        ({"strategy": "shadow", "challenger": 2}, [2], "rollout.champion", "besides the challenger (2)"),
        (
            {"strategy": "ab", "arms": [{"version": 1, "weight": 50}, {"version": 5, "weight": 50}]},
            [1, 2],
            "rollout.arms[1].version",
            "a served version (1, 2), got 5",
        ),
    ],
)
def test_a_version_that_is_not_served_is_refused(table: dict, served: list[int], field: str, expected: str) -> None:
    rollout = parse_rollout_config(table, source="models/m/config.toml")
    with pytest.raises(ConfigError) as caught:
        resolve_versions(rollout, served, source="models/m/config.toml")
    message = str(caught.value)
    assert message.startswith(f"models/m/config.toml: field '{field}': expected ") and expected in message


# ---- bad input ----

STEPS = "[[rollout.steps]]\nweight = 10\n"


@pytest.mark.parametrize(
    ("rollout", "field", "expected"),
    [
        ('strategy = "linear"\nchallenger = 2\n', "rollout.strategy", "expected 'canary', 'ab', 'shadow' or 'blue_green', got 'linear'"),
        ("challenger = 2\n", "rollout.strategy", "required, but missing"),
        ('strategy = "canary"\n' + STEPS, "rollout.challenger", "expected the version to roll out (canary needs one), got none"),
        ('strategy = "canary"\nchallenger = 2\n', "rollout.steps", "expected at least one step"),
        ('strategy = "canary"\nchallenger = 2\nchampion = 2\n' + STEPS, "rollout.challenger", "a version other than champion (2)"),
        ('strategy = "canary"\nchallenger = 0\n' + STEPS, "rollout.challenger", "expected an integer >= 1, got 0"),
        ('strategy = "canary"\nchallenger = "2"\n' + STEPS, "rollout.challenger", "expected an integer, got '2'"),
        (
            'strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 20\n[[rollout.steps]]\nweight = 10\n',
            "rollout.steps[1].weight",
            "expected a weight above steps[0].weight (20): steps go up in order, got 10",
        ),
        (
            'strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 20\n[[rollout.steps]]\nweight = 20\n',
            "rollout.steps[1].weight",
            "steps go up in order",
        ),
        ('strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 0\n', "rollout.steps[0].weight", "expected a number > 0, got 0"),
        ('strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 120\n', "rollout.steps[0].weight", "expected a number <= 100, got 120"),
        (
            'strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 10\nduration_s = -5\n',
            "rollout.steps[0].duration_s",
            "expected a number >= 0, got -5",
        ),
        (
            'strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 10\nmin_requests = -1\n',
            "rollout.steps[0].min_requests",
            "expected an integer >= 0, got -1",
        ),
        ('strategy = "canary"\nchallenger = 2\n[[rollout.steps]]\nweight = 10\nbake = 3\n', "rollout.steps[0].bake", "known fields: weight"),
        ('strategy = "canary"\nchallenger = 2\nrollback_window_s = 5\n' + STEPS, "rollout.rollback_window_s", "only blue_green use"),
        ('strategy = "canary"\nchallenger = 2\nshadow_percent = 5\n' + STEPS, "rollout.shadow_percent", "only shadow and blue_green use"),
        (
            'strategy = "ab"\narms = [{ version = 1, weight = 60 }, { version = 2, weight = 30 }]\n',
            "rollout.arms",
            "expected weights adding up to 100 (percent of requests), got 60 + 30 = 90",
        ),
        ('strategy = "ab"\narms = [{ version = 1, weight = 100 }]\n', "rollout.arms", "expected at least two arms"),
        (
            'strategy = "ab"\narms = [{ version = 1, weight = 50 }, { version = 1, weight = 50 }]\n',
            "rollout.arms[1].version",
            "expected a version no other arm uses, got 1",
        ),
        ('strategy = "ab"\narms = [{ version = 1, weight = -10 }, { version = 2, weight = 110 }]\n', "rollout.arms[0].weight", ">= 0"),
        (
            'strategy = "ab"\nchallenger = 2\narms = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]\n',
            "rollout.challenger",
            "only canary and shadow and blue_green use it; strategy is 'ab'",
        ),
        ('strategy = "ab"\nsteps = [{ weight = 10 }]\n', "rollout.steps", "only canary use it"),
        ('strategy = "shadow"\nchallenger = 2\nshadow_percent = 101\n', "rollout.shadow_percent", "expected a number <= 100, got 101"),
        ('strategy = "shadow"\nchallenger = 2\nshadow_percent = -1\n', "rollout.shadow_percent", "expected a number >= 0, got -1"),
        ('strategy = "shadow"\nchallenger = 2\nshadow_queue_size = 0\n', "rollout.shadow_queue_size", "expected an integer >= 1, got 0"),
        ('strategy = "blue_green"\nchallenger = 2\nrollback_window_s = -1\n', "rollout.rollback_window_s", "expected a number >= 0, got -1"),
        ('strategy = "shadow"\nchallenger = 2\ninterval_s = 0\n', "rollout.interval_s", "expected a number > 0, got 0"),
        ('strategy = "shadow"\nchallenger = 2\nname = "no spaces"\n', "rollout.name", "expected a rollout name: letters"),
        ('strategy = "shadow"\nchallenger = 2\n[rollout.sticky]\nheader = "X-User"\n', "rollout.sticky.header", "expected a lowercase header name"),
        ('strategy = "shadow"\nchallenger = 2\n[rollout.sticky]\nkey = "x"\n', "rollout.sticky.key", "known fields: enabled, header"),
        ('strategy = "shadow"\nchallenger = 2\nchecks = [1]\n', "rollout.checks[0]", "expected a table, got 1"),
        ('strategy = "shadow"\nchallenger = 2\ncanary = 5\n', "rollout.canary", "known fields: strategy, name"),
    ],
)
def test_bad_rollouts_name_their_field(tmp_path: Path, rollout: str, field: str, expected: str) -> None:
    message = config_error(tmp_path, MODEL + "[rollout]\n" + rollout)
    assert f"field '{field}'" in message, message
    assert expected in message, message


def test_parse_rollout_config_reports_like_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rollout_config({"strategy": "canary", "challenger": 2, "steps": [{"weight": 50}, {"weight": 40}]}, source="request")
    assert str(caught.value) == (
        "request: field 'rollout.steps[1].weight': expected a weight above steps[0].weight (50): steps go up in order, got 40"
    )
    with pytest.raises(ConfigError, match=r"^request: field 'rollout': expected a table, got 3$"):
        parse_rollout_config(3, source="request")  # type: ignore[arg-type]


# ---- the judge's hook for checks ----


def _only_known_metrics(checks: list[dict]) -> None:
    for index, check in enumerate(checks):
        if check.get("metric") not in ("error_rate", "latency_p99_us"):
            raise InvalidCheck(index, "metric", "'error_rate' or 'latency_p99_us'", repr(check.get("metric")))


@pytest.fixture
def checks_validator():
    previous = register_checks_validator(_only_known_metrics)
    yield
    register_checks_validator(previous)


@pytest.mark.usefixtures("checks_validator")
def test_the_registered_validator_names_the_bad_check(tmp_path: Path) -> None:
    assert len(rollout_of(tmp_path, CANARY).checks) == 2
    message = config_error(tmp_path, CANARY + '[[rollout.checks]]\nmetric = "vibes"\n')
    assert "field 'rollout.checks[2].metric': expected 'error_rate' or 'latency_p99_us', got 'vibes'" in message
