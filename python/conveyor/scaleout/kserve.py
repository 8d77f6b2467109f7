"""Conveyor as a KServe serving runtime: the ServingRuntime and InferenceService manifests.

KServe's storage initializer copies an InferenceService's storageUri to /mnt/models and
sends HTTP to port 8080; Conveyor serves that directory as a model repository, KServe v2
over REST on 8080 and gRPC on 8081, Prometheus metrics on /metrics of the HTTP port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor import __version__
from conveyor.backends import model_file_path
from conveyor.errors import ConfigError
from conveyor.repository import ModelRepository

MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
HTTP_PORT = 8080  # KServe's default HTTP port for a predictor
GRPC_PORT = 8081
CONTAINER_NAME = "kserve-container"  # the name KServe merges an InferenceService's container into
DATA_DIR = "/tmp/conveyor-data"  # capture and label files: /mnt/models may be read-only
GRACE_PERIOD_S = 25  # inside Kubernetes' default 30 s between SIGTERM and SIGKILL
DEFAULT_IMAGE = f"conveyor-serve:{__version__}"  # built from the Dockerfile at the repository root
DEFAULT_NAME = "conveyor"
STORAGE_URI_PLACEHOLDER = "s3://YOUR-BUCKET/path/to/model-repository"
API_GROUP = "serving.kserve.io"
LABELS = {"app.kubernetes.io/name": "conveyor", "app.kubernetes.io/version": __version__}


@dataclass(frozen=True)
class ModelFormat:
    name: str
    version: str
    reads: str  # what Conveyor reads under this format's name
    auto_select: bool = False
    priority: int | None = None


# KServe picks a runtime for an InferenceService by its modelFormat. Only "conveyor" is
# auto-selected: an InferenceService naming onnx or xgboost usually stores a bare model
# file for Triton or MLServer, while Conveyor reads a model repository (one directory per
# model, version directories, config.toml), so those formats need `runtime:` named.
MODEL_FORMATS = (
    ModelFormat("conveyor", "1", "a Conveyor model repository: every backend, model graphs", True, 1),
    ModelFormat("onnx", "1", "model.onnx (backend onnx or native)"),
    ModelFormat("pytorch", "2", "model.pt2, a torch.export AOTInductor package (backend torch)"),
    ModelFormat("xgboost", "2", "model.json, model.ubj or xgboost.* through Treelite (backend trees)"),
    ModelFormat("lightgbm", "4", "model.txt through Treelite (backend trees)"),
    ModelFormat("sklearn", "1", "model.tl, a scikit-learn forest saved as a Treelite checkpoint (backend trees)"),
)
_TREE_FILE_FORMATS = {"model.txt": "lightgbm", "model.tl": "sklearn", "checkpoint.tl": "sklearn"}


def supported_model_formats() -> list[dict[str, Any]]:
    """The runtime's supportedModelFormats; priority only where autoSelect is on, as KServe requires."""
    formats = []
    for model_format in MODEL_FORMATS:
        entry: dict[str, Any] = {"name": model_format.name, "version": model_format.version,
                                 "autoSelect": model_format.auto_select}  # fmt: skip
        if model_format.priority is not None:
            entry["priority"] = model_format.priority
        formats.append(entry)
    return formats


def serve_command() -> list[str]:
    """The container's command line: `conveyor serve` over /mnt/models on KServe's ports."""
    return ["conveyor", "serve", MODEL_DIR, "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
            "--host", "0.0.0.0", "--data-dir", DATA_DIR, "--grace-period-s", str(GRACE_PERIOD_S)]  # fmt: skip


def _probe(path: str, *, period_s: int, failures: int, initial_delay_s: int = 0) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": HTTP_PORT}, "initialDelaySeconds": initial_delay_s,
            "periodSeconds": period_s, "failureThreshold": failures}  # fmt: skip


def runtime_container(image: str) -> dict[str, Any]:
    command = serve_command()
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "command": command[:1],
        "args": command[1:],
        # One port: Knative serves a single one per container. gRPC (8081) is reachable
        # in RawDeployment mode, or with an InferenceService that names port h2c 8081.
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": _probe("/v2/health/ready", period_s=5, failures=3),
        # Loading a repository can take a while: 10 s + 6 x 10 s before a restart.
        "livenessProbe": _probe("/v2/health/live", period_s=10, failures=6, initial_delay_s=10),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    }


def serving_runtime(*, name: str = DEFAULT_NAME, image: str = DEFAULT_IMAGE,
                    namespaced: bool = False) -> dict[str, Any]:
    """A ClusterServingRuntime (or, `namespaced`, a ServingRuntime) running Conveyor."""
    return {
        "apiVersion": f"{API_GROUP}/v1alpha1",
        "kind": "ServingRuntime" if namespaced else "ClusterServingRuntime",
        "metadata": {"name": name, "labels": dict(LABELS)},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": supported_model_formats(),
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [runtime_container(image)],
        },
    }


def kubernetes_name(model: str) -> str:
    """A DNS-1035 label from a model name: lower case, '_' and '.' as '-', at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]", "-", model.lower()).strip("-")[:63].rstrip("-")
    if not label or not label[0].isalpha():
        label = f"m-{label}"[:63].rstrip("-")
    return label


def inference_service(model: str, *, runtime: str = DEFAULT_NAME) -> dict[str, Any]:
    """An InferenceService serving the repository that holds `model`, on the runtime `runtime`."""
    return {
        "apiVersion": f"{API_GROUP}/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": kubernetes_name(model)},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "conveyor", "version": "1"},
            "runtime": runtime,
            "storageUri": STORAGE_URI_PLACEHOLDER,
        }}},
    }


def repository_models(root: Path) -> dict[str, str]:
    """Model name -> KServe format name for every model of the repository at `root`.

    ConfigError names the repository or the model when one cannot be served.
    """
    repository = ModelRepository(root)
    names = repository.list_models()
    if not names:
        raise ConfigError(f"{root}: no model directories: a repository holds one directory per model")
    return {name: _model_format(repository, name) for name in names}


def _model_format(repository: ModelRepository, name: str) -> str:
    try:
        source = repository.load_model(name)
    except ConfigError as exc:
        raise ConfigError(f"model '{name}' cannot be served: {exc}") from None
    backend = source.config.backend
    if backend in ("onnx", "native"):
        return "onnx"
    if backend == "torch":
        return "pytorch"
    if backend == "trees":
        newest = source.versions[max(source.versions)]
        return _TREE_FILE_FORMATS.get(model_file_path("trees", newest).name, "xgboost")
    return "conveyor"  # python models and graphs exist only in Conveyor's repository layout
