#!/usr/bin/env python3
"""Conveyor's model graphs against Triton's ensemble and BLS, the same load over gRPC.

    PYTHONPATH=python python bench/graph_peers.py --triton-venv $PEERS/venv-graph

Both servers serve the models of bench/bench_graph.py (`build_repository`):
- Conveyor (`conveyor serve`): a, b, cheap, expensive on the native backend; `pipe` and
  `cascade` as [graph] models.
- Triton: the tritonserver binary bundled in the nvidia-pytriton wheel (PyTriton itself
  serves Python callables only: it has no way to declare an ensemble, so its server is run
  directly on a model repository written here). That bundle carries the python backend
  alone (no onnxruntime backend), so a, b, cheap and expensive are python-backend models
  running the same ONNX files with onnxruntime (one intra-op thread, dynamic batching,
  one instance); `pipe` is an ensemble (a -> b), `cascade` a BLS model (cheap, numpy mask,
  a BLS request to expensive on the unsure rows, numpy scatter).

The steps' backends differ (C++ kernels against onnxruntime behind the python backend), so
the figures to compare across servers are each server's own ratios: the graph (ensemble,
BLS) against the client calling the steps back to back over the network, and the cascade
against every row sent to `expensive`. Absolute rates are printed beside them.

The Triton venv needs nvidia-pytriton, onnxruntime and numpy < 2 (the bundled python-backend
stub answers empty tensors with numpy 2):
    python -m venv $PEERS/venv-graph && $PEERS/venv-graph/bin/pip install nvidia-pytriton onnxruntime 'numpy<2'
The load generator is tritonclient's gRPC asyncio client, in this interpreter, against both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graph import build_repository  # noqa: E402
from served_process import ServedProcess, free_port, stop_process_group  # noqa: E402

STEP_MODEL = '''
import sys
sys.path.insert(0, {site!r})  # the venv's numpy < 2 and onnxruntime before the interpreter's own
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession({onnx!r}, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        y = self.session.run(None, {{"x": np.concatenate(xs)}})[0]
        out, at = [], 0
        for x in xs:
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y[at : at + len(x)].copy())]))
            at += len(x)
        return out
'''

CASCADE_BLS = '''
import sys
sys.path.insert(0, {site!r})
import numpy as np
import triton_python_backend_utils as pb_utils

THRESHOLD = {threshold!r}


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            cheap = pb_utils.InferenceRequest(
                model_name="cheap", requested_output_names=["y"], inputs=[pb_utils.Tensor("x", x)]
            ).exec()
            if cheap.has_error():
                raise pb_utils.TritonModelException(cheap.error().message())
            probs = pb_utils.get_output_tensor_by_name(cheap, "y").as_numpy().copy()
            unsure = probs.max(axis=1) < THRESHOLD
            if unsure.any():
                expensive = pb_utils.InferenceRequest(
                    model_name="expensive", requested_output_names=["y"],
                    inputs=[pb_utils.Tensor("x", np.ascontiguousarray(x[unsure]))],
                ).exec()
                if expensive.has_error():
                    raise pb_utils.TritonModelException(expensive.error().message())
                probs[unsure] = pb_utils.get_output_tensor_by_name(expensive, "y").as_numpy()
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", probs)]))
        return answers
'''


def _config(name: str, dims_out: int, *, backend: str = "python", batching: bool = True) -> str:
    return textwrap.dedent(f"""
        name: "{name}"
        backend: "{backend}"
        max_batch_size: 64
        input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 64 ] }} ]
        output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dims_out} ] }} ]
        {"dynamic_batching { }" if batching else ""}
        instance_group [ {{ count: 1 kind: KIND_CPU }} ]
    """)


def triton_repository(repo: Path, models: Path, threshold: float, site: str) -> None:
    for name, dims_out in (("a", 64), ("b", 10), ("cheap", 10), ("expensive", 10)):
        (repo / name / "1").mkdir(parents=True)
        onnx_path = str(models / name / "1" / "model.onnx")
        (repo / name / "1" / "model.py").write_text(STEP_MODEL.format(site=site, onnx=onnx_path))
        (repo / name / "config.pbtxt").write_text(_config(name, dims_out))
    (repo / "pipe" / "1").mkdir(parents=True)
    (repo / "pipe" / "config.pbtxt").write_text(textwrap.dedent("""
        name: "pipe"
        platform: "ensemble"
        max_batch_size: 64
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 64 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
        ensemble_scheduling { step [
          { model_name: "a" model_version: -1 input_map { key: "x" value: "x" } output_map { key: "y" value: "h" } },
          { model_name: "b" model_version: -1 input_map { key: "x" value: "h" } output_map { key: "y" value: "y" } }
        ] }
    """))
    (repo / "cascade" / "1").mkdir(parents=True)
    (repo / "cascade" / "1" / "model.py").write_text(CASCADE_BLS.format(site=site, threshold=threshold))
    # No dynamic batching for the BLS model: each request's rows go to cheap as they come (and
    # cheap batches them); an instance count of 4 lets requests overlap their BLS waits.
    (repo / "cascade" / "config.pbtxt").write_text(
        _config("cascade", 10, batching=False).replace("count: 1", "count: 4")
    )


class TritonProcess:
    def __init__(self, venv: Path, repo: Path, log_path: Path) -> None:
        site = next((venv / "lib").glob("python3*/site-packages"))
        dist = site / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        server = log_path.parent / "tritonserver"
        subprocess.run(["cp", "-r", str(dist), str(server)], check=True)
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        subprocess.run(["cp", str(stub), str(server / "backends" / "python")], check=True)
        import sysconfig

        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = f"{site / 'nvidia_pytriton.libs'}:{sysconfig.get_config_var('LIBDIR')}"
        self.http_port, self.grpc_port, metrics = free_port(), free_port(), free_port()
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(server / "bin" / "tritonserver"), "--model-repository", str(repo),
                 "--backend-directory", str(server / "backends"), "--http-port", str(self.http_port),
                 "--grpc-port", str(self.grpc_port), "--metrics-port", str(metrics)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"tritonserver did not become ready; see {log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process_group(self.process)


async def _drive(url: str, kind: str, requests: list[np.ndarray], threshold: float, callers: int, seconds: float) -> float:
    """Requests per second of `kind` over gRPC with `callers` in flight for `seconds`."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)

    async def infer(model: str, x: np.ndarray) -> np.ndarray:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = await client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("y")])
        return answer.as_numpy("y")

    async def once(x: np.ndarray) -> None:
        if kind in ("pipe", "cascade", "expensive"):
            await infer(kind, x)
        elif kind == "pipe_back_to_back":
            await infer("b", await infer("a", x))
        elif kind == "cascade_client":  # the cascade as client code between two served models
            probs = (await infer("cheap", x)).copy()
            unsure = probs.max(axis=1) < threshold
            if unsure.any():
                probs[unsure] = await infer("expensive", np.ascontiguousarray(x[unsure]))
        else:
            raise ValueError(kind)

    for k in range(callers):  # warm up every connection and step
        await once(requests[k % len(requests)])
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop_at:
            await once(requests[i % len(requests)])
            done += 1
            i += callers

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    rate = done / (time.perf_counter() - start)
    await client.close()
    return rate


