"""Conveyor on Ray Serve: a real two-node Ray cluster on this host, deployed by the CLI.

One cluster serves the module: `conveyor ray serve --detach` deploys a repository of copies
of the example models, each with a [ray] table, and the tests drive it with tritonclient on 127.0.0.1
(HTTP and gRPC through Serve's proxies, and each replica's own ports for ingress
"replica"), kill a replica under load, watch autoscaling, and compare the merged monitor
of two replicas with one monitor that saw the same rows.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'conveyor-serve[ray]')")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import conveyor  # noqa: E402
from conveyor.errors import ConfigError  # noqa: E402
from conveyor.runtime import Runtime  # noqa: E402
from processes import EXAMPLE_MODELS, free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DEADLINE_S = 120.0  # bound on every wait on the cluster; a healthy run takes a fraction of it
POLL_S = 0.1
PACKAGE_ROOT = str(Path(conveyor.__file__).resolve().parents[1])

RAY_TABLES = {
    "tiny": "[ray]\nnum_replicas = 2\nnum_cpus = 0.5\n",
    "churn": "[ray]\nnum_replicas = 2\nnum_cpus = 0.5\n",
    "scaler": "[ray]\nnum_cpus = 0.25\n",
    "mlp": (
        "[ray]\nnum_cpus = 0.25\n[ray.autoscaling]\nmin_replicas = 1\nmax_replicas = 2\ntarget_ongoing_requests = 1\n"
        "upscale_delay_s = 0\ndownscale_delay_s = 0\nmetrics_interval_s = 0.2\nlook_back_period_s = 0.5\n"
    ),
}


def _wait(condition: Any, what: str, deadline_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _conveyor(*args: str, timeout_s: float = DEADLINE_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout_s)


class RayDeployment:
    def __init__(self, root: Path, address: str, http_port: int, grpc_port: int) -> None:
        self.root, self.address = root, address
        self.http_url, self.grpc_url = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"

    def replicas(self, app: str) -> list[dict[str, Any]]:
        from conveyor.scaleout.ray_hub import hub_actor

        return ray.get(hub_actor().replicas.remote(app))

    def running_replicas(self, app: str) -> int:
        from conveyor.scaleout.ray_apps import running_replicas

        return running_replicas(app)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ray")
    repo = root / "repo"
    for model, table in RAY_TABLES.items():
        shutil.copytree(EXAMPLE_MODELS / model, repo / model)
        with open(repo / model / "config.toml", "a") as config:
            config.write("\n" + table)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    node_args = {"num_cpus": 2, "object_store_memory": 150 * 1024 * 1024}
    ray_cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    ray_cluster.add_node(**node_args)
    http_port, grpc_port = free_port(), free_port()
    try:
        ray.init(address=ray_cluster.address, runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}},
                 log_to_driver=False)
        deployed = _conveyor(
            "ray", "serve", str(repo), "--address", ray_cluster.address, "--detach", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--data-dir", str(root / "data"), "--model", "tiny", "--model", "churn",
            "--model", "scaler", "--model", "mlp", timeout_s=300,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        yield RayDeployment(root, ray_cluster.address, http_port, grpc_port)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()


def _http(
    url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    """(status, body) of one request; the connection closed whatever the answer."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _tiny_copy(tmp_path: Path, name: str, ray_table: str) -> Path:
    """A repository at tmp_path/repo holding the example tiny as `name`, with `ray_table` added."""
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE_MODELS / "tiny", repo / name)
    (repo / name / "config.toml").write_text((EXAMPLE_MODELS / "tiny" / "config.toml").read_text() + "\n" + ray_table)
    return repo


def _tiny_request(client_module: Any, values: np.ndarray, binary: bool = True) -> Any:
    tensor = client_module.InferInput("x", list(values.shape), "FP32")
    if client_module is httpclient:
        tensor.set_data_from_numpy(values, binary_data=binary)
    else:
        tensor.set_data_from_numpy(values)
    return [tensor]


