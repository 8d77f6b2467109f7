"""Test files run again, unchanged, in a pytest subprocess with one environment variable set:
the suites of a native front end against the Python one behind it (CONVEYOR_HTTP_FRONTEND,
CONVEYOR_GRPC_FRONTEND), which in-process servers and `conveyor serve` subprocesses read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def rerun_with(variable: str, value: str, files: tuple[str, ...]) -> None:
    """Run `files` (names in tests/) with `variable`=`value`; fail with the end of their output."""
    env = dict(os.environ, **{variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(TESTS / name) for name in files)],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]
