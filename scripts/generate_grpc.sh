#!/usr/bin/env bash
# Regenerates the committed gRPC modules from python/conveyor/protocol/grpc/inference.proto.
#
# Needs grpcio-tools; the protobuf and grpcio versions it was generated with are the
# floors the package depends on (pyproject.toml), so regenerate with the oldest
# grpcio-tools those floors allow, not the newest.
#
# After protoc, the descriptors are moved out of protobuf's default pool into a
# private one. The messages keep Triton's package and names ("inference.ModelConfig",
# ...) because gRPC method paths and wire compatibility need them, and tritonclient
# registers the same names in the default pool: both in one process (a test, or a
# server that is also a client) would fail with "duplicate symbol".
set -euo pipefail
cd "$(dirname "$0")/.."

out=python/conveyor/protocol/grpc
python -m grpc_tools.protoc -I python \
  --python_out=python --pyi_out=python --grpc_python_out=python \
  "$out/inference.proto"

pb2="$out/inference_pb2.py"
if ! grep -q '_descriptor_pool.Default().AddSerializedFile' "$pb2"; then
  echo "generate_grpc.sh: protoc output changed shape; update the private-pool rewrite" >&2
  exit 1
fi
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' "$pb2"
echo "regenerated $out/inference_pb2.py, inference_pb2.pyi, inference_pb2_grpc.py"
