"""TOML text from a TOML-shaped dict: what the CLIs write (recommended configs, imported configs).

The standard library reads TOML (tomllib) but does not write it; this writes the subset
config.toml uses, and every writer checks its text parses back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["toml_text"]


def toml_text(data: Mapping[str, Any]) -> str:
    """A TOML-shaped dict (tables, arrays of tables, scalars, lists of scalars) as TOML text."""
    lines: list[str] = []
    _emit_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    def is_table_array(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)

    for key, value in table.items():
        if not isinstance(value, Mapping) and not is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{'.'.join(_toml_key(part) for part in [*path, key])}]"]
            _emit_table(lines, [*path, key], value)
        elif is_table_array(value):
            for item in value:
                lines += [
                    "",
                    f"[[{'.'.join(_toml_key(part) for part in [*path, key])}]]",
                ]
                _emit_table(lines, [*path, key], item)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
