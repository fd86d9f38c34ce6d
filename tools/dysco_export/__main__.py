"""Command line: writes model packages (docs/model-interface.md) from a GGUF file, a Hugging Face checkpoint
or a tiny random model.

  python -m tools.dysco_export gguf --gguf FILE --out DIR --kernels SO [--skip-if-current] [--dtype D]
  python -m tools.dysco_export hf --checkpoint DIR --out DIR --kernels SO [--dtype D]
  python -m tools.dysco_export tiny --family llama|qwen3 --seed N --out DIR --kernels SO [--hf-out DIR]
                                    [--rope-scaling none|llama3|yarn] [--tokenizer FILE]
  python -m tools.dysco_export synthetic --shape qwen3-8b|llama3.1-8b --seed N --out DIR --kernels SO
                                    [--dtype D] [--max-position-embeddings N] [--override KEY=VALUE ...]
                                    [--device cpu|cuda] [--threads N]

Problems with the input exit with code 2 and one line on stderr naming the file. torch is imported only when
an export actually runs, so that `--skip-if-current` on an up-to-date package returns at once.
"""
import argparse
import os
import sys
import tempfile
import time

from .errors import ExportError

# The tiny models' retrieval heads: arbitrary, so that DySCO's code paths can run on them.
TINY_SELECTED_HEADS = [[1, 0], [2, 3]]


def _export(out_dir: str, kernels: str, arch: dict, weights, tokenizer: dict, special: dict,
            chat_template: str, source: dict, dysco_override=None) -> None:
    from . import package
    from .model import build_model, check_weights

    chat = package.chat_settings(chat_template, arch["architecture"])
    dysco = package.reference_dysco(arch) or package.dysco_defaults(
        chat["chat_format"], arch["architecture"], tokenizer, special["bos_token_id"])
    if dysco_override:
        dysco.update(dysco_override)
    check_weights(arch, weights, source.get("path", "model"))
    model = build_model(arch, source.get("path", "model"), weights.get("rope_freq_factors"))
    config = package.assemble_config(arch["model_name"], arch, special, chat, dysco, source)
    package.write_package(out_dir, config, model, tokenizer, package.weight_specs(arch, weights))


def cmd_gguf(args) -> int:
    from . import package
    if not os.path.isfile(args.gguf):
        raise ExportError(f"{args.gguf}: no such file")
    if args.skip_if_current and package.package_is_current(args.out, args.gguf, args.dtype):
        print(f"dysco_export: {args.out} is current", file=sys.stderr)
        return 0
    from .gguf_source import read_gguf
    from .model import load_kernels
    start = time.time()
    load_kernels(args.kernels)
    os.makedirs(args.out, exist_ok=True)
    digest = package.cached_sha256(args.gguf, args.out)
    arch, weights, tokenizer, special, template = read_gguf(args.gguf, args.dtype)
    _export(args.out, args.kernels, arch, weights, tokenizer, special, template,
            {"kind": "gguf", "path": args.gguf, "sha256": digest})
    print(f"dysco_export: wrote {args.out} in {time.time() - start:.1f} s", file=sys.stderr)
    return 0


def _export_hf(checkpoint: str, out: str, kernels: str, dtype: str, dysco_override=None, name="") -> None:
    from .hf_source import checkpoint_digest, read_hf
    from .model import load_kernels
    load_kernels(kernels)
    arch, weights, tokenizer, special, template = read_hf(checkpoint, dtype)
    if name:
        arch["model_name"] = name
    _export(out, kernels, arch, weights, tokenizer, special, template,
            {"kind": "hf", "path": checkpoint, "sha256": checkpoint_digest(checkpoint)}, dysco_override)


def cmd_hf(args) -> int:
    start = time.time()
    _export_hf(args.checkpoint, args.out, args.kernels, args.dtype)
    print(f"dysco_export: wrote {args.out} in {time.time() - start:.1f} s", file=sys.stderr)
    return 0


def cmd_tiny(args) -> int:
    from .tiny import write_tiny_checkpoint
    override = {"selected_heads": TINY_SELECTED_HEADS}
    name = f"tiny-{args.family}" + ("" if args.rope_scaling == "none" else f"-{args.rope_scaling}")
    if args.hf_out:
        write_tiny_checkpoint(args.family, args.seed, args.hf_out, args.tokenizer, args.rope_scaling)
        _export_hf(args.hf_out, args.out, args.kernels, args.dtype, override, name)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_checkpoint(args.family, args.seed, tmp, args.tokenizer, args.rope_scaling)
            _export_hf(tmp, args.out, args.kernels, args.dtype, override, name)
    return 0


def cmd_synthetic(args) -> int:
    from .synthetic import export_synthetic
    export_synthetic(args)
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.dysco_export", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="model package directory to write")
        sp.add_argument("--kernels", required=True, help="path of libdysco_kernels.so (the op library)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weights and the KV cache")

    g = sub.add_parser("gguf", help="export a llama.cpp GGUF file")
    g.add_argument("--gguf", required=True)
    g.add_argument("--skip-if-current", action="store_true",
                   help="do nothing when --out was exported from the same file by this exporter version")
    common(g)
    h = sub.add_parser("hf", help="export a Hugging Face Llama-3.x / Qwen3 checkpoint directory")
    h.add_argument("--checkpoint", required=True)
    common(h)
    t = sub.add_parser("tiny", help="export a tiny random model (tests)")
    t.add_argument("--family", required=True, choices=["llama", "qwen3"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hf-out", default="", help="also keep the tiny model's Hugging Face checkpoint here")
    t.add_argument("--rope-scaling", default="none", choices=["none", "llama3", "yarn"])
    t.add_argument("--tokenizer", default="", help="tokenizer.json (default: tests/data/<smollm2|qwen3>/)")
    common(t)
    from .synthetic import DEFAULT_MAX_POSITIONS, SHAPES
    s = sub.add_parser("synthetic", help="export a real model shape with seeded random weights (benchmarks)")
    s.add_argument("--shape", required=True, choices=sorted(SHAPES))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-position-embeddings", type=int, default=DEFAULT_MAX_POSITIONS,
                   help="context length (rope scaling: llama3.1 always its llama3 scaling, qwen3 YaRN x4 "
                        "past 32768)")
    s.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change an architecture field (num_layers=2, hidden_size=64, ...): smaller test models")
    s.add_argument("--device", default="cpu", help="where the random numbers are drawn (cpu | cuda: another "
                                                   "stream, other weights)")
    s.add_argument("--threads", type=int, default=0, help="generator threads (default: all cores)")
    common(s)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"gguf": cmd_gguf, "hf": cmd_hf, "tiny": cmd_tiny, "synthetic": cmd_synthetic}[args.command](args)
    except ExportError as e:
        print(f"dysco_export: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except MemoryError:
        print("dysco_export: error: out of memory", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
