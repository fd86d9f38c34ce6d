"""Self-checks of the independent DySCO reference (tests/python/dysco_reference.py).

The eager model is tied to the product: its logits and attention probabilities equal those of the exported
TorchScript package (tools/dysco_export, run through the paged `dysco` ops) for the same tiny checkpoint. The
DySCO pieces are checked on hand-made cases, and a whole run_dysco is replayed step by step with fresh,
cache-free forwards of the whole sequence, which checks the KV bookkeeping (prefill, warm-ups, the speculative
pass's roll-back) independently of the cache.

Needs the op library: build/lib/libdysco_kernels.so (override with env DYSCO_KERNELS).
"""
import contextlib
import io
import json
import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
KERNELS = os.environ.get("DYSCO_KERNELS", os.path.join(REPO, "build", "lib", "libdysco_kernels.so"))

import dysco_reference as ref  # noqa: E402

HEADS = [(1, 0), (2, 3)]  # the tiny models' retrieval heads (tools/dysco_export TINY_SELECTED_HEADS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(family, rope) -> (package dir, HF checkpoint dir), exported on first use."""
    from tools.dysco_export.__main__ import main as export_main
    if not os.path.exists(KERNELS):
        pytest.fail(f"{KERNELS} not found: build the dysco_kernels target (or set DYSCO_KERNELS)")
    torch.ops.load_library(KERNELS)
    made = {}

    def get(family, rope="none"):
        if (family, rope) not in made:
            root = tmp_path_factory.mktemp(f"tiny-{family}-{rope}")
            pkg, hf = str(root / "pkg"), str(root / "hf")
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = export_main(["tiny", "--family", family, "--seed", "0", "--out", pkg, "--hf-out", hf,
                                  "--kernels", KERNELS, "--rope-scaling", rope])
            assert rc == 0, err.getvalue()
            made[(family, rope)] = (pkg, hf)
        return made[(family, rope)]
    return get


@pytest.fixture(scope="session")
def llama(tiny_dirs):
    return ref.EagerModel(tiny_dirs("llama")[1])


def random_prompt(n, seed, vocab=2000):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------------------
# The eager model equals the product's TorchScript package


