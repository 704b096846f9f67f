#!/usr/bin/env bash
# Regenerate fedsplit/transport/proto/ from protos/. tests/test_wire.py fails when they differ.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-fedsplit/transport/proto}"
mkdir -p "$out"
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" protos/fedsplit/v1/dataplane.proto
mv "$out/fedsplit/v1/dataplane_pb2.py" "$out/fedsplit/v1/dataplane_pb2.pyi" "$out/"
rm -r "$out/fedsplit"
touch "$out/__init__.py"
