"""KServe v2 over gRPC: the service definition and its codec.

`inference.proto` is wire-compatible with Triton's GRPCInferenceService; the
`inference_pb2*` modules are generated from it by scripts/generate_grpc.sh (never
edit them by hand). `codec` converts between those messages and the shared
protocol types and JSON-shaped dicts of the data plane.
"""
