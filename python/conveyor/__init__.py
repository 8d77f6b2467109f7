"""Conveyor: put trained models into production.

The public API:

- ``Runtime``: load model versions and run requests in-process through C++ dynamic
  batchers (``infer``, ``infer_async``, ``model_stats``), with the learning loop
  (``conveyor.monitor``) for models whose config asks for it (``add_feedback``,
  ``monitor_document``).
- ``conveyor.deploy.Rollouts``: rollouts (canary, A/B/n, shadow, blue-green) over a
  ``Runtime``: start, steer, tick, and requests routed through them.
- ``MemoryPool``: the size-class caching tensor allocator (``empty``, ``stats``, ``trim``).
- ``ModelConfig``, ``load_model_config``, ``ModelRepository``: the model repository.
- ``import_model``: a trained model (XGBoost, LightGBM, scikit-learn trees, or a model
  file) into a repository, checked for parity with its source.
- ``export_torch``: a PyTorch module into a repository as a compiled ``.pt2`` with a
  dynamic batch dim, checked for parity with eager PyTorch.
- ``conveyor.errors``: every error Conveyor raises, under ``ConveyorError``.
"""

from importlib.metadata import PackageNotFoundError, version

from conveyor import errors
from conveyor.config import ModelConfig, load_model_config
from conveyor.errors import ConveyorError
from conveyor.examples import example_repository
from conveyor.memory import MemoryPool
from conveyor.repository import ModelRepository
from conveyor.runtime import Runtime as _CoreRuntime


class Runtime(_CoreRuntime):
    """conveyor.runtime.Runtime with the learning loop: monitored configs just work.

    The runtime layer does not import conveyor.monitor (it sits beside it); this public
    class, above both, hands the runtime the monitor factory.
    """

    def __init__(self, *, pool: object = None, data_dir: object = None, **options: object) -> None:
        options.setdefault("monitor_factory", _create_model_monitor)
        super().__init__(pool=pool, data_dir=data_dir, **options)


def _create_model_monitor(config: object, **arguments: object) -> object:
    # Imported when a monitored model loads, so `import conveyor` stays light.
    from conveyor.monitor import create_model_monitor

    return create_model_monitor(config, **arguments)


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
    "export_torch",
    "import_model",
    "load_model_config",
]


def import_model(
    source: object, *, repository: object, name: str, sample: object = None, tolerance: float | None = None
) -> object:
    """Add a trained model (an XGBoost, LightGBM or scikit-learn tree model object, or a
    model file) to a repository as its next version, checked for parity with the source
    (conveyor.model_import; also `conveyor import` on the command line)."""
    from conveyor.model_import import DEFAULT_TOLERANCE
    from conveyor.model_import import import_model as _import_model

    return _import_model(source, repository=repository, name=name, sample=sample,
                         tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)  # fmt: skip


def export_torch(
    factory: object, *, example_inputs: object, repository: object, name: str, max_batch_size: int | None = None,
    tolerance: float | None = None,
) -> object:  # fmt: skip
    """Export a PyTorch model ("FILE.py:FUNCTION", a function returning a torch.nn.Module, or the module)
    as the next .pt2 version of `name` in `repository`, with a dynamic batch dim, checked for parity
    with eager PyTorch on `example_inputs` (conveyor.torch_export; also `conveyor export-torch`)."""
    from conveyor import torch_export

    return torch_export.export_torch(
        factory, example_inputs=example_inputs, repository=repository, name=name,
        max_batch_size=torch_export.DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
        tolerance=torch_export.DEFAULT_TOLERANCE if tolerance is None else tolerance,
    )  # fmt: skip
