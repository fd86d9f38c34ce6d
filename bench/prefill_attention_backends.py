"""Which attention backend of this torch build prefills a long prompt fastest on this GPU.

Issue 9's prefill target is 1.3x the FLOP floor; with FlashAttention-2 (what
kernels/cuda/paged_prefill_flash.cu calls through ATen) a 128K prompt's attention runs at ~345
TFLOP/s on an H200, 2.3x the floor (docs/performance.md). This script times the same work, one
layer of a 128K prompt in 8192-token chunks (Qwen3-8B heads: Hq 32, Hkv 8, D 128, bf16), through
every backend torch offers here, checks each against FlashAttention-2, and prints one line per
backend: milliseconds, TFLOP/s and the ratio to the FLOP floor at the measured at::mm rate.

A chunk of Lq new tokens at the end of Lk keys needs the causal mask aligned bottom-right.
cuDNN's causal mask is aligned top-left, so its chunk runs as two calls merged by log-sum-exp: the
Lk - Lq earlier keys without a mask, then the Lq x Lq square with the causal mask.

Usage (GPU machine): python3 bench/prefill_attention_backends.py [--tokens 131072 --chunk 8192]

Measured on the H200 (torch 2.11.0+cu130, cuDNN 9.19, at::mm 785 TFLOP/s): FlashAttention-2 403.5 ms
(349 TFLOP/s, 2.25x), cuDNN with native GQA 233.4 ms (603 TFLOP/s, 1.30x; this script's merge is
unfused torch ops), cuDNN with K/V expanded to Hq heads 224.8 ms (expansion not timed). Why
paged_attention_prefill takes cuDNN for long chunks: docs/gpu.md "Prefill through cuDNN".
"""

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def mm_rate():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: torch.mm(a, b), 10)
    return 2 * n**3 / (ms * 1e-3)


def chunk_flops(lq, lk, hq, d):
    # QK^T and PV over the keys each query sees (bottom-right causal).
    seen = lq * (lk - lq) + lq * (lq + 1) / 2
    return 4 * hq * d * seen


def flash2(q, k, v, scale):
    # q [Lq, Hq, D], k/v [Lk, Hkv, D]: varlen FlashAttention-2, causal bottom-right.
    lq, lk = q.shape[0], k.shape[0]
    cu_q = torch.tensor([0, lq], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, lk], dtype=torch.int32, device=q.device)

    def run():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, lq, lk, 0.0, True,
                                                       False, scale=scale)[0]

    return run


def cudnn_call(q4, k4, v4, causal, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal,
                                                              False, scale=scale)


def cudnn_split(q, k, v, scale, expand):
    # [L, H, D] -> [1, H, L, D] views (no copy); GQA by expanding K/V heads when asked.
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    q4 = q.transpose(0, 1).unsqueeze(0)

    def kv4(t):
        t4 = t.transpose(0, 1).unsqueeze(0)
        if expand:
            t4 = t4.repeat_interleave(group, dim=1)
        return t4

    k4 = kv4(k)
    v4 = kv4(v)

    def run():
        if lk == lq:
            return cudnn_call(q4, k4, v4, True, scale)[0]
        o1, lse1 = cudnn_call(q4, k4[:, :, : lk - lq], v4[:, :, : lk - lq], False, scale)[:2]
        o2, lse2 = cudnn_call(q4, k4[:, :, lk - lq :], v4[:, :, lk - lq :], True, scale)[:2]
        # lse [1, H, Lq] (maybe [1, H, Lq, 1]); merge the two softmax halves.
        lse1 = lse1.reshape(1, q4.shape[1], lq, 1).float()
        lse2 = lse2.reshape(1, q4.shape[1], lq, 1).float()
        m = torch.maximum(lse1, lse2)
        w1 = torch.exp(lse1 - m)
        w2 = torch.exp(lse2 - m)
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    hq, hkv, d = 32, 8, 128
    scale = 1 / math.sqrt(d)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    rate = mm_rate()
    print(f"at::mm 8192^3 bf16: {rate / 1e12:.0f} TFLOP/s", flush=True)
    k_all = torch.randn(args.tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_all = torch.randn(args.tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    q_all = torch.randn(args.tokens, hq, d, device="cuda", dtype=torch.bfloat16)
    backends = {
        "flash2 (today)": lambda q, k, v: flash2(q, k, v, scale),
        "cudnn, gqa expanded": lambda q, k, v: cudnn_split(q, k, v, scale, True),
        "cudnn, gqa native": lambda q, k, v: cudnn_split(q, k, v, scale, False),
    }
    results = {}
    total_flops = 0.0
    for c in range(0, args.tokens, args.chunk):
        lq = min(args.chunk, args.tokens - c)
        total_flops += chunk_flops(lq, c + lq, hq, d)
    for name, make in backends.items():
        total_ms = 0.0
        max_err = 0.0
        try:
            for c in range(0, args.tokens, args.chunk):
                lq = min(args.chunk, args.tokens - c)
                q = q_all[c : c + lq]
                k = k_all[: c + lq]
                v = v_all[: c + lq]
                run = make(q, k, v)
                total_ms += timed(run, args.reps)
                if c == 0 or c + lq == args.tokens:  # first and last chunk checked vs flash2
                    ref = flash2(q, k, v, scale)().float()
                    out = run()
                    if out.dim() == 4:
                        out = out[0].transpose(0, 1)
                    max_err = max(max_err, (out.float() - ref).abs().max().item())
                del run
                torch.cuda.empty_cache()
        except Exception as e:  # a backend this build lacks: say so and go on
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results[name] = {"error": str(e)[:300]}
            continue
        tflops = total_flops / (total_ms * 1e-3) / 1e12
        floor_ms = total_flops / rate * 1e3
        print(f"{name}: {total_ms:.1f} ms for {args.tokens} tokens in {args.chunk}-token chunks, "
              f"{tflops:.0f} TFLOP/s, {total_ms / floor_ms:.2f}x the FLOP floor {floor_ms:.1f} ms, "
              f"max abs diff vs flash2 {max_err:.3g}", flush=True)
        results[name] = {"ms": total_ms, "tflops": tflops, "ratio": total_ms / floor_ms,
                         "max_abs_diff": max_err}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mm_tflops": rate / 1e12, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
