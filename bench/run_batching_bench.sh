#!/usr/bin/env bash
# Continuous-batching benchmark: starts dysco-server, runs `dysco-client bench --compare-single` (1 stream,
# then N streams) with DySCO off and then on, and prints the aggregate token-rate ratios.
# Target (issue "Streaming gRPC service"): >= 3x the single-stream token rate at 8 streams.
#
# Usage: bench/run_batching_bench.sh [--build-dir build] [--model models/smollm2-135m-instruct]
#          [--concurrency 8] [--duration 30] [--prompt-tokens 128] [--max-new-tokens 64] [--out DIR]
#          [-- extra dysco-server flags]
# Writes OUT/bench_dysco_off.json, OUT/bench_dysco_on.json and OUT/server.log (OUT defaults to a temp dir).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build_dir=build
model=models/smollm2-135m-instruct
concurrency=8
duration=30
prompt_tokens=128
max_new_tokens=64
out=""
server_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --prompt-tokens) prompt_tokens="$2"; shift 2 ;;
    --max-new-tokens) max_new_tokens="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; server_extra=("$@"); break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
cd "$root"
server_bin="${DYSCO_SERVER_BIN:-$build_dir/bin/dysco-server}"
client_bin="${DYSCO_CLIENT_BIN:-$build_dir/bin/dysco-client}"
for bin in "$server_bin" "$client_bin"; do
  [ -x "$bin" ] || { echo "missing $bin (build it first)" >&2; exit 1; }
done
[ -n "$out" ] || out="$(mktemp -d /tmp/dysco-batching-bench.XXXXXX)"
mkdir -p "$out"

free_port() { "${PYTHON:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
target="127.0.0.1:$port"

"$server_bin" --model "$model" --host 127.0.0.1 --port "$port" --metrics-port "$metrics_port" \
  --max-batch "$concurrency" "${server_extra[@]}" >"$out/server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
if ! "$client_bin" health --target "$target" --wait-s 120 >/dev/null; then
  echo "dysco-server did not become SERVING; its log:" >&2
  tail -30 "$out/server.log" >&2
  exit 1
fi
"$client_bin" info --target "$target" | sed -n '1,4p'

run() {  # $1 = off|on
  local flag=()
  [ "$1" = on ] && flag=(--dysco)
  echo "== DySCO $1: 1 stream, then $concurrency streams, ${duration}s each, prompt $prompt_tokens tokens, up to $max_new_tokens new"
  "$client_bin" bench --target "$target" --compare-single --concurrency "$concurrency" --duration "$duration" \
    --prompt-tokens "$prompt_tokens" --max-new-tokens "$max_new_tokens" --warmup "$concurrency" "${flag[@]}" \
    --json >"$out/bench_dysco_$1.json"
}
run off
run on

"${PYTHON:-python3}" - "$out" "$concurrency" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[2]
print(f"\n{'DySCO':6} {'1-stream tok/s':>15} {n + '-stream tok/s':>15} {'ratio':>7} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'errors':>7}")
for mode in ("off", "on"):
    r = json.load(open(f"{out}/bench_dysco_{mode}.json"))
    single, multi = r["phases"]
    errors = single["errors"] + multi["errors"]
    print(f"{mode:6} {single['generated_tokens_per_s']:15.1f} {multi['generated_tokens_per_s']:15.1f} "
          f"{r['throughput_ratio']:6.2f}x {multi['ttft']['p50_ms']:12.1f} {multi['inter_token_latency']['p50_ms']:11.1f} {errors:7d}")
print(f"(target: >= 3x at 8 streams; details in {out})")
PY
