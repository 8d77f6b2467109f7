"""Helpers for tests that drive real `conveyor serve` subprocesses."""

from __future__ import annotations

import contextlib
import signal
import json
import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import conveyor

DEADLINE_S = 30.0  # bound on every wait; a healthy run takes a fraction of it
POLL_S = 0.02  # the pause between two looks at a condition waited on
EXAMPLE_MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, process: subprocess.Popen | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail after DEADLINE_S or if `process` exits."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with code {process.returncode} while waiting for {what}")
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")


def start_serve(root: Path, flags: list[str], models: Iterable[str] = ("tiny", "text_classifier")) -> subprocess.Popen:
    """`conveyor serve root/repo <flags>` over copies of the example `models`, logging to root/serve.log.

    The environment's CONVEYOR_* variables are dropped, so that only `flags` configure it,
    except CONVEYOR_HTTP_FRONTEND, which picks the front end a whole test run is about.
    """
    for model in models:
        shutil.copytree(EXAMPLE_MODELS / model, root / "repo" / model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_") or k == "CONVEYOR_HTTP_FRONTEND"}
    env["PYTHONPATH"] = str(Path(conveyor.__file__).resolve().parents[1])
    command = [sys.executable, "-m", "conveyor", "serve", str(root / "repo"), "--data-dir", str(root / "data"), *flags]
    with open(root / "serve.log", "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid`, read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


# The server the fuzz tests drive (wire_fuzz, test_http_openapi): explicit model control with
# `tiny` loaded, so that the repository routes act; bodies up to 1 MiB (long fuzz strings get 413).
FUZZ_SERVE_FLAGS = ["--model-control-mode", "explicit", "--load-model", "tiny", "--max-request-bytes", str(1 << 20)]


class ServeProcess:
    """A `conveyor serve` subprocess on free ports, over a copy of some example models.

    `flags` are added to the command line; the log (stdout and stderr) goes to `log_path`.
    """

    def __init__(self, root: Path, models: tuple[str, ...], flags: list[str]) -> None:
        self.port = free_port()
        self.log_path = root / "serve.log"
        self.process = start_serve(root, ["--http-port", str(self.port), "--grpc-port", "0", *flags], models)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_status(self, path: str) -> int | None:
        """The status of GET `path` on a fresh connection, or None when the server does not answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            connection.close()

    def live(self) -> bool:
        return self.get_status("/v2/health/live") == 200

    def wait_live(self) -> None:
        wait_for(self.live, "the server to be live", process=self.process)

    def stop(self) -> str:
        """Kill the server and return its log."""
        self.process.kill()
        self.process.wait(DEADLINE_S)
        return self.log_path.read_text(errors="replace")
def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer writes until it closes the connection (or resets it)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)




@contextlib.contextmanager
def fuzz_server(root: Path) -> Iterator[ServeProcess]:
    """The live server the fuzz tests drive (FUZZ_SERVE_FLAGS, `tiny`); on exit, its log must hold no traceback."""
    served = ServeProcess(root, ("tiny",), FUZZ_SERVE_FLAGS)
    try:
        served.wait_live()
        yield served
    finally:
        log = served.stop()
    assert "Traceback" not in log, log[-5000:]


class LiveServer:
    """One `conveyor serve` subprocess with HTTP and gRPC on free ports; output in a log file.

    `flags` are added to the command line; `ready_model`: wait_ready waits for that model's
    readiness instead of the server's.
    """

    def __init__(self, repository: Path, workdir: Path, flags: Iterable[str] = (), ready_model: str | None = None) -> None:
        self.ready_model = ready_model
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = workdir / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_") or k == "CONVEYOR_HTTP_FRONTEND"}
        env["PYTHONPATH"] = str(Path(conveyor.__file__).resolve().parents[1])
        env["CONVEYOR_DATA_DIR"] = str(workdir / "data")
        command = [sys.executable, "-m", "conveyor", "serve", str(repository),
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *flags]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=DEADLINE_S)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def post_json(self, path: str, document: Any) -> tuple[int, Any]:
        status, _, body = self.request("POST", path, json.dumps(document).encode(),
                                       {"Content-Type": "application/json"})
        return status, json.loads(body)

    def request_json(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        """(status, the decoded JSON body or None when empty)."""
        body = None if document is None else json.dumps(document).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"})
        return status, json.loads(data) if data else None

    def _http_ready(self) -> bool:
        path = "/v2/health/ready" if self.ready_model is None else f"/v2/models/{self.ready_model}/ready"
        try:
            return self.request("GET", path)[0] == 200
        except OSError:
            return False

    def _grpc_ready(self) -> bool:
        import tritonclient.grpc as grpcclient  # a test extra: imported by the live tests alone
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            if self.ready_model is not None:
                return client.is_model_ready(self.ready_model, client_timeout=DEADLINE_S)
            return client.is_server_ready(client_timeout=DEADLINE_S)
        except InferenceServerException:
            return False
        finally:
            client.close()

    def wait_ready(self) -> None:
        try:
            wait_for(self._http_ready, "HTTP readiness", process=self.process)
            wait_for(self._grpc_ready, "gRPC readiness", process=self.process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; server log:\n{self.log()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEADLINE_S)
