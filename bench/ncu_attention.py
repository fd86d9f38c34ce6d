#!/usr/bin/env python3
"""One launch of the decode attention per context and pipeline (Qwen3-8B heads, bf16) for Nsight Compute.

Loads the op library of a CUDA build and calls `dysco::paged_attention_decode` once per (context, pipeline):
8K, 32K and 128K keys over shuffled pages (page size 16, 32 query heads, 8 KV heads, head_dim 128, one
sequence), with the tensor-core kernel's pipelines of DYSCO_CUDA_MMA_PREFETCH (the default, the swapped operands;
"0", the query rows as the mma's M; "swap-prefetch", the swapped operands with the register prefetch), so that `ncu` reports one
split kernel per pair, in that order (docs/gpu.md "What remains of issue 9", item 1: where the short
contexts' calls wait). On the GPU machine,
after scripts/gpu-check.sh (or a build of dysco_kernels) in build-gpu/:

  ncu --clock-control none -k regex:MmaSplitAttention --section SpeedOfLight --section Occupancy \\
      --section WarpStateStats --section LaunchStats python3 bench/ncu_attention.py

(ncu flushes the caches before each profiled kernel, so each reads its keys from DRAM; the kernel merges
its own splits, so one kernel a call.)
"""

import argparse
import os

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", default="build-gpu/lib/libdysco_kernels.so")
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--pipelines", default="default,0,swap-prefetch",
                        help="DYSCO_CUDA_MMA_PREFETCH values; 'default' leaves it unset")
    args = parser.parse_args()
    torch.ops.load_library(args.library)
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    page_size, hq, hkv, d = 16, 32, 8, 128
    for keys in (int(c) for c in args.contexts.split(",")):
        pages = keys // page_size
        kv = torch.randn(2, pages, page_size, hkv, d, device=dev, dtype=bf16)
        tables = torch.randperm(pages, device=dev).to(torch.int32).reshape(1, pages)
        lens = torch.full((1,), keys, device=dev, dtype=torch.int64)
        query = torch.randn(1, hq, d, device=dev, dtype=bf16)
        out = torch.empty(1, hq, d, device=dev, dtype=bf16)
        for pipeline in args.pipelines.split(","):
            # The op reads its knobs at every call (kernels/cuda/cuda_common.cuh EnvIs).
            if pipeline == "default":
                os.environ.pop("DYSCO_CUDA_MMA_PREFETCH", None)
            else:
                os.environ["DYSCO_CUDA_MMA_PREFETCH"] = pipeline
            torch.ops.dysco.paged_attention_decode(out, query, kv, tables, lens, d ** -0.5, None)
            torch.cuda.synchronize()
            print(f"{keys} keys, pipeline {pipeline}: launched", flush=True)
        del kv


if __name__ == "__main__":
    main()
