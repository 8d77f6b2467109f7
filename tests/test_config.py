from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conveyor.config import (
    TensorConfig,
    VersionPolicy,
    load_model_config,
    parse_model_config,
)
from conveyor.errors import ConfigError
from config_files import config_error, write_config

BATCHING_MODEL = """
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [4]
"""


def test_defaults(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, 'backend = "onnx"', name="mlp"))
    assert config.name == "mlp"
    assert config.max_batch_size == 0
    assert config.inputs == [] and config.outputs == []
    batching = config.dynamic_batching
    assert batching.max_queue_delay_us == 0
    assert batching.preferred_batch_sizes == []
    assert batching.max_queue_size == 1024
    assert batching.priority_levels == 0 and batching.default_priority_level == 0
    assert batching.default_timeout_us == 0
    assert (config.instance_group.count, config.instance_group.device) == (1, "cpu")
    assert config.version_policy.latest == 1
    assert (config.onnx.intra_op_threads, config.onnx.inter_op_threads) == (1, 1)
    assert config.onnx.graph_optimization == "all"
    assert config.parameters == {}


def test_full_config_reads_every_section(tmp_path: Path) -> None:
    text = BATCHING_MODEL + """
[dynamic_batching]
max_queue_delay_us = 250
preferred_batch_sizes = [8, 2, 4, 2]
max_queue_size = 16
priority_levels = 3
default_timeout_us = 5000

[instance_group]
count = 2
device = "cuda:1"

[version_policy]
specific = [3, 1]

[onnx]
intra_op_threads = 2
inter_op_threads = 2
graph_optimization = "basic"

[parameters]
mean = 0.5
label = "a"
steps = 3
enabled = true
"""
    config = load_model_config(write_config(tmp_path, text))
    assert config.dynamic_batching.preferred_batch_sizes == [2, 4, 8]
    assert config.dynamic_batching.default_priority_level == 3  # 0 resolves to the lowest level
    assert config.instance_group.device == "cuda:1"
    assert config.version_policy.specific == [1, 3]
    assert config.onnx.graph_optimization == "basic"
    assert config.parameters == {"mean": 0.5, "label": "a", "steps": 3, "enabled": True}


def test_round_trip_through_dict(tmp_path: Path) -> None:
    text = BATCHING_MODEL + """
[dynamic_batching]
preferred_batch_sizes = [4]
priority_levels = 2

[version_policy]
all = true

[parameters]
scale = 2.5
"""
    config = load_model_config(write_config(tmp_path, text))
    again = parse_model_config(config.to_dict(), source="dict", name="m")
    assert again == config
    assert config.to_dict()["version_policy"] == {"all": True}


