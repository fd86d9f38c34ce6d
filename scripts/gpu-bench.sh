#!/usr/bin/env bash
# The GPU benchmark of issue 9 (docs/performance.md "GPU (issue 9)"), on the GPU machine after
# scripts/gpu-check.sh has built build-gpu/ there (same warm machine, a second command): builds
# only what is missing (bench-gpu, dysco-server, dysco-client), exports the synthetic packages of
# real shapes into /tmp (seeded random bf16 weights, ~16 GB each; a package already there is
# reused), and runs, per phase (GPU_BENCH_PARTS):
#   bench   bench-gpu on each shape of GPU_BENCH_SHAPES: per-token decode plain / DySCO at
#           GPU_BENCH_CONTEXTS, the TTFT of the longest, the floors of the same run;
#   server  dysco-server --device cuda:0 on the Qwen3-8B shape + dysco-client bench: 1 and
#           GPU_BENCH_SESSIONS concurrent DySCO sessions of GPU_BENCH_SERVER_PROMPT tokens;
#   peer    bench/hf_peer.py on the Qwen3-8B shape: transformers' generate, static cache +
#           torch.compile (falls back to no compile, and says so), same contexts.
# Then prints one table (bench/plot_gpu.py --table), with each profiled shape's step in order under
# it (bench/timeline.py --summary over bench-gpu's --timeline-json), and copies to $OUT (default
# gpu-bench-out/):
# gpu-bench.md, this run's JSON of each part, and gpu-bench-logs.tgz (every log and JSON file under
# $BUILD/gpu-bench; at most 8 files, no folders).
#
# Time (H200, estimates; a timing line per phase is printed): per shape export ~1-2 min, bench-gpu
# ~1 min (load ~15 s, 128K prefill ~10-15 s with a flash-style prefill, decode ~10 s); server
# ~1.5 min; peer ~3-4 min (three compiles, two prefills per context). Everything does not fit one
# 10-minute command: run `GPU_BENCH_PARTS="bench server"` then `GPU_BENCH_PARTS=peer` (the
# packages in /tmp are reused on the same machine). Each phase runs under `timeout` within
# GPU_BENCH_BUDGET_S (default 570 s) of the script's start, so a slow phase is cut, not the call.
#
# Knobs: GPU_BENCH_PARTS ("bench server peer"), GPU_BENCH_SHAPES ("qwen3-8b llama3.1-8b"),
# GPU_BENCH_CONTEXTS (8192,32768,131072), GPU_BENCH_STEPS (20), GPU_BENCH_PEER=0 / GPU_BENCH_SERVER=0
# (drop a part), GPU_BENCH_PEER_CONTEXTS, GPU_BENCH_PEER_COMPILE (1), GPU_BENCH_SESSIONS (16),
# GPU_BENCH_SERVER_PROMPT (32000), GPU_BENCH_SERVER_NEW_TOKENS (128), GPU_BENCH_PKG_DIR
# (/tmp/dysco-bench; a shape's package with a .complete stamp is reused), GPU_BENCH_BUDGET_S (570),
# BUILD_GPU_DIR (build-gpu), GPU_BENCH_MAX_PREFILL_S (150: bench-gpu cuts a slower prefill and
# skips the contexts past it); for a dry run on a CPU build: GPU_BENCH_DEVICE=cpu,
# GPU_BENCH_MAIN_SHAPE (the server/peer shape, qwen3-8b) and a pre-exported tiny package.
# GPU_BENCH_CUDA_GRAPHS=0|1: bench-gpu --cuda-graphs (the runner's default when unset);
# GPU_BENCH_EXPORT_DEVICE=cuda: the exporter draws the random weights on the GPU (faster);
# GPU_BENCH_PROFILE_STEPS (5): bench-gpu --profile-steps, per-kernel times at the longest context.
# GPU_BENCH_EXTRA_ARGS: more bench-gpu flags (word-split, e.g. "--logits-to-host 1"; "--chunk=16384"
# is one word, which a scripts/gpu-ab.sh setting can carry), and
# GPU_BENCH_TAG: a suffix of the bench-gpu label and file names, so that an A/B of two settings
# runs twice in one call, the second with the tag (the table then lists both).
# Usage: bash scripts/gpu-bench.sh [DEBS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T_START=$(date +%s)
DEBS=${1:-.debs}
RESULTS=${OUT:-$PWD/gpu-bench-out}
BUILD=${BUILD_GPU_DIR:-build-gpu}
PARTS=${GPU_BENCH_PARTS:-bench server peer}
SHAPES=${GPU_BENCH_SHAPES:-qwen3-8b llama3.1-8b}
CONTEXTS=${GPU_BENCH_CONTEXTS:-8192,32768,131072}
STEPS=${GPU_BENCH_STEPS:-20}
PEER_CONTEXTS=${GPU_BENCH_PEER_CONTEXTS:-$CONTEXTS}
PEER_COMPILE=${GPU_BENCH_PEER_COMPILE:-1}
SESSIONS=${GPU_BENCH_SESSIONS:-16}
SERVER_PROMPT=${GPU_BENCH_SERVER_PROMPT:-32000}
SERVER_NEW=${GPU_BENCH_SERVER_NEW_TOKENS:-128}
PKGS=${GPU_BENCH_PKG_DIR:-/tmp/dysco-bench}
DEVICE=${GPU_BENCH_DEVICE:-cuda:0}           # cpu: a dry run of this script on a CPU build
MAIN_SHAPE=${GPU_BENCH_MAIN_SHAPE:-qwen3-8b}  # the shape of the server and peer parts
BUDGET=${GPU_BENCH_BUDGET_S:-570}
[ "${GPU_BENCH_PEER:-1}" = 0 ] && PARTS=${PARTS//peer/}
[ "${GPU_BENCH_SERVER:-1}" = 0 ] && PARTS=${PARTS//server/}
LOGS=$PWD/$BUILD/gpu-bench
mkdir -p "$LOGS" "$RESULTS" "$PKGS"
fail=0

has_part() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
elapsed() { echo $(( $(date +%s) - T_START )); }
# Seconds a phase may take: its cap, within what is left of the budget (at least 10).
allow() { local left=$(( BUDGET - $(elapsed) - 15 )); [ "$left" -gt "$1" ] && left=$1; [ "$left" -lt 10 ] && left=10; echo "$left"; }
phase() { printf '[gpu-bench] %-34s %-5s %5ss (at %ss)  %s\n' "$1" "$2" "$3" "$(elapsed)" "$4" | tee -a "$LOGS/phases.txt"; }
# Copies this run's JSON files (its tag's bench-gpu files, the untagged server and peer files), the
# table and every log and JSON file in one archive: $LOGS keeps earlier runs' tagged files (e.g.
# scripts/gpu-ab.sh's), which would push this run's past the device tool's 8 files.
publish() {
  local shape tag=${GPU_BENCH_TAG:-}
  for shape in $SHAPES; do cp "$LOGS/bench-gpu-$shape$tag.json" "$RESULTS/" 2>/dev/null; done
  if [ -z "$tag" ]; then
    cp "$LOGS"/hf-peer-*.json "$LOGS"/server-bench-*.json "$RESULTS/" 2>/dev/null
  fi
  [ -f "$LOGS/gpu-bench.md" ] && cp "$LOGS/gpu-bench.md" "$RESULTS/"
  tar czf "$RESULTS/gpu-bench-logs.tgz" -C "$LOGS" . 2>/dev/null
}

# shellcheck source=scripts/gpu-device-env.sh
source scripts/gpu-device-env.sh "$DEBS" > "$LOGS/env.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader \
  > "$LOGS/gpu.txt" 2>&1
df -h /tmp >> "$LOGS/gpu.txt" 2>&1

# The row of a phase that started at $t0 and ended with exit status $2: ok with details $3, or FAIL
# naming the logs ($4...) and printing their last lines (then the whole run fails).
finish_phase() {
  local name=$1 rc=$2 details=$3
  shift 3
  if [ "$rc" -eq 0 ]; then
    phase "$name" ok $(( $(date +%s) - t0 )) "$details"
  else
    local names
    names=$(for f in "$@"; do basename "$f"; done | paste -sd/ | sed 's|/| / |g')
    phase "$name" FAIL $(( $(date +%s) - t0 )) "rc $rc, see $names"
    tail -n 8 "$@"
    fail=1
  fi
}

# Build what is missing (gpu-check.sh builds everything; ninja has nothing to do then), configuring
# build-gpu/ first when gpu-check.sh has not run on this machine.
t0=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ] && ! dysco_configure_gpu_build "$BUILD" > "$LOGS/configure.log" 2>&1; then
  phase build FAIL $(( $(date +%s) - t0 )) "configuring $BUILD/ failed: see configure.log"
  publish
  exit 1
fi
if cmake --build "$BUILD" -j "${JOBS:-16}" --target bench-gpu dysco-server dysco-client \
    > "$LOGS/build.log" 2>&1; then
  phase build ok $(( $(date +%s) - t0 )) "bench-gpu dysco-server dysco-client"
else
  phase build FAIL $(( $(date +%s) - t0 )) "see build.log"
  tail -20 "$LOGS/build.log"
  publish
  exit 1
fi

# Exports (or reuses) the synthetic package of shape $1 into $PKGS/$1; makes room first by
# deleting the other shapes' packages when less than 20 GB are free.
export_shape() {
  local shape=$1 dir=$PKGS/$1
  if [ -f "$dir/.complete" ]; then
    phase "export $shape" ok 0 "reused $dir"
    return 0
  fi
  local free_gb
  free_gb=$(df -BG --output=avail "$PKGS" | tail -1 | tr -dc 0-9)
  if [ "${free_gb:-0}" -lt 20 ]; then
    for other in "$PKGS"/*; do [ "$other" != "$dir" ] && rm -rf "$other"; done
  fi
  rm -rf "$dir"
  local t0 rc
  t0=$(date +%s)
  local extra=()
  [ -n "${GPU_BENCH_EXPORT_DEVICE:-}" ] && extra=(--device "$GPU_BENCH_EXPORT_DEVICE")
  timeout "$(allow 240)" python3 -m tools.dysco_export synthetic --shape "$shape" --dtype bfloat16 \
    --seed 0 --out "$dir" --kernels "$BUILD/lib/libdysco_kernels.so" "${extra[@]}" \
    > "$LOGS/export-$shape.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    touch "$dir/.complete"
    phase "export $shape" ok $(( $(date +%s) - t0 )) "$(du -sh "$dir" | cut -f1) in $dir"
    return 0
  fi
  phase "export $shape" FAIL $(( $(date +%s) - t0 )) "rc $rc, see export-$shape.log"
  tail -5 "$LOGS/export-$shape.log"
  fail=1
  return 1
}

run_bench_gpu() {
  local shape=$1 t0 rc extra=() name
  name=$shape${GPU_BENCH_TAG:-}
  [ -n "${GPU_BENCH_CUDA_GRAPHS:-}" ] && extra=(--cuda-graphs "$GPU_BENCH_CUDA_GRAPHS")
  # shellcheck disable=SC2206  # word splitting of the extra flags is the point
  [ -n "${GPU_BENCH_EXTRA_ARGS:-}" ] && extra+=(${GPU_BENCH_EXTRA_ARGS})
  # The profiled steps' events in order (a folder of their own: plot_gpu.py reads $LOGS/*.json).
  mkdir -p "$LOGS/timelines"
  extra+=(--timeline-json "$LOGS/timelines/$name.json")
  t0=$(date +%s)
  timeout "$(allow 300)" "$BUILD/bin/bench-gpu" --model "$PKGS/$shape" --device "$DEVICE" \
    --contexts "$CONTEXTS" --steps "$STEPS" --max-prefill-s "${GPU_BENCH_MAX_PREFILL_S:-150}" \
    --profile-steps "${GPU_BENCH_PROFILE_STEPS:-5}" --label "$name" --json "$LOGS/bench-gpu-$name.json" \
    "${extra[@]}" > "$LOGS/bench-gpu-$name.log" 2>&1
  finish_phase "bench-gpu $name" $? "contexts $CONTEXTS ${GPU_BENCH_EXTRA_ARGS:-}" \
    "$LOGS/bench-gpu-$name.log"
}

# dysco-server on cuda:0 + dysco-client bench: 1 session, then $SESSIONS concurrent ones
# (--compare-single), DySCO on, $SERVER_PROMPT-token prompts.
run_server() {
  local shape=$1 t0 port=50411 pages
  t0=$(date +%s)
  # Every session's pages (prompt + new tokens) plus one more session's worth of slack.
  pages=$(( (SESSIONS + 1) * ((SERVER_PROMPT + SERVER_NEW + 15) / 16 + 1) ))
  "$BUILD/bin/dysco-server" --model "$PKGS/$shape" --device "$DEVICE" --host 127.0.0.1 \
    --port $port --metrics-host 127.0.0.1 --metrics-port $((port + 100)) --kv-pages "$pages" \
    --max-batch "$SESSIONS" --prefill-chunk 8192 --max-step-tokens 8192 \
    --max-request-bytes $((64 << 20)) > "$LOGS/server-$shape.log" 2>&1 &
  local spid=$!
  timeout "$(allow 300)" "$BUILD/bin/dysco-client" bench --target "127.0.0.1:$port" \
    --wait-ready-s 180 --concurrency "$SESSIONS" --requests "$SESSIONS" --compare-single \
    --prompt-tokens "$SERVER_PROMPT" --max-new-tokens "$SERVER_NEW" --dysco --warmup 1 --json \
    --no-progress > "$LOGS/server-bench-$shape.json" 2> "$LOGS/server-bench-$shape.err"
  local rc=$?
  kill "$spid" 2>/dev/null
  wait "$spid" 2>/dev/null
  finish_phase "server $SESSIONS x ${SERVER_PROMPT} DySCO" $rc "dysco-client bench --compare-single" \
    "$LOGS/server-bench-$shape.err" "$LOGS/server-$shape.log"
}

run_peer() {
  local shape=$1 t0 rc
  t0=$(date +%s)
  timeout "$(allow 540)" python3 bench/hf_peer.py --model "$PKGS/$shape" --device "$DEVICE" \
    --contexts "$PEER_CONTEXTS" --steps 32 --compile "$PEER_COMPILE" \
    --json "$LOGS/hf-peer-$shape.json" > "$LOGS/hf-peer-$shape.log" 2>&1
  finish_phase "hf peer $shape" $? "transformers generate, static cache, compile $PEER_COMPILE" \
    "$LOGS/hf-peer-$shape.log"
}

for shape in $SHAPES; do
  needs=0
  has_part bench && needs=1
  [ "$shape" = "$MAIN_SHAPE" ] && { has_part server || has_part peer; } && needs=1
  [ $needs -eq 1 ] || continue
  export_shape "$shape" || continue
  has_part bench && run_bench_gpu "$shape"
  if [ "$shape" = "$MAIN_SHAPE" ]; then
    has_part server && run_server "$shape"
    has_part peer && run_peer "$shape"
  fi
done

python3 bench/plot_gpu.py --table "$LOGS/gpu-bench.md" "$LOGS"/*.json > "$LOGS/table.log" 2>&1 ||
  { cat "$LOGS/table.log"; fail=1; }
# Each profiled shape's step in order (bench/timeline.py --summary: the kernels by their share of
# the critical path, and the DySCO stage between the passes); this run's timelines only.
for shape in $SHAPES; do
  timeline="$LOGS/timelines/$shape${GPU_BENCH_TAG:-}.json"
  if [ "${GPU_BENCH_PROFILE_STEPS:-5}" -eq 0 ] || [ ! -s "$timeline" ] ||
    [ ! "$timeline" -nt "$LOGS/env.log" ]; then
    continue
  fi
  {
    echo
    echo "Critical path ($shape${GPU_BENCH_TAG:-}, bench/timeline.py):"
    python3 bench/timeline.py "$timeline" --mode plain --summary 2>&1 | cut -c1-600
    python3 bench/timeline.py "$timeline" --mode dysco --summary --window ProbeMean RmsNorm 2>&1 |
      cut -c1-600
  } >> "$LOGS/gpu-bench.md"
done
cat "$LOGS/phases.txt" >> "$LOGS/gpu-bench.md"
cat "$LOGS/gpu-bench.md"
echo "gpu-bench: $( [ $fail -eq 0 ] && echo all ran || echo FAILURES ) in $(elapsed) s; logs in $LOGS"
publish
exit $fail
