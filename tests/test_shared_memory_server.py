"""System shared memory against unmodified tritonclient (HTTP and gRPC) and perf_analyzer.

The clients create regions with tritonclient.utils.shared_memory, register them, infer with
inputs read from and outputs written to them, and unregister; then every way a request can
get shared memory wrong is tried over the wire: each gets a 4xx (or its gRPC code) with a
message saying what to fix, and the server goes on answering. A server with an API key
guards registration, status and unregistration, and inference that uses a region.
"""

from __future__ import annotations

import base64
import csv
import gc
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

import gate_model
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.server.serve import ServeOptions
from echo_model import write_echo_model
from processes import DEADLINE_S, EXAMPLE_MODELS, LiveServer, free_port, wait_for
from server_thread import ServerThread

API_KEY = "shm-key"
X = np.arange(16, dtype=np.float32).reshape(1, 16)  # an input of `tiny` (y = x + 1)


class Served:
    """A server in this process (its model may be the gate model) with both clients."""

    def __init__(self, root: Path, *, api_key: str | None = None, max_regions: int = 256) -> None:
        for model in ("tiny", "image_classifier"):
            shutil.copytree(EXAMPLE_MODELS / model, root / "repo" / model)
        write_echo_model(root / "repo")
        gate_model.write_gate_model(root / "repo")
        # Under either front end: the native one forwards every request naming a region.
        options = ServeOptions(repository=root / "repo", http_port=0, grpc_port=free_port(), data_dir=root / "data",
                               api_key=api_key, max_shared_memory_regions=max_regions)
        self.thread = ServerThread(options)
        assert self.thread.server is not None
        self.server = self.thread.server
        self.http_url = f"127.0.0.1:{self.thread.port}"
        self.grpc_url = f"127.0.0.1:{self.server.grpc_port}"
        self.http = httpclient.InferenceServerClient(self.http_url)
        self.grpc = grpcclient.InferenceServerClient(self.grpc_url)

    def request(self, method: str, path: str, document: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, the JSON body or None when empty) of one HTTP request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.thread.port, timeout=DEADLINE_S)
        try:
            body = None if document is None else json.dumps(document).encode()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            connection.close()

    def live(self) -> bool:
        return self.request("GET", "/v2/health/live")[0] == 200 and self.grpc.is_server_live()

    def close(self) -> None:
        self.http.close()
        self.grpc.close()
        self.thread.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("shm"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("shm-keyed"), api_key=API_KEY, max_regions=2)
    yield served
    served.close()


@pytest.fixture
def regions(served: Served) -> Iterator[dict[str, Any]]:
    """Regions made by a test (name -> handle): unregistered and destroyed after it; the server
    must hold no region and still answer."""
    made: dict[str, Any] = {}
    yield made
    served.http.unregister_system_shared_memory()
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)
    assert served.http.get_system_shared_memory_status() == []
    assert served.live()


def _region(made: dict[str, Any], name: str, byte_size: int) -> Any:
    """A new POSIX shared-memory object of `byte_size` zero bytes, key '/conveyor_test_<name>_<pid>'."""
    handle = shm.create_shared_memory_region(name, _key(name), byte_size, create_only=True)
    made[name] = handle
    return handle


def _key(name: str) -> str:
    return f"/conveyor_test_{name}_{os.getpid()}"


