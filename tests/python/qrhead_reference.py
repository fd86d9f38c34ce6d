"""An independent transcription of the retrieval-head detection (QRHead) of docs/dysco-reference-algorithm.md over the
eager model of dysco_reference.py, to check the engine's `dysco-detect-heads` against. No project code.

For each example (question, paragraphs, gold paragraph ids):
  prompt  = chat("Here are some paragraphs:" + SEP + "[1] title\\ntext" + SEP + ... + SEP +
                 "Please find information that are relevant to the following query in the paragraphs above."
                 + SEP + "Query: " + question)                         SEP = "\\n\\n", paragraphs numbered from 1
  query span = the tokens from the one holding the "P" of "Please find" to the end of the prompt (the chat
               template's closing and generation prompt included);
  paragraph d's span = the tokens from the one holding "[" of "[d] " to the one holding its last character;
  for every (layer, query head):
    S_q[j]    = mean over the query-span rows of softmax(q . K^T / sqrt(d)) (causal), key j
    S_null[j] = the same for the prompt whose question is "N/A" (the tokens before the query span are equal)
    C = S_q - S_null;   per paragraph: thr = mean(C_d) - 2 * std(C_d) (unbiased), score(d) = sum C_d[C_d > thr]
  head score = mean over examples of the sum of score(d) over the gold paragraphs; the 16 best heads are kept
  (ties: lower layer, then lower head first).
The character-to-token mapping follows the QRHead code: a character belongs to the last token whose offsets
cover it. Attention probabilities are fp32 (the eager model); the aggregation is fp64.

`chat` (user text -> prompt text) and `encode` (text -> (ids, per-token (start, end) character offsets)) are
given by the caller; `chatml` and `tokenizers_encoder` are ready-made ones.

Usage:
  python tests/python/qrhead_reference.py --checkpoint DIR --data FILE.jsonl [--tokenizer tokenizer.json]
      [--chat chatml|none] [--system TEXT] [--limit N] [--out scores.json]
It writes {"scores": [[per head] per layer], "best_heads": [[layer, head], ...]}.
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from dysco_reference import EagerModel  # noqa: E402

SEPARATOR = "\n\n"
INTRO = "Here are some paragraphs:"
INSTRUCTION = "Please find information that are relevant to the following query in the paragraphs above."
NULL_QUESTION = "N/A"

Encoder = Callable[[str], Tuple[List[int], List[Tuple[int, int]]]]


def chatml(system: Optional[str] = None) -> Callable[[str], str]:
    """ChatML with the generation prompt: [system turn] user turn, then "<|im_start|>assistant\\n"."""
    def apply(user: str) -> str:
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return apply


def tokenizers_encoder(tokenizer_json: str) -> Encoder:
    """An encoder from a Hugging Face tokenizer.json (special tokens written in the text are recognised; no
    bos is added)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)

    def encode(text: str):
        enc = tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    return encode


def build_user_text(question: str, paragraphs: Sequence[Dict[str, str]], first_index: int = 1
                    ) -> Tuple[str, List[Tuple[int, int]], int]:
    """(user text, character span [start, end) of each "[i] title\\ntext", start of "Please find")."""
    text = INTRO
    spans = []
    for i, p in enumerate(paragraphs):
        text += SEPARATOR
        content = f"[{i + first_index}] {p['title']}\n{p['text']}"
        spans.append((len(text), len(text) + len(content)))
        text += content
    text += SEPARATOR
    instruction_start = len(text)
    text += INSTRUCTION + SEPARATOR + "Query: " + question
    return text, spans, instruction_start


def char_to_token(offsets: Sequence[Tuple[int, int]]) -> Dict[int, int]:
    mapping = {}
    for i, (start, end) in enumerate(offsets):
        for c in range(start, end):
            mapping[c] = i
    return mapping


