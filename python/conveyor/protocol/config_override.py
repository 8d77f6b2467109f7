"""Triton model config JSON to Conveyor's config dict.

A load request may carry `parameters.config`, a whole Triton ModelConfig as JSON.
`config_from_triton_json` maps the fields Conveyor has onto config.toml's keys and
refuses the rest by name, so an override never half-applies silently.

`read_triton_config` is the lenient form a Triton repository's config.pbtxt goes
through (triton_pbtxt.py): the same mapping, but a field Conveyor does not honour is
returned by name, for one warning per model, instead of failing the load. Values that
are wrong (a bad datatype, a non-integer) fail either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from conveyor.errors import ConfigError
from conveyor.protocol.datatypes import DATATYPES_BY_TRITON_CONFIG_TYPE


# Fields Triton's own config output carries that Conveyor accepts only at these
# values (their defaults), so a config read from Triton or from us loads back.
_TOP_LEVEL_DEFAULTS: dict[str, Any] = {
    "runtime": "",
    "batch_input": [],
    "batch_output": [],
    "cc_model_filenames": {},
    "metric_tags": {},
    "model_warmup": [],
    "model_transaction_policy": {"decoupled": False},
    "optimization": {
        "priority": "PRIORITY_DEFAULT",
        "input_pinned_memory": {"enable": True},
        "output_pinned_memory": {"enable": True},
        "gather_kernel_buffer_threshold": 0,
        "eager_batching": False,
    },
}
_INPUT_DEFAULTS = {
    "format": "FORMAT_NONE",
    "is_shape_tensor": False,
    "allow_ragged_batch": False,
    "optional": False,
    "is_non_linear_format_io": False,
}
_OUTPUT_DEFAULTS = {"is_shape_tensor": False, "is_non_linear_format_io": False}
_DYNAMIC_BATCHING_DEFAULTS = {"preserve_ordering": False, "priority_queue_policy": {}}
_INSTANCE_GROUP_DEFAULTS = {"name": None, "secondary_devices": [], "profile": [], "passive": False, "host_policy": ""}
_BACKENDS_BY_TRITON_NAME = {
    "onnxruntime": "onnx", "python": "python", "native": "native", "trees": "trees", "fil": "trees",
}  # fmt: skip
_BACKENDS_BY_PLATFORM = {"onnxruntime_onnx": "onnx", "python": "python"}


class _Problems:
    """Collects every problem of an override so that one ConfigError reports them all."""

    def __init__(self, source: str, *, lenient: bool = False) -> None:
        self.source = source
        self.lenient = lenient
        self.messages: list[str] = []
        self.ignored: list[str] = []  # lenient: the fields not honoured, with why

    def add(self, field: str, message: str) -> None:
        self.messages.append(f"{self.source}: field '{field}': {message}")

    def unsupported(self, field: str, message: str) -> None:
        """A field Conveyor does not honour: an error, or (lenient) a field to warn about."""
        if self.lenient:
            self.ignored.append(f"{field} ({message})")
        else:
            self.add(field, message)

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError("\n".join(self.messages))


def config_from_triton_json(
    config: str | bytes | Mapping[str, Any], *, name: str, source: str | None = None
) -> dict[str, Any]:
    """A Triton model config (JSON text or parsed) for model `name`, as a dict with config.toml's keys.

    Reads name, backend/platform, max_batch_size, input, output, dynamic_batching,
    instance_group (one group), version_policy and parameters. Fields Triton prints
    by default are accepted at their default values; anything else is a ConfigError
    naming each field. Validate the result with `conveyor.config.parse_model_config`;
    Triton replaces the whole config with an override, so fields left out take their
    defaults (take `backend` from the current config when the override has neither
    backend nor platform).
    """
    source = source or f"model '{name}': load parameter 'config'"
    result, _ = _convert(_load_json(config, source), _Problems(source))
    return result


def read_triton_config(document: Mapping[str, Any], *, source: str) -> tuple[dict[str, Any], list[str]]:
    """A parsed Triton model config as config.toml's keys, and the fields it sets that
    Conveyor does not honour ("field (why)"), for the caller to warn about.

    Invalid values are a ConfigError naming each field, as in `config_from_triton_json`.
    """
    return _convert(document, _Problems(source, lenient=True))


def _convert(document: Mapping[str, Any], problems: _Problems) -> tuple[dict[str, Any], list[str]]:
    result: dict[str, Any] = {}
    for key, value in document.items():
        reader = _TOP_LEVEL_READERS.get(key)
        if reader is not None:
            reader(value, result, problems)
        elif key in _TOP_LEVEL_DEFAULTS:
            _expect_default(key, value, _TOP_LEVEL_DEFAULTS[key], problems)
        else:
            problems.unsupported(key, f"unknown or unsupported (Conveyor reads: {', '.join(_TOP_LEVEL_READERS)})")
    _reconcile_backend(document, result, problems)
    problems.raise_if_any()
    return result, problems.ignored


def _load_json(config: str | bytes | Mapping[str, Any], source: str) -> Mapping[str, Any]:
    if isinstance(config, (str, bytes)):
        try:
            config = json.loads(config)
        except ValueError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from None
        except RecursionError:  # a config nests a few levels; a bomb of nesting must not be a 500
            raise ConfigError(f"{source}: the JSON nests too deep to be a model config") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: expected a JSON object of model config fields, got {type(config).__name__}")
    return config


def _expect_default(field: str, value: Any, default: Any, problems: _Problems) -> None:
    """Report `value` as unsupported unless it equals `default`; an object may leave keys of a default object out."""
    if isinstance(default, Mapping) and default and isinstance(value, Mapping):
        for key, item in value.items():
            if key in default:
                _expect_default(f"{field}.{key}", item, default[key], problems)
            else:
                problems.unsupported(f"{field}.{key}", "unknown or unsupported")
    elif value != default:
        problems.unsupported(field, f"not supported by Conveyor except at its default {json.dumps(default)}")


def _integer(value: Any, field: str, problems: _Problems) -> int | None:
    """An integer, also from the quoted form protobuf's JSON gives int64 fields."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    problems.add(field, f"expected an integer, got {json.dumps(value)}")
    return None


