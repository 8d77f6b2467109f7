"""Failover under load on a local multi-node Ray cluster: replicas killed, then a whole node lost.

The longer form of tests/test_ray_serve.py's replica-kill test. One process starts a Ray
cluster of a head and two worker nodes on this host, deploys the example `tiny` model
with `conveyor ray serve`'s code (3 replicas through Serve's HTTP proxy), and keeps
tritonclient load on it (each request's input is unique, so a wrong answer is caught)
while it:

1. kills one replica actor at a time, `--kills` times, waiting each time until Serve has
   replaced it and the replacement answers;
2. removes a worker node with its replicas, adds a fresh one, and waits until Serve has
   all replicas running again.

It reports every request's outcome: answered right, answered wrong (must be 0), failed
with a status (which ones: a client may retry them), or not answered within the client's
timeout (must be 0), per phase (the one in which the request was sent: a request in flight when
a replica is killed counts in the phase before), as JSON. Exit status 1 when a request was answered wrong
or hung.

    python bench/ray_failover.py --kills 5 --out failover.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from served_process import free_port  # noqa: E402

REQUEST_TIMEOUT_S = 30.0
WAIT_S = 180.0


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {WAIT_S:g} s waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--kills", type=int, default=5, help="replica kills before the node loss (default 5)")
    parser.add_argument("--clients", type=int, default=8, help="client threads keeping load on (default 8)")
    parser.add_argument("--out", type=Path, help="write the outcome counts here as JSON")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import tritonclient.http as httpclient
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import gRPCOptions

    from conveyor.scaleout.ray_apps import GRPC_SERVICER_FUNCTION, deploy, plan_deployments, running_replicas

    work = Path(tempfile.mkdtemp(prefix="conveyor-failover-"))
    shutil.copytree(ROOT / "examples" / "models" / "tiny", work / "repo" / "tiny")
    with open(work / "repo" / "tiny" / "config.toml", "a") as config:
        config.write("\n[ray]\nnum_replicas = 3\nnum_cpus = 0.5\n")
    node_args = {"num_cpus": 2, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    workers = [cluster.add_node(**node_args) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "python")}},
             log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]))
    deploy(plan_deployments(work / "repo", data_dir=work / "data"), timeout_s=WAIT_S)

    phase = ["warm-up"]
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stop = threading.Event()

    def client(worker: int) -> None:
        connection = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=REQUEST_TIMEOUT_S,
                                                      connection_timeout=REQUEST_TIMEOUT_S)
        sent = 0
        while not stop.is_set():
            values = np.full((1, 16), worker * 10_000_000 + sent, dtype=np.float32)
            tensor = httpclient.InferInput("x", [1, 16], "FP32")
            tensor.set_data_from_numpy(values)
            current = phase[0]
            try:
                answer = connection.infer("tiny", [tensor], timeout=int(REQUEST_TIMEOUT_S * 1e6))
                right = np.array_equal(answer.as_numpy("y"), values + 1)
                outcomes[current]["answered right" if right else "ANSWERED WRONG"] += 1
            except Exception as exc:  # noqa: BLE001 - classified by its text
                text = str(exc)
                kind = "HUNG (timed out)" if "timed out" in text.lower() else f"failed: {text[:80]}"
                outcomes[current][kind] += 1
            sent += 1
        connection.close()

    def replica_names() -> set[str]:
        return {n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                if n["name"].startswith("SERVE_REPLICA::tiny#")}

    def recovered(before: set[str]) -> bool:
        # A replica that did not exist before runs, and Serve counts every replica running.
        return bool(replica_names() - before) and running_replicas("tiny") == 3

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)  # warm-up traffic before the first failure
        for kill in range(args.kills):
            phase[0] = f"replica kill {kill + 1}"
            before = replica_names()
            ray.kill(ray.get_actor(sorted(before)[0], namespace="serve"), no_restart=True)
            _wait(lambda: recovered(before), "Serve to replace the killed replica")
        phase[0] = "node lost"
        before = replica_names()
        cluster.remove_node(workers[0])
        cluster.add_node(**node_args)
        _wait(lambda: recovered(before), "all replicas running after the node loss")
        phase[0] = "after recovery"
        time.sleep(2)  # traffic on the recovered deployment
    finally:
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    report = {name: dict(counter) for name, counter in outcomes.items()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    bad = sum(c for counter in outcomes.values() for kind, c in counter.items() if kind.startswith(("ANSWERED", "HUNG")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
