#!/usr/bin/env bash
# The image test (`make image-test`, not part of `make test`: a cold run compiles the project inside the
# build stage). On this machine, without any registry:
#   1. deps     docker.io (dockerd) and debootstrap from the Debian mirror when missing (apt);
#   2. dockerd  started in the background when no daemon answers (log: $LOG_DIR/dockerd.log);
#   3. base     a Debian bookworm base image made locally: debootstrap --variant=minbase, then docker import.
#               Cached: skipped when $BASE_IMAGE exists (`docker rmi $BASE_IMAGE` to remake it);
#   4. build    the CPU image with the legacy builder (BuildKit does not work here), the context being the
#               .dockerignore allow-list sent as a tar (which also follows the models/ symlink of a worktree);
#   5. start    the container, ports published on 127.0.0.1 only, read-only root filesystem, no capabilities
#               (as the Kubernetes pod), flags from the environment
#               (DYSCO_DRAIN_TIMEOUT) and from a mounted /etc/dysco/dysco-server.yaml; waits for SERVING with
#               the client inside the image, as the Kubernetes probes do;
#   6. checks   over the published ports: `dysco-client health --service dysco.v1.Generation` is SERVING,
#               `dysco-client generate` streams a completion, /metrics has dysco_ series; the server runs as
#               a non-root user; both configuration paths took effect (the server's log);
#   7. stop     `docker stop` while a generation is streaming: the stream completes (drain), the container
#               exits 0 within the stop timeout, its log has event=drain_done and event=server_stopped.
# Prints each check and the elapsed time of each phase. Needs root (dockerd, apt, debootstrap).
# Environment: IMAGE (dysco-serve:cpu), BASE_IMAGE (dysco-base:bookworm-minbase), DEBIAN_MIRROR,
# LOG_DIR (build-image-test), KEEP_IMAGE=0 to remove the built image afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-dysco-serve:cpu}
BASE_IMAGE=${BASE_IMAGE:-dysco-base:bookworm-minbase}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG_DIR=${LOG_DIR:-build-image-test}
KEEP_IMAGE=${KEEP_IMAGE:-1}
MODEL_DIR=models/smollm2-135m-instruct
NAME=dysco-image-test-$$
STOP_TIMEOUT=40   # docker stop -t: above the drain timeout the test sets (DYSCO_DRAIN_TIMEOUT=20)
# The context: .dockerignore's allow-list (keep the two in step).
IMAGE_CONTEXT=(Dockerfile .dockerignore CMakeLists.txt scripts/image-build.sh scripts/docker-entrypoint.sh
               kernels core proto server client tools bench "$MODEL_DIR")
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)

