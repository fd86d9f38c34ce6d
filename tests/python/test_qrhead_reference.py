"""Checks of the QRHead detection reference (tests/python/qrhead_reference.py) and of the synthetic detection data
(tools/make_detection_data.py, tools/data/detection_synthetic.jsonl)."""
import json
import os
import statistics
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import qrhead_reference as qr  # noqa: E402
from tools import make_detection_data as mdd  # noqa: E402

DATA = os.path.join(REPO, "tools", "data", "detection_synthetic.jsonl")
SMOLLM2_TOKENIZER = os.path.join(REPO, "tests", "data", "smollm2", "tokenizer.json")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def encode():
    return qr.tokenizers_encoder(SMOLLM2_TOKENIZER)


@pytest.fixture(scope="module")
def decode():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(SMOLLM2_TOKENIZER)
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def examples():
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SMALL = {"question": "What is the secret code of the blue vault?", "gold_ids": [1],
         "paragraphs": [{"title": "The red vault", "text": "The secret code of the red vault is 1234. It is old."},
                        {"title": "The blue vault", "text": "It is new. The secret code of the blue vault is 4821."},
                        {"title": "Markets", "text": "Bread and cider are sold on the square every morning."}]}


def test_prompt_spans(encode, decode):
    chat = qr.chatml(SYSTEM)
    ids, query_start, spans = qr.build_prompt(SMALL["question"], SMALL["paragraphs"], chat, encode)
    assert decode(ids[query_start:]) == (qr.INSTRUCTION + "\n\nQuery: " + SMALL["question"]
                                         + "<|im_end|>\n<|im_start|>assistant\n")
    for i, ((s, e), p) in enumerate(zip(spans, SMALL["paragraphs"])):
        assert decode(ids[s:e + 1]).strip() == f"[{i + 1}] {p['title']}\n{p['text']}"
    assert decode(ids[:spans[0][0]]).endswith("Here are some paragraphs:\n\n")
    full = decode(ids)
    assert full.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHere are some")
    null_ids, null_start, null_spans = qr.build_prompt("N/A", SMALL["paragraphs"], chat, encode)
    assert null_start == query_start and null_spans == spans and null_ids[:query_start] == ids[:query_start]
    assert decode(null_ids[null_start:]).startswith(qr.INSTRUCTION + "\n\nQuery: N/A<|im_end|>")


def test_paragraph_scores_threshold():
    values = [0.1] * 9 + [-5.0]
    thr = statistics.mean(values) - 2 * statistics.stdev(values)  # unbiased
    assert -5.0 < thr < 0.1
    c = torch.tensor([7.0, 7.0] + values + [3.0], dtype=torch.float64)
    got = qr.paragraph_scores(c[None, :], [(2, 11), (0, 1), (12, 12)])
    assert got.shape == (1, 3)
    assert float(got[0, 0]) == pytest.approx(0.9)  # the outlier below mean - 2 std is dropped
    assert float(got[0, 1]) == 0.0  # equal entries: std 0, nothing strictly above the mean
    assert float(got[0, 2]) == 0.0  # one token: the unbiased std is NaN, nothing counts
    spread = [0.5, -0.2, 0.3, 0.1]
    thr = statistics.mean(spread) - 2 * statistics.stdev(spread)
    got = qr.paragraph_scores(torch.tensor(spread, dtype=torch.float64)[None, None], [(0, 3)])
    assert float(got[0, 0, 0]) == pytest.approx(sum(v for v in spread if v > thr))


def test_attention_to_keys_by_rows(tiny_llama):
    """The row-averaged attention equals the average of single-token forwards of each query row."""
    model = tiny_llama
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3000, (30,), generator=g).tolist()
    got = qr.attention_to_keys(model, ids, 22)
    heads = [(layer, head) for layer in range(model.num_layers) for head in range(model.num_heads)]
    rows = []
    for t in range(22, 30):
        model.reset()
        model.forward(ids[:t])
        rows.append(model.forward([ids[t]], probe_heads=heads).probs[:, :22].double())
    expected = torch.stack(rows).mean(0).reshape(model.num_layers, model.num_heads, 22)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_head_scores_on_tiny_model(tiny_llama, encode, examples):
    chat = qr.chatml(SYSTEM)
    two = examples[:2]
    scores = qr.head_scores(tiny_llama, two, chat, encode)
    assert scores.shape == (4, 4) and scores.dtype == torch.float64 and torch.isfinite(scores).all()
    each = [qr.example_scores(tiny_llama, ex, chat, encode) for ex in two]
    torch.testing.assert_close(scores, (each[0] + each[1]) / 2)
    best = qr.best_heads(scores, 16)
    assert sorted(best) == [(layer, head) for layer in range(4) for head in range(4)]
    values = [float(scores[lh]) for lh in best]
    assert values == sorted(values, reverse=True)
    assert qr.best_heads(torch.zeros(2, 3), 4) == [(0, 0), (0, 1), (0, 2), (1, 0)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tools.dysco_export.tiny import write_tiny_checkpoint
    from dysco_reference import EagerModel
    out = str(tmp_path_factory.mktemp("tiny-llama-hf"))
    write_tiny_checkpoint("llama", 0, out)
    return EagerModel(out)


def test_cli(tiny_llama, tmp_path):
    out = tmp_path / "scores.json"
    ckpt = tmp_path / "ckpt"
    from tools.dysco_export.tiny import write_tiny_checkpoint
    write_tiny_checkpoint("llama", 0, str(ckpt))
    assert qr.main(["--checkpoint", str(ckpt), "--data", DATA, "--limit", "1", "--count", "3",
                    "--system", SYSTEM, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["scores"]) == 4 and len(result["best_heads"]) == 3
    expected = qr.example_scores(tiny_llama, json.loads(open(DATA).readline()), qr.chatml(SYSTEM),
                                 qr.tokenizers_encoder(SMOLLM2_TOKENIZER))
    torch.testing.assert_close(torch.tensor(result["scores"], dtype=torch.float64), expected)


# ---------------------------------------------------------------------------------------------------------
# Synthetic data


def entity_of(question):
    for spec in mdd.FACTS:
        before, after = spec["question"]("\x00").split("\x00")
        if question.startswith(before) and question.endswith(after):
            return question[len(before):len(question) - len(after)]
    raise AssertionError(f"unknown question form: {question}")


def test_committed_data_is_the_generators(tmp_path, examples):
    out = tmp_path / "d.jsonl"
    assert mdd.main(["--n", "24", "--seed", "0", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == open(DATA, encoding="utf-8").read()
    assert mdd.make_examples(5, 1) == mdd.make_examples(5, 1)
    assert mdd.make_examples(5, 1) != mdd.make_examples(5, 2)
    assert len(examples) == 24


def test_examples_are_answerable_from_the_gold_paragraph_only(encode):
    chat = qr.chatml(SYSTEM)
    for ex in mdd.make_examples(60, 5):
        assert set(ex) == {"question", "paragraphs", "gold_ids"}
        assert 8 <= len(ex["paragraphs"]) <= 20 and len(ex["gold_ids"]) == 1
        gold = ex["gold_ids"][0]
        entity = entity_of(ex["question"])
        holders = [i for i, p in enumerate(ex["paragraphs"]) if entity in p["text"]]
        assert holders == [gold], (ex["question"], holders)
        ids, _, _ = qr.build_prompt(ex["question"], ex["paragraphs"], chat, encode)
        assert 300 <= len(ids) <= 1700
