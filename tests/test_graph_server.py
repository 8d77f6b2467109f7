"""Model graphs end to end: a `conveyor serve` process serving a cascade to unmodified tritonclient.

One server (explicit model control) for the module, over a repository written here: two
Python step models (`cheap`, `costly`), a cascade graph over them, and a graph whose step
model raises on a marked row. Expected answers run the step models' own code by hand.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import conveyor.server
from processes import DEADLINE_S, LiveServer

MAX_ROWS = 6

STEP_CONFIG = """\
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "p"
datatype = "FP32"
dims = [2]
"""

MODELS = {
    "cheap": """\
import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["x"]
        return {"p": np.stack([x[:, 0], 1 - x[:, 0]], axis=1)}
""",
    "costly": """\
import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["x"]
        return {"p": np.stack([x[:, 1] + x[:, 2], x[:, 3]], axis=1)}
""",
    "boom": """\
import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["x"]
        if np.any(x[:, 0] == 13):
            raise ValueError("kaboom")
        return {"p": x[:, :2] * 2}
""",
}

CASCADE_CONFIG = f"""\
max_batch_size = {MAX_ROWS}

[graph]
inputs = ["x"]

[graph.outputs]
p = ["costly.p", "cheap.p"]
first = "cheap.p"

[[graph.step]]
name = "cheap"
model = "cheap"
inputs = {{ x = "x" }}

[[graph.step]]
name = "costly"
model = "costly"
inputs = {{ x = "x" }}
when = "max(cheap.p) < 0.6"
"""

EXPLODING_CONFIG = """\
[graph]
inputs = ["x"]
outputs = { p = "explode.p" }

[[graph.step]]
name = "explode"
model = "boom"
inputs = { x = "x" }
"""

LOADED = ["cheap", "costly", "boom", "cascade", "exploding"]


def step_by_hand(model: str, x: np.ndarray) -> np.ndarray:
    """Runs a step model's own code on `x` (its model.py, as the server loads it)."""
    scope: dict[str, Any] = {}
    exec(MODELS[model], scope)  # noqa: S102 - the test's own model source
    return scope["Model"]().execute({"x": x})["p"].astype(np.float32)


def cascade_by_hand(x: np.ndarray) -> dict[str, np.ndarray]:
    first = step_by_hand("cheap", x)
    unsure = first.max(axis=1) < 0.6
    p = first.copy()
    if unsure.any():
        p[unsure] = step_by_hand("costly", x[unsure])
    return {"p": p, "first": first}


def cascade_rows(bits: tuple[bool, ...], seed: int) -> np.ndarray:
    """Random rows; a True bit makes the row unsure (max(cheap.p) = 0.5), so the costly step runs."""
    x = np.random.default_rng(seed).uniform(-2, 2, (len(bits), 4)).astype(np.float32)
    x[:, 0] = np.where(bits, 0.5, 0.9)
    return x


def every_mix(max_rows: int) -> Iterator[tuple[bool, ...]]:
    for rows in range(1, max_rows + 1):
        yield from itertools.product((False, True), repeat=rows)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("graph-server")
    root = workdir / "models"
    for name, source in MODELS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(STEP_CONFIG)
        (root / name / "1" / "model.py").write_text(source)
    for name, config in (("cascade", CASCADE_CONFIG), ("exploding", EXPLODING_CONFIG)):
        (root / name).mkdir()
        (root / name / "config.toml").write_text(config)
    flags = ["--model-control-mode", "explicit", *itertools.chain(*(("--load-model", m) for m in LOADED))]
    server = LiveServer(root, workdir, flags, ready_model="cascade")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def server_survives(live: LiveServer) -> Iterator[None]:
    """Each test leaves the server running: a crash is reported with the server's log."""
    yield
    assert live.process.poll() is None, f"the server exited with code {live.process.returncode}:\n{live.log()}"


