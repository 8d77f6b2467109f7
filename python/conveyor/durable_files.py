"""Writing files that survive a crash: every byte written, renames made durable.

Shared by the learning loop (capture segments, retraining markers) and rollouts (saved
state, decision logs), which all write tmp + fsync + atomic rename + directory fsync.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(descriptor: int, data: bytes | memoryview) -> None:
    """Writes every byte of `data` to `descriptor` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
