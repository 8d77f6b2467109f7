"""Reading a `.pt2` package (torch.export + AOTInductor) without importing torch.

A package is a zip whose `<archive>/data/aotinductor/<model>/` folder holds the compiled
model (`*.so`, weights inside it by default), its generated C++ source and a metadata
JSON (`AOTI_DEVICE_KEY`). The compiled model's C interface reports input and output
names but no dtypes or shapes; the only record of them a stock package carries is the
generated wrapper source, whose per-input checks (`check_input_<i>`) state each input's
dtype, each static dim and the bounds of each dynamic one (the `Dim(min, max)` given to
torch.export). `read_package` parses those checks; outputs are measured by running the
model (torch_aoti.py). A package without them (built from source only, or by a torch
that writes no checks) can still be served when config.toml lists its tensors.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConfigError

__all__ = ["InputSignature", "Package", "libtorch_path", "read_package"]

# torch's dtype getter names (aoti_torch_dtype_<name>) as v2 datatypes.
DATATYPE_BY_TORCH_DTYPE = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64",
}  # fmt: skip

INSTALL_ADVICE = "install torch with `pip install conveyor-serve[torch]`"


@dataclass(frozen=True)
class InputSignature:
    """One model input as the package's generated checks state it."""

    datatype: str  # v2 name, e.g. "FP32"
    dims: list[int]  # -1: a dynamic dim
    lower: list[int]  # per dim: the smallest size accepted (the static size for a static dim)
    upper: list[int | None]  # per dim: the largest (None: unbounded)

    def dynamic(self, dim: int) -> bool:
        """Whether dim `dim` was exported dynamic."""
        return self.dims[dim] == -1


@dataclass
class Package:
    """A package's compiled model, extracted to a private folder the caller removes (`remove`)."""

    path: Path
    folder: Path  # the extracted data/aotinductor/<model>/
    model_so: Path
    inputs: list[InputSignature] | None  # None: the package states no input signature

    def remove(self) -> None:
        """Delete the extracted files (a loaded model keeps its mapping of the .so)."""
        shutil.rmtree(self.folder.parent, ignore_errors=True)


def libtorch_path() -> Path:
    """libtorch_cpu.so of the installed torch, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the torch backend needs PyTorch, which is not installed: {INSTALL_ADVICE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtorch_cpu.so"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the installed torch is incomplete; reinstall it ({INSTALL_ADVICE})")
    return path


def read_package(path: Path, model_name: str = "model") -> Package:
    """Extract the compiled model of package `path` and read its input signature."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(
            f"{path}: not a readable .pt2 package ({exc}); export it with "
            "torch._inductor.aoti_compile_and_package(torch.export.export(...), package_path=...)"
        ) from exc
    with archive:
        members = _model_members(archive, path, model_name)
        model_dir = Path(tempfile.mkdtemp(prefix="conveyor-torch-")) / model_name
        model_dir.mkdir()
        try:
            for member in members:
                target = model_dir / Path(member).name
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
            raise ConfigError(f"{path}: the package is damaged ({exc}); export it again") from exc
    package = Package(path, model_dir, next(model_dir.glob("*.so")), None)
    try:
        _check_device(package)
        package.inputs = _input_signature(package)
    except BaseException:
        package.remove()
        raise
    return package


def _model_members(archive: zipfile.ZipFile, path: Path, model_name: str) -> list[str]:
    marker = f"data/aotinductor/{model_name}/"
    members = [n for n in archive.namelist() if (n.startswith(marker) or f"/{marker}" in n) and not n.endswith("/")]
    if not members:
        found = sorted({m.group(1) for n in archive.namelist() if (m := re.search(r"data/aotinductor/([^/]+)/", n))})
        raise ConfigError(
            f"{path}: no compiled model '{model_name}' in the package"
            + (f" (it holds {', '.join(found)})" if found else " (it holds no AOTInductor model at all)")
            + "; export it with torch._inductor.aoti_compile_and_package"
        )
    if not any(n.endswith(".so") for n in members):
        raise ConfigError(
            f"{path}: the package holds the model's source but no compiled .so; export it without "
            "aot_inductor.package_cpp_only"
        )
    return members


def _check_device(package: Package) -> None:
    for metadata in package.folder.glob("*wrapper_metadata.json"):
        try:
            device = json.loads(metadata.read_text()).get("AOTI_DEVICE_KEY", "cpu")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{package.path}: unreadable package metadata ({exc}); export it again") from exc
        if device != "cpu":
            raise ConfigError(
                f"{package.path}: the model was compiled for device '{device}'; this backend runs CPU models "
                "(export it with the model and example inputs on the CPU)"
            )


_CHECK = re.compile(r"static void check_input_(\d+)\(")
_DTYPE = re.compile(r"_expected_dtype = aoti_torch_dtype_(\w+)\(\)")
_INDEX = re.compile(r"_(?:size|stride)\[(\d+)\]")
_STATIC = re.compile(r"if \((\d+) != \w+_size\[(\d+)\]\)")
_LOWER = re.compile(r"_size\[(\d+)\] < (\d+)\)")
_UPPER = re.compile(r"_size\[(\d+)\] > (\d+)\)")


def _input_signature(package: Package) -> list[InputSignature] | None:
    wrappers = list(package.folder.glob("*.wrapper.cpp"))
    if len(wrappers) != 1:
        return None
    text = wrappers[0].read_text(errors="replace")
    parts = _CHECK.split(text)
    # parts: [prefix, index0, body0, index1, body1, ...]; a body runs to the next check.
    bodies = {int(parts[i]): parts[i + 1].split("AOTI_NOINLINE", 1)[0] for i in range(1, len(parts) - 1, 2)}
    if not bodies or sorted(bodies) != list(range(len(bodies))):
        return None
    signature = []
    for index in range(len(bodies)):
        body = bodies[index]
        dtype = _DTYPE.search(body)
        if dtype is None or dtype.group(1) not in DATATYPE_BY_TORCH_DTYPE:
            return None
        ndim = max((int(m.group(1)) + 1 for m in _INDEX.finditer(body)), default=0)
        dims, lower, upper = [-1] * ndim, [0] * ndim, [None] * ndim
        for m in _STATIC.finditer(body):
            size, dim = int(m.group(1)), int(m.group(2))
            dims[dim] = lower[dim] = upper[dim] = size
        for m in _LOWER.finditer(body):
            lower[int(m.group(1))] = int(m.group(2))
        for m in _UPPER.finditer(body):
            upper[int(m.group(1))] = int(m.group(2))
        signature.append(InputSignature(DATATYPE_BY_TORCH_DTYPE[dtype.group(1)], dims, lower, upper))
    return signature
