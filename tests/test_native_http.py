"""`--http-frontend native`: which requests the C++ front end answers itself, which it
forwards to the Python front end, and the HTTP suites run against it.

Whether a request reached Python is read from the Python front end: every inference
request it answers goes through `HttpApp._infer`; one the native front end answers never does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.server.http import HttpApp
from conveyor.server.serve import ServeOptions
from server_thread import ServerThread

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
TESTS = Path(__file__).resolve().parent

# The test files that talk to a server over HTTP; each runs unchanged against the native front end.
HTTP_SUITES = (
    "test_http_server.py", "test_http_adversarial.py", "test_http_wire_fuzz.py", "test_http_openapi.py",
    "test_clients_live.py", "test_metrics.py", "test_reload_under_load.py", "test_rollout_server.py",
    "test_graph_server.py", "test_monitor_server.py", "test_overload.py", "test_serve_cli.py",
    "test_secure_defaults.py", "test_edge_ownership.py", "test_misbehaving_clients.py",
)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("native-repo")
    for name in ("tiny", "churn", "rollout_demo"):
        shutil.copytree(EXAMPLES / name, root / name)
    thread = ServerThread(ServeOptions(
        repository=root, http_port=0, grpc_port=0, data_dir=root / "data", model_control_mode="explicit",
        load_models=["tiny", "churn"], http_frontend="native",
    ))  # fmt: skip
    yield thread
    thread.stop()


@pytest.fixture
def python_answers(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models of the inference requests the Python front end answered."""
    seen: list[str] = []
    infer = HttpApp._infer

    async def counting(self: HttpApp, model: str, *args: Any) -> Any:
        seen.append(model)
        return await infer(self, model, *args)

    monkeypatch.setattr(HttpApp, "_infer", counting)
    return seen


def _post(port: int, path: str, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(document).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _infer(port: int, model: str, name: str, width: int) -> tuple[int, dict[str, Any]]:
    x = np.arange(width, dtype=np.float32).reshape(1, width)
    return _post(port, f"/v2/models/{model}/infer",
                 {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, width], "data": x.ravel().tolist()}]})


def test_a_model_needing_no_python_per_request_is_answered_natively(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _infer(served.port, "tiny", "x", 16)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [float(v + 1) for v in range(16)]
    assert len(body["id"]) == 32  # made here, as the Python front end makes one
    assert python_answers == []


def test_a_monitored_model_is_answered_by_python(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _infer(served.port, "churn", "features", 12)
    assert status == 200, body
    assert python_answers == ["churn"]


def test_an_invalid_request_is_worded_by_python(served: ServerThread, python_answers: list[str]) -> None:
    status, body = _post(served.port, "/v2/models/tiny/infer", {"inputs": [{"name": "x", "datatype": "FP32"}]})
    assert status == 400 and "shape" in body["error"]
    assert python_answers == ["tiny"]


def test_the_table_follows_loads_unloads_and_rollouts(served: ServerThread, python_answers: list[str]) -> None:
    port = served.port
    assert _post(port, "/v2/repository/models/tiny/unload", {})[0] == 200
    status, body = _infer(port, "tiny", "x", 16)
    assert status == 404 and python_answers == ["tiny"]  # Python says it is not loaded
    assert _post(port, "/v2/repository/models/tiny/load", {})[0] == 200
    assert _infer(port, "tiny", "x", 16)[0] == 200
    assert python_answers == ["tiny"]  # native again

    # A model whose [rollout] starts at load: its requests go through the rollout, in Python.
    assert _post(port, "/v2/repository/models/rollout_demo/load", {})[0] == 200
    status, body = _infer(port, "rollout_demo", "x", 8)
    assert status == 200 and body["parameters"]["rollout"]
    assert python_answers[-1] == "rollout_demo"
    # An ended rollout still picks the version (its outcome, 1, not the latest, 2): Python again.
    status, _ = _post(port, "/v2/models/rollout_demo/rollout/abort", {"reason": "test"})
    assert status == 200
    status, body = _infer(port, "rollout_demo", "x", 8)
    assert status == 200 and "parameters" not in body and body["model_version"] == "1"
    assert python_answers[-1] == "rollout_demo"
    # Unloaded, it leaves the rollout; loaded again, with no [rollout] started, it is native.


# What the native front end does not do as the Python front end does yet: these cases of the
# HTTP test files fail against it and are left out of its run below (each is the next work).
NATIVE_GAPS = {
    # A chunked body of more than --max-request-chunks chunks gets 400 from Beast, not 413.
    "test_http_adversarial.py::test_refused_with_a_clear_4xx_and_the_server_lives[65,537 chunks]":
        "the chunk count limit",
    "test_http_adversarial.py::test_refused_with_a_clear_4xx_and_the_server_lives[10^6 chunks]":
        "the chunk count limit",
    "test_http_adversarial.py::test_refused_with_a_clear_4xx_and_the_server_lives[Content-Length with "
    "Transfer-Encoding (smuggling)]": "the smuggling refusal's status and words",
    "test_http_adversarial.py::test_refused_with_a_clear_4xx_and_the_server_lives[obs-fold header]":
        "obs-fold headers are accepted, not refused",
    "test_http_adversarial.py::test_refused_with_a_clear_4xx_and_the_server_lives[malformed chunk extension]":
        "a malformed chunk extension closes without an answer",
    # Beast's stream timeouts close the socket, so the 408 is never written.
    "test_http_adversarial.py::test_a_slow_request_gets_408_and_is_closed[slow headers]": "408 on a slow head",
    "test_http_adversarial.py::test_a_slow_request_gets_408_and_is_closed[slow body]": "408 on a slow body",
    "test_misbehaving_clients.py::test_a_half_closed_client_gets_its_answer": "answers to half-closed clients",
    # The kept loopback connections to the Python front end count against the fd baseline.
    "test_misbehaving_clients.py": "the fd and thread baseline with kept loopback connections",
    "test_http_openapi.py::test_the_server_answers_as_its_openapi_document_says[POST /v2/models/{model_name}/infer]":
        "answers checked against the OpenAPI document",
    "test_http_openapi.py::test_the_server_answers_as_its_openapi_document_says[POST /v2/models/{model_name}/"
    "versions/{model_version}/infer]": "answers checked against the OpenAPI document",
}  # fmt: skip


@pytest.mark.skipif(os.environ.get("CONVEYOR_HTTP_FRONTEND") == "native", reason="already the native run")
def test_the_http_suites_pass_against_the_native_front_end() -> None:
    """The HTTP test files, unchanged, against `--http-frontend native` (the rest of the run
    tests the Python front end); in-process servers and `conveyor serve` subprocesses pick it
    up from CONVEYOR_HTTP_FRONTEND. The cases of NATIVE_GAPS are left out."""
    env = dict(os.environ, CONVEYOR_HTTP_FRONTEND="native")
    left_out = [arg for gap in NATIVE_GAPS for arg in ("--deselect", f"tests/{gap}")
                if "::" in gap]  # fmt: skip
    files = [str(TESTS / name) for name in HTTP_SUITES if name not in NATIVE_GAPS]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *left_out],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_an_unknown_front_end_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    from conveyor.errors import ConfigError
    from conveyor.server.serve import Server

    with pytest.raises(ConfigError, match=r"'python' or 'native' \(--http-frontend, CONVEYOR_HTTP_FRONTEND\), not 'rust'"):
        Server(ServeOptions(repository=tmp_path, http_frontend="rust"))
