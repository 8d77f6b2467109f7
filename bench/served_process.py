"""`conveyor serve` as a child process for the bench scripts that load a server over the network.

Started in a session of its own (so its whole process group can be stopped), optionally
pinned to chosen CPUs (the load generator takes the others), with the in-tree build when
there is one; and the latency summary both scripts print. Used by reload_under_load.py
and overload.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.profile.statistics import latency_summary_ms

SOURCE = Path(__file__).resolve().parents[1] / "python"
READY_TIMEOUT_S = 60.0


def latency_report(latency_ns: np.ndarray) -> dict[str, float]:
    """Count, p50, p99 and max in ms (conveyor's own latency summary, rounded)."""
    if len(latency_ns) == 0:
        return {"count": 0}
    summary = latency_summary_ms(np.asarray(latency_ns))
    return {"count": len(latency_ns), **{f"{key}_ms": round(summary[key], 2) for key in ("p50", "p99", "max")}}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(cpu: int) -> set[int] | None:
    """The CPU set of a --server-cpu flag: None (no pinning) when it is negative."""
    return None if cpu < 0 else {cpu}


def pin_to(cpus: set[int]) -> None:
    """Run this process (the load generator) on `cpus` only, where the machine has them."""
    usable = cpus & os.sched_getaffinity(0)
    if usable:
        os.sched_setaffinity(0, usable)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to a server started in a session of its own, SIGKILL after 30 s, then reaped."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


class ServedProcess:
    """One `conveyor serve` on free ports; `stop()` ends its process group."""

    def __init__(self, repository: Path, log_path: Path, *args: str, cpus: set[int] | None = None) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        if any((SOURCE / "conveyor").glob("_core*.so")):
            env["PYTHONPATH"] = f"{SOURCE}{os.pathsep}{env.get('PYTHONPATH', '')}"
        command = [
            sys.executable, "-m", "conveyor", "serve", str(repository), "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port), "--data-dir", str(log_path.parent / "data"), *args,
        ]  # fmt: skip
        usable = (cpus or set()) & os.sched_getaffinity(0)
        if usable and shutil.which("taskset"):
            command = ["taskset", "-c", ",".join(map(str, sorted(usable))), *command]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.status("/v2/health/ready") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"conveyor serve did not become ready; see {log_path}")
            time.sleep(0.1)

    def request(self, method: str, path: str, document: Any = None, timeout_s: float = 60.0) -> tuple[int, Any]:
        """(status, decoded JSON body) of one request on a fresh connection."""
        data = None if document is None else json.dumps(document).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def status(self, path: str) -> int | None:
        """The status of GET `path`, or None while nothing answers."""
        try:
            return self.request("GET", path, timeout_s=5.0)[0]
        except OSError:
            return None

    def rss_bytes(self) -> int:
        """The server's resident set size (the Python process, not the taskset wrapper it replaced)."""
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (user + system, all its threads)."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process_group(self.process)
