"""Conveyor: put trained models into production.

The public API:

- ``Runtime``: load model versions and run requests in-process through C++ dynamic
  batchers (``infer``, ``infer_async``, ``model_stats``).
- ``MemoryPool``: the size-class caching tensor allocator (``empty``, ``stats``, ``trim``).
- ``ModelConfig``, ``load_model_config``, ``ModelRepository``: the model repository.
- ``conveyor.errors``: every error Conveyor raises, under ``ConveyorError``.
"""

from importlib.metadata import PackageNotFoundError, version

from conveyor import errors
from conveyor.config import ModelConfig, load_model_config
from conveyor.errors import ConveyorError
from conveyor.examples import example_repository
from conveyor.memory import MemoryPool
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime

try:
    __version__ = version("conveyor-serve")
except PackageNotFoundError:  # a source checkout that was not installed
    __version__ = "0.0.0+source"

__all__ = [
    "ConveyorError",
    "MemoryPool",
    "ModelConfig",
    "ModelRepository",
    "Runtime",
    "__version__",
    "errors",
    "example_repository",
    "load_model_config",
]
