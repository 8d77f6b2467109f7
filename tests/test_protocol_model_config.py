"""Model metadata, Triton's config JSON, and Triton config overrides read back."""

from __future__ import annotations

import json
import re

import pytest

import conveyor
from conveyor.config import ModelConfig, parse_model_config
from conveyor.errors import ConfigError
from conveyor.protocol import InputSpec, config_from_triton_json, input_specs, model_metadata, triton_model_config


@pytest.fixture(scope="module")
def examples() -> dict[str, ModelConfig]:
    repository = conveyor.ModelRepository(conveyor.example_repository())
    return {name: repository.load_model(name).config for name in repository.list_models()}


def config(**fields: object) -> ModelConfig:
    base: dict[str, object] = {
        "backend": "python",
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "BYTES", "dims": [-1]}],
    }
    return parse_model_config({**base, **fields}, source="test", name="m")


def test_metadata_of_the_example_models(examples: dict[str, ModelConfig]) -> None:
    assert model_metadata(examples["mlp"], [1]) == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
    }
    scaler = model_metadata(examples["scaler"], [3, 1])
    assert scaler["platform"] == "python" and scaler["versions"] == ["3", "1"]
    tiny = model_metadata(examples["tiny"], [1])  # tensors read from the ONNX graph
    assert tiny["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


def test_metadata_of_a_model_that_does_not_batch() -> None:
    metadata = model_metadata(config(max_batch_size=0), [2])
    assert metadata["inputs"][0]["shape"] == [4] and metadata["outputs"][0]["shape"] == [-1]


def test_triton_config_of_the_mlp_example(examples: dict[str, ModelConfig]) -> None:
    batching = examples["mlp"].dynamic_batching  # tuned in the example's config.toml
    assert triton_model_config(examples["mlp"]) == {
        "name": "mlp",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 64,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}],
        "output": [{"name": "probs", "data_type": "TYPE_FP32", "dims": [10]}],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 0,
                "allow_timeout_override": True,
                "max_queue_size": batching.max_queue_size,
            },
        },
        "instance_group": [{"name": "mlp_0", "kind": "KIND_CPU", "count": 1, "gpus": []}],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {},
    }


def test_triton_config_of_the_python_example(examples: dict[str, ModelConfig]) -> None:
    triton = triton_model_config(examples["scaler"])
    assert (triton["platform"], triton["backend"]) == ("", "python")
    assert triton["parameters"] == {"mean": {"string_value": "0.5"}, "std": {"string_value": "2.0"}}


def test_triton_config_variants() -> None:
    triton = triton_model_config(
        config(
            max_batch_size=0,
            instance_group={"count": 2, "device": "cuda:1"},
            version_policy={"specific": [3, 1]},
            parameters={"flag": True, "n": 3},
        )
    )
    assert "dynamic_batching" not in triton  # perf_analyzer reads its presence as "dynamic batching on"
    assert triton["instance_group"] == [{"name": "m_0", "kind": "KIND_GPU", "count": 2, "gpus": [1]}]
    assert triton["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert triton["output"] == [{"name": "y", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert triton["parameters"] == {"flag": {"string_value": "true"}, "n": {"string_value": "3"}}
    assert triton_model_config(config(version_policy={"all": True}))["version_policy"] == {"all": {}}
    assert triton_model_config(config(instance_group={"device": "cuda"}))["instance_group"][0]["gpus"] == [0]
    labelled = config(outputs=[{"name": "p", "datatype": "FP32", "dims": [3], "labels": "classes.txt"}])
    assert triton_model_config(labelled)["output"] == [
        {"name": "p", "data_type": "TYPE_FP32", "dims": [3], "label_filename": "classes.txt"}
    ]


def test_priorities_are_reported_resolved() -> None:
    batching = triton_model_config(config(max_batch_size=8, dynamic_batching={"priority_levels": 3}))[
        "dynamic_batching"
    ]
    assert (batching["priority_levels"], batching["default_priority_level"]) == (3, 3)


def test_the_triton_config_is_plain_json(examples: dict[str, ModelConfig]) -> None:
    for model in examples.values():
        json.dumps(triton_model_config(model))


def test_input_specs(examples: dict[str, ModelConfig]) -> None:
    assert input_specs(examples["mlp"]) == [InputSpec("x", "FP32", (64,))]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"max_batch_size": 0},
        {
            "max_batch_size": 16,
            "dynamic_batching": {
                "max_queue_delay_us": 250,
                "preferred_batch_sizes": [4, 8],
                "max_queue_size": 64,
                "priority_levels": 2,
                "default_priority_level": 1,
                "default_timeout_us": 900,
            },
            "instance_group": {"count": 3, "device": "cuda:2"},
            "version_policy": {"all": True},
        },
        {"version_policy": {"specific": [2, 5]}, "parameters": {"k": "v"}},
        {"outputs": [{"name": "probs", "datatype": "FP32", "dims": [10], "labels": "labels.txt"}]},
    ],
)
def test_our_triton_config_reads_back_unchanged(fields: dict[str, object]) -> None:
    original = config(**fields)
    restored = parse_model_config(config_from_triton_json(triton_model_config(original), name="m"), source="s")
    assert restored == original


