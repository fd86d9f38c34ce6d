"""The decoder-only transformer that becomes model.pt: Llama / Qwen3 (RMSNorm, RoPE in the Hugging Face
rotate_half convention, GQA, SwiGLU MLP, optional per-head q/k RMSNorm, optional tied embeddings).

Its one method, `forward`, is the contract of docs/model-interface.md: a flat batch of new tokens of several
sequences, a paged KV cache owned by the caller, and the `dysco` ops for the KV writes and the attention.
Weights are parameters in the config dtype; logits and attention probabilities are fp32.

Weights are keyed by Hugging Face checkpoint names ("model.layers.0.self_attn.q_proj.weight", ...), whatever
the source format; `check_weights` checks every name and shape the model needs. They do not go into model.pt
(since package format 2): `build_model` scripts the module over empty placeholder parameters of the package
dtype and records in its `weight_names` attribute which tensors of weights.safetensors each parameter is bound
to at load: one, or (format 4) several concatenated along dim 0, for the fused q/k/v and gate/up weights
(docs/model-interface.md "Binding").
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ExportError
from .rope import compute_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # transformers' RMSNorm: statistics in fp32, the product with the weight in the model dtype. One op for the
    # seven of the ATen expression (`weight * (xf * rsqrt(xf.pow(2).mean(-1) + eps)).to(x.dtype)`): one kernel
    # on CUDA (docs/gpu.md "Element-wise kernels"), one pass on the CPU that sums in ATen's order, so its output
    # equals the expression's bit for bit there (kernels/cpu/norm_rope.cpp).
    rows = x.contiguous().view(-1, x.size(-1))
    out = torch.empty_like(rows)
    torch.ops.dysco.rms_norm(out, rows, weight, eps)
    return out.view(x.size())


def add_rms_norm_linear(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                        weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(residual + x, linear(rms_norm(residual + x), weight)): a layer's residual add, the next norm and the
    projection that reads it as one op. The sum is rounded to the dtype before the norm reads it, as
    `h = h + x; rms_norm(h)` does. On the CPU the op is add_rms_norm then linear, bit for bit; on a GPU a
    decode batch runs one GEMV kernel whose blocks form the sum and the normed row before they stream the
    weight (a kernel and its gap fewer per call, docs/gpu.md "The norm in the GEMV"), equal to the two ops
    within the dtype's rounding."""
    residual = residual.contiguous()
    total = torch.empty_like(residual)
    out = torch.empty([residual.size(0), weight.size(0)], dtype=residual.dtype, device=residual.device)
    torch.ops.dysco.add_rms_norm_linear(out, total, x.contiguous(), residual, norm_weight, eps, weight)
    return total, out


