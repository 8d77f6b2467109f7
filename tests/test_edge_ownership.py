"""Ownership at the Python/C++ edge: what a batch, a view or a message holds stays alive.

Each case here once reached freed memory: BYTES elements read after their request's
arrays were dropped (a stock Triton client crashed the server over gRPC), requests
still running when their event loop closed, a failing batch stranding the futures of
the others. They run in the ordinary suite and again under AddressSanitizer
(tests/test_sanitized_bindings.py), where any stale read is reported.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.errors import InternalError, ModelExecutionError
from conveyor.runtime import ModelHandle, Runtime
from conveyor.server.serve import ServeOptions

from processes import free_port
from server_thread import ServerThread

WAIT_S = 30.0  # bound on every wait; a healthy run takes milliseconds

BYTES_CONFIG = """\
backend = "{backend}"
max_batch_size = 8

[[inputs]]
name = "INPUT0"
datatype = "BYTES"
dims = [-1]

[[outputs]]
name = "OUTPUT0"
datatype = "BYTES"
dims = [-1]

[dynamic_batching]
max_queue_delay_us = 500
"""

# Triton's simple_grpc_string_infer_client.py case: the input comes back as the output.
IDENTITY_MODEL = """\
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""

# A transformed answer: new bytes objects made by the model.
REVERSE_MODEL = """\
import numpy as np


class Model:
    def execute(self, inputs):
        text = inputs["INPUT0"]
        out = np.empty(text.shape, dtype=object)
        out.ravel()[:] = [item[::-1] + b"!" for item in text.ravel()]
        return {"OUTPUT0": out}
"""


def _string_identity_onnx() -> bytes:
    from onnx import TensorProto, helper

    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.STRING, ["batch", "n"])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "string_identity", [tensor("INPUT0")],
        [tensor("OUTPUT0")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _write_model(root: Path, name: str, backend: str, files: dict[str, bytes | str]) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.toml").write_text(BYTES_CONFIG.format(backend=backend))
    for file_name, content in files.items():
        target = root / name / "1" / file_name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


@pytest.fixture(scope="module")
def bytes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("bytes") / "models"
    _write_model(root, "bytes_identity", "python", {"model.py": IDENTITY_MODEL})
    _write_model(root, "bytes_reverse", "python", {"model.py": REVERSE_MODEL})
    _write_model(root, "bytes_onnx_identity", "onnx", {"model.onnx": _string_identity_onnx()})
    options = ServeOptions(
        repository=root, http_port=free_port(), grpc_port=free_port(), data_dir=root.parent / "data"
    )
    server = ServerThread(options)
    try:
        yield server
    finally:
        server.stop()


def _texts(request: int, count: int) -> np.ndarray:
    # Fresh bytes objects per request, some empty, some multi-byte UTF-8.
    items = [f"r{request}-e{i}-{'é' * (i % 3)}".encode() if i % 4 else b"" for i in range(count)]
    return np.array([items], dtype=object)


def _expected(model: str, sent: np.ndarray) -> list:
    if model == "bytes_reverse":
        return [[item[::-1] + b"!" for item in row] for row in sent.tolist()]
    return sent.tolist()


BYTES_MODELS = ["bytes_identity", "bytes_reverse", "bytes_onnx_identity"]


@pytest.mark.parametrize("model", BYTES_MODELS)
def test_bytes_over_grpc_with_tritonclient(bytes_server: ServerThread, model: str) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the test extra")
    url = f"127.0.0.1:{bytes_server.options.grpc_port}"

    def one(request: int) -> tuple[np.ndarray, np.ndarray]:
        with grpcclient.InferenceServerClient(url) as client:
            sent = _texts(request, 1 + request % 5)
            tensor = grpcclient.InferInput("INPUT0", list(sent.shape), "BYTES")
            tensor.set_data_from_numpy(sent)
            result = client.infer(model, [tensor], client_timeout=WAIT_S)
            return sent, result.as_numpy("OUTPUT0")

    # Concurrent clients, so batches of several requests form and are taken apart.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(48)))
    for sent, got in answers:
        assert got.tolist() == _expected(model, sent)
    gc.collect()  # drop every request's arrays: a stale element pointer would be read below
    sent, got = one(1000)
    assert got.tolist() == _expected(model, sent)


@pytest.mark.parametrize("model", BYTES_MODELS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_over_http_with_tritonclient(bytes_server: ServerThread, model: str, binary: bool) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
    url = f"127.0.0.1:{bytes_server.port}"

    def one(request: int) -> tuple[np.ndarray, np.ndarray]:
        client = httpclient.InferenceServerClient(url, connection_timeout=WAIT_S, network_timeout=WAIT_S)
        try:
            sent = _texts(request, 1 + request % 5)
            tensor = httpclient.InferInput("INPUT0", list(sent.shape), "BYTES")
            tensor.set_data_from_numpy(sent, binary_data=binary)
            output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
            result = client.infer(model, [tensor], outputs=[output])
            return sent, result.as_numpy("OUTPUT0")
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(32)))
    for sent, got in answers:
        got_list = got.tolist()
        if not binary:  # JSON carries text: tritonclient hands it back as str
            got_list = [[item.encode() if isinstance(item, str) else item for item in row] for row in got_list]
        assert got_list == _expected(model, sent)