@pytest.mark.parametrize(
    ("snippet", "field", "expected", "got"),
    [
        ("max_batch_size = -1", "max_batch_size", "an integer >= 0", "-1"),
        ('max_batch_size = "8"', "max_batch_size", "an integer", "'8'"),
        ("max_batch_size = 2.5", "max_batch_size", "an integer", "2.5"),
        ("[dynamic_batching]\nmax_queue_delay_us = -5", "dynamic_batching.max_queue_delay_us", "an integer >= 0", "-5"),
        ("[dynamic_batching]\nmax_queue_size = 0", "dynamic_batching.max_queue_size", "an integer >= 1", "0"),
        ("[dynamic_batching]\npriority_levels = -1", "dynamic_batching.priority_levels", "an integer >= 0", "-1"),
        ("[dynamic_batching]\ndefault_timeout_us = -1", "dynamic_batching.default_timeout_us", "an integer >= 0", "-1"),
        (
            "[dynamic_batching]\npreferred_batch_sizes = [2, 0]",
            "dynamic_batching.preferred_batch_sizes[1]",
            "an integer >= 1",
            "0",
        ),
        ("[instance_group]\ncount = 0", "instance_group.count", "an integer >= 1", "0"),
        ('[instance_group]\ndevice = "gpu"', "instance_group.device", "'cpu', 'cuda' or 'cuda:N'", "'gpu'"),
        ("[onnx]\nintra_op_threads = 0", "onnx.intra_op_threads", "an integer >= 1", "0"),
        ("[onnx]\ninter_op_threads = 0", "onnx.inter_op_threads", "an integer >= 1", "0"),
        (
            '[onnx]\ngraph_optimization = "max"',
            "onnx.graph_optimization",
            "'disable', 'basic', 'extended' or 'all'",
            "'max'",
        ),
        ("[version_policy]\nlatest = 0", "version_policy.latest", "an integer >= 1", "0"),
        ("[version_policy]\nall = false", "version_policy.all", "true", "false"),
        ("[version_policy]\nspecific = []", "version_policy.specific", "at least one version", "[]"),
        ("[version_policy]\nspecific = [0]", "version_policy.specific[0]", "an integer >= 1", "0"),
        ("[parameters]\nweights = [1, 2]", "parameters.weights", "a string, integer, float or boolean", "[1, 2]"),
        ("dynamic_batching = 3", "dynamic_batching", "a table", "3"),
    ],
)
def test_field_errors_name_file_field_expected_and_got(
    tmp_path: Path, snippet: str, field: str, expected: str, got: str
) -> None:
    # Tables go after a valid batching model; top-level keys after a bare onnx one.
    text = BATCHING_MODEL + "\n" + snippet if snippet.startswith("[") else 'backend = "onnx"\n' + snippet
    message = config_error(tmp_path, text)
    assert f"field '{field}': expected {expected}" in message
    assert message.endswith(f", got {got}")


def test_backend_must_be_known(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'backend = "tensorflow"')
    assert "field 'backend': expected 'onnx', 'python', 'native', 'trees', 'torch' or 'graph', got 'tensorflow'" in message


def test_missing_backend(tmp_path: Path) -> None:
    assert "field 'backend': required, but missing" in config_error(tmp_path, "max_batch_size = 4")


@pytest.mark.parametrize(
    ("tensor", "field", "expected", "got"),
    [
        ('name = ""\ndatatype = "FP32"\ndims = [4]', "inputs[1].name", "a non-empty string", "''"),
        ('name = "a b"\ndatatype = "FP32"\ndims = [4]', "inputs[1].name", "a tensor name", "'a b'"),
        ('name = "z"\ndatatype = "FLOAT"\ndims = [4]', "inputs[1].datatype", "'BOOL', 'UINT8'", "'FLOAT'"),
        ('name = "z"\ndatatype = "FP32"\ndims = [4, 0]', "inputs[1].dims", "each dim > 0 or -1 (variable)", "[4, 0]"),
        ('name = "z"\ndatatype = "FP32"\ndims = [-2]', "inputs[1].dims", "each dim > 0 or -1 (variable)", "[-2]"),
        ('name = "z"\ndatatype = "FP32"\ndims = 4', "inputs[1].dims", "an array", "4"),
        (
            'name = "x"\ndatatype = "FP32"\ndims = [4]',
            "inputs[1].name",
            "a name no other entry of 'inputs' uses",
            "'x'",
        ),
    ],
)
def test_tensor_errors(tmp_path: Path, tensor: str, field: str, expected: str, got: str) -> None:
    text = BATCHING_MODEL + "\n[[inputs]]\n" + tensor + "\n"
    message = config_error(tmp_path, text)
    assert f"field '{field}': expected {expected}" in message
    assert message.endswith(f", got {got}")


def test_missing_tensor_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, BATCHING_MODEL + '\n[[outputs]]\nname = "z"\ndims = [1]\n')
    assert "field 'outputs[1].datatype': required, but missing" in message


def test_all_errors_are_listed_one_per_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'backend = "tf"\nmax_batch_size = -1\n[instance_group]\ncount = 0\n')
    lines = message.splitlines()
    assert len(lines) == 3
    assert any("field 'backend'" in line for line in lines)
    assert any("field 'max_batch_size'" in line for line in lines)
    assert any("field 'instance_group.count'" in line for line in lines)


