"""`conveyor export-torch` and `conveyor.export_torch`: a PyTorch module into a repository as a `.pt2`.

The module comes from a factory (a function in a Python file, called with no
arguments, returning a torch.nn.Module). It is exported with torch.export with every
input's first dim a dynamic batch dim (`Dim("batch", min=1, max=max_batch_size)`),
compiled with AOTInductor into the next version directory (`REPO/NAME/<v>/model.pt2`),
and given a config.toml (backend "torch", max_batch_size) when the model has none.

Parity: the new version is loaded by Conveyor's torch backend (through a Runtime, as it
will be served) and run on the example input; its outputs are compared with eager
PyTorch's on the same input. The largest absolute difference is printed and written
into the config's [parameters] (export_max_abs_difference); an export whose difference
exceeds the tolerance is refused, and what it wrote is removed. Writing the version and
the config, and recording the parity, are shared with `conveyor import` (model_import).

Example inputs (one per forward argument, in order):
- FILE.npy: the array in the file; FILE.npz: every array in the file, in the file's order;
- SHAPE:DTYPE[:LOW:HIGH], e.g. 8x128:float32 or 8x16:int64:0:1000: seeded random data
  (floats standard normal; integers uniform in [LOW, HIGH), default [0, 10); bools fair).
The first dim of each is the batch dim: every input has the same number of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.backends.torch_package import INSTALL_ADVICE
from conveyor.config import MODEL_NAME_PATTERN
from conveyor.errors import ConfigError
from conveyor.model_import import new_version, record_parameters, write_config

__all__ = ["ExportRefused", "ExportResult", "example_arrays", "export_torch", "register_export_torch_command"]

DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_BATCH_SIZE = 64
EXAMPLE_SEED = 0
_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_SPEC = re.compile(r"(?P<shape>\d+(?:x\d+)*):(?P<dtype>\w+)(?::(?P<low>-?\d+):(?P<high>-?\d+))?")
SPEC_HELP = (
    "FILE.npy (one array), FILE.npz (its arrays, in order), or SHAPE:DTYPE[:LOW:HIGH] for seeded random data, "
    f"e.g. 8x128:float32 or 8x16:int64:0:1000 (DTYPE one of {', '.join(_DTYPES)}; integers uniform in "
    "[LOW, HIGH), default [0, 10))"
)


class ExportRefused(ConfigError):
    """The compiled model's answers differ from eager PyTorch's by more than the tolerance."""


@dataclass
class ExportResult:
    """Where the export went and how close the compiled model's answers are to eager PyTorch's."""

    version_dir: Path
    max_batch_size: int
    max_abs_difference: float
    rows: int  # rows of the example input the parity was checked on


def export_torch(
    factory: str | Callable[[], Any] | Any,
    *,
    example_inputs: Sequence[str | Path | np.ndarray],
    repository: str | Path,
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export a PyTorch model as the next `.pt2` version of `name` in `repository`, checked for parity.

    `factory`: "FILE.py:FUNCTION", a function returning a torch.nn.Module, or the module.
    `example_inputs`: one per forward argument (arrays, or specs as `example_arrays` reads).
    ConfigError when the factory, the inputs or the model cannot be exported (nothing is
    written then); ExportRefused when the parity fails the tolerance (nothing is left behind).
    """
    torch = _import_torch()
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size (--max-batch-size) must be >= 1, got {max_batch_size}")
    if not re.fullmatch(MODEL_NAME_PATTERN, name):  # before the minutes of exporting, not after
        raise ConfigError(f"invalid model name {name!r}: expected letters, digits, '_', '.' or '-'")
    described = factory if isinstance(factory, str) else _describe(factory)
    module = _module(torch, factory, described)
    arrays = example_arrays(example_inputs)
    rows = _check_rows(arrays, max_batch_size)
    expected = _eager(torch, module, arrays, described)
    program = _export(torch, module, arrays, max_batch_size, described)
    with new_version(Path(repository), name) as (model_dir, version_dir, created_config):
        _compile(torch, program, version_dir / "model.pt2", described)
        config = write_config(model_dir, "torch", created_config, {"max_batch_size": max_batch_size})
        difference = _parity(config, version_dir, arrays, expected)
        if not difference <= tolerance:
            raise ExportRefused(
                f"export of {described} refused: the compiled model's answers differ from eager PyTorch's by up to "
                f"{difference:.3g} on the {rows}-row example input, over the tolerance {tolerance:g} (raise "
                "--tolerance if that is expected, e.g. for float16 models)"
            )
        record_parameters(model_dir, {"export_source": described, "export_max_abs_difference": difference,
                                      "export_example_rows": rows})  # fmt: skip
    return ExportResult(version_dir, config.max_batch_size, difference, rows)


