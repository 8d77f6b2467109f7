"""The REST infer codec: decoding requests (JSON, binary, raw) and encoding responses."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import orjson
import pytest

from conveyor.errors import InternalError, InvalidInput, ModelExecutionError
from conveyor.protocol import (
    InferOutput,
    InferResponse,
    InputSpec,
    SharedMemoryRef,
    decode_infer_request,
    encode_error,
    encode_infer_response,
    encode_json,
    output_is_binary,
)

# One array per datatype, with the extremes of its range where it has any.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-65504.0, 0.1, 6.1e-05, 1.5]], dtype=np.float16),
    "FP32": np.array([[-3.4e38, 0.1, 1e-45, 7.25]], dtype=np.float32),
    "FP64": np.array([[-1.7e308, 0.1, 5e-324, 1 / 3]], dtype=np.float64),
}
BYTES_SAMPLE = np.array([[b"hello", b""], [b"\xe2\x82\xac", b"x" * 300]], dtype=object)
BINARY_ONLY_BYTES = np.array([b"\xff\x00\xfe", b"ok"], dtype=object)


def serialize_bytes_reference(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


def build_body(inputs: list[tuple[str, str, np.ndarray, bool]], **fields: object) -> tuple[bytes, int | None]:
    """A request body as a client writes it: (name, datatype, array, binary) per input."""
    entries, blobs = [], []
    for name, datatype, array, binary in inputs:
        entry: dict[str, object] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = serialize_bytes_reference(array) if datatype == "BYTES" else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [item.decode("utf-8") for item in array.ravel()]
        else:
            entry["data"] = array.tolist()  # nested, as a JSON client writes a matrix
        entries.append(entry)
    header = json.dumps({**fields, "inputs": entries}).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def decode(body: bytes | memoryview, header_length: int | None = None, **kwargs: object):
    return decode_infer_request(body, header_length, model_name="m", model_version="", **kwargs)


def owner_of(array: np.ndarray) -> object:
    """The object at the end of an array's base chain (through memoryviews)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    while isinstance(base, memoryview):
        base = base.obj
    return base


# --- decoding: round trips -------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(SAMPLES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_numeric_datatype_round_trips(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    body, header_length = build_body([("x", datatype, array, binary)])
    request = decode(body, header_length)
    (decoded,) = request.inputs
    assert decoded.name == "x" and decoded.datatype == datatype and decoded.shape == array.shape
    assert decoded.data.dtype == array.dtype
    np.testing.assert_array_equal(decoded.data, array)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_round_trip_as_object_arrays_of_bytes(binary: bool) -> None:
    body, header_length = build_body([("text", "BYTES", BYTES_SAMPLE, binary)])
    (decoded,) = decode(body, header_length).inputs
    assert decoded.data.dtype == object and decoded.data.shape == (2, 2)
    assert decoded.data.tolist() == BYTES_SAMPLE.tolist()
    assert all(type(item) is bytes for item in decoded.data.ravel())


def test_bytes_that_are_not_utf8_decode_from_binary() -> None:
    body, header_length = build_body([("blob", "BYTES", BINARY_ONLY_BYTES, True)])
    (decoded,) = decode(body, header_length).inputs
    assert decoded.data.tolist() == [b"\xff\x00\xfe", b"ok"]


def test_bf16_binary_decodes_to_its_uint16_bit_patterns() -> None:
    bits = np.array([[0x3F80, 0xC000, 0x7F80]], dtype=np.uint16)  # 1.0, -2.0, +inf
    body, header_length = build_body([("h", "BF16", bits, True)])
    (decoded,) = decode(body, header_length).inputs
    assert decoded.datatype == "BF16" and decoded.data.dtype == np.uint16
    np.testing.assert_array_equal(decoded.data, bits)
    widened = (decoded.data.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, [[1.0, -2.0, np.inf]])


def test_flat_json_data_is_reshaped() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]})
    (decoded,) = decode(body).inputs
    np.testing.assert_array_equal(decoded.data, [[1, 2, 3], [4, 5, 6]])