T0=$(date +%s)
PHASES=()
CHECKS=()
FAILED=0
phase_start() { PHASE=$1; PHASE_T=$(date +%s); echo "== $PHASE"; }
phase_end() { PHASES+=("$(printf '%-8s %5ss  %s' "$PHASE" $(($(date +%s) - PHASE_T)) "${1:-}")"); }
check() {  # check NAME OK(0/1) DETAIL
  local status=PASS
  [ "$2" = 0 ] || { status=FAIL; FAILED=1; }
  CHECKS+=("$(printf '%-4s %-22s %s' "$status" "$1" "$3")")
  echo "   $status $1: $3"
}
summary() {
  local rc=$?
  if docker inspect "$NAME" >/dev/null 2>&1; then
    docker logs "$NAME" > "$LOG_DIR/container.log" 2>&1 || true
    docker rm -f "$NAME" >/dev/null 2>&1 || true
  fi
  [ -n "${CLIENT_CONTAINER:-}" ] && docker rm -f "$CLIENT_CONTAINER" >/dev/null 2>&1
  echo
  echo "== image-test summary ($IMAGE, logs in $LOG_DIR)"
  printf '%s\n' "${PHASES[@]}"
  [ ${#CHECKS[@]} -eq 0 ] || printf '%s\n' "${CHECKS[@]}"
  echo "total    $(($(date +%s) - T0))s"
  if [ $rc -ne 0 ] || [ $FAILED -ne 0 ]; then
    if [ $rc -ne 0 ]; then echo "image-test: FAILED in phase $PHASE"; else echo "image-test: FAILED (checks above)"; fi
    exit 1
  fi
  echo "image-test: OK"
}
trap summary EXIT

phase_start deps
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ! -s "$MODEL_DIR/model.pt" ]; then
  # The image bakes in the exported package; exporting it needs the host build and venv (`make model`).
  echo "no $MODEL_DIR: make model"
  make model
fi
phase_end "${missing[*]:-nothing to install}"

phase_start dockerd
if docker info >/dev/null 2>&1; then
  phase_end "already running"
else
  # Debian's daemon, left running afterwards (other runs reuse it and its image cache).
  $SUDO bash -c "nohup dockerd > '$LOG_DIR/dockerd.log' 2>&1 &"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$LOG_DIR/dockerd.log"; exit 1; }
  phase_end "started (log $LOG_DIR/dockerd.log)"
fi

phase_start base
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  phase_end "cached $BASE_IMAGE"
else
  ROOTFS=$(mktemp -d /var/tmp/dysco-rootfs.XXXXXX)
  $SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$DEBIAN_MIRROR" > "$LOG_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$LOG_DIR/debootstrap.log"; exit 1; }
  # The downloaded .debs and package lists are not part of an image (30 MB).
  $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  $SUDO tar -C "$ROOTFS" -c . | docker import -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  $SUDO rm -rf "$ROOTFS"
  phase_end "made $BASE_IMAGE (debootstrap minbase, docker import)"
fi

phase_start build
# -h: tar follows symlinks (models/ is one in a worktree); the daemon never sees a link out of the context.
if ! tar -c -h --exclude=__pycache__ "${IMAGE_CONTEXT[@]}" \
    | DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" - \
      > "$LOG_DIR/build.log" 2>&1; then
  tail -40 "$LOG_DIR/build.log"
  exit 1
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
phase_end "$IMAGE, $((SIZE / 1000000)) MB (log $LOG_DIR/build.log)"

phase_start start
# A mounted config (the reflection key) and an environment flag (the drain timeout): the log shows both.
cat > "$LOG_DIR/dysco-server.yaml" <<'EOF'
reflection: false
max_batch: 4
EOF
chmod 0644 "$LOG_DIR/dysco-server.yaml"
# Locked down as the Kubernetes pod is (deployment.yaml's securityContext): read-only root filesystem, a
# writable /tmp only, no capabilities, no privilege escalation.
docker run -d --name "$NAME" -p 127.0.0.1::50051 -p 127.0.0.1::9090 \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -e DYSCO_DRAIN_TIMEOUT=20 -v "$LOG_DIR/dysco-server.yaml:/etc/dysco/dysco-server.yaml:ro" \
  "$IMAGE" >/dev/null
GRPC_ADDR=$(docker port "$NAME" 50051/tcp | head -1)
METRICS_ADDR=$(docker port "$NAME" 9090/tcp | head -1)
echo "   published: grpc $GRPC_ADDR, metrics $METRICS_ADDR"
if ! docker exec "$NAME" dysco-client health --service dysco.v1.Generation --wait-s 180 \
    > "$LOG_DIR/health-inside.txt" 2>&1; then
  cat "$LOG_DIR/health-inside.txt"; docker logs "$NAME" 2>&1 | tail -20
  exit 1
fi
phase_end "SERVING (probe inside the container)"

phase_start checks
# The client: the host build's when there is one, else the image's in a container on the host network;
# either way it goes through the published port.
if [ -x build/bin/dysco-client ]; then
  CLIENT=(build/bin/dysco-client)
else
  CLIENT=(docker run --rm --network host --entrypoint /opt/dysco/bin/dysco-client "$IMAGE")
fi
case "$GRPC_ADDR" in 127.0.0.1:*) ok=0 ;; *) ok=1 ;; esac
check loopback-only "$ok" "grpc $GRPC_ADDR, metrics $METRICS_ADDR"
case "$METRICS_ADDR" in 127.0.0.1:*) ;; *) check loopback-only 1 "metrics $METRICS_ADDR" ;; esac

out=$("${CLIENT[@]}" health --target "$GRPC_ADDR" --service dysco.v1.Generation 2>&1) && ok=0 || ok=1
grep -q '^SERVING' <<<"$out" || ok=1
check health "$ok" "$(tr '\n' ' ' <<<"$out")"

