"""A model's config as the protocol shows it: v2 metadata and Triton's model config JSON.

Triton's config JSON uses model_config.proto's field names. Triton's HTTP front end
writes int64 fields as JSON numbers (protobuf's JSON form would quote them), and so
do we; perf_analyzer reads either. What perf_analyzer reads from it: max_batch_size,
model_transaction_policy.decoupled, and whether dynamic_batching or
sequence_batching is present (section 8 of the protocol notes).

`config_from_triton_json` (config_override.py) goes the other way, for the repository
extension's load request (`parameters.config`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from conveyor.config import ModelConfig, TensorConfig
from conveyor.protocol.config_override import config_from_triton_json
from conveyor.protocol.datatypes import TRITON_CONFIG_TYPES
from conveyor.protocol.raw_request import InputSpec

__all__ = ["config_from_triton_json", "input_specs", "model_metadata", "triton_model_config"]

# v2 metadata `platform` per backend, as Triton reports these backends.
# A torch model reports what Triton's PyTorch backend (which also serves .pt2) reports;
# a graph what Triton reports for its counterpart, an ensemble.
METADATA_PLATFORMS = {
    "onnx": "onnxruntime_onnx", "python": "python", "native": "native", "trees": "trees", "torch": "pytorch_libtorch",
    "graph": "ensemble",
}  # fmt: skip
# Triton's config names the backend, and the platform only for formats that have one
# (a python, native or trees model's config has platform "", as Triton's custom backends do;
# an ensemble has platform "ensemble" and no backend).
TRITON_BACKENDS = {
    "onnx": "onnxruntime", "python": "python", "native": "native", "trees": "trees", "torch": "pytorch", "graph": "",
}  # fmt: skip
TRITON_CONFIG_PLATFORMS = {
    "onnx": "onnxruntime_onnx", "python": "", "native": "", "trees": "", "torch": "pytorch_libtorch", "graph": "ensemble",
}  # fmt: skip


def model_metadata(config: ModelConfig, versions: Iterable[int | str]) -> dict[str, Any]:
    """The v2 model metadata object; a batching model's shapes lead with -1 (the batch)."""
    batch = [-1] if config.max_batch_size > 0 else []
    return {
        "name": config.name,
        "versions": [str(version) for version in versions],
        "platform": METADATA_PLATFORMS[config.backend],
        "inputs": [_tensor_metadata(tensor, batch) for tensor in config.inputs],
        "outputs": [_tensor_metadata(tensor, batch) for tensor in config.outputs],
    }


def _tensor_metadata(tensor: TensorConfig, batch: list[int]) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": batch + list(tensor.dims)}


def input_specs(config: ModelConfig) -> list[InputSpec]:
    """The model's inputs as `decode_infer_request(input_specs=...)` takes them."""
    return [InputSpec(tensor.name, tensor.datatype, tuple(tensor.dims)) for tensor in config.inputs]


def triton_model_config(config: ModelConfig) -> dict[str, Any]:
    """Triton's ModelConfig as JSON (what GET /v2/models/{m}/config returns)."""
    triton: dict[str, Any] = {
        "name": config.name,
        "platform": TRITON_CONFIG_PLATFORMS[config.backend],
        "backend": TRITON_BACKENDS[config.backend],
        "version_policy": _version_policy(config),
        "max_batch_size": config.max_batch_size,
        "input": [_triton_tensor(tensor) for tensor in config.inputs],
        "output": [_triton_tensor(tensor) for tensor in config.outputs],
    }
    # Only a batching model has a dynamic batcher in Triton's sense; perf_analyzer
    # takes the key's presence to mean "dynamic batching is on".
    if config.max_batch_size > 0:
        triton["dynamic_batching"] = _dynamic_batching(config)
    triton["instance_group"] = [_instance_group(config)]
    triton["model_transaction_policy"] = {"decoupled": False}
    triton["parameters"] = {key: {"string_value": _parameter_text(value)} for key, value in config.parameters.items()}
    return triton


def _triton_tensor(tensor: TensorConfig) -> dict[str, Any]:
    triton = {"name": tensor.name, "data_type": TRITON_CONFIG_TYPES[tensor.datatype], "dims": list(tensor.dims)}
    if tensor.labels is not None:
        triton["label_filename"] = tensor.labels  # the classification extension's labels
    return triton


def _version_policy(config: ModelConfig) -> dict[str, Any]:
    policy = config.version_policy
    if policy.latest is not None:
        return {"latest": {"num_versions": policy.latest}}
    if policy.all:
        return {"all": {}}
    return {"specific": {"versions": list(policy.specific or ())}}


def _dynamic_batching(config: ModelConfig) -> dict[str, Any]:
    batching = config.dynamic_batching
    return {
        "preferred_batch_size": list(batching.preferred_batch_sizes),
        "max_queue_delay_microseconds": batching.max_queue_delay_us,
        "preserve_ordering": False,
        "priority_levels": batching.priority_levels,
        # Already resolved by the config: 0 in the file means the lowest level.
        "default_priority_level": batching.default_priority_level,
        "default_queue_policy": {
            # An expired request is answered with DeadlineExceeded, never run late.
            "timeout_action": "REJECT",
            "default_timeout_microseconds": batching.default_timeout_us,
            # Requests may always set their own `timeout` parameter.
            "allow_timeout_override": True,
            "max_queue_size": batching.max_queue_size,
        },
    }


def _instance_group(config: ModelConfig) -> dict[str, Any]:
    device = config.instance_group.device
    if device == "cpu":
        kind, gpus = "KIND_CPU", []
    else:
        kind, gpus = "KIND_GPU", [int(device.partition(":")[2] or 0)]
    return {"name": f"{config.name}_0", "kind": kind, "count": config.instance_group.count, "gpus": gpus}


def _parameter_text(value: str | int | float | bool) -> str:
    # Triton's ModelParameter holds only string_value; booleans as TOML spells them.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
