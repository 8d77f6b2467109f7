"""Does MLPerf's LoadGen find the capacity Conveyor's own generator finds? (`conveyor bench --mlperf`'s 5% claim)

On one target and one p99 objective, compares the highest server-scenario rate whose p99
meets the objective with under 0.1% of queries failed, as found with the native generator
and with LoadGen sending and timing every trial (conveyor.profile.mlperf), two ways:

- searches: pairs of find-peak searches (the bench's bracket-and-bisect, the same start,
  precision, trial length and criterion for both), the order swapped every pair;
- --grid-steps N: both generators at the same N rates around the searches' capacities,
  interleaved trial by trial (order swapped per rate and sweep), so both meet the same
  machine; per generator the median p99 per rate and the capacity it implies. On a shared
  machine whose speed drifts between searches this is the fairer comparison.

Prints the capacities and their ratios (LoadGen / native) and writes everything, with
LoadGen's logs, under --out.

    python bench/mlperf_agreement.py mlp --slo-p99-ms 2                  # in-process
    python bench/mlperf_agreement.py mlp --slo-p99-ms 5 --serve          # over HTTP, a `conveyor serve` it starts
    python bench/mlperf_agreement.py mlp --slo-p99-ms 5 --url http://127.0.0.1:8000
    python bench/mlperf_agreement.py mlp --hidden 2048 --slo-p99-ms 20 --serve   # a heavier mlp (64-2048-2048-10)

Both generators must outrun the target for the capacities to be the target's: the native
one does 200k+ queries/s in-process, LoadGen's Python path (its binding's issue callback,
about 15 us of CPU per query, then this package's senders) some tens of thousands per
second in-process and about 5k/s over HTTP on 2 vCPUs (--loadgen-ceiling measures
LoadGen alone). Where generator and target share the cores, the generator's CPU per query
also comes out of the target's capacity. --hidden N measures the example mlp rebuilt with
N-wide hidden layers, a model slow enough for both.

A benchmark, not a test: it reports, it never fails on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import socket
import statistics
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
    p.add_argument("--grid-steps", type=int, default=0, help="then both generators at this many rates around "
                   "the searches' capacities, interleaved trial by trial (default 0: no grid)")
    p.add_argument("--grid-span", type=float, default=0.3, help="the grid spans this share either side (default 0.3)")
    p.add_argument("--grid-sweeps", type=int, default=2, help="passes over the grid, up then down (default 2)")
    p.add_argument("--loadgen-ceiling", action="store_true", help="only measure LoadGen's own ceiling: its "
                   "find-peak against a system that answers at once (MODEL is not used)")
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


class Generators:
    """The two generators on one opened target: a server-scenario trial at a rate, and a find-peak search, each."""

    def __init__(self, args: argparse.Namespace, driver: Any, senders: Any, sample_count: int, settings: Any,
                 out: Path) -> None:  # fmt: skip
        self.args, self.driver, self.senders, self.sample_count, self.out = args, driver, senders, sample_count, out
        self.settings = settings
        self.official = mlperf.MlperfSettings(scenario="server", min_duration_s=args.duration_s,
                                              min_queries=settings.queries, target_qps=settings.target_qps,
                                              latency_bound_ms=args.slo_p99_ms)  # fmt: skip
        self.trials = 0

    def trial(self, which: str, rate: float, seed: int) -> dict[str, Any]:
        """One server-scenario run at `rate`: its p99 (from the scheduled times) and error rate."""
        self.trials += 1
        if which == "native":
            measured = scenarios.run_open(self.driver, rate, self.args.duration_s, self.settings.queries, seed)
            return {"p99_ms": measured.percentile_ms(0.99), "p50_ms": measured.percentile_ms(0.5),
                    "error_rate": measured.error_rate,
                    "achieved_qps": measured.queries / measured.duration_s}  # fmt: skip
        result = mlperf.run_loadgen(self.senders, self.sample_count, replace(self.official, target_qps=rate, seed=seed),
                                    self.out / "grid" / f"{self.trials:03d}-{rate:.0f}qps")  # fmt: skip
        return {"p99_ms": result["latency_ms"].get("p99"), "p50_ms": result["latency_ms"].get("p50"),
                "error_rate": result["error_rate"],
                "achieved_qps": result["completed_qps"], "loadgen_result": result["result"]}  # fmt: skip

    def search(self, which: str, seed: int, start: float) -> dict[str, Any]:
        """One find-peak search (the bench's, or the same with LoadGen timing each trial)."""
        if which == "native":
            peak = scenarios.find_peak(self.driver, replace(self.settings, seed=seed, target_qps=start)).peak or {}
            return {"capacity_qps": peak.get("capacity_qps"), "trials": peak.get("trials", [])}
        block = mlperf.mlperf_find_peak(self.senders, self.sample_count, replace(self.official, seed=seed),
                                        self.out / f"search{seed}", start_qps=start,
                                        precision=self.args.precision)  # fmt: skip
        return {"capacity_qps": block["capacity_qps"], "trials": block["trials"],
                "highest_valid_qps": block["highest_valid_qps"]}  # fmt: skip


def alternating_searches(generators: Generators, start: float, pairs: int) -> list[dict[str, Any]]:
    """`pairs` pairs of find-peak searches, the order swapped every pair; each pair's capacity ratio."""
    found_pairs = []
    for pair in range(pairs):
        found: dict[str, Any] = {}
        for which in ("native", "mlperf") if pair % 2 == 0 else ("mlperf", "native"):
            began = time.monotonic()
            found[which] = generators.search(which, pair, start)
            found[which]["seconds"] = time.monotonic() - began
        native, loadgen = found["native"]["capacity_qps"], found["mlperf"]["capacity_qps"]
        found["ratio"] = loadgen / native if native and loadgen else None
        found_pairs.append(found)
        print(f"search pair {pair + 1}: native {native or math.nan:.1f} queries/s, LoadGen {loadgen or math.nan:.1f} "
              f"queries/s, ratio {found['ratio'] or math.nan:.3f}", flush=True)  # fmt: skip
    return found_pairs


def interleaved_grid(generators: Generators, centre: float, steps: int, span: float, sweeps: int) -> dict[str, Any]:
    """Both generators at the same rates, trial by trial (order swapped per rate and sweep), so both see the
    same machine: per generator the median p99 per rate, and the capacity: the highest rate up to which every
    rate's median p99 meets the objective with errors under 0.1%."""
    rates = [centre * (1 - span + 2 * span * k / (steps - 1)) for k in range(steps)]
    seen: dict[str, dict[float, list[dict[str, Any]]]] = {"native": {}, "mlperf": {}}
    for sweep in range(sweeps):
        for k, rate in enumerate(rates if sweep % 2 == 0 else rates[::-1]):
            for which in ("native", "mlperf") if (k + sweep) % 2 == 0 else ("mlperf", "native"):
                seen[which].setdefault(rate, []).append(generators.trial(which, rate, seed=sweep))
        print(f"grid sweep {sweep + 1} of {sweeps} done", flush=True)
    curves: dict[str, Any] = {}
    for which, by_rate in seen.items():
        rows = []
        for rate in rates:
            p99s = sorted(t["p99_ms"] if t["p99_ms"] is not None else math.inf for t in by_rate[rate])
            median = p99s[len(p99s) // 2] if len(p99s) % 2 else (p99s[len(p99s) // 2 - 1] + p99s[len(p99s) // 2]) / 2
            errors = max(t["error_rate"] for t in by_rate[rate])
            rows.append({"rate_qps": rate, "median_p99_ms": median, "max_error_rate": errors,
                         "passed": median <= generators.args.slo_p99_ms and errors <= scenarios.MAX_ERROR_RATE,
                         "trials": by_rate[rate]})  # fmt: skip
        capacity = None
        for row in rows:
            if not row["passed"]:
                break
            capacity = row["rate_qps"]
        curves[which] = {"capacity_qps": capacity, "rates": rows}
    native, loadgen = curves["native"]["capacity_qps"], curves["mlperf"]["capacity_qps"]
    curves["ratio"] = loadgen / native if native and loadgen else None
    curves["resolution"] = 2 * span / (steps - 1)
    return curves


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
        generators = Generators(args, driver, senders, len(samples), settings, out)
        pairs = alternating_searches(generators, start, args.pairs)
        grid = None
        if args.grid_steps:
            found = [p[w]["capacity_qps"] for p in pairs for w in ("native", "mlperf") if p[w]["capacity_qps"]]
            centre = statistics.median(found) if found else start
            grid = interleaved_grid(generators, centre, args.grid_steps, args.grid_span, args.grid_sweeps)
            print(f"grid: native {grid['native']['capacity_qps'] or math.nan:.1f} queries/s, LoadGen "
                  f"{grid['mlperf']['capacity_qps'] or math.nan:.1f} queries/s, ratio {grid['ratio'] or math.nan:.3f} "
                  f"(rates {grid['resolution']:.0%} apart)", flush=True)  # fmt: skip
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    stats = summarize_repetitions(ratios)
    return {"model": args.model, "target": url or "in-process", "slo_p99_ms": args.slo_p99_ms, "start_qps": start,
            "trial_duration_s": args.duration_s, "precision": args.precision, "pairs": pairs,
            "ratio_mean": stats.mean, "ratio_ci95": stats.ci95, "grid": grid,
            "loadgen_version": mlperf.loadgen_version(), "command": sys.argv}  # fmt: skip


class AnswerAtOnce:
    """A system under test that answers every query as it is issued: LoadGen's own ceiling through Python."""

    def __init__(self, complete: Any) -> None:
        self.complete = complete

    def send(self, query_ids: Any, sample_indices: Any) -> None:
        self.complete(list(query_ids), None)

    def close(self) -> None:
        pass


def loadgen_ceiling(args: argparse.Namespace, out: Path) -> int:
    """The highest Server rate LoadGen sustains under the objective when nothing is measured but itself."""
    settings = mlperf.MlperfSettings(scenario="server", min_duration_s=args.duration_s, min_queries=662,
                                     target_qps=args.start_qps or 10_000, latency_bound_ms=args.slo_p99_ms)  # fmt: skip
    found = [mlperf.mlperf_find_peak(AnswerAtOnce, 64, replace(settings, seed=i), out / f"ceiling{i}",
                                     start_qps=settings.target_qps or 10_000, precision=args.precision)["capacity_qps"]
             for i in range(args.pairs)]  # fmt: skip
    (out / "ceiling.json").write_text(json.dumps({"capacity_qps": found, "slo_p99_ms": args.slo_p99_ms,
                                                  "command": sys.argv}, indent=2) + "\n")  # fmt: skip
    print(f"LoadGen answering at once (its Python binding alone), p99 <= {args.slo_p99_ms:g} ms: "
          + ", ".join(f"{c or math.nan:.0f}" for c in found) + " queries/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mlperf.import_loadgen()
    out = args.out or Path(tempfile.mkdtemp(prefix="mlperf-agreement-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.loadgen_ceiling:
        return loadgen_ceiling(args, out)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-mlperf-agreement-")))
        repository = model_repository(args, work)
        url = stack.enter_context(served(args.model, repository, work)) if args.serve else args.url
        report = measure(args, url, repository, out)
    report["hidden"] = args.hidden
    (out / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    interval = report["ratio_ci95"]
    print(f"{report['model']} ({report['target']}), p99 <= {args.slo_p99_ms:g} ms: LoadGen / native capacity (searches) = "
          f"{report['ratio_mean']:.3f}" + (f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else "")
          + f"; details in {out / 'agreement.json'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
