"""Does MLPerf's LoadGen find the capacity Conveyor's own generator finds? (`conveyor bench --mlperf`'s 5% claim)

On one target and one p99 objective, alternates two searches for the highest server-scenario
rate whose p99 meets the objective with under 0.1% of queries failed: the bench's find-peak
with the native generator, and the same search with LoadGen sending and timing every trial
(conveyor.profile.mlperf.mlperf_find_peak). Both start at the same rate and use the same
bracket, precision, trial length and criterion, so only the generator differs. Prints each
pair's capacities, their ratio (LoadGen / native), the mean ratio with its 95% interval,
and writes everything (with LoadGen's logs) under --out.

    python bench/mlperf_agreement.py mlp --slo-p99-ms 2                  # in-process
    python bench/mlperf_agreement.py mlp --slo-p99-ms 5 --serve          # over HTTP, a `conveyor serve` it starts
    python bench/mlperf_agreement.py mlp --slo-p99-ms 5 --url http://127.0.0.1:8000
    python bench/mlperf_agreement.py mlp --hidden 2048 --slo-p99-ms 20 --serve   # a heavier mlp (64-2048-2048-10)

Both generators must outrun the target for the capacities to be the target's: the native
one does up to ~100k/s, LoadGen's Python path (its binding's issue callback, then this
package's senders) a few thousand per second over HTTP and a few tens of thousands
in-process on 2 vCPUs. --hidden N measures the example mlp rebuilt with N-wide hidden
layers, a model slow enough for both.

A benchmark, not a test: it reports, it never fails on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from conveyor.profile import bench_cli, mlperf, scenarios
from conveyor.profile.statistics import summarize_repetitions


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an example model (examples/models) or, with --url, the served model's name")
    p.add_argument("--slo-p99-ms", type=float, required=True, help="the p99 objective both searches use")
    p.add_argument("--url", help="a KServe v2 HTTP server to measure instead of the in-process model")
    p.add_argument("--serve", action="store_true", help="start `conveyor serve` of the example model and measure it")
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs of searches (default 3)")
    p.add_argument("--duration-s", type=float, default=2.0, help="each trial's minimum duration (default 2)")
    p.add_argument("--precision", type=float, default=0.02, help="searches stop within this share (default 0.02)")
    p.add_argument("--start-qps", type=float, help="where both searches start (default: half an offline burst's rate)")
    p.add_argument("--connections", type=int, default=16, help="HTTP connections of either generator (default 16)")
    p.add_argument("--hidden", type=int, help="rebuild the example mlp with hidden layers this wide (a slower model)")
    p.add_argument("--out", type=Path, help="where to write agreement.json and LoadGen's logs (default: a temp dir)")
    return p.parse_args(argv)


def model_repository(args: argparse.Namespace, work: Path) -> Path:
    """The example models, or a repository of just the model with --hidden N: mlp's layers made N wide."""
    if args.hidden is None:
        return ROOT / "examples" / "models"
    if args.model != "mlp":
        raise SystemExit("--hidden rebuilds the example mlp: pass mlp as the model")
    sys.path.insert(0, str(ROOT / "examples"))
    import make_models
    from onnx import helper

    rng = np.random.default_rng(make_models.SEED)
    widths = [64, args.hidden, args.hidden, 10]
    nodes, weights, inputs = [], [], "x"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        gemm, initializers = make_models._gemm_layer(rng, f"fc{layer}", fan_in, fan_out, inputs, f"h{layer}")
        nodes.append(gemm)
        weights += initializers
        inputs = f"h{layer}"
        if layer < len(widths) - 1:
            nodes.append(helper.make_node("Relu", [inputs], [f"a{layer}"], name=f"relu{layer}"))
            inputs = f"a{layer}"
    nodes.append(helper.make_node("Softmax", [inputs], ["probs"], axis=-1, name="softmax"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["batch", 64])],
                              [helper.make_tensor_value_info("probs", 1, ["batch", 10])], initializer=weights)  # fmt: skip
    repository = work / "models"
    shutil.copytree(ROOT / "examples" / "models" / "mlp", repository / "mlp")
    make_models.model_path(repository, "mlp").write_bytes(make_models.serialize(graph))
    return repository


