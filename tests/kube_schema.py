"""Check Kubernetes and KServe objects against the SDKs' model classes (their OpenAPI types).

Neither the `kserve` SDK nor the `kubernetes` client ships the CRDs' JSON schemas; both
ship one generated class per OpenAPI type, with `openapi_types` (attribute -> type name)
and `attribute_map` (attribute -> JSON key). `build` walks a document along those types:
an unknown key, a wrong scalar type or a missing required field fails with the key's path.
`round_trip` then serializes the built objects back: everything the document says must come
back unchanged (the SDK may add its defaults, e.g. an empty container name).

It runs in a process of its own (`check_in_subprocess`): kserve and tritonclient.grpc cannot
both be imported into one process (both register protobuf package `inference`).

    python kube_schema.py CHECKS.json   # [[document, type name], ...] -> one line per check
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    import kserve.models
    import kubernetes.client.models

_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}


class SchemaError(AssertionError):
    pass


def model_class(type_name: str) -> type:
    found = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if found is None:
        raise SchemaError(f"no SDK model class {type_name}")
    return found


def build(value: Any, type_name: str, path: str = "$") -> Any:
    """The SDK object for `value` read as `type_name`; SchemaError names the first problem's path."""
    if (inner := re.fullmatch(r"[lL]ist\[(.*)\]", type_name)) is not None:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list ({type_name}), got {value!r}")
        return [build(item, inner.group(1), f"{path}[{index}]") for index, item in enumerate(value)]
    if (inner := re.fullmatch(r"dict\(([^,]*), (.*)\)|Dict\[([^,]*), (.*)\]", type_name)) is not None:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a mapping ({type_name}), got {value!r}")
        return {key: build(item, inner.group(2) or inner.group(4), f"{path}.{key}")
                for key, item in value.items()}
    if type_name == "object":
        return value
    if type_name in _SCALARS:
        if not isinstance(value, _SCALARS[type_name]) or (type_name != "bool" and isinstance(value, bool)):
            raise SchemaError(f"{path}: expected {type_name}, got {value!r}")
        return value
    cls = model_class(type_name)
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected a {type_name} mapping, got {value!r}")
    attribute_of = {key: attribute for attribute, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(attribute_of))
    if unknown:
        raise SchemaError(f"{path}: {type_name} has no field {', '.join(unknown)}")
    kwargs = {attribute_of[key]: build(item, cls.openapi_types[attribute_of[key]], f"{path}.{key}")
              for key, item in value.items()}  # fmt: skip
    try:
        return cls(**kwargs)  # the setters refuse a missing required field
    except ValueError as exc:
        raise SchemaError(f"{path}: {type_name}: {exc}") from None


def serialize(value: Any) -> Any:
    """A built object as JSON values, through its attribute_map; unset (None) fields left out, as the SDKs do."""
    if isinstance(value, list):
        return [serialize(item) for item in value]
    if isinstance(value, dict):
        return {key: serialize(item) for key, item in value.items()}
    if hasattr(value, "openapi_types"):
        return {value.attribute_map[attribute]: serialize(getattr(value, attribute))
                for attribute in value.openapi_types if getattr(value, attribute) is not None}  # fmt: skip
    return value


def _holds(serialized: Any, document: Any) -> bool:
    """Whether `serialized` says all `document` says: mappings may hold more keys, nothing else may differ."""
    if isinstance(document, dict):
        return isinstance(serialized, dict) and all(
            key in serialized and _holds(serialized[key], value) for key, value in document.items())
    if isinstance(document, list):
        return isinstance(serialized, list) and len(serialized) == len(document) and all(
            _holds(got, value) for got, value in zip(serialized, document))
    return type(serialized) is type(document) and serialized == document


def round_trip(document: dict[str, Any], type_name: str) -> Any:
    """Build `document` as `type_name` and check its serialization gives the document back."""
    built = build(document, type_name)
    serialized = serialize(built)
    if not _holds(serialized, document):
        raise SchemaError(f"{type_name}: serialized back as {serialized!r}, not {document!r}")
    return built


def check_in_subprocess(checks: list[tuple[dict[str, Any], str]], workdir: Path) -> list[str]:
    """round_trip each (document, type name) in a child process: "" where it passed, else the problem."""
    checks_path = workdir / "schema-checks.json"
    checks_path.write_text(json.dumps(checks))
    result = subprocess.run([sys.executable, __file__, str(checks_path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"the schema check crashed:\n{result.stderr}"
    return json.loads(result.stdout)


def _main(checks_path: str) -> None:
    problems = []
    for document, type_name in json.loads(Path(checks_path).read_text()):
        try:
            round_trip(document, type_name)
            problems.append("")
        except SchemaError as exc:
            problems.append(str(exc))
    print(json.dumps(problems))


if __name__ == "__main__":
    _main(sys.argv[1])