def build_prompt(question: str, paragraphs: Sequence[Dict[str, str]], chat: Callable[[str], str],
                 encode: Encoder, first_index: int = 1) -> Tuple[List[int], int, List[Tuple[int, int]]]:
    """(prompt ids, first token of the query span, inclusive token span [s, e] of each paragraph)."""
    user, spans, instruction_start = build_user_text(question, paragraphs, first_index)
    prompt = chat(user)
    shift = prompt.index(user)  # the chat template places the user text verbatim
    ids, offsets = encode(prompt)
    where = char_to_token(offsets)
    query_start = where[shift + instruction_start]
    token_spans = [(where[shift + s], where[shift + e - 1]) for s, e in spans]
    return ids, query_start, token_spans


def attention_to_keys(model: EagerModel, ids: Sequence[int], query_start: int) -> torch.Tensor:
    """fp64 [L, H, query_start]: the attention of the rows query_start.. of every head, averaged over the rows,
    on the keys before query_start."""
    heads = [(layer, head) for layer in range(model.num_layers) for head in range(model.num_heads)]
    model.reset()
    probs = model.forward(list(ids), probe_heads=heads, probe_from=query_start).probs  # [L*H, rows, n]
    model.reset()
    mean = probs.to(torch.float64).mean(dim=1)[:, :query_start]
    return mean.reshape(model.num_layers, model.num_heads, query_start)


def paragraph_scores(contrast: torch.Tensor, spans: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """contrast [..., keys] -> [..., num_paragraphs]: per paragraph, the sum of its entries above
    mean - 2 * std (unbiased)."""
    out = []
    for s, e in spans:
        c = contrast[..., s:e + 1]
        thr = c.mean(dim=-1, keepdim=True) - 2 * c.std(dim=-1, unbiased=True, keepdim=True)
        out.append((c * (c > thr)).sum(dim=-1))
    return torch.stack(out, dim=-1)


def example_scores(model: EagerModel, example: dict, chat: Callable[[str], str], encode: Encoder,
                   first_index: int = 1) -> torch.Tensor:
    """fp64 [L, H]: the summed score of the gold paragraphs of one example."""
    ids_q, start_q, spans = build_prompt(example["question"], example["paragraphs"], chat, encode, first_index)
    ids_n, start_n, spans_n = build_prompt(NULL_QUESTION, example["paragraphs"], chat, encode, first_index)
    if start_q != start_n or spans != spans_n or ids_q[:start_q] != ids_n[:start_n]:
        raise ValueError("the prompts with the question and with N/A differ before the query span")
    contrast = attention_to_keys(model, ids_q, start_q) - attention_to_keys(model, ids_n, start_n)
    scores = paragraph_scores(contrast, spans)
    return scores[..., list(example["gold_ids"])].sum(dim=-1)


def head_scores(model: EagerModel, examples: Sequence[dict], chat: Callable[[str], str], encode: Encoder,
                first_index: int = 1) -> torch.Tensor:
    """fp64 [L, H]: the QRHead score of every (layer, query head), the mean over the examples."""
    total = torch.zeros(model.num_layers, model.num_heads, dtype=torch.float64)
    for example in examples:
        total += example_scores(model, example, chat, encode, first_index)
    return total / len(examples)


def best_heads(scores: torch.Tensor, count: int = 16) -> List[Tuple[int, int]]:
    """The `count` best (layer, head) pairs, best first; equal scores keep (layer, head) order."""
    layers, heads = scores.shape
    pairs = [(layer, head) for layer in range(layers) for head in range(heads)]
    return sorted(pairs, key=lambda lh: -float(scores[lh[0], lh[1]]))[:count]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="detection examples (JSON lines)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--chat", default="chatml", choices=["chatml", "none"])
    p.add_argument("--system", default=None, help="system message of the ChatML prompt")
    p.add_argument("--limit", type=int, default=0, help="use only the first N examples")
    p.add_argument("--count", type=int, default=16, help="number of best heads to report")
    p.add_argument("--out", default="", help="write the scores here (default: stdout)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.data, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    if args.limit:
        examples = examples[:args.limit]
    model = EagerModel(args.checkpoint)
    encode = tokenizers_encoder(args.tokenizer or os.path.join(args.checkpoint, "tokenizer.json"))
    chat = chatml(args.system) if args.chat == "chatml" else (lambda user: user)
    scores = head_scores(model, examples, chat, encode)
    result = {"scores": scores.tolist(), "best_heads": [list(h) for h in best_heads(scores, args.count)]}
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
