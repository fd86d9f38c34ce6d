#!/usr/bin/env python3
"""The peer of the GPU benchmark (issue 9): Hugging Face transformers' own generation on the same
model shape and the same weights as bench-gpu, batch 1.

Reads one of our packages (config.json, and weights.safetensors with Hugging Face checkpoint names,
as `tools.dysco_export synthetic` writes them), builds the matching transformers model
(Qwen3ForCausalLM / LlamaForCausalLM) from config.json, loads the state dict, and times
`model.generate` with a static KV cache (a StaticCache sized to each context) and, where it works,
torch.compile (generate compiles its decode forward itself when the cache is static; a failure is
printed and the measurement retried uncompiled, and the JSON says so).

Per context L (a random prompt of L - steps - 1 token ids, so that the timed tokens are decoded at
positions up to L - 1, the window's last at L = max_position_embeddings; greedy, min_new_tokens =
max_new_tokens so that an eos does not stop it): one untimed generate (prefill + warm-up decode steps; the first decode steps of
a new cache shape compile, so its time is reported as `first_generate_s`, compile included), then
the timed one: a streamer takes a timestamp (after a device synchronise) at every new token; the
per-token latency is the gap between consecutive tokens after the first (mean and p50), the TTFT
the time from the call to the first token (prefill in one forward, as generate does).

Every measurement catches its own exception, prints it, records it in the JSON and goes on.
Usage: python3 bench/hf_peer.py --model DIR [--device cuda:0] [--contexts 8192,32768,131072]
       [--steps 32] [--warmup 4] [--compile 1] [--json PATH] [--random-weights]
"""

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="package dir (config.json, weights.safetensors)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--contexts", default="8192,32768,131072",
                   help="comma-separated prompt lengths; the longest also gives the TTFT")
    p.add_argument("--steps", type=int, default=32, help="timed decode tokens per context")
    p.add_argument("--warmup", type=int, default=4, help="decode tokens of the untimed generate")
    p.add_argument("--compile", type=int, default=1, help="1: let generate torch.compile (static cache)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-weights", action="store_true",
                   help="no weights.safetensors needed: random weights of the same shape "
                        "(speed does not depend on the values; for tests of this script)")
    return p.parse_args(argv)


def parse_contexts(text):
    out = sorted({int(x) for x in text.split(",") if x.strip()})
    if not out or out[0] < 2:
        raise ValueError("--contexts needs integers >= 2")
    return out


