"""A BYTES model for the tests that serve one: the upper-cased text and its length."""

from __future__ import annotations

from pathlib import Path

ECHO_CONFIG = """\
# BYTES in and out: the upper-cased text and its length.
backend = "python"
max_batch_size = 8

[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "upper"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "length"
datatype = "INT32"
dims = [1]

[dynamic_batching]
max_queue_delay_us = 250
preferred_batch_sizes = [2, 4]
priority_levels = 2
max_queue_size = 100
"""

ECHO_MODEL = """\
import numpy as np


class Model:
    def execute(self, inputs):
        text = inputs["text"][:, 0]
        upper = np.empty((len(text), 1), dtype=object)
        upper[:, 0] = [item.upper() for item in text]
        return {"upper": upper, "length": np.array([[len(item)] for item in text], dtype=np.int32)}
"""


def write_echo_model(root: Path, name: str = "echo") -> None:
    """The echo model as <root>/<name> (config.toml and version 1's model.py)."""
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.toml").write_text(ECHO_CONFIG)
    (root / name / "1" / "model.py").write_text(ECHO_MODEL)
