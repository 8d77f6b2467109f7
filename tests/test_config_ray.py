"""The [ray] table: its schema, its rules, and the Serve deployment options it becomes (no Ray needed)."""

from __future__ import annotations

import pytest

from conveyor.config import parse_model_config
from conveyor.config_ray import default_max_ongoing_requests
from conveyor.errors import ConfigError
from conveyor.scaleout.ray_apps import deployment_options

BASE = {"name": "m", "backend": "onnx", "max_batch_size": 8}


def _config(ray: dict | None = None, **fields):
    data = {**BASE, **fields}
    if ray is not None:
        data["ray"] = ray
    return parse_model_config(data, source="m/config.toml")


def test_defaults_give_one_replica_of_one_cpu_fed_with_two_batches() -> None:
    options = deployment_options(_config())
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 1.0}
    assert options["max_ongoing_requests"] == 16  # 2 batches of 8 rows, one instance
    assert "autoscaling_config" not in options


def test_max_ongoing_requests_follows_batch_size_and_instances_within_the_queue_bound() -> None:
    assert default_max_ongoing_requests(_config(instance_group={"count": 3})) == 48
    assert default_max_ongoing_requests(_config(max_batch_size=0)) == 8
    assert default_max_ongoing_requests(_config(max_batch_size=512, dynamic_batching={"max_queue_size": 100})) == 100


def test_resources_and_serve_knobs_pass_through() -> None:
    options = deployment_options(_config({
        "num_replicas": 3, "num_cpus": 0.5, "num_gpus": 1, "memory_mb": 512, "max_ongoing_requests": 40,
        "max_queued_requests": 7, "graceful_shutdown_timeout_s": 5,
    }, instance_group={"device": "cuda"}))  # fmt: skip
    assert options["num_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0, "memory": 512 * 1024 * 1024}
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (40, 7)
    assert options["graceful_shutdown_timeout_s"] == 5


def test_autoscaling_replaces_the_replica_count_and_targets_a_batch_per_instance() -> None:
    options = deployment_options(_config({"autoscaling": {"min_replicas": 1, "max_replicas": 4}}))
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 4, 8)
    explicit = deployment_options(_config({"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 3}}))
    assert explicit["autoscaling_config"]["target_ongoing_requests"] == 3


@pytest.mark.parametrize(("ray", "fields", "message"), [
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, {}, "field 'ray.num_replicas': expected num_replicas or"),
    ({"autoscaling": {"min_replicas": 4, "max_replicas": 3}}, {}, "'ray.autoscaling.min_replicas': expected at most"),
    ({"autoscaling": {"max_replicas": 3, "initial_replicas": 5}}, {}, "'ray.autoscaling.initial_replicas'"),
    ({"autoscaling": {}}, {}, "ray.autoscaling.max_replicas"),
    ({"num_replicas": 0}, {}, "'ray.num_replicas'"),
    ({"num_gpus": -1}, {}, "'ray.num_gpus': expected a number >= 0"),
    ({"replicas": 2}, {}, "unknown field 'ray.replicas'"),
    ({"max_ongoing_requests": 5000}, {}, "at most dynamic_batching.max_queue_size (1024)"),
    ({}, {"instance_group": {"device": "cuda"}}, "'ray.num_gpus': expected [ray] num_gpus of at least 1"),
])  # fmt: skip
def test_bad_tables_name_the_field(ray: dict, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="m/config.toml") as caught:
        _config(ray, **fields)
    assert message in str(caught.value)


def test_replica_ingress_refuses_autoscaling_it_would_starve(tmp_path) -> None:
    from conveyor.scaleout.ray_apps import plan_deployments

    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("class Model:\n    def execute(self, inputs):\n        return inputs\n")
    (model / "config.toml").write_text(
        'backend = "python"\nmax_batch_size = 4\n[[inputs]]\nname = "x"\ndatatype = "FP32"\ndims = [1]\n'
        '[[outputs]]\nname = "x"\ndatatype = "FP32"\ndims = [1]\n[ray.autoscaling]\nmax_replicas = 2\n')
    (plan,) = plan_deployments(tmp_path / "repo", ingress="serve")
    assert plan.options["autoscaling_config"]["max_replicas"] == 2 and plan.route_prefix == "/v2/models/m"
    with pytest.raises(ConfigError, match="model 'm' cannot be deployed with ingress 'replica'"):
        plan_deployments(tmp_path / "repo", ingress="replica")
    with pytest.raises(ConfigError, match="ingress must be one of serve, replica"):
        plan_deployments(tmp_path / "repo", ingress="proxy")
    with pytest.raises(ConfigError, match="model 'nope' is not in"):
        plan_deployments(tmp_path / "repo", models=["nope"])
