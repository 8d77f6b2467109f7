"""A model in two versions, for the tests that roll one out through a real server."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

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

# A classifier in two versions with delayed labels: INT64 class per row; a test appends its tables.
LABELLED_CONFIG = """\
backend = "python"
max_batch_size = 100

[version_policy]
all = true

[[inputs]]
name = "x"
datatype = "FP32"
dims = [1]

[[outputs]]
name = "label"
datatype = "INT64"
dims = [1]

[dynamic_batching]
max_queue_delay_us = 0

[feedback]
kind = "classification"
output = "label"
"""


def classifier_py(wrong_below: int) -> str:
    """A model.py predicting each row's class (its x), wrong by one for the classes below `wrong_below`."""
    return f"""\
import numpy as np


class Model:
    def execute(self, inputs):
        classes = inputs["x"][:, 0].astype(np.int64)
        return {{"label": np.where(classes < {wrong_below}, classes + 1, classes)[:, None]}}
"""


def write_shadow_demo(root: Path, percent: float = 50.0) -> None:
    """`shadow_demo` in `root`: the rollout example's two versions (ONNX, served natively),
    with a rollout that copies `percent` of the requests to version 2, from its load on."""
    config = (EXAMPLES / "rollout_demo" / "config.toml").read_text().split("[rollout]")[0]
    shutil.copytree(EXAMPLES / "rollout_demo", root / "shadow_demo")
    (root / "shadow_demo" / "config.toml").write_text(
        config + f'[rollout]\nstrategy = "shadow"\nchallenger = 2\nshadow_percent = {percent}\ninterval_s = 60.0\n'
    )
