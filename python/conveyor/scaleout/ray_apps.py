"""A model repository as Ray Serve applications: one per model, placed by its `[ray]` table.

Each model becomes its own Serve application (named after the model) whose deployment
runs ConveyorReplica over it, at route prefix /v2/models/<model>: Serve's HTTP proxy sends
a model's KServe v2 routes straight to that model's replicas, with no router hop, and
scales each model on its own. A graph's replicas run the graph with its steps in-process
(the steps' batchers are shared by the graph's requests, as in `conveyor serve`).
A small application "conveyor" at /v2 answers the server-wide routes (health, server
metadata, repository index) over all of them.

Planning (`plan_deployments`) reads and checks the repository in the driver, so a bad
config fails before anything is deployed, with the file and field named.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.config import ModelConfig
from conveyor.config_ray import RayConfig, default_max_ongoing_requests
from conveyor.errors import ConfigError
from conveyor.repository import ModelRepository

log = logging.getLogger(__name__)

__all__ = [
    "GRPC_SERVICER_FUNCTION", "INGRESS_MODES", "SERVER_APP", "DeploymentFailed", "DeploymentPlan", "ReplicaSpec",
    "deploy", "deployment_options", "model_application", "plan_deployments", "run_targets", "running_replicas", "wait_running",
]

INGRESS_MODES = ("serve", "replica")
SERVER_APP = "conveyor"  # the application answering the server-wide routes
GRPC_SERVICER_FUNCTION = "conveyor.protocol.grpc.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
# How often Serve retries a replica whose constructor failed before the deployment fails:
# a model that cannot load fails fast instead of after Serve's default 20 tries.
CONSTRUCTOR_RETRIES = 3


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica of one deployment is told (plain data: Ray ships it to each replica)."""

    repository: str
    app: str
    models: tuple[str, ...]  # loaded in this order (a graph brings its steps)
    ingress: str = "serve"  # "serve": Serve's proxies only; "replica": also this replica's own ports
    host: str = ""  # the address own listeners bind; "" = the node's address
    data_dir: str = "conveyor-data"
    api_key: str | None = None
    api_key_scope: str = "control"  # as conveyor serve's --api-key-scope
    # An application of its own at /v2/models/<app> (listed by the server-wide routes), not a
    # deployment inside someone else's application (model_application).
    routed: bool = True


@dataclass(frozen=True)
class DeploymentPlan:
    """One model's Serve application: its name, route prefix, replica spec and deployment options."""

    app: str
    route_prefix: str
    spec: ReplicaSpec
    options: dict[str, Any]


def deployment_options(config: ModelConfig) -> dict[str, Any]:
    """Serve's deployment options for a model from its [ray] table (defaults without one)."""
    ray = config.ray or RayConfig()
    actor: dict[str, Any] = {"num_cpus": ray.num_cpus}
    if ray.num_gpus:
        actor["num_gpus"] = ray.num_gpus
    if ray.memory_mb is not None:
        actor["memory"] = ray.memory_mb * 1024 * 1024
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": ray.max_ongoing_requests or default_max_ongoing_requests(config),
        "max_queued_requests": ray.max_queued_requests,
        "health_check_period_s": ray.health_check_period_s,
        "health_check_timeout_s": ray.health_check_timeout_s,
        "graceful_shutdown_timeout_s": ray.graceful_shutdown_timeout_s,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if ray.autoscaling is None:
        options["num_replicas"] = ray.num_replicas
    else:
        scaling = ray.autoscaling.model_dump(exclude_none=True)
        if ray.autoscaling.target_ongoing_requests is None:
            # One full batch per execution instance in flight: the batcher's working point.
            scaling["target_ongoing_requests"] = max(config.max_batch_size, 1) * config.instance_group.count
        options["autoscaling_config"] = scaling
    return options


def plan_deployments(
    repository: Path, *, models: list[str] | None = None, ingress: str = "serve", data_dir: Path | None = None,
    api_key: str | None = None, api_key_scope: str = "control", host: str = "",
) -> list[DeploymentPlan]:
    """The Serve applications for `models` of `repository` (default: every model).

    Raises ConfigError naming the model and the problem when a model is unknown or its
    config cannot be served; nothing is deployed then.
    """
    if ingress not in INGRESS_MODES:
        raise ConfigError(f"ingress must be one of {', '.join(INGRESS_MODES)}, got {ingress!r}")
    root = Path(repository).resolve()
    repo = ModelRepository(root)
    known = repo.list_models()
    if not known:
        raise ConfigError(f"{root}: no model directories: a repository holds one directory per model")
    names = list(models) if models else known
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"model {', '.join(map(repr, unknown))} is not in {root} (it has: {', '.join(known)})")
    if SERVER_APP in names:
        raise ConfigError(f"model '{SERVER_APP}': the name is taken by the server-wide application; rename the model")
    data = Path(data_dir).resolve() if data_dir is not None else root.parent / "conveyor-data"
    plans = []
    configs: dict[str, ModelConfig] = {}  # each model's config read once, as a model or as a step

    def config_of(model: str) -> ModelConfig:
        if model not in configs:
            configs[model] = repo.load_model(model).config
        return configs[model]

    for name in names:
        try:
            config = config_of(name)
            for step in sorted(repo.graph_steps(name) or ()):
                config_of(step)  # a graph's steps must load too: their errors name the step
        except ConfigError as exc:
            raise ConfigError(f"model '{name}' cannot be deployed: {exc}") from None
        if ingress == "replica" and config.ray is not None and config.ray.autoscaling is not None:
            raise ConfigError(
                f"model '{name}' cannot be deployed with ingress 'replica': its [ray.autoscaling] follows the "
                "requests through Serve's proxies, and clients of the replicas' own ports bypass them (Serve would "
                "scale busy replicas down); set [ray] num_replicas, or use ingress 'serve'"
            )
        spec = ReplicaSpec(repository=str(root), app=name, models=(name,), ingress=ingress, host=host,
                           data_dir=str(data), api_key=api_key, api_key_scope=api_key_scope)
        plans.append(DeploymentPlan(app=name, route_prefix=f"/v2/models/{name}", spec=spec,
                                    options=deployment_options(config)))
    return plans


