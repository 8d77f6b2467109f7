"""Scaling out on Ray Serve: the example `mlp` through every way of serving it, in one run.

    PYTHONPATH=python python bench/ray_scaling.py --duration-s 10 --concurrency 64 --out ray_scaling.json

Targets, each driven by the same native load generator (conveyor.profile.loadgen,
HttpTarget: KServe v2 with binary tensors, keep-alive connections) from this process:
- `plain`: `conveyor serve` (explicit mode, `mlp` only), a subprocess;
- `serve-proxy`: Conveyor's Ray mode, ingress "serve": replicas behind Serve's HTTP proxy
  (`--grpc` adds Serve's gRPC proxy, with `plain-grpc` as its reference);
- `replica-ports`: Conveyor's Ray mode, ingress "replica": each replica's own HTTP server,
  the load split evenly over them by the client (one generator per replica, as an
  external round-robin balancer would);
- `ray-batch`: a plain Ray Serve deployment of the same ONNX file with `@serve.batch`
  (bench/ray_baseline.py) behind Serve's HTTP proxy;
each Ray target with 1 and with 2 replicas (one CPU reserved each).

Load: a closed loop of --concurrency requests in flight (a new one as each answers; its
latency is from its send), for --duration-s after a warm-up whose rate sizes the run;
`--rate R` adds a Poisson run at R queries/s per target (latency from the scheduled time).
`plain` is measured again before every Ray target (it stays up, idle in between), and each
target's ratio is against the `plain` measurement just before it; the report also gives the
per-replica efficiency, throughput(2 replicas) / (2 x throughput(1 replica)).

On a machine with fewer cores than replicas + proxy + client, the replicas share the CPUs,
so 2 replicas cannot double anything: read the efficiency as what the CPU sharing leaves,
and docs/scaling.md for the extrapolation to one replica per machine. Everything listens on
127.0.0.1 and is stopped at the end (Serve and Ray shut down, the subprocess killed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from conveyor.profile.loadgen import HttpTarget, LoadRun, poisson_schedule, run_open_loop
from conveyor.profile.statistics import latency_summary_ms
from served_process import ServedProcess, free_port

MODEL = "mlp"
PROBE_QUERIES = 300
WARMUP_S = 1.0


def samples(count: int = 256, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 64), dtype=np.float32)} for _ in range(count)]


# -- load ------------------------------------------------------------------------------


def _run_split(targets: list[Any], schedules: list[np.ndarray], in_flight: int) -> list[LoadRun]:
    """One generator thread per target (the native loop releases the GIL), all at once."""
    runs: list[Any] = [None] * len(targets)
    errors: list[Exception] = []

    def drive(i: int) -> None:
        try:
            runs[i] = run_open_loop(targets[i], schedules[i], max_outstanding=in_flight, timeout_s=30.0)
        except Exception as exc:  # noqa: BLE001 (reported after the join)
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return runs


def _summary(runs: list[LoadRun], closed: bool) -> dict[str, Any]:
    latency = []
    ok = errors = 0
    for run in runs:
        own = (run.completed_ns - run.sent_ns) if closed else run.latency_ns
        latency.append(own[run.ok])
        ok += int(run.ok.sum())
        errors += run.error_count
    duration_s = max(run.duration_ns for run in runs) / 1e9
    merged = np.concatenate(latency)
    stats = latency_summary_ms(merged) if len(merged) else {"p50": float("nan"), "p99": float("nan")}
    first_errors: dict[str, int] = {}
    for run in runs:
        for text, count in run.errors.items():
            first_errors[text] = first_errors.get(text, 0) + count
    return {
        "throughput_qps": round(ok / duration_s, 1) if duration_s > 0 else 0.0,
        "p50_ms": round(stats["p50"], 3), "p99_ms": round(stats["p99"], 3),
        "queries": sum(run.queries for run in runs), "ok": ok, "errors": errors,
        "error_kinds": dict(sorted(first_errors.items(), key=lambda kv: -kv[1])[:3]),
        "duration_s": round(duration_s, 2),
        "generator_overhead": round(max(run.generator_overhead for run in runs), 3),
    }  # fmt: skip


def measure(urls: list[str], args: argparse.Namespace, make_target: Any = None) -> dict[str, Any]:
    """Closed loop (and Poisson at --rate) against `urls`, the load split evenly over them."""
    parts = len(urls)
    in_flight = max(1, args.concurrency // parts)
    build = make_target or (lambda url: HttpTarget(url, MODEL, SAMPLES, connections=in_flight))
    targets = [build(url) for url in urls]
    try:
        # A short probe, then about a second of warm-up whose rate sizes the measured run.
        probe = _summary(_run_split(targets, [np.zeros(PROBE_QUERIES // parts, np.int64) for _ in urls], in_flight),
                         closed=True)  # fmt: skip
        warm_count = max(PROBE_QUERIES, int(probe["throughput_qps"] * WARMUP_S)) // parts
        warm = _summary(_run_split(targets, [np.zeros(warm_count, np.int64) for _ in urls], in_flight), closed=True)
        count = max(500, int(warm["throughput_qps"] * args.duration_s / parts))
        result = {"closed": _summary(_run_split(targets, [np.zeros(count, np.int64) for _ in urls], in_flight),
                                     closed=True)}  # fmt: skip
        if args.rate:
            per = args.rate / parts
            n = max(100, int(per * args.duration_s))
            schedules = [poisson_schedule(per, n, seed=args.seed + i) for i in range(parts)]
            result["poisson"] = _summary(_run_split(targets, schedules, 4096), closed=False)
            result["poisson"]["offered_qps"] = args.rate
        return result
    finally:
        for target in targets:
            target.close()


def grpc_target_factory(application: str | None) -> Any:
    """A GrpcTarget whose calls carry Serve's `application` metadata (the loadgen's own sends none)."""
    import itertools

    from conveyor.profile import loadgen

    def build(url: str) -> Any:
        target = loadgen.GrpcTarget(url, MODEL, SAMPLES, channels=4)
        if application is None:
            return target
        from conveyor import _core
        from conveyor.protocol.grpc import inference_pb2, inference_pb2_grpc

        requests = [loadgen.grpc_infer_request(inference_pb2, MODEL, None, t) for t in loadgen.wire_tensors(SAMPLES)]
        calls = itertools.cycle([inference_pb2_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in target._channels])
        in_flight_set: set[Any] = set()
        metadata = (("application", application),)

        def send(sample: int, ticket: Any) -> None:
            future = next(calls).future(requests[sample], metadata=metadata)
            in_flight_set.add(future)
            future.add_done_callback(loadgen._grpc_done(ticket, in_flight_set))

        target._native = _core.CallbackLoadTarget(send, len(requests), 0)
        return target

    return build


# -- Ray -------------------------------------------------------------------------------


def start_ray(http_port: int, grpc_port: int) -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from conveyor.scaleout.ray_apps import GRPC_SERVICER_FUNCTION
    from ray import serve
    from ray.serve.config import gRPCOptions

    # address="local": a cluster of this run's own, even where another one runs on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "python")}})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]))  # fmt: skip


def deploy_conveyor(ingress: str, replicas: int, data_dir: Path) -> list[str]:
    from conveyor.scaleout.ray_apps import SERVER_APP, deploy, plan_deployments

    plans = plan_deployments(ROOT / "examples" / "models", models=[MODEL], data_dir=data_dir, ingress=ingress,
                             host="127.0.0.1")  # fmt: skip
    plans = [dataclasses.replace(p, options={**p.options, "num_replicas": replicas}) for p in plans]
    deploy(plans, timeout_s=180)
    return [MODEL, SERVER_APP]


def replica_urls(replicas: int, timeout_s: float = 60.0) -> list[str]:
    import ray

    from conveyor.scaleout.ray_hub import hub_actor

    hub = hub_actor()
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in ray.get(hub.replicas.remote(MODEL)) if r.get("http_port")]
        if len(found) >= replicas:
            return [f"http://{r['host']}:{r['http_port']}" for r in sorted(found, key=lambda r: r["http_port"])]
        if time.monotonic() > deadline:
            raise SystemExit(f"the hub lists {len(found)} replicas with their own ports, expected {replicas}")
        time.sleep(0.5)


def deploy_baseline(replicas: int) -> list[str]:
    from ray import serve
    from ray_baseline import build_app

    app = build_app(str(ROOT / "examples" / "models" / MODEL / "1" / "model.onnx"), num_replicas=replicas)
    serve.run(app, name="mlp-plain", route_prefix=f"/v2/models/{MODEL}")
    return ["mlp-plain"]


def delete_apps(apps: list[str]) -> None:
    from ray import serve

    for app in apps:
        serve.delete(app, _blocking=True)


def wait_replica_count(app: str, replicas: int, timeout_s: float = 60.0) -> None:
    """Serve reports RUNNING once the first replicas run; wait until all of them do."""
    from conveyor.scaleout.ray_apps import running_replicas

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_replicas(app) >= replicas:
            return
        time.sleep(0.5)
    raise SystemExit(f"application {app}: fewer than {replicas} replicas running after {timeout_s:g} s")


# -- the run ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Targets and method: see the module docstring (bench/ray_scaling.py).")  # fmt: skip
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, closed loop (default 64)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="also a Poisson run at this many queries/s per target (default: none)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts (default 1 2)")
    parser.add_argument("--grpc", action="store_true", help="also Serve's gRPC proxy (and plain conveyor over gRPC)")
    parser.add_argument("--only", nargs="+", choices=["serve-proxy", "replica-ports", "ray-batch"],
                        help="measure only these Ray targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    global SAMPLES
    SAMPLES = samples()
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    wanted = args.only or ["serve-proxy", "replica-ports", "ray-batch"]
    rows: list[dict[str, Any]] = []
    plain = ServedProcess(ROOT / "examples" / "models", work / "plain.log", "--model-control-mode", "explicit",
                          "--load-model", MODEL)  # fmt: skip
    ray_started = False
    try:
        http_port, grpc_port = free_port(), free_port()
        print(f"ray: starting (logs under /tmp/ray); plain conveyor serve at {plain.url}", flush=True)
        start_ray(http_port, grpc_port)
        ray_started = True
        proxy = f"http://127.0.0.1:{http_port}"
        for kind in wanted:
            for replicas in args.replicas:
                if kind == "ray-batch":
                    apps = deploy_baseline(replicas)
                else:
                    apps = deploy_conveyor("serve" if kind == "serve-proxy" else "replica", replicas, work / "data")
                wait_replica_count(apps[0], replicas)
                urls = replica_urls(replicas) if kind == "replica-ports" else [proxy]
                measurements = [(kind, urls, None, plain.url, None)]
                if args.grpc and kind == "serve-proxy":
                    measurements.append((f"{kind}-grpc", [f"127.0.0.1:{grpc_port}"], MODEL,
                                         f"127.0.0.1:{plain.grpc_port}", "grpc"))  # fmt: skip
                for name, target_urls, application, plain_url, proto in measurements:
                    factory = grpc_target_factory(application) if proto else None
                    plain_factory = grpc_target_factory(None) if proto else None
                    reference = measure([plain_url], args, plain_factory)
                    result = measure(target_urls, args, factory)
                    row = {"target": name, "replicas": replicas, "result": result,
                           "plain": reference, "vs_plain": _ratios(result, reference)}  # fmt: skip
                    rows.append(row)
                    _print_row(row)
                delete_apps(apps)
    finally:
        if ray_started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        plain.stop()
    report = {"model": MODEL, "duration_s": args.duration_s, "concurrency": args.concurrency, "rate": args.rate,
              "cpus": len(os.sched_getaffinity(0)), "rows": rows, "efficiency": _efficiency(rows)}  # fmt: skip
    _print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


SAMPLES: list[dict[str, np.ndarray]] = []


def _ratios(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    out = {}
    for mode in result:
        if mode in reference and reference[mode]["throughput_qps"]:
            out[f"{mode}_throughput"] = round(result[mode]["throughput_qps"] / reference[mode]["throughput_qps"], 3)
            out[f"{mode}_p99"] = round(result[mode]["p99_ms"] / reference[mode]["p99_ms"], 3)
    return out


def _efficiency(rows: list[dict[str, Any]]) -> dict[str, float]:
    by = {(r["target"], r["replicas"]): r["result"]["closed"]["throughput_qps"] for r in rows}
    out = {}
    for (target, replicas), qps in by.items():
        one = by.get((target, 1))
        if replicas > 1 and one:
            out[f"{target}@{replicas}"] = round(qps / (replicas * one), 3)
    return out


def _print_row(row: dict[str, Any]) -> None:
    c, p = row["result"]["closed"], row["plain"]["closed"]
    print(f"{row['target']:>20} x{row['replicas']}: {c['throughput_qps']:>9,.0f}/s p50 {c['p50_ms']:.2f} p99 "
          f"{c['p99_ms']:.2f} ms (errors {c['errors']}) | plain {p['throughput_qps']:,.0f}/s p50 {p['p50_ms']:.2f} "
          f"p99 {p['p99_ms']:.2f} | x{row['vs_plain'].get('closed_throughput', float('nan')):.2f}", flush=True)


def _print_table(report: dict[str, Any]) -> None:
    print(f"\nmlp, closed loop, {report['concurrency']} in flight, {report['duration_s']:g} s each, "
          f"{report['cpus']} CPUs")
    print("| target | replicas | throughput/s | p50 ms | p99 ms | plain throughput/s (just before) | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        c, p = row["result"]["closed"], row["plain"]["closed"]
        print(f"| {row['target']} | {row['replicas']} | {c['throughput_qps']:,.0f} | {c['p50_ms']:.2f} | "
              f"{c['p99_ms']:.2f} | {p['throughput_qps']:,.0f} | {row['vs_plain'].get('closed_throughput', 0):.2f}x |")
    if report["rate"]:
        print(f"\nPoisson at {report['rate']:g}/s: target p50 / p99 ms (plain just before)")
        for row in report["rows"]:
            t, p = row["result"].get("poisson"), row["plain"].get("poisson")
            if t and p:
                print(f"| {row['target']} | {row['replicas']} | {t['throughput_qps']:,.0f} | {t['p50_ms']:.2f} | "
                      f"{t['p99_ms']:.2f} | plain {p['p50_ms']:.2f} / {p['p99_ms']:.2f} | errors {t['errors']} |")
    print("per-replica efficiency, throughput(N) / (N x throughput(1)):",
          ", ".join(f"{k} {v:.2f}" for k, v in report["efficiency"].items()) or "-")


if __name__ == "__main__":
    sys.exit(main())
