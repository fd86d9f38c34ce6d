#!/usr/bin/env bash
# Builds the tests with a sanitizer and runs them (issue 8: zero findings).
#   scripts/sanitize.sh asan   AddressSanitizer + UndefinedBehaviorSanitizer, every C++ test (build-asan/)
#   scripts/sanitize.sh tsan   ThreadSanitizer over the threaded tests: scheduler, batch stepper and the
#                              server end to end (build-tsan/). gRPC and abseil are built with TSan into
#                              that tree from Debian bookworm's own sources (the versions the normal build
#                              links), fetched once into .cache/tsan-deps/ and checked against the sha256
#                              of Debian's .dsc: TSan cannot see synchronisation inside an uninstrumented
#                              gRPC (tests/tsan/grpc.cmake). The first run compiles about 1,000 gRPC files.
# Any report fails the test that produced it (ASan aborts; UBSan is built with -fno-sanitize-recover;
# TSan exits non-zero). Needs the default model package (make model). Run from the repository root;
# `make sanitize` runs both (on a 2-core machine ~15 min for asan; ~50 min for the first tsan, most of it
# compiling gRPC, a few minutes once ccache holds it).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-asan}"
case "$kind" in
  asan)
    dir=build-asan
    flags=(-DDYSCO_SANITIZE=ON)
    targets=()  # everything
    tests='^(test_|export_tiny_model)'
    # libtorch's own allocations at exit are not ours: leaks are checked in our code by the tests'
    # explicit pool/RSS checks instead. new-delete-type-mismatch: libtorch's sized deletes.
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:new_delete_type_mismatch=0"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    ;;
  tsan)
    dir=build-tsan
    deps=.cache/tsan-deps
    mkdir -p "$deps"
    fetch() {  # URL SHA256: once, verified
      local file="$deps/${1##*/}"
      if [ ! -f "$file" ] || ! echo "$2  $file" | sha256sum -c --quiet - 2>/dev/null; then
        curl -fsSL --retry 3 -o "$file.part" "$1"
        echo "$2  $file.part" | sha256sum -c --quiet -
        mv "$file.part" "$file"
      fi
      local top
      top="$(tar tzf "$file" | head -1 | cut -d/ -f1)"
      [ -d "$deps/$top" ] || tar -C "$deps" -xzf "$file"
      echo "$PWD/$deps/$top"
    }
    debian=http://deb.debian.org/debian/pool/main
    grpc_src="$(fetch $debian/g/grpc/grpc_1.51.1.orig.tar.gz \
      b55696fb249669744de3e71acc54a9382bea0dce7cd5ba379b356b12b82d4229)"
    absl_src="$(fetch $debian/a/abseil/abseil_20220623.1.orig.tar.gz \
      abfe2897f3a30edaa74bc34365afe3c2a3cd012091a97dc7e008f7016adcd5fe)"
    # Proto folders gRPC's CMake would download (no network needed: nothing built here uses them).
    for d in googleapis opencensus-proto/src xds envoy-api; do mkdir -p "$grpc_src/third_party/$d"; done
    flags=(-DDYSCO_TSAN=ON "-DDYSCO_TSAN_GRPC_SOURCE=$grpc_src" "-DDYSCO_TSAN_ABSL_SOURCE=$absl_src")
    targets=(test_scheduler test_batch_stepper test_server dysco_kernels)
    tests='^(test_scheduler|test_batch_stepper|test_server|export_tiny_model)$'
    # libtorch (and OpenMP under it) is not instrumented: its internal synchronisation is invisible
    # (tests/tsan.supp); gRPC and abseil are, so nothing of theirs is suppressed.
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/tsan.supp"
    # A 1,500-token CPU prefill under TSan's ~10x slowdown outlasts that test's own waits.
    export GTEST_FILTER="-SchedulerTest.LongPromptPrefillDoesNotStallDecoders"
    ;;
  *)
    echo "usage: $0 asan|tsan" >&2
    exit 2
    ;;
esac
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${flags[@]}" > /dev/null
cmake --build "$dir" -j "$(nproc)" ${targets[@]+--target "${targets[@]}"}
cd "$dir"
CI="${CI:-1}" ctest --output-on-failure -j 2 -R "$tests"
