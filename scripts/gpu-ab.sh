#!/usr/bin/env bash
# An A/B of CUDA settings on the GPU machine in one call (docs/gpu.md "Running on the GPU machine"):
# builds test_kernels_cuda and bench-gpu (scripts/gpu-device-env.sh's prefix from the carried .debs),
# runs the GPU tests of GPU_AB_TESTS (a gtest filter, e.g. the timing tests of the kernels changed;
# stops there if one fails), then bench-gpu on the Qwen3-8B shape once per entry of GPU_AB_RUNS, in
# that order: "tag:VAR=value,VAR=value tag:..." (an empty list after the colon is the default;
# alternate the settings, e.g. "a1: b1:DYSCO_CUDA_X=1 a2: b2:DYSCO_CUDA_X=1", since run-to-run drift
# on one machine is about 0.1 ms at 8K). The synthetic package is exported once (~50 s) and reused;
# each run takes ~35 s. Prints each run's p50 rows and DySCO breakdown, and leaves four files in
# $OUT (default gpu-ab-out/; the device tool returns few): tests.log, ab.md (the rows),
# bench.log (every run's output) and runs.tgz (each run's bench-gpu log, JSON and timeline of its
# profiled steps, for reading offline: bench/timeline.py).
# Knobs: GPU_AB_TESTS (unset: no tests), GPU_AB_RUNS (unset: no bench), GPU_AB_TEST_TIMEOUT_S (200),
# GPU_AB_BUDGET_S (570: the runs that would start past it are skipped), GPU_AB_SHAPE (qwen3-8b),
# GPU_AB_PROFILE_STEPS (0: bench-gpu --profile-steps per run; the DySCO step by pass, each profiled
# step's device timeline and bench/timeline.py's summary lines, the kernels by their share of the
# critical path and the DySCO stage, then land in ab.md), and gpu-bench.sh's own knobs (e.g.
# GPU_BENCH_CONTEXTS=131072 for the longest alone).
# Usage: bash scripts/gpu-ab.sh [DEBS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
DEBS=${1:-.debs}
RESULTS=${OUT:-$PWD/gpu-ab-out}
BUDGET=${GPU_AB_BUDGET_S:-570}
SHAPE=${GPU_AB_SHAPE:-qwen3-8b}
WORK=$(mktemp -d)
mkdir -p "$RESULTS"
elapsed() { echo $(( $(date +%s) - T0 )); }

# shellcheck source=scripts/gpu-device-env.sh
source scripts/gpu-device-env.sh "$DEBS" > "$WORK/env.log" 2>&1
dysco_configure_gpu_build build-gpu > "$WORK/configure.log" 2>&1
if ! cmake --build build-gpu -j16 --target test_kernels_cuda bench-gpu > "$WORK/build.log" 2>&1; then
  tail -60 "$WORK/build.log" | tee "$RESULTS/tests.log"
  exit 1
fi
echo "[gpu-ab] built at $(elapsed) s"

if [ -n "${GPU_AB_TESTS:-}" ]; then
  timeout "${GPU_AB_TEST_TIMEOUT_S:-200}" build-gpu/bin/test_kernels_cuda \
    --gtest_filter="$GPU_AB_TESTS" > "$RESULTS/tests.log" 2>&1
  rc=$?
  echo "[gpu-ab] tests exit $rc at $(elapsed) s"
  grep -E '^\[timing\]|FAILED|PASSED' "$RESULTS/tests.log"
  if [ "$rc" -ne 0 ]; then
    grep -B2 -A8 'Failure' "$RESULTS/tests.log" | head -60
    exit 1
  fi
fi

: > "$RESULTS/ab.md"
: > "$RESULTS/bench.log"
for run in ${GPU_AB_RUNS:-}; do
  tag=${run%%:*}
  settings=${run#*:}
  left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 60 ]; then
    echo "[gpu-ab] no time left for run $tag" | tee -a "$RESULTS/ab.md"
    break
  fi
  (
    IFS=,
    for setting in $settings; do [ -n "$setting" ] && export "${setting?}"; done
    OUT=$WORK/bench GPU_BENCH_TAG=-$tag GPU_BENCH_PARTS=bench GPU_BENCH_SHAPES=$SHAPE \
      GPU_BENCH_EXPORT_DEVICE=cuda GPU_BENCH_PROFILE_STEPS=${GPU_AB_PROFILE_STEPS:-0} GPU_BENCH_BUDGET_S=$left \
      bash scripts/gpu-bench.sh "$DEBS"
  ) > "$WORK/bench-$tag.log" 2>&1
  cat "$WORK/bench-$tag.log" >> "$RESULTS/bench.log"
  mkdir -p "$WORK/runs"
  cp "build-gpu/gpu-bench/bench-gpu-$SHAPE-$tag.log" "build-gpu/gpu-bench/bench-gpu-$SHAPE-$tag.json" \
    "$WORK/runs/" 2>/dev/null
  cp "build-gpu/gpu-bench/timelines/$SHAPE-$tag.json" "$WORK/runs/timeline-$SHAPE-$tag.json" 2>/dev/null
  tar czf "$RESULTS/runs.tgz" -C "$WORK/runs" .
  {
    echo "run $tag (${settings:-default}), done at $(elapsed) s:"
    # This run's rows: the table under its own heading (gpu-bench.sh prints every tagged run so far).
    awk -v h="### $SHAPE-$tag " 'index($0, h) == 1 { f = 1 }
      f && /^\| [0-9]+ \|/ { print }
      f && /^DySCO step breakdown/ { print substr($0, 1, 240); exit }' "$WORK/bench-$tag.log"
    # With GPU_AB_PROFILE_STEPS: the DySCO step by pass (the attention kernels' rows) and each
    # profiled step's device timeline (its idle time and longest gaps).
    awk -v h="### $SHAPE-$tag " 'index($0, h) == 1 { f = 1; next } f && /^### / { exit }
      f && (/^DySCO step by pass/ || /^Device timeline/) { print substr($0, 1, 600) }' \
      "$WORK/bench-$tag.log"
    # With GPU_AB_PROFILE_STEPS: a profiled step's kernels by their share of the critical path, and
    # the DySCO stage between the passes (bench/timeline.py; docs/performance.md "What runs").
    timeline="$WORK/runs/timeline-$SHAPE-$tag.json"
    if [ "${GPU_AB_PROFILE_STEPS:-0}" -gt 0 ] && [ -s "$timeline" ]; then
      python3 bench/timeline.py "$timeline" --mode plain --summary 2>&1 | cut -c1-600
      python3 bench/timeline.py "$timeline" --mode dysco --summary --window ProbeMean RmsNorm 2>&1 |
        cut -c1-600
    fi
  } | tee -a "$RESULTS/ab.md"
done
rm -rf "$WORK"
