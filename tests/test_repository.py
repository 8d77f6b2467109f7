from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.errors import ConfigError, InvalidInput, ModelNotFound
from conveyor.repository import ModelRepository, RepositoryEntry

ONNX_CONFIG = """
backend = "onnx"
max_batch_size = 8
"""

PYTHON_CONFIG = """
backend = "python"
max_batch_size = 8
{policy}

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [4]
"""

MODEL_PY = """
class Model:
    def execute(self, inputs):
        return {"y": inputs["x"]}
"""


def python_model(builder, name: str, versions: list[str], policy: str = "") -> Path:
    config = PYTHON_CONFIG.format(policy=policy)
    return builder.add(name, config, {version: {"model.py": MODEL_PY} for version in versions})


def test_discovers_models_and_ignores_other_entries(repository_builder) -> None:
    python_model(repository_builder, "b", ["1"])
    python_model(repository_builder, "a", ["1"])
    (repository_builder.root / "README.md").write_text("not a model")
    (repository_builder.root / ".hidden").mkdir()
    (repository_builder.root / "__pycache__").mkdir()
    assert ModelRepository(repository_builder.root).list_models() == ["a", "b"]


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a model repository directory"):
        ModelRepository(tmp_path / "absent")


def test_load_model_serves_latest_version_by_default(repository_builder) -> None:
    model_dir = python_model(repository_builder, "m", ["1", "3", "2", "0", "01", "v4", "latest"])
    (model_dir / "9").write_text("a file, not a version directory")
    source = ModelRepository(repository_builder.root).load_model("m")
    assert source.name == "m"
    assert source.config.name == "m"
    assert source.versions == {3: model_dir / "3"}


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("[version_policy]\nlatest = 2", [2, 3]),
        ("[version_policy]\nall = true", [1, 2, 3]),
        ("[version_policy]\nspecific = [1, 3]", [1, 3]),
    ],
)
def test_versions_follow_policy(repository_builder, policy: str, served: list[int]) -> None:
    python_model(repository_builder, "m", ["1", "2", "3"], policy)
    assert sorted(ModelRepository(repository_builder.root).load_model("m").versions) == served


def test_version_missing_its_model_file_is_reported_not_loaded(
    repository_builder, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = python_model(repository_builder, "m", ["1", "2"], "[version_policy]\nall = true")
    (model_dir / "3").mkdir()
    repository = ModelRepository(repository_builder.root)
    with caplog.at_level(logging.WARNING, logger="conveyor.repository"):
        assert sorted(repository.load_model("m").versions) == [1, 2]
    assert "model 'm' version 3 is not loaded: missing model.py" in caplog.text
    assert repository.index() == [
        RepositoryEntry("m", 1, "READY"),
        RepositoryEntry("m", 2, "READY"),
        RepositoryEntry("m", 3, "UNAVAILABLE", f"missing model.py in {model_dir / '3'}"),
    ]


def test_latest_version_without_model_file_is_not_replaced_by_an_older_one(repository_builder) -> None:
    # The policy picks among version directories; an empty newest one is an error to
    # report, not a reason to silently serve something older.
    model_dir = python_model(repository_builder, "m", ["1"])
    (model_dir / "2").mkdir()
    with pytest.raises(ConfigError, match=r"no version to serve \(version 2: missing model.py"):
        ModelRepository(repository_builder.root).load_model("m")


def test_specific_version_that_does_not_exist_is_reported(repository_builder) -> None:
    python_model(repository_builder, "m", ["1"], "[version_policy]\nspecific = [1, 5]")
    repository = ModelRepository(repository_builder.root)
    assert list(repository.load_model("m").versions) == [1]
    entries = repository.index()
    assert entries[0] == RepositoryEntry("m", 1, "READY")
    assert (entries[1].version, entries[1].state) == (5, "UNAVAILABLE")
    assert "no version directory" in entries[1].reason


def test_broken_models_are_reported_while_others_load(repository_builder) -> None:
    python_model(repository_builder, "good", ["1"])
    repository_builder.add("bad_config", 'backend = "onnx"\nmax_batch_size = -1\n', {"1": {"model.onnx": b""}})
    repository_builder.add("bad_toml", "backend = \n", {"1": {"model.py": MODEL_PY}})
    repository_builder.add("no_config", None, {"1": {"model.py": MODEL_PY}})
    python_model(repository_builder, "no_versions", [])
    repository = ModelRepository(repository_builder.root)

    by_name = {entry.name: entry for entry in repository.index()}
    assert by_name["good"] == RepositoryEntry("good", 1, "READY")
    for name in ("bad_config", "bad_toml", "no_config", "no_versions"):
        assert by_name[name].state == "UNAVAILABLE"
        assert by_name[name].version is None
    assert "field 'max_batch_size': expected an integer >= 0, got -1" in by_name["bad_config"].reason
    assert "invalid TOML" in by_name["bad_toml"].reason
    assert "config.toml: missing" in by_name["no_config"].reason
    assert by_name["no_versions"].reason == "no version directories"

    assert repository.load_model("good").versions
    with pytest.raises(ConfigError, match="max_batch_size"):
        repository.load_model("bad_config")
    with pytest.raises(ConfigError, match="no version to serve"):
        repository.load_model("no_versions")


@pytest.mark.parametrize("name", ["..", ".", "../etc", "a/b", "/abs", "", "-lead", "a" * 129, "x\n", "a\\b"])
def test_invalid_and_traversal_names_are_rejected(repository_builder, name: str) -> None:
    repository = ModelRepository(repository_builder.root)
    with pytest.raises(InvalidInput, match="invalid model name"):
        repository.model_dir(name)
    with pytest.raises(InvalidInput):
        repository.load_model(name)


def test_unknown_model_is_not_found(repository_builder) -> None:
    with pytest.raises(ModelNotFound, match="model 'ghost'"):
        ModelRepository(repository_builder.root).load_model("ghost")


def test_onnx_config_without_tensors_is_filled_from_the_model(
    repository_builder, add_one_onnx: Callable[..., bytes]
) -> None:
    repository_builder.add("add", ONNX_CONFIG, {"1": {"model.onnx": add_one_onnx(6)}})
    config = ModelRepository(repository_builder.root).load_model("add").config
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("x", "FP32", [6])]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [("y", "FP32", [6])]


def test_fingerprint_changes_when_a_file_changes(repository_builder) -> None:
    model_dir = python_model(repository_builder, "m", ["1"])
    python_model(repository_builder, "other", ["1"])
    repository = ModelRepository(repository_builder.root)
    first = repository.scan()
    assert set(first) == {"m", "other"}
    assert repository.scan() == first

    model_file = model_dir / "1" / "model.py"
    stat = model_file.stat()
    # Explicit times: two writes within one clock tick can share an mtime.
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = repository.scan()
    assert touched["m"] != first["m"]
    assert touched["other"] == first["other"]

    (model_dir / "2").mkdir()
    assert repository.scan()["m"] != touched["m"]
    (model_dir / "config.toml").write_text(PYTHON_CONFIG.format(policy="[version_policy]\nall = true"))
    assert repository.scan()["m"].config != touched["m"].config
