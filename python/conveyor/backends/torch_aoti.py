"""Serve model.pt2 (torch.export + AOTInductor) from C++: no Python and no GIL per batch.

The loader here is thin: torch_package.py extracts the package's compiled model and
reads its input signature; a C++ TorchModel (cpp/include/conveyor/torch_model.h) opens
the compiled model through its C interface, with one model copy per instance
(`instance_group.count`) sharing the weights, and the extracted files are deleted
again. The runtime hands that TorchModel to the batcher as its executor
(`native_executor`), so batches run on the instance threads without the GIL. torch is
never imported: only its libtorch_cpu.so is opened.

The signature fills what config.toml leaves out. Inputs: names from the compiled model,
dtypes and dims from the package (a dim exported dynamic is -1). Outputs: names from
the compiled model, dtypes and dims measured by running two batches of zeros of
different sizes at load (a dim that changes with the inputs' dynamic dims is -1).
Declared tensors are matched to the model's by position, so config.toml may rename
them. Batching needs a dynamic first dim on every input, exported with
`torch.export.Dim("batch", min=1, max=N)`; a max_batch_size above N is refused.

Loading is cheap: measured on 2 vCPUs for a small package, the first load in a process
took 164 ms (most of it opening libtorch_cpu.so) and later ones 3 ms, against 2.8 s and
16-20 ms for torch._inductor.aoti_load_package (which imports torch first).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.backends.base import CoreExecutorBackend
from conveyor.backends.onnx import AUTO_MAX_BATCH_SIZE
from conveyor.backends.torch_package import InputSignature, libtorch_path, read_package
from conveyor.config import NUMPY_DTYPE_BY_DATATYPE, TENSOR_NAME_PATTERN, ModelConfig, TensorConfig
from conveyor.errors import ConfigError, ConveyorError

logger = logging.getLogger(__name__)

__all__ = ["TorchBackend"]

_DATATYPE_BY_NUMPY = {np.dtype(dtype): name for name, dtype in NUMPY_DTYPE_BY_DATATYPE.items() if name != "BYTES"}


class TorchBackend(CoreExecutorBackend):
    kind = "torch"
    # TorchModel.run may be called from every instance thread at once (one model copy each).
    thread_safe = True

    def __init__(self, config: ModelConfig, model_path: Path, *, version: int | None = None) -> None:
        model_path = Path(model_path)
        source = str(model_path)
        library = libtorch_path()
        package = read_package(model_path)
        try:
            model = _core.TorchModel(
                libtorch_path=str(library), model_so_path=str(package.model_so), model_dir=str(package.folder),
                num_models=config.instance_group.count, intra_op_threads=config.torch.intra_op_threads,
            )  # fmt: skip
        except ConveyorError as exc:
            raise ConfigError(f"{source}: the compiled model cannot be loaded: {exc}") from exc
        finally:
            package.remove()  # the loaded model keeps its own mapping of the .so
        config = _complete_config(config, model, package.inputs, source)
        super().__init__(config, version)
        self.model_path = model_path
        # The batcher's executor: run in C++ on the instance threads.
        self.native_executor: Any = model
        logger.debug("%s: loaded %s (%d model copies)", self.label, model_path, model.num_models)

    def _arrays(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [
            np.ascontiguousarray(x) if t.datatype == "BF16" else np.ascontiguousarray(x, dtype=t.numpy_dtype)
            for t, x in zip(self.config.inputs, inputs)
        ]  # fmt: skip


def _complete_config(
    config: ModelConfig, model: Any, signature: list[InputSignature] | None, source: str
) -> ModelConfig:
    names = list(model.input_names)
    if signature is None:
        if not config.inputs or not config.outputs:
            raise ConfigError(
                f"{source}: the package states no input dtypes and shapes; list the model's inputs and outputs "
                "in its config.toml"
            )
        signature = [InputSignature(t.datatype, [-1] * len(t.dims), [1] * len(t.dims), [None] * len(t.dims))
                     for t in config.inputs]  # fmt: skip
    elif len(signature) != len(names):
        raise ConfigError(f"{source}: the package describes {len(signature)} inputs, its model takes {len(names)}")
    _check_count(config.inputs, names, "input", source)
    batch_upper = _batch_upper(signature)
    if "max_batch_size" not in config.model_fields_set and not config.inputs and batch_upper is not None:
        config = config.model_copy(update={"max_batch_size": min(AUTO_MAX_BATCH_SIZE, batch_upper)})
        logger.info("%s: model '%s' batches up to %d rows (the package's batch dim is dynamic and config.toml sets "
                    "no max_batch_size)", source, config.name, config.max_batch_size)  # fmt: skip
    if config.max_batch_size > 0:
        _check_batch_range(config, signature, names, batch_upper, source)
    batched = config.max_batch_size > 0
    model_inputs = [
        TensorConfig(name=name, datatype=sig.datatype, dims=sig.dims[1:] if batched else sig.dims)
        for name, sig in zip(names, signature)
    ]  # fmt: skip
    inputs = _merge(config.inputs, model_inputs, "input", source)
    model_outputs = _measure_outputs(model, signature, batched, source)
    _check_count(config.outputs, list(model.output_names), "output", source)
    outputs = _merge(config.outputs, model_outputs, "output", source)
    return config.model_copy(update={"inputs": inputs, "outputs": outputs})


def _check_count(declared: list[TensorConfig], names: list[str], kind: str, source: str) -> None:
    if declared and len(declared) != len(names):
        raise ConfigError(
            f"{source}: the config lists {len(declared)} {kind}s, the model has {len(names)} "
            f"({', '.join(names)}); list all of them in the model's order, or none"
        )


def _batch_upper(signature: list[InputSignature]) -> int | None:
    """The largest batch every input accepts, or None when some input has no dynamic first dim."""
    if not signature or any(not sig.dims or not sig.dynamic(0) for sig in signature):
        return None
    uppers = [sig.upper[0] for sig in signature if sig.upper[0] is not None]
    return min(uppers) if uppers else 2**31 - 1


def _check_batch_range(
    config: ModelConfig, signature: list[InputSignature], names: list[str], upper: int | None, source: str
) -> None:
    wanted = config.max_batch_size
    advice = (
        f"export it again with a dynamic batch dim covering it: torch.export.export(model, args, dynamic_shapes="
        f"{{'<input>': {{0: torch.export.Dim('batch', min=1, max={max(wanted, 2)})}}, ...}}), one entry per input"
    )
    if upper is None:
        fixed = [f"'{n}' {sig.dims}" for n, sig in zip(names, signature) if not sig.dims or not sig.dynamic(0)]
        raise ConfigError(
            f"{source}: max_batch_size = {wanted}, but the package was exported without a dynamic batch dim "
            f"(inputs with a fixed first dim: {', '.join(fixed)}); {advice}; or set max_batch_size = 0 to serve "
            "the exported shapes as they are"
        )
    if wanted > upper:
        raise ConfigError(
            f"{source}: max_batch_size = {wanted} is above the package's batch range (at most {upper} rows); "
            f"{advice}, or set max_batch_size <= {upper}"
        )
    # torch.export records Dim(min=1) as 2 (sizes 0 and 1 are specialised), yet runs 1 row.
    lowest = max(sig.lower[0] for sig in signature)
    if lowest > 2:
        raise ConfigError(
            f"{source}: the package's batch dim starts at {lowest} rows, and a batch may hold a single request; "
            f"{advice}"
        )


def _merge(declared: list[TensorConfig], model: list[TensorConfig], kind: str, source: str) -> list[TensorConfig]:
    """The declared tensors checked against the model's (by position), or the model's.

    A dim either side leaves variable (-1) matches any size; a declared -1 takes the
    model's size where the model's is fixed (e.g. the output a postprocess step reads,
    which the config cannot size before the model is loaded).
    """
    if not declared:
        for tensor in model:
            if not re.fullmatch(TENSOR_NAME_PATTERN, tensor.name):
                raise ConfigError(f"{source}: {kind} '{tensor.name}' has an unservable name; list the {kind}s in "
                                  "config.toml")  # fmt: skip
        return model
    merged = []
    for position, (mine, theirs) in enumerate(zip(declared, model)):
        compatible = len(mine.dims) == len(theirs.dims) and all(
            -1 in (d, t) or d == t for d, t in zip(mine.dims, theirs.dims)
        )
        if mine.datatype != theirs.datatype or not compatible:
            raise ConfigError(
                f"{source}: {kind} '{mine.name}' (position {position}, the model's '{theirs.name}'): the config "
                f"declares {mine.datatype} {mine.dims}, the model has {theirs.datatype} {theirs.dims} (-1 = "
                "variable, batch dim excluded when batching)"
            )
        dims = [t if d == -1 else d for d, t in zip(mine.dims, theirs.dims)]
        merged.append(mine if dims == mine.dims else mine.model_copy(update={"dims": dims}))
    return merged


def _measure_outputs(
    model: Any, signature: list[InputSignature], batched: bool, source: str
) -> list[TensorConfig]:
    """Output dtypes and dims from two runs on zeros: dims that differ between them are -1."""
    if any(sig.datatype == "BF16" for sig in signature):
        raise ConfigError(f"{source}: the model takes BF16 inputs, which numpy cannot make; list its outputs in "
                          "config.toml")  # fmt: skip

    def zeros(grow: int) -> list[np.ndarray]:
        arrays = []
        for sig in signature:
            shape = []
            for dim, size in enumerate(sig.dims):
                if size != -1:
                    shape.append(size)
                    continue
                low = 1 if batched and dim == 0 else max(sig.lower[dim], 1)
                high = sig.upper[dim] if sig.upper[dim] is not None else low + grow
                shape.append(min(low + grow, high))
            arrays.append(np.zeros(shape, dtype=NUMPY_DTYPE_BY_DATATYPE[sig.datatype]))
        return arrays

    try:
        first, second = model.run(zeros(0)), model.run(zeros(1))
    except ConveyorError as exc:
        raise ConfigError(f"{source}: running the model on zeros at load failed: {exc}") from exc
    rows = (1, min(2, _batch_upper(signature) or 1))
    outputs = []
    for name, a, b in zip(model.output_names, first, second):
        if a.dtype not in _DATATYPE_BY_NUMPY:
            raise ConfigError(f"{source}: output '{name}' has dtype {a.dtype}, which Conveyor cannot serve")
        dims = [x if x == y else -1 for x, y in zip(a.shape, b.shape)]
        if batched:
            if not dims or a.shape[0] != rows[0] or b.shape[0] != rows[1]:
                raise ConfigError(
                    f"{source}: output '{name}' does not keep the batch dim first (shapes {list(a.shape)} and "
                    f"{list(b.shape)} for {rows[0]} and {rows[1]} rows); set max_batch_size = 0"
                )
            dims = dims[1:]
        outputs.append(TensorConfig(name=name, datatype=_DATATYPE_BY_NUMPY[a.dtype], dims=dims))
    return outputs