def bench_args(args: argparse.Namespace, url: str | None, repository: Path) -> argparse.Namespace:
    """The bench's own flags for this target: its target-opening and sample functions are reused as they are."""
    parser = argparse.ArgumentParser()
    bench_cli.register_bench_commands(parser.add_subparsers())
    flags = ["bench", args.model, "--repository", str(repository), "--find-peak",
             "--slo-p99-ms", str(args.slo_p99_ms), "--duration-s", str(args.duration_s), "--repetitions", "1",
             "--peak-precision", str(args.precision), "--connections", str(args.connections)]  # fmt: skip
    if url:
        flags += ["--url", url]
    return parser.parse_args(flags)


@contextlib.contextmanager
def served(model: str, repository: Path, work: Path) -> Any:
    """`conveyor serve` of one model of `repository` on a free port, in a subprocess; yields its URL."""
    if not (work / "models" / model).exists():
        shutil.copytree(repository / model, work / "models" / model)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PYTHONPATH": str(ROOT / "python")}
    command = [sys.executable, "-m", "conveyor", "serve", str(work / "models"), "--http-port", str(port),
               "--grpc-port", "0", "--data-dir", str(work / "data"), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=1).close()
                break
            if server.poll() is not None:
                raise SystemExit(f"conveyor serve exited with {server.returncode}")
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(args: argparse.Namespace, url: str | None, repository: Path, out: Path) -> dict[str, Any]:
    options = bench_args(args, url, repository)
    with contextlib.ExitStack() as stack:
        target = bench_cli.open_target(options, stack)
        samples, _ = bench_cli.load_samples(options, target.signature)
        driver = bench_cli.make_driver(target, samples, options)
        stack.callback(driver.close)
        settings = bench_cli.scenario_settings(options)
        start = args.start_qps or scenarios.start_rate(driver, settings)
        settings = replace(settings, target_qps=start, warmup_s=0.0)
        scenarios.warm_up(driver, replace(settings, warmup_s=2.0), start)
        senders = mlperf.sender_factory(target.kind, samples, model=target.model, version=target.version,
                                        runtime=target.runtime, url=target.url, connections=args.connections)  # fmt: skip
        official = mlperf.MlperfSettings(scenario="server", min_duration_s=args.duration_s, min_queries=settings.queries,
                                         target_qps=start, latency_bound_ms=args.slo_p99_ms)  # fmt: skip
        pairs = []
        for pair in range(args.pairs):
            found: dict[str, Any] = {}
            for which in (("native", "mlperf") if pair % 2 == 0 else ("mlperf", "native")):
                began = time.monotonic()
                if which == "native":
                    peak = scenarios.find_peak(driver, replace(settings, seed=pair)).peak or {}
                    found["native"] = {"capacity_qps": peak.get("capacity_qps"), "trials": len(peak.get("trials", []))}
                else:
                    block = mlperf.mlperf_find_peak(senders, len(samples), replace(official, seed=pair),
                                                    out / f"pair{pair}", start_qps=start, precision=args.precision)  # fmt: skip
                    found["mlperf"] = {"capacity_qps": block["capacity_qps"], "trials": len(block["trials"]),
                                       "highest_valid_qps": block["highest_valid_qps"]}  # fmt: skip
                found[which]["seconds"] = time.monotonic() - began
            native, loadgen = found["native"]["capacity_qps"], found["mlperf"]["capacity_qps"]
            found["ratio"] = loadgen / native if native and loadgen else None
            pairs.append(found)
            print(f"pair {pair + 1}: native {native or float('nan'):.1f} queries/s, LoadGen "
                  f"{loadgen or float('nan'):.1f} queries/s, ratio {found['ratio'] or float('nan'):.3f}", flush=True)
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    stats = summarize_repetitions(ratios)
    return {"model": args.model, "target": url or "in-process", "slo_p99_ms": args.slo_p99_ms, "start_qps": start,
            "trial_duration_s": args.duration_s, "precision": args.precision, "pairs": pairs,
            "ratio_mean": stats.mean, "ratio_ci95": stats.ci95, "loadgen_version": mlperf.loadgen_version(),
            "command": sys.argv}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mlperf.import_loadgen()
    out = args.out or Path(tempfile.mkdtemp(prefix="mlperf-agreement-"))
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-mlperf-agreement-")))
        repository = model_repository(args, work)
        url = stack.enter_context(served(args.model, repository, work)) if args.serve else args.url
        report = measure(args, url, repository, out)
    report["hidden"] = args.hidden
    (out / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    interval = report["ratio_ci95"]
    print(f"{report['model']} ({report['target']}), p99 <= {args.slo_p99_ms:g} ms: LoadGen / native capacity = "
          f"{report['ratio_mean']:.3f}" + (f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else "")
          + f"; details in {out / 'agreement.json'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