def _check_keys(entry: Any, field: str, known: Iterable[str], defaults: Mapping[str, Any], problems: _Problems) -> bool:
    """False (after reporting) unless `entry` is an object whose keys are known or at their defaults."""
    if not isinstance(entry, Mapping):
        problems.add(field, f"expected an object, got {json.dumps(entry)}")
        return False
    for key, value in entry.items():
        if key in known:
            continue
        if key in defaults:
            if defaults[key] is not None:  # None: any value is fine (a name, say)
                _expect_default(f"{field}.{key}", value, defaults[key], problems)
        else:
            problems.unsupported(f"{field}.{key}", "unknown or unsupported")
    return True


def _read_name(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    result["name"] = value


def _read_backend(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    backend = _BACKENDS_BY_TRITON_NAME.get(value)
    if backend is None:
        problems.add("backend", f"expected one of {', '.join(_BACKENDS_BY_TRITON_NAME)}, got {json.dumps(value)}")
    else:
        result["backend"] = backend


def _read_platform(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    if value == "":
        return
    backend = _BACKENDS_BY_PLATFORM.get(value)
    if backend is None:
        problems.add("platform", f"expected one of '', {', '.join(_BACKENDS_BY_PLATFORM)}, got {json.dumps(value)}")
    else:
        result["platform"] = backend  # reconciled with 'backend' afterwards


def _reconcile_backend(document: Mapping[str, Any], result: dict[str, Any], problems: _Problems) -> None:
    from_platform = result.pop("platform", None)
    if from_platform is None:
        return
    if result.setdefault("backend", from_platform) != from_platform:
        problems.add(
            "platform", f"{json.dumps(document['platform'])} contradicts backend {json.dumps(document['backend'])}"
        )


def _read_max_batch_size(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    number = _integer(value, "max_batch_size", problems)
    if number is not None:
        result["max_batch_size"] = number


def _read_tensors(field: str, defaults: Mapping[str, Any]) -> Any:
    target = "inputs" if field == "input" else "outputs"

    def read(value: Any, result: dict[str, Any], problems: _Problems) -> None:
        if not isinstance(value, list):
            problems.add(field, f"expected a list, got {json.dumps(value)}")
            return
        tensors = []
        for index, entry in enumerate(value):
            where = f"{field}[{index}]"
            known = (
                ("name", "data_type", "dims", "label_filename") if field == "output" else ("name", "data_type", "dims")
            )
            if not _check_keys(entry, where, known, defaults, problems):
                continue
            tensor: dict[str, Any] = {"name": entry["name"]} if "name" in entry else {}
            data_type = entry.get("data_type")
            if data_type not in DATATYPES_BY_TRITON_CONFIG_TYPE:
                problems.add(
                    f"{where}.data_type", f"expected a TYPE_* name such as TYPE_FP32, got {json.dumps(data_type)}"
                )
            else:
                tensor["datatype"] = DATATYPES_BY_TRITON_CONFIG_TYPE[data_type]
            dims = entry.get("dims", [])
            if isinstance(dims, list):
                tensor["dims"] = [_integer(dim, f"{where}.dims[{i}]", problems) for i, dim in enumerate(dims)]
            else:
                problems.add(f"{where}.dims", f"expected a list of integers, got {json.dumps(dims)}")
            if entry.get("label_filename"):  # Triton prints "" for none
                tensor["labels"] = entry["label_filename"]
            tensors.append(tensor)
        result[target] = tensors

    return read


def _read_dynamic_batching(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    field = "dynamic_batching"
    known = ("preferred_batch_size", "max_queue_delay_microseconds", "priority_levels", "default_priority_level",
             "default_queue_policy")  # fmt: skip
    if not _check_keys(value, field, known, _DYNAMIC_BATCHING_DEFAULTS, problems):
        return
    batching: dict[str, Any] = {}
    sizes = value.get("preferred_batch_size", [])
    if isinstance(sizes, list):
        batching["preferred_batch_sizes"] = [
            _integer(size, f"{field}.preferred_batch_size", problems) for size in sizes
        ]
    else:
        problems.add(f"{field}.preferred_batch_size", f"expected a list of integers, got {json.dumps(sizes)}")
    for triton_key, our_key in (("max_queue_delay_microseconds", "max_queue_delay_us"),
                                ("priority_levels", "priority_levels"),
                                ("default_priority_level", "default_priority_level")):  # fmt: skip
        if triton_key in value:
            batching[our_key] = _integer(value[triton_key], f"{field}.{triton_key}", problems)
    if "default_queue_policy" in value:
        _read_queue_policy(value["default_queue_policy"], batching, problems)
    result["dynamic_batching"] = batching


def _read_queue_policy(value: Any, batching: dict[str, Any], problems: _Problems) -> None:
    field = "dynamic_batching.default_queue_policy"
    known = ("default_timeout_microseconds", "max_queue_size", "allow_timeout_override")
    if not _check_keys(value, field, known, {"timeout_action": "REJECT"}, problems):
        return
    if "default_timeout_microseconds" in value:
        timeout = _integer(value["default_timeout_microseconds"], f"{field}.default_timeout_microseconds", problems)
        batching["default_timeout_us"] = timeout
    if "max_queue_size" in value:
        size = _integer(value["max_queue_size"], f"{field}.max_queue_size", problems)
        # Triton's 0 means unbounded; every Conveyor queue is bounded, so 0 keeps the default bound.
        if size != 0:
            batching["max_queue_size"] = size
    # allow_timeout_override is read and ignored: requests may always set a timeout.


def _read_instance_group(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    if not isinstance(value, list) or len(value) != 1:
        problems.add("instance_group", "expected a list of exactly one group (Conveyor runs one group per model)")
        return
    field = "instance_group[0]"
    group = value[0]
    if not _check_keys(group, field, ("count", "kind", "gpus"), _INSTANCE_GROUP_DEFAULTS, problems):
        return
    ours: dict[str, Any] = {}
    if "count" in group:
        ours["count"] = _integer(group["count"], f"{field}.count", problems)
    kind = group.get("kind", "KIND_AUTO")
    gpus = group.get("gpus", [])
    if kind == "KIND_CPU" and not gpus:
        ours["device"] = "cpu"
    elif kind == "KIND_GPU" and isinstance(gpus, list) and len(gpus) <= 1:
        index = _integer(gpus[0], f"{field}.gpus[0]", problems) if gpus else 0
        ours["device"] = f"cuda:{index}"
    elif kind != "KIND_AUTO" or gpus:
        problems.add(field, "expected kind KIND_CPU (no gpus), KIND_GPU with at most one gpu, or KIND_AUTO")
    result["instance_group"] = ours


def _read_version_policy(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    field = "version_policy"
    if not isinstance(value, Mapping) or len(value) != 1:
        problems.add(field, "expected exactly one of {latest: {num_versions}}, {all: {}}, {specific: {versions}}")
        return
    ((kind, body),) = value.items()
    if kind == "latest" and isinstance(body, Mapping):
        result[field] = {"latest": _integer(body.get("num_versions", 1), f"{field}.latest.num_versions", problems)}
    elif kind == "all" and body == {}:
        result[field] = {"all": True}
    elif kind == "specific" and isinstance(body, Mapping) and isinstance(body.get("versions"), list):
        versions = [_integer(v, f"{field}.specific.versions", problems) for v in body["versions"]]
        result[field] = {"specific": versions}
    else:
        problems.add(field, "expected exactly one of {latest: {num_versions}}, {all: {}}, {specific: {versions}}")


def _read_parameters(value: Any, result: dict[str, Any], problems: _Problems) -> None:
    if not isinstance(value, Mapping):
        problems.add("parameters", f"expected an object, got {json.dumps(value)}")
        return
    parameters: dict[str, Any] = {}
    for key, item in value.items():
        # Triton's form is {"key": {"string_value": "..."}}; plain scalars are ours.
        if isinstance(item, Mapping) and set(item) == {"string_value"}:
            parameters[key] = item["string_value"]
        elif isinstance(item, (str, int, float)):
            parameters[key] = item
        else:
            problems.add(f"parameters.{key}", f'expected {{"string_value": ...}} or a scalar, got {json.dumps(item)}')
    result["parameters"] = parameters


_TOP_LEVEL_READERS = {
    "name": _read_name,
    "backend": _read_backend,
    "platform": _read_platform,
    "max_batch_size": _read_max_batch_size,
    "input": _read_tensors("input", _INPUT_DEFAULTS),
    "output": _read_tensors("output", _OUTPUT_DEFAULTS),
    "dynamic_batching": _read_dynamic_batching,
    "instance_group": _read_instance_group,
    "version_policy": _read_version_policy,
    "parameters": _read_parameters,
}
