#!/usr/bin/env bash
# Generates the Python gRPC stubs of proto/ into OUT_DIR (not committed; the tests call this into a temp dir):
#   OUT_DIR/generation_pb2.py, generation_pb2_grpc.py   (dysco.v1, from proto/dysco/v1/generation.proto)
#   OUT_DIR/health_pb2.py, health_pb2_grpc.py           (grpc.health.v1, from proto/grpc/health/v1/health.proto)
# The modules are top-level on purpose: a generated "grpc/health/..." package would shadow grpcio's "grpc".
# Usage: tools/gen_python_stubs.sh OUT_DIR   (PYTHON overrides the interpreter; it needs grpcio-tools)
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="$1"
mkdir -p "$out"
# grpcio-tools where the interpreter has it (the CI venv); else protoc with gRPC's Python plugin (Debian's
# protobuf-compiler and protobuf-compiler-grpc: the GPU machine, whose python3 has grpcio but not the tools).
if "$py" -c "import grpc_tools.protoc" 2>/dev/null; then
  protoc=("$py" -m grpc_tools.protoc)
elif command -v protoc > /dev/null && command -v grpc_python_plugin > /dev/null; then
  protoc=(protoc "--plugin=protoc-gen-grpc_python=$(command -v grpc_python_plugin)")
else
  echo "gen_python_stubs: neither grpc_tools (pip grpcio-tools) nor protoc + grpc_python_plugin found" >&2
  exit 1
fi
for proto in dysco/v1/generation.proto grpc/health/v1/health.proto; do
  "${protoc[@]}" -I"$root/proto/$(dirname "$proto")" --python_out="$out" --grpc_python_out="$out" \
    "$root/proto/$proto"
done
