"""GGUF (llama.cpp) -> architecture config, weights by Hugging Face name, tokenizer, special tokens, chat.

Quantized tensors are dequantized to fp32 with gguf.quants. llama.cpp's converter permutes the rows of q_proj
and k_proj of "llama" models for its interleaved RoPE layout; we undo that (as transformers' GGUF loader does)
because the model uses Hugging Face's rotate_half RoPE.
"""
import mmap
import os
import re
import struct
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


# GGUF metadata value types (gguf.GGUFValueType): the byte size of each scalar type; 8 is a string (u64 length,
# bytes), 9 an array (u32 element type, u64 count, elements).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_ARRAY_DEPTH = 4
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS


def _check_header_layout(path: str, size: int) -> None:
    """Walks the GGUF header (metadata, tensor infos) and checks every count and length against the bytes left,
    before gguf.GGUFReader reads it. The reader trusts them: reads past the end of the file come back empty, so
    an array of 2**60 one-byte elements at the end of a 40-byte file makes it loop (and allocate) for ever.
    Each element read here takes at least one byte of the file, so the walk is linear in the file's size."""
    def corrupt(what: str):
        return ExportError(f"{path}: corrupt or truncated GGUF header ({what})")

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 4
        order = "<"

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n > size - pos:
                raise corrupt(f"{what} at byte {pos}: {n} bytes, the file has {size - pos} left")
            start, pos = pos, pos + n
            return start

        def u32(what: str) -> int:
            return struct.unpack_from(order + "I", data, take(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack_from(order + "Q", data, take(8, what))[0]

        def string(what: str) -> None:
            take(u64(what + " length"), what)

        def value(vtype: int, what: str, depth: int) -> None:
            if vtype in _GGUF_SCALAR_SIZES:
                take(_GGUF_SCALAR_SIZES[vtype], what)
            elif vtype == _GGUF_STRING:
                string(what)
            elif vtype == _GGUF_ARRAY:
                if depth >= _GGUF_MAX_ARRAY_DEPTH:
                    raise corrupt(f"{what}: arrays nested deeper than {_GGUF_MAX_ARRAY_DEPTH}")
                etype = u32(what + " element type")
                count = u64(what + " length")
                if etype in _GGUF_SCALAR_SIZES:
                    take(count * _GGUF_SCALAR_SIZES[etype], f"{what} ({count} elements)")
                    return
                # Each string or array element takes at least 8 bytes: refuse a count the file cannot hold
                # before looping over it.
                if count > (size - pos) // 8:
                    raise corrupt(f"{what}: {count} elements, the file has {size - pos} bytes left")
                for _ in range(count):
                    value(etype, what, depth + 1)
            else:
                raise corrupt(f"{what}: unknown value type {vtype}")

        version = u32("version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader decides)
            order = ">"
        tensor_count = u64("tensor count")
        kv_count = u64("metadata count")
        for i in range(kv_count):
            if pos >= size:
                raise corrupt(f"metadata count {kv_count}, the file ends after {i} entries")
            string(f"metadata key {i}")
            value(u32(f"metadata {i} type"), f"metadata {i}", 0)
        for i in range(tensor_count):
            if pos >= size:
                raise corrupt(f"tensor count {tensor_count}, the file ends after {i} tensor infos")
            string(f"tensor {i} name")
            n_dims = u32(f"tensor {i} dimension count")
            if n_dims > _GGUF_MAX_DIMS:
                raise corrupt(f"tensor {i} has {n_dims} dimensions (at most {_GGUF_MAX_DIMS})")
            take(8 * n_dims + 4 + 8, f"tensor {i} info")


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
    _check_header_layout(path, size)
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


_INT32_MAX = 2**31 - 1


def _int_field(reader, key: str, path: str, lo: int, hi: int = _INT32_MAX, default=None) -> int:
    """An integer metadata value in [lo, hi] (the ranges of core's config parser); required unless `default`."""
    v = _field(reader, key, path, default=default, required=default is None)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ExportError(f"{path}: GGUF metadata key {key} must be an integer, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ExportError(f"{path}: GGUF metadata key {key} must be in [{lo}, {hi}], got {int(v)}")
    return int(v)


def _float_field(reader, key: str, path: str, default=None) -> float:
    """A finite, positive number; required unless `default`."""
    v = _field(reader, key, path, default=default, required=default is None)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ExportError(f"{path}: GGUF metadata key {key} must be a number, got {type(v).__name__}")
    if not (np.isfinite(v) and v > 0):
        raise ExportError(f"{path}: GGUF metadata key {key} must be a finite number > 0, got {v}")
    return float(v)


def _str_field(reader, key: str, path: str, default=None):
    v = _field(reader, key, path, default=default)
    if v is not None and not isinstance(v, str):
        raise ExportError(f"{path}: GGUF metadata key {key} must be a string, got {type(v).__name__}")
    return v


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

    def meta_int(key, lo=1, hi=_INT32_MAX, default=None):
        return _int_field(reader, f"{arch}.{key}", path, lo, hi, default)

    def meta_float(key, default=None):
        return _float_field(reader, f"{arch}.{key}", path, default)

    num_heads = meta_int("attention.head_count", hi=4096)
    if isinstance(_field(reader, f"{arch}.attention.head_count_kv", path), (list, np.ndarray)):
        raise ExportError(f"{path}: per-layer {arch}.attention.head_count_kv is not supported")
    num_kv_heads = meta_int("attention.head_count_kv", hi=4096, default=num_heads)
    if num_heads % num_kv_heads != 0:
        raise ExportError(f"{path}: {arch}.attention.head_count {num_heads} is not a multiple of "
                          f"{arch}.attention.head_count_kv {num_kv_heads}")
    hidden = meta_int("embedding_length")
    head_dim = meta_int("attention.key_length", hi=4096, default=max(1, hidden // num_heads))

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ExportError(f"{path}: missing tensor token_embd.weight")
    embd_shape = [int(d) for d in tensors["token_embd.weight"].shape]
    if len(embd_shape) != 2 or not 1 <= embd_shape[1] <= _INT32_MAX:
        raise ExportError(f"{path}: tensor token_embd.weight has shape {embd_shape[::-1]}, "
                          f"expected [vocab_size, {hidden}]")
    vocab_size = embd_shape[1]

    rope_scaling = None
    scaling_type = _str_field(reader, f"{arch}.rope.scaling.type", path, default="none")
    if scaling_type == "yarn":
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": meta_float("rope.scaling.factor"),
                        "original_max_position_embeddings": meta_int("rope.scaling.original_context_length")}
    elif scaling_type == "linear":
        rope_scaling = {"type": "linear", "rope_type": "linear", "factor": meta_float("rope.scaling.factor")}
    elif scaling_type != "none":
        raise ExportError(f"{path}: unsupported {arch}.rope.scaling.type {scaling_type!r}")
    if "rope_freqs.weight" in tensors:  # Llama-3.1: llama.cpp stores the llama3 scaling as divisors
        rope_scaling = {"type": "llama3", "rope_type": "llama3", "freq_factors": "rope_freqs.weight"}

    config = {
        "architecture": arch,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta_int("feed_forward_length"),
        "num_layers": meta_int("block_count", hi=4096),
        "num_attention_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(np.float32(meta_float("attention.layer_norm_rms_epsilon"))),
        "rope_theta": meta_float("rope.freq_base", default=10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": meta_int("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "qk_norm": arch == "qwen3",
    }
    # eps is stored as float32 in GGUF: 1e-5 reads back as 9.9999997e-06; print the intended decimal.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")
    if not (np.isfinite(config["rms_norm_eps"]) and config["rms_norm_eps"] > 0):  # out of float32's range
        raise ExportError(f"{path}: GGUF metadata key {arch}.attention.layer_norm_rms_epsilon is not a float32 > 0")

    weights: Dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[name]
        else:
            m = re.fullmatch(r"blk\.(\d{1,9})\.(\w+)\.weight", name)
            if not m or m.group(2) not in _LAYER_TENSORS:
                continue  # tensors the model does not use
            hf_name = f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
            if int(m.group(1)) >= config["num_layers"]:
                continue
        w = _dequantize(t, path)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = num_heads if "q_proj" in hf_name else num_kv_heads
            if w.ndim != 2 or w.shape[0] % (2 * n_head) != 0:
                raise ExportError(f"{path}: tensor {name} has shape {list(w.shape)}: its rows are not "
                                  f"{n_head} heads of an even size")
            w = reverse_llama_permute(w, n_head)
        weights[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # owned, writable

    try:
        tokenizer = tokenizer_json_from_gguf(reader)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{path}: {e}") from None

    def token_id(key, default=None):
        v = _field(reader, key, path)
        return default if v is None else _int_field(reader, key, path, 0, vocab_size - 1)

    bos = token_id("tokenizer.ggml.bos_token_id")
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = token_id(key)
        if v is not None and v not in eos_ids:
            eos_ids.append(v)
    if not eos_ids:
        raise ExportError(f"{path}: missing GGUF metadata key tokenizer.ggml.eos_token_id")
    pad = token_id("tokenizer.ggml.padding_token_id", default=eos_ids[0])
    chat_template = _str_field(reader, "tokenizer.chat_template", path, default="")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", path, default=None)
    if add_bos is None:
        add_bos = "<|start_header_id|>" in chat_template  # llama3 tokenizers prepend bos
    if add_bos and bos is None:
        raise ExportError(f"{path}: tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing")
    special = {"bos_token_id": bos, "eos_token_ids": eos_ids, "pad_token_id": pad, "add_bos": bool(add_bos)}
    return dict(config, model_name=_model_name(path, reader)), weights, tokenizer, special, chat_template
