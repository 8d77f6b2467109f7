"""`conveyor serve` as a user runs it: real subprocesses on free ports, driven over HTTP."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import subprocess
import tempfile
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import conveyor
from conveyor.cli import build_parser
from conveyor.server.http import HttpLimits
from conveyor.server.serve import ServeOptions
from processes import DEADLINE_S, free_port, wait_for

# The subprocesses import the same conveyor as this test run: the installed package, or
# a source tree with an in-tree build (PYTHONPATH=python).
PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]


# Monitored example models write capture files under the data directory: keep them out
# of the working directory.
DATA_DIR = Path(tempfile.mkdtemp(prefix="conveyor-serve-cli-data-"))


def _environment(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(PACKAGE_PARENT)
    env["CONVEYOR_DATA_DIR"] = str(DATA_DIR)
    env.update(variables)
    return env


def _conveyor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=env or _environment(), capture_output=True, text=True, timeout=DEADLINE_S,
    )


class Served:
    """One `conveyor serve` process; its output goes to a log file read by the tests."""

    def __init__(self, args: list[str], log_path: Path, *, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "conveyor", "serve", *args]
        if port is None:
            command += ["--http-port", str(self.port)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env or _environment(), stdout=log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def status(self, path: str) -> int | None:
        """The status of GET path, or None while nothing listens."""
        try:
            return self.request("GET", path)[0]
        except OSError:
            return None

    def wait_until(self, path: str, what: str, status: int = 200) -> None:
        wait_for(lambda: self.status(path) == status, what, process=self.process)

    def wait_ready(self) -> None:
        self.wait_until("/v2/health/ready", "the server to be ready")

    def infer(self, model: str, rows: list[list[float]], version: str = "") -> list[float]:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        inputs = [{"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}]
        status, body = self.request("POST", path, {"inputs": inputs})
        assert status == 200, body
        return json.loads(body)["outputs"][0]["data"]

    def index(self) -> list[dict[str, Any]]:
        status, body = self.request("POST", "/v2/repository/index", b"{}")
        assert status == 200, body
        return json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(DEADLINE_S)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Starts `conveyor serve` processes (gRPC off unless asked); kills any still running at teardown."""
    started: list[Served] = []

    def start(*args: str, port: int | None = None, env: dict[str, str] | None = None) -> Served:
        arguments = list(args) if "--grpc-port" in args else [*args, "--grpc-port", "0"]
        served = Served(arguments, tmp_path / f"serve-{len(started)}.log", port=port, env=env)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.kill()


def _adder_onnx(constant: float, width: int = 4) -> bytes:
    """y = x + constant over [batch, width]."""
    addend = numpy_helper.from_array(np.full((1, width), constant, np.float32), "addend")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "addend"], ["y"])],
        "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[addend],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


ADDER_CONFIG = """\
backend = "onnx"
max_batch_size = 8
"""


def _write_version(model_dir: Path, version: int, model_onnx: bytes) -> None:
    """Write a version directory outside the repository, then rename it in: a poll never sees half of it."""
    staging = model_dir.parent.parent / f"staging-{model_dir.name}-{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(model_onnx)
    staging.rename(model_dir / str(version))


# -- the command line -----------------------------------------------------------------


def test_version() -> None:
    result = _conveyor("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"conveyor {conveyor.__version__}"


def test_serve_help_documents_every_flag() -> None:
    result = _conveyor("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    fields = [*dataclasses.fields(ServeOptions), *dataclasses.fields(HttpLimits)]
    flags = {field.name: "--" + field.name.replace("_", "-") for field in fields if field.name != "http_limits"}
    flags["load_models"] = "--load-model"
    flags["repository"] = "repository"
    del flags["server_version"]  # the package's version, not the user's choice
    for option, flag in flags.items():
        assert flag in text, f"ServeOptions.{option} has no flag {flag} in --help"
    assert "--log-level" in text
    assert "CONVEYOR_HTTP_PORT" in text  # the environment variables are documented too


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CONVEYOR_HTTP_PORT", "abc"), ("CONVEYOR_HTTP_PORT", "70000"), ("CONVEYOR_MODEL_CONTROL_MODE", "sometimes"),
     ("CONVEYOR_MAX_REQUEST_BYTES", "-5"), ("CONVEYOR_MAX_CONNECTIONS", "0"), ("CONVEYOR_IDLE_TIMEOUT_S", "never"),
     ("CONVEYOR_GRPC_MAX_MESSAGE_BYTES", "1e9"), ("CONVEYOR_API_KEY_SCOPE", "some")],
)
def test_bad_environment_value_exits_naming_the_variable(variable: str, value: str) -> None:
    result = _conveyor("serve", env=_environment(**{variable: value}))
    assert result.returncode != 0
    assert variable in result.stderr and repr(value) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HTTP_PORT", "9100")
    monkeypatch.setenv("CONVEYOR_LOAD_MODEL", "mlp,tiny")
    monkeypatch.setenv("CONVEYOR_API_KEY", "from-env")
    args = build_parser().parse_args(["serve"])
    assert (args.http_port, args.load_model, args.api_key) == (9100, ["mlp", "tiny"], "from-env")
    args = build_parser().parse_args(["serve", "--http-port", "9200", "--load-model", "scaler", "--api-key", "flag"])
    assert (args.http_port, args.load_model, args.api_key) == (9200, ["scaler"], "flag")


def test_missing_repository_exits_with_a_message(tmp_path: Path) -> None:
    result = _conveyor("serve", str(tmp_path / "nowhere"), "--grpc-port", "0")
    assert result.returncode != 0 and "nowhere" in result.stderr