# -- the in-process API -----------------------------------------------------------------


def _bytes_config() -> dict[str, Any]:
    return {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "dims": [-1]}],
        "dynamic_batching": {"max_queue_delay_us": 500},
    }


def test_bytes_identity_in_process_outlives_the_callers_arrays() -> None:
    with Runtime() as rt:
        rt.add_model("identity", _bytes_config(), lambda inputs: {"OUTPUT0": inputs["INPUT0"]})

        async def many() -> list[tuple[list, dict]]:
            sent = [_texts(i, 3) for i in range(64)]
            expected = [s.tolist() for s in sent]
            results = await asyncio.gather(*(rt.infer_async("identity", {"INPUT0": s}) for s in sent))
            del sent  # the only other references to the elements
            gc.collect()
            return list(zip(expected, results))

        for expected, result in asyncio.run(many()):
            assert result["OUTPUT0"].tolist() == expected
        # The synchronous path, and a model that writes into its input array.
        sent = _texts(7, 4)
        expected = sent.tolist()
        result = rt.infer("identity", {"INPUT0": sent})
        del sent
        gc.collect()
        assert result["OUTPUT0"].tolist() == expected


def test_a_model_writing_into_its_bytes_input_touches_only_its_own_array() -> None:
    def overwrite(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = inputs["INPUT0"]
        text[:] = b"replaced"  # the batch's array is the model's own: the caller's stays as sent
        return {"OUTPUT0": text}

    with Runtime() as rt:
        rt.add_model("overwrite", _bytes_config(), overwrite)
        sent = _texts(3, 2)
        original = sent.tolist()
        result = rt.infer("overwrite", {"INPUT0": sent})
        assert sent.tolist() == original
        assert result["OUTPUT0"].tolist() == [[b"replaced", b"replaced"]]


# -- requests whose event loop went away -----------------------------------------------------


class Gate:
    """Blocks the model until opened; `entered` is set once a batch is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def model(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.opened.wait(WAIT_S), "the test never opened the gate"
        return {"y": inputs["x"] * 2}


def _gated_config() -> dict[str, Any]:
    return {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
    }


def test_requests_running_when_their_loop_closes_complete_safely() -> None:
    with Runtime() as rt:
        for round_number in range(12):
            gate = Gate()
            rt.add_model("gated", _gated_config(), gate.model)

            async def abandon() -> None:
                # Submitted, then left running: asyncio.run cancels the task and closes
                # the loop while the batch is still inside the model.
                asyncio.ensure_future(rt.infer_async("gated", {"x": np.full((2, 4), round_number, np.float32)}))
                loop = asyncio.get_running_loop()
                assert await loop.run_in_executor(None, gate.entered.wait, WAIT_S), "the batch never started"

            asyncio.run(abandon())
            # A new loop: its first request sweeps the closed loop's bridge away.
            async def unrelated() -> None:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(rt.infer_async("gated", {"x": np.ones((1, 4), np.float32)}), 0.001)

            asyncio.run(unrelated())
            gc.collect()
            gate.opened.set()  # the abandoned batch now completes into a queue nobody reads
            # The single instance runs batches in order: this one comes after it.
            result = rt.infer("gated", {"x": np.full((1, 4), 3, np.float32)})
            np.testing.assert_array_equal(result["y"], np.full((1, 4), 6, np.float32))
            stats = rt.model_stats("gated")
            assert stats["in_flight"] == 0 and stats["raw"]["undelivered"] == 0


# -- failures under load -------------------------------------------------------------------


def test_a_model_failing_every_few_batches_under_400_concurrent_requests() -> None:
    calls = iter(range(1_000_000))

    def flaky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if next(calls) % 3 == 1:
            raise RuntimeError("every third batch fails")
        return {"y": inputs["x"] * 2}

    config = {**_gated_config(), "dynamic_batching": {"max_queue_delay_us": 300, "max_queue_size": 1000}}
    with Runtime() as rt:
        rt.add_model("flaky", config, flaky)

        async def burst() -> list[Any]:
            requests = [rt.infer_async("flaky", {"x": np.full((1, 4), i, np.float32)}) for i in range(400)]
            return await asyncio.gather(*requests, return_exceptions=True)

        outcomes = asyncio.run(burst())
        succeeded = failed = 0
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ModelExecutionError):
                assert "every third batch fails" in str(outcome)
                failed += 1
            else:
                np.testing.assert_array_equal(outcome["y"], np.full((1, 4), 2 * i, np.float32))
                succeeded += 1
        stats = rt.model_stats("flaky")
        assert succeeded + failed == 400 and failed > 0 and succeeded > 0
        assert (stats["succeeded"], stats["failed"], stats["in_flight"]) == (succeeded, failed, 0)


def test_a_batch_that_fails_to_complete_fails_only_its_own_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    broken_offsets: set[int] = set()
    real_result = ModelHandle.result

    def result(self: ModelHandle, arrays: tuple, offset: int, rows: int) -> dict[str, np.ndarray]:
        if float(arrays[0][offset, 0]) == 2 * 99:  # the request marked 99 breaks its batch
            broken_offsets.add(offset)
            raise RuntimeError("cannot slice this batch")
        return real_result(self, arrays, offset, rows)

    monkeypatch.setattr(ModelHandle, "result", result)
    with Runtime() as rt:
        rt.add_model("gated", {**_gated_config(), "dynamic_batching": {"max_queue_delay_us": 0}}, gate.model)
        # Answers shaped in Python (a version with Python steps after the batch, or whose
        # monitor sees each request): the core hands the batch to on_ready.
        rt.model("gated").settled_in_core = False

        async def run() -> list[Any]:
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(rt.infer_async("gated", {"x": np.full((1, 4), 1, np.float32)}))
            assert await loop.run_in_executor(None, gate.entered.wait, WAIT_S)
            # Queued behind the running batch: they form the next batch together.
            rest = [
                asyncio.ensure_future(rt.infer_async("gated", {"x": np.full((1, 4), value, np.float32)}))
                for value in (5, 99, 7)
            ]
            await asyncio.sleep(0)  # let the tasks submit
            gate.opened.set()
            return await asyncio.gather(first, *rest, return_exceptions=True)

        first, five, broken, seven = asyncio.run(run())
    np.testing.assert_array_equal(first["y"], np.full((1, 4), 2, np.float32))
    assert broken_offsets, "the marked request never reached the completion"
    # The broken request's batch fails whole; every future of it is answered.
    for outcome in (five, broken, seven):
        assert isinstance(outcome, InternalError) or isinstance(outcome, dict)
    assert isinstance(broken, InternalError) and "cannot slice this batch" in str(broken)
