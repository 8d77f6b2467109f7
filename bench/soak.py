"""Mixed load against a running `conveyor serve`, its RSS, fds and threads sampled, and a verdict.

Driven by bench/soak.sh, which starts the server (explicit model control) and passes its
ports, its process id and the models to load. At a fixed rate (--rate operations a second,
open loop) each operation is, by a seeded draw:
  85 %  a valid inference: HTTP JSON on a kept-alive connection, or gRPC ModelInfer (half each)
  10 %  a malformed request: HTTP bad JSON, wrong shape, unknown datatype, bad Content-Length,
        unknown model (each must get its 4xx), or gRPC wrong shape / unknown model (each must
        get INVALID_ARGUMENT / NOT_FOUND)
   5 %  a cancelled one: an HTTP connection closed half-way through its body or before its
        answer, or a gRPC call cancelled in flight
Beside it: one model reloaded a minute (POST /v2/repository/models/{m}/load, the models in
turn), /metrics scraped every second, and the server's process tree sampled every --sample-s
(RSS of the tree, fds and threads of the server). Each model gets the same share of the load.

Writes samples.csv and verdict.json to --out, prints the verdict, exits 1 when it fails:
memory growth over the second half (conveyor.profile.memory_growth: trimmed max - mean
under 16 MiB, slope under 1 MiB / 10 min), any unexpected outcome, or a server that is no
longer live at the end.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conveyor.profile.memory_growth import memory_growth

FEATURES = 16  # every model served here takes x FP32[16] and answers y FP32[16]
TIMEOUT_S = 30.0
# A kept-alive HTTP connection idle longer than this is reopened before its next request: the
# server closes one idle for 60 s (--idle-timeout-s), and a request written as it closes dies.
KEEP_ALIVE_REUSE_S = 30.0
MAX_IN_FLIGHT = 64  # beyond this an operation is counted as skipped, not queued: the load stays open loop
MALFORMED_SHARE, CANCELLED_SHARE = 0.10, 0.05


class Tally:
    """Operations by (kind, outcome); thread-safe. An outcome starting with "UNEXPECTED" is a failure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.failure_examples: list[str] = []

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        with self._lock:
            self.counts[(kind, outcome)] += 1
            if outcome.startswith("UNEXPECTED") and len(self.failure_examples) < 20:
                when = time.strftime("%H:%M:%S", time.gmtime())
                self.failure_examples.append(f"{when} {kind}: {outcome} {detail}"[:300])

    def failures(self) -> int:
        with self._lock:
            return sum(n for (_, outcome), n in self.counts.items() if outcome.startswith("UNEXPECTED"))


def _json_body(shape: list[int], datatype: str = "FP32") -> bytes:
    count = int(np.prod(shape))
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": [0.25] * count}]}
    ).encode()


def _raw_request(method: str, path: str, body: bytes, content_length: str | None = None) -> bytes:
    length = str(len(body)) if content_length is None else content_length
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n"
    return head.encode() + body


def _status_of(answer: bytes) -> int:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit() else -1