def test_json_integers_fill_float_tensors() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2.5, -3]}]})
    (decoded,) = decode(body).inputs
    assert decoded.data.dtype == np.float32
    np.testing.assert_array_equal(decoded.data, [1.0, 2.5, -3.0])


def test_non_finite_json_numbers_are_read() -> None:
    # json.dumps and python-rapidjson write NaN / Infinity, which strict JSON parsers refuse.
    # A complete surrogate pair is one character, read the same on this slower path.
    body = (b'{"id": "\\ud83d\\ude00", '
            b'"inputs": [{"name": "x", "datatype": "FP64", "shape": [3], "data": [NaN, Infinity, -Infinity]}]}')
    request = decode(body)
    (decoded,) = request.inputs
    assert np.isnan(decoded.data[0]) and decoded.data[1] == np.inf and decoded.data[2] == -np.inf
    assert request.id == "\U0001f600"


def test_empty_tensors_decode_in_both_forms() -> None:
    empty = np.zeros((0, 4), dtype=np.int64)
    for binary in (False, True):
        body, header_length = build_body([("x", "INT64", empty, binary)])
        (decoded,) = decode(body, header_length).inputs
        assert decoded.data.shape == (0, 4) and decoded.data.dtype == np.int64


def test_mixed_json_and_binary_inputs_keep_their_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[7, 8]], dtype=np.int16)
    c = np.array([b"z"], dtype=object)
    body, header_length = build_body([("a", "FP32", a, True), ("b", "INT16", b, False), ("c", "BYTES", c, True)])
    request = decode(body, header_length)
    assert [item.name for item in request.inputs] == ["a", "b", "c"]
    np.testing.assert_array_equal(request.inputs[0].data, a)
    np.testing.assert_array_equal(request.inputs[1].data, b)
    assert request.inputs[2].data.tolist() == [b"z"]


@pytest.mark.parametrize("as_memoryview", [False, True], ids=["bytes", "memoryview"])
def test_binary_inputs_are_views_of_the_body(as_memoryview: bool) -> None:
    a = np.arange(64, dtype=np.float32).reshape(1, 64)
    b = np.arange(10, dtype=np.int64)
    raw, header_length = build_body([("a", "FP32", a, True), ("b", "INT64", b, True)])
    body = memoryview(bytearray(raw)) if as_memoryview else raw
    request = decode(body, header_length)
    body_bytes = np.frombuffer(body, dtype=np.uint8)
    for decoded in request.inputs:
        assert np.shares_memory(decoded.data, body_bytes)
        assert owner_of(decoded.data) is (body.obj if as_memoryview else body)


def test_request_fields_are_read() -> None:
    body, header_length = build_body(
        [("x", "FP32", SAMPLES["FP32"], True)],
        id="request-7",
        parameters={"binary_data_output": True, "priority": 2, "timeout": 5000, "custom": "yes"},
        outputs=[
            {"name": "probs", "parameters": {"binary_data": False, "classification": 3}},
            {"name": "logits", "parameters": {"extra": 1.5}},
        ],
    )
    request = decode(body, header_length)
    assert request.id == "request-7"
    assert request.binary_data_output is True
    assert request.parameters == {"priority": 2, "timeout": 5000, "custom": "yes"}
    probs, logits = request.outputs
    assert (probs.name, probs.binary_data, probs.classification, probs.parameters) == ("probs", False, 3, {})
    assert (logits.name, logits.binary_data, logits.classification, logits.parameters) == (
        "logits",
        None,
        0,
        {"extra": 1.5},
    )
    assert output_is_binary(request, "probs") is False
    assert output_is_binary(request, "logits") is True
    assert output_is_binary(request, "unlisted") is True


def test_input_parameters_pass_through_without_binary_data_size() -> None:
    body = _json(
        {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "parameters": {"binary_data_size": 1, "tag": "a"}}]}
    )
    (decoded,) = decode(body + b"\x05", len(body)).inputs
    assert decoded.parameters == {"tag": "a"} and decoded.data.tolist() == [5]


