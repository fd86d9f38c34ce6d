"""Writing a model package directory (model.pt, weights.safetensors, config.json, tokenizer.json;
docs/model-interface.md) and loading one in Python (load_module), and the
parts of config.json that do not depend on the source format: chat format, DySCO defaults, provenance.

Provenance: config.json's "source" records the source digest and the exporter version (a hash of this
package's own files), so that `--skip-if-current` can tell that a package is up to date without importing
torch. The source digest is cached in the package keyed by the source's path, size and mtime.
"""
import ast
import hashlib
import json
import os
import re
from typing import Dict, List, Optional

from .errors import ExportError

# 4: weight_names maps each parameter to a list of tensor names, concatenated along dim 0 at load (the fused
# q/k/v and gate/up weights; the weights file is laid out as in 3, with those tensors adjacent).
# 3: weights in weights.safetensors (Hugging Face names, package dtype, 64-byte aligned), bound at load;
# model.pt holds the code, empty placeholder parameters and weight_names; the forward takes probe_layers
# (host) + probe_heads [H] and returns probs [B, H, P x page_size] (no host synchronisation).
# 2 had the same forward with the weights inside model.pt; 1 had a forward that synchronised.
FORMAT_VERSION = 4
WEIGHTS_FILE = "weights.safetensors"
_HERE = os.path.dirname(os.path.abspath(__file__))
_DIGEST_CACHE = ".source-digest.json"

CHATML_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_GENERATION_PROMPT = "<|im_start|>assistant\n"
QWEN3_NO_THINK_GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
LLAMA3_GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# docs/dysco-reference-algorithm.md "Parameters (reference defaults)"; selected_heads and template_sequences are per model.
REFERENCE_DYSCO = {
    "selected_heads": [],
    "top_p": 0.975,
    "top_k": 4096,
    "strength": 2.0,
    "decay_factor": 0.75,
    "context_warmup_steps": 8,
    "intervention_warmup": "auto",
    "dynamic_rescale": True,
    "template_sequences": [],
}


def exporter_version() -> str:
    """sha256 over this package's .py files and shipped reference configs (name and content)."""
    h = hashlib.sha256()
    files = []
    for root, dirs, names in os.walk(_HERE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.join(root, n) for n in names if n.endswith((".py", ".yaml"))]
    for path in sorted(files):
        h.update(os.path.relpath(path, _HERE).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: str) -> Dict[str, object]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_sha256(path: str, package_dir: str) -> str:
    """sha256 of `path`, reusing the digest cached in package_dir while path, size and mtime are unchanged."""
    key = _stat_key(path)
    cache = os.path.join(package_dir, _DIGEST_CACHE)
    try:
        with open(cache, encoding="utf-8") as f:
            entry = json.load(f)
        if {k: entry.get(k) for k in key} == key and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = file_sha256(path)
    if os.path.isdir(package_dir):
        _write_atomic(cache, json.dumps(dict(key, sha256=digest)).encode())
    return digest


