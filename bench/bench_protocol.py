"""The REST infer codec's cost per request, against baselines measured in the same run.

    PYTHONPATH=python python -m pytest bench/bench_protocol.py --benchmark-enable

One round is what the server does around a model call: decode a request body and
encode the response body. The request is the example MLP's at batch 1 (FP32 [1, 64]
in, FP32 [1, 10] out), as tritonclient writes it:

- JSON body: data as JSON numbers both ways. The baseline does the same work with the
  json module (json.loads, np.asarray, json.dumps of tolist()), which is how the codec
  would look without orjson.
- binary body: a JSON header plus raw tensor bytes both ways (tritonclient's default).
  Baseline: the json module for the header, np.frombuffer for the data.
- binary vs JSON: our codec on the binary body against our codec on the JSON body.

Medians and ratios are printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import json

import numpy as np

from conveyor.protocol import InferOutput, InferResponse, decode_infer_request, encode_infer_response

rng = np.random.default_rng(0)
FEATURES = rng.standard_normal((1, 64)).astype(np.float32)
PROBABILITIES = rng.random((1, 10)).astype(np.float32)


def _json_body() -> bytes:
    tensor = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": FEATURES.ravel().tolist()}
    outputs = [{"name": "probs", "parameters": {"binary_data": False}}]
    return json.dumps({"inputs": [tensor], "outputs": outputs}).encode()


def _binary_body() -> tuple[bytes, int]:
    tensor = {"name": "x", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": FEATURES.nbytes}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + FEATURES.tobytes(), len(header)


JSON_BODY = _json_body()
BINARY_BODY, BINARY_HEADER_LENGTH = _binary_body()


def codec_round(body: bytes, header_length: int | None) -> list:
    request = decode_infer_request(body, header_length, model_name="mlp", model_version="")
    binary = request.binary_data_output or bool(request.outputs and request.outputs[0].binary_data)
    output = InferOutput("probs", "FP32", PROBABILITIES.shape, PROBABILITIES, binary_data=binary)
    buffers, _ = encode_infer_response(InferResponse("mlp", "1", request.id, [output]))
    return buffers


def json_module_round_json_body(body: bytes) -> bytes:
    document = json.loads(body)
    (tensor,) = document["inputs"]
    np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    output = {"name": "probs", "datatype": "FP32", "shape": [1, 10], "data": PROBABILITIES.ravel().tolist()}
    reply = {"model_name": "mlp", "model_version": "1", "outputs": [output]}
    return json.dumps(reply, separators=(",", ":")).encode()


def json_module_round_binary_body(body: bytes, header_length: int) -> list:
    document = json.loads(body[:header_length])
    (tensor,) = document["inputs"]
    np.frombuffer(body, np.float32, offset=header_length).reshape(tensor["shape"])
    output = {"name": "probs", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}
    reply = {"model_name": "mlp", "model_version": "1", "outputs": [output]}
    return [json.dumps(reply, separators=(",", ":")).encode(), memoryview(PROBABILITIES).cast("B")]


def test_json_body_codec(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: JSON body"
    benchmark(codec_round, JSON_BODY, None)
    ratio_report.candidate("JSON body: decode + encode", benchmark, label="conveyor (orjson)")


def test_json_body_json_module(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: JSON body"
    benchmark(json_module_round_json_body, JSON_BODY)
    ratio_report.baseline("JSON body: decode + encode", benchmark, label="json module")


def test_binary_body_codec(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: binary body"
    benchmark(codec_round, BINARY_BODY, BINARY_HEADER_LENGTH)
    ratio_report.candidate("binary body: decode + encode", benchmark, label="conveyor (orjson)")


def test_binary_body_json_module(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: binary body"
    benchmark(json_module_round_binary_body, BINARY_BODY, BINARY_HEADER_LENGTH)
    ratio_report.baseline("binary body: decode + encode", benchmark, label="json module")


def test_binary_against_json_body(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: binary vs JSON"
    benchmark(codec_round, BINARY_BODY, BINARY_HEADER_LENGTH)
    ratio_report.candidate("binary vs JSON body (conveyor)", benchmark, label="binary body")


def test_json_body_for_the_comparison(benchmark, ratio_report) -> None:
    benchmark.group = "mlp batch 1: binary vs JSON"
    benchmark(codec_round, JSON_BODY, None)
    ratio_report.baseline("binary vs JSON body (conveyor)", benchmark, label="JSON body")