def test_unknown_field_lists_known_ones(tmp_path: Path) -> None:
    message = config_error(tmp_path, BATCHING_MODEL + "\n[dynamic_batching]\nmax_delay_us = 5\n")
    assert "unknown field 'dynamic_batching.max_delay_us' (known fields: max_queue_delay_us, " in message
    message = config_error(tmp_path, 'backend = "onnx"\nbatch = 4\n')
    assert "unknown field 'batch' (known fields: name, backend, max_batch_size," in message
    extra_tensor = '\n[[inputs]]\nname = "z"\ndatatype = "FP32"\ndims = [1]\nshape = [1]\n'
    message = config_error(tmp_path, BATCHING_MODEL + extra_tensor)
    assert "unknown field 'inputs[1].shape' (known fields: name, datatype, dims, labels)" in message


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'backend = "onnx"\nmax_batch_size = \n')
    with pytest.raises(ConfigError, match=r"config\.toml: invalid TOML: .*line 2") as caught:
        load_model_config(path)
    assert str(caught.value).startswith(f"{path}: invalid TOML: ")
    assert isinstance(caught.value.__cause__, tomllib.TOMLDecodeError)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_model_config(tmp_path / "absent" / "config.toml")


def test_name_defaults_to_directory_and_must_match(tmp_path: Path) -> None:
    assert load_model_config(write_config(tmp_path, 'name = "m"\nbackend = "onnx"')).name == "m"
    message = config_error(tmp_path, 'name = "other"\nbackend = "onnx"')
    assert "field 'name': expected 'm' (the directory name), got 'other'" in message
    config = parse_model_config({"name": "free", "backend": "onnx"}, source="dict")
    assert config.name == "free"
    with pytest.raises(ConfigError, match="field 'name': required, but missing"):
        parse_model_config({"backend": "onnx"}, source="dict")
    with pytest.raises(ConfigError, match=r"field 'name': expected a model name.*got '\.\./x'"):
        parse_model_config({"name": "../x", "backend": "onnx"}, source="dict")


def test_explicit_name_overrides_directory(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'backend = "onnx"')
    assert load_model_config(path, name="renamed").name == "renamed"


def test_python_backend_needs_tensors(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'backend = "python"')
    assert "field 'inputs': expected at least one tensor (only onnx, native and trees models may omit them), got []" in message


def test_preferred_sizes_within_max_batch_size(tmp_path: Path) -> None:
    message = config_error(tmp_path, BATCHING_MODEL + "\n[dynamic_batching]\npreferred_batch_sizes = [4, 16]\n")
    assert (
        "field 'dynamic_batching.preferred_batch_sizes': expected sizes in [1, max_batch_size = 8], got [4, 16]"
        in message
    )


def test_batching_knobs_rejected_without_batching(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'backend = "onnx"\n[dynamic_batching]\npreferred_batch_sizes = [2]\n')
    assert "field 'dynamic_batching.preferred_batch_sizes': expected no preferred sizes (max_batch_size is 0" in message
    message = config_error(tmp_path, 'backend = "onnx"\n[dynamic_batching]\nmax_queue_delay_us = 100\n')
    assert "field 'dynamic_batching.max_queue_delay_us': expected 0 (max_batch_size is 0" in message
    assert message.endswith("got 100")
    queue_only = 'backend = "onnx"\n[dynamic_batching]\nmax_queue_size = 4\ndefault_timeout_us = 10\n'
    assert load_model_config(write_config(tmp_path, queue_only)).dynamic_batching.max_queue_size == 4


@pytest.mark.parametrize(
    ("levels", "default", "resolved"),
    [(0, 0, 0), (3, 0, 3), (3, 1, 1), (3, 3, 3)],
)
def test_default_priority_level(tmp_path: Path, levels: int, default: int, resolved: int) -> None:
    text = f'backend = "onnx"\n[dynamic_batching]\npriority_levels = {levels}\ndefault_priority_level = {default}\n'
    assert load_model_config(write_config(tmp_path, text)).dynamic_batching.default_priority_level == resolved


