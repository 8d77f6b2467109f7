"""Where a kernel call runs: numpy arrays on the CPU kernels, CuPy arrays on the CUDA ones."""

from __future__ import annotations

from typing import Any

from conveyor.errors import Unavailable


def is_cuda_array(array: Any) -> bool:
    """True for CuPy arrays (and anything else exposing __cuda_array_interface__)."""
    return hasattr(array, "__cuda_array_interface__")


def cuda_kernels() -> Any:
    """The CUDA implementations (conveyor.kernels.cuda); Unavailable without CUDA support."""
    from conveyor import _core

    if not _core.cuda_built():
        raise Unavailable("CUDA support was not built into this installation: reinstall with CONVEYOR_CUDA=ON "
                          "on a machine with the CUDA toolkit, or pass numpy arrays to run on the CPU")
    if _core.cuda_device_count() == 0:
        raise Unavailable("no CUDA device is visible: pass numpy arrays to run on the CPU")
    from conveyor.kernels import cuda

    return cuda
