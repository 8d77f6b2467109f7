"""Flag values of the `conveyor` command line: conversions, and defaults read from CONVEYOR_* variables.

Shared by every group of subcommands (cli.py, rollout_cli.py), so none imports another.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"  # where `conveyor serve` listens by default


def print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    """What a command group given no subcommand does: its help on stderr, exit status 2."""
    parser.print_help(sys.stderr)
    return 2


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


def run_verb(register: Callable[[Any], None], verb: str, argv: list[str] | None = None) -> int:
    """`conveyor VERB` on its own (a verb module's `main`): parses `argv` (default
    sys.argv[1:], without the verb) with the parser `register` adds, reports a
    CONVEYOR_* value that did not convert (exit 2), and runs the verb; returns its status.
    The arguments stay on the namespace as `argv`, for a result that records its command.
    """
    parser = argparse.ArgumentParser(prog="conveyor")
    register(parser.add_subparsers(title="commands", metavar="COMMAND"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args([verb, *argv])
    args.argv = argv
    for value in vars(args).values():
        if isinstance(value, BadEnv):
            print(f"conveyor {verb}: error: {value.message}", file=sys.stderr)
            return 2
    return args.run(args)