def test_shared_memory_inputs_and_outputs_are_read_beside_binary_ones() -> None:
    """An input in shared memory has no data in the body; the binary inputs after it keep their bytes."""
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], dtype=np.int16)
    document = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
            {"name": "s", "datatype": "INT64", "shape": [1, 2], "parameters": {
                "shared_memory_region": "in", "shared_memory_offset": 64, "shared_memory_byte_size": 16, "tag": 1}},
            {"name": "b", "datatype": "INT16", "shape": [2], "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False, "shared_memory_region": "out",
                                                  "shared_memory_byte_size": 40}}],
    }
    header = _json(document)
    request = decode(header + a.tobytes() + b.tobytes(), len(header))
    first, shared, last = request.inputs
    np.testing.assert_array_equal(first.data, a)
    np.testing.assert_array_equal(last.data, b)
    assert shared.data is None and shared.parameters == {"tag": 1}
    assert shared.shared_memory == SharedMemoryRef("in", 64, 16)
    (output,) = request.outputs
    assert output.shared_memory == SharedMemoryRef("out", 0, 40) and output.parameters == {}


def test_outputs_written_to_shared_memory_carry_metadata_only() -> None:
    """As Triton answers: name, datatype and shape, no data and no parameters (Triton's C++ client
    reads any output parameters as holding binary_data_size)."""
    written = InferOutput("y", "FP32", (1, 2), np.ones((1, 2), np.float32), binary_data=True,
                          shared_memory=SharedMemoryRef("out", 0, 8))
    plain = InferOutput("z", "INT8", (1,), np.array([3], np.int8), binary_data=True)
    buffers, header_length = encode_infer_response(response(written, plain))
    header, rest = parse_body(buffers, header_length)
    assert header["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [1, 2]}
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 1} and rest == b"\x03"


# --- decoding: the raw binary form ------------------------------------------------------


def test_raw_request_of_a_batching_model_is_batch_one() -> None:
    array = np.arange(64, dtype=np.float32)
    specs = [InputSpec("x", "FP32", (64,))]
    request = decode(array.tobytes(), 0, input_specs=specs, max_batch_size=8)
    (decoded,) = request.inputs
    assert decoded.shape == (1, 64) and request.binary_data_output is True
    np.testing.assert_array_equal(decoded.data[0], array)


def test_raw_request_deduces_one_variable_dimension() -> None:
    body = np.arange(12, dtype=np.int32).tobytes()
    request = decode(body, 0, input_specs=[InputSpec("x", "INT32", (-1, 3))], max_batch_size=0)
    assert request.inputs[0].shape == (4, 3)
    np.testing.assert_array_equal(request.inputs[0].data.ravel(), np.arange(12))
    assert owner_of(request.inputs[0].data) is body
    request = decode(body, 0, input_specs=[InputSpec("x", "INT32", (2, -1))], max_batch_size=4)
    assert request.inputs[0].shape == (1, 2, 6)


def test_raw_bytes_request_is_one_element() -> None:
    request = decode(b"\xff raw text", 0, input_specs=[InputSpec("t", "BYTES", (1,))], max_batch_size=4)
    assert request.inputs[0].shape == (1, 1)
    assert request.inputs[0].data.tolist() == [[b"\xff raw text"]]


@pytest.mark.parametrize(
    ("specs", "body", "message"),
    [
        (None, b"1234", "has no JSON header naming its input, and the model's inputs are not known here"),
        (
            [InputSpec("a", "FP32", (1,)), InputSpec("b", "FP32", (1,))],
            b"12345678",
            "so the model must have exactly one input to receive them; model 'm' has 2",
        ),
        ([InputSpec("x", "FP32", (-1, -1))], b"1234", "has more than one variable dimension"),
        ([InputSpec("x", "FP32", (-1, 3))], b"x" * 16, "16 bytes do not fill input 'x' of shape [-1, 3]"),
        (
            [InputSpec("x", "FP32", (2,))],
            b"x" * 4,
            "shape [2] needs 8 bytes of FP32 data (2 elements of 4 bytes), got 4",
        ),
        ([InputSpec("t", "BYTES", (2,))], b"ab", "BYTES input 't' must hold exactly one element to be sent raw"),
    ],
)
def test_raw_request_errors(specs: list[InputSpec] | None, body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode(body, 0, input_specs=specs)


# --- decoding: every malformation says what and where -----------------------------------


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _one_input(**entry: object) -> bytes:
    return _json({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], **entry}]})