def _message(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.message()


# -- the clients' own shared-memory workflow -------------------------------------------


def test_http_client_infers_with_input_and_output_in_shared_memory(served: Served, regions: dict) -> None:
    client = served.http
    shm.set_shared_memory_region(_region(regions, "in", 64), [X])
    output_region = _region(regions, "out", 64)
    client.register_system_shared_memory("in", _key("in"), 64)
    client.register_system_shared_memory("out", _key("out"), 64)
    assert client.get_system_shared_memory_status() == [
        {"name": "in", "key": _key("in"), "offset": 0, "byte_size": 64},
        {"name": "out", "key": _key("out"), "offset": 0, "byte_size": 64},
    ]
    assert client.get_system_shared_memory_status("out") == [
        {"name": "out", "key": _key("out"), "offset": 0, "byte_size": 64}
    ]
    x = httpclient.InferInput("x", [1, 16], "FP32").set_shared_memory("in", 64)
    y = httpclient.InferRequestedOutput("y", binary_data=True)
    y.set_shared_memory("out", 64)
    result = client.infer("tiny", [x], outputs=[y])
    # As Triton answers: the output's metadata, no data.
    assert result.get_output("y") == {"name": "y", "datatype": "FP32", "shape": [1, 16]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(output_region, np.float32, [1, 16]), X + 1)
    client.unregister_system_shared_memory("in")
    assert [row["name"] for row in client.get_system_shared_memory_status()] == ["out"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_grpc_client_infers_at_offsets_inside_one_region(served: Served, regions: dict) -> None:
    client = served.grpc
    handle = _region(regions, "io", 4096 + 256)
    shm.set_shared_memory_region(handle, [X * 3], offset=4096 + 8)
    # The window starts past a page boundary: offsets count from the window.
    client.register_system_shared_memory("io", _key("io"), 256, offset=4096)
    status = client.get_system_shared_memory_status()
    assert dict(status.regions)["io"] == pb_region_status("io", _key("io"), 4096, 256)
    x = grpcclient.InferInput("x", [1, 16], "FP32").set_shared_memory("io", 64, offset=8)
    y = grpcclient.InferRequestedOutput("y")
    y.set_shared_memory("io", 64, offset=128)
    result = client.infer("tiny", [x], outputs=[y]).get_response()
    assert [(o.name, o.datatype, list(o.shape), dict(o.parameters)) for o in result.outputs] == [
        ("y", "FP32", [1, 16], {})
    ]
    assert list(result.raw_output_contents) == [b""]  # one (empty) entry per output, as Triton sends
    window = shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=4096 + 128)
    np.testing.assert_array_equal(window, X * 3 + 1)
    client.unregister_system_shared_memory("io")
    assert not client.get_system_shared_memory_status().regions


def pb_region_status(name: str, key: str, offset: int, byte_size: int) -> Any:
    return service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(name=name, key=key, offset=offset,
                                                                      byte_size=byte_size)


def test_shared_memory_beside_inline_tensors_and_bytes(served: Served, regions: dict) -> None:
    """UINT8 in and BYTES out in shared memory, against the answer the same inputs get inline; a
    BYTES input in shared memory over gRPC beside a requested output sent inline."""
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    inline = httpclient.InferInput("image", [1, 32, 32, 3], "UINT8")
    inline.set_data_from_numpy(image)
    expected = served.http.infer("image_classifier", [inline]).as_numpy("classes")
    shm.set_shared_memory_region(_region(regions, "image", image.nbytes), [image])
    classes_region = _region(regions, "classes", 1024)
    served.http.register_system_shared_memory("image", _key("image"), image.nbytes)
    served.grpc.register_system_shared_memory("classes", _key("classes"), 1024)
    for client, module in ((served.http, httpclient), (served.grpc, grpcclient)):
        x = module.InferInput("image", [1, 32, 32, 3], "UINT8").set_shared_memory("image", image.nbytes)
        out = module.InferRequestedOutput("classes")
        out.set_shared_memory("classes", 1024)
        client.infer("image_classifier", [x], outputs=[out])
        assert shm.get_contents_as_numpy(classes_region, np.object_, [1, 5]).tolist() == expected.tolist()
    text = np.array([[b"shared words"]], dtype=object)
    serialized = serialize_byte_tensor(text)
    size = serialized_byte_size(serialized)
    shm.set_shared_memory_region(_region(regions, "text", size), [serialized])
    served.grpc.register_system_shared_memory("text", _key("text"), size)
    x = grpcclient.InferInput("text", [1, 1], "BYTES").set_shared_memory("text", size)
    result = served.grpc.infer("echo", [x], outputs=[grpcclient.InferRequestedOutput("upper")])
    assert result.as_numpy("upper").tolist() == [[b"SHARED WORDS"]]


def test_a_name_is_free_again_once_unregistered(served: Served, regions: dict) -> None:
    shm.set_shared_memory_region(_region(regions, "first", 64), [X])
    shm.set_shared_memory_region(_region(regions, "second", 64), [X * 10])
    served.http.register_system_shared_memory("reused", _key("first"), 64)
    with pytest.raises(InferenceServerException) as excinfo:
        served.grpc.register_system_shared_memory("reused", _key("second"), 64)
    assert "StatusCode.ALREADY_EXISTS" in str(excinfo.value.status())
    assert "'reused' is already registered; unregister it first" in _message(excinfo)
    served.grpc.unregister_system_shared_memory("reused")
    served.grpc.register_system_shared_memory("reused", _key("second"), 64)
    x = httpclient.InferInput("x", [1, 16], "FP32").set_shared_memory("reused", 64)
    np.testing.assert_array_equal(served.http.infer("tiny", [x]).as_numpy("y"), X * 10 + 1)


def test_unregistering_during_inference_never_touches_unmapped_or_unregistered_memory(
    served: Served, regions: dict
) -> None:
    """A request whose input region is unregistered while it waits in the batcher still reads its
    input (the mapping lives until the request is done), and one whose output region is
    unregistered while it runs gets a 400 and its region is not written."""
    shm.set_shared_memory_region(_region(regions, "queued_in", 16), [np.array([[1, 2, 3, 4]], np.float32)])
    output_region = _region(regions, "late_out", 16)
    served.http.register_system_shared_memory("queued_in", _key("queued_in"), 16)
    served.http.register_system_shared_memory("late_out", _key("late_out"), 16)
    mapping = weakref.ref(served.server.dataplane.shared_memory._regions["queued_in"].mapping)
    gate_model.ENTERED.clear()
    gate_model.RELEASE.clear()

    def infer(x: Any, outputs: list | None = None) -> Any:
        client = httpclient.InferenceServerClient(served.http_url)
        try:
            return client.infer("gate", [x], outputs=outputs)
        finally:
            client.close()

    holder = httpclient.InferInput("x", [1, 4], "FP32")
    holder.set_data_from_numpy(np.array([[-1, 0, 0, 0]], np.float32))
    reader = httpclient.InferInput("x", [1, 4], "FP32").set_shared_memory("queued_in", 16)
    writer_input = httpclient.InferInput("x", [1, 4], "FP32")
    writer_input.set_data_from_numpy(np.array([[5, 6, 7, 8]], np.float32))
    writer_output = httpclient.InferRequestedOutput("y")
    writer_output.set_shared_memory("late_out", 16)
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(infer, holder)
        try:
            assert gate_model.ENTERED.wait(DEADLINE_S)
            reading = pool.submit(infer, reader)
            writing = pool.submit(infer, writer_input, [writer_output])
            stats = served.server.runtime.model_stats
            wait_for(lambda: stats("gate")["queue_depth"] == 2, "both requests to queue behind the held batch")
            served.http.unregister_system_shared_memory()
            assert served.http.get_system_shared_memory_status() == []
            assert mapping() is not None and not mapping().closed  # the queued input still reads it
        finally:
            gate_model.RELEASE.set()
        np.testing.assert_array_equal(held.result(DEADLINE_S).as_numpy("y"), [[-2, 0, 0, 0]])
        np.testing.assert_array_equal(reading.result(DEADLINE_S).as_numpy("y"), [[2, 4, 6, 8]])
        with pytest.raises(InferenceServerException) as excinfo:
            writing.result(DEADLINE_S)
    assert excinfo.value.status() == "400"
    assert "region 'late_out' was unregistered while the request ran; the output was not written" in \
        _message(excinfo)
    assert shm.get_contents_as_numpy(output_region, np.float32, [4]).tolist() == [0, 0, 0, 0]
    gc.collect()
    assert mapping() is None or mapping().closed  # unmapped once the last request let go


# -- every way to get it wrong: a 4xx saying what to fix, and the server goes on --------


def test_register_refusals_over_http(served: Served, regions: dict) -> None:
    _region(regions, "small", 64)
    _region(regions, "target", 64)
    link = Path("/dev/shm") / f"conveyor_test_link_{os.getpid()}"
    link.symlink_to(Path("/dev/shm") / _key("target").lstrip("/"))
    try:
        cases = [
            ({"key": _key("small"), "offset": 32, "byte_size": 64}, 400,
             "offset 32 + byte_size 64 = 96 bytes, but shared memory object"),
            ({"key": _key("small"), "offset": -1, "byte_size": 64}, 400, "'offset' must be an integer >= 0"),
            ({"key": _key("small"), "byte_size": 0}, 400, "'byte_size' must be an integer > 0"),
            ({"key": _key("small"), "byte_size": "64"}, 400, "'byte_size' must be an integer > 0, got '64'"),
            ({"key": _key("small"), "byte_size": True}, 400, "'byte_size' must be an integer > 0, got true"),
            ({"key": "/conveyor_test_absent", "byte_size": 64}, 400,
             "no shared memory object '/conveyor_test_absent' exists"),
            ({"key": "/../etc/passwd", "byte_size": 64}, 400, "is not a shared memory object name"),
            ({"key": "a/b", "byte_size": 64}, 400, "without '/', '..' or control characters"),
            ({"key": "..", "byte_size": 64}, 400, "is not a shared memory object name"),
            ({"key": "x\u0000y", "byte_size": 64}, 400, "is not a shared memory object name"),
            ({"key": "/" + "k" * 256, "byte_size": 64}, 400, "at most 255 bytes"),
            ({"key": "sem.lock", "byte_size": 64}, 400, "names a POSIX semaphore"),
            ({"key": "/" + link.name, "byte_size": 64}, 400, "it is a symbolic link"),
            ({"offset": 0, "byte_size": 64}, 400, "'key' must be a string naming a POSIX shared memory object"),
            ([1], 400, "expected a JSON object"),
        ]
        for document, status, message in cases:
            answer = served.request("POST", "/v2/systemsharedmemory/region/r/register", document)
            assert answer[0] == status and message in answer[1]["error"], (document, answer)
        long_name = "n" * 257
        for name in (long_name, "a%2Fb", "a%00b"):
            status, body = served.request("POST", f"/v2/systemsharedmemory/region/{name}/register",
                                          {"key": _key("small"), "byte_size": 64})
            assert status == 400 and "is not valid: use 1 to 256 printable characters without '/'" in body["error"]
        assert served.request("GET", "/v2/systemsharedmemory/region/never/status") == (
            404, {"error": "no system shared memory region 'never' is registered"}
        )
        assert served.request("GET", "/v2/systemsharedmemory/status") == (200, [])
    finally:
        link.unlink()


def test_register_refusals_over_grpc(served: Served, regions: dict) -> None:
    _region(regions, "small", 64)
    cases = [
        (dict(name="r", key=_key("small"), offset=2**63, byte_size=64), "but shared memory object"),
        (dict(name="r", key=_key("small"), offset=0, byte_size=0), "'byte_size' must be an integer > 0"),
        (dict(name="r", key="../x", offset=0, byte_size=8), "is not a shared memory object name"),
        (dict(name="", key=_key("small"), offset=0, byte_size=8), "region name '' is not valid"),
        (dict(name="a/b", key=_key("small"), offset=0, byte_size=8), "region name 'a/b' is not valid"),
    ]
    for fields, message in cases:
        with pytest.raises(InferenceServerException) as excinfo:
            served.grpc.register_system_shared_memory(fields["name"], fields["key"], fields["byte_size"],
                                                      offset=fields["offset"])
        assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT" and message in _message(excinfo), fields
    with pytest.raises(InferenceServerException) as excinfo:
        served.grpc.get_system_shared_memory_status("never")
    assert excinfo.value.status() == "StatusCode.NOT_FOUND"
    served.grpc.unregister_system_shared_memory("never")  # as Triton: nothing to do is no error


def test_infer_refusals(served: Served, regions: dict) -> None:
    """Tensor windows past the region, sizes that do not match the tensor, regions never registered."""
    shm.set_shared_memory_region(_region(regions, "box", 64), [X])
    served.http.register_system_shared_memory("box", _key("box"), 64)

    def refused(client: Any, module: Any, *, offset: int = 0, size: int = 64, region: str = "box",
                output: tuple[str, int, int] | None = None) -> str:
        x = module.InferInput("x", [1, 16], "FP32").set_shared_memory(region, size, offset=offset)
        outputs = None
        if output is not None:
            y = module.InferRequestedOutput("y")
            y.set_shared_memory(output[0], output[1], offset=output[2])
            outputs = [y]
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer("tiny", [x], outputs=outputs)
        assert excinfo.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), excinfo.value
        return _message(excinfo)

    for client, module in ((served.http, httpclient), (served.grpc, grpcclient)):
        assert "64 bytes at offset 32 of shared memory region 'box' end at byte 96, past the 64 bytes registered" \
            in refused(client, module, offset=32)
        assert "shared_memory_byte_size is 60 but shape [1, 16] needs 64 bytes of FP32 data" in \
            refused(client, module, size=60)
        assert "no shared memory region 'nowhere' is registered; register it first" in \
            refused(client, module, region="nowhere")
        assert "output 'y': 64 bytes at offset 8 of shared memory region 'box' end at byte 72" in \
            refused(client, module, output=("box", 64, 8))
        assert "output 'y': the output takes 64 bytes but shared_memory_byte_size gives 32" in \
            refused(client, module, output=("box", 32, 0))
    # Nothing was written past what was asked: the input is still there.
    np.testing.assert_array_equal(shm.get_contents_as_numpy(regions["box"], np.float32, [1, 16]), X)
    status, body = served.request("POST", "/v2/models/tiny/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                    "parameters": {"shared_memory_region": "box", "shared_memory_byte_size": 64,
                                   "shared_memory_offset": -4}}]})
    assert status == 400 and "'shared_memory_offset' must be an integer >= 0" in body["error"]


