"""The torch backend: .pt2 packages (torch.export + AOTInductor) served from C++.

Packages are exported once per module (compiling takes a while); results are compared
with eager PyTorch on the same modules.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch (pip install conveyor-serve[torch])")

from conveyor import _core
from conveyor.backends import torch_package
from conveyor.config import parse_model_config
from conveyor.errors import ConfigError
from conveyor.runtime import Runtime

MAX_ROWS = 64


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x: Any) -> Any:
        return self.layers(x)


class Pair(torch.nn.Module):
    """Two inputs (float32, int64) and two outputs (float32, int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: Any, ids: Any) -> Any:
        return self.linear(x) + ids.sum(dim=1, keepdim=True).float(), ids * 3 + 1


class Mixed(torch.nn.Module):
    """float16 and bool in and out."""

    def forward(self, h: Any, mask: Any) -> Any:
        return torch.where(mask, h * 2, torch.zeros_like(h)), mask.logical_not()


class Encoder(torch.nn.Module):
    """A small transformer encoder block over [batch, tokens, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, tokens: Any) -> Any:
        return self.block(tokens)


def export(
    module: Any, args: tuple[Any, ...], path: Path, dynamic: bool, tokens: bool = False, weights_in_so: bool = True
) -> Path:
    """Export `module` to the package `path`, with a dynamic batch dim up to MAX_ROWS or none
    (tokens: dim 1 of every input dynamic too, up to 12)."""
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=MAX_ROWS)
        names = list(module.forward.__code__.co_varnames[1 : 1 + len(args)])
        dims = {0: batch, 1: torch.export.Dim("tokens", min=1, max=12)} if tokens else {0: batch}
        dynamic_shapes = {name: dims for name in names}
    with warnings.catch_warnings():  # torch's own deprecation notices while it compiles
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
        configs = {"aot_inductor.package_constants_in_so": weights_in_so}
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("torch-packages")
    torch.manual_seed(0)
    mlp, pair, mixed, encoder = Mlp().eval(), Pair().eval(), Mixed().eval(), Encoder().eval()
    with torch.no_grad():
        return {
            "mlp": (mlp, export(mlp, (torch.randn(2, 8),), folder / "mlp.pt2", dynamic=True)),
            "pair": (pair, export(pair, (torch.randn(2, 4), torch.ones(2, 3, dtype=torch.int64)),
                                  folder / "pair.pt2", dynamic=True)),
            "fixed": (mlp, export(mlp, (torch.randn(2, 8),), folder / "fixed.pt2", dynamic=False)),
            "external": (mlp, export(mlp, (torch.randn(2, 8),), folder / "external.pt2", dynamic=True,
                                     weights_in_so=False)),
            "mixed": (mixed, export(mixed, (torch.randn(2, 4).half(), torch.ones(2, 4, dtype=torch.bool)),
                                    folder / "mixed.pt2", dynamic=True)),
            "encoder": (encoder, export(encoder, (torch.randn(2, 5, 16),), folder / "encoder.pt2", dynamic=True,
                                        tokens=True)),
        }  # fmt: skip


def repository(root: Path, entries: dict[str, tuple[Path | bytes, str]]) -> Path:
    """A repository of torch models: name -> (package file or raw bytes, config.toml body)."""
    for name, (package, body) in entries.items():
        (root / name / "1").mkdir(parents=True)
        target = root / name / "1" / "model.pt2"
        if isinstance(package, bytes):
            target.write_bytes(package)
        else:
            shutil.copy(package, target)
        (root / name / "config.toml").write_text('backend = "torch"\n' + body)
    return root


def eager(module: Any, *arrays: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in arrays))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def test_signature_comes_from_the_package(models: dict[str, Any], tmp_path: Path) -> None:
    root = repository(tmp_path, {"mlp": (models["mlp"][1], ""), "pair": (models["pair"][1], "max_batch_size = 64\n")})
    with Runtime.from_repository(root) as runtime:
        handle = runtime._resolve("mlp", None)
        # The batcher runs the C++ model itself (no Python per batch), which the runtime hands it.
        assert isinstance(handle.backends[0].native_executor, _core.TorchModel)
        mlp = handle.config
        assert mlp.max_batch_size == 32  # no max_batch_size in config.toml: the auto size, inside the range
        assert [(t.datatype, t.dims) for t in mlp.inputs] == [("FP32", [8])]
        assert [(t.name, t.datatype, t.dims) for t in mlp.outputs] == [("output0", "FP32", [4])]
        pair = runtime._resolve("pair", None).config
        assert [(t.datatype, t.dims) for t in pair.inputs] == [("FP32", [4]), ("INT64", [3])]
        assert [(t.datatype, t.dims) for t in pair.outputs] == [("FP32", [2]), ("INT64", [3])]


@pytest.mark.parametrize("rows", [1, 7, MAX_ROWS])
def test_results_match_eager(models: dict[str, Any], tmp_path: Path, rows: int) -> None:
    root = repository(tmp_path, {"mlp": (models["mlp"][1], "max_batch_size = 64\n"),
                                 "pair": (models["pair"][1], "max_batch_size = 64\n")})  # fmt: skip
    rng = np.random.default_rng(rows)
    with Runtime.from_repository(root) as runtime:
        x = rng.standard_normal((rows, 8), dtype=np.float32)
        name = runtime._resolve("mlp", None).input_names[0]
        result = runtime.infer("mlp", {name: x})
        np.testing.assert_allclose(result["output0"], eager(models["mlp"][0], x)[0], rtol=1e-5, atol=1e-5)
        handle = runtime._resolve("pair", None)
        x = rng.standard_normal((rows, 4), dtype=np.float32)
        ids = rng.integers(-1000, 1000, (rows, 3), dtype=np.int64)
        result = runtime.infer("pair", dict(zip(handle.input_names, (x, ids))))
        expected = eager(models["pair"][0], x, ids)
        np.testing.assert_allclose(result["output0"], expected[0], rtol=1e-5, atol=1e-4)
        assert result["output1"].dtype == np.int64
        np.testing.assert_array_equal(result["output1"], expected[1])


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
def test_float16_bool_and_a_transformer_block_match_eager(models: dict[str, Any], tmp_path: Path, rows: int) -> None:
    root = repository(tmp_path, {"mixed": (models["mixed"][1], "max_batch_size = 64\n"),
                                 "encoder": (models["encoder"][1], "max_batch_size = 64\n")})  # fmt: skip
    rng = np.random.default_rng(rows)
    with Runtime.from_repository(root) as runtime:
        mixed = runtime._resolve("mixed", None)
        assert [(t.datatype, t.dims) for t in mixed.config.outputs] == [("FP16", [4]), ("BOOL", [4])]
        h = rng.standard_normal((rows, 4)).astype(np.float16)
        mask = rng.integers(0, 2, (rows, 4)).astype(bool)
        result = runtime.infer("mixed", dict(zip(mixed.input_names, (h, mask))))
        expected = eager(models["mixed"][0], h, mask)
        assert result["output0"].dtype == np.float16 and result["output1"].dtype == np.bool_
        np.testing.assert_array_equal(result["output0"], expected[0])
        np.testing.assert_array_equal(result["output1"], expected[1])
        encoder = runtime._resolve("encoder", None)
        assert [t.dims for t in encoder.config.inputs] == [[-1, 16]]  # the token dim was exported dynamic
        assert [t.dims for t in encoder.config.outputs] == [[-1, 16]]
        for tokens in (3, 12):
            x = rng.standard_normal((rows, tokens, 16), dtype=np.float32)
            result = runtime.infer("encoder", {encoder.input_names[0]: x})
            np.testing.assert_allclose(result["output0"], eager(models["encoder"][0], x)[0], rtol=1e-4, atol=1e-4)


def test_declared_tensors_rename_the_model_tensors_by_position(models: dict[str, Any], tmp_path: Path) -> None:
    body = ('max_batch_size = 8\ninputs = [{ name = "features", datatype = "FP32", dims = [8] }]\n'
            'outputs = [{ name = "scores", datatype = "FP32", dims = [4] }]\n')  # fmt: skip
    root = repository(tmp_path, {"mlp": (models["mlp"][1], body)})
    x = np.ones((2, 8), dtype=np.float32)
    with Runtime.from_repository(root, models=["mlp"]) as runtime:
        scores = runtime.infer("mlp", {"features": x})["scores"]
    np.testing.assert_allclose(scores, eager(models["mlp"][0], x)[0], rtol=1e-5, atol=1e-5)


def test_a_declared_variable_dim_takes_the_model_size(models: dict[str, Any], tmp_path: Path) -> None:
    # As for the output a postprocess step reads, which the config cannot size before the load.
    body = 'max_batch_size = 8\noutputs = [{ name = "scores", datatype = "FP32", dims = [-1] }]\n'
    root = repository(tmp_path, {"mlp": (models["mlp"][1], body)})
    with Runtime.from_repository(root, models=["mlp"]) as runtime:
        assert [(t.name, t.dims) for t in runtime._resolve("mlp", None).config.outputs] == [("scores", [4])]
    body = 'max_batch_size = 8\noutputs = [{ name = "scores", datatype = "FP32", dims = [5] }]\n'
    root = repository(tmp_path / "fixed", {"mlp": (models["mlp"][1], body)})
    with pytest.raises(ConfigError, match=r"output 'scores' .*declares FP32 \[5\], the model has FP32 \[4\]"):
        Runtime.from_repository(root, models=["mlp"])


def test_a_declared_dtype_the_model_does_not_take_is_refused(models: dict[str, Any], tmp_path: Path) -> None:
    body = 'max_batch_size = 8\ninputs = [{ name = "features", datatype = "FP64", dims = [8] }]\n'
    root = repository(tmp_path, {"mlp": (models["mlp"][1], body)})
    with pytest.raises(ConfigError, match=r"model.pt2: input 'features'.*declares FP64.*model has FP32"):
        Runtime.from_repository(root, models=["mlp"])


def test_64_concurrent_callers_each_get_their_own_answer(models: dict[str, Any], tmp_path: Path) -> None:
    body = "max_batch_size = 64\ninstance_group = { count = 2 }\ndynamic_batching = { max_queue_delay_us = 2000 }\n"
    root = repository(tmp_path, {"pair": (models["pair"][1], body)})
    callers = 64
    inputs = [(np.full((1 + i % 3, 4), i, dtype=np.float32), np.full((1 + i % 3, 3), i, dtype=np.int64))
              for i in range(callers)]  # fmt: skip
    results: list[Any] = [None] * callers
    with Runtime.from_repository(root, models=["pair"]) as runtime:
        handle = runtime._resolve("pair", None)
        # Both instances share one loaded package: one backend holding two model copies.
        assert len(handle.backends) == 1 and handle.backends[0].native_executor.num_models == 2
        names = handle.input_names
        start = threading.Barrier(callers)

        def call(index: int) -> None:
            start.wait()
            results[index] = runtime.infer("pair", dict(zip(names, inputs[index])))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        async def many() -> list[dict[str, np.ndarray]]:
            return await asyncio.gather(*(runtime.infer_async("pair", dict(zip(names, pair))) for pair in inputs))

        async_results = asyncio.run(many())
    for answers in (results, async_results):
        for (x, ids), result in zip(inputs, answers):
            expected = eager(models["pair"][0], x, ids)
            np.testing.assert_allclose(result["output0"], expected[0], rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(result["output1"], expected[1])


def test_max_batch_size_above_the_exported_range_is_refused(models: dict[str, Any], tmp_path: Path) -> None:
    root = repository(tmp_path, {"mlp": (models["mlp"][1], "max_batch_size = 128\n")})
    with pytest.raises(ConfigError, match=r"max_batch_size = 128 is above .*at most 64 rows.*Dim\('batch', min=1, max=128\)"):
        Runtime.from_repository(root, models=["mlp"])


def test_a_package_without_dynamic_batch_is_refused_when_batching(models: dict[str, Any], tmp_path: Path) -> None:
    root = repository(tmp_path, {"fixed": (models["fixed"][1], "max_batch_size = 8\n")})
    with pytest.raises(ConfigError, match=r"exported without a dynamic batch dim.*torch\.export\.Dim\('batch'"):
        Runtime.from_repository(root, models=["fixed"])


def test_a_package_without_dynamic_batch_serves_its_exported_shape(models: dict[str, Any], tmp_path: Path) -> None:
    root = repository(tmp_path, {"fixed": (models["fixed"][1], "max_batch_size = 0\n")})
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 16
    with Runtime.from_repository(root, models=["fixed"]) as runtime:
        handle = runtime._resolve("fixed", None)
        assert [t.dims for t in handle.config.inputs] == [[2, 8]]
        result = runtime.infer("fixed", {handle.input_names[0]: x})
    np.testing.assert_allclose(result["output0"], eager(models["fixed"][0], x)[0], rtol=1e-5, atol=1e-5)


def damaged_so(package: Path) -> bytes:
    """The package with its compiled model replaced by bytes no loader can open (as from another build)."""
    out = Path(str(package) + ".damaged")
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(out, "w") as sink:
        for item in source.infolist():
            data = source.read(item)
            sink.writestr(item, b"\x7fELF not a library" if item.filename.endswith(".so") else data)
    return out.read_bytes()


@pytest.mark.parametrize("kind", ["not a zip", "damaged .so"])
def test_a_broken_package_fails_alone_with_a_clear_message(
    models: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    broken = b"PK\x03\x04 truncated" if kind == "not a zip" else damaged_so(models["mlp"][1])
    root = repository(tmp_path, {"broken": (broken, "max_batch_size = 8\n"),
                                 "mlp": (models["mlp"][1], "max_batch_size = 8\n")})  # fmt: skip
    expected = "not a readable .pt2 package" if kind == "not a zip" else "the compiled model cannot be loaded"
    with pytest.raises(ConfigError, match=rf"broken/1/model\.pt2: {expected}"):
        Runtime.from_repository(root, models=["broken"])
    with caplog.at_level(logging.ERROR), Runtime.from_repository(root) as runtime:
        x = np.zeros((1, 8), dtype=np.float32)
        result = runtime.infer("mlp", {runtime._resolve("mlp", None).input_names[0]: x})
        assert result["output0"].shape == (1, 4)
    assert "model broken failed to load" in caplog.text and "broken/1/model.pt2" in caplog.text


def test_a_package_whose_weights_are_outside_the_model_is_refused(models: dict[str, Any], tmp_path: Path) -> None:
    # torch's own loader crashes on such a package unless the caller loads the weights first.
    root = repository(tmp_path, {"external": (models["external"][1], "max_batch_size = 8\n")})
    with pytest.raises(ConfigError, match=r"external/1/model\.pt2: .*weights are not inside .*package_constants_in_so"):
        Runtime.from_repository(root, models=["external"])


def test_without_torch_loading_says_how_to_install_it(
    models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = repository(tmp_path, {"mlp": (models["mlp"][1], "max_batch_size = 8\n")})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch_package.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match=r"pip install conveyor-serve\[torch\]"):
        Runtime.from_repository(root, models=["mlp"])


def test_torch_options_default_to_one_thread_per_instance() -> None:
    config = parse_model_config({"name": "m", "backend": "torch"}, source="<test>", name="m")
    assert config.torch.intra_op_threads == 1
    with pytest.raises(ConfigError, match="intra_op_threads"):
        parse_model_config({"name": "m", "backend": "torch", "torch": {"intra_op_threads": 0}}, source="<test>",
                           name="m")  # fmt: skip


def test_served_to_an_unmodified_tritonclient(models: dict[str, Any], tmp_path: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from test_clients_live import LiveServer

    body = ('max_batch_size = 16\ninputs = [{ name = "x", datatype = "FP32", dims = [4] }, '
            '{ name = "ids", datatype = "INT64", dims = [3] }]\n')  # fmt: skip
    root = repository(tmp_path / "models", {"pair": (models["pair"][1], body)})
    server = LiveServer(root, tmp_path)
    try:
        server.wait_ready()
        client = httpclient.InferenceServerClient(server.http_url)
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        ids = np.arange(9, dtype=np.int64).reshape(3, 3)
        inputs = [httpclient.InferInput("x", [3, 4], "FP32"), httpclient.InferInput("ids", [3, 3], "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(ids, binary_data=True)
        result = client.infer("pair", inputs)
        expected = eager(models["pair"][0], x, ids)
        np.testing.assert_allclose(result.as_numpy("output0"), expected[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(result.as_numpy("output1"), expected[1])
        metadata = client.get_model_metadata("pair")  # outputs filled from the package
        assert metadata["platform"] == "pytorch_libtorch"
        assert client.get_model_config("pair")["backend"] == "pytorch"
        assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
            ("output0", "FP32", [-1, 2]), ("output1", "INT64", [-1, 3])
        ]
    finally:
        server.stop()


UNLOAD_CHILD = r"""
import gc, json, os, sys
from pathlib import Path

