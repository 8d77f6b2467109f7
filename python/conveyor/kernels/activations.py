"""Post-processing over the last axis: softmax, softmax_topk, argmax, layer_norm.

Every function takes a C-contiguous float32 array of any rank and works on rows of its
last axis. NaN: a row holding NaN gives NaN softmax / layer_norm outputs and NaN
softmax_topk values; argmax and softmax_topk rank NaN above +inf (numpy's order), so
argmax returns the first NaN. Ties go to the lower index. ``threads`` splits the rows on
the CPU; CuPy inputs run on the GPU instead (``threads`` does not apply there). Bad
shapes or dtypes raise ``InvalidInput`` naming the argument; ``out=`` arrays must have
the exact shape and dtype and must not overlap the inputs, except that softmax and
layer_norm accept ``out=x`` (in place).
"""

from __future__ import annotations

from typing import Any

from conveyor import _core
from conveyor.kernels import _device

__all__ = ["argmax", "layer_norm", "softmax", "softmax_topk"]


def softmax(x: Any, *, out: Any = None, threads: int = 1) -> Any:
    """``exp(x - max) / sum(exp(x - max))`` over the last axis; ``out=x`` works in place."""
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().softmax(x, out=out)
    return _core.kernels_softmax(x, out=out, threads=threads)


def softmax_topk(x: Any, k: int, *, out: Any = None, threads: int = 1) -> tuple[Any, Any]:
    """The k most probable classes per row: ``(values, indices)``, best first.

    ``values`` (float32) equal ``softmax(x)`` at ``indices`` (int64), both of shape
    ``x.shape[:-1] + (k,)``, but the full probability array is never written: the top k
    is chosen on the logits and only k exponentials are scaled. ``1 <= k <=
    x.shape[-1]``. ``out``: a ``(values, indices)`` pair of arrays.
    """
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().softmax_topk(x, k, out=out)
    return _core.kernels_softmax_topk(x, k, out=out, threads=threads)


def argmax(x: Any, *, out: Any = None, threads: int = 1) -> Any:
    """Index (int64) of the largest value over the last axis: the first one on ties."""
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().argmax(x, out=out)
    return _core.kernels_argmax(x, out=out, threads=threads)


def layer_norm(
    x: Any,
    gamma: Any = None,
    beta: Any = None,
    *,
    epsilon: float = 1e-5,
    out: Any = None,
    threads: int = 1,
) -> Any:
    """``(x - mean) / sqrt(var + epsilon) * gamma + beta`` over the last axis.

    The population variance (divided by the row length), as ONNX LayerNormalization and
    ``torch.nn.LayerNorm``. ``gamma`` and ``beta``: float32 arrays of shape
    ``(x.shape[-1],)``, or None for 1 and 0. ``out=x`` works in place.
    """
    if _device.is_cuda_array(x):
        return _device.cuda_kernels().layer_norm(x, gamma, beta, epsilon=epsilon, out=out)
    return _core.kernels_layer_norm(x, gamma, beta, epsilon=epsilon, out=out, threads=threads)
