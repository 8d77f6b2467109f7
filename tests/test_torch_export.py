"""conveyor.export_torch and `conveyor export-torch`: a PyTorch module into a repository as a .pt2, checked for parity.

Each successful export compiles a package (seconds each), so few tests compile; the
error cases fail before compiling.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting PyTorch models needs torch (pip install conveyor-serve[torch])")

import conveyor
from conveyor.cli import main
from conveyor.errors import ConfigError
from conveyor.runtime import Runtime
from conveyor.torch_export import ExportRefused, example_arrays

MODELS = '''
import torch


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.layers(x)


def build():
    torch.manual_seed(0)
    return Mlp()


def broken():
    raise RuntimeError("weights file missing")


def not_a_module():
    return 3


def fixed_batch():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(4, -1)

    return Fixed()


def branches_on_values():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    return Branchy()
'''


class Pair(torch.nn.Module):
    """Two inputs (float32, int64), two outputs (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, ids):
        return self.linear(x) + ids.sum(dim=1, keepdim=True).float(), ids * 3 + 1


class Drifting(torch.nn.Module):
    """Adds how often forward ran: the trace bakes in a later count than the eager run saw."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.calls


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def eager(module, *arrays):
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in arrays))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def test_the_command_exports_compiles_checks_parity_and_the_version_serves(
    models_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repo" / "mlp"
    code = main(["export-torch", f"{models_file}:build", "--example-input", "5x8:float32", "--out", str(out),
                 "--max-batch-size", "16"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "parity with eager PyTorch on 5 rows, max |difference|" in printed.out
    assert (out / "1" / "model.pt2").is_file()
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["backend"] == "torch" and config["max_batch_size"] == 16
    assert config["parameters"]["export_source"] == f"{models_file}:build"
    assert 0 <= config["parameters"]["export_max_abs_difference"] <= 1e-4
    assert config["parameters"]["export_example_rows"] == 5
    # The round trip: the repository serves the version, equal to eager PyTorch at batch sizes 1, odd and max.
    sys.path.insert(0, str(models_file.parent))
    try:
        import models  # the file the command exported from
    finally:
        sys.path.remove(str(models_file.parent))
    reference = models.build().eval()
    rng = np.random.default_rng(3)
    with Runtime.from_repository(out.parent) as runtime:
        handle = runtime._resolve("mlp", None)
        assert handle.config.max_batch_size == 16 and [t.dims for t in handle.config.inputs] == [[8]]
        for rows in (1, 7, 16):
            x = rng.standard_normal((rows, 8), dtype=np.float32)
            result = runtime.infer("mlp", {handle.input_names[0]: x})
            np.testing.assert_allclose(result[handle.config.outputs[0].name], eager(reference, x)[0],
                                       rtol=1e-5, atol=1e-5)  # fmt: skip


def test_the_function_exports_a_two_input_model_from_an_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4)).astype(np.float32)  # one row: the export still gets a dynamic batch dim
    ids = rng.integers(-50, 50, (1, 3)).astype(np.int64)
    np.savez(tmp_path / "example.npz", x=x, ids=ids)
    torch.manual_seed(0)
    module = Pair()
    result = conveyor.export_torch(lambda: module, example_inputs=[tmp_path / "example.npz"],
                                   repository=tmp_path / "repo", name="pair", max_batch_size=8)  # fmt: skip
    assert result.version_dir == tmp_path / "repo" / "pair" / "1" and result.rows == 1
    assert result.max_abs_difference <= 1e-4
    with Runtime.from_repository(tmp_path / "repo") as runtime:
        handle = runtime._resolve("pair", None)
        assert [(t.datatype, t.dims) for t in handle.config.inputs] == [("FP32", [4]), ("INT64", [3])]
        x8, ids8 = rng.standard_normal((8, 4)).astype(np.float32), rng.integers(-50, 50, (8, 3)).astype(np.int64)
        answer = runtime.infer("pair", dict(zip(handle.input_names, (x8, ids8))))
    expected = eager(module.eval(), x8, ids8)
    outputs = [t.name for t in handle.config.outputs]
    np.testing.assert_allclose(answer[outputs[0]], expected[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(answer[outputs[1]], expected[1])


def test_an_export_over_the_tolerance_is_refused_and_leaves_nothing_behind(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    (repository / "m" / "1").mkdir(parents=True)  # an earlier version and its config stay as they were
    config_text = 'backend = "torch"\nmax_batch_size = 8\n'
    (repository / "m" / "config.toml").write_text(config_text)
    with pytest.raises(ExportRefused, match=r"refused: .*differ from eager PyTorch's by up to [1-9].* 4-row .*"
                                            r"tolerance 0\.0001"):  # fmt: skip
        conveyor.export_torch(Drifting(), example_inputs=["4x3:float32"], repository=repository, name="m",
                              max_batch_size=8)  # fmt: skip
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1", "config.toml"]
    assert (repository / "m" / "config.toml").read_text() == config_text


@pytest.mark.parametrize(
    ("factory", "inputs", "message"),
    [
        ("missing.py:build", ["2x8:float32"], r"missing\.py: no such file; pass the Python file that defines build"),
        ("{models}", ["2x8:float32"], r"expected FILE\.py:FACTORY, e\.g\. models/net\.py:build"),
        ("{models}:nope", ["2x8:float32"], r"has no 'nope'; the callables it defines: .*build"),
        ("{models}:broken", ["2x8:float32"], r"calling the factory failed: RuntimeError: weights file missing"),
        ("{models}:not_a_module", ["2x8:float32"], r"returned an int, not a torch\.nn\.Module"),
        ("{models}:build", ["2x9:float32"], r"the model fails on the example input \(RuntimeError: .*\); give one"),
        ("{models}:build", ["2x8:float32", "2x8:float32"], r"the model fails on the example input"),
        ("{models}:build", ["2by8"], r"example input '2by8': expected FILE\.npy .*SHAPE:DTYPE"),
        ("{models}:build", ["2x8:complex64"], r"unknown dtype 'complex64'"),
        ("{models}:build", ["missing.npy"], r"example input missing\.npy: no such file"),
        ("{models}:build", ["80x8:float32"], r"has 80 rows; give between 1 and --max-batch-size \(64\)"),
        ("{models}:fixed_batch", ["4x8:float32"], r"the model fixes it to 4 rows .*x\.reshape\(x\.shape\[0\], -1\)"),
        ("{models}:branches_on_values", ["4x8:float32"], r"torch\.export cannot export the model: .*data-dependent"),
    ],
)
def test_bad_input_ends_with_a_message_saying_what_to_fix(
    models_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], factory: str, inputs: list[str],
    message: str,
) -> None:  # fmt: skip
    args = ["export-torch", factory.format(models=models_file), "--out", str(tmp_path / "repo" / "m")]
    for spec in inputs:
        args += ["--example-input", spec]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("conveyor export-torch: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "repo").exists()


def test_an_invalid_model_name_is_refused_before_exporting(models_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid model name 'bad name'"):
        conveyor.export_torch(f"{models_file}:build", example_inputs=["2x8:float32"], repository=tmp_path,
                              name="bad name")  # fmt: skip
    assert list(tmp_path.iterdir()) == [models_file]


def test_example_specs_make_seeded_data_of_the_asked_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((3, 2), np.float16))
    arrays = example_arrays(["4x8:float32", "4x5:int64:100:200", "4:bool", tmp_path / "x.npy"])
    assert [(a.dtype.name, a.shape) for a in arrays] == [("float32", (4, 8)), ("int64", (4, 5)), ("bool", (4,)),
                                                         ("float16", (3, 2))]  # fmt: skip
    assert arrays[1].min() >= 100 and arrays[1].max() < 200
    again = example_arrays(["4x8:float32", "4x5:int64:100:200"])
    np.testing.assert_array_equal(again[0], arrays[0])
    np.testing.assert_array_equal(again[1], arrays[1])
    with pytest.raises(ConfigError, match="LOW:HIGH is for integer inputs"):
        example_arrays(["4x8:float32:0:1"])


def test_the_help_documents_the_example_input_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["export-torch", "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "SHAPE:DTYPE[:LOW:HIGH]" in text and "FILE.npz" in text and "--max-batch-size" in text
    assert "Exit status: 0 exported" in text


def test_without_torch_the_message_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ConfigError, match=r"needs PyTorch, which is not installed: .*pip install conveyor-serve\[torch\]"):
        conveyor.export_torch("m.py:build", example_inputs=["2x8:float32"], repository=".", name="m")


def test_the_text_example_as_pt2_answers_as_its_onnx_version(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="the text example needs tokenizers (conveyor-serve[text])")
    import shutil

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import make_text_model
    finally:
        sys.path.remove(str(examples))
    models = tmp_path / "models"
    for path, build in make_text_model.files(models):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build())
    shutil.copy(examples / "models" / "text_classifier" / "config.toml", models / "text_classifier")
    make_text_model.write_pt2(models)
    texts = np.array([["The striker scored a late goal"], ["Rain, snow and fog all day"], ["crème brûlée au café"],
                      [""], ["word " * 60]], dtype=object)  # fmt: skip
    with Runtime.from_repository(models) as runtime:
        onnx = runtime.infer("text_classifier", {"text": texts})
        pt2 = runtime.infer("text_classifier_pt2", {"text": texts})
    # Rows of at most 32 tokens: the same answers (the .pt2 config truncates longer rows at 32).
    np.testing.assert_allclose(pt2["probs"][:4], onnx["probs"][:4], rtol=1e-5, atol=1e-6)
    assert [t.split(b":")[2] for t in pt2["topic"][:3, 0]] == [b"sport", b"weather", b"food"]
    config = tomllib.loads((models / "text_classifier_pt2" / "config.toml").read_text())
    assert config["backend"] == "torch" and config["parameters"]["export_max_abs_difference"] <= 1e-4
