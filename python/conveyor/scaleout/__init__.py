"""Adapters that run Conveyor on engines that scale past one machine (KServe on Kubernetes;
the Grafana dashboard its chart ships). They import the engine; the engine never imports them.
"""

from conveyor.scaleout.kserve import (
    CONTAINER_NAME,
    GRPC_PORT,
    HTTP_PORT,
    MODEL_DIR,
    inference_service,
    serving_runtime,
    supported_model_formats,
)

__all__ = [
    "CONTAINER_NAME",
    "GRPC_PORT",
    "HTTP_PORT",
    "MODEL_DIR",
    "inference_service",
    "serving_runtime",
    "supported_model_formats",
]
