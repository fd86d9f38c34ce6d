"""Synthetic packages: the real architecture of Qwen3-8B or Llama-3.1-8B (or a smaller variant for tests, by
overrides) with seeded random weights, for benchmarks where the real checkpoint is not available (the GPU
machine has no network). Same package format as a real export: code in model.pt, weights in
weights.safetensors, the reference DySCO configuration of the shape, a tokenizer whose ids fit the vocabulary.

Weights: normal(0, 0.02) for every matrix (Hugging Face's initializer_range), ones for the norm weights. Each
matrix is made in chunks of CHUNK_ELEMENTS elements (whole rows); chunk k of tensor `name` draws from its own
torch.Generator seeded with the first 8 bytes of sha256(f"{seed}:{name}:{k}"), in fp32, then rounded to the
package dtype. So the weights depend only on (shape and overrides, dtype, seed, generation device): not on the
order or number of threads (chunks are drawn in parallel), and a tensor can be regenerated alone. The stream of
a CUDA generator differs from the CPU's: `--device cuda` gives other (equally seeded) weights, recorded in
config.json's source.
"""
import concurrent.futures
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional

from .errors import ExportError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN3_TOKENIZER = os.path.join(REPO_ROOT, "tests", "data", "qwen3", "tokenizer.json")
CHUNK_ELEMENTS = 1 << 24  # 16M fp32 draws (64 MB) per generator
INIT_STD = 0.02
DEFAULT_MAX_POSITIONS = 131072

# config.json architecture fields of the real models (their Hugging Face config.json). rope_scaling is set
# from --max-position-embeddings (rope_scaling_for).
SHAPES: Dict[str, dict] = {
    "qwen3-8b": {
        "architecture": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_layers": 36, "num_attention_heads": 32, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "qk_norm": True,
    },
    "llama3.1-8b": {
        "architecture": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_layers": 32, "num_attention_heads": 32, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "qk_norm": False,
    },
}
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
             "num_kv_heads", "head_dim")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")
_BOOL_KEYS = ("tie_word_embeddings", "qk_norm")
QWEN3_NATIVE_CONTEXT = 32768  # Qwen3's original_max_position_embeddings for YaRN