@pytest.mark.parametrize(
    ("levels", "default", "expected"),
    [(0, 1, "0 (priority_levels is 0)"), (3, 4, "a level in [1, 3] (0: the lowest)")],
)
def test_default_priority_level_out_of_range(tmp_path: Path, levels: int, default: int, expected: str) -> None:
    text = f'backend = "onnx"\n[dynamic_batching]\npriority_levels = {levels}\ndefault_priority_level = {default}\n'
    message = config_error(tmp_path, text)
    assert f"field 'dynamic_batching.default_priority_level': expected {expected}, got {default}" in message


@pytest.mark.parametrize(
    ("policy", "got"),
    [("", "none"), ("latest = 2\nall = true", "'latest' and 'all'")],
)
def test_version_policy_needs_exactly_one_choice(tmp_path: Path, policy: str, got: str) -> None:
    message = config_error(tmp_path, f'backend = "onnx"\n[version_policy]\n{policy}\n')
    assert f"field 'version_policy': expected exactly one of 'latest', 'all' or 'specific', got {got}" in message


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        (VersionPolicy(latest=1), [3, 1, 2], [3]),
        (VersionPolicy(latest=2), [3, 1, 2], [2, 3]),
        (VersionPolicy(latest=5), [2, 1], [1, 2]),
        (VersionPolicy(all=True), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy(specific=[1, 3, 7]), [3, 1, 2], [1, 3]),
        (VersionPolicy(latest=1), [], []),
    ],
)
def test_version_policy_select(policy: VersionPolicy, available: list[int], selected: list[int]) -> None:
    assert policy.select(available) == selected


def test_numpy_dtype() -> None:
    assert TensorConfig(name="x", datatype="FP32", dims=[1]).numpy_dtype == np.float32
    assert TensorConfig(name="x", datatype="BOOL", dims=[1]).numpy_dtype == np.bool_
    assert TensorConfig(name="x", datatype="BYTES", dims=[1]).numpy_dtype == np.dtype(object)
    with pytest.raises(ConfigError, match="tensor 'x': datatype BF16 has no numpy equivalent"):
        _ = TensorConfig(name="x", datatype="BF16", dims=[1]).numpy_dtype


def test_config_built_in_code_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^code: field 'inputs': expected at least one tensor"):
        parse_model_config({"name": "m", "backend": "python"}, source="code")
    with pytest.raises(ConfigError, match=r"^code: expected a table of config fields, got 'x'"):
        parse_model_config("x", source="code")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_oversubscribed_threads_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: str) -> None:
    cores = os.cpu_count() or 1
    text = f'backend = "{backend}"\n[instance_group]\ncount = {cores}\n[{backend}]\nintra_op_threads = 2\n'
    with caplog.at_level(logging.WARNING, logger="conveyor.config"):
        load_model_config(write_config(tmp_path, text))
    assert "compute threads exceed cores" in caplog.text
    assert f"{backend}.intra_op_threads (2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conveyor.config"):
        load_model_config(write_config(tmp_path, 'backend = "onnx"'))
    assert caplog.text == ""


def test_labels_belong_to_outputs_and_stay_in_the_model_directory(tmp_path):
    base = {
        "backend": "python",
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4], "labels": "labels.txt"}],
    }
    assert parse_model_config(base, source="c.toml", name="m").outputs[0].labels == "labels.txt"
    with pytest.raises(ConfigError, match=r"inputs\[0\].labels"):
        parse_model_config({**base, "inputs": [{**base["inputs"][0], "labels": "l.txt"}]}, source="c.toml", name="m")
    with pytest.raises(ConfigError, match=r"outputs\[0\].labels"):
        parse_model_config({**base, "outputs": [{**base["outputs"][0], "labels": "../secret"}]}, source="c.toml", name="m")