async def _answer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    answer = (await client.infer(model, [tensor])).as_numpy("y")
    await client.close()
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-venv", type=Path, required=True, help="venv with nvidia-pytriton, onnxruntime, numpy<2")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are printed")
    parser.add_argument("--pipeline-rows", type=int, default=1)
    parser.add_argument("--cascade-rows", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="graph_peers_") as tmp:
        work = Path(tmp)
        rows, threshold, stop = build_repository(work / "conveyor")
        site = str(next((args.triton_venv / "lib").glob("python3*/site-packages")))
        triton_repository(work / "triton", work / "conveyor", threshold, site)
        print(f"cascade threshold {threshold:.6f}: {stop:.1%} of the generated rows stop at cheap")
        conveyor = ServedProcess(work / "conveyor", work / "conveyor.log")
        try:
            triton = TritonProcess(args.triton_venv, work / "triton", work / "triton.log")
        except BaseException:
            conveyor.stop()
            raise
        try:
            pipe_requests = [rows[i : i + args.pipeline_rows] for i in range(0, 4096, args.pipeline_rows)][:256]
            cascade_requests = [rows[i : i + args.cascade_rows] for i in range(0, 4096, args.cascade_rows)]
            kinds = [
                ("pipe", pipe_requests), ("pipe_back_to_back", pipe_requests),
                ("cascade", cascade_requests), ("expensive", cascade_requests), ("cascade_client", cascade_requests),
            ]  # fmt: skip
            servers = {"conveyor": f"127.0.0.1:{conveyor.grpc_port}", "triton": f"127.0.0.1:{triton.grpc_port}"}
            for model, x in (("pipe", rows[:64]), ("cascade", rows[:64])):
                answers = [asyncio.run(_answer(url, model, x)) for url in servers.values()]
                close = np.isclose(answers[0], answers[1], rtol=1e-4, atol=1e-5).all(axis=1)
                print(f"{model}: the servers agree on {close.sum()} of {len(x)} rows "
                      f"(max difference {np.abs(answers[0] - answers[1]).max():.2g})")  # fmt: skip
            rates: dict[tuple[str, str], list[float]] = {}
            for round_ in range(args.rounds):
                for server, url in (servers.items() if round_ % 2 == 0 else reversed(servers.items())):
                    for kind, requests in kinds:
                        rate = asyncio.run(_drive(url, kind, requests, threshold, args.callers, args.seconds))
                        rates.setdefault((server, kind), []).append(rate)
            med = {key: float(np.median(values)) for key, values in rates.items()}
            print(f"{args.callers} gRPC callers, {args.pipeline_rows} row(s) per pipeline request, "
                  f"{args.cascade_rows} rows per cascade request; medians of {args.rounds} rounds of {args.seconds:g} s")  # fmt: skip
            for server in servers:
                p, bb = med[(server, "pipe")], med[(server, "pipe_back_to_back")]
                c, e, cc = med[(server, "cascade")], med[(server, "expensive")], med[(server, "cascade_client")]
                graph = "graph" if server == "conveyor" else "ensemble"
                bls = "graph" if server == "conveyor" else "BLS"
                print(f"{server}: pipeline {graph} {p:.0f} req/s, client back-to-back {bb:.0f} req/s: "
                      f"{graph}/back-to-back {p / bb:.2f}x")  # fmt: skip
                print(f"{server}: cascade {bls} {c * args.cascade_rows:.0f} rows/s, every row to expensive "
                      f"{e * args.cascade_rows:.0f} rows/s, cascade in client code {cc * args.cascade_rows:.0f} rows/s: "
                      f"{bls}/expensive-only {c / e:.2f}x, {bls}/client cascade {c / cc:.2f}x")  # fmt: skip
            print(f"conveyor/triton: pipeline {med[('conveyor', 'pipe')] / med[('triton', 'pipe')]:.2f}x, "
                  f"cascade {med[('conveyor', 'cascade')] / med[('triton', 'cascade')]:.2f}x "
                  "(different step backends: see the docstring)")  # fmt: skip
        finally:
            triton.stop()
            conveyor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
