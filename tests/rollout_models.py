"""A model in two versions, for the tests that roll one out through a real server."""

from __future__ import annotations

# FP32 [4] in and out, both versions served; a test appends its [rollout] table.
TWO_VERSION_CONFIG = """\
backend = "python"
max_batch_size = 8

[version_policy]
all = true

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
"""

DOUBLING_PY = """\
import numpy as np


class Model:
    def execute(self, inputs):
        return {"y": inputs["x"] * np.float32(2.0)}
"""
