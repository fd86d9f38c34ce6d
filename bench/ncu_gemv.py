#!/usr/bin/env python3
"""One launch of each decode GEMV shape of an 8B model (bf16, one input row) for Nsight Compute.

Loads the op library of a CUDA build and calls `dysco::linear` on the Qwen3-8B projection shapes
(q, q/k/v, o, gate/up, down), and `dysco::add_rms_norm_linear` on q/k/v and gate/up, once each, so
that `ncu` reports one kernel per shape (docs/gpu.md "Two warps a row pair for the small GEMVs").
On the GPU machine, after scripts/gpu-check.sh (or a build of dysco_kernels) in build-gpu/:

  DYSCO_CUDA_GEMV_SPLITS=1 ncu --clock-control none -k regex:Gemv \\
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size python3 bench/ncu_gemv.py

(ncu flushes the caches before each profiled kernel, so each reads its weights from DRAM.)
"""

import argparse

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", default="build-gpu/lib/libdysco_kernels.so")
    args = parser.parse_args()
    torch.ops.load_library(args.library)
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for name, n, k in [("q", 4096, 4096), ("qkv", 6144, 4096), ("o", 4096, 4096),
                       ("gate_up", 24576, 4096), ("down", 4096, 12288)]:
        weight = torch.randn(n, k, device=dev, dtype=bf16) / 16
        x = torch.randn(1, k, device=dev, dtype=bf16)
        out = torch.empty(1, n, device=dev, dtype=bf16)
        torch.ops.dysco.linear(out, x, weight)
        if name in ("qkv", "gate_up"):  # the shapes the model runs with the norm in the GEMV
            total = torch.empty(1, k, device=dev, dtype=bf16)
            residual = torch.randn(1, k, device=dev, dtype=bf16)
            norm_weight = torch.rand(k, device=dev, dtype=bf16) + 0.5
            torch.ops.dysco.add_rms_norm_linear(out, total, x, residual, norm_weight, 1e-6, weight)
        torch.cuda.synchronize()
        print(name, "launched", flush=True)


if __name__ == "__main__":
    main()