MALFORMED_JSON_CASES = [
    # The parser's own wording of the problem varies between orjson versions: only its position is checked.
    (b'{"inputs": [1, 2}', "the request's JSON is malformed: "),
    (b"", "the request's JSON is malformed"),
    (b"[]", "the request's JSON must be an object, got an empty list"),
    (_json({"id": "a"}), "the request has no 'inputs'"),
    (_json({"inputs": {"name": "x"}}), "'inputs' must be a list, got an object"),
    (_json({"inputs": ["x"]}), "inputs[0] must be an object, got 'x'"),
    (_json({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}), "inputs[0] has no 'name'"),
    (_json({"inputs": [{"name": 3, "datatype": "FP32", "shape": [1], "data": [1]}]}), "inputs[0] has 'name' 3"),
    (_json({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}), "input 'x' has no 'datatype'"),
    (_one_input(datatype="FP8", data=[1]), "input 'x': unknown datatype 'FP8'; expected one of BOOL, UINT8"),
    (_one_input(datatype=[2, 1], data=[1]), "input 'x': unknown datatype a list; expected one of BOOL, UINT8"),
    # The json module (read after orjson refuses the escape) would let these through to the response.
    (b'{"id": "\\ud800", "inputs": []}', "the request's JSON has a string with an unpaired UTF-16 surrogate"),
    (b'{"inputs": [], "outputs": [{"name": "\\udc00"}]}', "has a string with an unpaired UTF-16 surrogate"),
    (_one_input(datatype={"a": 1}, data=[1]), "input 'x': unknown datatype an object; expected one of BOOL"),
    (_json({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}), "input 'x' has no 'shape'"),
    (_one_input(shape=[2, "3"], data=[1]), "input 'x': 'shape' must be a list of integers, got a list"),
    (_one_input(shape=[2, 1.5], data=[1]), "input 'x': 'shape' must be a list of integers"),
    (_one_input(shape=[2, -1], data=[1]), "input 'x': shape [2, -1] has a negative dimension; each must be >= 0"),
    # Empty (a zero dimension), yet beyond what numpy can shape: it raised ValueError, a 500.
    (_one_input(shape=[2**40, 2**40, 0], data=[]), "input 'x': shape [1099511627776, 1099511627776, 0] has more"),
    (_one_input(datatype="BYTES", shape=[2**62, 4, 0], data=[]), "has more elements than a tensor can hold"),
    (_one_input(data=[1, 2, 3, 4, 5]), "input 'x': shape [2, 3] needs 6 FP32 elements, got 5"),
    (_one_input(data=[[1, 2, 3], [4, 5]]), "input 'x': 'data' is not a list of FP32 values nested to a regular shape"),
    (_one_input(data=["1", "2", "3", "4", "5", "6"]), "input 'x': FP32 data must be numbers, got strings"),
    (_one_input(data=[1, None, 3, 4, 5, 6]), "input 'x': FP32 data must be numbers, got nulls, objects"),
    (_one_input(data=[[1, 2, 3], [4, 5, {"a": 1}]]), "input 'x': FP32 data must be numbers"),
    (
        _one_input(datatype="INT32", data=[1, 2, 3, 4, 5, 6.5]),
        "input 'x': INT32 data must be integers, got non-integer numbers",
    ),
    (_one_input(datatype="BOOL", data=[1, 0, 1, 0, 1, 0]), "input 'x': BOOL data must be true or false, got integers"),
    (
        _one_input(datatype="UINT8", data=[0, 1, 2, 3, 4, 256]),
        "input 'x': value 256 is out of the UINT8 range [0, 255]",
    ),
    (_one_input(datatype="UINT32", data=[0, 1, 2, 3, 4, -1]), "input 'x': value -1 is out of the UINT32 range"),
    (_one_input(datatype="INT64", data=[0, 1, 2, 3, 4, 2**63]), "value 9223372036854775808 is out of the INT64 range"),
    (_one_input(datatype="BF16", data=[1, 2, 3, 4, 5, 6]), "input 'x': BF16 data cannot travel as JSON numbers"),
    (
        _one_input(datatype="BYTES", shape=[2], data=["a", 1]),
        "input 'x': BYTES data must be strings (UTF-8 text), got int",
    ),
    (_one_input(datatype="BYTES", shape=[3], data=["a", "b"]), "input 'x': shape [3] needs 3 BYTES elements, got 2"),
    (_one_input(), "input 'x' has neither 'data' nor parameters.binary_data_size"),
    (
        _one_input(data=[1] * 6, parameters={"binary_data_size": 24}),
        "input 'x' has both 'data' and parameters.binary_data_size",
    ),
    (
        _one_input(parameters={"binary_data_size": "24"}),
        "input 'x': binary_data_size must be an integer >= 0, got '24'",
    ),
    (_one_input(parameters={"binary_data_size": -4}), "binary_data_size must be an integer >= 0, got -4"),
    (
        _one_input(parameters={"shared_memory_region": "r"}),
        "input 'x': 'shared_memory_region' needs 'shared_memory_byte_size' beside it",
    ),
    (
        _one_input(parameters={"shared_memory_byte_size": 24}),
        "input 'x': parameter 'shared_memory_byte_size' needs 'shared_memory_region' beside it",
    ),
    (
        _one_input(parameters={"shared_memory_region": "", "shared_memory_byte_size": 24}),
        "input 'x': 'shared_memory_region' must be a region's name (a non-empty string), got ''",
    ),
    (
        _one_input(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 24,
                               "shared_memory_offset": -8}),
        "input 'x': 'shared_memory_offset' must be an integer >= 0",
    ),
    (
        _one_input(parameters={"shared_memory_region": "r", "shared_memory_byte_size": -24}),
        "input 'x': 'shared_memory_byte_size' must be an integer >= 0, got -24",
    ),
    (
        _one_input(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 20}),
        "input 'x': shared_memory_byte_size is 20 but shape [2, 3] needs 24 bytes of FP32 data",
    ),
    (
        _one_input(data=[1] * 6, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 24}),
        "input 'x' has both shared memory parameters and 'data'; give one",
    ),
    (_one_input(parameters=[1]), "input 'x' 'parameters' must be an object, got a list"),
    (
        _one_input(data=[1] * 6, parameters={"k": [1]}),
        "input 'x' 'parameters': 'k' must be a string, number or boolean",
    ),
    (
        _json({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}] * 2}),
        "input 'x' appears more than once in 'inputs'",
    ),
    (_json({"id": 7, "inputs": []}), "'id' must be a string, got 7"),
    (_json({"parameters": "fast", "inputs": []}), "request 'parameters' must be an object, got 'fast'"),
    (
        _json({"parameters": {"binary_data_output": 1}, "inputs": []}),
        "'binary_data_output' must be true or false, got 1",
    ),
    (
        _json({"parameters": {"priority": -1}, "inputs": []}),
        "request parameter 'priority' must be an integer >= 0, got -1",
    ),
    (
        _json({"parameters": {"timeout": True}, "inputs": []}),
        "request parameter 'timeout' must be an integer >= 0, got true",
    ),
    (
        _json({"parameters": {"x": [1]}, "inputs": []}),
        "request 'parameters': 'x' must be a string, number or boolean, got a list",
    ),
    (_json({"outputs": {}, "inputs": []}), "'outputs' must be a list, got an object"),
    (_json({"outputs": [{}], "inputs": []}), "outputs[0] has no 'name'"),
    (
        _json({"outputs": [{"name": "y"}, {"name": "y"}], "inputs": []}),
        "output 'y' appears more than once in 'outputs'",
    ),
    (
        _json({"outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}], "inputs": []}),
        "output 'y': parameter 'binary_data' must be true or false, got 'yes'",
    ),
    (
        _json({"outputs": [{"name": "y", "parameters": {"classification": -2}}], "inputs": []}),
        "output 'y': parameter 'classification' must be an integer >= 0 (the number of top classes), got -2",
    ),
    (
        _json({"outputs": [{"name": "y", "parameters": {"shared_memory_region": 7, "shared_memory_byte_size": 4}}],
               "inputs": []}),
        "output 'y': 'shared_memory_region' must be a region's name (a non-empty string), got 7",
    ),
    (
        _json({"outputs": [{"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 40,
                                                        "classification": 2}}], "inputs": []}),
        "output 'y': a classification output cannot be written to shared memory",
    ),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED_JSON_CASES)
