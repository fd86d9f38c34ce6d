#!/usr/bin/env bash
# The one script run on the GPU machine (H200, torch 2.11.0+cu130 in its python3, CMake, nvcc, no
# network): sets up the build dependencies from the carried Debian packages, configures and builds
# the CUDA variant against that machine's torch, exports the tiny random llama package there (the
# default model's 500 MB do not travel), runs the GPU tests (test_kernels_cuda, test_model_cuda),
# the CPU tests (the tiny-model ones included), dysco-generate and dysco-server on cuda:0 against
# the same on the CPU, and prints one summary table. Logs go to $BUILD/gpu-check/; the table, the GPU
# test's log and a tarball of every log are copied to $OUT (default gpu-check-out/; few files, as
# the device tool returns at most 8). Exits non-zero when the build or any test fails.
#
# Before: scripts/fetch-gpu-debs.sh .debs on a machine with apt and a network (about 17 MB), and
# carry .debs (git-ignored) to the GPU machine. Usage there: bash scripts/gpu-check.sh [DEBS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
DEBS=${1:-.debs}
RESULTS=${OUT:-$PWD/gpu-check-out}
BUILD=${BUILD_GPU_DIR:-build-gpu}
JOBS=${JOBS:-16}
OUT=$PWD/$BUILD/gpu-check
rm -rf "$OUT"
mkdir -p "$OUT" "$RESULTS"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
publish() {
  cp "$SUMMARY" "$RESULTS/"
  cp "$OUT/test_kernels_cuda.log" "$OUT/test_model_cuda.log" "$OUT/test_model_cuda_qwen3.log" \
    "$RESULTS/" 2>/dev/null
  tar czf "$RESULTS/gpu-check-logs.tgz" -C "$OUT" .
}
row() { printf '%-28s %-6s %8s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }
fail=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' \
  >> "$OUT/gpu.txt" 2>&1
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" --version | tail -1 >> "$OUT/gpu.txt"

# shellcheck source=scripts/gpu-device-env.sh
source scripts/gpu-device-env.sh "$DEBS"

start=$(date +%s)
dysco_configure_gpu_build "$BUILD" > "$OUT/configure.log" 2>&1
configure_rc=$?
# The test binaries first (they must build); then everything else (server, client, tools,
# benchmarks), reported on its own row, so that a link problem there does not hide test results.
TEST_BINARIES="test_kernels_cuda test_model_cuda test_kernels test_dysco_ops test_kv_page_pool \
  test_sampler test_chat_format test_tokenizer test_model_config test_dysco test_batch_stepper"
build_rc=1
if [ $configure_rc -eq 0 ]; then
  # shellcheck disable=SC2086
  cmake --build "$BUILD" -j "$JOBS" --target $TEST_BINARIES > "$OUT/build.log" 2>&1
  build_rc=$?
fi
build_s=$(( $(date +%s) - start ))
printf '%-28s %-6s %8s  %s\n' "step" "result" "seconds" "details" | tee -a "$SUMMARY"
if [ $configure_rc -ne 0 ] || [ $build_rc -ne 0 ]; then
  row "configure + build -j$JOBS" FAIL "$build_s" "see configure.log / build.log"
  tail -40 "$OUT/configure.log" "$OUT/build.log" 2>/dev/null
  publish
  exit 1
fi
row "configure + build -j$JOBS" ok "$build_s" "the op library and the test binaries"
start=$(date +%s)
if cmake --build "$BUILD" -j "$JOBS" -- -k 0 > "$OUT/build-all.log" 2>&1; then
  row "build everything else" ok $(( $(date +%s) - start )) "server, client, tools, benchmarks"
else
  row "build everything else" FAIL $(( $(date +%s) - start )) \
    "$(grep -c '^FAILED' "$OUT/build-all.log") failed steps: $(grep '^FAILED' "$OUT/build-all.log" | awk '{print $NF}' | tr '\n' ' ')"
  grep -E "error|undefined reference" "$OUT/build-all.log" | head -8
  fail=1
fi

# One gtest binary: runs it, records passed / failed / skipped counts from its XML report.
run_test() {
  local name=$1
  shift
  local bin=$BUILD/bin/$name
  if [ ! -x "$bin" ]; then
    row "$name" FAIL 0 "not built"
    fail=1
    return
  fi
  local t0
  t0=$(date +%s%N)
  "$bin" --gtest_color=no --gtest_output="xml:$OUT/$name.xml" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  local counts
  counts=$(python3 - "$OUT/$name.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("no report"); sys.exit()
tests = int(root.get("tests", 0)); failures = int(root.get("failures", 0))
skipped = sum(1 for c in root.iter("testcase") if c.find("skipped") is not None)
print(f"{tests - failures - skipped} passed, {failures} failed, {skipped} skipped")
PY
)
  if [ $rc -eq 0 ]; then
    row "$name" ok "$secs" "$counts"
  else
    row "$name" FAIL "$secs" "$counts (rc $rc)"
    grep -E "Failure|FAILED|error|Expected|Which is|differ" "$OUT/$name.log" | head -20
    fail=1
  fi
}

# The tiny random packages (as ctest's export_tiny_model fixture: seed 0, fp32), exported with this
# machine's torch and the op library just built into $BUILD/test-models/tiny-FAMILY; one row each.
export_tiny() {  # FAMILY LOG_NAME [DTYPE]: DTYPE other than float32 goes into the name (tiny-llama-bfloat16)
  local family=$1 log=$OUT/$2 dtype=${3:-float32} name=tiny-$1 start
  [ "$dtype" = float32 ] || name=$name-$dtype
  local dir=$PWD/$BUILD/test-models/$name
  start=$(date +%s)
  rm -rf "$dir"
  if python3 -m tools.dysco_export tiny --family "$family" --seed 0 --dtype "$dtype" --out "$dir" \
      --kernels "$BUILD/lib/libdysco_kernels.so" > "$log" 2>&1; then
    row "export $name" ok $(( $(date +%s) - start )) "tools.dysco_export tiny --family $family --seed 0 --dtype $dtype, torch $(python3 -c 'import torch; print(torch.__version__)')"
    return 0
  fi
  row "export $name" FAIL $(( $(date +%s) - start )) "see $2"
  tail -5 "$log"
  fail=1
  return 1
}

# The llama one: test_model_cuda, test_dysco and test_batch_stepper read it through
# DYSCO_TINY_MODEL_DIR.
TINY=$PWD/$BUILD/test-models/tiny-llama
export_tiny llama export.log
export DYSCO_TINY_MODEL_DIR=$TINY
# Its bf16 twin: test_model_cuda's graphs-vs-eager test in the 8B benchmarks' dtype.
export_tiny llama export-bf16.log bfloat16 &&
  export DYSCO_TINY_BF16_MODEL_DIR=$PWD/$BUILD/test-models/tiny-llama-bfloat16

# GPU tests, then the CPU tests (models/ does not travel: the default-model tests are not run).
run_test test_kernels_cuda
run_test test_model_cuda
for t in $TEST_BINARIES; do
  case $t in test_kernels_cuda | test_model_cuda) ;; *) run_test "$t" ;; esac
