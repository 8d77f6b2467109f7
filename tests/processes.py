"""Helpers for tests that drive real `conveyor serve` subprocesses."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

DEADLINE_S = 30.0  # bound on every wait; a healthy run takes a fraction of it
POLL_S = 0.02  # the pause between two looks at a condition waited on


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, process: subprocess.Popen | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail after DEADLINE_S or if `process` exits."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with code {process.returncode} while waiting for {what}")
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")
