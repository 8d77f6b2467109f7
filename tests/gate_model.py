"""A model that holds a batch until the test lets it go: requests stay in the model, or queued
behind it, on cue. For servers in the test's own process (the model reads these events)."""

from __future__ import annotations

import threading
from pathlib import Path

ENTERED = threading.Event()  # set when a batch holding a negative value is in the model
RELEASE = threading.Event()  # that batch waits for it (at most HOLD_S)
HOLD_S = 30.0

GATE_CONFIG = """\
# y = 2x; a batch with a negative value waits in the model until the test releases it.
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [4]

[dynamic_batching]
max_queue_delay_us = 0

[instance_group]
count = 1
"""

GATE_MODEL = """\
import gate_model


class Model:
    def execute(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            gate_model.ENTERED.set()
            gate_model.RELEASE.wait(gate_model.HOLD_S)
        return {"y": x * 2}
"""


def write_gate_model(root: Path, name: str = "gate") -> None:
    """The gate model as <root>/<name> (config.toml and version 1's model.py)."""
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.toml").write_text(GATE_CONFIG)
    (root / name / "1" / "model.py").write_text(GATE_MODEL)
