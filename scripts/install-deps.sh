#!/usr/bin/env bash
# Installs the system packages dysco-serve builds against (Debian bookworm). Idempotent: does nothing when
# every package is already installed. Run as root (CI and the dev machines are root) or with sudo.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build ccache pkg-config git unzip
  libtorch-dev python3-torch python3-venv python3-numpy
  libopenblas0-pthread  # Debian libtorch calls libblas.so.3: without OpenBLAS it is the slow reference BLAS
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev
  libspdlog-dev prometheus-cpp-dev libcpp-httplib-dev libyaml-cpp-dev nlohmann-json3-dev
  libgtest-dev
  clang  # scripts/check_thread_safety.py: clang -Wthread-safety over core/ and server/
  # scripts/run-fuzz.sh: libFuzzer and the sanitizer runtimes (only recommended by clang, so not installed with
  # it here), and llvm-symbolizer-14 for readable sanitizer stack traces.
  libclang-rt-14-dev llvm-14
  # tests/python/test_prometheus.py and deploy/prometheus: a real Prometheus on loopback and promtool (rule unit
  # tests, `promtool check metrics`). Its service is not started by the tests (they run their own on free ports).
  prometheus
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all system packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
