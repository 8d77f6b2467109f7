"""Validation failures of config tables as messages: "field 'a.b': expected X, got Y".

Shared by every table's schema (conveyor.config, conveyor.rollout_config), so that a
table validated on its own (an API body, a CLI file) reads exactly as it does inside
config.toml. A schema with string patterns registers what each one means
(`describe_pattern`), so a mismatch says what was expected rather than the regex.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

# pattern -> what a matching string is, in words (filled by the schemas that use them)
_PATTERN_DESCRIPTIONS: dict[str, str] = {}
# (root table, dotted field path) -> what to give when the field is missing
_MISSING_HINTS: dict[tuple[type[BaseModel], str], str] = {}


def describe_pattern(pattern: str, description: str) -> str:
    """Registers what strings matching `pattern` are, for error messages; returns the pattern."""
    _PATTERN_DESCRIPTIONS[pattern] = description
    return pattern


def describe_missing(root: type[BaseModel], path: str, hint: str) -> None:
    """Registers what to give for a required field of `root` at `path`, for when it is missing
    and the field's name alone does not say (a field that another table may stand in for)."""
    _MISSING_HINTS[(root, path)] = hint


def describe(value: Any) -> str:
    """A short, TOML-flavoured rendering of a value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(describe(item) for item in value) + "]"
        return text if len(text) <= 60 else f"an array of {len(value)} items"
    return f"a {type(value).__name__}"


def rule_error(expected: str, got: Any, *, field: str = "", got_text: str | None = None) -> PydanticCustomError:
    """A validation failure the message formatter renders as 'expected ..., got ...'.

    `field` extends the location pydantic reports, for checks that a validator of the
    enclosing table makes about one of its fields; `got_text` replaces the rendering of `got`.
    """
    context = {"expected": expected, "got": describe(got) if got_text is None else got_text, "field": field}
    return PydanticCustomError("config_rule", "expected {expected}, got {got}", context)


def format_error(error: Mapping[str, Any], root: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One pydantic error of a `root` table as "field 'a.b': expected X, got Y".

    `prefix` names where the table sits in config.toml ("rollout"), for a table
    validated on its own.
    """
    kind, context = error["type"], error.get("ctx", {})
    location = tuple(error["loc"])
    shown = (*prefix, *location)
    if kind == "config_rule":
        extra = context.get("field", "")
        path = ".".join(part for part in (_field_path(shown), extra) if part)
        return f"field '{path or '<top level>'}': expected {context['expected']}, got {context['got']}"
    path = _field_path(shown)
    if kind == "missing":
        hint = _MISSING_HINTS.get((root, _field_path(location)))
        return f"field '{path}': required, but missing" + (f" ({hint})" if hint else "")
    if kind == "extra_forbidden":
        known = ", ".join(_known_fields(root, location[:-1]))
        return f"unknown field '{path}' (known fields: {known})"
    return f"field '{path}': expected {_expected(error)}, got {describe(error['input'])}"


def _field_path(location: tuple[Any, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


_EXPECTED_BY_ERROR_TYPE = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "model_type": "a table",
    "dict_type": "a table",
    "string_too_short": "a non-empty string",
}


def _expected(error: Mapping[str, Any]) -> str:
    kind, context = error["type"], error.get("ctx", {})
    bound = next((context[key] for key in ("ge", "gt", "le", "lt") if key in context), None)
    # A float field's bound is a float: its message says "a number" even when given an integer.
    number = "an integer" if isinstance(error["input"], int) and not isinstance(bound, float) else "a number"
    comparison = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in comparison:
        shown = format(bound, "g") if isinstance(bound, float) else bound
        return f"{number} {comparison[kind]} {shown}"
    if kind == "literal_error":
        return str(context["expected"])
    if kind == "string_pattern_mismatch":
        return _PATTERN_DESCRIPTIONS.get(context["pattern"], f"a string matching {context['pattern']}")
    return _EXPECTED_BY_ERROR_TYPE.get(kind, error["msg"].removeprefix("Input should be ").lower())


def _known_fields(root: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """The field names of the table at `location` below `root` (list indices skipped)."""
    model: type[BaseModel] = root
    for part in location:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = getattr(annotation, "__args__", (annotation,))[0]
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            return []
        model = nested
    return list(model.model_fields)
