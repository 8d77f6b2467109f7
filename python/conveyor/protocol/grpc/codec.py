"""Messages of inference.proto <-> the protocol types and the data plane's JSON-shaped dicts.

Inference requests are decoded by hand on the hot path: each raw input becomes a
numpy view of the bytes protobuf hands out (no further copy; the batcher copies it
once into the batch). Responses always carry raw output contents, because
tritonclient.grpc decodes nothing else. The rarer messages (metadata, config,
statistics, repository index) go through json_format from the same dicts the HTTP
server sends as JSON: their field names are Triton's JSON names, so one shape
serves both front ends, and a field the proto lacks fails loudly in the tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from conveyor.errors import InvalidInput, ModelExecutionError
from conveyor.protocol.binary import (
    array_from_raw,
    check_shape_size,
    format_shape,
    object_array,
    raw_view,
    serialize_bytes,
)
from conveyor.protocol.datatypes import numpy_dtype
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.request_fields import check_shared_memory_input_size, shared_memory_ref
from conveyor.protocol.types import InferInput, InferRequest, InferResponse, RequestedOutput

# Which InferTensorContents field holds each datatype, and the dtype protobuf gives
# its values as. FP16 and BF16 have no field: they travel raw only.
_CONTENTS_FIELDS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(bool)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}

_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


# -- parameters ----------------------------------------------------------------------


def parameters_from_proto(parameters: Any, *, where: str) -> dict[str, Any]:
    """A map of InferParameter or ModelRepositoryParameter as plain values."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"{where}: parameter '{key}' has no value set")
        values[key] = getattr(parameter, kind)
    return values


def parameters_to_proto(values: dict[str, Any], target: Any, *, where: str) -> None:
    """Fill a map<string, InferParameter> from plain values (bool, int, float, str)."""
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):  # before int: bool is an int subclass
            slot.bool_param = value
        elif isinstance(value, (int, np.integer)):
            value = int(value)
            if value > _INT64_MAX and value <= _UINT64_MAX:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, (float, np.floating)):
            slot.double_param = float(value)
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise ModelExecutionError(
                f"{where}: parameter '{key}' is a {type(value).__name__}; expected bool, int, float or str"
            )


# -- inference -----------------------------------------------------------------------


