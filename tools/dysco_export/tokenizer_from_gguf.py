"""Builds a Hugging Face `tokenizer.json` (as a dict) from the tokenizer metadata of a GGUF file.

Only byte-level BPE tokenizers (`tokenizer.ggml.model == "gpt2"`) are supported; the pre-tokenizer is chosen
from `tokenizer.ggml.pre` so that the result encodes exactly like the tokenizer.json the model was published
with on the Hugging Face Hub.

CLI: python -m tools.dysco_export.tokenizer_from_gguf MODEL.gguf OUT/tokenizer.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import gguf

# llama.cpp token types (gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _split_regex(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, ignore_merges), as the Hub's tokenizer.json files have them.
def _pre_tokenization(pre: str) -> tuple[dict | None, dict, bool]:
    if pre == "smollm":
        return None, {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            _byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True)]}, False
    if pre in ("llama-bpe", "llama3"):
        return None, {"type": "Sequence", "pretokenizers": [
            _split_regex(_LLAMA3_REGEX),
            _byte_level(add_prefix_space=False, trim_offsets=True, use_regex=False)]}, True
    if pre == "qwen2":
        return {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
            _split_regex(_QWEN2_REGEX),
            _byte_level(add_prefix_space=False, trim_offsets=False, use_regex=False)]}, False
    if pre in ("gpt-2", "default"):
        return None, _byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True), False
    raise ValueError(f"unsupported GGUF tokenizer: tokenizer.ggml.pre = {pre!r} "
                     "(supported: smollm, llama-bpe, qwen2, gpt-2)")


def _field(reader: gguf.GGUFReader, key: str, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF has no tokenizer metadata key {key!r}")
        return None
    try:
        return field.contents()
    except Exception:  # a damaged field: GGUFReader fails with assorted index/decode errors
        raise ValueError(f"corrupt GGUF tokenizer metadata key {key!r}") from None


def _list_field(reader: gguf.GGUFReader, key: str, item_type: type, required: bool = True) -> list | None:
    """An array metadata value whose elements are all `item_type` (ValueError naming the key otherwise)."""
    value = _field(reader, key, required)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
        raise ValueError(f"GGUF tokenizer metadata key {key!r} must be an array of {item_type.__name__}")
    return value


def tokenizer_json_from_gguf(reader: gguf.GGUFReader) -> dict:
    """Returns the tokenizer.json dict for the GGUF's tokenizer; ValueError naming the key if unsupported."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer: tokenizer.ggml.model = {model!r} "
                         "(only 'gpt2', byte-level BPE, is supported)")
    pre = _field(reader, "tokenizer.ggml.pre", required=False) or "default"
    normalizer, pre_tokenizer, ignore_merges = _pre_tokenization(pre)

    tokens = _list_field(reader, "tokenizer.ggml.tokens", str)
    merges = _list_field(reader, "tokenizer.ggml.merges", str)
    token_types = _list_field(reader, "tokenizer.ggml.token_type", int, required=False)
    if token_types is None:
        token_types = [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries but "
                         f"tokenizer.ggml.tokens has {len(tokens)}")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"tokenizer.ggml.tokens: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i

    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{i}] = {merge!r} is not two space-separated tokens")
        pairs.append(parts)

    added_tokens = []
    for i, (tok, ttype) in enumerate(zip(tokens, token_types)):
        if int(ttype) in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added_tokens.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        # dysco adds bos itself, so no post-processor template; ByteLevel only fixes offsets.
        "post_processor": _byte_level(add_prefix_space=True, trim_offsets=False, use_regex=True),
        "decoder": _byte_level(add_prefix_space=True, trim_offsets=True, use_regex=True),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": pairs,
        },
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tools.dysco_export.tokenizer_from_gguf MODEL.gguf OUT/tokenizer.json",
              file=sys.stderr)
        return 2
    reader = gguf.GGUFReader(argv[0])
    tok = tokenizer_json_from_gguf(reader)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