import numpy as np

from conveyor.config import load_model_config
from conveyor.runtime import Runtime

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


model_dir = Path(sys.argv[1])
config = load_model_config(model_dir / "config.toml", name=model_dir.name)
x = np.ones((4, 1024), np.float32)
with Runtime() as runtime:
    def load() -> None:
        runtime.add_model(config.name, config, model_dir=model_dir / "1", version=1)
        runtime.infer(config.name, {runtime.model(config.name).config.inputs[0].name: x})

    def unload() -> None:
        runtime.unload_model(config.name)
        gc.collect()

    for _ in range(2):  # warm-up: opens libtorch_cpu.so for good, settles the allocator's arenas
        load()
        unload()
    before = rss()
    load()
    loaded = rss()
    unload()
    once = rss()
    for _ in range(CYCLES - 1):
        load()
        unload()
    print(json.dumps({"before": before, "loaded": loaded, "after_one": once, "after_all": rss()}))
"""


def test_unloading_frees_the_package(tmp_path: Path) -> None:
    """RSS measured in a child process: after many load/unload cycles it is back near its value
    before the first, far below what keeping one package per load would add (the compiled model's
    library, holding 16 MiB of weights, stays mapped by the loader; its pages are released)."""
    import json
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024)).eval()
    (tmp_path / "big" / "1").mkdir(parents=True)
    export(big, (torch.randn(2, 1024),), tmp_path / "big" / "1" / "model.pt2", dynamic=True)
    (tmp_path / "big" / "config.toml").write_text('backend = "torch"\nmax_batch_size = 8\n')
    cycles = 8
    package_parent = Path(_core.__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", UNLOAD_CHILD.replace("CYCLES", str(cycles)), str(tmp_path / "big")],
        env={**os.environ, "PYTHONPATH": str(package_parent)}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    rss = json.loads(child.stdout.splitlines()[-1])
    footprint = rss["loaded"] - rss["before"]
    mib = {key: f"{value / 2**20:.1f} MiB" for key, value in rss.items()}
    # The weights alone are 16 MiB: the measurement sees a loaded package.
    assert footprint >= 8 * 2**20, mib
    # Kept packages would add a footprint per cycle (8 x 16 MiB); allowed: a quarter of one, once.
    assert rss["after_all"] - rss["before"] <= footprint / 4, mib
