"""Writes the golden outputs of SmolLM2-135M-Instruct that tests/python/test_golden.py checks the product model against.

The reference is an implementation that shares no code with tools/dysco_export: Hugging Face `transformers`
loading the GGUF (dequantized to fp32 by the `gguf` package, llama.cpp's q/k row permutation undone by
transformers), eager attention, fp32. It needs transformers, which the CI venv (.venv) deliberately lacks, so it
runs from a separate venv that is never on the CI path:

    /usr/bin/python3 -m venv --system-site-packages .venv-golden      # torch 1.13 from Debian's python3-torch
    .venv-golden/bin/pip install transformers==4.46.3 accelerate==1.0.1 gguf==0.17.1 'jinja2>=3.1'
    .venv-golden/bin/python tools/make_golden.py               # GGUF from scripts/fetch-default-model.sh

Outputs (committed):
    tests/data/smollm2_golden.json         prompts, prompt ids, 48-token greedy continuations, per-step top-5
    tests/data/smollm2_golden_logits.npy   float32 [num_cases, vocab]: full logits of each prompt's last token

Known quirks of transformers 4.46's GGUF path that this script works around:
  * The GGUF has no output.weight (tied embeddings) but the converted config says tie_word_embeddings=false, so
    lm_head would be randomly initialised. We force tie_word_embeddings=True and assert lm_head is embed_tokens.
  * The tokenizer it builds from the GGUF prepends <|im_start|> on encode and reports eos=<|im_start|>, ignoring
    tokenizer.ggml.add_bos_token=false. We always encode with add_special_tokens=False (SmolLM2 has add_bos
    false), so only the text itself is tokenized; special tokens written in the text are still recognised.
Greedy decoding does not stop at <|im_end|>: every case has exactly num_new_tokens generated tokens, so what
follows an end-of-turn is checked too.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Varied on purpose: short factual answer, free prose, code (indentation, symbols), digits and lists, and a
# plain-text continuation without the chat template (no special tokens at all).
CASES = [
    {"name": "capital", "chat": True,
     "user": "What is the capital of France? Answer in one sentence."},
    {"name": "story", "chat": True,
     "user": "Write a very short story about a robot who learns to paint."},
    {"name": "code", "chat": True,
     "user": "Write a Python function that returns the n-th Fibonacci number."},
    {"name": "arithmetic", "chat": True,
     "user": "List three primary colors. Then compute 17 * 23 and show the steps."},
    {"name": "plain", "chat": False,
     "text": "In 1450, Johannes Gutenberg built a printing press with movable metal type in Mainz. "
             "Within fifty years,"},
]
NUM_NEW_TOKENS = 48
TOP_K_RECORDED = 5


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_gguf():
    out = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "fetch-default-model.sh")],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return os.path.join(REPO_ROOT, out.stdout.strip())


def load_reference(gguf_path, torch):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, config=config,
                                                 torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.float32
    return transformers, tokenizer, model


def prompt_of(case, tokenizer):
    """Returns (text, ids): the prompt as text and its token ids, no special tokens added by the encoder."""
    if case["chat"]:
        messages = [{"role": "user", "content": case["user"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = case["text"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text, ids


def greedy(model, prompt_ids, num_new_tokens, torch):
    """Prefill then token-by-token greedy decode with the HF KV cache; returns per-step records."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        prompt_logits = logits.numpy().copy()
        steps = []
        for _ in range(num_new_tokens):
            top = torch.topk(logits, TOP_K_RECORDED)
            next_id = int(top.indices[0])
            steps.append({
                "id": next_id,
                "top_ids": [int(i) for i in top.indices],
                "top_logits": [float(v) for v in top.values],
                "margin": float(top.values[0] - top.values[1]),
            })
            out = model(torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[0, -1].float()
    return prompt_logits, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="GGUF file (default: scripts/fetch-default-model.sh)")
    parser.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "tests", "data"))
    args = parser.parse_args()

    import torch
    import gguf

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gguf_path = args.gguf or default_gguf()
    transformers, tokenizer, model = load_reference(gguf_path, torch)

    cases_out = []
    all_logits = []
    for case in CASES:
        text, ids = prompt_of(case, tokenizer)
        prompt_logits, steps = greedy(model, ids, NUM_NEW_TOKENS, torch)
        all_logits.append(prompt_logits)
        greedy_ids = [s["id"] for s in steps]
        cases_out.append({
            "name": case["name"],
            "chat": case["chat"],
            "messages": [{"role": "user", "content": case["user"]}] if case["chat"] else None,
            "prompt_text": text,
            "prompt_ids": ids,
            "greedy_ids": greedy_ids,
            "greedy_margins": [s["margin"] for s in steps],
            "greedy_top_ids": [s["top_ids"] for s in steps],
            "greedy_top_logits": [s["top_logits"] for s in steps],
            "completion_text": tokenizer.decode(greedy_ids),
        })
        print(f"{case['name']}: {len(ids)} prompt tokens, min margin {min(s['margin'] for s in steps):.4g}\n"
              f"  {tokenizer.decode(greedy_ids)!r}", file=sys.stderr)

    logits = np.stack(all_logits).astype(np.float32)
    assert logits.shape == (len(CASES), model.config.vocab_size) and np.isfinite(logits).all()
    golden = {
        "format_version": 1,
        "generator": "tools/make_golden.py",
        "reference": {
            "implementation": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...)",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "dtype": "float32",
            "attn_implementation": "eager",
            "tie_word_embeddings_forced": True,
            "python": sys.version.split()[0],
        },
        "gguf": {"file": os.path.basename(gguf_path), "sha256": sha256_of(gguf_path),
                 "size": os.path.getsize(gguf_path)},
        "logits_file": "smollm2_golden_logits.npy",
        "vocab_size": model.config.vocab_size,
        "num_new_tokens": NUM_NEW_TOKENS,
        "cases": cases_out,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    np.save(os.path.join(args.out_dir, "smollm2_golden_logits.npy"), logits)
    with open(os.path.join(args.out_dir, "smollm2_golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out_dir}/smollm2_golden.json and smollm2_golden_logits.npy", file=sys.stderr)


def _dist_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
