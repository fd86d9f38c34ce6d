"""Generates core/text/unicode_tables.cpp: the Unicode data the C++ tokenizer needs, from Python's unicodedata.

Tables (compact code point ranges unless noted):
  - Letter (\\p{L}), Number (\\p{N}), Rust char::is_numeric (for Digits), White_Space (regex \\s), Word (Rust regex \\w, for single_word tokens)
  - canonical combining classes (ranges with one class each)
  - full canonical decompositions (Hangul syllables excluded: they are algorithmic)
  - primary compositions (pairs -> composite, composition exclusions removed), for NFC

Python 3.11's unicodedata is Unicode 14.0, the version of the Oniguruma regex library that `tokenizers`
runs its pre-tokenizer regexes with. Its normalizers, however, come from the unicode-normalization-alignments
crate, whose data is Unicode 9.0: the normalization tables therefore only cover characters assigned in
Unicode 9.0 (newer ones have class 0 and no decomposition there). Normalization stability makes the 14.0
properties of those characters the 9.0 ones. The Unicode 9.0 repertoire comes from perl's Unicode database
(`\p{Present_In=9.0}`, Debian package perl-modules). Run from the repo root:
  .venv/bin/python tools/gen_unicode_tables.py > core/text/unicode_tables.cpp
"""

import subprocess
import sys
import unicodedata

NORMALIZATION_UNICODE_VERSION = "9.0"

MAX_CP = 0x110000
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3

# White_Space (PropList.txt); stable since Unicode 6.3. Same set as Oniguruma's Unicode \s and Rust's \s.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
# Numbers added in Unicode 15.0 (Kawi, Kaktovik, Nag Mundari digits). The Digits pre-tokenizer uses Rust's
# char::is_numeric, whose Unicode version in the `tokenizers` 0.20 wheels is 15.x (16.0 digits are not
# numeric there; checked against the library), one newer than the regexes' Unicode 14.
RUST_NUMERIC_EXTRA = [(0x11F50, 0x11F59), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9)]
# Parts of Rust's \w that general categories do not give: Join_Control and the So letters that are
# Other_Alphabetic (circled / squared / negative squared Latin letters).
EXTRA_WORD = [(0x200C, 0x200D), (0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189)]


def present_in(version):
    """Code points assigned in the given Unicode version, as a set (from perl's Unicode database)."""
    script = ('my $s = -1; for my $c (0..0x110000) { my $in = ($c < 0x110000 && !($c >= 0xD800 && $c <= 0xDFFF)'
              f' && chr($c) =~ /\\p{{Present_In={version}}}/) ? 1 : 0;'
              ' if ($in && $s < 0) { $s = $c } elsif (!$in && $s >= 0) { printf "%X %X\\n", $s, $c - 1; $s = -1 } }')
    out = subprocess.run(["perl", "-e", script], check=True, capture_output=True, text=True).stdout
    cps = set()
    for row in out.strip().split("\n"):
        a, b = (int(x, 16) for x in row.split())
        cps.update(range(a, b + 1))
    assert 0x0301 in cps and 0x1AC5 not in cps, "unexpected perl Unicode data"
    return cps


def ranges_of(pred):
    out = []
    start = None
    for cp in range(MAX_CP + 1):
        inside = cp < MAX_CP and pred(cp)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            out.append((start, cp - 1))
            start = None
    return out


def merge_ranges(rs):
    rs = sorted(rs)
    out = []
    for a, b in rs:
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def emit_ranges(name, rs, lines):
    lines.append(f"const CodepointRange {name}[] = {{")
    row = []
    for a, b in rs:
        row.append(f"{{0x{a:X}, 0x{b:X}}}")
        if len(row) == 6:
            lines.append("    " + ", ".join(row) + ",")
            row = []
    if row:
        lines.append("    " + ", ".join(row) + ",")
    lines.append("};")
    lines.append(f"const size_t {name}Count = sizeof({name}) / sizeof({name}[0]);")
    lines.append("")