def test_tritonclient_through_serve_http_and_grpc_proxies_every_answer_exact(cluster: RayDeployment) -> None:
    http = httpclient.InferenceServerClient(cluster.http_url, concurrency=8)
    grpc = grpcclient.InferenceServerClient(cluster.grpc_url)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("tiny")
    assert http.get_server_metadata()["name"] == "conveyor"
    assert http.get_model_metadata("tiny")["inputs"][0]["shape"] == [-1, 16]
    rows = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    pending = [http.async_infer("tiny", _tiny_request(httpclient, rows[i:i + 1], binary=i % 2 == 0)) for i in range(32)]
    for i, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result().as_numpy("y"), rows[i:i + 1] + 1)
    for i in range(8):  # Serve's gRPC proxy picks the application from the call's metadata
        answer = grpc.infer("tiny", _tiny_request(grpcclient, rows[i:i + 4]), headers={"application": "tiny"})
        np.testing.assert_array_equal(answer.as_numpy("y"), rows[i:i + 4] + 1)
    assert grpc.is_model_ready("tiny", headers={"application": "tiny"})
    with pytest.raises(Exception, match="unknown model"):
        grpc.infer("nosuch", _tiny_request(grpcclient, rows[:1]), headers={"application": "tiny"})
    with pytest.raises(Exception, match="shape"):  # the engine's own validation, through the proxy
        http.infer("tiny", _tiny_request(httpclient, np.zeros((1, 3), np.float32)))
    http.close()
    grpc.close()


def test_server_routes_answer_for_the_deployment(cluster: RayDeployment) -> None:
    status, index = _http(f"http://{cluster.http_url}/v2/repository/index", method="POST")
    rows = {row["name"]: row for row in json.loads(index)}
    assert status == 200 and set(rows) == {"tiny", "churn", "scaler", "mlp"} and rows["tiny"]["state"] == "READY"
    status, body = _http(f"http://{cluster.http_url}/v2/models/nosuch")
    assert status == 404 and "model 'nosuch' is not deployed" in body.decode()
    # A replica's own control routes stay closed through Serve.
    status, body = _http(f"http://{cluster.http_url}/v2/models/tiny/rollout/promote", method="POST")
    assert status == 405 and "redeploying" in body.decode()


def _kill_under_load(cluster: RayDeployment, kill: Any, spared: list[str]) -> list[tuple[str, Any]]:
    """Outcomes of 4 tritonclient threads sending tiny requests while `kill(victim replica info)`
    runs: ("ok", answer right) or ("error", message), until 200 requests after the kill. The
    victim is a live replica not in `spared` (the hub lists a killed one for a while)."""
    stop, started = threading.Event(), threading.Event()
    outcomes: list[tuple[str, Any]] = []

    def load(worker: int) -> None:
        client = httpclient.InferenceServerClient(cluster.http_url, network_timeout=30.0)
        i = 0
        while not stop.is_set():
            values = np.full((1, 16), worker * 100_000 + i, dtype=np.float32)  # unique: a mixed-up answer shows
            try:
                answer = client.infer("tiny", _tiny_request(httpclient, values), timeout=30_000_000)
                outcomes.append(("ok", np.array_equal(answer.as_numpy("y"), values + 1)))
            except Exception as exc:  # noqa: BLE001 - every failure is classified by the caller
                outcomes.append(("error", str(exc)))
            i += 1
            if i == 20:
                started.set()
        client.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, w) for w in range(4)]
        try:
            assert started.wait(DEADLINE_S)
            sent_before = len(outcomes)
            kill(next(r for r in cluster.replicas("tiny") if r["replica"] not in spared))
            _wait(lambda: len(outcomes) > sent_before + 200, "requests after the kill")
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=DEADLINE_S)  # none hangs: each request has a 30 s timeout
    return outcomes


def _check_failover(cluster: RayDeployment, outcomes: list[tuple[str, Any]], killed: list[str]) -> None:
    assert all(value for kind, value in outcomes if kind == "ok"), "a request was answered with another's result"
    # A request in flight on the killed replica fails with a status a client may retry.
    failed = [value for kind, value in outcomes if kind == "error"]
    assert all(("503" in f or "500" in f or "Unavailable" in f or "died" in f) for f in failed), failed[:3]
    # Serve starts a replacement, which registers with the hub, and the model answers again.
    _wait(lambda: cluster.running_replicas("tiny") == 2
          and len({r["replica"] for r in cluster.replicas("tiny")} - set(killed)) == 2, "the replacement replica")
    client = httpclient.InferenceServerClient(cluster.http_url)
    for i in range(20):
        values = np.full((1, 16), i, dtype=np.float32)
        np.testing.assert_array_equal(client.infer("tiny", _tiny_request(httpclient, values)).as_numpy("y"), values + 1)
    client.close()


