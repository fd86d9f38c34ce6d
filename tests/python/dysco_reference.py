"""An independent, eager transcription of DySCO (docs/dysco-reference-algorithm.md, docs/dysco.md) in plain torch,
to check the engine's implementation against. It deliberately shares no code with tools/ or core/.

What is here:
- a tiny safetensors reader (header JSON + raw little-endian F32 / F16 / BF16) and a Hugging Face config
  reader (Llama / Qwen3, RoPE inverse frequencies with the transformers formulas for default, linear, llama3
  and yarn scaling, the YaRN attention factor included);
- `EagerModel`: a decoder-only transformer (RMSNorm, rotate_half RoPE, GQA with K/V repeated per query head,
  SwiGLU, optional per-head q/k RMSNorm, tied embeddings). Its KV cache grows by concatenation; attention is
  materialised (scores, softmax, weights @ V); a forward can stop after layer k; an additive bias over keys can
  be added to the logits of every head of every layer; the attention probabilities of chosen (layer, query
  head) pairs are returned;
- `run_dysco` (greedy DySCO decoding of one sequence, with the step trace of docs/dysco.md) and `run_plain`
  (greedy decoding);
- a command line (see `main`).

Numerics: weights and activations in fp32 by default (the checkpoint's dtype is converted), attention scores
and softmax in fp32, relevance in fp32 (docs/dysco.md), the nucleus cumulative sum in fp64 (Python floats over
the fp32 relevance values).

Usage:
  python tests/python/dysco_reference.py --checkpoint DIR --prompt-ids 1,2,3 --max-new-tokens N \
      --heads 1:0,2:3 [--top-p P|none] [--top-k K|none] [--strength S] [--decay D] [--context-warmup C] \
      [--intervention-warmup W|auto] [--generation-prompt-tokens G] [--static] [--template 1,2;3,4] \
      [--eos 2,3] [--plain] [--trace OUT.jsonl]
It prints {"generated": [...]} on stdout.
"""
import argparse
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# Checkpoint reading


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as fp32 tensors (F32, F16 and BF16 are understood)."""
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    data = memoryview(blob)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        kind = info["dtype"]
        if kind == "F32":
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif kind == "F16":
            values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif kind == "BF16":  # the upper 16 bits of an IEEE fp32
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {kind}")
        out[name] = torch.from_numpy(values.copy()).reshape([int(d) for d in info["shape"]])
    return out


def read_checkpoint(checkpoint_dir: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json, every tensor) of a Hugging Face checkpoint directory; sharded checkpoints included."""
    with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    single = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.exists(single):
        return config, read_safetensors(single)
    with open(os.path.join(checkpoint_dir, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors: Dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(read_safetensors(os.path.join(checkpoint_dir, shard)))
    return config, tensors


# ---------------------------------------------------------------------------------------------------------
# RoPE: transformers' modeling_rope_utils formulas (default, linear, llama3, yarn)


def rope_parameters(config: dict) -> Tuple[torch.Tensor, float]:
    """(inv_freq fp32 [head_dim / 2], attention scaling that multiplies cos and sin)."""
    base = float(config.get("rope_theta", 10000.0))
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    rs = config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if kind == "llama3":
        factor = rs["factor"]
        low_freq_factor = rs["low_freq_factor"]
        high_freq_factor = rs["high_freq_factor"]
        old_context_len = rs["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0
    if kind == "yarn":
        # transformers >= 4.56: the explicit factor wins; max_position / original only when factor is absent.
        original = rs.get("original_max_position_embeddings") or config["max_position_embeddings"]
        factor = rs.get("factor")
        if factor is None:
            factor = config["max_position_embeddings"] / original
        attention_factor = rs.get("attention_factor")
        mscale = rs.get("mscale")
        mscale_all_dim = rs.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            if scale <= 1:
                return 1.0
            return 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        def find_correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low = find_correction_dim(beta_fast)
        high = find_correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
        inv_freq_extrapolation = 1.0 / pos_freqs
        inv_freq_interpolation = 1.0 / (factor * pos_freqs)
        extrapolation_factor = 1 - ramp
        inv = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
        return inv, float(attention_factor)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


# ---------------------------------------------------------------------------------------------------------
# The eager model


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class ForwardResult:
    logits: Optional[torch.Tensor]  # fp32 [vocab] of the last new token; None after a partial forward
    probs: torch.Tensor  # fp32 [H, n] (last query row), or [H, rows, n] with probe_from; H = len(probe_heads)


class EagerModel:
    """One sequence at a time; the KV cache is a list of per-layer (K, V) tensors [Hkv, n, D] (after RoPE)."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype = torch.float32):
        config, w = read_checkpoint(checkpoint_dir)
        self.config = config
        self.dtype = dtype
        self.num_layers = int(config["num_hidden_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.num_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        archs = config.get("architectures") or []
        self.qk_norm = config.get("model_type") == "qwen3" or "Qwen3ForCausalLM" in archs
        self.scale = self.head_dim ** -0.5
        self.inv_freq, self.attention_scaling = rope_parameters(config)
        self.w = {k: v.to(dtype) for k, v in w.items()}
        if config.get("tie_word_embeddings", False) or "lm_head.weight" not in self.w:
            if not config.get("tie_word_embeddings", False):
                raise ValueError(f"{checkpoint_dir}: no lm_head.weight and tie_word_embeddings is false")
            self.lm_head = self.w["model.embed_tokens.weight"]
        else:
            self.lm_head = self.w["lm_head.weight"]
        self.vocab_size = int(self.lm_head.shape[0])
        self.reset()

    def reset(self) -> None:
        empty = torch.zeros(self.num_kv_heads, 0, self.head_dim, dtype=self.dtype)
        self.cache: List[Tuple[torch.Tensor, torch.Tensor]] = [(empty, empty) for _ in range(self.num_layers)]

    @property
    def seq_len(self) -> int:
        return int(self.cache[0][0].shape[1])

    def rollback(self, length: int) -> None:
        self.cache = [(k[:, :length], v[:, :length]) for k, v in self.cache]

    def _cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    @torch.no_grad()
    def forward(self, token_ids: Sequence[int], last_layer: Optional[int] = None,
                bias: Optional[torch.Tensor] = None, probe_heads: Sequence[Tuple[int, int]] = (),
                probe_from: Optional[int] = None, keep_kv: bool = True) -> ForwardResult:
        """Appends `token_ids` to the sequence (n keys afterwards). `bias` is added to the attention logits of
        every head of every layer computed: fp32 [>= n], the same for every new query row, or [q_len, >= n], one
        row per new token. The probes are the softmax rows of the last new token, or with `probe_from` = p of
        every new token at position >= p. `last_layer` = k stops after layer k (then keep_kv must be False: the
        reference appends and rolls back)."""
        w = self.w
        q_len = len(token_ids)
        past = self.seq_len
        n = past + q_len
        partial = last_layer is not None and last_layer < self.num_layers - 1
        if partial and keep_kv:
            raise ValueError("a partial forward cannot keep its K/V (the later layers would lack them)")
        layers = self.num_layers if last_layer is None else last_layer + 1
        positions = torch.arange(past, n)
        cos, sin = self._cos_sin(positions)
        mask = torch.zeros(q_len, n, dtype=torch.float32)
        mask.masked_fill_(torch.arange(n)[None, :] > positions[:, None], float("-inf"))
        if bias is not None:
            bias = bias.to(torch.float32)
            mask = mask + (bias[:n][None, :] if bias.dim() == 1 else bias[:, :n])
        first_row = q_len - 1 if probe_from is None else max(probe_from - past, 0)
        for layer, head in probe_heads:
            if not (0 <= layer < layers and 0 <= head < self.num_heads):
                raise ValueError(f"probe head ({layer}, {head}) is not computed by this forward")
        probes = [torch.zeros(0)] * len(probe_heads)
        groups = self.num_heads // self.num_kv_heads

        x = w["model.embed_tokens.weight"][torch.tensor(list(token_ids), dtype=torch.int64)]
        for i in range(layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], self.eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(q_len, self.num_heads, self.head_dim)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(q_len, self.num_kv_heads, self.head_dim)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(q_len, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], self.eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], self.eps)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, q_len, D]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            keys = torch.cat((self.cache[i][0], k), dim=1)
            values = torch.cat((self.cache[i][1], v), dim=1)
            self.cache[i] = (keys, values)
            keys = keys.repeat_interleave(groups, dim=0)
            values = values.repeat_interleave(groups, dim=0)
            scores = (q.to(torch.float32) @ keys.to(torch.float32).transpose(1, 2)) * self.scale + mask
            probs = torch.softmax(scores, dim=-1)  # [Hq, q_len, n]
            for j, (layer, head) in enumerate(probe_heads):
                if layer == i:
                    probes[j] = probs[head, -1].clone() if probe_from is None else probs[head, first_row:].clone()
            attn = probs.to(self.dtype) @ values  # [Hq, q_len, D]
            x = x + attn.transpose(0, 1).reshape(q_len, self.num_heads * self.head_dim) \
                @ w[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        if not keep_kv:
            self.rollback(past)
        if probe_heads:
            probs_out = torch.stack(probes)
        else:
            probs_out = torch.zeros(0, n) if probe_from is None else torch.zeros(0, q_len - first_row, n)
        if partial:
            return ForwardResult(None, probs_out)
        last = rms_norm(x[-1], w["model.norm.weight"], self.eps)
        return ForwardResult((last @ self.lm_head.T).to(torch.float32), probs_out)


# ---------------------------------------------------------------------------------------------------------
# DySCO pieces, each a function of plain values so that they can be tested one by one


@dataclass
class DyscoParams:
    selected_heads: List[Tuple[int, int]]
    top_p: Optional[float] = 0.975
    top_k: Optional[int] = 4096
    strength: float = 2.0
    decay_factor: float = 0.75
    context_warmup_steps: int = 8
    intervention_warmup: Union[int, str] = "auto"
    dynamic_rescale: bool = True
    template_sequences: List[List[int]] = field(default_factory=list)

    @staticmethod
    def from_config(dysco: dict) -> "DyscoParams":
        """From a model package's config.json "dysco" object (docs/model-interface.md)."""
        warmup = dysco.get("intervention_warmup", "auto")
        return DyscoParams(
            selected_heads=[(int(layer), int(head)) for layer, head in dysco["selected_heads"]],
            top_p=dysco.get("top_p"), top_k=dysco.get("top_k"), strength=float(dysco["strength"]),
            decay_factor=float(dysco["decay_factor"]), context_warmup_steps=int(dysco["context_warmup_steps"]),
            intervention_warmup="auto" if warmup in ("auto", -1) else int(warmup),
            dynamic_rescale=bool(dysco.get("dynamic_rescale", True)),
            template_sequences=[list(map(int, s)) for s in dysco.get("template_sequences", [])])


def resolve_intervention_warmup(value: Union[int, str], generation_prompt_tokens: Optional[int]) -> int:
    """"auto" = the number of tokens of the chat format's generation prompt (2 when there is no chat)."""
    if value == "auto":
        return 2 if generation_prompt_tokens is None else int(generation_prompt_tokens)
    return int(value)


def update_relevance(r_prev: torch.Tensor, probs: torch.Tensor, decay_factor: float) -> torch.Tensor:
    """a = mean over heads of probs [H, n]; a[:-1] += decay * r_prev; r = a / a.sum() (all fp32)."""
    if probs.shape[1] != r_prev.shape[0] + 1:
        raise ValueError(f"relevance length {r_prev.shape[0]} does not match {probs.shape[1]} keys")
    a = probs.to(torch.float32).mean(dim=0)
    a[:-1] += decay_factor * r_prev.to(torch.float32)
    return a / a.sum()


def descending_order(r: Sequence[float]) -> List[int]:
    """Positions by descending relevance, equal values by the lower position first."""
    return sorted(range(len(r)), key=lambda j: (-r[j], j))


def select_top_k(r: Sequence[float], top_k: int) -> List[int]:
    return sorted(descending_order(r)[:min(top_k, len(r))])


def select_top_p(r: Sequence[float], top_p: float) -> List[int]:
    """Nucleus: in descending order, keep entries while the cumulative sum is <= top_p; the entry whose sum
    crosses top_p is not kept; the first entry is always kept."""
    kept: List[int] = []
    cumulative = 0.0
    for rank, j in enumerate(descending_order(r)):
        cumulative += r[j]
        if cumulative <= top_p or rank == 0:
            kept.append(j)
        else:
            break
    return sorted(kept)


def select_positions(r: Sequence[float], top_p: Optional[float], top_k: Optional[int]) -> List[int]:
    """top_p only, top_k only, or hybrid (the nucleus, or the top_k set when the nucleus is larger)."""
    if top_p is None and top_k is None:
        raise ValueError("at least one of top_p / top_k must be set")
    if top_p is None:
        return select_top_k(r, top_k)
    nucleus = select_top_p(r, top_p)
    if top_k is not None and len(nucleus) > top_k:
        return select_top_k(r, top_k)
    return nucleus


def template_positions(prompt_ids: Sequence[int], template_sequences: Iterable[Sequence[int]]) -> set:
    """Every position covered by an occurrence (overlapping ones too) of any template sequence in the prompt."""
    found = set()
    prompt = list(prompt_ids)
    for seq in template_sequences:
        seq = list(seq)
        m = len(seq)
        if m == 0:
            continue
        for start in range(len(prompt) - m + 1):
            if prompt[start:start + m] == seq:
                found.update(range(start, start + m))
    return found


def build_bias(n: int, selected: Iterable[int], templates: set, strength: float) -> torch.Tensor:
    """fp32 [n]: log(strength) on selected non-template positions and on the current position n - 1, 0 elsewhere;
    strength >= 99: 0 on selected positions and the current one, -inf elsewhere (no template exclusion)."""
    if strength >= 99:
        bias = torch.full((n,), float("-inf"), dtype=torch.float32)
        for j in selected:
            bias[j] = 0.0
        bias[n - 1] = 0.0
        return bias
    bias = torch.zeros(n, dtype=torch.float32)
    boost = math.log(strength)
    for j in selected:
        if j not in templates:
            bias[j] = boost
    bias[n - 1] = boost
    return bias


def position_ranges(positions: Iterable[int]) -> List[List[int]]:
    """Sorted positions as half-open [start, end) ranges."""
    ranges: List[List[int]] = []
    for j in sorted(positions):
        if ranges and ranges[-1][1] == j:
            ranges[-1][1] = j + 1
        else:
            ranges.append([j, j + 1])
    return ranges


def top_relevance(r: Sequence[float], count: int = 8) -> List[list]:
    return [[j, r[j]] for j in descending_order(r)[:count]]


def validate(params: DyscoParams, model: EagerModel, prompt_len: int, intervention_warmup: int) -> None:
    if not params.selected_heads:
        raise ValueError("selected_heads must not be empty")
    for layer, head in params.selected_heads:
        if not (0 <= layer < model.num_layers and 0 <= head < model.num_heads):
            raise ValueError(f"selected head ({layer}, {head}) out of range")
    if params.top_p is None and params.top_k is None:
        raise ValueError("at least one of top_p / top_k must be set")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if params.top_k is not None and params.top_k < 1:
        raise ValueError("top_k must be >= 1")
    if not params.strength > 0:
        raise ValueError("strength must be > 0")
    if not 0 <= params.decay_factor < 1:
        raise ValueError("decay_factor must be in [0, 1)")
    if params.context_warmup_steps < 0 or intervention_warmup < 0:
        raise ValueError("warm-up counts must be >= 0")
    total = params.context_warmup_steps + intervention_warmup
    if total < 1 or total >= prompt_len:
        raise ValueError(f"context_warmup_steps + intervention_warmup = {total} must be >= 1 and < the prompt "
                         f"length {prompt_len}")
    if not params.dynamic_rescale and params.context_warmup_steps < 2:
        raise ValueError("the static variant needs context_warmup_steps >= 2")


def _argmax(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))  # the first of equal maxima: the lowest token id


def run_dysco(model: EagerModel, prompt_ids: Sequence[int], params: DyscoParams, max_new_tokens: int,
              eos_ids: Iterable[int] = (), generation_prompt_tokens: Optional[int] = None
              ) -> Tuple[List[int], List[dict]]:
    """Greedy DySCO decoding of one prompt. Returns (generated ids, trace entries of docs/dysco.md).

    `params.intervention_warmup` may be "auto": it then becomes `generation_prompt_tokens` (2 when None).
    Generation stops after an eos id (which is returned, not fed) or after max_new_tokens tokens.
    Trace: every entry has "relevance" (r_t); the step of the last prompt token is an "intervention_warmup"
    step whose next_token is the first generated token. In the static variant the intervention steps report
    the frozen selection and the frozen relevance (the r of the last context warm-up step, shorter than
    num_keys); their nucleus_mass is the frozen r summed over the frozen set."""
    prompt = [int(t) for t in prompt_ids]
    eos = set(int(t) for t in eos_ids)
    P = len(prompt)
    iw = resolve_intervention_warmup(params.intervention_warmup, generation_prompt_tokens)
    validate(params, model, P, iw)
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if max_new_tokens == 0:
        return [], []
    T = params.context_warmup_steps + iw
    heads = [(int(layer), int(head)) for layer, head in params.selected_heads]
    max_layer = max(layer for layer, _ in heads)
    templates = template_positions(prompt, params.template_sequences)

    model.reset()
    model.forward(prompt[:P - T])  # phase 1: ordinary prefill
    state = {"r": torch.zeros(P - T, dtype=torch.float32), "static": None}
    trace: List[dict] = []

    def entry(phase: str, token: int, n: int, selected: List[int], next_token: Optional[int]) -> dict:
        r = state["r"].tolist()
        return {"step": len(trace), "phase": phase, "position": n - 1, "token": token, "num_keys": n,
                "num_selected": len(selected), "nucleus_mass": float(sum(r[j] for j in selected)),
                "selected": position_ranges(selected), "top_relevance": top_relevance(r),
                "next_token": next_token, "relevance": r}

    def intervention_step(token: int) -> Tuple[torch.Tensor, List[int]]:
        n = model.seq_len + 1
        if params.dynamic_rescale:
            spec = model.forward([token], last_layer=max_layer, probe_heads=heads, keep_kv=False)
            state["r"] = update_relevance(state["r"], spec.probs, params.decay_factor)
            selected = select_positions(state["r"].tolist(), params.top_p, params.top_k)
        else:
            if state["static"] is None:  # once, from the relevance after the last context warm-up step
                state["static"] = select_positions(state["r"].tolist(), params.top_p, params.top_k)
            selected = state["static"]
        bias = build_bias(n, selected, templates, params.strength)
        return model.forward([token], bias=bias).logits, selected

    logits = None
    for i in range(P - T, P):  # phase 2: the last T prompt tokens, one at a time
        token = prompt[i]
        n = i + 1
        if i + 1 < P - iw:  # context warm-up: ordinary forward, relevance only
            res = model.forward([token], probe_heads=heads)
            state["r"] = update_relevance(state["r"], res.probs, params.decay_factor)
            trace.append(entry("context_warmup", token, n, [], None))
        else:
            logits, selected = intervention_step(token)
            next_token = _argmax(logits) if i == P - 1 else None
            trace.append(entry("intervention_warmup", token, n, selected, next_token))

    generated: List[int] = []
    token = _argmax(logits)
    while True:  # phase 3: generation
        generated.append(token)
        if token in eos or len(generated) >= max_new_tokens:
            break
        n = model.seq_len + 1
        logits, selected = intervention_step(token)
        next_token = _argmax(logits)
        trace.append(entry("generate", token, n, selected, next_token))
        token = next_token
    return generated, trace


def run_plain(model: EagerModel, prompt_ids: Sequence[int], max_new_tokens: int,
              eos_ids: Iterable[int] = ()) -> List[int]:
    """Ordinary greedy decoding."""
    eos = set(int(t) for t in eos_ids)
    if max_new_tokens <= 0:
        return []
    model.reset()
    token = _argmax(model.forward([int(t) for t in prompt_ids]).logits)
    generated: List[int] = []
    while True:
        generated.append(token)
        if token in eos or len(generated) >= max_new_tokens:
            return generated
        token = _argmax(model.forward([token]).logits)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _ids(text: str) -> List[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _optional(cast):
    def parse(text: str):
        return None if text.lower() == "none" else cast(text)
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--heads", default="", help="selected heads as layer:head,layer:head")
    p.add_argument("--top-p", type=_optional(float), default=0.975, help="float or none")
    p.add_argument("--top-k", type=_optional(int), default=4096, help="int or none")
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--decay", type=float, default=0.75)
    p.add_argument("--context-warmup", type=int, default=8)
    p.add_argument("--intervention-warmup", default="auto", help="int or auto")
    p.add_argument("--generation-prompt-tokens", type=int, default=None,
                   help="what auto resolves to (default 2: no chat template)")
    p.add_argument("--static", action="store_true", help="dynamic_rescale = false")
    p.add_argument("--template", default="", help="template sequences: 1,2;3,4")
    p.add_argument("--eos", default=None, help="eos ids (default: config.json eos_token_id; '' for none)")
    p.add_argument("--plain", action="store_true", help="ordinary greedy decoding, no DySCO")
    p.add_argument("--trace", default="", help="write the DySCO trace here (JSON lines)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = EagerModel(args.checkpoint)
    prompt = _ids(args.prompt_ids)
    if args.eos is None:
        eos_value = model.config.get("eos_token_id")
        eos = [] if eos_value is None else (eos_value if isinstance(eos_value, list) else [eos_value])
    else:
        eos = _ids(args.eos)
    if args.plain:
        print(json.dumps({"generated": run_plain(model, prompt, args.max_new_tokens, eos)}))
        return 0
    heads = [tuple(int(v) for v in h.split(":")) for h in args.heads.split(",") if h.strip()]
    warmup = args.intervention_warmup if args.intervention_warmup == "auto" else int(args.intervention_warmup)
    params = DyscoParams(selected_heads=heads, top_p=args.top_p, top_k=args.top_k, strength=args.strength,
                         decay_factor=args.decay, context_warmup_steps=args.context_warmup,
                         intervention_warmup=warmup, dynamic_rescale=not args.static,
                         template_sequences=[_ids(s) for s in args.template.split(";") if s.strip()])
    try:
        generated, trace = run_dysco(model, prompt, params, args.max_new_tokens, eos,
                                     args.generation_prompt_tokens)
    except ValueError as e:
        print(f"dysco_reference: error: {e}", file=sys.stderr)
        return 2
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as f:
            for e in trace:
                f.write(json.dumps(e) + "\n")
    print(json.dumps({"generated": generated}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