def run_targets(plans: list[DeploymentPlan], *, server_app: bool = True) -> list[Any]:
    """The plans as Serve RunTargets (an application each), plus the server-wide application:
    `serve.run_many(run_targets(plans))` deploys them like `conveyor ray serve`."""
    from ray import serve

    from conveyor.scaleout.ray_replica import ConveyorReplica
    from conveyor.scaleout.ray_server_app import ServerRoutes

    targets = []
    for plan in plans:
        deployment = serve.deployment(ConveyorReplica, name=plan.app, **plan.options)
        targets.append(serve.RunTarget(target=deployment.bind(plan.spec), name=plan.app,
                                       route_prefix=plan.route_prefix))
    if server_app:
        server = serve.deployment(ServerRoutes, name=SERVER_APP, num_replicas=1, ray_actor_options={"num_cpus": 0})
        # plan_deployments gives every plan the same key.
        key, scope = (plans[0].spec.api_key, plans[0].spec.api_key_scope) if plans else (None, "control")
        routes = server.bind([plan.app for plan in plans], api_key=key, api_key_scope=scope)
        targets.append(serve.RunTarget(target=routes, name=SERVER_APP, route_prefix="/v2"))
    return targets


def model_application(repository: Path, model: str, *, app: str | None = None, **plan_options: Any) -> Any:
    """One model's bound Conveyor deployment, to compose into an application of your own:
    pass it to your ingress deployment's bind() and call `handle.infer.remote(inputs)` (a
    DeploymentResponse of another Conveyor deployment may stand for `inputs`, unawaited:
    Ray hands its tensors over through the object store). `plan_options` as plan_deployments."""
    from ray import serve

    from conveyor.scaleout.ray_replica import ConveyorReplica

    (plan,) = plan_deployments(repository, models=[model], **plan_options)
    spec = dataclasses.replace(plan.spec, app=app or model, routed=False)
    return serve.deployment(ConveyorReplica, name=model, **plan.options).bind(spec)


def deploy(plans: list[DeploymentPlan], *, timeout_s: float = 300.0) -> None:
    """Deploy the plans' applications and the server-wide one on the connected Serve instance,
    then wait until every one runs. Raises DeploymentFailed with the failing model's own
    error (not a Ray traceback) when one cannot start, and TimeoutError past `timeout_s`."""
    from ray import serve

    serve.run_many(run_targets(plans), wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)
    wait_running([*(plan.app for plan in plans), SERVER_APP], timeout_s=timeout_s)


class DeploymentFailed(RuntimeError):
    """An application could not start; the message is the model's own error."""


def wait_running(apps: list[str], *, timeout_s: float) -> None:
    """Block until every named application is RUNNING; DeploymentFailed on the first that fails."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    pending = set(apps)
    while pending:
        statuses = serve.status().applications
        for app in sorted(pending):
            status = statuses.get(app)
            if status is None:
                continue
            if status.status == ApplicationStatus.RUNNING:
                pending.discard(app)
            elif status.status == ApplicationStatus.DEPLOY_FAILED:
                # The deployments' messages carry the replica's error; the application's only sums up.
                details = "\n".join(d.message for d in status.deployments.values() if d.message)
                raise DeploymentFailed(f"application '{app}' failed to deploy: "
                                       f"{failure_reason(details or status.message)}")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:g} s: {', '.join(sorted(pending))}")
        if pending:
            time.sleep(0.2)  # polls Serve's controller; deployment takes seconds


def running_replicas(app: str) -> int:
    """Replicas of `app` Serve reports RUNNING (0 for an application it does not know)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def failure_reason(message: str) -> str:
    """The last line of a Serve failure message naming our own error, else the message's last line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        for marker in ("ModelLoadFailed: ", "ConfigError: "):
            if marker in line:
                return line.split(marker, 1)[1]
    return lines[-1] if lines else "no reason given"