def o_proj_mlp(attn: Tensor, residual: Tensor, o_weight: Tensor, norm_weight: Tensor, eps: float,
               gate_up_weight: Tensor, down_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(h, mlp) with h = residual + linear(attn, o_weight) and mlp = linear(silu(g) * u, down_weight) where
    [g | u] = linear(rms_norm(h), gate_up_weight): an attention block's output projection, residual add, norm
    and MLP as one op, bit for bit linear, add_rms_norm_swiglu and linear, where a device may fuse them (CUDA
    has a persistent kernel for a decode row whose blocks meet at grid barriers between the four stages;
    slower than the four kernels on the H200, so not the default: docs/gpu.md "What a layer's dependencies cost")."""
    residual = residual.contiguous()
    total = torch.empty_like(residual)
    out = torch.empty_like(residual)
    torch.ops.dysco.o_proj_mlp(out, total, attn.contiguous(), residual, o_weight, norm_weight, eps,
                               gate_up_weight, down_weight)
    return total, out


def linear(x: Tensor, weight: Tensor) -> Tensor:
    # F.linear (no bias) through torch.ops.dysco.linear: on the CPU, decode-sized inputs (a few rows) take
    # its GEMV kernel, which reads each weight once; a one-row F.linear is a BLAS GEMM, about twice slower.
    # Every backend needs a kernel for it (docs/model-interface.md "Ops").
    x = x.contiguous()
    out = torch.empty([x.size(0), weight.size(0)], dtype=x.dtype, device=x.device)
    torch.ops.dysco.linear(out, x, weight)
    return out


def _frozen(t: Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.detach().to(dtype).contiguous(), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, w: Dict[str, Tensor], prefix: str, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, qk_norm: bool, dtype: torch.dtype):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.eps = eps
        self.qk_norm = qk_norm
        self.scale = 1.0 / math.sqrt(head_dim)
        self.input_layernorm = _frozen(w[prefix + "input_layernorm.weight"], dtype)
        # q/k/v as one [(H + 2 Hkv) D, hidden] weight and gate/up as one [2 I, hidden]: one GEMV each in
        # a decode step instead of three and two (docs/model-interface.md "Binding": the loader binds each
        # to the concatenation of its Hugging Face tensors, which the package writes adjacent in the file).
        self.qkv_proj = _frozen(torch.cat([w[prefix + "self_attn." + n + ".weight"]
                                           for n in ("q_proj", "k_proj", "v_proj")]), dtype)
        self.o_proj = _frozen(w[prefix + "self_attn.o_proj.weight"], dtype)
        if qk_norm:
            self.q_norm = _frozen(w[prefix + "self_attn.q_norm.weight"], dtype)
            self.k_norm = _frozen(w[prefix + "self_attn.k_norm.weight"], dtype)
        else:  # TorchScript needs the attributes to exist; never read when qk_norm is false
            self.q_norm = _frozen(torch.zeros(0), dtype)
            self.k_norm = _frozen(torch.zeros(0), dtype)
        self.post_attention_layernorm = _frozen(w[prefix + "post_attention_layernorm.weight"], dtype)
        self.gate_up_proj = _frozen(torch.cat([w[prefix + "mlp.gate_proj.weight"],
                                               w[prefix + "mlp.up_proj.weight"]]), dtype)
        self.down_proj = _frozen(w[prefix + "mlp.down_proj.weight"], dtype)

    def forward(self, h: Tensor, pending: Optional[Tensor], cos: Tensor, sin: Tensor, kv_layer: Tensor,
                slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                attn_bias: Optional[Tensor], is_decode: bool, last_idx: Tensor, probe_runs: List[Tuple[int, int]],
                probe_heads: Optional[Tensor], probs: Tensor, probes_only: bool) -> Tuple[Tensor, Tensor]:
        """(h, mlp): the residual stream after the attention block and the MLP's output, which the next layer
        (or the final norm) adds to it in its own add_rms_norm_linear. pending: the previous layer's MLP output, not
        yet added to h (None for layer 0). probes_only: the last layer of a speculative pass, whose outputs
        nobody reads: only its K/V write and its probes' probabilities run (no attention output, o_proj or
        MLP: at 128K keys about 0.2 ms of a DySCO step on an H200, docs/gpu.md), and (h, qkv) come back."""
        num_tokens = h.size(0)
        if pending is None:
            qkv = linear(rms_norm(h, self.input_layernorm, self.eps), self.qkv_proj)
        else:
            h, qkv = add_rms_norm_linear(pending, h, self.input_layernorm, self.eps, self.qkv_proj)
        # q/k norms (Qwen3), rope and the K/V write as one op over qkv's column blocks: a decode layer's
        # five GPU kernels (and about fifteen interpreter instructions) in one; equal to rms_norm,
        # rotary_embedding and paged_kv_write in sequence (docs/model-interface.md "Ops"). A decode layer
        # that runs its attention takes it and the attention as one op, which the GPU's decode kernel
        # runs as one kernel (docs/gpu.md "The q/k norms, rope and KV write in the decode attention").
        q = torch.empty([num_tokens, self.num_heads, self.head_dim], dtype=qkv.dtype, device=qkv.device)
        q_norm: Optional[Tensor] = self.q_norm if self.qk_norm else None
        k_norm: Optional[Tensor] = self.k_norm if self.qk_norm else None
        out = torch.empty_like(q)
        # A decode layer with one run of probes takes their probabilities from the attention op itself,
        # which on the GPU computes them in the same pass over K (docs/gpu.md "The selected heads'
        # probabilities in the same pass"); otherwise attention_probs below.
        probes_done = False
        if is_decode and not probes_only:
            layer_probs: Optional[Tensor] = None
            run_heads: Optional[Tensor] = None
            if probe_heads is not None and len(probe_runs) == 1:
                start, end = probe_runs[0]
                layer_probs = torch.empty([probs.size(0), end - start, probs.size(2)], dtype=torch.float32,
                                          device=probs.device)
                run_heads = probe_heads[start:end]
            torch.ops.dysco.qk_norm_rope_attention_decode(out, q, kv_layer, qkv, cos, sin, slot_mapping, q_norm, k_norm,
                                                          self.eps, block_tables, seq_lens, self.scale, attn_bias,
                                                          layer_probs, run_heads)
            if layer_probs is not None:
                start, end = probe_runs[0]
                probs[:, start:end].copy_(layer_probs)
                probes_done = True
        else:
            torch.ops.dysco.qk_norm_rope_kv_write(q, kv_layer, qkv, cos, sin, slot_mapping, q_norm, k_norm,
                                                  self.eps)
            if not probes_only:
                torch.ops.dysco.paged_attention_prefill(out, q, kv_layer, block_tables, seq_lens, query_start_loc,
                                                        self.scale, attn_bias)
        if probe_heads is not None and len(probe_runs) > 0 and not probes_done:
            q_last = q if is_decode else q.index_select(0, last_idx).contiguous()
            # probe_runs: this layer's runs [start, end) of consecutive rows of probe_heads / probs. Slices of
            # the one heads tensor and a device copy into probs: no index tensor is built on the host.
            for run in probe_runs:
                start, end = run
                layer_probs = torch.empty([probs.size(0), end - start, probs.size(2)], dtype=torch.float32,
                                          device=probs.device)
                torch.ops.dysco.attention_probs(layer_probs, q_last, kv_layer, block_tables, seq_lens,
                                                probe_heads[start:end], self.scale, attn_bias)
                probs[:, start:end].copy_(layer_probs)
        if probes_only:
            return h, qkv

        return o_proj_mlp(out.view(num_tokens, self.num_heads * self.head_dim), h, self.o_proj,
                          self.post_attention_layernorm, self.eps, self.gate_up_proj, self.down_proj)


class DecoderModel(nn.Module):
    def __init__(self, config: dict, weights: Dict[str, Tensor]):
        super().__init__()
        dtype = DTYPES[config["dtype"]]
        self.num_layers = int(config["num_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.vocab_size = int(config["vocab_size"])
        self.eps = float(config["rms_norm_eps"])
        freq_factors = weights.get("rope_freq_factors")
        inv_freq, attention_scaling = compute_inv_freq(
            int(config["head_dim"]), float(config["rope_theta"]),
            None if freq_factors is not None else config.get("rope_scaling"),
            int(config["max_position_embeddings"]), config.get("model_name", "config"))
        if freq_factors is not None:  # llama.cpp's per-frequency divisors (its form of llama3 scaling)
            inv_freq = inv_freq / freq_factors.to(torch.float32).reshape(inv_freq.shape)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32).contiguous())
        self.attention_scaling = float(attention_scaling)
        self.embed_tokens = _frozen(weights["model.embed_tokens.weight"], dtype)
        self.layers = nn.ModuleList([
            DecoderLayer(weights, f"model.layers.{i}.", self.num_heads, int(config["num_kv_heads"]),
                         int(config["head_dim"]), self.eps, bool(config["qk_norm"]), dtype)
            for i in range(self.num_layers)])
        self.norm = _frozen(weights["model.norm.weight"], dtype)
        if config["tie_word_embeddings"]:
            self.lm_head = self.embed_tokens  # one tensor, saved once
        else:
            self.lm_head = _frozen(weights["lm_head.weight"], dtype)

    def forward(self, token_ids: Tensor, positions: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                slot_mapping: Tensor, block_tables: Tensor, kv_cache: Tensor, attn_bias: Optional[Tensor],
                last_layer: int, probe_layers: List[int], probe_heads: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        # No host synchronisation (docs/model-interface.md "forward"): every size comes from a shape or a host
        # argument, never from a tensor's values, so that a decode step can be captured in a CUDA graph.
        num_tokens = token_ids.size(0)
        batch = seq_lens.size(0)
        device = token_ids.device
        # S' = the block tables' capacity (pages x page size) >= max(seq_lens): known without reading seq_lens.
        probs_len = block_tables.size(1) * kv_cache.size(3)
        num_probes = probe_heads.size(0) if probe_heads is not None else 0
        probs = torch.zeros([batch, num_probes, probs_len], dtype=torch.float32, device=device)
        # Every sequence brings at least one new token, so T == B means one token each: the decode kernel.
        is_decode = num_tokens == batch
        # Each sequence's last row; read only by a step that is not all decode rows (in decode every row is its
        # sequence's last), so a decode step skips its kernel.
        last_idx = query_start_loc if is_decode else query_start_loc[1:] - 1

        # The rotary tables as one op (one kernel on a GPU, ~9 ATen kernels as the expression; the same bits).
        cos = torch.empty([num_tokens, 2 * self.inv_freq.size(0)], dtype=self.embed_tokens.dtype, device=device)
        sin = torch.empty_like(cos)
        torch.ops.dysco.rope_tables(cos, sin, positions, self.inv_freq, self.attention_scaling)

        h = F.embedding(token_ids, self.embed_tokens)
        pending: Optional[Tensor] = None  # the last layer's MLP output, added by the next norm
        for i, layer in enumerate(self.layers):
            if last_layer < 0 or i <= last_layer:
                # Layer i's probes: runs of consecutive entries of probe_layers equal to i (one run per layer
                # when the caller groups the probes by layer), found on the host list.
                probe_runs: List[Tuple[int, int]] = []
                j = 0
                while j < len(probe_layers):
                    if probe_layers[j] == i:
                        end = j + 1
                        while end < len(probe_layers) and probe_layers[end] == i:
                            end += 1
                        probe_runs.append((j, end))
                        j = end
                    else:
                        j += 1
                # The last layer of a speculative pass (logits not returned): its probes only.
                probes_only = last_layer >= 0 and i == last_layer and last_layer < self.num_layers - 1
                h, pending = layer(h, pending, cos, sin, kv_cache[i], slot_mapping, block_tables, seq_lens,
                                   query_start_loc, attn_bias, is_decode, last_idx, probe_runs, probe_heads, probs,
                                   probes_only)

        if last_layer >= 0 and last_layer < self.num_layers - 1:
            return torch.zeros([0, self.vocab_size], dtype=torch.float32, device=device), probs
        assert pending is not None
        if not is_decode:  # decode: every row is its sequence's last
            h = h.index_select(0, last_idx)
            pending = pending.index_select(0, last_idx)
        logits = add_rms_norm_linear(pending, h, self.norm, self.eps, self.lm_head)[1]
        return logits.to(torch.float32), probs


def required_weights(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor the model needs, in the order the package writes them: q/k/v and gate/up
    follow each other, so that on the CPU the loader binds the fused weights over the file's bytes without a
    copy (docs/model-interface.md "Binding")."""
    hidden, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nh, nkv = config["num_attention_heads"], config["num_kv_heads"]
    shapes: Dict[str, Tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (nh * hd, hidden),
            p + "self_attn.k_proj.weight": (nkv * hd, hidden),
            p + "self_attn.v_proj.weight": (nkv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, nh * hd),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        if config["qk_norm"]:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes


def check_weights(config: dict, weights: Dict[str, Tensor], source: str) -> None:
    if config["num_attention_heads"] % config["num_kv_heads"] != 0:
        raise ExportError(f"{source}: num_attention_heads {config['num_attention_heads']} is not a multiple "
                          f"of num_kv_heads {config['num_kv_heads']}")
    for name, shape in required_weights(config).items():
        if name not in weights:
            raise ExportError(f"{source}: missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise ExportError(f"{source}: tensor {name} has shape {list(weights[name].shape)}, "
                              f"expected {list(shape)}")


def load_kernels(path: str) -> None:
    """Registers torch.ops.dysco.*; scripting resolves the op schemas at compile time."""
    import os
    if not os.path.exists(path):
        raise ExportError(f"{path}: kernels library not found (build the dysco_kernels target)")
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{path}: cannot load the kernels library ({str(e).splitlines()[0]})") from None


# DecoderLayer parameter -> the ends of its Hugging Face tensor names (after "model.layers.<i>."), concatenated
# along dim 0 in this order when there are several.
LAYER_PARAMETERS = {
    "input_layernorm": ["input_layernorm.weight"],
    "qkv_proj": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "o_proj": ["self_attn.o_proj.weight"],
    "q_norm": ["self_attn.q_norm.weight"],
    "k_norm": ["self_attn.k_norm.weight"],
    "post_attention_layernorm": ["post_attention_layernorm.weight"],
    "gate_up_proj": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "down_proj": ["mlp.down_proj.weight"],
}


def weight_names(config: dict) -> Dict[str, List[str]]:
    """Module parameter path -> the tensor names in weights.safetensors it is bound to at load (one, or several
    concatenated along dim 0), for every parameter the loader binds (all but q_norm / k_norm without qk_norm,
    which stay empty and are never read). Tied embeddings: embed_tokens and lm_head name the same tensor."""
    names = {"embed_tokens": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"],
             "lm_head": ["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]}
    for i in range(config["num_layers"]):
        for attr, suffixes in LAYER_PARAMETERS.items():
            if attr in ("q_norm", "k_norm") and not config["qk_norm"]:
                continue
            names[f"layers.{i}.{attr}"] = [f"model.layers.{i}.{suffix}" for suffix in suffixes]
    return names


def build_model(config: dict, source: str, rope_freq_factors: Optional[Tensor] = None) -> torch.jit.ScriptModule:
    """The scripted module with empty placeholder parameters of the config dtype (so model.pt holds code and
    no weights) and `weight_names`. rope_freq_factors (GGUF's llama3 scaling) is folded into inv_freq."""
    if config["num_attention_heads"] % config["num_kv_heads"] != 0:
        raise ExportError(f"{source}: num_attention_heads {config['num_attention_heads']} is not a multiple "
                          f"of num_kv_heads {config['num_kv_heads']}")
    dtype = DTYPES[config["dtype"]]
    placeholders: Dict[str, Tensor] = {name: torch.empty(0, dtype=dtype) for name in required_weights(config)}
    if rope_freq_factors is not None:
        placeholders["rope_freq_factors"] = rope_freq_factors
    with torch.no_grad():
        model = DecoderModel(config, placeholders).eval()
        model.weight_names = weight_names(config)
        return torch.jit.script(model)