def test_malformed_json_requests_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode(body)


def test_null_stands_for_not_given() -> None:
    # MLServer's clients write unset fields as null (request.dict() of its pydantic types).
    document = {
        "id": None,
        "parameters": {"content_type": "np", "headers": None},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2],
                    "parameters": {"content_type": "np", "headers": None}}],
        "outputs": [{"name": "y", "parameters": {"content_type": "np", "headers": None, "binary_data": None}},
                    {"name": "z", "parameters": None}],
    }
    request = decode(_json(document))
    assert request.id == "" and request.parameters == {"content_type": "np"}
    assert request.inputs[0].parameters == {"content_type": "np"}
    assert [(o.name, o.binary_data, o.parameters) for o in request.outputs] == [
        ("y", None, {"content_type": "np"}), ("z", None, {})
    ]


def _binary_request(size_claimed: int, payload: bytes, datatype: str = "FP32", shape: list[int] | None = None):
    header = _json(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape or [2, 3],
                    "parameters": {"binary_data_size": size_claimed},
                }
            ]
        }
    )
    return header + payload, len(header)


def test_binary_size_must_match_the_shape() -> None:
    body, header_length = _binary_request(20, b"x" * 20)
    with pytest.raises(
        InvalidInput, match=re.escape("input 'x': binary_data_size is 20 but shape [2, 3] needs 24 bytes of FP32 data")
    ):
        decode(body, header_length)