"${CLIENT[@]}" generate --target "$GRPC_ADDR" --chat --prompt "What is the capital of France?" \
  --max-new-tokens 16 --timeout-ms 120000 > "$LOG_DIR/generate.txt" 2> "$LOG_DIR/generate.err" \
  && ok=0 || ok=1
[ -n "$(tr -d '[:space:]' < "$LOG_DIR/generate.txt")" ] || ok=1
check generate "$ok" "\"$(head -c 80 "$LOG_DIR/generate.txt" | tr '\n' ' ')\""

curl -sf "http://$METRICS_ADDR/metrics" > "$LOG_DIR/metrics.txt" && ok=0 || ok=1
n=$(grep -c '^dysco_' "$LOG_DIR/metrics.txt" || true)
[ "$n" -gt 0 ] && grep -q '^dysco_requests_total.* [1-9]' "$LOG_DIR/metrics.txt" || ok=1
check metrics "$ok" "$n dysco_ samples, $(grep '^dysco_requests_total.* [1-9]' "$LOG_DIR/metrics.txt" | head -1)"

uid_exec=$(docker exec "$NAME" id -u)
uid_pid1=$(docker exec "$NAME" awk '/^Uid:/ {print $2}' /proc/1/status)
comm_pid1=$(docker exec "$NAME" cat /proc/1/comm)
[ "$uid_exec" != 0 ] && [ "$uid_pid1" != 0 ] && [ "$comm_pid1" = dysco-server ] && ok=0 || ok=1
check non-root "$ok" "id -u $uid_exec, PID 1 $comm_pid1 uid $uid_pid1"

docker logs "$NAME" > "$LOG_DIR/container.log" 2>&1
grep -q 'event=server_listening.* reflection=off' "$LOG_DIR/container.log" && ok=0 || ok=1
check config-file "$ok" "mounted dysco-server.yaml: $(grep -o 'reflection=[a-z]*' "$LOG_DIR/container.log" | head -1)"
phase_end

phase_start stop
# A generation in flight when SIGTERM arrives: the drain lets it finish.
CLIENT_CONTAINER=""
if [ "${CLIENT[0]}" = docker ]; then
  CLIENT_CONTAINER=$NAME-client
  CLIENT=(docker run --rm --name "$CLIENT_CONTAINER" --network host --entrypoint /opt/dysco/bin/dysco-client
          "$IMAGE")
fi
"${CLIENT[@]}" generate --target "$GRPC_ADDR" --prompt "Once upon a time" --max-new-tokens 64 \
  --timeout-ms 120000 > "$LOG_DIR/inflight.txt" 2> "$LOG_DIR/inflight.err" &
inflight=$!
for _ in $(seq 100); do
  curl -sf "http://$METRICS_ADDR/metrics" | grep -Eq '^dysco_requests_running(\{[^}]*\})? [1-9]' && break
  kill -0 $inflight 2>/dev/null || break
  sleep 0.1
done
t=$(date +%s%N)
docker stop -t $STOP_TIMEOUT "$NAME" >/dev/null
stop_ms=$((($(date +%s%N) - t) / 1000000))
wait $inflight && ok=0 || ok=1
check drain-inflight "$ok" "stream during stop: $(wc -w < "$LOG_DIR/inflight.txt") words, client exit $( [ $ok = 0 ] && echo 0 || echo non-zero)"
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
docker logs "$NAME" > "$LOG_DIR/container.log" 2>&1
ok=0
[ "$code" = 0 ] || ok=1
grep -q 'event=drain_done' "$LOG_DIR/container.log" || ok=1
grep -q 'event=server_stopped' "$LOG_DIR/container.log" || ok=1
grep -q 'event=drain_start.*timeout_s=20' "$LOG_DIR/container.log" || ok=1
[ "$stop_ms" -lt $((STOP_TIMEOUT * 1000)) ] || ok=1
check stop "$ok" "exit $code in $((stop_ms / 1000)).$((stop_ms % 1000 / 100))s (< ${STOP_TIMEOUT}s), $(grep -o 'event=drain_start.*' "$LOG_DIR/container.log" | head -1), drain_done, server_stopped"
docker rm "$NAME" >/dev/null
phase_end
[ "$KEEP_IMAGE" = 1 ] || docker rmi "$IMAGE" >/dev/null
