"""A canary survives a real `conveyor serve` being killed (kill -9) mid-rollout.

The model's config.toml declares a canary; its step 0 passes once the challenger has
answered a few requests (no gating checks: the bake condition alone moves it), and the
server's own periodic tick moves it to step 1, which then waits for traffic. The server
is killed there. Restarted on the same data directory, the rollout resumes at step 1 with
its weights; restarted once more without the challenger's version directory, it comes
back champion-only with the reason, and no request goes to the missing version.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import conveyor
from processes import DEADLINE_S, free_port, wait_for
from rollout_models import DOUBLING_PY, TWO_VERSION_CONFIG

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGKILL"), reason="needs Linux and SIGKILL"
)

PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]  # the conveyor this run imports
MODEL = "scorer"
WIDTH = 4

CONFIG = TWO_VERSION_CONFIG + """
[rollout]
strategy = "canary"
champion = 1
challenger = 2
interval_s = 0.1

[[rollout.steps]]
weight = 25.0
min_requests = 5

[[rollout.steps]]
weight = 50.0
min_requests = 1000000
"""

class Server:
    """One `conveyor serve` subprocess on a free port; its output goes to a log file."""

    def __init__(self, repository: Path, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(PACKAGE_PARENT)
        command = [
            sys.executable, "-m", "conveyor", "serve", str(repository), "--http-port", str(self.port),
            "--grpc-port", "0", "--data-dir", str(data_dir), "--grace-period-s", str(DEADLINE_S),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                return self.request("GET", f"/v2/models/{MODEL}/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, "the model to be ready", self.process)

    def rollout(self) -> dict[str, Any]:
        status, document = self.request("GET", f"/v2/models/{MODEL}/rollout")
        assert status == 200, document
        return document

    def infer(self, key: str, value: float) -> dict[str, Any]:
        document = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [value] * WIDTH}]}
        status, answer = self.request("POST", f"/v2/models/{MODEL}/infer", document, {"conveyor-route-key": key})
        assert status == 200, answer  # no request fails: none reaches a version that is not loaded
        assert answer["outputs"][0]["data"] == [value * 2] * WIDTH
        return answer

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(DEADLINE_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(DEADLINE_S)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / MODEL).mkdir(parents=True)
    (root / MODEL / "config.toml").write_text(CONFIG)
    for version in (1, 2):
        (root / MODEL / str(version)).mkdir()
        (root / MODEL / str(version) / "model.py").write_text(DOUBLING_PY)
    return root


def test_a_killed_canary_resumes_at_its_step_or_falls_back_to_the_champion(repository: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Server(repository, data_dir, tmp_path / "first.log")
    try:
        first.wait_ready()
        assert first.rollout()["step"]["index"] == 0
        versions = {first.infer(f"user-{i}", float(i))["model_version"] for i in range(80)}
        assert versions == {"1", "2"}
        # The server's periodic tick sees step 0's requests and moves to step 1, which holds.
        wait_for(lambda: first.rollout()["step"]["index"] == 1, "the canary to reach step 1", first.process)
        first.kill()
    finally:
        first.stop()

    second = Server(repository, data_dir, tmp_path / "second.log")
    try:
        second.wait_ready()
        document = second.rollout()
        assert (document["state"], document["step"]["index"], document["restore"]["outcome"]) == ("running", 1, "resumed")
        assert document["weights"] == {"1": 50.0, "2": 50.0}
        answers = [second.infer(f"user-{i}", float(i)) for i in range(40)]
        assert {a["model_version"] for a in answers} == {"1", "2"}
        assert all(a["parameters"]["rollout"] == "scorer-canary" for a in answers)
        second.kill()
    finally:
        second.stop()

    shutil.rmtree(repository / MODEL / "2")  # the challenger is gone when the server comes back
    third = Server(repository, data_dir, tmp_path / "third.log")
    try:
        third.wait_ready()
        document = third.rollout()
        assert (document["state"], document["serving_version"], document["restore"]["outcome"]) == ("aborted", 1, "fallback")
        assert "2" in document["restore"]["reason"] and "no longer served" in document["restore"]["reason"]
        answers = [third.infer(f"user-{i}", float(i)) for i in range(40)]
        assert {a["model_version"] for a in answers} == {"1"}
        traffic = third.rollout()["traffic"]
        assert traffic["fallbacks"] == 0
        assert [(row["version"], row["count"]) for row in traffic["requests"]] == [(1, 40)]
        status, log = third.request("GET", f"/v2/models/{MODEL}/rollout/decisions")
        actions = [record["action"] for record in log["decisions"]]
        assert actions[0] == "start" and "advance" in actions and actions[-1] == "fallback"
    finally:
        third.stop()
