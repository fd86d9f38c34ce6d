"""Hugging Face checkpoint directory (Llama-3.x or Qwen3) -> architecture config, weights, tokenizer, special
tokens, chat template.

Reads config.json, model.safetensors or its shards (model.safetensors.index.json), tokenizer.json,
tokenizer_config.json (chat template, bos/eos/pad) and generation_config.json (extra eos ids) if present.
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ExportError
from .safetensors_io import read_checkpoint_tensors

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
_MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3"}


def _read_json(path: str, required: bool = True) -> Optional[dict]:
    if not os.path.exists(path):
        if required:
            raise ExportError(f"{path}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: not a JSON object")
    return value


def architecture_of(hf: dict, path: str) -> str:
    for name in hf.get("architectures") or []:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    if hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    found = hf.get("architectures") or hf.get("model_type")
    raise ExportError(f"{path}: unsupported architecture {found!r} (supported: "
                      f"{', '.join(_ARCHITECTURES)})")


def arch_config_from_hf(hf: dict, path: str, dtype: str) -> dict:
    arch = architecture_of(hf, path)
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ExportError(f"{path}: unsupported: attention_bias / mlp_bias")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{path}: unsupported hidden_act {hf.get('hidden_act')!r} (only silu)")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ExportError(f"{path}: unsupported partial_rotary_factor {hf['partial_rotary_factor']}")
    if hf.get("use_sliding_window"):
        raise ExportError(f"{path}: unsupported: use_sliding_window")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            rope_scaling = dict(rope_scaling, type=kind, rope_type=kind)
        return {
            "architecture": arch,
            "dtype": dtype,
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(hf["intermediate_size"]),
            "num_layers": int(hf["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or hidden // heads),
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(hf.get("rope_theta", 10000.0)),
            "rope_scaling": rope_scaling or None,
            "max_position_embeddings": int(hf["max_position_embeddings"]),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "qk_norm": arch == "qwen3",
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path}: missing or bad field {e}") from None


def _token_id(token, tokenizer: dict) -> Optional[int]:
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tokenizer.get("model", {}).get("vocab", {})
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _ids(value) -> List[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _post_processor_adds_bos(tokenizer: dict, bos: Optional[int]) -> bool:
    if bos is None:
        return False
    text = json.dumps(tokenizer.get("post_processor") or {})
    return "TemplateProcessing" in text and f'"id": "{_bos_content(tokenizer, bos)}"' in text


def _bos_content(tokenizer: dict, bos: int) -> str:
    for added in tokenizer.get("added_tokens", []):
        if int(added.get("id", -1)) == bos:
            return added.get("content", "")
    return ""


def _chat_template(checkpoint_dir: str, tok_config: dict) -> str:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = os.path.join(checkpoint_dir, "chat_template.jinja")
    if not template and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template or ""


def checkpoint_digest(checkpoint_dir: str) -> str:
    """sha256 over the names and sha256s of the files an export reads."""
    from .package import file_sha256
    names = sorted(n for n in os.listdir(checkpoint_dir)
                   if n.endswith((".safetensors", ".json", ".jinja")))
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\0{file_sha256(os.path.join(checkpoint_dir, n))}\0".encode())
    return h.hexdigest()


def read_hf(checkpoint_dir: str, dtype: str) -> Tuple[dict, Dict[str, torch.Tensor], dict, dict, str]:
    """Returns (architecture config, weights by HF name, tokenizer.json dict, special tokens, chat template)."""
    if not os.path.isdir(checkpoint_dir):
        raise ExportError(f"{checkpoint_dir}: not a directory")
    config_path = os.path.join(checkpoint_dir, "config.json")
    hf = _read_json(config_path)
    config = arch_config_from_hf(hf, config_path, dtype)
    tokenizer = _read_json(os.path.join(checkpoint_dir, "tokenizer.json"))
    tok_config = _read_json(os.path.join(checkpoint_dir, "tokenizer_config.json"), required=False) or {}
    gen_config = _read_json(os.path.join(checkpoint_dir, "generation_config.json"), required=False) or {}

    weights = read_checkpoint_tensors(checkpoint_dir)
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)

    if "bos_token" in tok_config:
        bos = _token_id(tok_config["bos_token"], tokenizer)
    else:
        bos = hf.get("bos_token_id")
    eos: List[int] = []
    for candidate in ([_token_id(tok_config.get("eos_token"), tokenizer)] + _ids(hf.get("eos_token_id"))
                      + _ids(gen_config.get("eos_token_id"))):
        if candidate is not None and candidate not in eos:
            eos.append(candidate)
    if not eos:
        raise ExportError(f"{config_path}: no eos token (config.json eos_token_id / tokenizer_config eos_token)")
    pad = _token_id(tok_config.get("pad_token"), tokenizer)
    if pad is None:
        pad = hf.get("pad_token_id")
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"]) and bos is not None
    else:
        add_bos = _post_processor_adds_bos(tokenizer, bos)
    special = {"bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos,
               "pad_token_id": int(pad) if pad is not None else eos[0], "add_bos": add_bos}
    name = os.path.basename(os.path.normpath(os.path.abspath(checkpoint_dir)))
    return (dict(config, model_name=name), weights, tokenizer, special,
            _chat_template(checkpoint_dir, tok_config))
