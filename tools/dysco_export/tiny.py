"""Tiny random models for tests: a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
of a 4-layer Llama or Qwen3 with a real tokenizer, from a fixed seed.

The weights are scaled so that attention is far from uniform (sharp softmax rows), which makes mistakes in
masking, positions or paging visible in the outputs.
"""
import json
import math
import os
import shutil
from typing import Dict

import torch

from .errors import ExportError
from .safetensors_io import write_safetensors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TOKENIZERS = {
    "llama": os.path.join(REPO_ROOT, "tests", "data", "smollm2", "tokenizer.json"),
    "qwen3": os.path.join(REPO_ROOT, "tests", "data", "qwen3", "tokenizer.json"),
}

_SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_QWEN3_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")

ROPE_VARIANTS = ("none", "llama3", "yarn")


def tiny_hf_config(family: str, vocab_size: int, rope: str, special: Dict[str, object]) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen3ForCausalLM"],
        "model_type": family,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-5 if family == "llama" else 1e-6,
        "rope_theta": 10000.0 if family == "llama" else 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": family == "llama",
        "vocab_size": vocab_size,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "torch_dtype": "float32",
    }
    if rope == "llama3":  # original context 64: the tiny head_dim's wavelengths span all three bands
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif rope == "yarn":
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    return hf


def tiny_weights(hf: dict, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden, inter, hd = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    nh, nkv, vocab = hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]

    def linear(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(nh * hd, hidden, 2.0)  # gain 2: sharp attention
        w[p + "self_attn.k_proj.weight"] = linear(nkv * hd, hidden, 2.0)
        w[p + "self_attn.v_proj.weight"] = linear(nkv * hd, hidden)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, nh * hd)
        if hf["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm(hidden)
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(vocab, hidden)
    return w


def write_tiny_checkpoint(family: str, seed: int, out_dir: str, tokenizer_path: str = "",
                          rope: str = "none") -> None:
    from tokenizers import Tokenizer
    tokenizer_path = tokenizer_path or DEFAULT_TOKENIZERS[family]
    if not os.path.exists(tokenizer_path):
        raise ExportError(f"{tokenizer_path}: tokenizer.json not found")
    try:
        with open(tokenizer_path, encoding="utf-8") as f:
            tok_text = f.read()
        tokenizer = Tokenizer.from_str(tok_text)
    except Exception as e:
        raise ExportError(f"{tokenizer_path}: not a usable tokenizer.json ({e})") from None

    def tid(s):
        return tokenizer.token_to_id(s)

    if family == "llama":
        special = {"bos": tid("<|im_start|>"), "eos": tid("<|im_end|>"), "pad": "<|im_end|>",
                   "bos_token": "<|im_start|>", "template": _SMOLLM2_TEMPLATE}
    else:
        special = {"bos": None, "eos": tid("<|im_end|>"), "pad": "<|endoftext|>", "bos_token": None,
                   "template": _QWEN3_TEMPLATE}
    if special["eos"] is None:
        raise ExportError(f"{tokenizer_path}: has no <|im_end|> token (a ChatML tokenizer is needed)")
    hf = tiny_hf_config(family, tokenizer.get_vocab_size(with_added_tokens=True), rope, special)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    tok_config = {"bos_token": special["bos_token"], "eos_token": "<|im_end|>", "pad_token": special["pad"],
                  "add_bos_token": False, "chat_template": special["template"]}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tiny_weights(hf, seed), {"format": "pt"})
