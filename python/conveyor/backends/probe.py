"""The probe batch: a graph model's declared signature checked by running it once at load.

The onnx and native backends fill a config's inputs and outputs from the graph and
check the declared ones against it, but a graph's symbolic dimensions and a config's
hand-written ones can still disagree with what the model computes. So before a
version takes traffic, one batch of zeros (one row; a variable dimension as 1; BYTES
as the string "0") runs through the backend (outside the batcher: it is not counted as
a request), and every output it returns is compared with the backend's config (for a
model with pre- or post-processing steps, the tensors the model itself takes and
gives). A mismatch, or a probe the model cannot run, fails the load with the tensor's
name and both shapes; the other models serve.
"""

from __future__ import annotations

import numpy as np

from collections.abc import Callable, Sequence

from conveyor.config import ModelConfig, TensorConfig
from conveyor.errors import ConfigError, ConveyorError

__all__ = ["PROBED_BACKENDS", "probe_signature"]

# Backends whose signature comes from an artefact (a graph, a tree file), not user code:
# running them has no side effect, so they are probed. Python models are not.
PROBED_BACKENDS = frozenset({"onnx", "native", "trees", "torch"})


Run = Callable[[tuple[np.ndarray, ...]], Sequence[np.ndarray]]


def probe_signature(label: str, config: ModelConfig, run: Run) -> None:
    """Runs one batch of zeros made for `config`'s inputs through `run` (the backend's
    execute) and checks the outputs it returns, in config order, against `config`'s."""
    batch = [1] if config.max_batch_size > 0 else []
    inputs = []
    for tensor in config.inputs:
        shape = batch + [1 if dim == -1 else dim for dim in tensor.dims]
        if tensor.datatype == "BYTES":
            inputs.append(np.full(shape, b"0", dtype=object))
        elif tensor.datatype in ("BF16",):
            return  # numpy cannot make the batch; the graph check at load stands alone
        else:
            inputs.append(np.zeros(shape, dtype=tensor.numpy_dtype))
    described = ", ".join(f"{t.name} {t.datatype} {list(a.shape)}" for t, a in zip(config.inputs, inputs))
    try:
        outputs = run(tuple(inputs))
    except ConveyorError as exc:
        raise ConfigError(
            f"{label}: the probe batch at load ({described}, all zeros) failed, so the model is not "
            f"served: {exc}"
        ) from exc
    problems = [
        problem for tensor, array in zip(config.outputs, outputs)
        if (problem := _mismatch(tensor, np.asarray(array), batch)) is not None
    ]  # fmt: skip
    if problems:
        raise ConfigError(
            f"{label}: the probe batch at load ({described}) disagrees with the config: "
            + "; ".join(problems)
            + ". Fix the outputs in config.toml, or leave them out to take the model's own"
        )


def _mismatch(tensor: TensorConfig, array: np.ndarray, batch: list[int]) -> str | None:
    expected = batch + list(tensor.dims)
    rendered = "[" + ", ".join("-1" if dim == -1 else str(dim) for dim in expected) + "]"
    dtype = tensor.numpy_dtype
    same_dtype = array.dtype == dtype or (tensor.datatype == "BYTES" and array.dtype.kind in "OSU")
    same_shape = array.ndim == len(expected) and all(want in (-1, got) for want, got in zip(expected, array.shape))
    if same_dtype and same_shape:
        return None
    return (
        f"output '{tensor.name}': the config declares {tensor.datatype} {rendered}, "
        f"the model returned {array.dtype} {list(array.shape)}"
    )
