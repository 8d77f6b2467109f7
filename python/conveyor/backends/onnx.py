"""Run model.onnx with onnxruntime, one session shared by every instance."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from conveyor.backends.base import Backend
from conveyor.config import TENSOR_NAME_PATTERN, ModelConfig, TensorConfig
from conveyor.errors import ConfigError, ModelExecutionError, Unavailable

logger = logging.getLogger(__name__)

# max_batch_size for a config that sets none, of a graph whose first dims are all variable
# (Triton's auto-complete batches such a model too). Rows a request or a batch may hold.
AUTO_MAX_BATCH_SIZE = 32

DATATYPE_BY_ORT_TYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class GraphTensor(NamedTuple):
    """A graph input or output as onnxruntime reports it."""

    name: str
    ort_type: str  # e.g. "tensor(float)"; sequences and maps are not servable
    shape: list[int | None]  # None: a symbolic or unknown dim

    @property
    def datatype(self) -> str:
        return DATATYPE_BY_ORT_TYPE.get(self.ort_type, self.ort_type)


class OnnxBackend(Backend):
    kind = "onnx"
    # InferenceSession.run is thread-safe and releases the GIL while it computes.
    thread_safe = True

    def __init__(self, config: ModelConfig, model_path: Path, *, version: int | None = None) -> None:
        session = _open_session(model_path, config, _session_options(config))
        inputs, outputs = _graph_signature(session)
        config = _complete_config(config, inputs, outputs, source=str(model_path))
        _check_tensors(config, "input", config.inputs, inputs, source=str(model_path), all_required=True)
        _check_tensors(config, "output", config.outputs, outputs, source=str(model_path), all_required=False)
        super().__init__(config, version)
        self.model_path = Path(model_path)
        self.providers = session.get_providers()
        self._session: ort.InferenceSession | None = session
        # onnxruntime's string tensors take str (it would store the repr of a bytes object).
        self._text_inputs = [i for i, tensor in enumerate(config.inputs) if tensor.datatype == "BYTES"]
        logger.debug("%s: loaded %s on %s", self.label, model_path, ", ".join(self.providers))

    def execute(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self._check_callable(inputs)
        session = self._session
        if session is None:
            raise Unavailable(f"{self.label} is closed")
        if self._text_inputs:
            inputs = list(inputs)
            for index in self._text_inputs:
                inputs[index] = self._as_text(self.input_names[index], inputs[index])
        feeds = dict(zip(self.input_names, inputs))
        try:
            return session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime's errors share no base class below Exception
            raise ModelExecutionError(f"{self.label}: onnxruntime: {exc}") from exc

    def _as_text(self, name: str, array: np.ndarray) -> np.ndarray:
        """A BYTES batch input as the UTF-8 text onnxruntime's string tensors hold."""
        text = np.empty(array.shape, dtype=object)
        flat = text.reshape(-1)
        for index, item in enumerate(array.reshape(-1)):
            if isinstance(item, (bytes, bytearray, memoryview)):
                try:
                    item = bytes(item).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ModelExecutionError(
                        f"{self.label}: input '{name}' element {index} is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); onnxruntime string tensors hold UTF-8 text only"
                    ) from None
            flat[index] = item
        return text

    def close(self) -> None:
        # Dropping the last reference frees the session; a run in flight holds its own.
        self._session = None
        super().close()


def fill_config_from_onnx(config: ModelConfig, model_path: Path) -> ModelConfig:
    """`config` with omitted inputs/outputs read from the ONNX graph (Triton's auto-complete)."""
    if config.inputs and config.outputs:
        return config
    options = ort.SessionOptions()
    # Only the signature is wanted: skip optimizing, use no thread pool.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = _open_session(model_path, config, options, providers=["CPUExecutionProvider"])
    inputs, outputs = _graph_signature(session)
    return _complete_config(config, inputs, outputs, source=str(model_path))


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.onnx.intra_op_threads
    options.inter_op_num_threads = config.onnx.inter_op_threads
    # Parallelism comes from instances running batches side by side, not from
    # running independent graph branches of one batch at once.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[config.onnx.graph_optimization]
    return options


def _providers(config: ModelConfig) -> list[str | tuple[str, dict[str, str]]]:
    device = config.instance_group.device
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(
            f"model '{config.name}': field 'instance_group.device': {device!r} needs onnxruntime-gpu, "
            f"but the installed onnxruntime offers only {', '.join(available)}"
        )
    device_id = device.partition(":")[2] or "0"
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def _open_session(
    model_path: Path,
    config: ModelConfig,
    options: ort.SessionOptions,
    *,
    providers: list[str | tuple[str, dict[str, str]]] | None = None,
) -> ort.InferenceSession:
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ConfigError(f"{model_path}: no such model file")
    chosen = _providers(config) if providers is None else providers
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime's errors share no base class below Exception
        raise ConfigError(f"{model_path}: onnxruntime cannot load it: {exc}") from exc