def test_body_shorter_than_the_binary_sizes_claim() -> None:
    body, header_length = _binary_request(128, b"x" * 100, shape=[32])
    message = "the body has 100 bytes after the JSON header but the inputs' binary_data_size add up to 128"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode(body, header_length)


def test_extra_trailing_bytes_are_refused() -> None:
    body, header_length = _binary_request(24, b"x" * 30)
    with pytest.raises(InvalidInput, match=re.escape("add up to 24: 6 extra trailing bytes")):
        decode(body, header_length)
    json_only = _one_input(data=[1] * 6)
    with pytest.raises(InvalidInput, match=re.escape("the body has 3 bytes after the JSON header")):
        decode(json_only + b"abc", len(json_only))


def test_header_length_beyond_the_body() -> None:
    with pytest.raises(
        InvalidInput, match=re.escape("Inference-Header-Content-Length is 500 but the body has only 12 bytes")
    ):
        decode(b"{}" + b"x" * 10, 500)
    with pytest.raises(InvalidInput, match=re.escape("Inference-Header-Content-Length is -1; it must be >= 0")):
        decode(b"{}", -1)


def test_binary_data_without_the_header_length() -> None:
    body, header_length = _binary_request(24, b"x" * 24)
    message = f"the body goes on after its JSON ends at byte {header_length}: a body with binary data needs the"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode(body, None)
    json_only = body[:header_length]
    with pytest.raises(InvalidInput, match="no Inference-Header-Content-Length header to say where the JSON ends"):
        decode(json_only, None)


