"""Overload on a real server: a full queue refuses the excess at once, over HTTP and gRPC.

A model held at a gate (a threading.Event: it runs nothing until the test opens it) with a
queue of QUEUE_SIZE fills: one request runs, QUEUE_SIZE wait. Every request beyond must be
refused with 503 / UNAVAILABLE and a message naming the queue bound and how to raise it,
*while the gate is still closed* (a refusal that waited for room would never come). Then
the gate opens: every accepted request is answered with its own answer, the connection
that was refused goes on, and the queue and in-flight gauges return to 0. Counting only:
nothing here measures a latency (bench/overload.py does).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from keepalive_client import Client
from processes import DEADLINE_S, free_port, wait_for
from server_thread import ServerThread
from tritonclient.utils import InferenceServerException

from conveyor.server.serve import ServeOptions

MODEL = "gated"
QUEUE_SIZE = 4
EXCESS = 12  # refused requests per front end
REFUSAL = re.compile(
    rf"\[batcher\] model '{MODEL}': queue full \({QUEUE_SIZE} requests queued, max_queue_size {QUEUE_SIZE}\); "
    r"retry later or raise dynamic_batching.max_queue_size"
)

GATED_CONFIG = {
    "backend": "python",
    "max_batch_size": 1,
    "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
    "dynamic_batching": {"max_queue_size": QUEUE_SIZE},
}


class Gate:
    """y = 2x, once the gate is open; `entered` tells that a batch is running."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        if not self.open.wait(DEADLINE_S):
            raise TimeoutError("the gate was never opened")
        return {"y": inputs["x"] * np.float32(2.0)}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, Gate]]:
    (tmp_path / "models").mkdir()
    options = ServeOptions(
        repository=tmp_path / "models", http_port=0, grpc_port=free_port(), model_control_mode="explicit",
        data_dir=tmp_path / "data",
    )  # fmt: skip
    server = ServerThread(options)
    gate = Gate()
    try:
        assert server.server is not None
        server.server.runtime.add_model(MODEL, GATED_CONFIG, gate)
        yield server, gate
    finally:
        gate.open.set()
        server.stop()


def _gauge(metrics: str, name: str) -> float:
    found = re.search(rf'^{name}\{{model="{MODEL}",version="1"\}} (\S+)$', metrics, re.MULTILINE)
    assert found is not None, f"{name} of model '{MODEL}' is not in the scrape"
    return float(found.group(1))


def _grpc_refusal(client: triton.InferenceServerClient, x: np.ndarray) -> InferenceServerException:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [tensor], client_timeout=DEADLINE_S)
    return refused.value


def test_a_full_queue_refuses_the_excess_at_once_and_serves_what_it_accepted(
    served: tuple[ServerThread, Gate],
) -> None:
    server, gate = served
    assert server.server is not None
    runtime = server.server.runtime
    answers: dict[int, tuple[int, Any]] = {}

    def send(i: int) -> None:
        client = Client(server.port)
        try:
            answers[i] = client.infer(MODEL, [float(i)] * 4)
        finally:
            client.close()

    accepted = [threading.Thread(target=send, args=(i,)) for i in range(1 + QUEUE_SIZE)]
    accepted[0].start()
    assert gate.entered.wait(DEADLINE_S), "the first request never ran"
    for thread in accepted[1:]:
        thread.start()
    wait_for(lambda: runtime.model_stats(MODEL)["queue_depth"] == QUEUE_SIZE, "the queue to fill")

    refused = Client(server.port)
    grpc_client = triton.InferenceServerClient(server.options.host + f":{server.options.grpc_port}")
    try:
        for _ in range(EXCESS):  # answered with the gate still closed: nothing waits for room
            status, body = refused.infer(MODEL, [9.0] * 4)
            assert status == 503 and REFUSAL.search(body["error"]), (status, body)
            error = _grpc_refusal(grpc_client, np.full((1, 4), 9.0, np.float32))
            assert error.status() == "StatusCode.UNAVAILABLE" and REFUSAL.search(error.message()), error
        stats = runtime.model_stats(MODEL)
        assert (stats["rejected"], stats["in_flight"], stats["succeeded"]) == (2 * EXCESS, 1 + QUEUE_SIZE, 0)

        gate.open.set()
        for thread in accepted:
            thread.join(DEADLINE_S)
            assert not thread.is_alive()
        for i in range(1 + QUEUE_SIZE):
            status, body = answers[i]
            assert status == 200 and body["outputs"][0]["data"] == [2.0 * i] * 4, body
        status, body = refused.infer(MODEL, [3.0] * 4)  # the refused connection goes on
        assert status == 200 and body["outputs"][0]["data"] == [6.0] * 4, body

        def drained() -> bool:
            metrics = refused.text("/metrics")
            return _gauge(metrics, "conveyor_requests_in_flight") == 0 and _gauge(metrics, "conveyor_queue_depth") == 0

        wait_for(drained, "the in-flight and queue gauges to return to 0")
        assert runtime.model_stats(MODEL)["succeeded"] == 2 + QUEUE_SIZE
        status, _ = refused.request("GET", "/v2/health/live")
        assert status == 200
    finally:
        refused.close()
        grpc_client.close()
