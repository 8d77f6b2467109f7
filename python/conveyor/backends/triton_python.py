"""Triton python-backend models, run by Conveyor's python backend.

A model.py written for Triton defines `TritonPythonModel` with `initialize(args)`,
`execute(requests) -> responses` and `finalize()`, and imports
`triton_python_backend_utils`; the python backend loads it when the file has no
Conveyor `Model` class. `TritonModelAdapter` gives it the whole-batch interface:

- `initialize` gets Triton's `args` (model_config as Triton's JSON, model_name,
  model_version, model_repository, model_instance_kind "CPU", ...);
- each batch is one InferenceRequest whose inputs hold every row of the batch, and
  the model answers it with one InferenceResponse (an error response fails the batch
  with the model's message);
- `finalize` runs when the version is unloaded.

`triton_python_backend_utils` is Conveyor's subset (triton_python_utils.py), installed
under that name unless a module of that name is importable already.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from conveyor.backends import triton_python_utils as utils
from conveyor.config import ModelConfig
from conveyor.protocol.model_config import triton_model_config

__all__ = ["TRITON_MODEL_CLASS", "UTILS_MODULE", "TritonModelAdapter", "install_utils_module"]

TRITON_MODEL_CLASS = "TritonPythonModel"
UTILS_MODULE = "triton_python_backend_utils"


def install_utils_module() -> None:
    """Makes `import triton_python_backend_utils` give Conveyor's subset, unless one is importable."""
    if UTILS_MODULE in sys.modules or importlib.util.find_spec(UTILS_MODULE) is not None:
        return
    sys.modules[UTILS_MODULE] = utils


class TritonModelAdapter:
    """A `TritonPythonModel` behind the `execute({input: array}) -> {output: array}` of a Conveyor model."""

    def __init__(self, model_class: type, config: ModelConfig, model_path: Path, version: int | None) -> None:
        self.config = config
        self.model = model_class()
        initialize = getattr(self.model, "initialize", None)
        if callable(initialize):
            initialize(self.arguments(config, Path(model_path), version))

    @staticmethod
    def arguments(config: ModelConfig, model_path: Path, version: int | None) -> dict[str, str]:
        """The `args` Triton passes to `initialize`, all strings as in Triton."""
        return {
            "model_config": json.dumps(triton_model_config(config)),
            "model_instance_kind": "CPU",
            "model_instance_name": f"{config.name}_0",
            "model_instance_device_id": "0",
            "model_repository": str(model_path.parent.parent),
            "model_version": "" if version is None else str(version),
            "model_name": config.name,
        }

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = utils.InferenceRequest(
            model_name=self.config.name,
            inputs=[utils.Tensor(name, array) for name, array in inputs.items()],
            requested_output_names=[tensor.name for tensor in self.config.outputs],
        )
        responses = self.model.execute([request])
        if not isinstance(responses, (list, tuple)) or len(responses) != 1:
            got = f"{len(responses)} responses" if isinstance(responses, (list, tuple)) else type(responses).__name__
            raise TypeError(f"execute must return a list of one InferenceResponse per request (1 request), got {got}")
        (response,) = responses
        if not isinstance(response, utils.InferenceResponse):
            raise TypeError(f"execute must return InferenceResponse objects, got {type(response).__name__}")
        error = response.error()
        if error is not None:
            message = error.message() if isinstance(error, utils.TritonError) else str(error)
            raise utils.TritonError(f"the model answered with an error: {message}")
        return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}

    def finalize(self) -> None:
        finalize = getattr(self.model, "finalize", None)
        if callable(finalize):
            finalize()
