from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from conveyor.backends import create_backend, model_file_path
from conveyor.config import load_model_config, parse_model_config
from conveyor.errors import ConfigError
from conveyor.graph_plan import graph_dependencies
from conveyor.protocol.model_config import model_metadata, triton_model_config
from conveyor.repository import READY, UNAVAILABLE, ModelRepository
from conveyor.toml_text import toml_text
from config_files import config_error, write_config

# The contract's example graph: a cheap model first, the large one only where it is unsure.
CASCADE = """
max_batch_size = 64

[graph]
inputs = ["image"]

[graph.outputs]
probabilities = ["large.probabilities", "small.probabilities"]

[[graph.step]]
name = "small"
model = "classifier_small"
version = 2
inputs = { image = "image" }
outputs = { probabilities = "small_probs" }

[[graph.step]]
name = "large"
model = "classifier_large"
inputs = { image = "image" }
optional = true
default = { probabilities = 0.0 }
timeout_ms = 50
when = "max(small_probs) < 0.9"

[dynamic_batching]
max_queue_size = 256
default_timeout_us = 20000
"""

GRAPH: dict[str, Any] = {
    "inputs": ["x"],
    "outputs": {"y": "s.y"},
    "step": [{"name": "s", "model": "m", "inputs": {"x": "x"}}],
}


def graph_config(**fields: Any) -> dict[str, Any]:
    return {"graph": GRAPH, **fields}


def graph_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_model_config(data, source="config.toml", name="g")
    message = str(caught.value)
    assert message.startswith("config.toml: ")
    return message


def test_the_contract_example_loads_from_toml(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, CASCADE, name="cascade"))
    assert config.name == "cascade" and config.backend == "graph" and config.max_batch_size == 64
    graph = config.graph
    assert graph is not None
    assert graph.inputs == ["image"]
    assert graph.sources("probabilities") == ["large.probabilities", "small.probabilities"]
    small, large = graph.step
    assert (small.name, small.model, small.version, small.inputs, small.outputs) == (
        "small", "classifier_small", 2, {"image": "image"}, {"probabilities": "small_probs"},
    )  # fmt: skip
    assert (small.optional, small.default, small.timeout_ms, small.when) == (False, {}, None, None)
    assert (large.version, large.optional, large.default, large.timeout_ms) == (None, True, {"probabilities": 0.0}, 50)
    assert large.when == "max(small_probs) < 0.9"
    assert (config.dynamic_batching.max_queue_size, config.dynamic_batching.default_timeout_us) == (256, 20000)
    assert graph_dependencies(config) == {"classifier_small", "classifier_large"}


def test_a_graph_config_dumps_back_unchanged(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, CASCADE, name="cascade"))
    again = parse_model_config(config.to_dict(), source="dict", name="cascade")
    assert again == config and again.to_dict() == config.to_dict()
    text = toml_text(config.to_dict())
    assert parse_model_config(tomllib.loads(text), source="toml", name="cascade") == config


def test_backend_graph_may_be_given() -> None:
    config = parse_model_config(graph_config(backend="graph"), source="dict", name="g")
    assert config.backend == "graph" and config.graph is not None


def test_monitoring_tables_and_graph_batching_keys_are_allowed() -> None:
    config = parse_model_config(
        graph_config(
            monitor={"reference_rows": 500},
            capture={"sample_rate": 0.5},
            feedback={"kind": "classification", "output": "y"},
            dynamic_batching={"max_queue_size": 8, "default_timeout_us": 100},
            onnx={"intra_op_threads": 1},  # the defaults, as to_dict writes them
            instance_group={"count": 1, "device": "cpu"},
            version_policy={"latest": 1},
            parameters={"team": "vision"},
        ),
        source="dict",
        name="g",
    )
    assert config.monitor is not None and config.capture is not None and config.feedback is not None


def test_graph_inputs_and_outputs_tables_may_be_given() -> None:
    tensors = {
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [2], "labels": "labels.txt"}],
    }
    config = parse_model_config(graph_config(**tensors), source="dict", name="g")
    assert [t.name for t in config.inputs] == ["x"] and config.outputs[0].labels == "labels.txt"


def test_a_missing_backend_says_a_graph_table_may_stand_in(tmp_path: Path) -> None:
    message = config_error(tmp_path, "max_batch_size = 4")
    assert message.endswith(
        "field 'backend': required, but missing (one of 'onnx', 'python', 'native', 'trees' or 'torch'; "
        "a model graph gives a [graph] table instead)"
    )


