"""The KServe v2 protocol without I/O: shared types, HTTP codecs, model config views, error table.

The HTTP and gRPC front ends decode into the types of `types` and encode from them;
nothing here reads a socket, so all of it is tested (and benchmarked) in-process.
"""

from conveyor.protocol.classification import classification_output, classify
from conveyor.protocol.errors import ERROR_STATUSES, ErrorStatus, grpc_code_for, http_status_for, status_for
from conveyor.protocol.http_codec import (
    HEADER_LENGTH_HEADER,
    decode_infer_request,
    encode_error,
    encode_infer_response,
    encode_json,
    output_is_binary,
)
from conveyor.protocol.model_config import config_from_triton_json, input_specs, model_metadata, triton_model_config
from conveyor.protocol.raw_request import InputSpec
from conveyor.protocol.types import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedMemoryRef,
    uses_shared_memory,
)

__all__ = [
    "ERROR_STATUSES",
    "HEADER_LENGTH_HEADER",
    "ErrorStatus",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InputSpec",
    "RequestedOutput",
    "SharedMemoryRef",
    "classification_output",
    "classify",
    "config_from_triton_json",
    "decode_infer_request",
    "encode_error",
    "encode_infer_response",
    "encode_json",
    "grpc_code_for",
    "http_status_for",
    "input_specs",
    "model_metadata",
    "output_is_binary",
    "status_for",
    "triton_model_config",
    "uses_shared_memory",
]
