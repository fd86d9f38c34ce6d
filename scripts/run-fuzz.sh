#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, -DDYSCO_FUZZ=ON, ASan + UBSan, in build-fuzz/: only the targets and the
# sources they compile) and runs every fuzz target for SECONDS each over a copy of its seed corpus
# (tests/fuzz/corpus/<target>/, never written to): the C++ targets tests/fuzz/fuzz_*.cpp and the Python ones
# tests/fuzz/fuzz_*.py (atheris, in .venv). Prints per target the executions, exec/s and libFuzzer's final
# coverage (cov: edges, ft: features), and exits non-zero on any crash, leak, timeout, out-of-memory or sanitizer
# report; the input that failed is kept under build-fuzz/fuzz-runs/<target>/ with the run's log.
#
#   bash scripts/run-fuzz.sh [SECONDS_PER_TARGET]     (default 20; `make fuzz`, and `make test` runs 10)
#
# Environment: FUZZ_JOBS targets at a time (default 2: one per core of the CI machine), JOBS build jobs
# (default 2), FUZZ_BUILD_DIR (default build-fuzz), FUZZ_SEED (libFuzzer -seed; default random, printed in
# each log).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-20}
JOBS=${JOBS:-2}
FUZZ_JOBS=${FUZZ_JOBS:-2}
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
PY=.venv/bin/python
start=$(date +%s)

if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
  echo "usage: scripts/run-fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi
if ! command -v clang++ >/dev/null; then
  echo "run-fuzz: clang++ not found (scripts/install-deps.sh installs it)" >&2
  exit 2
fi
if ! "$PY" -c "import atheris" 2>/dev/null; then
  echo "run-fuzz: $PY cannot import atheris (run scripts/setup-python.sh)" >&2
  exit 2
fi

# --- build ---------------------------------------------------------------------------------------------------
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DDYSCO_FUZZ=ON -DDYSCO_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" >/dev/null
if ! cmake --build "$BUILD" --target fuzz_targets -j "$JOBS" >"$BUILD/fuzz-build.log" 2>&1; then
  tail -n 60 "$BUILD/fuzz-build.log"
  echo "run-fuzz: build failed (log: $BUILD/fuzz-build.log)" >&2
  exit 1
fi
built=$(date +%s)
echo "run-fuzz: built in $((built - start)) s; ${SECONDS_PER_TARGET} s per target, $FUZZ_JOBS at a time"

# --- run -----------------------------------------------------------------------------------------------------
symbolizer=$(command -v llvm-symbolizer || command -v llvm-symbolizer-14 || true)
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1${symbolizer:+:external_symbolizer_path=$symbolizer}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
RUNS="$BUILD/fuzz-runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"

targets=()
for src in tests/fuzz/fuzz_*.cpp; do
  name=$(basename "$src" .cpp)
  [ -x "$BUILD/bin/$name" ] && targets+=("$name")
done
for src in tests/fuzz/fuzz_*.py; do targets+=("$(basename "$src" .py)"); done

# One target: a private copy of its seeds, libFuzzer's flags, its log and artifacts in $RUNS/<target>/.
run_target() {
  local name=$1 dir="$RUNS/$1"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp tests/fuzz/corpus/"$name"/* "$dir/corpus/"
  local flags=(-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
               -artifact_prefix="$dir/artifacts/" ${FUZZ_SEED:+-seed=$FUZZ_SEED})
  local rc=0
  if [ -f "tests/fuzz/$name.py" ]; then
    "$PY" "tests/fuzz/$name.py" "${flags[@]}" -max_len=8192 "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
  else
    "$BUILD/bin/$name" "${flags[@]}" -max_len=4096 "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
  fi
  echo "$rc" >"$dir/rc"
}

running=0
for name in "${targets[@]}"; do
  run_target "$name" &
  running=$((running + 1))
  if [ "$running" -ge "$FUZZ_JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

# --- report --------------------------------------------------------------------------------------------------
failed=0
printf '%-20s %-6s %12s %9s %8s %8s %8s\n' target result executions exec/s cov ft corpus
for name in "${targets[@]}"; do
  dir="$RUNS/$name"
  rc=$(cat "$dir/rc")
  # libFuzzer's last status line: "#N DONE cov: C ft: F corp: K/..b ... exec/s: E ..."
  stat=$(grep -E '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED)' "$dir/log" | tail -n 1 || true)
  runs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$stat")
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$stat")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$stat")
  corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$stat")
  execs=$(sed -nE 's/^stat::average_exec_per_sec:[[:space:]]*([0-9]+).*/\1/p' "$dir/log" | tail -n 1)
  [ -n "$execs" ] || execs=$(sed -nE 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$stat")
  result=ok
  if [ "$rc" -ne 0 ] || ls "$dir/artifacts/"* >/dev/null 2>&1 ||
     grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:|Uncaught Python exception' "$dir/log"; then
    result=FAILED
    failed=1
  fi
  printf '%-20s %-6s %12s %9s %8s %8s %8s\n' "$name" "$result" "${runs:-?}" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}"
done
for name in "${targets[@]}"; do
  dir="$RUNS/$name"
  if [ "$(cat "$dir/rc")" -ne 0 ] || ls "$dir/artifacts/"* >/dev/null 2>&1; then
    echo
    echo "run-fuzz: $name failed (exit $(cat "$dir/rc")); log $dir/log, inputs:"
    ls "$dir/artifacts/" 2>/dev/null | sed "s|^|  $dir/artifacts/|"
    grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$dir/log" | tail -n 40
  fi
done
end=$(date +%s)
echo "run-fuzz: $([ "$failed" -eq 0 ] && echo "all ${#targets[@]} targets passed" || echo FAILED) in $((end - start)) s (build $((built - start)) s)"
exit "$failed"
