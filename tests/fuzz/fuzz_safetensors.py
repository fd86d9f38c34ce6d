"""Atheris target: tools/dysco_export/safetensors_io.read_safetensors on arbitrary bytes (seeds in
tests/fuzz/corpus/fuzz_safetensors/, written by make_corpus.py). Run by scripts/run-fuzz.sh:

    .venv/bin/python tests/fuzz/fuzz_safetensors.py [libFuzzer flags] CORPUS_DIR

A damaged file must raise ExportError naming it (pyfuzz.py); an accepted file's tensors must have the dtypes of
the format and lie inside the file.

Byte mutations seldom keep the JSON header parseable, so half of the mutations are structure-aware (mutate()):
the header is decoded, one of its values is replaced (wrong types, negative and huge numbers, deep nesting,
entries added or removed), and the file is written back with a correct header length.
"""
import json
import random
import struct

import pyfuzz

import atheris
import numpy  # noqa: F401  (imported before instrumentation: not ours)
import torch

with pyfuzz.instrumented():
    from tools.dysco_export.errors import ExportError
    from tools.dysco_export.safetensors_io import read_safetensors

PATH = pyfuzz.scratch_path("model.safetensors")
_DTYPES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1}  # U8: package padding


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        tensors = read_safetensors(PATH)
    except ExportError as e:
        pyfuzz.check_export_error(e, PATH)
        return
    total = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise AssertionError(f"tensor {name!r} has dtype {t.dtype}")
        total += t.numel() * _DTYPES[t.dtype]
    if total > len(data):
        raise AssertionError(f"tensors hold {total} bytes, the file has {len(data)}")


_NESTED = "\x00nested\x00"  # replaced by deeply nested JSON after dumping


def _random_value(rng):
    pool = [-1, 0, 1, 2, 3, 4, 8, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, -2**63, 1.5, 4.0, float("nan"),
            "F32", "F16", "BF16", "U8", "I64", "", "4", None, True, False, [], [0], [0, 4], [4, 0], [0, 4, 8], [-1, 3],
            [2**32, 2**32], [[1]], {}, {"dtype": "F32"}, _NESTED]
    return rng.choice(pool)


def _mutate_header(header, rng):
    tensors = [k for k, v in header.items() if isinstance(v, dict)]
    action = rng.randrange(5)
    if action == 0 or not tensors:  # a new entry, partly random
        header[f"t{rng.randrange(100)}"] = {"dtype": rng.choice(["F32", "F16", "BF16", _random_value(rng)]),
                                            "shape": rng.choice([[2], [1, 2], [], _random_value(rng)]),
                                            "data_offsets": rng.choice([[0, 8], [0, 4], _random_value(rng)])}
    elif action == 1:  # an entry removed
        del header[rng.choice(tensors)]
    elif action == 2:  # an entry replaced by anything
        header[rng.choice(tensors)] = _random_value(rng)
    else:  # one field of an entry, or one element of its shape / offsets
        entry = header[rng.choice(tensors)]
        key = rng.choice(["dtype", "shape", "data_offsets"])
        value = entry.get(key)
        if isinstance(value, list) and value and rng.random() < 0.6:
            i = rng.randrange(len(value))
            value[i] = rng.choice([_random_value(rng), value[i] + 1 if isinstance(value[i], int) else 0])
        else:
            entry[key] = _random_value(rng)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5 or len(data) < 8:
        return atheris.Mutate(data, max_size)
    (n,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError):
        return atheris.Mutate(data, max_size)
    if not isinstance(header, dict):
        return atheris.Mutate(data, max_size)
    rest = data[8 + n:]
    _mutate_header(header, rng)
    depth = rng.choice([10, 1000, 100000])
    raw = json.dumps(header).replace(json.dumps(_NESTED), "[" * depth + "]" * depth).encode()
    if rng.random() < 0.2:  # the data too short or too long
        rest = rest[:rng.randrange(len(rest) + 1)] if rng.random() < 0.5 else rest + bytes(rng.randrange(64))
    out = struct.pack("<Q", len(raw)) + raw + rest
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


if __name__ == "__main__":
    pyfuzz.run(test_one_input, custom_mutator=mutate)
