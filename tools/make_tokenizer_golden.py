"""Writes golden tokenizer data for tests/cpp/test_tokenizer.cpp: varied strings (fixed seed) and the ids the
Hugging Face `tokenizers` library gives for them.

  .venv/bin/python tools/make_tokenizer_golden.py NAME=path/to/tokenizer.json [NAME=...] [--out-dir tests/data]

writes OUT_DIR/tokenizer_golden_NAME.jsonl, one {"text", "ids", "decoded"[, "ids_no_special"]} per line:
  ids             encode(text, add_special_tokens=False) with special tokens parsed (the default)
  decoded         decode(ids, skip_special_tokens=False): text after the normalizer (== text without one)
  ids_no_special  the same with special tokens encoded as plain text (only for texts containing '<')
With --features it also writes a small synthetic tokenizer (tokenizer_features.json) covering options the
real tokenizers do not use, and its golden file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import unicodedata

from tokenizers import Tokenizer

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

SEED = 20240611
WORDS = ("the of and to in is was that for on with as by at from his her it an are were be this which or "
         "have had not but they you one all their there been has more when will would who so no what can if "
         "about into than them only other time some could these two may first then do any like my now over "
         "such our man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another know while last "
         "might us great old year off come since against go came right used take three tokenizer inference "
         "attention transformer gradient server latency throughput kernel cache page decoding").split()
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
EMOJI = ["😀", "😂", "🥲", "🤖", "🚀", "🔥", "✨", "❤️", "👍", "👍🏽", "👋🏿", "🧑🏻‍💻", "👨‍👩‍👧‍👦", "👩‍❤️‍👨",
         "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "#️⃣", "🫠", "🐍", "🦀", "☕", "⚡", "🧪", "👁️‍🗨️", "🤷🏼‍♀️", "🙇‍♂️"]
CJK = ["我们今天去公园散步。", "机器学习模型的推理速度很重要", "東京は日本の首都です。", "ひらがなとカタカナ", "カタカナ",
       "한국어 텍스트 처리", "안녕하세요, 세계!", "中文，标点符号：“引号”。", "漢字仮名交じり文", "繁體中文測試"]
SCRIPTS = ["مرحبا بالعالم", "اللغة العربية جميلة ١٢٣", "שלום עולם", "नमस्ते दुनिया", "हिन्दी में लिखा गया वाक्य",
           "สวัสดีชาวโลก", "Привет, мир! Ёжик", "Γειά σου Κόσμε", "Ελληνικά ΣΊΣΥΦΟΣ", "Ողջույն", "გამარჯობა",
           "ሰላም ዓለም", "தமிழ் எழுத்து", "বাংলা ভাষা", "Tiếng Việt có dấu: Đà Nẵng, phở, nghiêng"]
ACCENTED = ["café", "naïve", "résumé", "Ångström", "Ærøskøbing", "São Paulo", "Zürich", "crème brûlée", "piñata",
            "façade", "Øresund", "Łódź", "Dvořák", "İstanbul", "ﬁnancial ﬂow", "Ǆ ǅ ǆ"]
COMBINING = ["\u0301", "\u0300", "\u0308", "\u0327", "\u0323", "\u0302", "\u030c", "\u0331", "\u0328", "\u0338",
             "\u0345", "\u05b4", "\u093c", "\u0e48", "\u302a", "\u20dd"]
CODE = [
    "def {f}({a}, {b}=None):\n    \"\"\"Docstring.\"\"\"\n    if {a} is None:\n        return {b}\n    return [{a}[i] * 2 for i in range(len({a}))]\n",
    "int {f}(const std::vector<int>& {a}) {{\n  int {b} = 0;\n  for (int x : {a}) {b} += x * 0x1F;\n  return {b}; // sum\n}}\n",
    "fn {f}({a}: &str) -> Result<u32, String> {{\n\tlet {b} = {a}.parse::<u32>().map_err(|e| e.to_string())?;\n\tOk({b} + 1)\n}}\n",
    "const {f} = async ({a}) => {{\n  const {b} = await fetch(`/api/${{{a}}}`);\n  return {b}.json();\n}};\n",
    "func {f}({a} []string) map[string]int {{\n\t{b} := make(map[string]int)\n\tfor _, s := range {a} {{ {b}[s]++ }}\n\treturn {b}\n}}\n",
    "SELECT {a}, COUNT(*) AS {b} FROM {f} WHERE {a} <> '' GROUP BY {a} ORDER BY {b} DESC LIMIT 10;",
    "<div class=\"{f}\" id='{a}'>\n  <p>{b} &amp; more</p>\n</div>\n",
    "#!/bin/bash\nfor {a} in $(ls *.txt); do\n  echo \"${{{a}}}\" | grep -E '^[0-9]+$' >> {b}.log\ndone\n",
    "{{\"{a}\": [1, 2.5, -3e10, null], \"{b}\": {{\"{f}\": true}}}}",
    "    {a} += 1;\r\n    {b}--;\r\n\treturn {f}({a}, {b});\r\n",
]


def assigned(cp: int) -> bool:
    return unicodedata.category(chr(cp)) not in ("Cn", "Cs")


class Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def word(self) -> str:
        w = self.r.choice(WORDS)
        x = self.r.random()
        if x < 0.1:
            return w.capitalize()
        if x < 0.13:
            return w.upper()
        return w

    def prose(self) -> str:
        out = []
        for _ in range(self.r.randint(3, 25)):
            out.append(self.word())
            if self.r.random() < 0.15:
                out[-1] += self.r.choice([",", ".", ";", ":", "!", "?", "...", " -", "'s", "'S", "n't", "'ll"])
        s = " ".join(out)
        return s[0].upper() + s[1:] + self.r.choice([".", "!", "?", "", "\n"])

    def code(self) -> str:
        names = ["x", "data", "buf", "self_", "n_items", "kv_cache", "tokenIds", "ABC", "foo_bar", "i"]
        return self.r.choice(CODE).format(f=self.r.choice(names) + "_fn", a=self.r.choice(names),
                                          b=self.r.choice(names) + "2")

    def whitespace(self) -> str:
        pieces = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", "\u00a0", "\u3000",
                  "\u2003", "\u2028", "\x0b", "\x0c", "\u200b", "\ufeff"]
        out = []
        for _ in range(self.r.randint(1, 12)):
            out.append(self.r.choice(pieces) if self.r.random() < 0.6 else self.word())
        return "".join(out)

    def number(self) -> str:
        forms = [
            lambda: str(self.r.randint(0, 10 ** self.r.randint(1, 12))),
            lambda: f"{self.r.uniform(-1e4, 1e4):.{self.r.randint(0, 6)}f}",
            lambda: f"{self.r.randint(1900, 2099)}-{self.r.randint(1, 12):02d}-{self.r.randint(1, 28):02d}",
            lambda: f"+1 ({self.r.randint(200, 999)}) {self.r.randint(100, 999)}-{self.r.randint(1000, 9999)}",
            lambda: "".join(self.r.choice("0123456789") for _ in range(self.r.randint(5, 60))),
            lambda: f"{self.r.randint(1, 999):,}".replace(",", self.r.choice([",", " ", "."])) + "k",
            lambda: "".join(self.r.choice("٠١٢٣٤٥٦٧٨٩") for _ in range(self.r.randint(1, 8))),
            lambda: "".join(self.r.choice("０１２３４５６７８９") for _ in range(self.r.randint(1, 8))),
            lambda: self.r.choice(["x²+y²=z²", "½ + ¼ = ¾", "Ⅻ o'clock", "①②③", "H₂O", "10⁻³", "४२", "๓๔"]),
            lambda: f"v{self.r.randint(0, 9)}.{self.r.randint(0, 99)}.{self.r.randint(0, 999)}",
            lambda: f"0x{self.r.getrandbits(32):08X}",
        ]
        return self.r.choice(forms)()

    def emoji(self) -> str:
        return "".join(self.r.choice(EMOJI) + self.r.choice(["", " ", "", self.word()])
                       for _ in range(self.r.randint(1, 6)))

    def nfd_accents(self) -> str:
        s = " ".join(self.r.choice(ACCENTED) for _ in range(self.r.randint(1, 5)))
        return unicodedata.normalize(self.r.choice(["NFC", "NFD", "NFKD"]), s)

    def combining(self) -> str:
        out = []
        for _ in range(self.r.randint(1, 8)):
            out.append(self.r.choice("aeiouAEIOUnyzcsg>=<ᄀ가각ᅡ"))
            for _ in range(self.r.randint(0, 4)):
                out.append(self.r.choice(COMBINING))
            if self.r.random() < 0.3:
                out.append(" ")
        return "".join(out)

    def contractions(self) -> str:
        base = ["it's", "I'LL", "we'Re", "they've", "I'M", "she'd", "don't", "'s", "'S", "it’s", "''s",
                "'ſ", "' s", "'ll'll", "O'Neil", "rock 'n' roll", "'tis", "'T", "'Ve", "y'all'd", "'re'"]
        return " ".join(self.r.choice(base) if self.r.random() < 0.6 else self.word()
                        for _ in range(self.r.randint(2, 10)))

    def specials(self) -> str:
        parts = SPECIALS + ["<|im_sta", "|>", "<|", "<|im_start|><|im_end|>", "< |im_end|>", "<|IM_END|>",
                            "user\n", "assistant\n", " ", "\n"]
        out = []
        for _ in range(self.r.randint(2, 10)):
            out.append(self.r.choice(parts) if self.r.random() < 0.5 else self.prose())
        return "".join(out)

    def random_unicode(self) -> str:
        out = []
        for _ in range(self.r.randint(1, 40)):
            x = self.r.random()
            if x < 0.3:
                cp = self.r.randint(0x20, 0x7E)
            elif x < 0.55:
                cp = self.r.randint(0x80, 0x2FFF)
            elif x < 0.8:
                cp = self.r.randint(0x3000, 0xFFFD)
            else:
                cp = self.r.randint(0x10000, 0x1FBFF)
            if assigned(cp):
                out.append(chr(cp))
        return "".join(out)

    def random_bytes_text(self) -> str:
        raw = bytes(self.r.getrandbits(8) for _ in range(self.r.randint(1, 60)))
        return raw.decode("utf-8", errors="replace")

    def long_word(self) -> str:
        forms = [
            lambda: self.r.choice("abcxyz") * self.r.randint(100, 1500),
            lambda: "".join(self.r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.r.randint(50, 600))),
            lambda: "https://example.com/" + "/".join(self.word() for _ in range(10)) + "?q=" + self.number(),
            lambda: "".join(self.r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                            for _ in range(self.r.randint(40, 400))) + "==",
            lambda: self.r.choice("!-=*#~_.") * self.r.randint(20, 300),
            lambda: "Pneumonoultramicroscopicsilicovolcanoconiosis" * self.r.randint(1, 5),
            lambda: self.r.choice(CJK) * self.r.randint(5, 30),
        ]
        return self.r.choice(forms)()

    def tricky(self) -> str:
        """Dense mixes of the characters where regex, normalization and Unicode-version details matter."""
        alphabet = [" ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u2028", "\u3000", "\x0b", "\x85", "\x1c",
                    "\u200b", "'", "s", "S", "\u017f", "l", "L", "r", "R", "e", "E", "v", "m", "M", "d", "D", "t",
                    "T", "1", "9", "\u0663", "\u00b2", "\u216b", "a", "\u00e9", "\u0301", "\u0323", "\u0307",
                    "\u1ac5", "\u0338", ">", "!", ".", "?", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
                    "\U0001F600", "\U0001F3FD", "\u200d", "\u212a", "\u212b", "\u4e2d", "\u1100", "\u1161",
                    "\u11a8", "\uac00", "\u0915", "\u093c", "\u0958", "x", "_", "-", "\u2126", "\U00011F57"]
        out = []
        for _ in range(self.r.randint(1, 30)):
            if self.r.random() < 0.1:
                cp = self.r.randint(0, 0x10FFFF)
                if not 0xD800 <= cp <= 0xDFFF:
                    out.append(chr(cp))
            else:
                out.append(self.r.choice(alphabet))
        return "".join(out)

    def mixed(self) -> str:
        makers = [self.prose, self.code, self.whitespace, self.number, self.emoji, self.nfd_accents,
                  self.combining, self.contractions, lambda: self.r.choice(CJK), lambda: self.r.choice(SCRIPTS),
                  self.random_unicode]
        sep = self.r.choice(["", " ", "\n", "  ", "\t"])
        return sep.join(self.r.choice(makers)() for _ in range(self.r.randint(2, 5)))


def hand_written() -> list[str]:
    return [
        "", " ", "  ", "\n", "\r\n", "\t", "a", "Hello world", "Hello world 12345 <|im_start|>user\n",
        "<|im_start|>user\nHi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "trailing spaces   ", "   leading spaces", "tabs\tand\ttabs\t\t", "line\nbreaks\n\n\nand\r\nCRLF\r\n",
        "don't I'LL we'Re it's 's", "'ſ 'K 'ß", "1234567890", "3.14159 2.71828", "x = 1_000_000", "👨‍👩‍👧‍👦👍🏽🇫🇷",
        "日本語のテキスト", "한국어", "नमस्ते", "مرحبا", "é" + "e\u0301" + "\u00e9\u0301", "\u1100\u1161\u11a8",
        "a\u0323\u0307 a\u0307\u0323 q\u0307\u0323", "\u0301 leading combining mark", ">\u0338 <|im_end|>\u0338",
        "\x00\x01\x1f\x7f", "a\U00011F57b 1\U0001D2C0 x\U0001CCF0y 7\u1ac5\u0323", "\u00a0\u00a0x\u3000y\u2003z", "\u200bzero\u200bwidth\ufeff", "ﬁ ﬂ ﬃ", "Ⅻ ② ¾ ²",
    ]


def features_tokenizer_json() -> dict:
    """A small tokenizer exercising what SmolLM2/Qwen3 do not: byte fallback, fused unk, ignore_merges,
    added tokens with lstrip/rstrip/single_word/normalized, a String Split with MergedWithNext, contiguous
    Digits. Characters are not byte-level mapped (no ByteLevel pre-tokenizer), the decoder is ByteLevel."""
    chars = [chr(c) for c in range(0x20, 0x7F)]
    vocab = {"<unk>": 0}
    for c in chars:
        vocab[c] = len(vocab)
    for b in range(256):
        if not 0xF0 <= b <= 0xF4:  # 4-byte characters fall back to <unk>, fused
            vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [("t", "h"), ("th", "e"), ("i", "n"), ("in", "g"), ("e", "r"), (" ", "t"), ("h", "e"), (" t", "he"),
              ("a", "n"), ("an", "d"), ("1", "2")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["xyz"] = len(vocab)  # reachable only through ignore_merges
    added = [
        {"content": "[MASK]", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False,
         "special": True},
        {"content": "<sep>", "single_word": False, "lstrip": False, "rstrip": True, "normalized": False,
         "special": False},
        {"content": "word", "single_word": True, "lstrip": False, "rstrip": False, "normalized": True,
         "special": False},
        {"content": "\u2126mega", "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
         "special": False},
        {"content": "<|im_start|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True},
    ]
    for t in added:
        t["id"] = len(vocab) + added.index(t)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": "--"}, "behavior": "MergedWithNext", "invert": False},
            {"type": "Digits", "individual_digits": False},
            {"type": "Split", "pattern": {"Regex": _GPT2_REGEX}, "behavior": "Isolated", "invert": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": True,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def features_texts() -> list[str]:
    return [
        "the thing and xyz", "xyz xyzxyz", "caf\u00e9 na\u00efve \u65e5\u672c", "emoji \U0001F600\U0001F680 fused",
        "a [MASK] b", "a   [MASK]b", "[MASK][MASK]", "x <sep>   y", "<sep>\n\nz", "word words sword word",
        "(word) word!", "a\u00e9word", "\u2126mega \u03a9mega", "<|im_start|>the", "12 123 1234 x1y22",
        "a--b--c ---- d", "\t\n  \r\n", "", "  [MASK]  <sep>  word  ",
    ]


def make_texts(n: int) -> list[str]:
    g = Gen(SEED)
    makers = [g.prose, g.code, g.whitespace, g.number, g.emoji, g.nfd_accents, g.combining, g.contractions,
              g.specials, g.random_unicode, g.random_bytes_text, g.long_word, g.tricky, g.tricky, g.mixed, g.mixed,
              g.mixed]
    texts = hand_written()
    while len(texts) < n:
        texts.append(g.r.choice(makers)())
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizers", nargs="+", help="NAME=path/to/tokenizer.json")
    ap.add_argument("--out-dir", default="tests/data")
    ap.add_argument("--count", type=int, default=2200)
    ap.add_argument("--features", action="store_true",
                    help="also write OUT_DIR/tokenizer_features.json and its golden file")
    args = ap.parse_args()
    texts = make_texts(args.count)
    specs = [(spec.split("=", 1)[0], spec.split("=", 1)[1], texts) for spec in args.tokenizers]
    if args.features:
        path = os.path.join(args.out_dir, "tokenizer_features.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(features_tokenizer_json(), f, ensure_ascii=False, indent=1)
        specs.append(("features", path, features_texts() + texts[:400]))
    for name, path, texts in specs:
        tok = Tokenizer.from_file(path)
        plain = Tokenizer.from_file(path)
        plain.encode_special_tokens = True
        out_path = os.path.join(args.out_dir, f"tokenizer_golden_{name}.jsonl")
        with open(out_path, "w", encoding="utf-8") as f:
            for text in texts:
                ids = tok.encode(text, add_special_tokens=False).ids
                rec = {"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)}
                if "<" in text:
                    rec["ids_no_special"] = plain.encode(text, add_special_tokens=False).ids
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{out_path}: {len(texts)} texts")


if __name__ == "__main__":
    main()
