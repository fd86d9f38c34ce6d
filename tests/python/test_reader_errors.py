"""Damaged inputs of the exporter's readers (tools/dysco_export: safetensors_io.read_safetensors,
gguf_source.read_gguf): each raises ExportError naming the file (the command line's exit code 2), fast and without
allocating what a corrupt field asks for. Regression tests of what tests/fuzz/fuzz_safetensors.py and
tests/fuzz/fuzz_gguf.py found (their inputs are kept in tests/fuzz/corpus/fuzz_*/regress-*); the readers call no
kernels, so no package is exported here.
"""
import json
import os
import struct
import time

import numpy as np
import pytest

from tools.dysco_export.errors import ExportError
from tools.dysco_export.gguf_source import read_gguf
from tools.dysco_export.model import check_weights
from tools.dysco_export.safetensors_io import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _safetensors(header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"t": {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                  "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}}


@pytest.mark.parametrize("name,blob", [
    ("dtype not a string", _safetensors(_entry(dtype=["F32"]), bytes(4))),
    ("offsets not integers", _safetensors(_entry(offsets=["0", "4"]), bytes(4))),
    ("offsets floats", _safetensors(_entry(offsets=[0, 4.0]), bytes(4))),
    ("offsets null", _safetensors(_entry(offsets=[0, None]), bytes(4))),
    ("offsets one number", _safetensors(_entry(offsets=4), bytes(4))),
    ("offsets reversed", _safetensors(_entry(offsets=[4, 0]), bytes(4))),
    ("negative dimensions", _safetensors(_entry(shape=[-1, -4], offsets=[0, 16]), bytes(16))),
    ("shape overflowing int64", _safetensors(_entry(shape=[2**32, 2**32], offsets=[0, 0]))),
    # Found by fuzz_safetensors in CI: a zero keeps the product 0, the other count exceeds int64.
    ("a count beyond int64 beside a zero", _safetensors(_entry(shape=[0, 2**64], offsets=[0, 0]))),
    # Found by fuzz_safetensors in CI: the counts fit int64, but not once multiplied by the item size.
    ("counts times item size beyond int64 beside a zero",
     _safetensors(_entry(dtype="F16", shape=[0, 2**63 - 1], offsets=[0, 0]))),
    ("too many dimensions", _safetensors(_entry(shape=[1] * 40, offsets=[0, 4]), bytes(4))),
    ("shape of strings", _safetensors(_entry(shape="12"), bytes(4))),
    ("JSON nested too deeply", _safetensors(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}")),
])
def test_corrupt_safetensors_header_is_an_export_error(tmp_path, name, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ExportError) as e:
        read_safetensors(str(path))
    assert str(e.value).startswith(f"{path}: "), str(e.value)


def test_safetensors_fuzz_regressions_are_export_errors():
    corpus = os.path.join(ROOT, "tests/fuzz/corpus/fuzz_safetensors")
    names = sorted(n for n in os.listdir(corpus) if n.startswith("regress-"))
    assert names
    for name in names:
        with pytest.raises(ExportError):
            read_safetensors(os.path.join(corpus, name))


# GGUF: a tiny llama file written with gguf.GGUFWriter, one metadata value or tensor at a time made wrong.

def _write_gguf(path, meta=None, tensors=None, eos=2, tokens=None):
    import gguf
    vocab = tokens if tokens is not None else ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"block_count": 1, "context_length": 64, "embedding_length": 4, "feed_forward_length": 8,
              "attention.head_count": 2, "attention.head_count_kv": 1}
    values.update(meta or {})
    for key, v in values.items():
        if isinstance(v, str):
            w.add_string(f"llama.{key}", v)
        elif isinstance(v, float):
            w.add_float32(f"llama.{key}", v)
        else:
            w.add_uint64(f"llama.{key}", v) if v >= 2**32 else w.add_uint32(f"llama.{key}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (6, 4), "output_norm.weight": (4,), "blk.0.attn_norm.weight": (4,),
              "blk.0.ffn_norm.weight": (4,), "blk.0.attn_q.weight": (4, 4), "blk.0.attn_k.weight": (2, 4),
              "blk.0.attn_v.weight": (2, 4), "blk.0.attn_output.weight": (4, 4), "blk.0.ffn_gate.weight": (8, 4),
              "blk.0.ffn_up.weight": (8, 4), "blk.0.ffn_down.weight": (4, 8)}
    shapes.update(tensors or {})
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _expect_gguf_error(path, says):
    start = time.time()
    with pytest.raises(ExportError) as e:
        config, weights, _, _, _ = read_gguf(path, "float32")
        check_weights(config, weights, path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value), str(e.value)
    assert time.time() - start < 10


def test_valid_tiny_gguf_reads(tmp_path):
    config, weights, tokenizer, special, _ = read_gguf(_write_gguf(tmp_path / "ok.gguf"), "float32")
    check_weights(config, weights, "ok")
    assert config["vocab_size"] == 6 and special["eos_token_ids"] == [2]


def test_gguf_array_length_beyond_the_file_is_refused_at_once(tmp_path):
    # 45 bytes: one metadata array of 2**60 one-byte elements. gguf.GGUFReader reads past the end as empty arrays
    # and looped (allocating a list entry per element) for ever.
    path = tmp_path / "hang.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x" +
                     struct.pack("<IIQ", 9, 0, 2**60))
    _expect_gguf_error(str(path), "corrupt or truncated GGUF header")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62))  # metadata count
    _expect_gguf_error(str(path), "corrupt or truncated GGUF header")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x" +
                     struct.pack("<IIQ", 9, 8, 2**40))  # an array of 2**40 strings
    _expect_gguf_error(str(path), "corrupt or truncated GGUF header")


