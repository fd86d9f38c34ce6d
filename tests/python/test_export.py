"""Tests of tools/dysco_export: the TorchScript model run through the paged `dysco` ops must agree with a
plain eager transformer written here (dense causal attention, no paging, no ops), fed the same weights read
from the tiny Hugging Face checkpoints; plus the GGUF path (q/k permutation, dequantization) and the
exporter's error reporting.

Needs the op library: build/lib/libdysco_kernels.so (override with env DYSCO_KERNELS).
"""
import contextlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
KERNELS = os.environ.get("DYSCO_KERNELS", os.path.join(REPO, "build", "lib", "libdysco_kernels.so"))
DEFAULT_PACKAGE = os.path.join(REPO, "models", "smollm2-135m-instruct")
SMOLLM2_TOKENIZER = os.path.join(REPO, "tests", "data", "smollm2", "tokenizer.json")
QWEN3_TOKENIZER = os.path.join(REPO, "tests", "data", "qwen3", "tokenizer.json")

from tools.dysco_export.__main__ import main as export_main  # noqa: E402
from tools.dysco_export.package import load_module  # noqa: E402

# qwen3 only with YaRN: its 150k-token vocabulary makes each export slow, and q/k norm is covered either way.
VARIANTS = [("llama", "none"), ("llama", "llama3"), ("qwen3", "yarn")]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session", autouse=True)
def kernels():
    if not os.path.exists(KERNELS):
        pytest.fail(f"{KERNELS} not found: build the dysco_kernels target (or set DYSCO_KERNELS)")
    torch.ops.load_library(KERNELS)
    return KERNELS


