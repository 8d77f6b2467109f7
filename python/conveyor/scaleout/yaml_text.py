"""Block-style YAML for Kubernetes manifests, without a YAML library.

Only what manifests hold: mappings with string keys, lists, strings, integers, booleans
and null. Strings that YAML could read as something else are written as JSON strings,
which YAML reads back unchanged (YAML 1.2 is a superset of JSON).
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./:-]*")
# Words YAML 1.1 readers (PyYAML, Go's yaml.v2) take for booleans or null.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def to_yaml(document: dict[str, Any], comment: str = "") -> str:
    """`document` as YAML, after `comment` as '#' lines."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    _mapping(document, 0, lines)
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and value.lower() not in _RESERVED and not value.endswith(":")
        return value if plain else json.dumps(value)
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as YAML")


def _is_block(value: Any) -> bool:
    return isinstance(value, (dict, list)) and bool(value)


def _mapping(mapping: dict[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, value in mapping.items():
        if _is_block(value):
            lines.append(f"{pad}{_scalar(key)}:")
            _block(value, indent + 2, lines)
        else:
            lines.append(f"{pad}{_scalar(key)}: {_scalar(value)}")


def _block(value: Any, indent: int, lines: list[str]) -> None:
    if isinstance(value, dict):
        _mapping(value, indent, lines)
        return
    pad = " " * indent
    for item in value:
        if not _is_block(item):
            lines.append(f"{pad}- {_scalar(item)}")
            continue
        start = len(lines)
        _block(item, indent + 2, lines)
        lines[start] = f"{pad}- {lines[start][indent + 2:]}"
