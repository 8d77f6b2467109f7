"""Compatibility with tritonclient: its request bodies decode, our response bodies parse."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.protocol import InferOutput, InferResponse, decode_infer_request, encode_infer_response

httpclient = pytest.importorskip("tritonclient.http")
ml_dtypes = pytest.importorskip("ml_dtypes")

Client = httpclient.InferenceServerClient

ARRAYS: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 7, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 7, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 7, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 7, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.1, -2.5, 65504.0]], dtype=np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.1, -2.5, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"alpha", b"", "\u20ac".encode()]], dtype=object),
    "BF16": np.array([[1.0, -2.0, 0.5]], dtype=ml_dtypes.bfloat16),
}
JSON_DATATYPES = [datatype for datatype in ARRAYS if datatype != "BF16"]  # tritonclient refuses BF16 as JSON


def client_request(datatype: str, *, binary: bool, **options: object) -> tuple[bytes, int | None]:
    array = ARRAYS[datatype]
    tensor = httpclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return Client.generate_request_body([tensor], **options)


def as_comparable(array: np.ndarray, datatype: str) -> np.ndarray:
    return array.view(np.uint16) if datatype == "BF16" else array


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_binary_requests_from_tritonclient_decode(datatype: str) -> None:
    body, header_length = client_request(datatype, binary=True)
    request = decode_infer_request(body, header_length, model_name="m", model_version="1")
    (decoded,) = request.inputs
    expected = ARRAYS[datatype]
    assert decoded.datatype == datatype and decoded.shape == expected.shape
    assert decoded.data.tolist() == as_comparable(expected, datatype).tolist()
    if datatype != "BYTES":
        assert np.shares_memory(decoded.data, np.frombuffer(body, np.uint8))


@pytest.mark.parametrize("datatype", JSON_DATATYPES)
def test_json_requests_from_tritonclient_decode(datatype: str) -> None:
    body, header_length = client_request(datatype, binary=False)
    assert header_length is None
    (decoded,) = decode_infer_request(body, header_length, model_name="m", model_version="").inputs
    assert decoded.data.dtype == (object if datatype == "BYTES" else ARRAYS[datatype].dtype)
    assert decoded.data.tolist() == ARRAYS[datatype].tolist()


def test_tritonclient_request_options_arrive() -> None:
    outputs = [
        httpclient.InferRequestedOutput("probs", binary_data=False, class_count=3),
        httpclient.InferRequestedOutput("logits"),
    ]
    body, header_length = client_request(
        "FP32", binary=True, outputs=outputs, request_id="r1", priority=2, timeout=1500, parameters={"tag": "a"}
    )
    request = decode_infer_request(body, header_length, model_name="m", model_version="")
    assert request.id == "r1" and request.parameters == {"priority": 2, "timeout": 1500, "tag": "a"}
    probs, logits = request.outputs
    assert (probs.binary_data, probs.classification) == (False, 3)
    assert (logits.binary_data, logits.classification) == (True, 0)


def test_tritonclient_without_outputs_asks_for_binary_outputs() -> None:
    body, header_length = client_request("INT32", binary=False)
    request = decode_infer_request(body, header_length, model_name="m", model_version="")
    assert request.outputs == [] and request.binary_data_output is True


def parse_with_tritonclient(reply: InferResponse):
    buffers, header_length = encode_infer_response(reply)
    return Client.parse_response_body(b"".join(buffers), header_length=header_length)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_tritonclient_parses_our_responses(datatype: str, binary: bool) -> None:
    array = ARRAYS[datatype]
    data = array.view(np.uint16) if datatype == "BF16" else array  # how a decoded BF16 tensor looks
    reply = InferResponse("m", "2", "r9", [InferOutput("y", datatype, array.shape, data, binary_data=binary)])
    result = parse_with_tritonclient(reply)
    parsed = result.as_numpy("y")
    assert parsed.shape == array.shape
    if datatype == "BYTES" and not binary:
        assert parsed.tolist() == [[item.decode() for item in row] for row in array.tolist()]  # JSON BYTES are str
    else:
        assert parsed.tolist() == array.tolist()
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("m", "2", "r9")


def test_tritonclient_parses_mixed_json_and_binary_outputs() -> None:
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = np.array([[b"\xff\xfe"], [b"ok"]], dtype=object)  # not UTF-8: goes binary although JSON was asked
    third = np.array([[1], [2]], dtype=np.int64)
    outputs = [
        InferOutput("a", "FP32", (2, 3), first, binary_data=True),
        InferOutput("b", "BYTES", (2, 1), second),
        InferOutput("c", "INT64", (2, 1), third),
    ]
    result = parse_with_tritonclient(InferResponse("m", "", "", outputs))
    np.testing.assert_array_equal(result.as_numpy("a"), first)
    assert result.as_numpy("b").tolist() == second.tolist()
    np.testing.assert_array_equal(result.as_numpy("c"), third)