done

# The same GPU model test on the tiny qwen3 package (per-head q/k RMSNorm: the rms_norm kernel on
# [tokens x heads, head_dim] rows, against the CPU's ATen expression). A link gives its log and
# report a name of their own. Without the sampled generations: over its ~151K-token vocabulary a
# seeded draw is decided by fp32 rounding differences (tests/cpp/test_model_cuda.cpp says why).
if export_tiny qwen3 export-qwen3.log; then
  ln -sf test_model_cuda "$BUILD/bin/test_model_cuda_qwen3"
  DYSCO_TINY_BF16_MODEL_DIR='' DYSCO_TINY_MODEL_DIR=$PWD/$BUILD/test-models/tiny-qwen3 run_test test_model_cuda_qwen3 \
    --gtest_filter=-ModelCudaTest.SampledGenerationsAreIdentical
fi

# The tools on cuda:0 against the same on the CPU, on the tiny package: each pair must print the
# same generated text / ids (the summary line's timings stripped).
compare_row() {  # NAME CPU_FILE GPU_FILE DETAILS
  if [ -s "$2" ] && cmp -s "$2" "$3"; then
    row "$1" ok "$SECS" "$4: identical on cpu and cuda:0"
  else
    row "$1" FAIL "$SECS" "$4: differ or empty (see $(basename "$2") / $(basename "$3"))"
    fail=1
  fi
}
IDS=$(python3 -c 'import random; r = random.Random(7); print(",".join(str(r.randint(3, 2000)) for _ in range(90)))')
IDS_SHORT=$(python3 -c 'import random; r = random.Random(8); print(",".join(str(r.randint(3, 2000)) for _ in range(17)))')
python3 - "$IDS" "$IDS_SHORT" > "$OUT/batch.jsonl" <<'PY'
import json, sys
a = [int(x) for x in sys.argv[1].split(",")]; b = [int(x) for x in sys.argv[2].split(",")]
print(json.dumps({"prompt_ids": a, "max_new_tokens": 32}))
print(json.dumps({"prompt_ids": b, "max_new_tokens": 32, "dysco": {"enabled": True, "strength": 3.0}}))
print(json.dumps({"prompt_ids": a[:61], "max_new_tokens": 32, "dysco": {"enabled": True, "top_k": 8}}))
print(json.dumps({"prompt_ids": b[:5], "max_new_tokens": 32}))
PY
GEN=$BUILD/bin/dysco-generate
t0=$(date +%s)
for dev in cpu cuda:0; do
  tag=${dev%%:*}
  "$GEN" --model "$TINY" --device "$dev" --prompt-ids "$IDS" --max-new-tokens 32 --dysco \
    --temperature 0.9 --seed 11 \
    > "$OUT/generate-dysco-$tag.out" 2> "$OUT/generate-dysco-$tag.err"
  "$GEN" --model "$TINY" --device "$dev" --batch-file "$OUT/batch.jsonl" \
    > "$OUT/generate-batch-$tag.out" 2> "$OUT/generate-batch-$tag.err"
  sed -i 's/prompt_tokens=.*//' "$OUT/generate-dysco-$tag.out"