@pytest.mark.parametrize("meta,says", [
    ({"block_count": 2**32}, "llama.block_count must be in [1, 4096]"),  # was a MemoryError in check_weights
    ({"attention.head_count": 0}, "llama.attention.head_count must be in [1, 4096]"),  # ZeroDivisionError
    ({"attention.head_count_kv": 0}, "llama.attention.head_count_kv must be in [1, 4096]"),
    ({"attention.head_count_kv": 3}, "is not a multiple of"),
    ({"embedding_length": "four"}, "llama.embedding_length must be an integer"),  # ValueError
    ({"rope.freq_base": 0.0}, "llama.rope.freq_base must be a finite number > 0"),
    ({"context_length": 0}, "llama.context_length must be in"),
])
def test_gguf_metadata_out_of_range_is_an_export_error(tmp_path, meta, says):
    _expect_gguf_error(_write_gguf(tmp_path / "m.gguf", meta=meta), says)


def test_gguf_token_ids_and_tensors_that_do_not_fit_are_export_errors(tmp_path):
    # eos outside the vocabulary: a package core's config parser refuses (was accepted).
    _expect_gguf_error(_write_gguf(tmp_path / "eos.gguf", eos=1000), "tokenizer.ggml.eos_token_id must be in [0, 5]")
    # q_proj rows that are not 2 heads of an even size: a numpy reshape error in reverse_llama_permute.
    _expect_gguf_error(_write_gguf(tmp_path / "q.gguf", tensors={"blk.0.attn_q.weight": (3, 4)}),
                       "tensor blk.0.attn_q.weight has shape [3, 4]")
    # a one-dimensional or empty embedding: an IndexError, or a package with vocab_size 0.
    _expect_gguf_error(_write_gguf(tmp_path / "e.gguf", tensors={"token_embd.weight": (4,)}),
                       "tensor token_embd.weight has shape")
    _expect_gguf_error(_write_gguf(tmp_path / "z.gguf", tensors={"token_embd.weight": (0, 4)}),
                       "tensor token_embd.weight has shape")


def test_gguf_tokenizer_metadata_of_the_wrong_type_is_an_export_error(tmp_path):
    import gguf
    path = tmp_path / "tok.gguf"
    _write_gguf(path)
    data = bytearray(path.read_bytes())
    # tokenizer.ggml.merges: an array of strings (type 8) -> an array of uint8 (type 0) of the same byte length.
    key = b"tokenizer.ggml.merges"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<II", data, at) == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    (count,) = struct.unpack_from("<Q", data, at + 8)
    (length,) = struct.unpack_from("<Q", data, at + 16)
    assert count == 1
    struct.pack_into("<IQ", data, at + 4, gguf.GGUFValueType.UINT8, 8 + length)
    path.write_bytes(bytes(data))
    _expect_gguf_error(str(path), "'tokenizer.ggml.merges' must be an array of str")


def test_gguf_fuzz_regressions_are_export_errors():
    corpus = os.path.join(ROOT, "tests/fuzz/corpus/fuzz_gguf")
    names = sorted(n for n in os.listdir(corpus) if n.startswith("regress-"))
    assert names
    for name in names:
        _expect_gguf_error(os.path.join(corpus, name), "")
