"""Atheris target: tools/dysco_export/gguf_source.read_gguf (open_gguf, the metadata, tensor dequantization, the
tokenizer conversion), then model.check_weights (the weights against the config, what the exporter checks before
it builds the model), on arbitrary bytes (seeds in tests/fuzz/corpus/fuzz_gguf/: tiny llama and qwen3 models,
F32 and Q8_0, written by make_corpus.py with gguf.GGUFWriter). Run by scripts/run-fuzz.sh:

    .venv/bin/python tests/fuzz/fuzz_gguf.py [libFuzzer flags] CORPUS_DIR

A damaged file must raise ExportError naming it (pyfuzz.py). An accepted file's config must be one that core's
config parser accepts (positive sizes, heads that divide, special token ids inside the vocabulary), so that the
exporter never writes a package the server refuses.
"""
import pyfuzz

import numpy  # noqa: F401  (imported before instrumentation: not ours)
import torch  # noqa: F401

with pyfuzz.instrumented():
    import gguf  # noqa: F401  (GGUFReader: its loops over counts from the file matter)
    import tools.dysco_export.tokenizer_from_gguf  # noqa: F401  (read_gguf imports it lazily)
    from tools.dysco_export.errors import ExportError
    from tools.dysco_export.gguf_source import read_gguf
    from tools.dysco_export.model import check_weights

PATH = pyfuzz.scratch_path("model.gguf")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        config, weights, tokenizer, special, template = read_gguf(PATH, "float32")
        check_weights(config, weights, PATH)
    except ExportError as e:
        pyfuzz.check_export_error(e, PATH)
        return
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_kv_heads",
             "head_dim", "max_position_embeddings")
    if not all(isinstance(config[k], int) and 1 <= config[k] < 2**31 for k in sizes):
        raise AssertionError(f"accepted config with sizes {[config[k] for k in sizes]}")
    if config["num_attention_heads"] % config["num_kv_heads"] != 0:
        raise AssertionError(f"accepted config with kv heads that do not divide: {config}")
    if not (config["rms_norm_eps"] > 0 and config["rope_theta"] > 0):
        raise AssertionError(f"accepted config with eps / theta {config['rms_norm_eps']} {config['rope_theta']}")
    ids = [special["bos_token_id"], special["pad_token_id"]] + special["eos_token_ids"]
    if not special["eos_token_ids"] or not all(i is None or 0 <= i < config["vocab_size"] for i in ids):
        raise AssertionError(f"accepted special tokens {special} for a vocabulary of {config['vocab_size']}")
    if not isinstance(template, str) or not isinstance(tokenizer["model"]["vocab"], dict):
        raise AssertionError("accepted a chat template or tokenizer of the wrong type")


if __name__ == "__main__":
    pyfuzz.run(test_one_input)