def test_header_length_cutting_the_json_short() -> None:
    body, header_length = _binary_request(24, b"x" * 24)
    with pytest.raises(InvalidInput, match="the request's JSON is malformed"):
        decode(body, header_length - 1)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x05\x00\x00\x00abc", "BYTES element 0 claims 5 bytes but only 3 remain in its data"),
        (b"\x01\x00\x00\x00a\x01\x00", "BYTES data ends inside element 1's 4-byte length prefix"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00bZZ", "2 bytes left over after the 2 BYTES elements the shape needs"),
    ],
)
def test_malformed_binary_bytes(payload: bytes, message: str) -> None:
    body, header_length = _binary_request(len(payload), payload, datatype="BYTES", shape=[2])
    with pytest.raises(InvalidInput, match=re.escape(f"input 'x': {message}")):
        decode(body, header_length)


# --- encoding responses ------------------------------------------------------------------


def parse_body(buffers: list[bytes | memoryview], header_length: int | None) -> tuple[dict, bytes]:
    body = b"".join(bytes(buffer) for buffer in buffers)
    if header_length is None:
        return orjson.loads(body), b""
    return orjson.loads(body[:header_length]), body[header_length:]


def response(*outputs: InferOutput, **fields: object) -> InferResponse:
    return InferResponse(
        model_name="m",
        model_version=str(fields.get("version", "")),
        id=str(fields.get("id", "")),
        outputs=list(outputs),
    )


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_json_outputs_round_trip_for_every_numeric_datatype(datatype: str) -> None:
    array = SAMPLES[datatype]
    buffers, header_length = encode_infer_response(response(InferOutput("y", datatype, array.shape, array)))
    assert header_length is None and len(buffers) == 1
    header, _ = parse_body(buffers, header_length)
    (output,) = header["outputs"]
    assert output == {"name": "y", "datatype": datatype, "shape": list(array.shape), "data": output["data"]}
    np.testing.assert_array_equal(np.array(output["data"], dtype=array.dtype).reshape(array.shape), array)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_binary_outputs_are_zero_copy_views(datatype: str) -> None:
    array = SAMPLES[datatype]
    buffers, header_length = encode_infer_response(
        response(InferOutput("y", datatype, array.shape, array, binary_data=True))
    )
    header, rest = parse_body(buffers, header_length)
    assert header_length == len(buffers[0])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": array.nbytes}
    assert "data" not in header["outputs"][0]
    assert isinstance(buffers[1], memoryview) and np.shares_memory(np.frombuffer(buffers[1], np.uint8), array)
    np.testing.assert_array_equal(np.frombuffer(rest, dtype=array.dtype).reshape(array.shape), array)


def test_non_contiguous_binary_outputs_are_copied_once() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    buffers, header_length = encode_infer_response(response(InferOutput("y", "FP32", (3, 2), array, binary_data=True)))
    _, rest = parse_body(buffers, header_length)
    np.testing.assert_array_equal(np.frombuffer(rest, np.float32).reshape(3, 2), array)


def test_response_header_fields_and_output_order() -> None:
    first = np.array([1, 2], dtype=np.int32)
    second = np.array([[0.5]], dtype=np.float64)
    third = np.array([7], dtype=np.uint8)
    outputs = [
        InferOutput("a", "INT32", (2,), first, binary_data=True, parameters={"note": "x"}),
        InferOutput("b", "FP64", (1, 1), second),
        InferOutput("c", "UINT8", (1,), third, binary_data=True),
    ]
    reply = InferResponse("m", "3", "req-1", outputs, parameters={"sequence": "s"})
    buffers, header_length = encode_infer_response(reply)
    header, rest = parse_body(buffers, header_length)
    assert header["model_name"] == "m" and header["model_version"] == "3" and header["id"] == "req-1"
    assert header["parameters"] == {"sequence": "s"}
    assert [output["name"] for output in header["outputs"]] == ["a", "b", "c"]
    assert header["outputs"][0]["parameters"] == {"note": "x", "binary_data_size": 8}
    assert header["outputs"][1]["data"] == [0.5]
    assert rest == first.tobytes() + third.tobytes()


def test_empty_version_and_id_are_left_out() -> None:
    buffers, _ = encode_infer_response(response(InferOutput("y", "INT8", (1,), np.array([1], np.int8))))
    header, _ = parse_body(buffers, None)
    assert set(header) == {"model_name", "outputs"}