def test_a_file_shrunk_under_its_region_fails_the_request_not_the_server(served: Served, regions: dict) -> None:
    handle = _region(regions, "shrinking", 8192)
    served.http.register_system_shared_memory("shrinking", _key("shrinking"), 64, offset=4096)
    os.truncate(Path("/dev/shm") / _key("shrinking").lstrip("/"), 100)
    x = httpclient.InferInput("x", [1, 16], "FP32").set_shared_memory("shrinking", 64)
    with pytest.raises(InferenceServerException) as excinfo:
        served.http.infer("tiny", [x])
    assert "has shrunk to 100 bytes since it was registered" in _message(excinfo)
    del handle


def test_cuda_shared_memory_says_to_use_system_shared_memory(served: Served) -> None:
    handle = base64.b64encode(b"\0" * 64).decode()
    status, body = served.request("POST", "/v2/cudasharedmemory/region/gpu/register",
                                  {"raw_handle": {"b64": handle}, "device_id": 0, "byte_size": 64})
    assert status == 400
    assert "CUDA shared memory region 'gpu' cannot be registered" in body["error"]
    assert "use system shared memory instead" in body["error"]
    with pytest.raises(InferenceServerException) as excinfo:
        served.grpc.register_cuda_shared_memory("gpu", handle.encode(), 0, 64)
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT" and "use system shared memory" in _message(excinfo)
    assert served.http.get_cuda_shared_memory_status() == []
    assert not served.grpc.get_cuda_shared_memory_status().regions
    assert served.request("GET", "/v2/cudasharedmemory/region/gpu/status")[0] == 404
    served.http.unregister_cuda_shared_memory()
    served.grpc.unregister_cuda_shared_memory("gpu")
    assert "cuda_shared_memory" not in served.http.get_server_metadata()["extensions"]
    assert "system_shared_memory" in served.grpc.get_server_metadata().extensions
    assert served.live()


