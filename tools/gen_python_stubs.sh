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
"$py" -m grpc_tools.protoc -I"$root/proto/dysco/v1" --python_out="$out" --grpc_python_out="$out" \
  "$root/proto/dysco/v1/generation.proto"
"$py" -m grpc_tools.protoc -I"$root/proto/grpc/health/v1" --python_out="$out" --grpc_python_out="$out" \
  "$root/proto/grpc/health/v1/health.proto"