def test_replica_killed_mid_load_loses_no_request_and_comes_back(cluster: RayDeployment) -> None:
    assert len(cluster.replicas("tiny")) == 2
    killed: list[str] = []

    def kill_actor(victim: dict) -> None:  # what `ray.kill` or Serve's controller does
        killed.append(victim["replica"])
        ray.kill(ray.get_actor("SERVE_REPLICA::" + victim["replica"], namespace="serve"), no_restart=True)

    _check_failover(cluster, _kill_under_load(cluster, kill_actor, killed), killed)

    def kill_process(victim: dict) -> None:  # what the OOM killer or a crash does
        killed.append(victim["replica"])
        os.kill(victim["pid"], signal.SIGKILL)

    _check_failover(cluster, _kill_under_load(cluster, kill_process, killed), killed)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(cluster: RayDeployment) -> None:
    assert cluster.running_replicas("mlp") == 1
    stop = threading.Event()

    def load() -> None:
        client = httpclient.InferenceServerClient(cluster.http_url)
        values = np.zeros((1, 64), np.float32)
        tensor = httpclient.InferInput("x", [1, 64], "FP32")
        tensor.set_data_from_numpy(values)
        while not stop.is_set():
            client.infer("mlp", [tensor])
        client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(load) for _ in range(8)]
        try:
            _wait(lambda: cluster.running_replicas("mlp") == 2, "a second mlp replica under load")
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=DEADLINE_S)
    _wait(lambda: cluster.running_replicas("mlp") == 1, "mlp to scale back to one replica")


def _churn_rows(count: int, seed: int) -> np.ndarray:
    reference = np.load(EXAMPLE_MODELS / "churn" / "train.npy").astype(np.float32)
    rng = np.random.default_rng(seed)
    return reference[rng.integers(0, len(reference), count)] * np.float32(1.3)  # drifted a little


def _send_churn(cluster: RayDeployment, rows: np.ndarray, *, rows_per_request: int, prefix: str) -> None:
    """`rows` to churn through Serve's proxy, 8 requests in flight, request i with id f"{prefix}-{i}"."""
    client = httpclient.InferenceServerClient(cluster.http_url, concurrency=8)
    requests = []
    for i, start in enumerate(range(0, len(rows), rows_per_request)):
        tensor = httpclient.InferInput("features", [rows_per_request, 12], "FP32")
        tensor.set_data_from_numpy(rows[start:start + rows_per_request])
        requests.append(client.async_infer("churn", [tensor], request_id=f"{prefix}-{i}"))
    for request in requests:
        request.get_result()
    client.close()


