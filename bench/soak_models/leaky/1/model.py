"""y = x, keeping leak_bytes_per_request bytes per request (row) forever: a deliberate leak.

The kept bytes go to a list on a module that outlives this one: the server drops a model's
own module when it reloads it, which would free a list held here and hide the leak behind
the soak's reload a minute (a leak in a library the model imports survives reloads the same way).
"""

import sys
import types

import numpy as np

_STORE_NAME = "conveyor_soak_leak_store"
STORE = sys.modules.setdefault(_STORE_NAME, types.ModuleType(_STORE_NAME))
if not hasattr(STORE, "kept"):
    STORE.kept = []
PATTERN = bytes(range(256))


class Model:
    def __init__(self, config):
        self.leak_bytes = int(config.parameters["leak_bytes_per_request"])

    def execute(self, inputs):
        x = inputs["x"]
        for _ in range(len(x)):
            # written, not just reserved: the pages count in RSS at once
            STORE.kept.append(PATTERN * (self.leak_bytes // len(PATTERN)))
        return {"y": x.copy()}
