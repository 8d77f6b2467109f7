"""The JSON fields of an infer request other than tensors: parameters and requested outputs."""

from __future__ import annotations

from typing import Any

from conveyor.errors import InvalidInput
from conveyor.protocol.types import Parameters, RequestedOutput

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
    if (
        "shared_memory_region" in parameters
        or (binary_data is not None and type(binary_data) is not bool)
        or type(classification) is not int
        or classification < 0
    ):
        raise _output_parameter_error(name, parameters, binary_data, classification)
    return RequestedOutput(name, binary_data, classification, parameters)


def _output_parameter_error(name: str, parameters: Parameters, binary_data: Any, classification: Any) -> InvalidInput:
    where = f"output '{name}'"
    if "shared_memory_region" in parameters:
        return InvalidInput(f"{where}: shared memory outputs are not supported; ask for JSON or binary data")
    if binary_data is not None and type(binary_data) is not bool:
        return InvalidInput(f"{where}: parameter 'binary_data' must be true or false, got {describe(binary_data)}")
    return InvalidInput(
        f"{where}: parameter 'classification' must be an integer >= 0 (the number of top classes), "
        f"got {describe(classification)}"
    )