def test_merged_monitor_of_two_replicas_equals_one_monitor_over_the_same_rows(
    cluster: RayDeployment, tmp_path: Path
) -> None:
    rows = _churn_rows(400, seed=7)
    _send_churn(cluster, rows, rows_per_request=4, prefix="merge")
    answered = {r["replica"] for r in cluster.replicas("churn")}
    merged = serve.get_app_handle("churn").cluster_monitor.remote("churn").result()
    assert set(merged["replicas"]["merged"]) == answered and merged["replicas"]["left_out"] == {}
    assert sum(merged["replicas"]["rows"].values()) == len(rows)  # each replica's share, however Serve split them

    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE_MODELS / "churn", repo / "churn")
    from conveyor.monitor import create_model_monitor

    with Runtime.from_repository(repo, data_dir=tmp_path / "data", monitor_factory=create_model_monitor) as runtime:
        for start in range(0, len(rows), 4):
            runtime.infer("churn", {"features": rows[start:start + 4]})
        single = runtime.model("churn").monitor.document_for("rows", runtime.model("churn").monitor.window_state())
    assert merged["window"]["rows"] == single["window"]["rows"] == len(rows)
    assert merged["anomalies"]["outliers"] == single["anomalies"]["outliers"]
    for ours, theirs in zip(merged["features"], single["features"], strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["histogram"]["current"] == theirs["histogram"]["current"]  # counts: exact
        assert ours["rows"] == theirs["rows"] and ours["status"] == theirs["status"]
        assert ours["mean"] == pytest.approx(theirs["mean"], rel=1e-9, abs=1e-12)
        assert ours["psi"] == pytest.approx(theirs["psi"], rel=1e-9, abs=1e-12)


def test_labels_join_whichever_replica_answered(cluster: RayDeployment) -> None:

    rows = _churn_rows(40, seed=11)
    _send_churn(cluster, rows, rows_per_request=1, prefix="label")

    def post(items: list[dict]) -> dict:
        status, body = _http(f"http://{cluster.http_url}/v2/models/churn/feedback", method="POST",
                             body=json.dumps(items).encode(), headers={"Content-Type": "application/json"})
        assert status == 200, body
        return json.loads(body)

    labels = [{"id": f"label-{i}", "label": i % 2} for i in range(len(rows))]
    first = post(labels)
    assert (first["joined"], first["unknown"], first["duplicates"]) == (len(rows), 0, 0), first
    again = post(labels[:10] + [{"id": "never-sent", "label": 1}])
    assert (again["joined"], again["duplicates"], again["unknown"]) == (0, 10, 1), again


WIDE_MODEL = """
class Model:
    def __init__(self, config):
        pass

    def execute(self, inputs):
        return {"y": inputs["x"] * 2}
"""
WIDE_CONFIG = """backend = "python"
max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [32768]
[[outputs]]
name = "y"
datatype = "FP32"
dims = [32768]
[ray]
num_cpus = 0.1
"""


def test_deployment_handles_compose_conveyor_deployments_through_the_object_store(
    cluster: RayDeployment, tmp_path: Path
) -> None:
    from conveyor.scaleout.ray_apps import model_application

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Pipeline:
        def __init__(self, scaler: Any, tiny: Any, wide: Any, probe: Any) -> None:
            self.scaler, self.tiny, self.wide, self.probe = scaler, tiny, wide, probe

        async def __call__(self, values: np.ndarray) -> dict[str, Any]:
            scaled = self.scaler.infer.remote({"x": values})  # unawaited: Serve resolves it in tiny's replica
            return await self.tiny.infer.remote(scaled, rename={"y": "x"})

        async def wide_outputs(self, values: np.ndarray) -> dict[str, Any]:
            return await self.probe.inspect.remote(self.wide.infer.remote({"x": values}))

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Probe:
        """What a deployment downstream of a Conveyor deployment receives."""

        async def inspect(self, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
            y = tensors["y"]
            return {"writeable": bool(y.flags.writeable), "owns_data": bool(y.flags.owndata), "sum": float(y.sum())}

    repo = cluster.root / "repo"
    wide_repo = tmp_path / "repo"
    (wide_repo / "wide" / "1").mkdir(parents=True)
    (wide_repo / "wide" / "config.toml").write_text(WIDE_CONFIG)
    (wide_repo / "wide" / "1" / "model.py").write_text(WIDE_MODEL)
    app = Pipeline.bind(model_application(repo, "scaler", app="pipeline"),
                        model_application(repo, "tiny", app="pipeline"),
                        model_application(wide_repo, "wide", app="pipeline", data_dir=tmp_path / "data"),
                        Probe.bind())  # fmt: skip
    handle = serve.run(app, name="pipeline", route_prefix="/pipeline")
    try:
        values = np.linspace(-3, 3, 8 * 16, dtype=np.float32).reshape(8, 16)
        result = handle.remote(values).result()
        np.testing.assert_allclose(result["y"], (values - 0.5) / 2.0 + 1, rtol=1e-6)
        # 256 KB of outputs go through the object store: the next deployment reads them in
        # place (a read-only view of shared memory), not a copy of its own.
        seen = handle.wide_outputs.remote(np.ones((2, 32768), np.float32)).result()
        assert seen == {"writeable": False, "owns_data": False, "sum": 2.0 * 2 * 32768}
    finally:
        serve.delete("pipeline")


def test_replica_ingress_serves_tritonclient_on_each_replicas_own_ports(cluster: RayDeployment, tmp_path: Path) -> None:
    from conveyor.scaleout.ray_apps import deploy, plan_deployments

    repo = _tiny_copy(tmp_path, "tiny_direct", "[ray]\nnum_replicas = 2\nnum_cpus = 0.25\n")
    (plan,) = plan_deployments(repo, ingress="replica", host="127.0.0.1", data_dir=tmp_path / "data")
    deploy([plan], timeout_s=DEADLINE_S)
    try:
        replicas = _wait(lambda: len(cluster.replicas("tiny_direct")) == 2 and cluster.replicas("tiny_direct"),
                         "both replicas to register")
        values = np.ones((2, 16), np.float32)
        for replica in replicas:
            http = httpclient.InferenceServerClient(f"{replica['host']}:{replica['http_port']}")
            grpc = grpcclient.InferenceServerClient(f"{replica['host']}:{replica['grpc_port']}")
            np.testing.assert_array_equal(
                http.infer("tiny_direct", _tiny_request(httpclient, values)).as_numpy("y"), values + 1)
            np.testing.assert_array_equal(
                grpc.infer("tiny_direct", _tiny_request(grpcclient, values)).as_numpy("y"), values + 1)
            http.close()
            grpc.close()
        listed = _conveyor("ray", "endpoints", "--address", cluster.address, "--app", "tiny_direct",
                           "--format", "prometheus")
        assert listed.returncode == 0, listed.stderr
        targets = {t["targets"][0] for t in json.loads(listed.stdout)}
        assert targets == {f"{r['host']}:{r['metrics_port']}" for r in replicas}
    finally:
        serve.delete("tiny_direct")


def test_a_model_that_cannot_load_fails_its_deployment_naming_it(cluster: RayDeployment, tmp_path: Path) -> None:
    from conveyor.scaleout.ray_apps import DeploymentFailed, deploy, plan_deployments

    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE_MODELS / "tiny", repo / "broken")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    # Tensors read from the file: the driver finds the damage before deploying anything.
    with pytest.raises(ConfigError, match="model 'broken' cannot be deployed: .*onnxruntime cannot load it"):
        plan_deployments(repo, data_dir=tmp_path / "data")
    # Tensors in the config: only a replica opens the file, and the deployment fails with its error.
    (repo / "broken" / "config.toml").write_text(
        "backend = \"onnx\"\nmax_batch_size = 8\n[[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [16]\n"
        "[[outputs]]\nname = \"y\"\ndatatype = \"FP32\"\ndims = [16]\n[ray]\nnum_cpus = 0.1\n")
    (plan,) = plan_deployments(repo, data_dir=tmp_path / "data")
    try:
        with pytest.raises(DeploymentFailed) as caught:
            deploy([plan], timeout_s=DEADLINE_S)
        message = str(caught.value)
        assert "model 'broken'" in message and "Traceback" not in message, message
    finally:
        serve.delete("broken")


def test_cli_errors_say_what_is_missing(tmp_path: Path) -> None:
    unreachable = _conveyor("ray", "endpoints", "--address", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "cannot reach the Ray cluster" in unreachable.stderr
    (tmp_path / "repo" / "bad").mkdir(parents=True)
    (tmp_path / "repo" / "bad" / "config.toml").write_text("backend = \"onnx\"\n[ray]\nnum_replicas = 0\n")
    bad = _conveyor("ray", "serve", str(tmp_path / "repo"), "--address", f"127.0.0.1:{free_port()}")
    assert bad.returncode == 2 and "model 'bad' cannot be deployed" in bad.stderr and "ray.num_replicas" in bad.stderr
    # Without Ray installed: the import fails, the command says what to install.
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['ray'] = None; from conveyor.cli import main; "
         f"sys.exit(main(['ray', 'serve', {str(EXAMPLE_MODELS)!r}]))"],
        env=_env(), capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert blocked.returncode == 3 and "pip install 'conveyor-serve[ray]'" in blocked.stderr, blocked.stderr


def test_api_key_guards_both_proxies(cluster: RayDeployment, tmp_path: Path) -> None:
    """Serve's proxies run none of conveyor serve's guards: the replica checks the key itself."""
    from conveyor.scaleout.ray_apps import deploy, plan_deployments

    repo = _tiny_copy(tmp_path, "tiny_keyed", "[ray]\nnum_cpus = 0.1\n")
    (plan,) = plan_deployments(repo, api_key="s3cret", api_key_scope="all", data_dir=tmp_path / "data")
    deploy([plan], timeout_s=DEADLINE_S)
    try:
        values = np.ones((1, 16), np.float32)
        http = httpclient.InferenceServerClient(cluster.http_url)
        with pytest.raises(Exception, match="Authorization: Bearer"):
            http.infer("tiny_keyed", _tiny_request(httpclient, values))
        answer = http.infer("tiny_keyed", _tiny_request(httpclient, values), headers={"Authorization": "Bearer s3cret"})
        np.testing.assert_array_equal(answer.as_numpy("y"), values + 1)
        grpc = grpcclient.InferenceServerClient(cluster.grpc_url)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            grpc.infer("tiny_keyed", _tiny_request(grpcclient, values), headers={"application": "tiny_keyed"})
        answer = grpc.infer("tiny_keyed", _tiny_request(grpcclient, values),
                            headers={"application": "tiny_keyed", "authorization": "Bearer s3cret"})
        np.testing.assert_array_equal(answer.as_numpy("y"), values + 1)
        assert grpc.is_server_live(headers={"application": "tiny_keyed"})  # health stays open
        http.close()
        grpc.close()
        # The server-wide routes take the latest deployment's key, and list every live model.
        index = f"http://{cluster.http_url}/v2/repository/index"
        assert _http(index, method="POST")[0] == 401
        status, body = _http(index, method="POST", headers={"Authorization": "Bearer s3cret"})
        names = {row["name"] for row in json.loads(body)}
        assert status == 200 and {"tiny_keyed", "tiny", "churn"} <= names and "pipeline" not in names
        assert _http(f"http://{cluster.http_url}/v2/health/live")[0] == 200
    finally:
        serve.delete("tiny_keyed")
