"""Image pre-processing: uint8 NHWC batches to normalized float tensors in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.errors import InvalidInput
from conveyor.kernels import _device

__all__ = ["normalize_image"]


def normalize_image(
    images: Any,
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    *,
    scale: float = 1.0 / 255.0,
    layout: str = "NCHW",
    dtype: Any = None,
    out: Any = None,
    threads: int = 1,
) -> Any:
    """``(images * scale - mean[c]) / std[c]`` for a uint8 ``[N, H, W, C]`` batch.

    One pass over the input, computed as ``images * a[c] + b[c]`` (so it differs from the
    two-step formula by float rounding only). ``layout``: ``"NCHW"`` (``[N, C, H, W]``,
    what most vision models take) or ``"NHWC"``. ``dtype``: ``float32`` or ``float16``
    (round to nearest even); by default ``out``'s dtype, else ``float32``. ``mean`` and
    ``std`` hold one value per channel (``std`` finite and non-zero); the default ``scale``
    maps bytes to ``[0, 1]``, as torchvision's ``ToTensor`` does before ``Normalize``.

    ``out``: a C-contiguous array of the output shape and dtype (a pooled one,
    ``MemoryPool().empty(...)``, spares the page faults of fresh memory); it must not
    overlap ``images``. ``threads`` splits the image rows on the CPU. CuPy inputs run on
    the GPU (``threads`` does not apply there). Bad shapes or dtypes raise
    ``InvalidInput`` naming the argument. Returns ``out`` or the new array.
    """
    if _device.is_cuda_array(images):
        return _device.cuda_kernels().normalize_image(
            images, mean, std, scale=scale, layout=layout, dtype=dtype, out=out
        )
    return _core.kernels_normalize_image(
        images,
        _per_channel(mean, "mean"),
        _per_channel(std, "std"),
        scale=scale,
        layout=layout,
        dtype=dtype,
        out=out,
        threads=threads,
    )


def _per_channel(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    # Sequences and other dtypes become float32; the core checks the length.
    if isinstance(values, np.ndarray) and values.dtype == np.float32 and values.flags.c_contiguous:
        return values
    try:
        return np.ascontiguousarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"[kernels] normalize_image: {name} must be numbers, one per channel ({error})") from None