# ---- the model and its example input ------------------------------------------------------------


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"exporting a PyTorch model needs PyTorch, which is not installed: {INSTALL_ADVICE}") from None
    return torch


def load_factory(spec: str) -> Callable[[], Any]:
    """The function named by "FILE.py:FUNCTION", imported from the file."""
    path_text, colon, attribute = spec.rpartition(":")
    if not colon or not path_text or not attribute.isidentifier():
        raise ConfigError(f"{spec!r}: expected FILE.py:FACTORY, e.g. models/net.py:build (a function returning "
                          "the torch.nn.Module)")  # fmt: skip
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the Python file that defines {attribute}()")
    module_name = f"conveyor_export_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{path}: not a Python file that can be imported; pass a .py file")
    source_module = importlib.util.module_from_spec(loader_spec)
    # Registered while it runs, as an import would (dataclasses and pickling look modules up there);
    # the file's folder on the path, so it can import its neighbours.
    sys.modules[module_name] = source_module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        loader_spec.loader.exec_module(source_module)
    except Exception as exc:  # the user's file: any error it raises is reported, not a traceback
        sys.modules.pop(module_name, None)
        raise ConfigError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(source_module, attribute, None)
    if factory is None or not callable(factory):
        found = sorted(n for n, v in vars(source_module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)  # fmt: skip
        what = "no" if factory is None else "a non-callable"
        raise ConfigError(f"{path} has {what} {attribute!r}; the callables it defines: {', '.join(found) or 'none'}")
    return factory


def _module(torch: Any, factory: Any, described: str) -> Any:
    if isinstance(factory, torch.nn.Module):
        return factory.eval()
    if isinstance(factory, str):
        factory = load_factory(factory)
    if not callable(factory):
        raise ConfigError(f"{described}: expected a torch.nn.Module, a function returning one, or 'FILE.py:FUNCTION'")
    try:
        module = factory()
    except Exception as exc:  # the user's factory
        raise ConfigError(f"{described}: calling the factory failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{described}: the factory returned {_describe(module)}, not a torch.nn.Module; return "
                          "the model itself (e.g. `return Net()`)")  # fmt: skip
    return module.eval()


def example_arrays(specs: Sequence[str | Path | np.ndarray]) -> list[np.ndarray]:
    """The example input arrays: each spec an array, a .npy/.npz file, or SHAPE:DTYPE[:LOW:HIGH]."""
    if not specs:
        raise ConfigError(f"an example input is needed, one per forward argument: {SPEC_HELP}")
    rng = np.random.default_rng(EXAMPLE_SEED)
    arrays: list[np.ndarray] = []
    for spec in specs:
        if isinstance(spec, np.ndarray):
            arrays.append(spec)
            continue
        text = str(spec)
        if text.endswith((".npy", ".npz")):
            arrays.extend(_read_arrays(Path(text)))
            continue
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ConfigError(f"example input {text!r}: expected {SPEC_HELP}")
        arrays.append(_random(rng, match, text))
    return arrays


def _read_arrays(path: Path) -> list[np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"example input {path}: no such file")
    try:
        if path.suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        with np.load(path, allow_pickle=False) as data:
            return [data[key] for key in data.files]
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"example input {path}: not a readable numpy file ({exc}); save it with np.save "
                          "or np.savez") from exc  # fmt: skip


