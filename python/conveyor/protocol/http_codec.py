"""KServe v2 REST inference bodies to and from InferRequest / InferResponse; no I/O.

A body is a JSON header, optionally followed by binary tensor data (Triton's binary
tensor extension): the `Inference-Header-Content-Length` HTTP header gives the JSON
length, and each binary input's `parameters.binary_data_size` its share of the rest,
in input order. Header length 0 is the raw form: the whole body is the bytes of the
model's only input. A JSON null stands for a field or parameter not given: MLServer's
clients write `"id": null` and `"headers": null` for what they leave unset. Binary inputs decode to views of the body, binary outputs encode
to views of the output arrays: tensor bytes are never copied here.

JSON is read and written with orjson: it parses a batch-1 JSON request 10x faster
than the json module and writes the response 8x faster, which makes a whole
decode + encode round of a JSON body 2x faster (bench/bench_protocol.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from conveyor.errors import InternalError, InvalidInput
from conveyor.protocol.binary import (
    array_from_raw,
    check_dtype,
    check_shape_size,
    expected_byte_size,
    format_shape,
    raw_view,
    serialize_bytes,
)
from conveyor.protocol.datatypes import DATATYPES
from conveyor.protocol.json_tensors import array_from_json, json_from_array, utf8_strings
from conveyor.protocol.raw_request import InputSpec, decode_raw_request
from conveyor.protocol.request_fields import (
    check_parameters,
    check_shared_memory_input_size,
    decode_requested_outputs,
    describe,
    request_parameters,
    shared_memory_ref,
)
from conveyor.protocol.types import InferInput, InferOutput, InferRequest, InferResponse, SharedMemoryRef

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"

_KNOWN_DATATYPES = frozenset(DATATYPES)

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class _InputHeader:
    """One entry of `inputs`, validated, before its data is read."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: dict[str, Any]
    data: Any  # the JSON `data` value; unused when binary_size or shared_memory is not None
    binary_size: int | None
    shared_memory: SharedMemoryRef | None = None


def decode_infer_request(
    body: bytes | memoryview,
    header_length: int | None,
    *,
    model_name: str,
    model_version: str,
    input_specs: Sequence[InputSpec] | None = None,
    max_batch_size: int = 0,
    max_json_depth: int | None = None,
) -> InferRequest:
    """Decode an infer request body; every malformation raises InvalidInput saying where.

    `header_length` is the Inference-Header-Content-Length value (None when absent:
    the whole body is JSON). `input_specs` and `max_batch_size` describe the model's
    inputs (see `model_config.input_specs`); only the raw form (header length 0),
    which has no JSON to name its input, needs them. `max_json_depth` bounds the
    nesting of the JSON (None: orjson's own bound of 1024).
    """
    total = len(body) if isinstance(body, bytes) else memoryview(body).nbytes
    if header_length == 0:
        return decode_raw_request(
            body,
            model_name=model_name,
            model_version=model_version,
            input_specs=input_specs,
            max_batch_size=max_batch_size,
        )
    if header_length is None:
        header = body
    elif header_length < 0:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} is {header_length}; it must be >= 0")
    elif header_length > total:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} is {header_length} but the body has only {total} bytes")
    else:
        header = body[:header_length]
    document = _parse_json(header, whole_body=header_length is None)
    if max_json_depth is not None and _may_nest_deeper(header, max_json_depth):
        check_json_depth(document, max_json_depth, "the request's JSON", scalar_lists_end=True)
    if not isinstance(document, dict):
        raise InvalidInput(f"the request's JSON must be an object, got {describe(document)}")
    request = InferRequest(model_name=model_name, model_version=model_version)
    request_id = document.get("id")
    if request_id is None:
        request_id = ""
    elif not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {describe(request_id)}")
    request.id = request_id
    request.parameters, request.binary_data_output = request_parameters(_given(document.get("parameters")))
    request.outputs = decode_requested_outputs(_outputs_given(document.get("outputs")))
    headers = _input_headers(document)
    binary_start = total if header_length is None else header_length
    request.inputs = _read_inputs(headers, body, binary_start, total, has_header_length=header_length is not None)
    return request