def test_backend_graph_without_a_graph_table_is_refused() -> None:
    message = graph_error({"backend": "graph"})
    assert "field 'graph': expected a [graph] table (backend \"graph\" is a model graph" in message
    assert message.endswith("got none")


def test_a_graph_table_with_another_backend_is_refused() -> None:
    message = graph_error(graph_config(backend="onnx"))
    assert "field 'backend': expected \"graph\" or no backend (a config with a [graph] table is a model graph), got 'onnx'" in message


@pytest.mark.parametrize(
    ("fields", "field", "expected", "got"),
    [
        ({"onnx": {"intra_op_threads": 4}}, "onnx.intra_op_threads", "no onnx settings (a graph runs no backend", "4"),
        ({"onnx": {"graph_optimization": "basic"}}, "onnx.graph_optimization", "no onnx settings", "'basic'"),
        ({"native": {"threads": 2}}, "native.threads", "no native settings", "2"),
        ({"trees": {"outputs": {"y": "label"}}}, "trees.outputs", "no trees settings", "a table"),
        ({"torch": {"intra_op_threads": 2}}, "torch.intra_op_threads", "no torch settings", "2"),
        ({"fallback": "onnx"}, "fallback", "no fallback (a graph runs no backend of its own", "'onnx'"),
        (
            {"preprocess": [{"kind": "normalize_image", "input": "x", "mean": [0.0], "std": [1.0]}]},
            "preprocess",
            "no preprocess steps (a graph's steps are models",
            "1 step(s)",
        ),
        ({"postprocess": [{"kind": "softmax", "output": "y"}]}, "postprocess", "no postprocess steps", "1 step(s)"),
        ({"instance_group": {"count": 2}}, "instance_group.count", "no instance_group settings (a graph has no instances", "2"),
        ({"instance_group": {"device": "cuda"}}, "instance_group.device", "no instance_group settings", "'cuda'"),
        (
            {"dynamic_batching": {"max_queue_delay_us": 100}},
            "dynamic_batching.max_queue_delay_us",
            ("0 (a graph does not form batches: each step's model does; for a graph only max_queue_size and "
            "default_timeout_us apply)"),
            "100",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"preferred_batch_sizes": [4]}},
            "dynamic_batching.preferred_batch_sizes",
            "[] (a graph does not form batches",
            "[4]",
        ),
        ({"dynamic_batching": {"priority_levels": 2}}, "dynamic_batching.priority_levels", "0 (a graph does not", "2"),
        (
            {"version_policy": {"specific": [2]}},
            "version_policy",
            "a policy serving version 1 (a graph has one version",
            "a policy that does not serve version 1",
        ),
    ],
)
def test_backend_specific_fields_are_refused_naming_the_field(
    fields: dict[str, Any], field: str, expected: str, got: str
) -> None:
    message = graph_error(graph_config(**fields))
    assert f"field '{field}': expected {expected}" in message
    assert message.endswith(f", got {got}")


def step(**fields: Any) -> dict[str, Any]:
    return {"name": "s", "model": "m", "inputs": {"x": "x"}, **fields}