def main():
    cat = [unicodedata.category(chr(cp)) for cp in range(MAX_CP)]
    letters = ranges_of(lambda cp: cat[cp][0] == "L")
    numbers = ranges_of(lambda cp: cat[cp][0] == "N")
    rust_numeric = merge_ranges(numbers + RUST_NUMERIC_EXTRA)
    word = merge_ranges(ranges_of(lambda cp: cat[cp][0] in "LM" or cat[cp] in ("Nd", "Nl", "Pc")) + EXTRA_WORD)

    old = present_in(NORMALIZATION_UNICODE_VERSION)
    ccc_ranges = []
    for cp in range(MAX_CP):
        if cp not in old:
            continue
        c = unicodedata.combining(chr(cp))
        if c == 0:
            continue
        if ccc_ranges and ccc_ranges[-1][1] == cp - 1 and ccc_ranges[-1][2] == c:
            ccc_ranges[-1][1] = cp
        else:
            ccc_ranges.append([cp, cp, c])

    decomp_data = []
    decomp_index = []
    compositions = []
    for cp in range(MAX_CP):
        if HANGUL_FIRST <= cp <= HANGUL_LAST or cp not in old:
            continue
        raw = unicodedata.decomposition(chr(cp))
        if not raw or raw.startswith("<"):
            continue
        full = unicodedata.normalize("NFD", chr(cp))
        assert all(ord(ch) in old for ch in full)
        decomp_index.append((cp, len(decomp_data), len(full)))
        decomp_data.extend(ord(ch) for ch in full)
        parts = [int(p, 16) for p in raw.split()]
        if len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp):
            compositions.append((parts[0], parts[1], cp))
    compositions.sort()
    assert len(decomp_data) < 65536

    lines = [
        "// GENERATED by tools/gen_unicode_tables.py from Python's unicodedata "
        f"(Unicode {unicodedata.unidata_version}; normalization data limited to the characters of Unicode "
        f"{NORMALIZATION_UNICODE_VERSION}, as in `tokenizers`). Do not edit.",
        "// clang-format off",
        '#include "core/text/unicode_tables.h"',
        "",
        "namespace dysco::unicode {",
        "",
        f'const char kUnicodeVersion[] = "{unicodedata.unidata_version}";',
        "",
    ]
    emit_ranges("kLetterRanges", letters, lines)
    emit_ranges("kNumberRanges", numbers, lines)
    emit_ranges("kRustNumericRanges", rust_numeric, lines)
    emit_ranges("kWhiteSpaceRanges", WHITE_SPACE, lines)
    emit_ranges("kWordRanges", word, lines)

    lines.append("const CombiningClassRange kCombiningClassRanges[] = {")
    row = []
    for a, b, c in ccc_ranges:
        row.append(f"{{0x{a:X}, 0x{b:X}, {c}}}")
        if len(row) == 5:
            lines.append("    " + ", ".join(row) + ",")
            row = []
    if row:
        lines.append("    " + ", ".join(row) + ",")
    lines.append("};")
    lines.append("const size_t kCombiningClassRangeCount = "
                 "sizeof(kCombiningClassRanges) / sizeof(kCombiningClassRanges[0]);")
    lines.append("")

    lines.append("const char32_t kDecompositionData[] = {")
    for i in range(0, len(decomp_data), 10):
        lines.append("    " + ", ".join(f"0x{c:X}" for c in decomp_data[i:i + 10]) + ",")
    lines.append("};")
    lines.append("")
    lines.append("const Decomposition kDecompositions[] = {")
    for i in range(0, len(decomp_index), 5):
        lines.append("    " + ", ".join(f"{{0x{cp:X}, {off}, {n}}}" for cp, off, n in decomp_index[i:i + 5]) + ",")
    lines.append("};")
    lines.append("const size_t kDecompositionCount = sizeof(kDecompositions) / sizeof(kDecompositions[0]);")
    lines.append("")
    lines.append("const Composition kCompositions[] = {")
    for i in range(0, len(compositions), 4):
        lines.append("    " + ", ".join(f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}" for a, b, c in compositions[i:i + 4]) + ",")
    lines.append("};")
    lines.append("const size_t kCompositionCount = sizeof(kCompositions) / sizeof(kCompositions[0]);")
    lines.append("")
    lines.append("}  // namespace dysco::unicode")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