def infer_request_from_proto(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the data plane's InferRequest; raw inputs are not copied.

    Inputs in shared memory take no entry of raw_input_contents (as tritonclient sends them):
    the entries belong, in order, to the other inputs."""
    raw = message.raw_input_contents
    tensors = message.inputs
    if raw:
        outside = sum("shared_memory_region" not in tensor.parameters for tensor in tensors)
        if len(raw) != outside:
            which = "inputs" if outside == len(tensors) else "inputs outside shared memory"
            raise InvalidInput(
                f"model '{message.model_name}': raw_input_contents has {len(raw)} entries for {outside} {which}; "
                "it needs exactly one per input, in input order"
            )
    inputs = []
    raw_index = 0
    for tensor in tensors:
        where = f"model '{message.model_name}': input '{tensor.name}'"
        datatype = tensor.datatype
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise InvalidInput(f"{where}: shape {format_shape(shape)} has a negative dimension")
        check_shape_size(shape, where=where)
        parameters = parameters_from_proto(tensor.parameters, where=where) if tensor.parameters else {}
        shared_memory = shared_memory_ref(parameters, where=where) if parameters else None
        if shared_memory is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where} has both shared memory parameters and 'contents'; give one")
            numpy_dtype(datatype)  # InvalidInput for an unknown datatype
            check_shared_memory_input_size(shared_memory, datatype, shape, where=where)
            data = None  # read from the region by the data plane
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"{where}: sets 'contents' while the request uses raw_input_contents; "
                    "use one or the other for all inputs"
                )
            data = array_from_raw(raw[raw_index], datatype, shape, where=where)
            raw_index += 1
        else:
            data = _array_from_contents(tensor.contents, datatype, shape, where=where)
        inputs.append(InferInput(tensor.name, datatype, shape, data, parameters, shared_memory))
    outputs = message.outputs
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=[_requested_output(message.model_name, output) for output in outputs] if outputs else [],
        parameters=parameters_from_proto(message.parameters, where="request") if message.parameters else {},
    )


def _array_from_contents(
    contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], *, where: str
) -> np.ndarray:
    """A tensor sent in typed contents (fp32_contents, bytes_contents, ...), shaped."""
    target = numpy_dtype(datatype)  # InvalidInput for an unknown datatype
    spec = _CONTENTS_FIELDS.get(datatype)
    if spec is None:
        raise InvalidInput(f"{where}: {datatype} data can only be sent in raw_input_contents")
    field_name, wire_dtype = spec
    present = [descriptor.name for descriptor, _ in contents.ListFields()]
    if any(name != field_name for name in present):
        raise InvalidInput(f"{where}: {datatype} values go in contents.{field_name}, got contents.{', '.join(present)}")
    values = getattr(contents, field_name)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: shape {format_shape(shape)} needs {count} {datatype} values in contents.{field_name}, "
            f"got {len(values)}"
        )
    if datatype == "BYTES":
        return object_array(list(values)).reshape(shape)
    array = np.fromiter(values, dtype=wire_dtype, count=count)
    if target != wire_dtype:
        narrowed = array.astype(target)
        if not np.array_equal(narrowed, array):
            raise InvalidInput(f"{where}: contents.{field_name} holds values out of the range of {datatype}")
        array = narrowed
    return array.reshape(shape)


def _requested_output(model_name: str, output: Any) -> RequestedOutput:
    if not output.parameters:
        return RequestedOutput(output.name)
    where = f"model '{model_name}': requested output '{output.name}'"
    parameters = parameters_from_proto(output.parameters, where=where)
    classification = parameters.pop("classification", 0)
    if type(classification) is not int or classification < 0:
        raise InvalidInput(f"{where}: parameter 'classification' must be an integer >= 0, got {classification!r}")
    # binary_data is HTTP's choice; gRPC outputs are always raw.
    parameters.pop("binary_data", None)
    shared_memory = shared_memory_ref(parameters, where=where, classification=classification)
    return RequestedOutput(output.name, classification=classification, parameters=parameters,
                           shared_memory=shared_memory)


def infer_response_to_proto(response: InferResponse) -> pb.ModelInferResponse:
    """An InferResponse as a ModelInferResponse with every output in raw_output_contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    if response.parameters:
        parameters_to_proto(response.parameters, message.parameters, where="response")
    tensors = message.outputs
    raw = message.raw_output_contents
    for output in response.outputs:
        where = f"model '{response.model_name}': output '{output.name}'"
        tensor = tensors.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.shared_memory is not None:
            # Written to the region already: metadata only, and an empty entry that keeps
            # raw_output_contents one per output, as Triton sends it (tritonclient finds an
            # output's bytes by its index).
            raw.append(b"")
            continue
        if output.parameters:
            parameters_to_proto(output.parameters, tensor.parameters, where=where)
        if output.datatype == "BYTES":
            raw.append(serialize_bytes(output.data, where=where))
        else:
            # protobuf takes only bytes: this is the one copy out of the batch output.
            raw.append(raw_view(output.data, output.datatype, where=where).tobytes())
    return message


# -- metadata, configuration, statistics, repository ---------------------------------


def from_json_shape(payload: dict[str, Any], message: Message) -> Message:
    """Fill `message` from a dict shaped like its Triton JSON form; unknown fields are an error."""
    return json_format.ParseDict(payload, message, ignore_unknown_fields=False)


def model_metadata_to_proto(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    return from_json_shape(metadata, pb.ModelMetadataResponse())


def model_config_to_proto(config: dict[str, Any]) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=from_json_shape(config, pb.ModelConfig()))


def statistics_to_proto(statistics: dict[str, Any]) -> pb.ModelStatisticsResponse:
    # A graph's per-step statistics ("steps") have no field in the protocol's message: over
    # gRPC, a step's own model statistics (its model's name) say what the HTTP form adds.
    models = [{key: value for key, value in entry.items() if key != "steps"} for entry in statistics["model_stats"]]
    return from_json_shape({**statistics, "model_stats": models}, pb.ModelStatisticsResponse())


def repository_index_to_proto(rows: list[dict[str, Any]]) -> pb.RepositoryIndexResponse:
    return from_json_shape({"models": rows}, pb.RepositoryIndexResponse())


def shared_memory_status_to_proto(rows: list[dict[str, Any]], message_type: type[Message]) -> Message:
    """A System- or CudaSharedMemoryStatusResponse holding `rows` (the HTTP status list) by region name."""
    message = message_type()
    for row in rows:
        message.regions[row["name"]].CopyFrom(message_type.RegionStatus(**row))
    return message