# Llama-3.1's special tokens, at their real ids when the vocabulary is the real 128256 (the last 256 ids).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] + \
                  [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
_LLAMA3_TEMPLATE = "{{ '<|start_header_id|>' }}"  # recognised by package.chat_settings as the llama3 format


def rope_scaling_for(architecture: str, max_positions: int) -> Optional[dict]:
    """Llama-3.1: always its llama3 scaling (factor 8 over 8192, as its config.json). Qwen3: YaRN factor 4
    over 32768 when the context passes 32768, as Qwen documents for 128K; none otherwise."""
    if architecture == "llama":
        return {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if max_positions > QWEN3_NATIVE_CONTEXT:
        return {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": QWEN3_NATIVE_CONTEXT}
    return None


def parse_overrides(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key in _INT_KEYS:
                out[key] = int(value)
                if out[key] <= 0:
                    raise ValueError("must be positive")
            elif key in _FLOAT_KEYS:
                out[key] = float(value)
            elif key in _BOOL_KEYS:
                if value not in ("true", "false"):
                    raise ValueError("must be true or false")
                out[key] = value == "true"
            else:
                raise ValueError(f"unknown key (one of {', '.join(_INT_KEYS + _FLOAT_KEYS + _BOOL_KEYS)})")
        except ValueError as e:
            raise ExportError(f"--override {item!r}: {e}") from None
    return out


def synthetic_arch(shape: str, dtype: str, max_positions: int, overrides: dict) -> dict:
    arch = dict(SHAPES[shape], **overrides)
    arch["dtype"] = dtype
    arch["max_position_embeddings"] = max_positions
    arch["rope_scaling"] = rope_scaling_for(arch["architecture"], max_positions)
    if arch["num_attention_heads"] % arch["num_kv_heads"]:
        raise ExportError(f"--override: num_kv_heads {arch['num_kv_heads']} does not divide "
                          f"num_attention_heads {arch['num_attention_heads']}")
    return arch


def llama3_byte_tokenizer(vocab_size: int) -> dict:
    """A byte-level BPE without merges: ids 0..255 are the bytes (GPT-2's byte-to-character alphabet), so any
    text round-trips, one token per byte; the 256 Llama-3 special tokens take the last 256 ids (128000..128255
    for the real vocabulary). Meta's tokenizer is not available here. Ids 256..vocab-257 are filler entries
    "<|filler_<id>|>" that encoding never produces (no merges); they exist because the `tokenizers` library
    numbers added tokens after the model's vocabulary."""
    if vocab_size < 512:
        raise ExportError(f"vocab_size {vocab_size}: the byte-level llama3 tokenizer needs at least 512 ids")
    alphabet = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = {b: chr(b) for b in alphabet}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    first_special = vocab_size - len(LLAMA3_SPECIALS)
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": first_special + i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in enumerate(LLAMA3_SPECIALS)],
        "normalizer": None, "pre_tokenizer": level, "post_processor": dict(level, trim_offsets=False),
        "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict({chars[b]: b for b in range(256)},
                                **{f"<|filler_{i}|>": i for i in range(256, first_special)}),
                  "merges": []},
    }


def tokenizer_and_specials(arch: dict):
    """(tokenizer.json dict, special_tokens, chat template) for the shape's family."""
    if arch["architecture"] == "qwen3":
        with open(QWEN3_TOKENIZER, encoding="utf-8") as f:
            tokenizer = json.load(f)
        ids = {t["content"]: int(t["id"]) for t in tokenizer.get("added_tokens", [])}
        size = max(list(ids.values()) + list(tokenizer["model"]["vocab"].values())) + 1
        if size > arch["vocab_size"]:
            raise ExportError(f"vocab_size {arch['vocab_size']} is smaller than the Qwen3 tokenizer's {size} ids")
        special = {"bos_token_id": None, "eos_token_ids": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                   "pad_token_id": ids["<|endoftext|>"], "add_bos": False}
        return tokenizer, special, "<|im_start|>"
    tokenizer = llama3_byte_tokenizer(arch["vocab_size"])
    first = arch["vocab_size"] - len(LLAMA3_SPECIALS)
    special = {"bos_token_id": first, "eos_token_ids": [first + 1, first + 8, first + 9],
               "pad_token_id": first + 4, "add_bos": True}
    return tokenizer, special, _LLAMA3_TEMPLATE


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(name: str, shape, dtype, seed: int, device: str, pool) -> "torch.Tensor":
    """normal(0, INIT_STD) (ones for 1-D norm weights) as described in the module docstring, on the CPU."""
    import torch
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    rows, cols = shape
    rows_per_chunk = max(1, CHUNK_ELEMENTS // cols)
    out = torch.empty(shape, dtype=dtype)

    def fill(k: int) -> None:
        r0 = k * rows_per_chunk
        r1 = min(rows, r0 + rows_per_chunk)
        g = torch.Generator(device=device)
        g.manual_seed(_chunk_seed(seed, name, k))
        part = torch.empty((r1 - r0, cols), dtype=torch.float32, device=device).normal_(0.0, INIT_STD, generator=g)
        out[r0:r1].copy_(part.to(dtype))

    chunks = (rows + rows_per_chunk - 1) // rows_per_chunk
    list(pool.map(fill, range(chunks)))
    return out


def export_synthetic(args) -> None:
    import torch

    from . import package
    from .model import DTYPES, build_model, load_kernels, required_weights
    from .safetensors_io import TensorSpec

    start = time.time()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise ExportError(f"--device {args.device}: CUDA is not available")
    overrides = parse_overrides(args.override)
    arch = synthetic_arch(args.shape, args.dtype, args.max_position_embeddings, overrides)
    arch["model_name"] = f"synthetic-{args.shape}" + ("-custom" if overrides else "") + f"-seed{args.seed}"
    load_kernels(args.kernels)
    tokenizer, special, template = tokenizer_and_specials(arch)
    chat = package.chat_settings(template, arch["architecture"])
    dysco = package.reference_dysco(arch) or package.dysco_defaults(
        chat["chat_format"], arch["architecture"], tokenizer, special["bos_token_id"])
    model = build_model(arch, arch["model_name"])
    source = {"kind": "synthetic", "path": "", "sha256": "",
              "shape": args.shape, "overrides": overrides, "seed": args.seed, "init_std": INIT_STD,
              "generator_device": args.device}
    config = package.assemble_config(arch["model_name"], arch, special, chat, dysco, source)

    dtype = DTYPES[args.dtype]
    shapes = required_weights(arch)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
    workers = args.threads or (os.cpu_count() or 1)
    torch.set_num_threads(1)  # the chunks are the parallelism
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    specs = [TensorSpec(name, dtype, shape,
                        (lambda n=name, s=shape: make_tensor(n, s, dtype, args.seed, args.device, pool)))
             for name, shape in shapes.items()]
    last = [time.time()]

    def progress(name: str, end: int) -> None:
        now = time.time()
        if now - last[0] >= 5:
            last[0] = now
            print(f"dysco_export: {end / 2**30:.2f} / {total / 2**30:.2f} GiB ({name}), "
                  f"{now - start:.0f} s", file=sys.stderr, flush=True)

    print(f"dysco_export: synthetic {args.shape} {args.dtype} seed {args.seed}: {len(specs)} tensors, "
          f"{total / 2**30:.2f} GiB, {workers} threads", file=sys.stderr, flush=True)
    try:
        package.write_package(args.out, config, model, tokenizer, specs, progress)
    finally:
        pool.shutdown()
    print(f"dysco_export: wrote {args.out} in {time.time() - start:.1f} s", file=sys.stderr)