# -- serving --------------------------------------------------------------------------


def test_environment_port_and_the_bundled_examples(serve: Callable[..., Served]) -> None:
    port = free_port()
    served = serve(port=port, env=_environment(CONVEYOR_HTTP_PORT=str(port)))
    served.wait_ready()
    for model in ("mlp", "tiny", "scaler"):
        assert served.status(f"/v2/models/{model}/ready") == 200, model
    assert served.infer("tiny", [[1.0] * 16]) == [2.0] * 16
    assert f"listening on http://127.0.0.1:{port}" in served.log()


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(
    serve: Callable[..., Served], repository_builder: Any
) -> None:
    repository_builder.add("good", ADDER_CONFIG, {"1": {"model.onnx": _adder_onnx(1.0)}})
    repository_builder.add("broken", 'backend = "onnx"\nmax_batch_size = "lots"\n',
                           {"1": {"model.onnx": _adder_onnx(1.0)}})
    served = serve(str(repository_builder.root))
    served.wait_until("/v2/models/good/ready", "model 'good' to be ready")
    assert served.infer("good", [[1.0, 2.0, 3.0, 4.0]]) == [2.0, 3.0, 4.0, 5.0]
    assert served.status("/v2/models/broken/ready") != 200
    rows = {row["name"]: row for row in served.index()}
    assert rows["good"]["state"] == "READY"
    assert rows["broken"]["state"] == "UNAVAILABLE"
    assert "max_batch_size" in rows["broken"]["reason"]
    log = served.log()
    assert "broken" in log and "max_batch_size" in log


GATED_CONFIG = """\
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[outputs]]
name = "y"
datatype = "FP32"
dims = [4]

[parameters]
gate = "{gate}"
"""

GATED_MODEL = """\
import time
from pathlib import Path

import numpy as np


class Model:
    # Holds every batch until the gate file exists (bounded, so a broken test cannot hang it).
    def __init__(self, config):
        self.gate = Path(config.parameters["gate"])

    def execute(self, inputs):
        deadline = time.monotonic() + 60.0
        while not self.gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate file {self.gate} never appeared")
            time.sleep(0.005)
        return {"y": inputs["x"] * np.float32(2.0)}
"""


def _in_flight(served: Served, model: str) -> float:
    status, body = served.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f'conveyor_requests_in_flight{{model="{model}"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_drains_accepted_requests(serve: Callable[..., Served], repository_builder: Any,
                                          tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    repository_builder.add("gated", GATED_CONFIG.format(gate=gate), {"1": {"model.py": GATED_MODEL}})
    served = serve(str(repository_builder.root), "--grace-period-s", str(DEADLINE_S))
    served.wait_ready()

    requests = 6
    answers: dict[int, tuple[int, bytes] | BaseException] = {}

    def send(i: int) -> None:
        try:
            answers[i] = served.request(
                "POST", "/v2/models/gated/infer",
                {"id": str(i), "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[i] * 4]}]},
            )
        except BaseException as exc:  # reported below
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    wait_for(lambda: _in_flight(served, "gated") == requests, "every request to be accepted", process=served.process)

    served.process.send_signal(signal.SIGTERM)
    # Draining: the listener closes (or readiness turns false) while the accepted requests wait.
    wait_for(lambda: served.status("/v2/health/ready") != 200, "the server to start draining",
              process=served.process)
    assert served.process.poll() is None
    gate.touch()

    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    assert served.process.wait(DEADLINE_S) == 0, served.log()
    for i in range(requests):
        answer = answers[i]
        assert not isinstance(answer, BaseException), answer
        status, body = answer
        assert status == 200, body
        response = json.loads(body)
        assert response["id"] == str(i) and response["outputs"][0]["data"] == [2.0 * i] * 4
    assert "stopped" in served.log()


def test_poll_mode_adds_a_version_and_survives_a_broken_one(
    serve: Callable[..., Served], repository_builder: Any
) -> None:
    model_dir = repository_builder.add("adder", ADDER_CONFIG, {"1": {"model.onnx": _adder_onnx(1.0)}})
    served = serve(str(repository_builder.root), "--model-control-mode", "poll", "--poll-interval-s", "0.2")
    served.wait_ready()
    assert served.infer("adder", [[0.0] * 4]) == [1.0] * 4

    _write_version(model_dir, 2, _adder_onnx(2.0))
    served.wait_until("/v2/models/adder/versions/2/ready", "version 2 to be served")
    assert served.infer("adder", [[0.0] * 4]) == [2.0] * 4
    assert served.infer("adder", [[0.0] * 4], version="2") == [2.0] * 4

    _write_version(model_dir, 3, b"this is not an onnx model")

    def failure_reported() -> dict[str, Any] | None:
        rows = [row for row in served.index() if row["name"] == "adder"]
        return next((row for row in rows if row["reason"]), None)

    row = wait_for(failure_reported, "the index to report version 3's failure", process=served.process)
    # The reason names the file inside the repository, never the repository's path on the server.
    assert "<repository>/adder/3/model.onnx" in row["reason"] and str(model_dir) not in row["reason"], row
    assert served.infer("adder", [[0.0] * 4]) == [2.0] * 4
    assert served.status("/v2/models/adder/versions/2/ready") == 200
    assert served.status("/v2/models/adder/versions/3/ready") != 200
    assert [row["version"] for row in served.index() if row["name"] == "adder"] == ["2"]
