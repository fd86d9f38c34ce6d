"""GGUF (llama.cpp) -> architecture config, weights by Hugging Face name, tokenizer, special tokens, chat.

Quantized tensors are dequantized to fp32 with gguf.quants. llama.cpp's converter permutes the rows of q_proj
and k_proj of "llama" models for its interleaved RoPE layout; we undo that (as transformers' GGUF loader does)
because the model uses Hugging Face's rotate_half RoPE.
"""
import os
import re
from typing import Dict, Tuple

import numpy as np
import torch

from .errors import ExportError

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freq_factors",
}


def open_gguf(path: str):
    """GGUFReader over `path`, with the problems of a damaged file reported as ExportError."""
    import gguf
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise ExportError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader signals a damaged file with assorted numpy/struct/value errors
        raise ExportError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ExportError(f"{path}: truncated GGUF file (tensor {t.name} ends at byte "
                              f"{int(t.data_offset) + int(t.n_bytes)}, file has {size})")
    return reader


def _field(reader, key: str, path: str, default=None, required: bool = False):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ExportError(f"{path}: missing GGUF metadata key {key}")
        return default
    try:
        return field.contents()
    except Exception:
        raise ExportError(f"{path}: corrupt GGUF metadata key {key}") from None


def reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert's permute(w, n_head): rows (head, dim/2, 2) back to (head, 2, dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, path: str) -> np.ndarray:
    from gguf import quants
    kind = t.tensor_type.name
    if kind not in _SUPPORTED_TYPES:
        raise ExportError(f"{path}: tensor {t.name} has unsupported type {kind} "
                          f"(supported: {', '.join(_SUPPORTED_TYPES)})")
    shape = [int(d) for d in reversed(list(t.shape))]
    try:
        data = quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(shape)
    except Exception as e:
        raise ExportError(f"{path}: cannot dequantize tensor {t.name} ({kind}): {e}") from None


def _model_name(path: str, reader) -> str:
    stem = os.path.basename(path)
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    stem = re.sub(r"[.-](Q\d|IQ\d|F16|F32|BF16|TQ\d)[A-Za-z0-9_]*$", "", stem)
    return stem or str(_field(reader, "general.name", path, default="model"))


def read_gguf(path: str, dtype: str) -> Tuple[dict, Dict[str, torch.Tensor], dict, dict, str]:
    """Returns (architecture config, weights by HF name, tokenizer.json dict, special tokens, chat template)."""
    from .tokenizer_from_gguf import tokenizer_json_from_gguf

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture", path, required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{path}: unsupported architecture {arch!r} (supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(key, default=None, required=True):
        return _field(reader, f"{arch}.{key}", path, default=default, required=required and default is None)

    num_heads = int(meta("attention.head_count"))
    num_kv_heads = meta("attention.head_count_kv", default=num_heads)
    if not isinstance(num_kv_heads, (int, np.integer)):
        raise ExportError(f"{path}: per-layer {arch}.attention.head_count_kv is not supported")
    num_kv_heads = int(num_kv_heads)
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", default=hidden // num_heads))

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ExportError(f"{path}: missing tensor token_embd.weight")
    vocab_size = int(list(tensors["token_embd.weight"].shape)[1])

    rope_scaling = None
    scaling_type = meta("rope.scaling.type", default="none")
    if scaling_type == "yarn":
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": float(meta("rope.scaling.factor")),
                        "original_max_position_embeddings": int(meta("rope.scaling.original_context_length"))}
    elif scaling_type == "linear":
        rope_scaling = {"type": "linear", "rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ExportError(f"{path}: unsupported {arch}.rope.scaling.type {scaling_type!r}")
    if "rope_freqs.weight" in tensors:  # Llama-3.1: llama.cpp stores the llama3 scaling as divisors
        rope_scaling = {"type": "llama3", "rope_type": "llama3", "freq_factors": "rope_freqs.weight"}

    config = {
        "architecture": arch,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(np.float32(meta("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(meta("rope.freq_base", default=10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "qk_norm": arch == "qwen3",
    }
    # eps is stored as float32 in GGUF: 1e-5 reads back as 9.9999997e-06; print the intended decimal.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")

    weights: Dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
            if not m or m.group(2) not in _LAYER_TENSORS:
                continue  # tensors the model does not use
            hf_name = f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
            if int(m.group(1)) >= config["num_layers"]:
                continue
        w = _dequantize(t, path)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = reverse_llama_permute(w, num_heads if "q_proj" in hf_name else num_kv_heads)
        weights[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # owned, writable

    try:
        tokenizer = tokenizer_json_from_gguf(reader)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{path}: {e}") from None

    bos = _field(reader, "tokenizer.ggml.bos_token_id", path)
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _field(reader, key, path)
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    if not eos_ids:
        raise ExportError(f"{path}: missing GGUF metadata key tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", path, default=eos_ids[0])
    chat_template = _field(reader, "tokenizer.chat_template", path, default="")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", path, default=None)
    if add_bos is None:
        add_bos = "<|start_header_id|>" in (chat_template or "")  # llama3 tokenizers prepend bos
    special = {"bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos_ids,
               "pad_token_id": int(pad), "add_bos": bool(add_bos)}
    return dict(config, model_name=_model_name(path, reader)), weights, tokenizer, special, chat_template