def _may_nest_deeper(text: bytes | memoryview, limit: int) -> bool:
    """False when the JSON text holds at most `limit` opening brackets, so it cannot nest deeper
    (a count in C, where walking the parsed document costs microseconds per request)."""
    if isinstance(text, memoryview):
        if text.nbytes > 65536:
            return True  # a large JSON body: walk it (scalar lists cost one look each)
        text = text.tobytes()
    return text.count(b"[") + text.count(b"{") > limit


def check_json_depth(value: Any, limit: int, what: str, *, scalar_lists_end: bool = False) -> None:
    """Raise InvalidInput if arrays and objects nest deeper than `limit` in `value` (a parsed document).

    Iterative, so any depth is safe to measure. `scalar_lists_end`: a list whose first item is
    not an array or object is taken to hold scalars only, so a tensor's `data` of millions of
    numbers costs one look (an irregular list is refused later by the tensor decoder anyway).
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            children = item.values()
        elif type(item) is list:
            if scalar_lists_end and item and type(item[0]) not in (list, dict):
                continue
            children = item
        else:
            continue
        if depth > limit:
            raise InvalidInput(
                f"{what} nests arrays and objects more than {limit} deep; flatten it, or raise the limit with "
                "--max-json-depth"
            )
        stack.extend((child, depth + 1) for child in children if type(child) in (list, dict))


def _given(parameters: Any) -> Any:
    """A `parameters` object without its null entries (each stands for a parameter not given)."""
    if type(parameters) is dict and None in parameters.values():
        return {key: value for key, value in parameters.items() if value is not None}
    return parameters


def _outputs_given(outputs: Any) -> Any:
    """The `outputs` list with null parameters dropped from each entry (a copy only when there are any)."""
    if type(outputs) is not list:
        return outputs
    cleaned = outputs
    for index, entry in enumerate(outputs):
        if type(entry) is dict and type(entry.get("parameters")) is dict and None in entry["parameters"].values():
            if cleaned is outputs:
                cleaned = list(outputs)
            cleaned[index] = {**entry, "parameters": _given(entry["parameters"])}
    return cleaned


def _parse_json(buffer: bytes | memoryview, *, whole_body: bool) -> Any:
    try:
        return orjson.loads(buffer)
    except orjson.JSONDecodeError as exc:
        error = exc
    # orjson follows RFC 8259 strictly; the json module also reads NaN and Infinity,
    # which json.dumps and python-rapidjson (tritonclient) write for non-finite floats.
    try:
        document = json.loads(bytes(buffer))
    except (ValueError, RecursionError):
        pass
    else:
        _refuse_lone_surrogates(document)
        return document
    if "depth" in error.msg:  # orjson reads at most 1024 levels
        raise InvalidInput("the request's JSON nests arrays and objects more than 1024 deep; flatten it")
    if whole_body and error.pos > 0 and _is_json(buffer[: error.pos]):
        raise InvalidInput(
            f"the body goes on after its JSON ends at byte {error.pos}: a body with binary data needs the "
            f"{HEADER_LENGTH_HEADER} header to say where the JSON ends"
        )
    raise InvalidInput(
        f"the request's JSON is malformed: {error.msg} at line {error.lineno} column {error.colno} (byte {error.pos})"
    )


def _refuse_lone_surrogates(document: Any) -> None:
    """Raise InvalidInput if a string holds half of a UTF-16 surrogate pair.

    orjson refuses "\\ud800" (it is not Unicode); the json module reads it, and a request id,
    output name or error message holding it could then not be written back as JSON.
    """
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            "the request's JSON has a string with an unpaired UTF-16 surrogate (such as \\ud800), which is not "
            "valid Unicode; send the character itself or both halves of its surrogate pair"
        ) from None


def _is_json(buffer: bytes | memoryview) -> bool:
    try:
        orjson.loads(buffer)
    except orjson.JSONDecodeError:
        return False
    return True


def _input_headers(document: dict[str, Any]) -> list[_InputHeader]:
    inputs = document.get("inputs")
    if inputs is None:
        raise InvalidInput("the request has no 'inputs': expected a list of {name, shape, datatype, data} objects")
    if type(inputs) is not list:
        raise InvalidInput(f"'inputs' must be a list, got {describe(inputs)}")
    headers: list[_InputHeader] = []
    seen: set[str] = set()
    for index, entry in enumerate(inputs):
        header = _input_header(entry, index)
        if header.name in seen:
            raise InvalidInput(f"input '{header.name}' appears more than once in 'inputs'")
        seen.add(header.name)
        headers.append(header)
    return headers


def _input_header(entry: Any, index: int) -> _InputHeader:
    # The hot path: plain type checks first; the error helpers work out what to say.
    if type(entry) is not dict:
        raise InvalidInput(f"inputs[{index}] must be an object, got {describe(entry)}")
    name = entry.get("name")
    if type(name) is not str or not name:
        problem = "has no 'name'" if name is None else f"has 'name' {describe(name)}; expected a non-empty string"
        raise InvalidInput(f"inputs[{index}] {problem}")
    datatype = entry.get("datatype")
    if type(datatype) is not str or datatype not in _KNOWN_DATATYPES:  # a list or object is not hashable
        raise _datatype_error(name, datatype)
    shape = entry.get("shape")
    if type(shape) is not list or not _valid_dims(shape):
        raise _shape_error(name, shape)
    check_shape_size(shape, where=f"input '{name}'")
    parameters = entry.get("parameters")
    binary_size = shared_memory = None
    if parameters is None:
        parameters = {}
    else:
        parameters = check_parameters(_given(parameters), where=f"input '{name}' 'parameters'")
        binary_size = parameters.pop("binary_data_size", None)
        shared_memory = shared_memory_ref(parameters, where=f"input '{name}'")
        if shared_memory is not None:
            _check_shared_memory_input(entry, name, datatype, shape, shared_memory, binary_size)
    if binary_size is not None:
        _check_binary_size(name, datatype, shape, binary_size, has_data="data" in entry)
    elif "data" not in entry and shared_memory is None:
        raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    return _InputHeader(name, datatype, tuple(shape), parameters, entry.get("data"), binary_size, shared_memory)


def _check_shared_memory_input(
    entry: dict[str, Any], name: str, datatype: str, shape: list[int], ref: SharedMemoryRef, binary_size: Any
) -> None:
    where = f"input '{name}'"
    if "data" in entry or binary_size is not None:
        given = "'data'" if "data" in entry else "parameters.binary_data_size"
        raise InvalidInput(f"{where} has both shared memory parameters and {given}; give one")
    check_shared_memory_input_size(ref, datatype, shape, where=where)


def _valid_dims(shape: list[Any]) -> bool:
    return all(type(dim) is int and dim >= 0 for dim in shape)


def _datatype_error(name: str, datatype: Any) -> InvalidInput:
    if datatype is None:
        return InvalidInput(f"input '{name}' has no 'datatype'")
    return InvalidInput(
        f"input '{name}': unknown datatype {describe(datatype)}; expected one of {', '.join(DATATYPES)}"
    )


def _shape_error(name: str, shape: Any) -> InvalidInput:
    if shape is None:
        return InvalidInput(f"input '{name}' has no 'shape'")
    if type(shape) is not list or any(type(dim) is not int for dim in shape):
        return InvalidInput(f"input '{name}': 'shape' must be a list of integers, got {describe(shape)}")
    return InvalidInput(f"input '{name}': shape {format_shape(shape)} has a negative dimension; each must be >= 0")


def _check_binary_size(name: str, datatype: str, shape: list[int], binary_size: Any, *, has_data: bool) -> None:
    where = f"input '{name}'"
    if has_data:
        raise InvalidInput(f"{where} has both 'data' and parameters.binary_data_size; give one")
    if type(binary_size) is not int or binary_size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be an integer >= 0, got {describe(binary_size)}")
    expected = expected_byte_size(datatype, shape)
    if expected is not None and binary_size != expected:
        raise InvalidInput(
            f"{where}: binary_data_size is {binary_size} but shape {format_shape(shape)} "
            f"needs {expected} bytes of {datatype} data"
        )


def _read_inputs(
    headers: list[_InputHeader], body: bytes | memoryview, start: int, total: int, *, has_header_length: bool
) -> list[InferInput]:
    claimed = sum(header.binary_size or 0 for header in headers)
    available = total - start
    if claimed and not has_header_length:
        raise InvalidInput(
            f"the inputs' binary_data_size add up to {claimed} bytes but the request has no "
            f"{HEADER_LENGTH_HEADER} header to say where the JSON ends and the binary data starts"
        )
    if claimed > available:
        raise InvalidInput(
            f"the body has {available} bytes after the JSON header but the inputs' binary_data_size add up to {claimed}"
        )
    if claimed < available:
        raise InvalidInput(
            f"the body has {available} bytes after the JSON header but the inputs' binary_data_size "
            f"add up to {claimed}: {available - claimed} extra trailing bytes"
        )
    view = body if isinstance(body, memoryview) else memoryview(body)
    inputs: list[InferInput] = []
    offset = start
    for header in headers:
        where = f"input '{header.name}'"
        if header.shared_memory is not None:
            data = None  # read from the region by the data plane
        elif header.binary_size is None:
            data = array_from_json(header.data, header.datatype, header.shape, where=where)
        else:
            end = offset + header.binary_size
            data = array_from_raw(view[offset:end], header.datatype, header.shape, where=where)
            offset = end
        inputs.append(InferInput(header.name, header.datatype, header.shape, data, header.parameters,
                                 header.shared_memory))
    return inputs


def encode_infer_response(response: InferResponse) -> tuple[list[bytes | memoryview], int | None]:
    """The response body as buffers to write in order, and the JSON header's length.

    The header length is None when no output is binary (the body is plain JSON);
    otherwise send it as Inference-Header-Content-Length. Binary outputs are views
    of their arrays, which stay alive as long as the buffers do.
    """
    payloads: list[bytes | memoryview] = []
    outputs = [_encode_output(output, payloads) for output in response.outputs]
    header: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        header["model_version"] = response.model_version
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs
    try:
        encoded = orjson.dumps(header, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise InternalError(f"the response header cannot be written as JSON: {exc}") from None
    if not payloads:
        return [encoded], None
    return [encoded, *payloads], len(encoded)


def _encode_output(output: InferOutput, payloads: list[bytes | memoryview]) -> dict[str, Any]:
    where = f"output '{output.name}'"
    array, datatype = output.data, output.datatype
    if array.size != math.prod(output.shape):
        raise InternalError(f"{where}: shape {format_shape(output.shape)} does not match data of shape {array.shape}")
    entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(output.shape)}
    if output.shared_memory is not None:  # already written to the region: metadata only
        return entry
    # BF16 has no JSON form; BYTES that are not UTF-8 have none either (JSON strings are text).
    binary = output.binary_data or datatype == "BF16"
    payload: bytes | memoryview | None = None
    if datatype == "BYTES":
        check_dtype(array, datatype, where=where)
        strings = None if binary else utf8_strings(array, where=where)
        if strings is None:
            payload = serialize_bytes(array, where=where)
        else:
            entry["data"] = strings
    elif binary:
        payload = raw_view(array, datatype, where=where)
    else:
        check_dtype(array, datatype, where=where)
        entry["data"] = json_from_array(array)
    if payload is not None:
        size = len(payload) if isinstance(payload, bytes) else payload.nbytes
        entry["parameters"] = {**output.parameters, "binary_data_size": size}
        payloads.append(payload)
    elif output.parameters:
        entry["parameters"] = output.parameters
    return entry


def output_is_binary(request: InferRequest, output_name: str) -> bool:
    """Whether the request wants `output_name` as binary data (the output's own choice first)."""
    for requested in request.outputs:
        if requested.name == output_name and requested.binary_data is not None:
            return requested.binary_data
    return request.binary_data_output


def encode_error(message: str) -> bytes:
    """The protocol's error body: {"error": message}."""
    return orjson.dumps({"error": message})


def encode_json(value: Any) -> bytes:
    """Any other JSON body (metadata, config, statistics); numpy values allowed."""
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise InternalError(f"a response body cannot be written as JSON: {exc}") from None


__all__ = [
    "HEADER_LENGTH_HEADER",
    "decode_infer_request",
    "encode_error",
    "encode_infer_response",
    "encode_json",
    "output_is_binary",
]
