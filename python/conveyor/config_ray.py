"""The `[ray]` table of a model config: how `conveyor ray serve` places the model on Ray Serve.

Plain data, read by the Ray Serve adapter (the engine never looks at it): the replicas (a
fixed count, or autoscaling bounds passed through to Serve), what one replica reserves
from the cluster (CPUs, GPUs, memory), and how many requests Serve may have in flight on
one replica. Left out, the model gets one replica of one CPU.

Kept apart from conveyor.config (which imports it), like conveyor.config_graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conveyor.config_errors import rule_error

if TYPE_CHECKING:
    from conveyor.config import ModelConfig

__all__ = ["RayAutoscaling", "RayConfig", "check_ray_model", "default_max_ongoing_requests"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RayAutoscaling(_Strict):
    """[ray.autoscaling]: Serve's autoscaling_config, field for field (Serve's names and meaning).

    Serve adds a replica when the requests in flight per replica stay above
    `target_ongoing_requests` for `upscale_delay_s`, and removes one when they stay below
    it for `downscale_delay_s`, within [min_replicas, max_replicas].
    """

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    # None: Conveyor's default, one full batch per execution instance (see deployment_options).
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> RayAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise rule_error(f"at most max_replicas ({self.max_replicas})", self.min_replicas, field="min_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise rule_error(
                f"a count within [min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]",
                self.initial_replicas, field="initial_replicas",
            )
        return self


class RayConfig(_Strict):
    """[ray]: the model's Serve deployment. A graph's replica runs its steps too."""

    # A fixed replica count; leave it out with [ray.autoscaling].
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: RayAutoscaling | None = None
    # What one replica reserves from the cluster (Ray's ray_actor_options).
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory_mb: int | None = Field(default=None, ge=1)
    # Requests Serve sends one replica at once. None: enough for every execution instance to
    # form full batches with as many waiting (see default_max_ongoing_requests); too few
    # starves the batcher, which then forms small batches.
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    # Requests a caller's handle (and so Serve's proxy) queues for the deployment when every
    # replica is at max_ongoing_requests; more are refused (HTTP 503, gRPC UNAVAILABLE).
    max_queued_requests: int = Field(default=1024, ge=1)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    # How long a stopping replica finishes the requests it accepted.
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)

    @model_validator(mode="after")
    def _replicas(self) -> RayConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise rule_error(
                "num_replicas or [ray.autoscaling], not both (autoscaling sets the count between its bounds)",
                self.num_replicas, field="num_replicas",
            )
        return self


def default_max_ongoing_requests(config: ModelConfig) -> int:
    """Requests in flight per replica that keep the batcher fed: two full batches per
    execution instance (one running, one forming), at least 8, at most the queue bound."""
    batch = max(config.max_batch_size, 1)
    wanted = max(8, 2 * batch * config.instance_group.count)
    return min(wanted, config.dynamic_batching.max_queue_size)


def check_ray_model(config: ModelConfig) -> None:
    """Rules between [ray] and the rest of the config (raised as pydantic custom errors)."""
    ray = config.ray
    if ray is None:
        return
    if config.instance_group.device.startswith("cuda") and ray.num_gpus == 0:
        raise rule_error(
            f"[ray] num_gpus of at least 1 (instance_group.device is {config.instance_group.device!r}: "
            "a replica without a GPU reserved cannot run it)", ray.num_gpus, field="ray.num_gpus",
        )
    if ray.max_ongoing_requests is not None and ray.max_ongoing_requests > config.dynamic_batching.max_queue_size:
        raise rule_error(
            f"at most dynamic_batching.max_queue_size ({config.dynamic_batching.max_queue_size}): more in flight "
            "would only be refused by the batcher's queue", ray.max_ongoing_requests, field="ray.max_ongoing_requests",
        )