done
SECS=$(( $(date +%s) - t0 ))
compare_row "dysco-generate --dysco" "$OUT/generate-dysco-cpu.out" "$OUT/generate-dysco-cuda.out" \
  "90-token prompt, 32 DySCO tokens sampled (T 0.9, seed 11)"
compare_row "dysco-generate --batch-file" "$OUT/generate-batch-cpu.out" "$OUT/generate-batch-cuda.out" \
  "4 sequences in one batch (2 DySCO), 32 tokens each"

# dysco-server on each device, driven by dysco-client: greedy and DySCO streams must be identical.
t0=$(date +%s)
i=0
# Waits (at most 90 s) until the server on 127.0.0.1:$1 answers health, or its process $2 is gone.
wait_serving() {
  for _ in $(seq 90); do
    "$BUILD/bin/dysco-client" health --target "127.0.0.1:$1" > /dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
for dev in cpu cuda:0; do
  tag=${dev%%:*}
  port=$((50311 + i)); i=$((i + 1))
  "$BUILD/bin/dysco-server" --model "$TINY" --device "$dev" --host 127.0.0.1 --port "$port" \
    --metrics-host 127.0.0.1 --metrics-port $((port + 100)) --kv-pages 256 > "$OUT/server-$tag.log" 2>&1 &
  spid=$!
  wait_serving "$port" "$spid"
  {
    "$BUILD/bin/dysco-client" generate --target "127.0.0.1:$port" --token-ids "$IDS" \
      --max-new-tokens 32 > "$OUT/client-plain-$tag.out"
    "$BUILD/bin/dysco-client" generate --target "127.0.0.1:$port" --token-ids "$IDS_SHORT" \
      --max-new-tokens 32 --dysco > "$OUT/client-dysco-$tag.out"
    grep -o "model_loaded.*device=[^ ]*" "$OUT/server-$tag.log" | grep -o "device=[^ ]*"
  } 2>> "$OUT/client-$tag.err" >> "$OUT/client-$tag.err"
  kill "$spid" 2>/dev/null
  wait "$spid" 2>/dev/null
done
SECS=$(( $(date +%s) - t0 ))
compare_row "dysco-server greedy" "$OUT/client-plain-cpu.out" "$OUT/client-plain-cuda.out" \
  "dysco-client generate, 90 ids, 32 tokens ($(tail -1 "$OUT/client-cuda.err"))"
compare_row "dysco-server --dysco" "$OUT/client-dysco-cpu.out" "$OUT/client-dysco-cuda.out" \
  "dysco-client generate --dysco, 17 ids, 32 tokens"
# --kv-cache-fraction on cuda:0: the pool must take 0.3 of the memory free once the model is loaded
# (the model_loaded line's kv_cache_mb against its device_free_mb, less at most one page), and serve.
t0=$(date +%s)
port=50321
"$BUILD/bin/dysco-server" --model "$TINY" --device cuda:0 --host 127.0.0.1 --port $port \
  --metrics-port -1 --kv-cache-fraction 0.3 > "$OUT/server-fraction.log" 2>&1 &
spid=$!
wait_serving "$port" "$spid"
"$BUILD/bin/dysco-client" generate --target "127.0.0.1:$port" --token-ids "$IDS" \
  --max-new-tokens 32 > "$OUT/client-fraction.out" 2> "$OUT/client-fraction.err"
kill "$spid" 2>/dev/null
wait "$spid" 2>/dev/null
SECS=$(( $(date +%s) - t0 ))
loaded=$(grep -o "model_loaded.*" "$OUT/server-fraction.log" | head -1)
field() { echo "$loaded" | grep -o " $1=[^ ]*" | cut -d= -f2; }
if python3 -c 'import sys; p, mb, free = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]); \
    sys.exit(not (p > 0 and free > 1024 and 0.3 * free - 64 <= mb <= 0.3 * free + 0.1))' \
    "$(field kv_pages)" "$(field kv_cache_mb)" "$(field device_free_mb)" 2> /dev/null &&
    cmp -s "$OUT/client-plain-cpu.out" "$OUT/client-fraction.out"; then
  row "dysco-server kv-fraction" ok "$SECS" "--kv-cache-fraction 0.3 of $(field device_free_mb) MiB free: kv_pages=$(field kv_pages), $(field kv_cache_mb) MiB; greedy stream as on cpu"
else
  row "dysco-server kv-fraction" FAIL "$SECS" "kv_pages=$(field kv_pages) kv_cache_mb=$(field kv_cache_mb) device_free_mb=$(field device_free_mb) (see server-fraction.log, client-fraction.out)"
  fail=1
fi
# The worst CUDA-vs-CPU errors the GPU test printed, by dtype (fp32: every check that is not a
# bf16/fp16 attention check), and its timings (ms per call, from CUDA events).
awk '/^\[maxerr\]/ {
       kind = /BFloat16/ ? "bf16" : (/Half/ ? "fp16" : "fp32");
       n[kind]++; if ($(NF-2) > a[kind]) a[kind] = $(NF-2); if ($NF > r[kind]) r[kind] = $NF }
     END { for (k in n) printf "[maxerr] %s: %d comparisons, max abs error %.3g, max relative error %.3g (|cpu| >= 1e-3)\n", k, n[k], a[k], r[k] }' \
  "$OUT/test_kernels_cuda.log" | sort | tee -a "$SUMMARY"
grep -h "^\[timing\]" "$OUT/test_kernels_cuda.log" | tee -a "$SUMMARY"
grep -h "^\[model\]" "$OUT/test_model_cuda.log" | tee -a "$SUMMARY"
grep -h "^\[model\]" "$OUT/test_model_cuda_qwen3.log" 2>/dev/null | sed 's/^\[model\]/[model qwen3]/' |
  tee -a "$SUMMARY"
echo "gpu-check: $( [ $fail -eq 0 ] && echo all green || echo FAILURES ); logs in $OUT" | tee -a "$SUMMARY"
publish
exit $fail
