"""The peer of Conveyor's Ray mode: the example `mlp` as a plain Ray Serve deployment.

What a user who skips Conveyor would write: a `@serve.deployment` class holding an
onnxruntime session (one intra-op thread, as Conveyor's onnx backend runs it) and a
`@serve.batch` method that runs one session call per batch, with the batch size and
wait of the Conveyor config of `mlp` (max_batch_size 64, no added wait; Serve's default
wait is 10 ms) and the same requests in flight per replica as Conveyor's Ray mode gives
it (`max_ongoing_requests` 128: two full batches). It answers the KServe v2 infer route
with JSON tensors and with Triton's binary tensor extension (which the load generator
sends: `Inference-Header-Content-Length`, `binary_data_size`, `binary_data_output`), so
the same client drives it and `conveyor serve`. Nothing else of the protocol (no
metadata, health or errors beyond a 400): it is the simplest honest form, not a server.

    app = build_app("examples/models/mlp/1/model.onnx", num_replicas=2)
    serve.run(app, name="mlp-plain", route_prefix="/v2/models/mlp")
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from ray import serve

__all__ = ["MAX_BATCH_SIZE", "MAX_ONGOING_REQUESTS", "OnnxBatched", "build_app"]

MAX_BATCH_SIZE = 64  # examples/models/mlp/config.toml: max_batch_size
BATCH_WAIT_TIMEOUT_S = 0.0  # max_queue_delay_us = 0: a batch takes what queued while the last ran
MAX_ONGOING_REQUESTS = 128  # conveyor.config_ray.default_max_ongoing_requests for mlp
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
class OnnxBatched:
    """One onnxruntime session; requests batched by Serve (`@serve.batch`)."""

    def __init__(self, model_path: str, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S) -> None:  # fmt: skip
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def run_batch(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        counts = [len(r) for r in rows]
        out = self.session.run([self.output_name], {self.input_name: np.concatenate(rows)})[0]
        return np.split(out, np.cumsum(counts)[:-1])

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        try:
            x, binary_out = _decode(request.headers, await request.body())
        except (ValueError, KeyError, TypeError) as exc:
            return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")
        y = await self.run_batch(x)
        return _encode(self.output_name, y, binary_out)


def _decode(headers: Any, body: bytes) -> tuple[np.ndarray, bool]:
    """The one input tensor of a KServe v2 infer body (JSON, or JSON header + binary), and
    whether binary outputs were asked for."""
    header_length = headers.get("inference-header-content-length")
    document = json.loads(body[: int(header_length)] if header_length else body)
    (tensor,) = document["inputs"]
    dtype = DTYPES[tensor["datatype"]]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        start = int(header_length)
        x = np.frombuffer(body, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=start)
    else:
        x = np.asarray(tensor["data"], dtype=dtype)
    binary_out = bool((document.get("parameters") or {}).get("binary_data_output"))
    return x.reshape(tensor["shape"]), binary_out


def _encode(name: str, y: np.ndarray, binary_out: bool) -> Any:
    from starlette.responses import Response

    output = {"name": name, "datatype": NAMES[y.dtype], "shape": list(y.shape)}
    if not binary_out:
        output["data"] = y.ravel().tolist()
        return Response(json.dumps({"outputs": [output]}), media_type="application/json")
    data = np.ascontiguousarray(y).tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps({"outputs": [output]}).encode()
    return Response(header + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def build_app(model_path: str, *, num_replicas: int = 1, num_cpus: float = 1.0,
              max_batch_size: int = MAX_BATCH_SIZE, batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S) -> Any:  # fmt: skip
    """The bound application (pass it to serve.run)."""
    deployment = OnnxBatched.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    return deployment.bind(model_path, max_batch_size, batch_wait_timeout_s)
