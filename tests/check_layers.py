#!/usr/bin/env python3
"""Checks the layering of docs/architecture.md on every #include of the C++ sources (a ctest).

- core/ layers depend only downwards: engine -> dysco -> model -> text -> base. kernels/ is below
  core/model (core may include its torch-free headers only: kernels/dysco_constants.h everywhere,
  kernels/op_calls.h in core/model).
- libtorch headers (<torch/...>, <ATen/...>, <c10/...>) appear only in kernels/, core/model/*.cpp, and
  the tests and benchmarks that exercise tensors directly (listed below with the reason).
- Nothing in core/ or kernels/ includes gRPC, protobuf or the generated proto headers; client/ includes
  nothing of core/ (it is a plain gRPC client) except core/base.

Prints one line per violation and exits 1 when there is any.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
LAYERS = ["base", "text", "model", "dysco", "engine"]
TORCH = re.compile(r"#\s*include\s*<(torch|ATen|c10)/")
GRPC = re.compile(r'#\s*include\s*[<"](grpc|grpcpp|google/protobuf|dysco/v1/)')
LOCAL = re.compile(r'#\s*include\s*"([^"]+)"')
# Files outside kernels/ and core/model/*.cpp that include torch headers, and why.
TORCH_ALLOWED = {
    "tests/cpp/test_kernels.cpp": "calls the ops on tensors",
    "tests/cpp/test_kernels_cuda.cpp": "calls the CUDA ops on tensors (CUDA graphs, streams, events)",
    "tests/cpp/rope_reference.h": "the rope_tables op's ATen reference, shared by the two kernel tests",
    "tests/cpp/test_model_cuda.cpp": "asks c10 whether a CUDA device is present (skips without one), "
    "hands head means over on the device",
    "tests/cpp/test_dysco_ops.cpp": "calls the ops on tensors",
    "tests/cpp/test_kv_page_pool.cpp": "checks the cache tensor",
    "tests/cpp/test_model_runner.cpp": "compares against a libtorch reference",
    "bench/bench_kernels.cpp": "times the ops on tensors",
    "bench/bench_dysco_ops.cpp": "times the ops on tensors",
    "bench/bench_decode.cpp": "measures the GEMM/GEMV floor with at::linear / at::mv",
    "bench/bench_gpu.cpp": "measures its floors with a device copy and at::mm, profiles kernels (Kineto)",
    "core/model/torch_dtype.h": "the dtype mapping of the torch translation units (model runner, pool, benches)",
    "core/model/device_tensor.h": "what a forward leaves on the device, opened only by torch translation units "
    "(model runner, DySCO staging, GPU tests); torch-free code holds it by a forward-declared pointer",
}


def check(path, text, errors):
    rel = path.relative_to(ROOT).as_posix()
    top = rel.split("/")[0]
    layer = rel.split("/")[1] if top == "core" and len(rel.split("/")) > 2 else None
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{n}: "
        if TORCH.search(line):
            ok = top == "kernels" or (layer == "model" and rel.endswith(".cpp")) or rel in TORCH_ALLOWED
            if not ok:
                errors.append(where + "includes a libtorch header outside kernels/ and core/model/*.cpp")
        if GRPC.search(line) and top in ("core", "kernels"):
            errors.append(where + f"{top}/ must not know gRPC or protobuf")
        m = LOCAL.search(line)
        if not m:
            continue
        inc = m.group(1)
        parts = inc.split("/")
        if layer is not None and parts[0] == "core" and len(parts) > 2:
            if parts[1] in LAYERS and LAYERS.index(parts[1]) > LAYERS.index(layer):
                errors.append(where + f"core/{layer} includes {inc} from a higher layer")
        if layer is not None and parts[0] == "kernels":
            allowed = inc == "kernels/dysco_constants.h" or (layer == "model" and inc == "kernels/op_calls.h")
            if not allowed:
                errors.append(where + f"core/{layer} includes {inc}")
        if top in ("core", "kernels") and parts[0] in ("server", "client", "tools", "bench", "proto"):
            errors.append(where + f"{top}/ includes {inc} from a folder above it")
        if top == "kernels" and parts[0] == "core":
            errors.append(where + "kernels/ includes core/")
        if top == "client" and parts[0] == "core" and (len(parts) < 2 or parts[1] != "base"):
            errors.append(where + "client/ includes core/ beyond core/base")


def main():
    errors = []
    files = 0
    for folder in ("core", "kernels", "server", "client", "tools", "bench", "tests/cpp"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
                files += 1
                check(path, path.read_text(encoding="utf-8", errors="replace"), errors)
    for e in errors:
        print(e)
    print(f"check_layers: {files} files, {len(errors)} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
