"""Flag values of the `conveyor` command line: conversions, and defaults read from CONVEYOR_* variables.

Shared by every group of subcommands (cli.py, rollout_cli.py), so none imports another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"  # where `conveyor serve` listens by default


class BadEnv:
    """A CONVEYOR_* value that did not convert: reported only if its flag is used unset."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:  # shown by --help as the default
        return "<invalid environment value>"


def env(flag: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    """The default for --flag: CONVEYOR_FLAG from the environment, converted, else `default`."""
    variable = "CONVEYOR_" + flag.upper().replace("-", "_")
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        return convert(raw)
    except (TypeError, ValueError) as exc:
        return BadEnv(f"environment variable {variable}={raw!r} is not valid for --{flag}: {exc}")


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"a port is 0..65535, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected an integer > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a number > 0, got {value}")
    return value


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return check