def test_bytes_outputs_as_json_strings_and_as_binary() -> None:
    text = np.array([b"caf\xc3\xa9", b""], dtype=object)
    buffers, header_length = encode_infer_response(response(InferOutput("t", "BYTES", (2,), text)))
    header, _ = parse_body(buffers, header_length)
    assert header_length is None and header["outputs"][0]["data"] == ["café", ""]
    buffers, header_length = encode_infer_response(response(InferOutput("t", "BYTES", (2,), text, binary_data=True)))
    header, rest = parse_body(buffers, header_length)
    assert rest == serialize_bytes_reference(text)
    assert header["outputs"][0]["parameters"] == {"binary_data_size": len(rest)}


def test_bytes_outputs_that_are_not_utf8_go_binary_even_when_json_was_asked() -> None:
    buffers, header_length = encode_infer_response(response(InferOutput("t", "BYTES", (2,), BINARY_ONLY_BYTES)))
    header, rest = parse_body(buffers, header_length)
    assert header_length is not None and "data" not in header["outputs"][0]
    assert rest == serialize_bytes_reference(BINARY_ONLY_BYTES)


def test_str_elements_of_bytes_outputs_are_utf8() -> None:
    words = np.array(["é", "b"], dtype=object)
    buffers, header_length = encode_infer_response(response(InferOutput("t", "BYTES", (2,), words, binary_data=True)))
    _, rest = parse_body(buffers, header_length)
    assert rest == b"\x02\x00\x00\x00\xc3\xa9\x01\x00\x00\x00b"


def test_bf16_outputs_always_go_binary() -> None:
    bits = np.array([0x3F80, 0x4000], dtype=np.uint16)
    buffers, header_length = encode_infer_response(response(InferOutput("h", "BF16", (2,), bits)))
    header, rest = parse_body(buffers, header_length)
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 4} and rest == bits.tobytes()


def test_json_floats_are_written_shortest_and_exact() -> None:
    array = np.array([0.1, 1 / 3, 3.4028235e38], dtype=np.float32)
    buffers, _ = encode_infer_response(response(InferOutput("y", "FP32", (3,), array)))
    # Shortest float32 round-trip text ("0.33333334", not float64's 0.3333333432674408);
    # the exponent's spelling (e38 or e+38) differs between JSON library versions.
    data = re.search(rb'"data":\[([^\]]*)\]', buffers[0]).group(1).split(b",")
    assert data[:2] == [b"0.1", b"0.33333334"]
    assert data[2].replace(b"+", b"") == b"3.4028235e38"
    assert np.array_equal(np.array([float(v) for v in data], dtype=np.float32), array)


def test_encoding_refuses_data_that_contradicts_the_output() -> None:
    wrong_dtype = InferOutput("y", "FP32", (2,), np.array([1.0, 2.0], dtype=np.float64))
    with pytest.raises(
        InternalError, match=re.escape("output 'y': data of numpy dtype 'float64' cannot be sent as FP32")
    ):
        encode_infer_response(response(wrong_dtype))
    wrong_shape = InferOutput("y", "FP32", (3,), np.zeros(2, dtype=np.float32))
    with pytest.raises(InternalError, match=re.escape("output 'y': shape [3] does not match data of shape (2,)")):
        encode_infer_response(response(wrong_shape))
    not_bytes = InferOutput("t", "BYTES", (1,), np.array([5], dtype=object), binary_data=True)
    with pytest.raises(ModelExecutionError, match="BYTES element 0 is a int; expected bytes or str"):
        encode_infer_response(response(not_bytes))


def test_error_and_plain_json_bodies() -> None:
    assert orjson.loads(encode_error('bad "input"\n')) == {"error": 'bad "input"\n'}
    assert orjson.loads(encode_json({"shape": np.array([1, 2]), "n": np.int64(3)})) == {"shape": [1, 2], "n": 3}
    with pytest.raises(InternalError, match="cannot be written as JSON"):
        encode_json({"x": object()})
