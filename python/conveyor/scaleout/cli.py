"""`conveyor kserve runtime|chart`: KServe and Kubernetes manifests for a model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from conveyor.cli_values import print_help_and_fail
from conveyor.errors import ConfigError
from conveyor.scaleout.chart import DASHBOARD_SOURCE, write_chart
from conveyor.scaleout.kserve import (
    DEFAULT_IMAGE,
    DEFAULT_NAME,
    HTTP_PORT,
    STORAGE_URI_PLACEHOLDER,
    inference_service,
    kubernetes_name,
    repository_models,
    serving_runtime,
)
from conveyor.scaleout.yaml_text import to_yaml


def register_kserve_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "kserve",
        help="KServe serving runtime and Helm chart for a model repository",
        description="Write Kubernetes manifests that run Conveyor: a KServe serving runtime with an "
        "InferenceService example, or a Helm chart of its own (see docs/kserve.md).",
    )
    p.set_defaults(run=lambda args: print_help_and_fail(p))
    commands = p.add_subparsers(title="kserve commands", metavar="COMMAND")
    _runtime_parser(commands)
    _chart_parser(commands)



def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, metavar="DIR",
                   help="the model repository to check and describe (default: the bundled examples)")
    p.add_argument("--image", default=DEFAULT_IMAGE,
                   help=f"the container image, built from the repository's Dockerfile (default {DEFAULT_IMAGE})")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the runtime's or release's name (default {DEFAULT_NAME})")


def _runtime_parser(commands: Any) -> None:
    p = commands.add_parser(
        "runtime",
        help="write a ClusterServingRuntime (or ServingRuntime) and an InferenceService example",
        description="Write OUT/clusterservingruntime.yaml (OUT/servingruntime.yaml with --namespaced), which "
        "runs `conveyor serve /mnt/models` on KServe's ports, and OUT/inferenceservice.yaml, an "
        "InferenceService for --model on that runtime. Apply them with kubectl apply -f OUT.",
        epilog="Exit status: 0 written, 2 a usage error (a repository that cannot be served, an unknown model).",
    )
    _common_flags(p)
    p.add_argument("--out", type=Path, default=Path("conveyor-kserve"), metavar="DIR",
                   help="the directory to write into (default ./conveyor-kserve)")
    p.add_argument("--namespaced", action="store_true",
                   help="a ServingRuntime, in one namespace, instead of a cluster-wide ClusterServingRuntime")
    p.add_argument("--model", help="the model the InferenceService example shows (default: the first by name)")
    p.set_defaults(run=_run_runtime)


def _chart_parser(commands: Any) -> None:
    p = commands.add_parser(
        "chart",
        help="write a Helm chart: Deployment, Service, HPA, ServiceMonitor, Grafana dashboard",
        description="Write a Helm chart into OUT that runs `conveyor serve` on a repository from a volume, with a "
        "Service (http, grpc, metrics), a HorizontalPodAutoscaler on requests in flight (needs "
        "prometheus-adapter), a ServiceMonitor and the Grafana dashboard in a ConfigMap.",
        epilog="Exit status: 0 written, 2 a usage error (a repository that cannot be served).",
    )
    _common_flags(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the chart's directory (created)")
    p.set_defaults(run=_run_chart)


def _fail(command: str, message: str) -> int:
    print(f"conveyor kserve {command}: error: {message}", file=sys.stderr)
    return 2


def _models(args: argparse.Namespace) -> dict[str, str]:
    """The repository's models; ConfigError for a --name Kubernetes would refuse, or a repository that cannot serve."""
    from conveyor.examples import example_repository

    if kubernetes_name(args.name) != args.name:
        raise ConfigError(f"--name {args.name!r} is not a Kubernetes name: lower-case letters, digits and '-', "
                          f"starting with a letter, at most 63 characters (e.g. {kubernetes_name(args.name)!r})")
    return repository_models(args.repository or example_repository())


def _run_runtime(args: argparse.Namespace) -> int:
    try:
        models = _models(args)
    except ConfigError as exc:
        return _fail("runtime", str(exc))
    model = args.model or next(iter(models))
    if model not in models:
        return _fail("runtime", f"model '{model}' is not in the repository; it holds: {', '.join(models)}")
    runtime = serving_runtime(name=args.name, image=args.image, namespaced=args.namespaced)
    args.out.mkdir(parents=True, exist_ok=True)
    runtime_file = args.out / f"{runtime['kind'].lower()}.yaml"
    runtime_file.write_text(to_yaml(runtime, _runtime_comment(models)))
    service_file = args.out / "inferenceservice.yaml"
    service_file.write_text(to_yaml(inference_service(model, runtime=args.name), _service_comment(model, models)))
    print(f"wrote {runtime_file} and {service_file}")
    return 0


def _runtime_comment(models: dict[str, str]) -> str:
    listed = ", ".join(f"{name} ({model_format})" for name, model_format in models.items())
    return (f"Conveyor as a KServe serving runtime: `conveyor serve /mnt/models` (REST on {HTTP_PORT}, gRPC on 8081,\n"
            f"Prometheus metrics on /metrics). Written by `conveyor kserve runtime` for a repository of: {listed}.")


def _service_comment(model: str, models: dict[str, str]) -> str:
    comment = (f"An InferenceService on Conveyor. storageUri ({STORAGE_URI_PLACEHOLDER}) is a placeholder:\n"
               "point it at the model repository's directory (s3://, gs://, pvc://NAME/PATH, ...). KServe's storage\n"
               "initializer copies it to /mnt/models and Conveyor serves every model in it, this one among them:\n"
               f"  {model} ({models[model]}): POST /v2/models/{model}/infer on the service's URL.")
    if kubernetes_name(model) != model:
        comment += (f"\nThe InferenceService is named {kubernetes_name(model)}: Kubernetes names allow no '_' "
                    "or capitals.")
    return comment


def _run_chart(args: argparse.Namespace) -> int:
    try:
        models = _models(args)
    except ConfigError as exc:
        return _fail("chart", str(exc))
    dashboard = write_chart(args.out, name=args.name, image=args.image, models=list(models))
    print(f"wrote the Helm chart {args.name} to {args.out}")
    if not dashboard:
        print(f"conveyor kserve chart: warning: {DASHBOARD_SOURCE} is not installed: the chart's Grafana "
              "dashboard ConfigMap is left out", file=sys.stderr)
    return 0
