#!/usr/bin/env bash
# The one script run on the GPU machine (H200, torch 2.11.0+cu130 in its python3, CMake, nvcc, no
# network): sets up the build dependencies from the carried Debian packages, configures and builds
# the CUDA variant against that machine's torch, runs the GPU tests (test_kernels_cuda) and the
# model-free CPU tests and prints one summary table. Logs go to $BUILD/gpu-check/; the table, the GPU
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
  cp "$OUT/test_kernels_cuda.log" "$RESULTS/" 2>/dev/null
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
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDYSCO_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_PREFIX_PATH="$DYSCO_CMAKE_PREFIX_PATH" \
  -DTORCH_LIBRARY="$TORCH_LIB/libtorch.so" -Dc10_LIBRARY="$TORCH_LIB/libc10.so" \
  -DGTEST_ROOT="$SYS/usr" > "$OUT/configure.log" 2>&1
configure_rc=$?
# The test binaries first (they must build); then everything else (server, client, tools,
# benchmarks), reported on its own row, so that a link problem there does not hide test results.
TEST_BINARIES="test_kernels_cuda test_kernels test_dysco_ops test_kv_page_pool test_sampler \
  test_chat_format test_tokenizer test_model_config"
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

# GPU tests, then the CPU tests that need no model package (models/ does not travel).
run_test test_kernels_cuda
for t in $TEST_BINARIES; do
  [ "$t" = test_kernels_cuda ] || run_test "$t"
done
# The worst CUDA-vs-CPU errors the GPU test printed, by dtype (fp32: every check that is not a
# bf16/fp16 attention check), and its timings (ms per call, from CUDA events).
awk '/^\[maxerr\]/ {
       kind = /BFloat16/ ? "bf16" : (/Half/ ? "fp16" : "fp32");
       n[kind]++; if ($(NF-2) > a[kind]) a[kind] = $(NF-2); if ($NF > r[kind]) r[kind] = $NF }
     END { for (k in n) printf "[maxerr] %s: %d comparisons, max abs error %.3g, max relative error %.3g (|cpu| >= 1e-3)\n", k, n[k], a[k], r[k] }' \
  "$OUT/test_kernels_cuda.log" | sort | tee -a "$SUMMARY"
grep -h "^\[timing\]" "$OUT/test_kernels_cuda.log" | tee -a "$SUMMARY"
echo "gpu-check: $( [ $fail -eq 0 ] && echo all green || echo FAILURES ); logs in $OUT" | tee -a "$SUMMARY"
publish
exit $fail