def _graph_signature(session: ort.InferenceSession) -> tuple[list[GraphTensor], list[GraphTensor]]:
    def describe(node: ort.NodeArg) -> GraphTensor:
        shape = [dim if isinstance(dim, int) and dim > 0 else None for dim in (node.shape or [])]
        return GraphTensor(node.name, node.type, shape)

    return [describe(node) for node in session.get_inputs()], [describe(node) for node in session.get_outputs()]


def _render_dims(dims: list[int | None]) -> str:
    return "[" + ", ".join("-1" if dim is None else str(dim) for dim in dims) + "]"


def _config_dims(config: ModelConfig, kind: str, graph: GraphTensor, source: str) -> list[int]:
    """The config dims for a graph tensor: its shape without the batch dim, -1 where variable."""
    shape = graph.shape
    if config.max_batch_size > 0:
        if not shape or shape[0] is not None:
            raise ConfigError(
                f"{source}: {kind} '{graph.name}': expected a variable first (batch) dim because "
                f"max_batch_size is {config.max_batch_size}, got shape {_render_dims(shape)}; "
                "set max_batch_size = 0 to serve a model with fixed shapes"
            )
        shape = shape[1:]
    return [-1 if dim is None else dim for dim in shape]


def _complete_config(
    config: ModelConfig, inputs: list[GraphTensor], outputs: list[GraphTensor], *, source: str
) -> ModelConfig:
    updates: dict[str, Any] = {}
    if _batches_by_default(config, inputs, outputs):
        updates["max_batch_size"] = AUTO_MAX_BATCH_SIZE
        config = config.model_copy(update=updates)
        logger.info(
            "%s: model '%s' batches up to %d rows (the graph's first dims are all variable and config.toml sets "
            "no max_batch_size; set it to choose, or to 0 to turn batching off)", source, config.name,
            AUTO_MAX_BATCH_SIZE,
        )  # fmt: skip
    for field, kind, graph_tensors in (("inputs", "input", inputs), ("outputs", "output", outputs)):
        if getattr(config, field):
            continue
        tensors = []
        for graph in graph_tensors:
            if graph.ort_type not in DATATYPE_BY_ORT_TYPE or not re.fullmatch(TENSOR_NAME_PATTERN, graph.name):
                raise ConfigError(
                    f"{source}: {kind} '{graph.name}' cannot be described automatically "
                    f"(unsupported type or name); list the model's {field} in its config.toml"
                )
            dims = _config_dims(config, kind, graph, source)
            tensors.append(TensorConfig(name=graph.name, datatype=graph.datatype, dims=dims))
        updates[field] = tensors
    if updates:
        logger.debug("%s: filled %s of model '%s' from the graph", source, " and ".join(updates), config.name)
    return config.model_copy(update=updates) if updates else config


def _batches_by_default(config: ModelConfig, inputs: list[GraphTensor], outputs: list[GraphTensor]) -> bool:
    """Triton's auto-complete of the batch dimension: a config that declares no tensors and
    no max_batch_size, for a graph whose every input and output starts with a variable dim."""
    if "max_batch_size" in config.model_fields_set or config.inputs or config.outputs:
        return False
    tensors = inputs + outputs
    return bool(tensors) and all(tensor.shape and tensor.shape[0] is None for tensor in tensors)


def _check_tensors(
    config: ModelConfig,
    kind: str,
    configured: list[TensorConfig],
    graph_tensors: list[GraphTensor],
    *,
    source: str,
    all_required: bool,
) -> None:
    """Raise ConfigError at the first config tensor the graph disagrees with."""
    by_name = {graph.name: graph for graph in graph_tensors}
    graph_names = ", ".join(by_name)
    configured_names = {tensor.name for tensor in configured}
    for graph in graph_tensors:
        if all_required and graph.name not in configured_names:
            raise ConfigError(f"{source}: the model's {kind} '{graph.name}' is missing from the config's {kind}s")
    for tensor in configured:
        graph = by_name.get(tensor.name)
        if graph is None:
            raise ConfigError(f"{source}: {kind} '{tensor.name}': expected one of the model's {kind}s ({graph_names})")
        if graph.datatype != tensor.datatype:
            raise ConfigError(
                f"{source}: {kind} '{tensor.name}': expected datatype {graph.datatype} (the model's), "
                f"got {tensor.datatype} (the config's)"
            )
        model_dims = _config_dims(config, kind, graph, source)
        compatible = len(model_dims) == len(tensor.dims) and all(
            model_dim in (-1, dim) for model_dim, dim in zip(model_dims, tensor.dims)
        )
        if not compatible:
            raise ConfigError(
                f"{source}: {kind} '{tensor.name}': expected dims {_render_dims(model_dims)} "
                f"(the model's, -1 = variable), got {tensor.dims} (the config's)"
            )