def hf_config_kwargs(pkg):
    """The transformers config arguments of our package's config.json (docs/model-interface.md)."""
    arch = pkg["architecture"]
    if arch not in ("llama", "qwen3"):
        raise ValueError(f"architecture {arch!r}: the peer knows llama and qwen3")
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[pkg["dtype"]]
    kw = dict(
        vocab_size=pkg["vocab_size"],
        hidden_size=pkg["hidden_size"],
        intermediate_size=pkg["intermediate_size"],
        num_hidden_layers=pkg["num_layers"],
        num_attention_heads=pkg["num_attention_heads"],
        num_key_value_heads=pkg["num_kv_heads"],
        head_dim=pkg["head_dim"],
        rms_norm_eps=pkg["rms_norm_eps"],
        max_position_embeddings=pkg["max_position_embeddings"],
        tie_word_embeddings=bool(pkg.get("tie_word_embeddings", False)),
        attention_bias=False,
        mlp_bias=False,
    )
    if arch == "qwen3":
        kw.pop("mlp_bias")
    special = pkg.get("special_tokens") or {}
    if special.get("bos_token_id") is not None:
        kw["bos_token_id"] = special["bos_token_id"]
    eos = special.get("eos_token_ids") or []
    if eos:
        kw["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    rope = {"rope_theta": float(pkg["rope_theta"])}
    if pkg.get("rope_scaling"):
        rope.update(pkg["rope_scaling"])
    return arch, dtype, kw, rope


def make_hf_config(pkg, attn):
    """A Qwen3Config / LlamaConfig: transformers 5 takes RoPE as `rope_parameters`, older versions
    as rope_theta + rope_scaling; whichever the installed class accepts."""
    import inspect
    import transformers

    arch, dtype, kw, rope = hf_config_kwargs(pkg)
    cls = transformers.Qwen3Config if arch == "qwen3" else transformers.LlamaConfig
    params = inspect.signature(cls.__init__).parameters
    if "rope_parameters" in params:
        rp = dict(rope)
        rp.setdefault("rope_type", rp.pop("type", "default"))
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = rope.pop("rope_theta")
        if rope:
            kw["rope_scaling"] = rope
    config = cls(**kw)
    config._attn_implementation = attn
    return arch, dtype, config


def load_model(args, pkg, device, torch):
    import transformers

    arch, dtype_name, config = make_hf_config(pkg, args.attn)
    dtype = getattr(torch, dtype_name)
    model_cls = transformers.Qwen3ForCausalLM if arch == "qwen3" else transformers.LlamaForCausalLM
    weights = os.path.join(args.model, "weights.safetensors")
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialised on the device: fast, no 16 GB copy
            model = model_cls(config)
    finally:
        torch.set_default_dtype(old)
    info = {"weights": "random" if args.random_weights else weights}
    if not args.random_weights:
        from safetensors.torch import load_file

        state = load_file(weights, device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        del state
        # A tied LM head is the embedding; rotary inv_freq is a buffer computed at init.
        missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")
                   and not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"weights.safetensors does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
    model.eval()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    info["load_s"] = time.perf_counter() - t0
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", args.attn)
    info["dtype"] = dtype_name
    return model, info


class TokenClock:
    """A generate streamer: one timestamp per put() after a device synchronise (the first put is the
    prompt, each later one a new token)."""

    def __init__(self, torch, device):
        self.torch, self.device, self.stamps = torch, device, []

    def put(self, value):
        if self.torch.device(self.device).type == "cuda":
            self.torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def summarise(gaps_s):
    v = sorted(gaps_s)
    if not v:
        return None, None
    return 1e3 * sum(v) / len(v), 1e3 * v[len(v) // 2]


def generate_timed(model, torch, ids, new_tokens, cache, compile_on, device):
    """One generate of `new_tokens` greedy tokens; returns (seconds to the first token, per-token
    gaps after it, total seconds)."""
    clock = TokenClock(torch, device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  streamer=clock, attention_mask=torch.ones_like(ids))
    if cache is not None:
        cache.reset()
        kwargs["past_key_values"] = cache
    else:
        kwargs["cache_implementation"] = "static"
    if not compile_on:
        kwargs["disable_compile"] = True
    t0 = time.perf_counter()
    model.generate(ids, **kwargs)
    total = time.perf_counter() - t0
    tokens = clock.stamps[1:]  # stamps[0]: the prompt
    ttft = tokens[0] - t0 if tokens else math.nan
    gaps = [b - a for a, b in zip(tokens, tokens[1:])]
    return ttft, gaps, total


def measure_context(model, torch, args, L, compile_on, device):
    # All under inference mode: the static cache's tensors are created, filled and reset in it (a
    # reset outside it would be an in-place update of inference tensors).
    with torch.inference_mode():
        return _measure_context(model, torch, args, L, compile_on, device)


def _measure_context(model, torch, args, L, compile_on, device):
    from transformers import StaticCache

    # The prompt stops short of L so that the timed tokens sit at positions L - steps - 1 .. L - 1:
    # the decode is measured at context L, and a 128K context fits a 128K window.
    new_tokens = max(args.steps, args.warmup) + 1
    prompt_len = L - new_tokens
    gen = torch.Generator(device="cpu").manual_seed(args.seed + L)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_len), generator=gen).to(device)
    cache_len = L
    try:
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
    except Exception as e:  # an older/newer signature: let generate build its own static cache
        print(f"hf_peer: StaticCache(config=..., max_cache_len=...) failed ({e}); "
              "using cache_implementation='static'", file=sys.stderr)
        cache = None
    r = {"context": L, "prompt_tokens": prompt_len, "compiled": compile_on}
    t0 = time.perf_counter()
    generate_timed(model, torch, ids, args.warmup + 1, cache, compile_on, device)
    r["first_generate_s"] = time.perf_counter() - t0
    ttft, gaps, total = generate_timed(model, torch, ids, args.steps + 1, cache, compile_on, device)
    r["ttft_s"] = ttft
    r["generate_s"] = total
    r["per_token_ms_mean"], r["per_token_ms_p50"] = summarise(gaps)
    r["timed_tokens"] = len(gaps)
    del cache
    return r


def main(argv=None):
    args = parse_args(argv)
    # transformers 5.2x renames generate's past_key_values to cache (a FutureWarning); 5.17, the GPU
    # machine's, takes past_key_values.
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
    out = {"peer": "transformers", "model_dir": args.model, "device": args.device, "batch": 1,
           "contexts": [], "errors": []}

    def finish():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0 if not out["errors"] else 1

    try:
        import torch
        import transformers
    except Exception as e:
        out["errors"].append(f"import: {e}")
        print(f"hf_peer: {e}", file=sys.stderr)
        return finish()
    out["transformers"] = transformers.__version__
    out["torch"] = torch.__version__
    with open(os.path.join(args.model, "config.json")) as f:
        pkg = json.load(f)
    out["model_name"] = pkg.get("model_name")
    contexts = parse_contexts(args.contexts)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        out["errors"].append("no CUDA device")
        print("hf_peer: no CUDA device", file=sys.stderr)
        return finish()
    try:
        model, info = load_model(args, pkg, device, torch)
    except Exception as e:
        traceback.print_exc()
        out["errors"].append(f"load: {e}")
        return finish()
    out.update(info)
    print(f"hf_peer: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{pkg.get('model_name')} {info['dtype']} on {device} ({info['attn_implementation']}), "
          f"loaded in {info['load_s']:.1f} s", flush=True)
    compile_on = bool(args.compile) and device.type == "cuda"
    out["compile_requested"] = bool(args.compile)
    for L in contexts:
        if L > pkg["max_position_embeddings"] or L <= max(args.steps, args.warmup) + 2:
            out["errors"].append(f"context {L}: not in ({max(args.steps, args.warmup) + 2}, "
                                 f"max_position_embeddings {pkg['max_position_embeddings']}]")
            continue
        r = None
        for attempt_compile in ([compile_on, False] if compile_on else [False]):
            try:
                r = measure_context(model, torch, args, L, attempt_compile, device)
                break
            except Exception as e:
                msg = f"context {L} ({'compiled' if attempt_compile else 'eager'}): " \
                      f"{type(e).__name__}: {str(e)[:400]}"
                print(f"hf_peer: {msg}", file=sys.stderr, flush=True)
                out["errors"].append(msg)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if r is None:
            out["contexts"].append({"context": L, "error": out["errors"][-1]})
            continue
        out["contexts"].append(r)
        print(f"hf_peer: context {L}: {r['per_token_ms_mean']:.2f} ms/token (p50 "
              f"{r['per_token_ms_p50']:.2f}, {r['timed_tokens']} tokens, "
              f"{'torch.compile' if r['compiled'] else 'no compile'}), TTFT {r['ttft_s']:.2f} s, "
              f"first generate (compile + warm-up) {r['first_generate_s']:.1f} s", flush=True)
    done = [r for r in out["contexts"] if "ttft_s" in r]
    if done:
        longest = max(done, key=lambda r: r["context"])
        out["ttft"] = {"tokens": longest["prompt_tokens"], "seconds": longest["ttft_s"]}
    return finish()


if __name__ == "__main__":
    sys.exit(main())