def test_a_triton_style_override_with_quoted_int64s() -> None:
    override = json.dumps(
        {
            "name": "m",
            "platform": "onnxruntime_onnx",
            "max_batch_size": 8,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": ["16"]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["-1"], "label_filename": ""}],
            "dynamic_batching": {
                "preferred_batch_size": [4],
                "max_queue_delay_microseconds": "500",
                "default_queue_policy": {"max_queue_size": 0, "timeout_action": "REJECT"},
            },
            "instance_group": [{"kind": "KIND_CPU", "count": 2, "name": "whatever"}],
            "version_policy": {"latest": {"num_versions": 2}},
            "parameters": {"alpha": {"string_value": "0.5"}},
            "optimization": {"priority": "PRIORITY_DEFAULT", "eager_batching": False},
            "model_transaction_policy": {"decoupled": False},
        }
    )
    assert config_from_triton_json(override, name="m", source="load") == {
        "name": "m",
        "backend": "onnx",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [-1]}],
        "dynamic_batching": {"preferred_batch_sizes": [4], "max_queue_delay_us": 500},
        "instance_group": {"count": 2, "device": "cpu"},
        "version_policy": {"latest": 2},
        "parameters": {"alpha": "0.5"},
    }


@pytest.mark.parametrize(
    ("override", "messages"),
    [
        (
            {"sequence_batching": {}, "colour": "red"},
            ["field 'sequence_batching': unknown or unsupported", "field 'colour'"],
        ),
        (
            {"input": [{"name": "x", "data_type": "FP32", "dims": [1], "shape": [1]}]},
            [
                "field 'input[0].data_type': expected a TYPE_* name such as TYPE_FP32, got \"FP32\"",
                "field 'input[0].shape': unknown or unsupported",
            ],
        ),
        (
            {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1], "is_shape_tensor": True}]},
            ["field 'input[0].is_shape_tensor': not supported by Conveyor except at its default false"],
        ),
        (
            {"model_transaction_policy": {"decoupled": True}},
            ["field 'model_transaction_policy.decoupled': not supported by Conveyor except at its default false"],
        ),
        ({"backend": "tensorrt"}, ["field 'backend': expected one of onnxruntime, python, native, trees, fil, got \"tensorrt\""]),
        ({"backend": "python", "platform": "onnxruntime_onnx"}, ['contradicts backend "python"']),
        ({"max_batch_size": "eight"}, ["field 'max_batch_size': expected an integer, got \"eight\""]),
        ({"instance_group": [{"count": 1}, {"count": 1}]}, ["expected a list of exactly one group"]),
        ({"instance_group": [{"kind": "KIND_GPU", "gpus": [0, 1]}]}, ["KIND_GPU with at most one gpu"]),
        ({"version_policy": {"latest": {}, "all": {}}}, ["field 'version_policy': expected exactly one of"]),
        (
            {"dynamic_batching": {"priority_queue_policy": {"1": {}}, "max_queue_delay_microseconds": 1}},
            ["field 'dynamic_batching.priority_queue_policy': not supported"],
        ),
        (
            {"dynamic_batching": {"default_queue_policy": {"timeout_action": "DELAY"}}},
            [
                "field 'dynamic_batching.default_queue_policy.timeout_action': "
                'not supported by Conveyor except at its default "REJECT"'
            ],
        ),
        (
            {"parameters": {"k": {"int_value": 1}}},
            ["field 'parameters.k': expected {\"string_value\": ...} or a scalar"],
        ),
        ({"optimization": {"cuda": {"graphs": True}}}, ["field 'optimization.cuda': unknown or unsupported"]),
    ],
)
def test_override_problems_are_all_named(override: dict[str, object], messages: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_triton_json(override, name="m", source="load request")
    lines = str(caught.value).splitlines()
    assert all(line.startswith("load request: field '") for line in lines)
    for message in messages:
        assert any(message in line for line in lines), (message, lines)


def test_override_errors_name_the_model_by_default() -> None:
    with pytest.raises(ConfigError, match=re.escape("model 'm': load parameter 'config': field 'colour'")):
        config_from_triton_json({"colour": 1}, name="m")


def test_override_that_is_not_a_json_object() -> None:
    with pytest.raises(ConfigError, match=re.escape("load: not valid JSON")):
        config_from_triton_json("{oops", name="m", source="load")
    with pytest.raises(ConfigError, match=re.escape("load: expected a JSON object of model config fields, got list")):
        config_from_triton_json("[]", name="m", source="load")


def test_the_config_of_a_native_model_reads_back_as_an_override() -> None:
    from conveyor.config import parse_model_config
    from conveyor.protocol.config_override import config_from_triton_json
    from conveyor.protocol.model_config import triton_model_config

    config = parse_model_config(
        {
            "backend": "native",
            "max_batch_size": 8,
            "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
        },
        source="test",
        name="m",
    )
    back = config_from_triton_json(triton_model_config(config), name="m")
    assert back["backend"] == "native"
