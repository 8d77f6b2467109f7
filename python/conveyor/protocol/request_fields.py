"""The JSON fields of an infer request other than tensors: parameters and requested outputs."""

from __future__ import annotations

from typing import Any

from conveyor.errors import InvalidInput
from conveyor.protocol.binary import expected_byte_size, format_shape
from conveyor.protocol.types import Parameters, RequestedOutput, SharedMemoryRef

# Request parameters the schedule-policy extension defines: integers >= 0 (priority
# 1 is the highest, 0 the model's default; timeout in microseconds, 0 = none).
_UNSIGNED_PARAMETERS = ("priority", "timeout")


def describe(value: Any) -> str:
    """A short JSON-flavoured rendering of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return f"a {type(value).__name__}"


def check_parameters(value: Any, *, where: str) -> Parameters:
    """A `parameters` object as a new dict; values must be strings, numbers or booleans."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be an object, got {describe(value)}")
    for key, item in value.items():
        if not isinstance(item, (str, int, float)):  # bool is an int
            raise InvalidInput(f"{where}: '{key}' must be a string, number or boolean, got {describe(item)}")
    return dict(value)


def request_parameters(value: Any) -> tuple[Parameters, bool]:
    """The request's parameters without `binary_data_output`, and that flag."""
    if value is None:
        return {}, False
    parameters = check_parameters(value, where="request 'parameters'")
    binary_data_output = parameters.pop("binary_data_output", False)
    if type(binary_data_output) is not bool:
        raise InvalidInput(
            f"request parameter 'binary_data_output' must be true or false, got {describe(binary_data_output)}"
        )
    for key in _UNSIGNED_PARAMETERS:
        if key in parameters:
            item = parameters[key]
            if type(item) is not int or item < 0:
                raise InvalidInput(f"request parameter '{key}' must be an integer >= 0, got {describe(item)}")
    return parameters, binary_data_output


def decode_requested_outputs(value: Any) -> list[RequestedOutput]:
    """The `outputs` list; absent means every output with the request's defaults."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a list, got {describe(value)}")
    outputs = [_requested_output(entry, index) for index, entry in enumerate(value)]
    seen: set[str] = set()
    for output in outputs:
        if output.name in seen:
            raise InvalidInput(f"output '{output.name}' appears more than once in 'outputs'")
        seen.add(output.name)
    return outputs


def _requested_output(entry: Any, index: int) -> RequestedOutput:
    if type(entry) is not dict:
        raise InvalidInput(f"outputs[{index}] must be an object, got {describe(entry)}")
    name = entry.get("name")
    if type(name) is not str or not name:
        problem = "has no 'name'" if name is None else f"has 'name' {describe(name)}; expected a non-empty string"
        raise InvalidInput(f"outputs[{index}] {problem}")
    parameters = entry.get("parameters")
    if parameters is None:
        return RequestedOutput(name)
    parameters = check_parameters(parameters, where=f"output '{name}' 'parameters'")
    binary_data = parameters.pop("binary_data", None)
    classification = parameters.pop("classification", 0)
    if (binary_data is not None and type(binary_data) is not bool) or type(classification) is not int or classification < 0:
        raise _output_parameter_error(name, binary_data, classification)
    shared_memory = shared_memory_ref(parameters, where=f"output '{name}'", classification=classification)
    return RequestedOutput(name, binary_data, classification, parameters, shared_memory)


def shared_memory_ref(parameters: Parameters, *, where: str, classification: int = 0) -> SharedMemoryRef | None:
    """The tensor's place in a shared-memory region, taken out of its `parameters`; None when it
    names no region. InvalidInput, saying which parameter and why, when the parameters are wrong.

    `classification`: the output's classification count; top-N classes cannot go to shared
    memory (the region would hold the scores, not the classes)."""
    if "shared_memory_region" not in parameters:
        for stray in ("shared_memory_byte_size", "shared_memory_offset"):
            if stray in parameters:
                raise InvalidInput(f"{where}: parameter '{stray}' needs 'shared_memory_region' beside it")
        return None
    region = parameters.pop("shared_memory_region")
    offset = parameters.pop("shared_memory_offset", 0)
    byte_size = parameters.pop("shared_memory_byte_size", None)
    if type(region) is not str or not region:
        raise InvalidInput(f"{where}: 'shared_memory_region' must be a region's name (a non-empty string), "
                           f"got {describe(region)}")
    if type(offset) is not int or offset < 0:
        raise InvalidInput(f"{where}: 'shared_memory_offset' must be an integer >= 0 (bytes from the start of "
                           f"the registered region), got {describe(offset)}")
    if byte_size is None:
        raise InvalidInput(f"{where}: 'shared_memory_region' needs 'shared_memory_byte_size' beside it "
                           "(the tensor's size in bytes)")
    if type(byte_size) is not int or byte_size < 0:
        raise InvalidInput(f"{where}: 'shared_memory_byte_size' must be an integer >= 0, got {describe(byte_size)}")
    if classification:
        raise InvalidInput(f"{where}: a classification output cannot be written to shared memory; ask for it as "
                           "JSON or binary data")
    return SharedMemoryRef(region, offset, byte_size)


def check_shared_memory_input_size(ref: SharedMemoryRef, datatype: str, shape: Any, *, where: str) -> None:
    """Raise InvalidInput unless a fixed-size input's shared_memory_byte_size is what its shape needs
    (a BYTES input's size is checked when its elements are read)."""
    expected = expected_byte_size(datatype, shape)
    if expected is not None and ref.byte_size != expected:
        raise InvalidInput(
            f"{where}: shared_memory_byte_size is {ref.byte_size} but shape {format_shape(shape)} needs "
            f"{expected} bytes of {datatype} data"
        )


def _output_parameter_error(name: str, binary_data: Any, classification: Any) -> InvalidInput:
    where = f"output '{name}'"
    if binary_data is not None and type(binary_data) is not bool:
        return InvalidInput(f"{where}: parameter 'binary_data' must be true or false, got {describe(binary_data)}")
    return InvalidInput(
        f"{where}: parameter 'classification' must be an integer >= 0 (the number of top classes), "
        f"got {describe(classification)}"
    )