@pytest.mark.parametrize(
    ("graph", "field", "expected", "got"),
    [
        ({"step": [step(name="1s")]}, "graph.step[0].name", "a step name: letters, digits or '_'", "'1s'"),
        ({"step": [step(name="a.b")]}, "graph.step[0].name", "a step name", "'a.b'"),
        ({"step": [step(), step()]}, "graph.step[1].name", "a name no other step uses", "'s'"),
        ({"step": [step(model="../m")]}, "graph.step[0].model", "a model name", "'../m'"),
        ({"step": [step(version=0)]}, "graph.step[0].version", "an integer >= 1", "0"),
        ({"step": [step(timeout_ms=0)]}, "graph.step[0].timeout_ms", "an integer >= 1", "0"),
        ({"step": [step(optional="yes")]}, "graph.step[0].optional", "true or false", "'yes'"),
        (
            {"step": [step(default={"y": 0.0})]},
            "graph.step[0].default",
            "no default (only an optional step's failed rows are filled: add optional = true)",
            "a table",
        ),
        ({"step": [step(optional=True, default={"y": "zero"})]}, "graph.step[0].default.y", "a number", "'zero'"),
        (
            {"step": [step(when="max(a.b) <")]},
            "graph.step[0].when",
            "a number at character 11 of the row predicate",
            "the end in 'max(a.b) <'",
        ),
        ({"step": [step(inputs={"x": "a b"})]}, "graph.step[0].inputs.x", "a tensor name", "'a b'"),
        ({"step": []}, "graph.step", "at least one [[graph.step]]", "[]"),
        ({"inputs": []}, "graph.inputs", "at least one graph input", "[]"),
        ({"inputs": ["x", "x"]}, "graph.inputs[1]", "a name no other graph input uses", "'x'"),
        ({"outputs": {}}, "graph.outputs", "at least one graph output", "a table"),
        ({"outputs": {"y": []}}, "graph.outputs.y", "at least one source tensor", "[]"),
        ({"outputs": {"y": ["s.y", "s.y"]}}, "graph.outputs.y", "each source tensor once", "['s.y', 's.y']"),
    ],
)
def test_graph_table_errors(graph: dict[str, Any], field: str, expected: str, got: str) -> None:
    message = graph_error({"graph": {**GRAPH, **graph}})
    assert f"field '{field}': expected {expected}" in message
    assert message.endswith(f", got {got}")


def test_unknown_graph_and_step_fields_list_the_known_ones() -> None:
    message = graph_error({"graph": {**GRAPH, "step": [step(retries=2)], "extra": 1}})
    assert (
        "unknown field 'graph.step[0].retries' (known fields: name, model, version, inputs, outputs, optional, "
        "default, timeout_ms, when)" in message
    )
    assert "unknown field 'graph.extra' (known fields: inputs, outputs, step)" in message


def test_a_missing_step_field_is_named() -> None:
    message = graph_error({"graph": {**GRAPH, "step": [{"name": "s"}]}})
    assert message.endswith("field 'graph.step[0].model': required, but missing")


def write_graph(root: Path, name: str = "cascade", text: str = CASCADE) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text(text)
    return directory


def test_the_repository_serves_a_graph_as_version_one_its_model_directory(tmp_path: Path) -> None:
    directory = write_graph(tmp_path)
    repository = ModelRepository(tmp_path)
    source = repository.load_model("cascade")
    assert source.config.backend == "graph" and source.versions == {1: directory}
    assert [(e.name, e.version, e.state) for e in repository.index()] == [("cascade", 1, READY)]
    assert repository.scan()["cascade"].versions == ()


def test_a_graph_directory_with_version_directories_is_an_error(tmp_path: Path) -> None:
    directory = write_graph(tmp_path)
    for version in ("1", "3"):
        (directory / version).mkdir()
        (directory / version / "model.onnx").write_bytes(b"")
    (directory / "2").mkdir()  # empty (a Triton ensemble's 1/): ignored
    repository = ModelRepository(tmp_path)
    with pytest.raises(ConfigError) as caught:
        repository.load_model("cascade")
    assert str(caught.value) == (
        f"{directory}: a graph has no version directories (found 1, 3); its version 1 is the model directory "
        "itself: move the directories out (a step's model is a model directory of its own)"
    )
    [entry] = repository.index()
    assert (entry.name, entry.version, entry.state) == ("cascade", None, UNAVAILABLE)
    assert "a graph has no version directories" in entry.reason


def test_a_graph_has_no_model_file_and_no_backend(tmp_path: Path) -> None:
    config = parse_model_config(graph_config(), source="dict", name="g")
    with pytest.raises(ConfigError, match="a graph has no model file: its steps' models run its rows"):
        model_file_path(config.backend, tmp_path)
    with pytest.raises(ConfigError, match="model 'g': a graph has no backend: its steps' models run its rows"):
        create_backend(config, tmp_path)


def test_a_graph_reports_triton_s_ensemble_platform() -> None:
    config = parse_model_config(graph_config(), source="dict", name="g")
    assert model_metadata(config, [1])["platform"] == "ensemble"
    triton = triton_model_config(config)
    assert (triton["platform"], triton["backend"]) == ("ensemble", "")


def test_graph_dependencies_of_a_model_that_is_not_a_graph_are_none() -> None:
    assert graph_dependencies(parse_model_config({"backend": "onnx"}, source="dict", name="m")) == set()