def _random(rng: np.random.Generator, match: re.Match[str], text: str) -> np.ndarray:
    shape = tuple(int(size) for size in match["shape"].split("x"))
    dtype = match["dtype"]
    if dtype not in _DTYPES:
        raise ConfigError(f"example input {text!r}: unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("float"):
        if match["low"] is not None:
            raise ConfigError(f"example input {text!r}: LOW:HIGH is for integer inputs; floats are standard normal")
        return rng.standard_normal(shape).astype(dtype)
    low, high = (0, 10) if match["low"] is None else (int(match["low"]), int(match["high"]))
    if low >= high:
        raise ConfigError(f"example input {text!r}: LOW must be below HIGH (integers are drawn from [LOW, HIGH))")
    return rng.integers(low, high, shape).astype(dtype)


def _check_rows(arrays: list[np.ndarray], max_batch_size: int) -> int:
    shapes = ", ".join(str(list(a.shape)) for a in arrays)
    if any(a.ndim == 0 for a in arrays):
        raise ConfigError(f"the example inputs have shapes {shapes}: each needs a first (batch) dim")
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ConfigError(f"the example inputs have shapes {shapes}: every input needs the same number of rows "
                          "(the first dim is the batch dim)")  # fmt: skip
    count = rows.pop()
    if not 1 <= count <= max_batch_size:
        raise ConfigError(f"the example input has {count} rows; give between 1 and --max-batch-size "
                          f"({max_batch_size}) rows")  # fmt: skip
    return count


# ---- export, compile, parity --------------------------------------------------------------------


def _tensors(torch: Any, arrays: list[np.ndarray]) -> list[Any]:
    return [torch.from_numpy(np.array(a, copy=True)) for a in arrays]  # writable copies: torch warns on others


def _leaves(torch: Any, out: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def _eager(torch: Any, module: Any, arrays: list[np.ndarray], described: str) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            out = module(*_tensors(torch, arrays))
    except Exception as exc:  # the user's model
        raise ConfigError(f"{described}: the model fails on the example input ({type(exc).__name__}: {exc}); "
                          "give one example input per forward argument, with its dtype and shape") from exc  # fmt: skip
    leaves = _leaves(torch, out)
    if not leaves:
        raise ConfigError(f"{described}: the model returns no tensor; return a tensor, or a tuple of tensors")
    return [leaf.detach().cpu().numpy() for leaf in leaves]


def _export(torch: Any, module: Any, arrays: list[np.ndarray], max_batch_size: int, described: str) -> Any:
    # Sizes 0 and 1 are specialised by torch.export: it traces a batch of two rows or more.
    tensors = [t if t.shape[0] >= 2 else torch.cat([t, t]) for t in _tensors(torch, arrays)]
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    # A failed trace logs and prints its partial graph; the error below says what to fix instead.
    torch_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # torch's own deprecation notices while it traces
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.export.export(module, tuple(tensors), dynamic_shapes=tuple({0: batch} for _ in tensors))
    except Exception as exc:  # torch's errors for an untraceable model come in many types
        message = str(exc).strip()
        fixed = re.search(r"specialized it to be a constant \((\d+)\)", message)
        if fixed:
            raise ConfigError(
                f"{described}: torch.export cannot make the batch dim dynamic: the model fixes it to "
                f"{fixed.group(1)} rows (most likely a reshape or view with a hard-coded batch size); let forward take any "
                "number of rows, e.g. x.reshape(x.shape[0], -1)"
            ) from exc
        first = " ".join(line.strip() for line in message.splitlines()[:4] if line.strip())
        raise ConfigError(
            f"{described}: torch.export cannot export the model: {type(exc).__name__}: {first[:600]} (forward must "
            "be traceable: no Python branches on tensor values; torch.export.draft_export reports every problem)"
        ) from exc
    finally:
        torch_logger.setLevel(level)


def _compile(torch: Any, program: Any, package: Path, described: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    except Exception as exc:  # compiler and inductor errors
        first = " ".join(str(exc).strip().splitlines()[:4])
        raise ConfigError(f"{described}: compiling with AOTInductor failed: {type(exc).__name__}: {first[:600]} "
                          "(it needs a C++ compiler, g++ or clang++, on PATH)") from exc  # fmt: skip


def _parity(config: Any, version_dir: Path, arrays: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The largest absolute difference between Conveyor's answers and eager PyTorch's, over every output."""
    from conveyor.runtime import Runtime

    with Runtime() as runtime:
        runtime.add_model(config.name, config, model_dir=version_dir, version=int(version_dir.name))
        handle = runtime.model(config.name)
        inputs = {tensor.name: array for tensor, array in zip(handle.config.inputs, arrays)}
        answers = runtime.infer(config.name, inputs)
    ours = [answers[tensor.name] for tensor in handle.config.outputs]
    if len(ours) != len(expected):
        raise ConfigError(f"parity: the compiled model answers {len(ours)} outputs, eager PyTorch {len(expected)}")
    difference = 0.0
    for mine, theirs in zip(ours, expected):
        if mine.shape != theirs.shape:
            raise ConfigError(f"parity: an output has shape {list(mine.shape)} in the compiled model, "
                              f"{list(theirs.shape)} in eager PyTorch")  # fmt: skip
        if mine.size:
            gap = np.abs(mine.astype(np.float64) - theirs.astype(np.float64))
            difference = max(difference, float(np.nanmax(gap)) if not np.isnan(gap).all() else 0.0)
    return difference


def _describe(value: Any) -> str:
    name = getattr(value, "__qualname__", None)
    if callable(value) and name and not hasattr(value, "forward"):
        return f"{getattr(value, '__module__', '?')}.{name}"
    kind = type(value)
    named = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{'an' if named[0] in 'aeiou' else 'a'} {named}"


# ---- the command -----------------------------------------------------------------------------


def register_export_torch_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export-torch",
        help="export a PyTorch model to a repository as a .pt2 package, checked for parity",
        description="Import FACTORY from its file and call it (no arguments) to get a torch.nn.Module; export it "
        "with torch.export, every input's first dim a dynamic batch dim of 1 to --max-batch-size rows; compile it "
        "with AOTInductor into the next version directory of --out (REPO/NAME/<version>/model.pt2), with a "
        "config.toml (backend torch) when the model has none; then load it with Conveyor's torch backend, run it "
        "on the example input and compare with eager PyTorch.",
        epilog="Exit status: 0 exported (the largest absolute difference from eager PyTorch is printed and written "
        "into the config's [parameters] as export_max_abs_difference), 1 refused (the difference is over "
        "--tolerance; nothing is left behind), 2 an error (the message says what to fix). Compiling needs a C++ "
        "compiler on PATH.",
    )
    p.add_argument("factory", metavar="FILE.py:FACTORY",
                   help="the Python file and the function in it that returns the model, e.g. models/net.py:build")
    p.add_argument("--example-input", action="append", required=True, metavar="SPEC", dest="example_inputs",
                   help=f"one per forward argument, in order (repeat the flag): {SPEC_HELP}. The first dim is the "
                   "batch dim; random data is seeded, so a run is repeatable")
    p.add_argument("--out", type=Path, required=True, metavar="REPO/NAME",
                   help="the model's folder in a repository: the package goes into its next version directory")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                   help=f"the largest batch the package accepts and the config's max_batch_size (default "
                   f"{DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"the largest absolute difference from eager PyTorch accepted (default {DEFAULT_TOLERANCE:g})")
    p.set_defaults(run=_run_export_torch)


def _run_export_torch(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        result = export_torch(args.factory, example_inputs=args.example_inputs, repository=out.parent,
                              name=out.name, max_batch_size=args.max_batch_size, tolerance=args.tolerance)  # fmt: skip
    except ExportRefused as exc:
        print(f"conveyor export-torch: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"conveyor export-torch: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.factory} as {result.version_dir / 'model.pt2'} (backend torch, batches of 1 to "
          f"{result.max_batch_size} rows): parity with eager PyTorch on {result.rows} rows, max |difference| "
          f"{result.max_abs_difference:.3g} (tolerance {args.tolerance:g})")  # fmt: skip
    return 0
