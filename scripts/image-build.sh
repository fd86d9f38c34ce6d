#!/usr/bin/env bash
# The build stage of the Dockerfile (not meant for a host): installs the build packages, compiles
# dysco-server and dysco-client, and stages what the runtime stage copies under $OUT (default /out):
#   $OUT/opt/dysco/bin   dysco-server, dysco-client (the Dockerfile adds docker-entrypoint.sh)
#   $OUT/opt/dysco/lib   the project's shared libraries (libdysco_kernels.so, ...)
#   $OUT/opt/dysco/torch the CUDA variant only: the torch wheel's libraries and its nvidia-* libraries
#   $OUT/runtime-packages.txt  the distribution packages that own every shared library the binaries load,
#       found with ldd + dpkg -S: the runtime stage installs exactly these (no compiler, no -dev packages), and
#       the list stays right for both bases (Debian bookworm package names differ from Ubuntu's).
# DYSCO_CUDA=OFF (default): Debian bookworm, Debian's libtorch 1.13 (as `make build` on a host).
# DYSCO_CUDA=ON: an NVIDIA CUDA devel image (Ubuntu), PyPI's torch==$TORCH_VERSION wheel (CUDA 13.0, the GPU
#   machine's build) in a venv, -DDYSCO_CUDA=ON for CUDA_ARCHITECTURES (default 90, H100/H200).
# Only the two binaries are built (no tests, tools or benches): the image serves, CI tests on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
DYSCO_CUDA=${DYSCO_CUDA:-OFF}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-90}
JOBS=${JOBS:-$(nproc)}
OUT=${OUT:-/out}
BUILD=/tmp/build
export DEBIAN_FRONTEND=noninteractive

# The build packages of scripts/install-deps.sh without the test, fuzz, sanitizer and Prometheus ones.
PKGS=(build-essential cmake ninja-build pkg-config
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev
      libspdlog-dev prometheus-cpp-dev libcpp-httplib-dev libyaml-cpp-dev nlohmann-json3-dev)
if [ "$DYSCO_CUDA" = ON ]; then
  PKGS+=(python3-venv)
else
  PKGS+=(libtorch-dev
         libopenblas0-pthread)  # Debian libtorch calls libblas.so.3: without OpenBLAS it is the reference BLAS
fi
apt-get update -q
apt-get install -y -q --no-install-recommends "${PKGS[@]}"

CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DDYSCO_BUILD_TESTS=OFF)
TORCH_LIB=""
if [ "$DYSCO_CUDA" = ON ]; then
  # The wheel with its nvidia-* dependencies (cuBLAS, cuDNN, NCCL, cuSPARSELt, NVSHMEM, cuFile...): the
  # runtime stage copies their libraries, so the image runs on any CUDA 13 runtime base.
  python3 -m venv /opt/torch-venv
  /opt/torch-venv/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  TORCH_DIR=$(/opt/torch-venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))")
  TORCH_LIB=$TORCH_DIR/lib
  # TORCH_LIBRARY / c10_LIBRARY explicit, as in the GPU issue's scripts/build-cuda.sh: find_library would
  # otherwise look in /usr/lib first.
  CMAKE_ARGS+=(-DDYSCO_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES"
               -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc
               -DCMAKE_PREFIX_PATH="$TORCH_DIR/share/cmake"
               -DTORCH_LIBRARY="$TORCH_LIB/libtorch.so" -Dc10_LIBRARY="$TORCH_LIB/libc10.so")
fi
cmake -S . -B $BUILD -G Ninja "${CMAKE_ARGS[@]}"
cmake --build $BUILD -j "$JOBS" --target dysco-server dysco-client

# Stage the runtime tree.
rm -rf "$OUT"
mkdir -p "$OUT/opt/dysco/bin" "$OUT/opt/dysco/lib"
cp $BUILD/bin/dysco-server $BUILD/bin/dysco-client "$OUT/opt/dysco/bin/"
cp -P $BUILD/lib/*.so* "$OUT/opt/dysco/lib/"
strip --strip-unneeded "$OUT"/opt/dysco/bin/dysco-* "$OUT"/opt/dysco/lib/*.so*
LIBPATH=$OUT/opt/dysco/lib
if [ -n "$TORCH_LIB" ]; then
  mkdir -p "$OUT/opt/dysco/torch/lib"
  cp -P "$TORCH_LIB"/*.so* "$OUT/opt/dysco/torch/lib/"
  for d in "$TORCH_DIR"/../nvidia/*/lib; do cp -P "$d"/*.so* "$OUT/opt/dysco/torch/lib/"; done
  LIBPATH=$LIBPATH:$OUT/opt/dysco/torch/lib
fi

# The packages owning every library the binaries load (resolved through symlinks and alternatives, e.g.
# libblas.so.3 -> OpenBLAS). Libraries staged above are not packaged and drop out; so does libcuda.so.1,
# which the NVIDIA container runtime mounts from the host driver.
LD_LIBRARY_PATH=$LIBPATH ldd "$OUT"/opt/dysco/bin/dysco-* "$OUT"/opt/dysco/lib/*.so \
  | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u \
  | while read -r lib; do
      real=$(readlink -f "$lib")
      for f in "$lib" "/usr$lib" "$real"; do
        pkg=$(dpkg -S "$f" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$pkg" ] && { echo "$pkg"; break; }
      done || true
    done | sort -u > "$OUT/runtime-packages.txt"
echo "image-build: runtime packages: $(wc -l < "$OUT/runtime-packages.txt")"
cat "$OUT/runtime-packages.txt"
