"""Triton ensembles (platform "ensemble", ensemble_scheduling) served as model graphs:
from config.pbtxt unchanged, and written as [graph] by `conveyor import-triton`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conveyor.errors import ConfigError, ModelNotFound
from conveyor.protocol.triton_pbtxt import read_config_pbtxt
from conveyor.repository import ModelRepository

STEP_PBTXT = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "{input}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""
STEP_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "{input}").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("{output}", {expression})]))
        return responses
"""
# scale: X -> Y = 2 X; shift: Z -> W = Z + 1 (each renames its tensor, as ensembles map them).
STEPS = {"scale": ("X", "Y", "x * 2"), "shift": ("Z", "W", "x + 1")}
ENSEMBLE_PBTXT = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "RAW" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "RESULT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "scale"
      model_version: -1
      input_map { key: "X" value: "RAW" }
      output_map { key: "Y" value: "scaled" }
    },
    {
      model_name: "shift"
      model_version: 1
      input_map { key: "Z" value: "scaled" }
      output_map { key: "W" value: "RESULT" }
    }
  ]
}
"""


def write_repository(root: Path, ensemble: str = ENSEMBLE_PBTXT) -> Path:
    for name, (tensor_in, tensor_out, expression) in STEPS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(STEP_PBTXT.format(name=name, input=tensor_in, output=tensor_out))
        model = STEP_MODEL.format(input=tensor_in, output=tensor_out, expression=expression)
        (root / name / "1" / "model.py").write_text(model)
    (root / "pipeline" / "1").mkdir(parents=True)  # Triton's ensembles have an empty version directory
    (root / "pipeline" / "config.pbtxt").write_text(ensemble)
    return root


def by_hand_and_as_ensemble(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from conveyor.runtime import Runtime

    raw = np.arange(12, dtype=np.float32).reshape(3, 4)
    with Runtime.from_repository(root) as runtime:
        scaled = runtime.infer("scale", {"X": raw})["Y"]
        by_hand = runtime.infer("shift", {"Z": scaled})["W"]
        answer = runtime.infer("pipeline", {"RAW": raw})
    assert set(answer) == {"RESULT"}
    return by_hand, answer["RESULT"]


def test_an_ensemble_reads_as_a_graph_of_its_steps(tmp_path: Path) -> None:
    write_repository(tmp_path)
    triton = read_config_pbtxt(tmp_path / "pipeline" / "config.pbtxt", name="pipeline")
    assert triton.fields["backend"] == "graph" and triton.ignored == []
    assert triton.fields["graph"] == {
        "inputs": ["RAW"],
        "outputs": {"RESULT": "RESULT"},
        "step": [
            {"name": "scale", "model": "scale", "inputs": {"X": "RAW"}, "outputs": {"Y": "scaled"}},
            {"name": "shift", "model": "shift", "version": 1, "inputs": {"Z": "scaled"}, "outputs": {"W": "RESULT"}},
        ],
    }
    config = ModelRepository(tmp_path).load_model("pipeline").config
    assert config.backend == "graph" and config.max_batch_size == 8
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("RAW", "FP32", [4])]


def test_a_served_ensemble_answers_as_its_steps_called_one_after_the_other(tmp_path: Path) -> None:
    by_hand, answer = by_hand_and_as_ensemble(write_repository(tmp_path))
    np.testing.assert_array_equal(answer, by_hand)
    np.testing.assert_array_equal(answer, np.arange(12, dtype=np.float32).reshape(3, 4) * 2 + 1)


def test_repeated_and_oddly_named_step_models_get_unique_step_names(tmp_path: Path) -> None:
    text = ENSEMBLE_PBTXT.replace('model_name: "shift"', 'model_name: "scale"').replace('key: "Z"', 'key: "X"')
    text = text.replace('key: "W"', 'key: "Y"').replace("model_version: 1", "model_version: -1")
    write_repository(tmp_path, text)
    graph = read_config_pbtxt(tmp_path / "pipeline" / "config.pbtxt", name="pipeline").fields["graph"]
    assert [step["name"] for step in graph["step"]] == ["scale", "scale_2"]
    by_hand = np.arange(4, dtype=np.float32)[None] * 4
    from conveyor.runtime import Runtime

    with Runtime.from_repository(tmp_path) as runtime:
        answer = runtime.infer("pipeline", {"RAW": np.arange(4, dtype=np.float32)[None]})["RESULT"]
    np.testing.assert_array_equal(answer, by_hand)
    odd = ENSEMBLE_PBTXT.replace('model_name: "scale"', 'model_name: "1-scale.v2"')
    (tmp_path / "pipeline" / "config.pbtxt").write_text(odd)
    graph = read_config_pbtxt(tmp_path / "pipeline" / "config.pbtxt", name="pipeline").fields["graph"]
    assert graph["step"][0]["name"] == "_1_scale_v2" and graph["step"][0]["model"] == "1-scale.v2"


def test_import_triton_writes_the_graph_table_and_the_import_answers_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conveyor.cli import main

    source = write_repository(tmp_path / "triton")
    out = tmp_path / "imported"
    assert main(["import-triton", str(source), "--out", str(out)]) == 0, capsys.readouterr().err
    text = (out / "pipeline" / "config.toml").read_text()
    assert "[graph]" in text and "[[graph.step]]" in text and "backend" in text
    imported = ModelRepository(out).load_model("pipeline").config
    served = ModelRepository(source).load_model("pipeline").config
    assert imported.model_dump(exclude={"name"}) == served.model_dump(exclude={"name"})
    by_hand, answer = by_hand_and_as_ensemble(out)
    np.testing.assert_array_equal(answer, by_hand)


def test_a_non_empty_version_directory_of_an_ensemble_is_still_an_error(tmp_path: Path) -> None:
    write_repository(tmp_path)
    (tmp_path / "pipeline" / "1" / "model.py").write_text("")
    with pytest.raises(ConfigError, match=r"a graph has no version directories \(found 1\)"):
        ModelRepository(tmp_path).load_model("pipeline")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('model_name: "shift"', 'model_name: "missing"', "model 'missing' is not in the repository"),
        ('value: "RESULT"', 'value: "other"', "ensemble output 'RESULT': no step's output_map produces it"),
        ('model_version: 1', 'model_version: 1 model_namespace: "team"',
         "step[1]' (model 'shift'): model_namespace 'team'"),
        ('value: "scaled" }\n    }', 'value: "nowhere" }\n    }', "step 'shift': input 'Z' reads 'scaled'"),
        ('model_version: 1', 'model_version: 1 batch_size: 2',
         "field 'ensemble_scheduling': not Triton's EnsembleScheduling"),
        ('platform: "ensemble"', 'platform: "onnxruntime_onnx"', "only an ensemble has steps"),
    ],
)  # fmt: skip
def test_a_bad_ensemble_does_not_load_and_says_which_step_or_tensor(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    from conveyor.runtime import Runtime

    assert old in ENSEMBLE_PBTXT
    write_repository(tmp_path, ENSEMBLE_PBTXT.replace(old, new, 1))
    with pytest.raises((ConfigError, ModelNotFound)) as caught:
        Runtime.from_repository(tmp_path, models=["pipeline"]).close()
    assert expected in str(caught.value)