def run_export(*args):
    """Runs the exporter's main in-process; returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = export_main([str(a) for a in args])
    return rc, err.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The plain reference: safetensors read by hand, RoPE tables from the HF formulas, dense attention.

def read_safetensors_plain(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        b, e = info["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(blob[8 + n + b:8 + n + e], dtype="<f4").copy()) \
            .reshape(info["shape"])
    return out


def reference_rope(hf):
    dim, base = hf["head_dim"], hf["rope_theta"]
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rs = hf.get("rope_scaling") or {}
    kind = rs.get("rope_type", "default")
    if kind == "llama3":
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
            rs["original_max_position_embeddings"]
        out = []
        for f in inv.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        return torch.tensor(out, dtype=torch.float64), 1.0
    if kind == "yarn":
        factor, old = rs["factor"], rs["original_max_position_embeddings"]

        def corr(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
        out = []
        for i, f in enumerate(inv.tolist()):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
            out.append(f * (1 - ramp) + (f / factor) * ramp)
        return torch.tensor(out, dtype=torch.float64), 0.1 * math.log(factor) + 1.0
    return inv, 1.0


class Reference:
    """Eager fp32 transformer over a whole sequence; row i of bias_rows is added to query row i's logits."""

    def __init__(self, hf_dir):
        with open(os.path.join(hf_dir, "config.json")) as f:
            self.hf = json.load(f)
        self.w = read_safetensors_plain(os.path.join(hf_dir, "model.safetensors"))
        self.inv_freq, self.mscale = reference_rope(self.hf)

    def norm(self, x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.hf["rms_norm_eps"]))

    def rope(self, x, n):  # x [H, n, D]
        ang = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], -1)
        cos, sin = (ang.cos() * self.mscale).float(), (ang.sin() * self.mscale).float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def forward(self, tokens, bias_rows=None):
        """Returns (logits [n, V], probs [L, Hq, n, n])."""
        hf, w = self.hf, self.w
        n, hq, hkv, d = len(tokens), hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
        x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
        mask = torch.full((n, n), float("-inf")).triu(1)
        if bias_rows is not None:
            mask = mask + bias_rows[:, :n]
        all_probs = []
        for i in range(hf["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.norm(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, hq, d).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, hkv, d).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, hkv, d).transpose(0, 1)
            if hf["model_type"] == "qwen3":
                q = self.norm(q, w[p + "self_attn.q_norm.weight"])
                k = self.norm(k, w[p + "self_attn.k_norm.weight"])
            q, k = self.rope(q, n), self.rope(k, n)
            k = k.repeat_interleave(hq // hkv, 0)
            v = v.repeat_interleave(hq // hkv, 0)
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + mask, -1)
            all_probs.append(probs)
            attn = (probs @ v).transpose(0, 1).reshape(n, hq * d)
            x = x + attn @ w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * (h @ w[p + "mlp.up_proj.weight"].T)) \
                @ w[p + "mlp.down_proj.weight"].T
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return self.norm(x, w["model.norm.weight"]) @ head.T, torch.stack(all_probs)


# ---------------------------------------------------------------------------------------------------------
# Paged driver: shuffled page ids, NaN-poisoned cache, block tables padded with valid-but-foreign pages.

class PagedCache:
    def __init__(self, config, num_pages=48, page_size=4, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.page_size = page_size
        self.free = torch.randperm(num_pages, generator=self.gen).tolist()
        self.pages = {}
        self.lens = {}
        self.kv = torch.full((config["num_layers"], 2, num_pages, page_size, config["num_kv_heads"],
                              config["head_dim"]), float("nan"))

    def step_inputs(self, new_tokens):
        """new_tokens: list of (seq_id, [tokens]) -> forward's positional inputs up to kv_cache."""
        token_ids, positions, starts, seq_lens, slots = [], [], [0], [], []
        for sid, toks in new_tokens:
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            pages = self.pages.setdefault(sid, [])
            while len(pages) * self.page_size < end:
                pages.append(self.free.pop())
            for pos in range(start, end):
                slots.append(pages[pos // self.page_size] * self.page_size + pos % self.page_size)
            token_ids += toks
            positions += list(range(start, end))
            starts.append(starts[-1] + len(toks))
            seq_lens.append(end)
            self.lens[sid] = end
        width = max(len(self.pages[sid]) for sid, _ in new_tokens) + 2
        tables = torch.full((len(new_tokens), width), self.free[0] if self.free else 0, dtype=torch.int32)
        for b, (sid, _) in enumerate(new_tokens):
            tables[b, :len(self.pages[sid])] = torch.tensor(self.pages[sid], dtype=torch.int32)
        lng = dict(dtype=torch.int64)
        self.last_slots = torch.tensor(slots, **lng)
        return (torch.tensor(token_ids, **lng), torch.tensor(positions, **lng), torch.tensor(starts, **lng),
                torch.tensor(seq_lens, **lng), torch.tensor(slots, **lng), tables, self.kv)

    def rollback(self, sid, n):
        self.lens[sid] -= n


def run(model, cache, new_tokens, attn_bias=None, last_layer=-1, probe_heads=None):
    """probe_heads: int64 [H, 2] (layer, query head) pairs, in any order; passed as forward's host list of layers
    and device tensor of heads."""
    layers = [] if probe_heads is None else probe_heads[:, 0].tolist()
    heads = None if probe_heads is None else probe_heads[:, 1].contiguous()
    with torch.no_grad():
        return model(*cache.step_inputs(new_tokens), attn_bias, last_layer, layers, heads)


# ---------------------------------------------------------------------------------------------------------
# Tiny packages (one per family / RoPE variant), exported through the CLI's tiny -> hf path.

@pytest.fixture(scope="session")
def tiny(tmp_path_factory, kernels):
    made = {}

    def get(family, rope):
        if (family, rope) not in made:
            root = tmp_path_factory.mktemp(f"tiny-{family}-{rope}")
            args = ["tiny", "--family", family, "--seed", 7, "--rope-scaling", rope, "--out", root / "pkg",
                    "--hf-out", root / "hf", "--kernels", kernels]
            if family == "qwen3" and not os.path.exists(QWEN3_TOKENIZER):
                args += ["--tokenizer", SMOLLM2_TOKENIZER]  # until tests/data/qwen3 exists
            rc, err = run_export(*args)
            assert rc == 0, err
            with open(root / "pkg" / "config.json") as f:
                config = json.load(f)
            made[(family, rope)] = (load_module(str(root / "pkg")), config,
                                    Reference(str(root / "hf")), root)
        return made[(family, rope)]
    return get


def random_tokens(gen, n, vocab):
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@pytest.mark.parametrize("family,rope", VARIANTS)
def test_config_matches_checkpoint(tiny, family, rope):
    _, config, ref, _ = tiny(family, rope)
    hf = ref.hf
    assert config["architecture"] == family
    assert config["model_name"] == f"tiny-{family}" + ("" if rope == "none" else f"-{rope}")
    assert config["qk_norm"] == (family == "qwen3")
    assert config["num_layers"] == hf["num_hidden_layers"] and config["num_kv_heads"] == 2
    assert config["tie_word_embeddings"] == (family == "llama")
    assert (config["rope_scaling"] or {}).get("type", "none") == rope
    assert config["chat_format"] == "chatml"
    if family == "qwen3":
        assert config["chat"]["generation_prompt"] == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert config["chat"]["default_system"] is None and config["special_tokens"]["bos_token_id"] is None
        if os.path.exists(QWEN3_TOKENIZER):  # the same ids as the DySCO reference config of Qwen3
            assert config["dysco"]["template_sequences"] == [[151644, 8948, 198], [151644, 872, 198],
                                                             [151644, 77091, 198], [151667, 271, 151668, 271]]
            assert config["special_tokens"]["eos_token_ids"] == [151645]
            assert config["special_tokens"]["pad_token_id"] == 151643
    else:
        assert config["chat"]["default_system"].startswith("You are a helpful AI assistant named SmolLM")
        assert config["dysco"]["template_sequences"][:3] == [[1, 9690, 198], [1, 4093, 198], [1, 520, 9531, 198]]


@pytest.mark.parametrize("family,rope", VARIANTS)
def test_one_shot_prefill(tiny, family, rope):
    model, config, ref, _ = tiny(family, rope)
    gen = torch.Generator().manual_seed(1)
    seqs = [random_tokens(gen, n, config["vocab_size"]) for n in (5, 17, 33)]
    cache = PagedCache(config)
    logits, probs = run(model, cache, list(enumerate(seqs)))
    assert logits.dtype == torch.float32 and logits.shape == (3, config["vocab_size"])
    assert probs.shape == (3, 0, (-(-33 // cache.page_size) + 2) * cache.page_size)  # the tables' capacity
    for b, toks in enumerate(seqs):
        torch.testing.assert_close(logits[b], ref.forward(toks)[0][-1], **TOL)


@pytest.mark.parametrize("family,rope", VARIANTS)
def test_chunked_prefill_mixed_with_decode(tiny, family, rope):
    model, config, ref, _ = tiny(family, rope)
    gen = torch.Generator().manual_seed(2)
    a = random_tokens(gen, 46, config["vocab_size"])
    b = random_tokens(gen, 22, config["vocab_size"])
    c = random_tokens(gen, 9, config["vocab_size"])
    ref_a, ref_b, ref_c = (ref.forward(s)[0] for s in (a, b, c))
    cache = PagedCache(config, seed=3)
    run(model, cache, [(1, b[:12])])
    # a prefills in chunks while b decodes (and c joins with a one-shot prompt) in the same calls
    steps = [[(0, a[0:7]), (1, b[12:13])],
             [(1, b[13:14]), (0, a[7:9])],  # T = 3 tokens for B = 2: not a pure decode step
             [(0, a[9:20]), (2, c), (1, b[14:15])],
             [(0, a[20:40]), (1, b[15:16])]]
    for step in steps:
        logits, _ = run(model, cache, step)
        for row, (sid, _) in enumerate(step):
            ref_rows = (ref_a, ref_b, ref_c)[sid]
            torch.testing.assert_close(logits[row], ref_rows[cache.lens[sid] - 1], **TOL)
    for i in range(5):  # pure decode: every sequence brings one token
        step = [(0, a[40 + i:41 + i]), (1, b[16 + i:17 + i])]
        logits, _ = run(model, cache, step)
        torch.testing.assert_close(logits[0], ref_a[40 + i], **TOL)
        torch.testing.assert_close(logits[1], ref_b[16 + i], **TOL)


def random_bias(gen, s, keep):
    """Bias row with N(0, 2) entries and some -inf; positions in `keep` stay finite."""
    bias = torch.randn(s, generator=gen) * 2
    bias[torch.rand(s, generator=gen) < 0.25] = float("-inf")
    for k in keep:
        bias[k] = float(torch.randn(1, generator=gen))
    return bias


@pytest.mark.parametrize("family,rope", VARIANTS)
def test_attn_bias_and_probe_heads(tiny, family, rope):
    model, config, ref, _ = tiny(family, rope)
    gen = torch.Generator().manual_seed(4)
    lens = (23, 11)
    seqs = [random_tokens(gen, n + 2, config["vocab_size"]) for n in lens]
    s_width = 40  # S > max(seq_lens) is allowed
    probe = torch.tensor([[0, 1], [3, 2], [1, 0], [3, 3], [2, 2]], dtype=torch.int64)
    cache = PagedCache(config, seed=5)
    ref_rows = [torch.zeros(n + 2, s_width) for n in lens]

    def check(logits, probs, n_now, rows_in_call):
        for b, toks in enumerate(seqs):
            n = n_now[b]
            want_logits, want_probs = ref.forward(toks[:n], ref_rows[b][:n])
            if rows_in_call[b]:
                torch.testing.assert_close(logits[b], want_logits[n - 1], **TOL)
            for j, (layer, head) in enumerate(probe.tolist()):
                torch.testing.assert_close(probs[b, j, :n], want_probs[layer, head, n - 1], **TOL)
                assert torch.all(probs[b, j, n:] == 0)

    # prefill with a bias (every new row of b gets the same bias row), both sequences in one call
    bias = torch.stack([random_bias(gen, s_width, keep=[0]) for _ in lens])
    for b, n in enumerate(lens):
        ref_rows[b][:n] = bias[b]
    logits, probs = run(model, cache, [(0, seqs[0][:lens[0]]), (1, seqs[1][:lens[1]])], bias, -1, probe)
    # S' = the block tables' capacity: width (longest page list + 2 spare) x page size, zero past each length
    assert probs.shape == (2, probe.shape[0], (max(-(-n // cache.page_size) for n in lens) + 2) * cache.page_size)
    check(logits, probs, lens, [True, True])

    # two decode steps with fresh biases (-inf included, never on the current token)
    for step in range(2):
        n_now = [n + step + 1 for n in lens]
        bias = torch.stack([random_bias(gen, s_width, keep=[0, n - 1]) for n in n_now])
        for b, n in enumerate(n_now):
            ref_rows[b][n - 1] = bias[b]
        logits, probs = run(model, cache, [(b, seqs[b][n - 1:n]) for b, n in enumerate(n_now)], bias, -1,
                            probe)
        check(logits, probs, n_now, [True, True])


@pytest.mark.parametrize("family,rope", VARIANTS)
def test_last_layer_speculative_pass(tiny, family, rope):
    model, config, ref, _ = tiny(family, rope)
    gen = torch.Generator().manual_seed(6)
    toks = [random_tokens(gen, 19, config["vocab_size"]), random_tokens(gen, 8, config["vocab_size"])]
    probe = torch.tensor([[0, 0], [1, 3], [2, 1], [3, 0]], dtype=torch.int64)
    ref_out = [ref.forward(t) for t in toks]
    num_layers = config["num_layers"]
    for k in range(num_layers):
        cache = PagedCache(config, seed=k)
        run(model, cache, [(0, toks[0][:-1]), (1, toks[1][:-1])])
        step = [(0, toks[0][-1:]), (1, toks[1][-1:])]
        logits, probs = run(model, cache, step, None, k, probe)
        # the pass stops after layer k: deeper layers have not written the token's K/V (still poisoned)
        slots = cache.last_slots
        for layer in range(num_layers):
            written = cache.kv[layer].flatten(1, 2)[:, slots]
            assert bool(torch.isfinite(written).all()) if layer <= k else bool(torch.isnan(written).all())
        if k < num_layers - 1:
            assert logits.shape == (0, config["vocab_size"])
        else:
            torch.testing.assert_close(logits[0], ref_out[0][0][-1], **TOL)
        for b in range(2):
            n = len(toks[b])
            for j, (layer, head) in enumerate(probe.tolist()):
                if layer <= k:
                    torch.testing.assert_close(probs[b, j, :n], ref_out[b][1][layer, head, n - 1], **TOL)
        # the real pass of the same token rewrites the same slots and gives the full model's logits
        cache.rollback(0, 1)
        cache.rollback(1, 1)
        logits, _ = run(model, cache, step)
        torch.testing.assert_close(logits[0], ref_out[0][0][-1], **TOL)
        torch.testing.assert_close(logits[1], ref_out[1][0][-1], **TOL)


def test_bfloat16_export_runs(tiny, tmp_path, kernels):
    _, _, ref, root = tiny("llama", "none")
    rc, err = run_export("hf", "--checkpoint", root / "hf", "--out", tmp_path / "bf16", "--kernels", kernels,
                         "--dtype", "bfloat16")
    assert rc == 0, err
    model = load_module(str(tmp_path / "bf16"))
    with open(tmp_path / "bf16" / "config.json") as f:
        config = json.load(f)
    assert config["dtype"] == "bfloat16"
    cache = PagedCache(config)
    cache.kv = cache.kv.to(torch.bfloat16)
    toks = list(range(100, 120))
    logits, _ = run(model, cache, [(0, toks)])
    assert logits.dtype == torch.float32
    want = ref.forward(toks)[0][-1]
    assert torch.nn.functional.cosine_similarity(logits[0], want, dim=0) > 0.99


def test_safetensors_round_trip(tmp_path):
    from tools.dysco_export.safetensors_io import read_safetensors, write_safetensors
    gen = torch.Generator().manual_seed(9)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).to(torch.float16),
               "c": torch.randn(2, 2, 4, generator=gen).to(torch.bfloat16), "d": torch.tensor(1.5)}
    write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "pt"})
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_reference_dysco_configs_and_chat_formats():
    from tools.dysco_export import package
    qwen3_8b = {"architecture": "qwen3", "hidden_size": 4096, "num_layers": 36, "num_attention_heads": 32,
                "num_kv_heads": 8, "intermediate_size": 12288, "vocab_size": 151936}
    d = package.reference_dysco(qwen3_8b)
    assert len(d["selected_heads"]) == 16 and d["selected_heads"][0] == [21, 31]
    assert d["template_sequences"][-1] == [151667, 271, 151668, 271] and d["intervention_warmup"] == "auto"
    llama = package.reference_dysco({"architecture": "llama", "hidden_size": 4096, "num_layers": 32,
                                     "num_attention_heads": 32, "num_kv_heads": 8, "intermediate_size": 14336,
                                     "vocab_size": 128256})
    assert llama["selected_heads"][0] == [17, 24] and llama["template_sequences"][0] == [128000]
    assert package.reference_dysco(dict(qwen3_8b, hidden_size=2560, intermediate_size=9728))["selected_heads"][0] \
        == [20, 15]
    assert package.reference_dysco(dict(qwen3_8b, num_layers=28)) is None
    llama3 = package.chat_settings("{{'<|start_header_id|>' + role + '<|end_header_id|>\n\n'}}", "llama")
    assert llama3["chat_format"] == "llama3"
    assert llama3["chat"]["generation_prompt"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert package.chat_settings("", "llama")["chat_format"] == "none"


# ---------------------------------------------------------------------------------------------------------
# GGUF: a tiny GGUF written here the way llama.cpp's converter writes one (q/k rows permuted, quantized).

def llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, ref, arch="llama", drop=(), override_type=None, vocab_size=1024):
    """Writes ref's weights as a llama-arch GGUF with the first vocab_size tokens of the SmolLM2 tokenizer
    (small: GGUF string arrays are slow to write and read); returns the weights as the GGUF stores them
    (dequantized, unpermuted), for a reference model."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    hf, w = ref.hf, ref.w
    with open(SMOLLM2_TOKENIZER) as f:
        tok = json.load(f)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_rope_freq_base(hf["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])[:vocab_size]
    kept = {t for t, _ in vocab}
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, list) else m.split(" ") for m in tok["model"]["merges"]]
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in specials else 1 for _, i in vocab])
    writer.add_token_merges([" ".join(m) for m in merges if m[0] + m[1] in kept])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{{'<|im_start|>' + message['content'] + '<|im_end|>'}}")
    stored = {}
    types = [Q.Q8_0, Q.Q4_1, Q.F16, Q.F32]
    items = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")]
    for i in range(hf["num_hidden_layers"]):
        items += [(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight") for h, g in GGUF_NAMES.items()]
    for n, (gname, hname) in enumerate(items):
        if gname in drop:
            continue
        x = w[hname].numpy()
        if gname == "token_embd.weight":
            x = x[:vocab_size]
        if "attn_q" in gname:
            x = llama_cpp_permute(x, hf["num_attention_heads"])
        elif "attn_k" in gname:
            x = llama_cpp_permute(x, hf["num_key_value_heads"])
        qtype = Q.F32 if x.ndim == 1 else types[n % len(types)]
        if override_type is not None and gname == override_type[0]:
            qtype = override_type[1]
        if qtype == Q.F32:
            data, back = x.astype(np.float32), x.astype(np.float32)
        elif qtype == Q.F16:
            data = x.astype(np.float16)
            back = data.astype(np.float32)
        elif qtype == Q.IQ4_NL:  # raw bytes of the right size; the exporter must refuse the type
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), dtype=np.uint8)
            back = x
        else:
            data = gguf.quants.quantize(x, qtype)
            back = gguf.quants.dequantize(data, qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        if "attn_q" in gname:  # what the model should end up with: the dequantized, unpermuted rows
            back = back.reshape(hf["num_attention_heads"], -1, 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        elif "attn_k" in gname:
            back = back.reshape(hf["num_key_value_heads"], -1, 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        stored[hname] = torch.from_numpy(np.array(back, dtype=np.float32)).reshape(x.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory):
    _, _, ref, _ = tiny("llama", "none")
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf"
    stored = write_tiny_gguf(path, ref)
    return path, ref, stored


def test_gguf_export_matches_reference(tiny_gguf, tmp_path, kernels):
    path, ref, stored = tiny_gguf
    rc, err = run_export("gguf", "--gguf", path, "--out", tmp_path / "pkg", "--kernels", kernels)
    assert rc == 0, err
    with open(tmp_path / "pkg" / "config.json") as f:
        config = json.load(f)
    assert config["model_name"] == "Tiny-Llama"
    assert config["source"]["kind"] == "gguf" and len(config["source"]["sha256"]) == 64
    assert config["special_tokens"] == {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2,
                                        "add_bos": False}
    assert config["tie_word_embeddings"] and config["rms_norm_eps"] == 1e-5
    assert config["dysco"]["selected_heads"] == []
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "pkg" / "tokenizer.json"))
    assert [tok.decode(s, skip_special_tokens=False) for s in config["dysco"]["template_sequences"]] == \
        ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]
    gguf_ref = Reference.__new__(Reference)
    gguf_ref.hf, gguf_ref.w, gguf_ref.inv_freq, gguf_ref.mscale = ref.hf, stored, ref.inv_freq, ref.mscale
    model = load_module(str(tmp_path / "pkg"))
    gen = torch.Generator().manual_seed(8)
    seqs = [random_tokens(gen, n, config["vocab_size"]) for n in (13, 30)]
    cache = PagedCache(config)
    logits, _ = run(model, cache, list(enumerate(seqs)))
    for b, toks in enumerate(seqs):
        torch.testing.assert_close(logits[b], gguf_ref.forward(toks)[0][-1], **TOL)


def test_gguf_skip_if_current(tiny_gguf, tmp_path, kernels):
    path, _, _ = tiny_gguf
    out = tmp_path / "pkg"
    args = ["gguf", "--gguf", path, "--out", out, "--kernels", kernels, "--skip-if-current"]
    assert run_export(*args)[0] == 0
    stamp = os.stat(out / "model.pt").st_mtime_ns
    rc, err = run_export(*args)
    assert rc == 0 and "is current" in err
    assert os.stat(out / "model.pt").st_mtime_ns == stamp
    with open(out / "config.json") as f:
        config = json.load(f)
    config["source"]["exporter_version"] = "older"
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    rc, err = run_export(*args)
    assert rc == 0 and "is current" not in err
    # Another dtype is not the same package (`make model MODEL_DTYPE=bfloat16`).
    rc, err = run_export(*args, "--dtype", "bfloat16")
    assert rc == 0 and "is current" not in err
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    rc, err = run_export(*args, "--dtype", "bfloat16")
    assert rc == 0 and "is current" in err


# ---------------------------------------------------------------------------------------------------------
# Errors: exit code 2, one line naming the file, no traceback.

def expect_error(args, names, says):
    rc, err = run_export(*args)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(names) in err and says in err, err


def test_error_truncated_gguf(tiny_gguf, tmp_path, kernels):
    path, _, _ = tiny_gguf
    bad = tmp_path / "truncated.gguf"
    data = open(path, "rb").read()
    bad.write_bytes(data[:len(data) * 2 // 3])
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad, "truncated")
    bad.write_bytes(data[:100])  # inside the metadata
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad, "GGUF")


def test_error_wrong_magic(tmp_path, kernels):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad, "magic")


def test_error_missing_tensor(tiny, tmp_path, kernels):
    bad = tmp_path / "missing.gguf"
    write_tiny_gguf(bad, tiny("llama", "none")[2], drop=("blk.2.ffn_up.weight",))
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad,
                 "missing tensor model.layers.2.mlp.up_proj.weight")


def test_error_unsupported_quant_type(tiny, tmp_path, kernels):
    from gguf import GGMLQuantizationType as Q
    bad = tmp_path / "iq4.gguf"
    write_tiny_gguf(bad, tiny("llama", "none")[2], override_type=("blk.1.attn_v.weight", Q.IQ4_NL))
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad,
                 "unsupported type IQ4_NL")


def test_error_unsupported_architecture(tiny, tmp_path, kernels):
    bad = tmp_path / "falcon.gguf"
    write_tiny_gguf(bad, tiny("llama", "none")[2], arch="falcon")
    expect_error(["gguf", "--gguf", bad, "--out", tmp_path / "o", "--kernels", kernels], bad,
                 "unsupported architecture 'falcon'")
    hf = tmp_path / "mistral"
    shutil.copytree(tiny("llama", "none")[3] / "hf", hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf / "config.json").write_text(json.dumps(config))
    expect_error(["hf", "--checkpoint", hf, "--out", tmp_path / "o", "--kernels", kernels],
                 hf / "config.json", "unsupported architecture")


def test_sharded_checkpoint_and_missing_shard(tiny, tmp_path, kernels):
    from tools.dysco_export.safetensors_io import write_safetensors
    model, config, _, root = tiny("llama", "none")
    hf = tmp_path / "sharded"
    shutil.copytree(root / "hf", hf)
    tensors = read_safetensors_plain(hf / "model.safetensors")
    os.remove(hf / "model.safetensors")
    weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(tensors)}
    for shard in set(weight_map.values()):
        write_safetensors(str(hf / shard), {n: t for n, t in tensors.items() if weight_map[n] == shard})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    rc, err = run_export("hf", "--checkpoint", hf, "--out", tmp_path / "pkg", "--kernels", kernels)
    assert rc == 0, err
    sharded = load_module(str(tmp_path / "pkg"))
    toks = list(range(300, 321))
    torch.testing.assert_close(run(sharded, PagedCache(config), [(0, toks)])[0],
                               run(model, PagedCache(config), [(0, toks)])[0], rtol=0, atol=0)

    os.remove(hf / "model-00002-of-00002.safetensors")
    expect_error(["hf", "--checkpoint", hf, "--out", tmp_path / "o", "--kernels", kernels],
                 hf / "model-00002-of-00002.safetensors", "missing safetensors shard")


def test_error_truncated_safetensors(tiny, tmp_path, kernels):
    single = tmp_path / "single"
    shutil.copytree(tiny("llama", "none")[3] / "hf", single)
    blob = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(blob[:len(blob) - 1000])
    expect_error(["hf", "--checkpoint", single, "--out", tmp_path / "o", "--kernels", kernels],
                 single / "model.safetensors", "truncated")


def test_error_through_the_real_command_line(tmp_path, kernels):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "tools.dysco_export", "gguf", "--gguf", str(bad), "--out",
                           str(tmp_path / "o"), "--kernels", kernels], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# The default model package (models/smollm2-135m-instruct), when `make model` has written it.

@pytest.mark.skipif(not os.path.exists(os.path.join(DEFAULT_PACKAGE, "config.json")),
                    reason="default model package not exported")
def test_default_package_answers_paris():
    from tokenizers import Tokenizer
    with open(os.path.join(DEFAULT_PACKAGE, "config.json")) as f:
        config = json.load(f)
    assert config["model_name"] == "SmolLM2-135M-Instruct" and config["architecture"] == "llama"
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_kv_heads"], config["head_dim"], config["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert config["special_tokens"]["eos_token_ids"] == [2] and config["chat_format"] == "chatml"
    tok = Tokenizer.from_file(os.path.join(DEFAULT_PACKAGE, "tokenizer.json"))
    model = load_module(DEFAULT_PACKAGE)
    chat = config["chat"]
    # The model's greedy answer is "The capital of France is Paris."; one forward pass over the prompt and
    # the answer's start checks the next token (generating all of it costs seconds per token here).
    prompt = (f"<|im_start|>system\n{chat['default_system']}<|im_end|>\n<|im_start|>user\n"
              "What is the capital of France? Answer in one sentence.<|im_end|>\n" + chat["generation_prompt"]
              + "The capital of France is")
    cache = PagedCache(config, num_pages=16, page_size=16)
    logits, _ = run(model, cache, [(0, tok.encode(prompt, add_special_tokens=False).ids)])
    assert tok.decode([int(logits[0].argmax())]) == " Paris"


# ---------------------------------------------------------------------------------------------------------
# Package format 2: weights.safetensors (Hugging Face names, package dtype, 64-byte aligned) bound at load.

def read_package_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def check_weights_file(pkg, config):
    """The layout rules of docs/model-interface.md "weights.safetensors"; returns the header."""
    from tools.dysco_export.model import required_weights
    path = os.path.join(pkg, config["weights"])
    n, header = read_package_header(path)
    assert (8 + n) % 64 == 0
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    expected = required_weights(config)
    st_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[config["dtype"]]
    end = 0
    for name, info in entries:
        begin, stop = info["data_offsets"]
        assert begin == end, f"{name}: hole or overlap before it"  # the safetensors library wants no holes
        end = stop
        if name.startswith("__padding__."):
            assert info["dtype"] == "U8" and 0 < info["shape"][0] < 64 and stop % 64 == 0
        else:
            assert begin % 64 == 0, f"{name} at {begin} is not 64-byte aligned"
            assert info["dtype"] == st_dtype and tuple(info["shape"]) == expected[name], name
    assert end == os.path.getsize(path) - 8 - n
    assert {k for k, _ in entries if not k.startswith("__padding__.")} == set(expected)
    return header


@pytest.mark.parametrize("family,rope", [("llama", "none"), ("qwen3", "yarn")])
def test_package_v2_layout(tiny, family, rope):
    from tools.dysco_export.model import weight_names
    model, config, ref, root = tiny(family, rope)
    pkg = root / "pkg"
    assert config["format_version"] == 4 and config["weights"] == "weights.safetensors"
    assert sorted(os.listdir(pkg)) == ["config.json", "model.pt", "tokenizer.json", "weights.safetensors"]
    header = check_weights_file(str(pkg), config)
    # model.pt is code and empty placeholders: a few tens of KB whatever the model size.
    assert os.path.getsize(pkg / "model.pt") < 200_000
    raw = torch.jit.load(str(pkg / "model.pt"))
    assert all(p.numel() == 0 for p in raw.parameters())
    assert {k: list(v) for k, v in dict(raw.weight_names).items()} == weight_names(config)
    assert (list(raw.weight_names["lm_head"]) == ["model.embed_tokens.weight"]) == config["tie_word_embeddings"]
    # The fused weights' parts follow each other in the file, so that the C++ loader binds them without a copy.
    for layer in range(config["num_layers"]):
        for parts in (raw.weight_names[f"layers.{layer}.qkv_proj"], raw.weight_names[f"layers.{layer}.gate_up_proj"]):
            spans = [header[name]["data_offsets"] for name in parts]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), parts
    # The file holds the checkpoint's tensors under their own names, bit for bit (fp32 package).
    stored = read_safetensors_plain_any(pkg / "weights.safetensors")
    for name, tensor in read_safetensors_plain(root / "hf" / "model.safetensors").items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        assert torch.equal(stored[name], tensor), name
    # Bound at load: tied embeddings are one tensor.
    assert (model.lm_head.data_ptr() == model.embed_tokens.data_ptr()) == config["tie_word_embeddings"]


def read_safetensors_plain_any(path):
    from tools.dysco_export.safetensors_io import read_safetensors
    return {k: v.clone() for k, v in read_safetensors(str(path)).items() if not k.startswith("__padding__.")}


def test_package_v2_bfloat16_padding_and_alignment(tiny, tmp_path, kernels):
    # qwen3 tiny in bf16: its q/k norm weights are 16 x 2 bytes, so padding entries keep the next tensors aligned.
    _, _, _, root = tiny("qwen3", "yarn")
    rc, err = run_export("hf", "--checkpoint", root / "hf", "--out", tmp_path / "p", "--kernels", kernels,
                         "--dtype", "bfloat16")
    assert rc == 0, err
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    header = check_weights_file(str(tmp_path / "p"), config)
    assert any(k.startswith("__padding__.") for k in header)
    ref = read_safetensors_plain(root / "hf" / "model.safetensors")
    got = read_safetensors_plain_any(tmp_path / "p" / "weights.safetensors")
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"],
                       ref["model.layers.1.self_attn.k_proj.weight"].to(torch.bfloat16))


def test_load_module_refuses_format_1(tiny, tmp_path):
    from tools.dysco_export.errors import ExportError
    _, _, _, root = tiny("llama", "none")
    shutil.copytree(root / "pkg", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["format_version"] = 1
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="re-export"):
        load_module(str(tmp_path / "old"))


# ---------------------------------------------------------------------------------------------------------
# `synthetic`: real shapes with seeded random weights.

SMALL = ["--override", "num_layers=2", "--override", "hidden_size=64", "--override", "intermediate_size=96",
         "--override", "num_attention_heads=4", "--override", "num_kv_heads=2", "--override", "head_dim=32"]


def export_synthetic(out, shape, seed, dtype="bfloat16", extra=()):
    rc, err = run_export("synthetic", "--shape", shape, "--seed", seed, "--dtype", dtype, "--out", out,
                         "--kernels", KERNELS, *SMALL, *extra)
    assert rc == 0, err
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def synthetic_qwen3(tmp_path_factory, kernels):
    root = tmp_path_factory.mktemp("synthetic")
    return root, export_synthetic(root / "a", "qwen3-8b", 1)


def test_synthetic_package(synthetic_qwen3):
    root, config = synthetic_qwen3
    assert config["model_name"] == "synthetic-qwen3-8b-custom-seed1" and config["source"]["kind"] == "synthetic"
    assert config["format_version"] == 4 and config["dtype"] == "bfloat16" and config["qk_norm"]
    assert (config["num_layers"], config["hidden_size"], config["vocab_size"]) == (2, 64, 151936)
    assert config["max_position_embeddings"] == 131072
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 32768
    assert config["chat_format"] == "chatml" and config["special_tokens"]["eos_token_ids"] == [151645, 151643]
    check_weights_file(str(root / "a"), config)
    w = read_safetensors_plain_any(root / "a" / "weights.safetensors")
    q = w["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.mean()) < 2e-3 and abs(q.std() - 0.02) < 1e-3
    assert abs(w["lm_head.weight"].float().std() - 0.02) < 1e-4  # 9.7M draws
    assert torch.equal(w["model.layers.1.self_attn.k_norm.weight"], torch.ones(32, dtype=torch.bfloat16))
    assert not torch.equal(w["model.layers.0.mlp.up_proj.weight"], w["model.layers.0.mlp.gate_proj.weight"])


def test_synthetic_is_deterministic_per_seed(synthetic_qwen3):
    root, _ = synthetic_qwen3
    export_synthetic(root / "b", "qwen3-8b", 1)
    export_synthetic(root / "c", "qwen3-8b", 2)
    a = (root / "a" / "weights.safetensors").read_bytes()
    assert a == (root / "b" / "weights.safetensors").read_bytes()
    wa = read_safetensors_plain_any(root / "a" / "weights.safetensors")
    wc = read_safetensors_plain_any(root / "c" / "weights.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(wa[name], wc[name]), name
        assert (wa[name] == wc[name]).float().mean() < 0.05  # independent draws, not a shifted stream


def test_synthetic_bfloat16_forward_on_cpu(synthetic_qwen3, tmp_path):
    # The bf16 package runs on the CPU ops and agrees with the fp32 package of the same draws.
    root, config = synthetic_qwen3
    c32 = export_synthetic(tmp_path / "f32", "qwen3-8b", 1, "float32")
    toks = list(range(1000, 1037))
    out = {}
    for name, pkg, cfg in (("bf16", root / "a", config), ("f32", tmp_path / "f32", c32)):
        cache = PagedCache(cfg)
        cache.kv = cache.kv.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg["dtype"]])
        logits, _ = run(load_module(str(pkg)), cache, [(0, toks)])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        out[name] = logits[0]
    assert torch.nn.functional.cosine_similarity(out["bf16"], out["f32"], dim=0) > 0.99


def test_synthetic_llama_shape_and_tokenizer(tmp_path, kernels):
    from tokenizers import Tokenizer
    config = export_synthetic(tmp_path / "l", "llama3.1-8b", 0, "float32",
                              ["--override", "vocab_size=1024", "--max-position-embeddings", "8192"])
    assert config["architecture"] == "llama" and config["chat_format"] == "llama3"
    assert config["rope_scaling"] == {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-5
    assert config["special_tokens"] == {"bos_token_id": 768, "eos_token_ids": [769, 776, 777],
                                        "pad_token_id": 772, "add_bos": True}
    check_weights_file(str(tmp_path / "l"), config)
    tok = Tokenizer.from_file(str(tmp_path / "l" / "tokenizer.json"))
    assert tok.token_to_id("<|eot_id|>") == 777


def test_synthetic_real_shapes_config():
    # The full shapes' numbers without writing 16 GB: architecture, reference DySCO heads, size.
    from tokenizers import Tokenizer
    from tools.dysco_export import package
    from tools.dysco_export.model import required_weights
    from tools.dysco_export.synthetic import llama3_byte_tokenizer, synthetic_arch
    q = synthetic_arch("qwen3-8b", "bfloat16", 131072, {})
    ll = synthetic_arch("llama3.1-8b", "bfloat16", 131072, {})
    params = {k: sum(math.prod(s) for s in required_weights(a).values()) for k, a in (("q", q), ("l", ll))}
    assert params == {"q": 8_190_735_360, "l": 8_030_261_248}  # Qwen3-8B and Llama-3.1-8B parameter counts
    assert package.reference_dysco(q)["selected_heads"] and package.reference_dysco(ll)["selected_heads"]
    assert synthetic_arch("qwen3-8b", "bfloat16", 32768, {})["rope_scaling"] is None
    tok = Tokenizer.from_str(json.dumps(llama3_byte_tokenizer(128256)))
    text = "Hello, wörld! 你好 \U0001F600\n\t<not special> end"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids) < 256 and tok.decode(ids) == text
    assert [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|eot_id|>", "<|reserved_special_token_247|>")] == \
        [128000, 128001, 128006, 128009, 128255]
    assert tok.encode("<|eot_id|>x", add_special_tokens=False).ids == [128009, ord("x")]