@pytest.fixture()
def http_client(live: LiveServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(live.http_url, network_timeout=DEADLINE_S)
    yield client
    client.close()


@pytest.fixture()
def grpc_client(live: LiveServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(live.grpc_url)
    yield client
    client.close()


def _inputs(module: Any, x: np.ndarray) -> list[Any]:
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _check(result: Any, x: np.ndarray, what: str) -> None:
    for name, expected in cascade_by_hand(x).items():
        np.testing.assert_array_equal(result.as_numpy(name), expected, err_msg=f"{what}: {name}")


# -- inference -------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_http_cascade_equals_its_steps_by_hand(http_client, binary: bool) -> None:
    for index, bits in enumerate(every_mix(4)):
        x = cascade_rows(bits, seed=index)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("p", "first")]
        _check(http_client.infer("cascade", _inputs(httpclient, x), outputs=outputs), x, f"http {bits}")
    for rows in range(5, MAX_ROWS + 1):  # the larger batch sizes: none, alternate, all unsure
        for bits in ((False,) * rows, tuple(i % 2 == 0 for i in range(rows)), (True,) * rows):
            x = cascade_rows(bits, seed=rows)
            _check(http_client.infer("cascade", _inputs(httpclient, x)), x, f"http {bits}")


def test_grpc_cascade_equals_its_steps_by_hand(grpc_client) -> None:
    for index, bits in enumerate(every_mix(4)):
        x = cascade_rows(bits, seed=100 + index)
        _check(grpc_client.infer("cascade", _inputs(grpcclient, x)), x, f"grpc {bits}")


def test_grpc_stream_answers_each_graph_request(grpc_client) -> None:
    answers: queue.Queue = queue.Queue()
    sent = {f"r{index}": cascade_rows(bits, seed=200 + index) for index, bits in enumerate(every_mix(3))}
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, x in sent.items():
            grpc_client.async_stream_infer("cascade", _inputs(grpcclient, x), request_id=request_id)
        for _ in range(len(sent)):
            result, error = answers.get(timeout=DEADLINE_S)
            assert error is None, error
            request_id = result.get_response().id
            _check(result, sent.pop(request_id), f"stream {request_id}")
    finally:
        grpc_client.stop_stream()
    assert not sent


# -- metadata, config, repository --------------------------------------------------------

def test_metadata_and_config_derive_the_graph_tensors(http_client, grpc_client) -> None:
    metadata = http_client.get_model_metadata("cascade")
    assert metadata["platform"] == "ensemble", metadata
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert sorted((o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]) == [
        ("first", "FP32", [-1, 2]), ("p", "FP32", [-1, 2])]
    config = http_client.get_model_config("cascade")
    assert config["platform"] == "ensemble" and config["max_batch_size"] == MAX_ROWS, config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [("x", "TYPE_FP32", [4])]
    grpc_metadata = grpc_client.get_model_metadata("cascade", as_json=True)
    assert grpc_metadata["platform"] == "ensemble"
    assert [t["name"] for t in grpc_metadata["inputs"]] == ["x"]
    assert grpc_client.get_model_config("cascade", as_json=True)["config"]["platform"] == "ensemble"


def test_repository_index_lists_the_graph(http_client) -> None:
    index = {row["name"]: row for row in http_client.get_model_repository_index()}
    assert set(LOADED) <= set(index)
    assert index["cascade"]["state"] == "READY"


def test_graph_readiness_follows_its_step_model(live: LiveServer, http_client, grpc_client) -> None:
    x = cascade_rows((True, False), seed=7)
    assert http_client.is_model_ready("cascade") and grpc_client.is_model_ready("cascade")
    http_client.unload_model("costly")
    try:
        assert not http_client.is_model_ready("cascade")
        assert not grpc_client.is_model_ready("cascade")
        status, body = live.request_json("POST", "/v2/models/cascade/infer", {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
        assert status == 503, body
        assert "step 'costly'" in body["error"] and "not loaded" in body["error"], body
    finally:
        http_client.load_model("costly")
    assert http_client.is_model_ready("cascade") and grpc_client.is_model_ready("cascade")
    _check(http_client.infer("cascade", _inputs(httpclient, x)), x, "after reloading the step model")


# -- statistics and errors ----------------------------------------------------------------

def test_http_statistics_carry_the_steps(live: LiveServer, http_client, grpc_client) -> None:
    x = cascade_rows((True, False, True), seed=9)
    before = http_client.get_inference_statistics("cascade")["model_stats"][0]
    http_client.infer("cascade", _inputs(httpclient, x))
    stats = http_client.get_inference_statistics("cascade")["model_stats"][0]
    assert stats["name"] == "cascade"
    steps = {step["step"]: step for step in stats["steps"]}
    old = {step["step"]: step for step in before["steps"]}
    assert set(steps) == {"cheap", "costly"} and steps["costly"]["model"] == "costly"
    assert steps["cheap"]["rows"] - old["cheap"]["rows"] == 3
    assert steps["costly"]["rows"] - old["costly"]["rows"] == 2
    assert steps["costly"]["skipped_rows"] - old["costly"]["skipped_rows"] == 1
    assert int(stats["inference_count"]) - int(before["inference_count"]) == 3
    # The shipped OpenAPI document describes the steps (the route's declared schema).
    document = yaml.safe_load((Path(conveyor.server.__file__).parent / "openapi.yaml").read_text())
    schema = {**document["components"]["schemas"]["ModelStatistics"], "components": document["components"]}
    jsonschema.validate(stats, schema)
    grpc_stats = grpc_client.get_inference_statistics("cascade", as_json=True)["model_stats"][0]
    assert grpc_stats["name"] == "cascade" and "steps" not in grpc_stats
    assert int(grpc_stats["inference_count"]) >= 3


def test_a_raising_step_answers_500_naming_the_step(live: LiveServer, http_client, grpc_client) -> None:
    x = np.full((2, 4), 13, np.float32)
    status, body = live.request_json("POST", "/v2/models/exploding/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]})
    assert status == 500, body
    assert "step 'explode'" in body["error"] and "model 'boom'" in body["error"] and "kaboom" in body["error"]
    with pytest.raises(InferenceServerException, match="step 'explode'") as raised:
        grpc_client.infer("exploding", _inputs(grpcclient, x))
    assert "INTERNAL" in str(raised.value.status())
    good = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(http_client.infer("exploding", _inputs(httpclient, good)).as_numpy("p"),
                                  step_by_hand("boom", good))
    x = cascade_rows((True,), seed=11)
    _check(http_client.infer("cascade", _inputs(httpclient, x)), x, "the other graph after the failure")