class PagedRun:
    """Runs the package's forward for one sequence over a paged cache with scattered pages."""

    def __init__(self, pkg_dir, page_size=8, num_pages=16):
        with open(os.path.join(pkg_dir, "config.json")) as f:
            self.cfg = json.load(f)
        from tools.dysco_export.package import load_module
        self.module = load_module(pkg_dir)
        self.page_size = page_size
        self.kv = torch.zeros(self.cfg["num_layers"], 2, num_pages, page_size, self.cfg["num_kv_heads"],
                              self.cfg["head_dim"])
        self.pages = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3)).to(torch.int32)
        self.length = 0

    def step(self, tokens, bias=None, last_layer=-1, probe_heads=None):
        q = len(tokens)
        positions = torch.arange(self.length, self.length + q)
        slots = self.pages[positions // self.page_size].to(torch.int64) * self.page_size + positions % self.page_size
        n = self.length + q
        logits, probs = self.module(torch.tensor(tokens), positions, torch.tensor([0, q]), torch.tensor([n]),
                                    slots, self.pages[None], self.kv, None if bias is None else bias[None],
                                    last_layer, [] if probe_heads is None else [int(p[0]) for p in probe_heads],
                                    None if probe_heads is None else torch.tensor([int(p[1]) for p in probe_heads]))
        self.length = n
        # probs are [1, H, pages x page_size] (the block table's capacity), zero past n: the reference's width
        assert float(probs[:, :, n:].abs().max()) == 0.0 if probs.numel() else True
        return logits, probs[:, :, :n]


@pytest.mark.parametrize("family,rope", [("llama", "none"), ("llama", "llama3"), ("qwen3", "yarn")])
def test_eager_model_matches_package(tiny_dirs, family, rope):
    pkg, hf = tiny_dirs(family, rope)
    model = ref.EagerModel(hf)
    paged = PagedRun(pkg)
    tokens = random_prompt(41, seed=7, vocab=model.vocab_size)
    probes = [[0, 1], [1, 0], [2, 3], [3, 2]]
    g = torch.Generator().manual_seed(11)

    # One prefill (no bias): logits and last-row probabilities.
    logits, probs = paged.step(tokens[:40], probe_heads=probes)
    res = model.forward(tokens[:40], probe_heads=probes)
    assert res.logits.shape == (model.vocab_size,)
    torch.testing.assert_close(res.logits, logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.probs, probs[0], rtol=1e-5, atol=1e-6)

    # A partial forward (layers 0..2, K/V not kept here) of the next token, then its full decode with a bias.
    bias = torch.randn(64, generator=g)
    bias[5] = float("-inf")
    _, spec_probs = paged.step(tokens[40:], last_layer=2, probe_heads=[[1, 0], [2, 3]])
    paged.length -= 1  # the package overwrites the slot in the next call: the reference's roll-back
    spec = model.forward(tokens[40:], last_layer=2, probe_heads=[(1, 0), (2, 3)], keep_kv=False)
    assert spec.logits is None and model.seq_len == 40
    torch.testing.assert_close(spec.probs, spec_probs[0], rtol=1e-5, atol=1e-6)
    logits, probs = paged.step(tokens[40:], bias=bias, probe_heads=probes)
    res = model.forward(tokens[40:], bias=bias, probe_heads=probes)
    torch.testing.assert_close(res.logits, logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.probs, probs[0], rtol=1e-5, atol=1e-6)
    assert float(res.probs[:, 5].abs().max()) == 0.0


def test_incremental_forward_equals_one_prefill(llama):
    tokens = random_prompt(30, seed=1)
    llama.reset()
    full = llama.forward(tokens, probe_heads=HEADS, probe_from=0)
    llama.reset()
    llama.forward(tokens[:20])
    for i in range(20, 30):
        step = llama.forward([tokens[i]], probe_heads=HEADS)
        torch.testing.assert_close(step.probs, full.probs[:, i, :i + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.logits, full.logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Selection, relevance, bias, templates


def test_select_top_k_ties_lower_position_first():
    r = [0.1, 0.3, 0.1, 0.3, 0.2]
    assert ref.select_top_k(r, 1) == [1]
    assert ref.select_top_k(r, 2) == [1, 3]
    assert ref.select_top_k(r, 4) == [0, 1, 3, 4]  # 0 before 2 at 0.1
    assert ref.select_top_k(r, 99) == [0, 1, 2, 3, 4]  # top_k > n
    assert ref.descending_order([0.0, 0.0, 0.0]) == [0, 1, 2]


def test_select_top_p_crossing_entry_excluded():
    r = [0.0625, 0.5, 0.25, 0.125, 0.0625]  # exact binary fractions: no rounding in the sums
    assert ref.select_top_p(r, 0.5) == [1]  # cumsum 0.5 <= 0.5
    assert ref.select_top_p(r, 0.74) == [1]  # 0.75 crosses: not kept
    assert ref.select_top_p(r, 0.75) == [1, 2]
    assert ref.select_top_p(r, 0.9375) == [0, 1, 2, 3]  # the tie at 0.0625: position 0 first
    assert ref.select_top_p(r, 1.0) == [0, 1, 2, 3, 4]  # p = 1.0 keeps everything
    assert ref.select_top_p(r + [0.0], 1.0) == [0, 1, 2, 3, 4, 5]  # zeros too (cumsum stays 1.0)


def test_select_top_p_keeps_at_least_one():
    assert ref.select_top_p([0.0, 1.0, 0.0], 0.5) == [1]  # all mass on one key
    assert ref.select_top_p([0.0, 1.0, 0.0], 0.999) == [1]
    assert ref.select_top_p([0.4, 0.6], 0.1) == [1]


def test_select_hybrid_and_modes():
    r = [0.05, 0.3, 0.25, 0.2, 0.2]
    assert ref.select_positions(r, 0.9, None) == [1, 2, 3]  # 0.95 crosses 0.9
    assert ref.select_positions(r, 0.96, None) == [1, 2, 3, 4]
    assert ref.select_positions(r, 0.96, 2) == [1, 2]  # nucleus of 4 > top_k: the top_k set
    assert ref.select_positions(r, 0.5, 3) == [1]  # nucleus smaller than top_k: the nucleus
    assert ref.select_positions(r, None, 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        ref.select_positions(r, None, None)


def test_update_relevance_sums_to_one_and_matches_formula():
    g = torch.Generator().manual_seed(5)
    r_prev = torch.softmax(torch.randn(9, generator=g), 0)
    probs = torch.softmax(torch.randn(3, 10, generator=g) * 3, -1)
    r = ref.update_relevance(r_prev, probs, 0.75)
    assert r.dtype == torch.float32 and r.shape == (10,)
    assert abs(float(r.sum()) - 1.0) < 1e-6
    expected = [sum(float(probs[h, j]) for h in range(3)) / 3 + (0.75 * float(r_prev[j]) if j < 9 else 0.0)
                for j in range(10)]
    total = sum(expected)
    torch.testing.assert_close(r, torch.tensor([e / total for e in expected]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        ref.update_relevance(r_prev, probs[:, :9], 0.75)


def test_bias_soft_and_hard():
    templates = {0, 1, 4}
    b = ref.build_bias(6, [1, 2, 4], templates, 2.0)
    assert b.dtype == torch.float32
    log2 = math.log(2.0)
    torch.testing.assert_close(b, torch.tensor([0, 0, log2, 0, 0, log2], dtype=torch.float32))
    # strength >= 99: hard mask, no template exclusion, current position always open
    h = ref.build_bias(6, [1, 2, 4], templates, 99.0)
    inf = float("-inf")
    assert h.tolist() == [inf, 0.0, 0.0, inf, 0.0, 0.0]
    assert ref.build_bias(3, [], set(), 1000.0).tolist() == [inf, inf, 0.0]
    # a strength below 1 lowers the selected keys (log < 0); the current position gets it too
    assert ref.build_bias(2, [0], set(), 0.5).tolist() == pytest.approx([math.log(0.5), math.log(0.5)])


def test_template_positions_every_occurrence_overlapping():
    prompt = [5, 1, 1, 1, 7, 1, 9, 2, 3, 2, 3]
    assert ref.template_positions(prompt, [[1, 1]]) == {1, 2, 3}  # occurrences at 1 and 2 overlap
    assert ref.template_positions(prompt, [[2, 3], [9]]) == {6, 7, 8, 9, 10}
    assert ref.template_positions(prompt, [[1, 7, 1, 9]]) == {3, 4, 5, 6}
    assert ref.template_positions(prompt, [[4, 4], []]) == set()
    assert ref.template_positions(prompt, [[3, 2, 3, 2]]) == set()  # runs past the end: no match


def test_position_ranges_and_top_relevance():
    assert ref.position_ranges([7, 0, 1, 2, 5, 8]) == [[0, 3], [5, 6], [7, 9]]
    assert ref.position_ranges([]) == []
    assert ref.top_relevance([0.1, 0.5, 0.1, 0.3], 3) == [[1, 0.5], [3, 0.3], [0, 0.1]]


# ---------------------------------------------------------------------------------------------------------
# run_dysco


def replay(model, prompt, params, generated, trace, iw):
    """Recomputes every step of a run from fresh forwards of the whole sequence (no cache reuse), with a bias
    row per position: the relevance chain, the selection and the greedy tokens must come out the same."""
    P = len(prompt)
    T = params.context_warmup_steps + iw
    seq = prompt + [e["token"] for e in trace if e["phase"] == "generate"]
    assert [e["token"] for e in trace] == seq[P - T:]
    templates = ref.template_positions(prompt, params.template_sequences)
    width = len(seq)
    rows = torch.zeros(width, width)
    r = torch.zeros(P - T)
    static_sel = None
    for e in trace:
        n = e["num_keys"]
        assert e["position"] == n - 1 and seq[n - 1] == e["token"]
        model.reset()
        plain_row = model.forward(seq[:n], bias=rows[:n, :n], probe_heads=params.selected_heads)
        if e["phase"] == "context_warmup":
            r = ref.update_relevance(r, plain_row.probs, params.decay_factor)
            assert e["selected"] == [] and e["num_selected"] == 0 and e["next_token"] is None
            continue
        if params.dynamic_rescale:
            r = ref.update_relevance(r, plain_row.probs, params.decay_factor)
            sel = ref.select_positions(r.tolist(), params.top_p, params.top_k)
        else:
            if static_sel is None:
                static_sel = ref.select_positions(r.tolist(), params.top_p, params.top_k)
            sel = static_sel
        assert e["selected"] == ref.position_ranges(sel)
        assert e["num_selected"] == len(sel)
        assert e["nucleus_mass"] == pytest.approx(float(r[sel].double().sum()), abs=1e-5)
        rows[n - 1, :n] = ref.build_bias(n, sel, templates, params.strength)
        model.reset()
        real = model.forward(seq[:n], bias=rows[:n, :n])
        if e["next_token"] is not None:
            assert int(torch.argmax(real.logits)) == e["next_token"]
        torch.testing.assert_close(torch.tensor(e["relevance"]), r, rtol=1e-4, atol=1e-6)
    assert [e["next_token"] for e in trace if e["next_token"] is not None] == generated


def check_trace_shape(trace, P, cw, iw, generated):
    phases = [e["phase"] for e in trace]
    n_ctx = max(cw - 1, 0)
    n_int = (iw + 1) if cw >= 1 else iw
    assert phases == ["context_warmup"] * n_ctx + ["intervention_warmup"] * n_int + \
        ["generate"] * (len(generated) - 1)
    assert [e["step"] for e in trace] == list(range(len(trace)))
    assert trace[0]["position"] == P - cw - iw
    assert [e["next_token"] for e in trace if e["phase"] != "context_warmup"][-len(generated):] == generated
    for e in trace:
        assert set(e) == {"step", "phase", "position", "token", "num_keys", "num_selected", "nucleus_mass",
                          "selected", "top_relevance", "next_token", "relevance"}
        assert len(e["relevance"]) == e["num_keys"] or e["phase"] != "context_warmup"
        assert abs(sum(e["relevance"]) - 1.0) < 1e-5
        assert len(e["top_relevance"]) == min(8, len(e["relevance"]))


@pytest.mark.parametrize("case", [
    dict(top_p=0.5, top_k=4096, strength=3.0, cw=5, iw=2),
    dict(top_p=0.9, top_k=3, strength=2.0, cw=1, iw=3),  # hybrid capped; no context warm-up step
    dict(top_p=None, top_k=6, strength=100.0, cw=3, iw=0),  # hard mask, top_k only
    dict(top_p=0.7, top_k=None, strength=0.5, cw=0, iw=2),  # no context warm-up at all
])
def test_run_dysco_replays(llama, case):
    prompt = random_prompt(40, seed=2)
    params = ref.DyscoParams(selected_heads=HEADS, top_p=case["top_p"], top_k=case["top_k"],
                             strength=case["strength"], decay_factor=0.75, context_warmup_steps=case["cw"],
                             intervention_warmup=case["iw"], template_sequences=[prompt[3:5], prompt[10:11]])
    generated, trace = ref.run_dysco(llama, prompt, params, 6)
    assert len(generated) == 6
    check_trace_shape(trace, len(prompt), case["cw"], case["iw"], generated)
    for e in trace:
        assert len(e["relevance"]) == e["num_keys"]
    replay(llama, prompt, params, generated, trace, case["iw"])


def test_run_dysco_static_replays(llama):
    prompt = random_prompt(40, seed=4)
    params = ref.DyscoParams(selected_heads=HEADS, top_p=0.6, top_k=None, strength=4.0,
                             context_warmup_steps=4, intervention_warmup=2, dynamic_rescale=False)
    generated, trace = ref.run_dysco(llama, prompt, params, 5)
    check_trace_shape(trace, len(prompt), 4, 2, generated)
    frozen = [e for e in trace if e["phase"] != "context_warmup"]
    assert all(e["selected"] == frozen[0]["selected"] and e["relevance"] == trace[2]["relevance"]
               for e in frozen)
    replay(llama, prompt, params, generated, trace, 2)


def test_neutral_dysco_equals_plain_greedy(llama):
    prompt = random_prompt(50, seed=6)
    plain = ref.run_plain(llama, prompt, 12)
    # strength 1: log(1) = 0 everywhere
    same, _ = ref.run_dysco(llama, prompt, ref.DyscoParams(selected_heads=HEADS, strength=1.0), 12)
    assert same == plain
    # hard mask that selects every key (top_k >= n): bias 0 everywhere
    open_mask = ref.DyscoParams(selected_heads=HEADS, top_p=None, top_k=10_000, strength=99.0)
    same, _ = ref.run_dysco(llama, prompt, open_mask, 12)
    assert same == plain
    # a hard mask over a small set does change what the model sees
    narrow = ref.DyscoParams(selected_heads=HEADS, top_p=None, top_k=2, strength=99.0)
    assert ref.run_dysco(llama, prompt, narrow, 12)[0] != plain


def test_run_dysco_stops_on_eos_and_validates(llama):
    prompt = random_prompt(30, seed=8)
    params = ref.DyscoParams(selected_heads=HEADS, context_warmup_steps=3, intervention_warmup="auto")
    first, trace = ref.run_dysco(llama, prompt, params, 5, generation_prompt_tokens=4)
    assert [e["phase"] for e in trace].count("intervention_warmup") == 5  # auto -> 4, plus the last token
    stopped, trace = ref.run_dysco(llama, prompt, params, 5, eos_ids=[first[1]], generation_prompt_tokens=4)
    assert stopped == first[:first.index(first[1]) + 1]
    assert trace[-1]["next_token"] == stopped[-1]
    bad = [dict(selected_heads=[]), dict(selected_heads=[(4, 0)]), dict(top_p=None, top_k=None),
           dict(context_warmup_steps=0, intervention_warmup=0), dict(context_warmup_steps=25, intervention_warmup=5),
           dict(dynamic_rescale=False, context_warmup_steps=1), dict(strength=0.0), dict(decay_factor=1.0)]
    for fields in bad:
        kwargs = dict(selected_heads=HEADS)
        kwargs.update(fields)
        with pytest.raises(ValueError):
            ref.run_dysco(llama, prompt, ref.DyscoParams(**kwargs), 3)


def test_cli_writes_trace(tiny_dirs, tmp_path, capsys):
    hf = tiny_dirs("llama")[1]
    prompt = random_prompt(24, seed=9)
    out = tmp_path / "trace.jsonl"
    rc = ref.main(["--checkpoint", hf, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4",
                   "--heads", "1:0,2:3", "--top-p", "0.8", "--top-k", "none", "--strength", "3",
                   "--decay", "0.5", "--context-warmup", "4", "--intervention-warmup", "1",
                   "--template", "1,2;3,4", "--eos", "", "--trace", str(out)])
    assert rc == 0
    generated = json.loads(capsys.readouterr().out)["generated"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    check_trace_shape(lines, len(prompt), 4, 1, generated)
    model = ref.EagerModel(hf)
    params = ref.DyscoParams(selected_heads=HEADS, top_p=0.8, top_k=None, strength=3.0, decay_factor=0.5,
                             context_warmup_steps=4, intervention_warmup=1, template_sequences=[[1, 2], [3, 4]])
    assert ref.run_dysco(model, prompt, params, 4) == (generated, lines)


def test_params_from_package_config():
    p = ref.DyscoParams.from_config({"selected_heads": [[12, 3], [14, 0]], "top_p": 0.975, "top_k": 4096,
                                     "strength": 2.0, "decay_factor": 0.75, "context_warmup_steps": 8,
                                     "intervention_warmup": "auto", "dynamic_rescale": True,
                                     "template_sequences": [[1, 9690, 198]]})
    assert p == ref.DyscoParams(selected_heads=[(12, 3), (14, 0)], template_sequences=[[1, 9690, 198]])
    assert ref.resolve_intervention_warmup(p.intervention_warmup, None) == 2
    assert ref.resolve_intervention_warmup(p.intervention_warmup, 7) == 7
    assert ref.resolve_intervention_warmup(3, 7) == 3