class Load:
    """The operations, each one function that records its own outcome."""

    def __init__(self, http_port: int, grpc_port: int, models: list[str], tally: Tally) -> None:
        self.http_port, self.models, self.tally = http_port, models, tally
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self._local = threading.local()

    # -- HTTP --------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        """This thread's kept-alive connection; a new one when it has none or has left it idle too long."""
        conn, now = getattr(self._local, "conn", None), time.monotonic()
        if conn is not None and now - self._local.used_at > KEEP_ALIVE_REUSE_S:
            conn.close()
            self.tally.add("http_keep_alive", "reopened after idling")
            conn = None
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=TIMEOUT_S)
        self._local.used_at = now
        return conn

    def http_infer(self, model: str) -> None:
        conn = self._connection()
        try:
            conn.request("POST", f"/v2/models/{model}/infer", _json_body([1, FEATURES]),
                         {"Content-Type": "application/json"})  # fmt: skip
            answer = conn.getresponse()
            body = answer.read()
            self._local.used_at = time.monotonic()
        except (OSError, http.client.HTTPException) as exc:
            self._local.conn = None
            conn.close()
            self.tally.add("http_infer", "UNEXPECTED error", repr(exc))
            return
        if answer.status != 200:
            self.tally.add("http_infer", f"UNEXPECTED {answer.status}", body[:200].decode(errors="replace"))
            return
        outputs = json.loads(body)["outputs"]
        ok = outputs[0]["name"] == "y" and outputs[0]["shape"] == [1, FEATURES]
        self.tally.add("http_infer", "ok" if ok else "UNEXPECTED answer", body[:200].decode(errors="replace"))

    def _exchange(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=TIMEOUT_S) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)

    def http_malformed(self, model: str, variant: int) -> None:
        path = f"/v2/models/{model}/infer"
        cases = [
            ("bad_json", _raw_request("POST", path, b'{"inputs": [{"name": "x", '), 400),
            ("wrong_shape", _raw_request("POST", path, _json_body([1, FEATURES - 1])), 400),
            ("bad_datatype", _raw_request("POST", path, _json_body([1, FEATURES], "FP33")), 400),
            ("bad_content_length", _raw_request("POST", path, b"{}", content_length="2x"), 400),
            ("unknown_model", _raw_request("POST", "/v2/models/no_such_model/infer", _json_body([1, FEATURES])), 404),
        ]
        name, data, expected = cases[variant % len(cases)]
        try:
            status = _status_of(self._exchange(data))
        except OSError as exc:
            self.tally.add(f"http_malformed_{name}", "UNEXPECTED error", repr(exc))
            return
        self.tally.add(f"http_malformed_{name}", f"{status}" if status == expected else f"UNEXPECTED {status}")

    def http_cancelled(self, model: str, variant: int) -> None:
        body = _json_body([1, FEATURES])
        data = _raw_request("POST", f"/v2/models/{model}/infer", body)
        # half the body then close, or all of it and close before the answer
        cut = len(data) - len(body) // 2 if variant % 2 == 0 else len(data)
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=TIMEOUT_S) as sock:
                sock.sendall(data[:cut])
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError as exc:
            self.tally.add("http_cancelled", "UNEXPECTED error", repr(exc))
            return
        self.tally.add("http_cancelled", "mid_body" if variant % 2 == 0 else "before_answer")

    # -- gRPC --------------------------------------------------------------------------
    def _grpc_request(self, model: str, features: int = FEATURES) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name="x", datatype="FP32")
        tensor.shape.extend([1, features])
        request.raw_input_contents.append(np.full(features, 0.25, dtype=np.float32).tobytes())
        return request

    def grpc_infer(self, model: str) -> None:
        try:
            answer = self.stub.ModelInfer(self._grpc_request(model), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            self.tally.add("grpc_infer", f"UNEXPECTED {exc.code().name}", exc.details() or "")
            return
        ok = answer.outputs[0].name == "y" and list(answer.outputs[0].shape) == [1, FEATURES]
        self.tally.add("grpc_infer", "ok" if ok else "UNEXPECTED answer", str(answer)[:200])

    def grpc_malformed(self, model: str, variant: int) -> None:
        if variant % 2 == 0:
            kind, request, expected = "grpc_malformed_wrong_shape", self._grpc_request(model, FEATURES - 1), "INVALID_ARGUMENT"
        else:
            kind, request, expected = "grpc_malformed_unknown_model", self._grpc_request("no_such_model"), "NOT_FOUND"
        try:
            self.stub.ModelInfer(request, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code().name
            self.tally.add(kind, code if code == expected else f"UNEXPECTED {code}", exc.details() or "")
            return
        self.tally.add(kind, "UNEXPECTED OK")

    def grpc_cancelled(self, model: str) -> None:
        call = self.stub.ModelInfer.future(self._grpc_request(model), timeout=TIMEOUT_S)
        call.cancel()
        try:
            call.result(timeout=TIMEOUT_S)
        except grpc.FutureCancelledError:
            self.tally.add("grpc_cancelled", "cancelled")
            return
        except grpc.RpcError as exc:
            code = exc.code().name
            self.tally.add("grpc_cancelled", code.lower() if code == "CANCELLED" else f"UNEXPECTED {code}")
            return
        self.tally.add("grpc_cancelled", "answered_before_cancel")

    # -- control and monitoring ----------------------------------------------------------
    def reload(self, model: str) -> None:
        try:
            status = _status_of(self._exchange(_raw_request("POST", f"/v2/repository/models/{model}/load", b"{}")))
        except OSError as exc:
            self.tally.add("reload", "UNEXPECTED error", repr(exc))
            return
        self.tally.add("reload", "200" if status == 200 else f"UNEXPECTED {status}")

    def scrape(self) -> None:
        try:
            answer = self._exchange(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
        except OSError as exc:
            self.tally.add("metrics", "UNEXPECTED error", repr(exc))
            return
        ok = _status_of(answer) == 200 and b"conveyor_requests_total" in answer
        self.tally.add("metrics", "200" if ok else f"UNEXPECTED {_status_of(answer)}")

    def live(self) -> bool:
        try:
            return _status_of(self._exchange(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")) == 200
        except OSError:
            return False

    def run_one(self, draw: float, model: str, variant: int) -> None:
        """The operation for a uniform draw in [0, 1): malformed, cancelled, else valid."""
        if draw < MALFORMED_SHARE:
            if variant % 3 == 2:
                self.grpc_malformed(model, variant // 3)
            else:
                self.http_malformed(model, variant // 3)
        elif draw < MALFORMED_SHARE + CANCELLED_SHARE:
            if variant % 2 == 0:
                self.http_cancelled(model, variant // 2)
            else:
                self.grpc_cancelled(model)
        elif variant % 2 == 0:
            self.http_infer(model)
        else:
            self.grpc_infer(model)


def sample_process(pid: int) -> dict[str, float]:
    """RSS of the server and its descendants (bytes), and the server's fds and threads."""
    server = psutil.Process(pid)
    rss = server.memory_info().rss
    for child in server.children(recursive=True):
        try:
            rss += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"rss_bytes": rss, "fds": server.num_fds(), "threads": server.num_threads()}


def run(args: argparse.Namespace) -> int:
    """Drive the load for --duration-s, sampling; write the outputs; return the exit status."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    load = Load(args.http_port, args.grpc_port, args.models, tally)
    rng = random.Random(args.seed)
    stop = threading.Event()
    samples: list[dict[str, float]] = []
    in_flight = threading.Semaphore(MAX_IN_FLIGHT)
    start = time.monotonic()

    def sampler() -> None:
        with open(out / "samples.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["t_s", "rss_bytes", "fds", "threads"])
            writer.writeheader()
            while True:
                sample = {"t_s": round(time.monotonic() - start, 3), **sample_process(args.pid)}
                samples.append(sample)
                writer.writerow(sample)
                handle.flush()
                if stop.wait(args.sample_s):
                    return

    def every(period_s: float, action, first_after_s: float) -> None:
        next_at = start + first_after_s
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            action()
            next_at += period_s

    reload_turn = iter(range(1 << 62))
    side = [
        threading.Thread(target=sampler, daemon=True),
        threading.Thread(target=every, args=(1.0, load.scrape, 1.0), daemon=True),
        threading.Thread(target=every, args=(args.reload_every_s,
                         lambda: load.reload(args.models[next(reload_turn) % len(args.models)]),
                         args.reload_every_s), daemon=True),
    ]
    for thread in side:
        thread.start()

    def one(draw: float, model: str, variant: int) -> None:
        try:
            load.run_one(draw, model, variant)
        except Exception as exc:  # a client-side surprise is a failure to report, not a crash of the run
            tally.add("client", "UNEXPECTED exception", repr(exc))
        finally:
            in_flight.release()

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        period_s, n = 1.0 / args.rate, 0
        while (now := time.monotonic()) < start + args.duration_s:
            due = start + n * period_s
            if due > now:
                time.sleep(due - now)
            draw, model, variant = rng.random(), args.models[n % len(args.models)], rng.randrange(1 << 30)
            n += 1
            if not in_flight.acquire(blocking=False):
                tally.add("scheduler", "skipped (too many in flight)")
                continue
            pool.submit(one, draw, model, variant)
        stop.set()
    for thread in side:
        thread.join(TIMEOUT_S)
    live = load.live()
    return report(args, out, samples, tally, live, time.monotonic() - start)


def report(args: argparse.Namespace, out: Path, samples: list[dict[str, float]], tally: Tally, live: bool,
           elapsed_s: float) -> int:  # fmt: skip
    """Print and write the verdict; the exit status (0 pass, 1 fail)."""
    growth = memory_growth([s["t_s"] for s in samples], [s["rss_bytes"] for s in samples])
    failures = tally.failures()
    rss_mib = [s["rss_bytes"] / 2**20 for s in samples]
    verdict = {
        "passed": growth.passed and failures == 0 and live,
        "memory": {"passed": growth.passed, "samples": len(samples), "second_half_samples": growth.samples_used,
                   "trimmed_max_minus_mean_mib": round(growth.spread_mib, 3),
                   "slope_mib_per_10_min": round(growth.slope_mib_per_10_min, 3),
                   "rss_mib_first_last_min_max": [round(v, 1) for v in (rss_mib[0], rss_mib[-1], min(rss_mib), max(rss_mib))]},
        "fds_min_max": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)],
        "threads_min_max": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
        "requests": {f"{kind} {outcome}": n for (kind, outcome), n in sorted(tally.counts.items())},
        "failures": failures, "failure_examples": tally.failure_examples, "live_at_end": live,
        "elapsed_s": round(elapsed_s, 1), "models": args.models, "rate_per_s": args.rate, "sample_s": args.sample_s,
    }  # fmt: skip
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(f"memory: {growth.describe()}")
    print(f"RSS MiB first/last/min/max: {verdict['memory']['rss_mib_first_last_min_max']}")
    print(f"fds min/max: {verdict['fds_min_max']}, threads min/max: {verdict['threads_min_max']}")
    for key, n in verdict["requests"].items():
        print(f"  {key}: {n}")
    print(f"failures: {failures}{' ' + json.dumps(tally.failure_examples) if failures else ''}; live at end: {live}")
    print(f"VERDICT: {'PASS' if verdict['passed'] else 'FAIL'} ({out / 'verdict.json'})")
    return 0 if verdict["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, required=True, help="the server's REST port")
    parser.add_argument("--grpc-port", type=int, required=True, help="the server's gRPC port")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (its tree is sampled)")
    parser.add_argument("--models", nargs="+", required=True, help="models to load (each takes x FP32[16])")
    parser.add_argument("--out", required=True, help="directory for samples.csv and verdict.json")
    parser.add_argument("--duration-s", type=float, default=1800.0, help="length of the load (default 1800)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--rate", type=float, default=20.0, help="operations a second, all kinds (default 20)")
    parser.add_argument("--reload-every-s", type=float, default=60.0, help="seconds between reloads (default 60)")
    parser.add_argument("--workers", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the operation draw (default 1)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