# -- the API key guards registration and the inference that uses regions ----------------


def test_without_the_key_regions_are_out_of_reach(keyed: Served) -> None:
    made: dict[str, Any] = {}
    shm.set_shared_memory_region(_region(made, "secret", 64), [X])
    try:
        for method, path in (("GET", "/v2/systemsharedmemory/status"), ("GET", "/v2/systemsharedmemory/region/s/status"),
                             ("POST", "/v2/systemsharedmemory/region/s/register"),
                             ("POST", "/v2/systemsharedmemory/unregister"),
                             ("POST", "/v2/cudasharedmemory/region/s/register")):
            status, body = keyed.request(method, path, {"key": _key("secret"), "byte_size": 64})
            assert status == 401 and "--api-key" in body["error"], (path, status, body)
        with pytest.raises(InferenceServerException) as excinfo:
            keyed.grpc.register_system_shared_memory("s", _key("secret"), 64)
        assert excinfo.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as excinfo:
            keyed.grpc.get_system_shared_memory_status()
        assert excinfo.value.status() == "StatusCode.UNAUTHENTICATED"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        keyed.http.register_system_shared_memory("s", _key("secret"), 64, headers=auth)
        # Inference is open, but not the regions: without the key an identity-like model
        # would read any registered region back to its caller.
        x = httpclient.InferInput("x", [1, 16], "FP32").set_shared_memory("s", 64)
        with pytest.raises(InferenceServerException) as excinfo:
            keyed.http.infer("tiny", [x])
        assert excinfo.value.status() == "401" and "reads or writes shared memory" in _message(excinfo)
        gx = grpcclient.InferInput("x", [1, 16], "FP32").set_shared_memory("s", 64)
        with pytest.raises(InferenceServerException) as excinfo:
            keyed.grpc.infer("tiny", [gx])
        assert excinfo.value.status() == "StatusCode.UNAUTHENTICATED"
        np.testing.assert_array_equal(keyed.http.infer("tiny", [x], headers=auth).as_numpy("y"), X + 1)
        metadata = {"authorization": f"Bearer {API_KEY}"}
        np.testing.assert_array_equal(keyed.grpc.infer("tiny", [gx], headers=metadata).as_numpy("y"), X + 1)
        plain = httpclient.InferInput("x", [1, 16], "FP32")
        plain.set_data_from_numpy(X)
        np.testing.assert_array_equal(keyed.http.infer("tiny", [plain]).as_numpy("y"), X + 1)  # still open
        assert keyed.http.get_system_shared_memory_status(headers=auth)[0]["name"] == "s"
    finally:
        keyed.http.unregister_system_shared_memory(headers={"Authorization": f"Bearer {API_KEY}"})
        shm.destroy_shared_memory_region(made["secret"])
    assert keyed.live()


