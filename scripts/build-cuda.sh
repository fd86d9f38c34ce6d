#!/usr/bin/env bash
# The CUDA build check (`make test-cuda-build`, part of `make test`): compiles and links the CUDA
# variant (-DDYSCO_CUDA=ON, sm_90) on a machine without a GPU, so that a kernel typo fails CI.
#   - torch: PyPI's torch==2.11.0 wheel (the GPU machine's exact build, 2.11.0+cu130), installed with
#     pip, without its nvidia-* dependencies, into .venv-cuda (git-ignored; reused when present);
#   - nvcc: $NVCC, default /usr/local/cuda/bin/nvcc (CUDA 13.0 in the dev/CI image);
#   - linked with -Wl,--allow-shlib-undefined: libtorch_cuda.so needs libcufile, libcusparseLt and
#     libnvshmem_host, which only the GPU machine has; nothing here runs the binaries.
# Builds into build-cuda/ (BUILD_CUDA_DIR) the targets in CUDA_TARGETS (default: the op library, its
# CPU and CUDA test binaries, the server and dysco-generate), with ccache. DYSCO_SKIP_CUDA_BUILD=1 skips it (a
# machine without nvcc). Usage: scripts/build-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DYSCO_SKIP_CUDA_BUILD:-0}" = 1 ]; then
  echo "build-cuda: skipped (DYSCO_SKIP_CUDA_BUILD=1)"
  exit 0
fi
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
BUILD=${BUILD_CUDA_DIR:-build-cuda}
TARGETS=${CUDA_TARGETS:-dysco_kernels test_kernels test_kernels_cuda test_model_cuda dysco-server dysco-generate}
VENV=.venv-cuda
TORCH_VERSION=2.11.0
JOBS=${JOBS:-$(nproc)}
if [ ! -x "$NVCC" ]; then
  echo "build-cuda: no nvcc at $NVCC (set NVCC, or DYSCO_SKIP_CUDA_BUILD=1 to skip this check)" >&2
  exit 1
fi

# torch from PyPI into its own venv: Debian's python3 (no system site-packages, so that Debian's
# torch 1.13 stays out of it). The stamp skips pip when the version is already there.
if [ "$(cat $VENV/.torch-version 2>/dev/null)" != "$TORCH_VERSION" ]; then
  rm -rf $VENV
  /usr/bin/python3 -m venv $VENV
  $VENV/bin/python -m pip install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION"
  echo "$TORCH_VERSION" > $VENV/.torch-version
fi
# The wheel's paths without importing it (its Python dependencies are not installed).
TORCH_DIR=$($VENV/bin/python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")

# TORCH_LIBRARY / c10_LIBRARY: TorchConfig finds libtorch and libc10 with find_library, which would
# take Debian's libtorch 1.13 from /usr/lib before the wheel's.
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDYSCO_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_PREFIX_PATH="$TORCH_DIR/share/cmake" \
    -DTORCH_LIBRARY="$TORCH_DIR/lib/libtorch.so" -Dc10_LIBRARY="$TORCH_DIR/lib/libc10.so" \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined \
    -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--allow-shlib-undefined
fi
# shellcheck disable=SC2086
cmake --build "$BUILD" -j "$JOBS" --target $TARGETS
echo "build-cuda: built $TARGETS in $BUILD"
