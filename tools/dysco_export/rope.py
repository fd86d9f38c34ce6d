"""RoPE inverse frequencies, computed once at export time and baked into the model as a buffer.

The formulas follow Hugging Face transformers (modeling_rope_utils) so that an exported checkpoint
positions its tokens exactly as transformers does: "default", "linear", "llama3" (Llama-3.1) and "yarn"
(Qwen3 long context, with its attention factor that scales cos and sin).
"""
import math
from typing import Optional, Tuple

import torch

from .errors import ExportError


def rope_type_of(rope_scaling: Optional[dict]) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def compute_inv_freq(head_dim: int, theta: float, rope_scaling: Optional[dict],
                     max_position_embeddings: int, source: str) -> Tuple[torch.Tensor, float]:
    """Returns (inv_freq fp32 [head_dim / 2], attention_scaling applied to cos and sin)."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    kind = rope_type_of(rope_scaling)
    if kind == "default":
        return base, 1.0
    try:
        if kind == "linear":
            return base / float(rope_scaling["factor"]), 1.0
        if kind == "llama3":
            return _llama3(base, rope_scaling), 1.0
        if kind == "yarn":
            return _yarn(head_dim, theta, rope_scaling, max_position_embeddings)
    except KeyError as missing:
        raise ExportError(f"{source}: rope_scaling of type {kind!r} lacks {missing}") from None
    raise ExportError(f"{source}: unsupported rope_scaling type {kind!r} (supported: linear, llama3, yarn)")


def _llama3(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    factor = float(rs["factor"])
    low_freq_factor = float(rs["low_freq_factor"])
    high_freq_factor = float(rs["high_freq_factor"])
    old_context_len = float(rs["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(dim: int, base: float, rs: dict, max_position_embeddings: int) -> Tuple[torch.Tensor, float]:
    original = rs.get("original_max_position_embeddings")
    if rs.get("factor") is not None:
        factor = float(rs["factor"])
    elif original:
        factor = max_position_embeddings / float(original)
    else:
        raise KeyError("factor")
    original = int(original or max_position_embeddings)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)