def test_the_region_limit_is_the_servers_flag(keyed: Served) -> None:
    made: dict[str, Any] = {}
    _region(made, "limit", 64)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        for name in ("one", "two"):
            keyed.http.register_system_shared_memory(name, _key("limit"), 64, headers=auth)
        with pytest.raises(InferenceServerException) as excinfo:
            keyed.http.register_system_shared_memory("three", _key("limit"), 64, headers=auth)
        assert excinfo.value.status() == "400"
        assert "holds 2 shared memory regions, its limit (--max-shared-memory-regions)" in _message(excinfo)
        keyed.http.unregister_system_shared_memory("one", headers=auth)
        keyed.http.register_system_shared_memory("three", _key("limit"), 64, headers=auth)
    finally:
        keyed.http.unregister_system_shared_memory(headers=auth)
        shm.destroy_shared_memory_region(made["limit"])


# -- perf_analyzer --shared-memory system -----------------------------------------------


def _perf_analyzer() -> list[str]:
    command = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not command:
        pytest.skip("perf_analyzer not found: set PERF_ANALYZER to a command that runs it, or put it on PATH")
    return shlex.split(command)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_with_system_shared_memory(protocol: str, tmp_path: Path) -> None:
    perf_analyzer = _perf_analyzer()
    repository = tmp_path / "repo"
    shutil.copytree(EXAMPLE_MODELS / "tiny", repository / "tiny")
    server = LiveServer(repository, tmp_path)
    try:
        server.wait_ready()
        url = server.http_url if protocol == "http" else server.grpc_url
        before = _successes(server)
        result = subprocess.run(
            [*perf_analyzer, "-m", "tiny", "-u", url, "-i", protocol, "--shared-memory", "system", "-b", "1",
             "--concurrency-range", "2:2", "--request-count", "100", "-f", str(tmp_path / "pa.csv")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "error" not in output.lower(), output
        counted = re.search(r"Successful request count: (\d+)", output)
        assert counted is not None and int(counted.group(1)) >= 100, output
        with open(tmp_path / "pa.csv", newline="") as table:
            rows = list(csv.DictReader(table))
        assert rows and float(rows[-1]["Inferences/Second"]) > 0
        assert _successes(server) - before >= 100
        # perf_analyzer unregisters what it registered.
        assert server.request_json("GET", "/v2/systemsharedmemory/status") == (200, [])
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-5000:]


def _successes(server: LiveServer) -> int:
    status, stats = server.request_json("GET", "/v2/models/tiny/stats")
    assert status == 200
    return stats["model_stats"][0]["inference_stats"]["success"]["count"]


def test_grpc_region_status_message_matches_tritons() -> None:
    """The status message keys regions by name, as tritonclient reads it."""
    message = pb.SystemSharedMemoryStatusResponse()
    message.regions["r"].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(name="r", key="/k", offset=1,
                                                                                     byte_size=2))
    theirs = service_pb2.SystemSharedMemoryStatusResponse.FromString(message.SerializeToString())
    assert theirs.regions["r"] == pb_region_status("r", "/k", 1, 2)