def package_is_current(package_dir: str, source_path: str, dtype: Optional[str] = None) -> bool:
    """Whether the package was exported by this exporter from this source (and, given, in this dtype)."""
    try:
        with open(os.path.join(package_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        source = config["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if dtype is not None and config.get("dtype") != dtype:
        return False
    if not all(os.path.exists(os.path.join(package_dir, n)) for n in ("model.pt", WEIGHTS_FILE, "tokenizer.json")):
        return False
    if source.get("exporter_version") != exporter_version():
        return False
    return source.get("sha256") == cached_sha256(source_path, package_dir)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def weight_specs(config: dict, weights: dict) -> list:
    """TensorSpecs of every tensor the model needs (model.required_weights, in that order), taken from an
    in-memory dict by Hugging Face name and converted to the package dtype when written."""
    from .model import DTYPES, required_weights
    from .safetensors_io import TensorSpec
    dtype = DTYPES[config["dtype"]]
    return [TensorSpec(name, dtype, shape, (lambda n=name: weights[n]))
            for name, shape in required_weights(config).items()]


def write_package(out_dir: str, config: dict, model, tokenizer: dict, specs: list,
                  progress=None) -> None:
    """weights.safetensors (streamed tensor by tensor), model.pt and tokenizer.json first, config.json last: a
    package with a config.json is complete."""
    from .safetensors_io import write_safetensors_streamed
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    write_safetensors_streamed(os.path.join(out_dir, config["weights"]), specs,
                               {"format": "pt", "producer": "dysco_export"}, progress=progress)
    tmp_model = os.path.join(out_dir, "model.pt.tmp")
    model.save(tmp_model)
    os.replace(tmp_model, os.path.join(out_dir, "model.pt"))
    _write_atomic(os.path.join(out_dir, "tokenizer.json"),
                  json.dumps(tokenizer, ensure_ascii=False).encode("utf-8"))
    _write_atomic(config_path, (config_json_text(config) + "\n").encode("utf-8"))


def config_json_text(config: dict) -> str:
    """Indented JSON with lists of numbers on one line (token-id sequences, head pairs)."""
    text = json.dumps(config, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]",
                  lambda m: "[" + ", ".join(re.split(r"\s*,\s*", m.group(1).strip())) + "]", text)


def encode_ids(tokenizer: dict, texts: List[str]) -> List[List[int]]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(json.dumps(tokenizer))  # parsing a 150k-token vocabulary takes a while: once
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def chat_settings(chat_template: Optional[str], architecture: str) -> dict:
    """chat_format and chat section of config.json, recognised from the Jinja chat template."""
    template = chat_template or ""
    if "<|im_start|>" in template:
        default_system = CHATML_SMOLLM2_SYSTEM if CHATML_SMOLLM2_SYSTEM in template else None
        prompt = QWEN3_NO_THINK_GENERATION_PROMPT if architecture == "qwen3" else CHATML_GENERATION_PROMPT
        return {"chat_format": "chatml",
                "chat": {"default_system": default_system, "generation_prompt": prompt, "stop_strings": []}}
    if "<|start_header_id|>" in template:
        return {"chat_format": "llama3",
                "chat": {"default_system": None, "generation_prompt": LLAMA3_GENERATION_PROMPT,
                         "stop_strings": []}}
    return {"chat_format": "none", "chat": {"default_system": None, "generation_prompt": "", "stop_strings": []}}


def template_sequences(chat_format: str, architecture: str, tokenizer: dict, bos_token_id: Optional[int]):
    """The chat-template markers DySCO never selects, as token ids (mirrors the reference configs)."""
    if chat_format == "chatml":
        texts = ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]
        if architecture == "qwen3":
            texts.append("<think>\n\n</think>\n\n")
    elif chat_format == "llama3":
        texts = ["<|start_header_id|>system<|end_header_id|>\n\n",
                 "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]
    else:
        return []
    sequences = [[bos_token_id]] if chat_format == "llama3" and bos_token_id is not None else []
    return sequences + encode_ids(tokenizer, texts)


def dysco_defaults(chat_format: str, architecture: str, tokenizer: dict, bos_token_id: Optional[int]) -> dict:
    d = json.loads(json.dumps(REFERENCE_DYSCO))
    d["template_sequences"] = template_sequences(chat_format, architecture, tokenizer, bos_token_id)
    return d


# Reference configurations shipped by the DySCO authors, keyed by what identifies the model.
REFERENCE_MODELS = {
    "qwen3_4b.yaml": {"architecture": "qwen3", "hidden_size": 2560, "num_layers": 36,
                      "num_attention_heads": 32, "num_kv_heads": 8, "intermediate_size": 9728},
    "qwen3_8b.yaml": {"architecture": "qwen3", "hidden_size": 4096, "num_layers": 36,
                      "num_attention_heads": 32, "num_kv_heads": 8, "intermediate_size": 12288},
    "llama3_8b.yaml": {"architecture": "llama", "hidden_size": 4096, "num_layers": 32,
                       "num_attention_heads": 32, "num_kv_heads": 8, "intermediate_size": 14336,
                       "vocab_size": 128256},
}


def reference_dysco(config: dict) -> Optional[dict]:
    """The shipped reference DySCO configuration of this model, if it is one of the three; else None."""
    for name, identity in REFERENCE_MODELS.items():
        if all(config.get(k) == v for k, v in identity.items()):
            return load_reference_config(os.path.join(_HERE, "reference_configs", name))
    return None


def load_reference_config(path: str) -> dict:
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        heads = raw["selected_heads"]
        if isinstance(heads, str):  # the reference writes them as a Python literal in a string
            heads = ast.literal_eval(heads)
        warmup = raw.get("intervention_warmup", "auto")
        return {
            "selected_heads": [[int(l), int(h)] for l, h in heads],
            "top_p": float(raw["top_p"]),
            "top_k": int(raw["top_k"]),
            "strength": float(raw["strength"]),
            "decay_factor": float(raw["decay_factor"]),
            "context_warmup_steps": int(raw["context_warmup_steps"]),
            "intervention_warmup": "auto" if warmup == "auto" else int(warmup),
            "dynamic_rescale": bool(raw.get("dynamic_rescale", True)),
            "template_sequences": [[int(t) for t in seq] for seq in raw.get("template_sequences", [])],
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, SyntaxError) as e:
        raise ExportError(f"{path}: bad DySCO reference configuration ({e})") from None


def architecture_fields(arch: dict) -> dict:
    """The architecture part of config.json, in the documented order."""
    keys = ["architecture", "dtype", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_attention_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings", "tie_word_embeddings", "qk_norm"]
    return {k: arch[k] for k in keys}


def assemble_config(model_name: str, arch: dict, special_tokens: dict, chat: dict, dysco: dict,
                    source: dict) -> dict:
    config = {"format_version": FORMAT_VERSION, "model_name": model_name}
    config.update(architecture_fields(arch))
    config["weights"] = WEIGHTS_FILE
    config["special_tokens"] = special_tokens
    config["chat_format"] = chat["chat_format"]
    config["chat"] = chat["chat"]
    config["dysco"] = dysco
    config["source"] = dict(source, exporter_version=exporter_version())
    return config


def load_module(package_dir: str, map_location: str = "cpu"):
    """model.pt with its parameters bound to the tensors of weights.safetensors, as ModelRunner::Load does
    (for the Python tests and tools): on the CPU the tensors stay backed by the file's copy-on-write mapping
    (the concatenated ones, the fused q/k/v and gate/up, are copies).
    The op library must be loaded first (torch.ops.load_library)."""
    import torch
    from .safetensors_io import read_safetensors
    with open(os.path.join(package_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{package_dir}: package format_version {config.get('format_version')}, this code "
                          f"reads {FORMAT_VERSION}: re-export the package")
    module = torch.jit.load(os.path.join(package_dir, "model.pt"), map_location=map_location)
    tensors = read_safetensors(os.path.join(package_dir, config.get("weights", WEIGHTS_FILE)))
    for path, names in dict(module.weight_names).items():
        *parents, leaf = path.split(".")
        owner = module
        for p in parents:
            owner = getattr(owner, p)
        parts = [tensors[name] for name in names]
        owner._c.setattr(leaf, (parts[0] if len(parts) == 1 else torch.cat(parts)).to(map_location))
    module.eval()
    return module
