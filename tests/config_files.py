"""Writing config.toml files in tests, and reading the ConfigError a bad one gives."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conveyor.config import load_model_config
from conveyor.errors import ConfigError


def write_config(tmp_path: Path, text: str, name: str = "m") -> Path:
    """`text` (dedented) as <tmp_path>/<name>/config.toml."""
    path = tmp_path / name / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str) -> str:
    """The message loading `text` fails with; every line must name the file."""
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_model_config(path)
    message = str(caught.value)
    for line in message.splitlines():
        assert line.startswith(f"{path}: "), line
    return message
