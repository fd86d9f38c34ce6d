#include "core/text/unicode_text.h"

#include <algorithm>
#include <array>
#include <memory>

#include "core/text/unicode_tables.h"

namespace dysco::unicode {
namespace {

bool InRanges(const CodepointRange* ranges, size_t count, char32_t cp) {
  const CodepointRange* end = ranges + count;
  const CodepointRange* it = std::upper_bound(
      ranges, end, cp, [](char32_t c, const CodepointRange& r) { return c < r.first; });
  return it != ranges && cp <= (it - 1)->last;
}

uint8_t ComputeClasses(char32_t cp) {
  uint8_t f = 0;
  if (InRanges(kLetterRanges, kLetterRangesCount, cp)) f |= kLetter;
  if (InRanges(kNumberRanges, kNumberRangesCount, cp)) f |= kNumber;
  if (InRanges(kWhiteSpaceRanges, kWhiteSpaceRangesCount, cp)) f |= kWhiteSpace;
  if (InRanges(kWordRanges, kWordRangesCount, cp)) f |= kWord;
  if (InRanges(kRustNumericRanges, kRustNumericRangesCount, cp)) f |= kRustNumeric;
  return f;
}

// The Basic Multilingual Plane covers nearly all text, so it gets a direct table; the rest is
// searched.
const std::array<uint8_t, 0x10000>& BmpClasses() {
  static const std::unique_ptr<std::array<uint8_t, 0x10000>> table = [] {
    auto t = std::make_unique<std::array<uint8_t, 0x10000>>();
    for (char32_t cp = 0; cp < 0x10000; ++cp) (*t)[cp] = ComputeClasses(cp);
    return t;
  }();
  return *table;
}

// Hangul syllable arithmetic (Unicode chapter 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint8_t CombiningClass(char32_t cp) {
  if (cp < 0x300) return 0;
  const CombiningClassRange* begin = kCombiningClassRanges;
  const CombiningClassRange* end = begin + kCombiningClassRangeCount;
  const CombiningClassRange* it = std::upper_bound(
      begin, end, cp, [](char32_t c, const CombiningClassRange& r) { return c < r.first; });
  if (it == begin || cp > (it - 1)->last) return 0;
  return (it - 1)->ccc;
}

const Decomposition* FindDecomposition(char32_t cp) {
  if (cp < 0xC0) return nullptr;
  const Decomposition* begin = kDecompositions;
  const Decomposition* end = begin + kDecompositionCount;
  const Decomposition* it =
      std::lower_bound(begin, end, cp, [](const Decomposition& d, char32_t c) { return d.cp < c; });
  return (it != end && it->cp == cp) ? it : nullptr;
}

bool Compose(char32_t a, char32_t b, char32_t* out) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    *out = kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
    return true;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    *out = a + (b - kTBase);
    return true;
  }
  const Composition* begin = kCompositions;
  const Composition* end = begin + kCompositionCount;
  const Composition* it =
      std::lower_bound(begin, end, std::make_pair(a, b), [](const Composition& c, auto key) {
        return c.first < key.first || (c.first == key.first && c.second < key.second);
      });
  if (it != end && it->first == a && it->second == b) {
    *out = it->composite;
    return true;
  }
  return false;
}

// Code points that can be the second half of a composition: text without them (and without
// decomposable or non-starter characters) is already in NFC.
const std::vector<char32_t>& CompositionSeconds() {
  static const std::vector<char32_t> seconds = [] {
    std::vector<char32_t> s;
    for (size_t i = 0; i < kCompositionCount; ++i) s.push_back(kCompositions[i].second);
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    return s;
  }();
  return seconds;
}

// Below U+0300 only precomposed Latin-1/Latin Extended letters can change, and only under NFD (NFC
// composes them back: no exclusion or singleton lies there).
bool MaybeChangedByNormalization(char32_t cp, bool nfd) {
  if (cp < 0xC0 || (!nfd && cp < 0x300)) return false;
  if (cp >= kSBase && cp < kSBase + kSCount) return true;
  if (cp >= kLBase && cp < kTBase + kTCount) return true;  // conjoining jamo
  if (CombiningClass(cp) != 0 || FindDecomposition(cp) != nullptr) return true;
  const auto& seconds = CompositionSeconds();
  return std::binary_search(seconds.begin(), seconds.end(), cp);
}

void DecomposeInto(char32_t cp, std::vector<char32_t>* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  if (const Decomposition* d = FindDecomposition(cp)) {
    out->insert(out->end(), kDecompositionData + d->offset,
                kDecompositionData + d->offset + d->length);
    return;
  }
  out->push_back(cp);
}

// Canonical decomposition plus canonical ordering (stable sort of each run of non-starters by
// class).
std::vector<char32_t> DecomposeCanonical(std::string_view utf8) {
  std::vector<char32_t> cps;
  cps.reserve(utf8.size());
  for (size_t pos = 0; pos < utf8.size();) {
    size_t len;
    DecomposeInto(DecodeValidUtf8(utf8, pos, &len), &cps);
    pos += len;
  }
  for (size_t i = 0; i < cps.size();) {
    if (CombiningClass(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && CombiningClass(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j,
                     [](char32_t a, char32_t b) { return CombiningClass(a) < CombiningClass(b); });
    i = j;
  }
  return cps;
}

// The canonical composition algorithm, in the same form as the unicode-normalization crate's
// Recompositions (which `tokenizers` uses).
std::vector<char32_t> ComposeCanonical(const std::vector<char32_t>& cps) {
  std::vector<char32_t> out;
  out.reserve(cps.size());
  bool have_starter = false;
  size_t starter_index = 0;
  int last_ccc = -1;  // -1: nothing since the starter
  for (char32_t c : cps) {
    const int ccc = CombiningClass(c);
    if (!have_starter) {
      out.push_back(c);
      if (ccc == 0) {
        have_starter = true;
        starter_index = out.size() - 1;
        last_ccc = -1;
      }
      continue;
    }
    const bool blocked = last_ccc >= 0 && last_ccc >= ccc;
    char32_t composite;
    if (!blocked && Compose(out[starter_index], c, &composite)) {
      out[starter_index] = composite;
      continue;
    }
    out.push_back(c);
    if (ccc == 0) {
      starter_index = out.size() - 1;
      last_ccc = -1;
    } else {
      last_ccc = ccc;
    }
  }
  return out;
}

std::string EncodeAll(const std::vector<char32_t>& cps) {
  std::string out;
  out.reserve(cps.size() * 2);
  for (char32_t cp : cps) AppendUtf8(cp, &out);
  return out;
}

bool NeedsNormalization(std::string_view utf8, bool nfd) {
  const unsigned char first_lead = nfd ? 0xC3 : 0xCC;  // lead bytes of U+00C0 and U+0300
  for (size_t pos = 0; pos < utf8.size();) {
    if (static_cast<unsigned char>(utf8[pos]) < first_lead) {
      ++pos;
      continue;
    }
    size_t len;
    if (MaybeChangedByNormalization(DecodeValidUtf8(utf8, pos, &len), nfd)) return true;
    pos += len;
  }
  return false;
}

struct Utf8Scan {
  size_t length;    // bytes consumed (>= 1)
  bool valid;       // a whole valid character
  bool incomplete;  // input ended inside a sequence that was valid so far
};

// One step of Rust's UTF-8 validation (core::str::from_utf8 / Utf8Chunks).
Utf8Scan ScanUtf8(std::string_view s, size_t pos) {
  const size_t n = s.size();
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[pos + i]); };
  const unsigned char b0 = byte(0);
  if (b0 < 0x80) return {1, true, false};
  int width;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    width = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    width = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    width = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {1, false, false};
  }
  for (int i = 1; i < width; ++i) {
    if (pos + i >= n) return {static_cast<size_t>(i), false, true};
    const unsigned char b = byte(i);
    const unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (b < l || b > h) return {static_cast<size_t>(i), false, false};
  }
  return {static_cast<size_t>(width), true, false};
}

}  // namespace

uint8_t ClassesOf(char32_t cp) {
  if (cp < 0x10000) return BmpClasses()[cp];
  return ComputeClasses(cp);
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t ValidUtf8SequenceLength(std::string_view s, size_t pos) {
  const Utf8Scan scan = ScanUtf8(s, pos);
  return scan.valid ? scan.length : 0;
}

bool IsValidUtf8(std::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    if (static_cast<unsigned char>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const Utf8Scan scan = ScanUtf8(s, pos);
    if (!scan.valid) return false;
    pos += scan.length;
  }
  return true;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t pos = 0; pos < bytes.size();) {
    const Utf8Scan scan = ScanUtf8(bytes, pos);
    if (scan.valid) {
      out.append(bytes.data() + pos, scan.length);
    } else {
      out.append("\xEF\xBF\xBD");
    }
    pos += scan.length;
  }
  return out;
}

size_t IncompleteUtf8Tail(std::string_view bytes) {
  const size_t n = bytes.size();
  // A character is at most 4 bytes, so only a lead byte within the last 3 can start an incomplete
  // one.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto b = static_cast<unsigned char>(bytes[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const Utf8Scan scan = ScanUtf8(bytes, n - back);
    return scan.incomplete ? back : 0;
  }
  return 0;
}

std::string Nfc(std::string_view utf8) {
  if (!NeedsNormalization(utf8, /*nfd=*/false)) return std::string(utf8);
  return EncodeAll(ComposeCanonical(DecomposeCanonical(utf8)));
}

std::string Nfd(std::string_view utf8) {
  if (!NeedsNormalization(utf8, /*nfd=*/true)) return std::string(utf8);
  return EncodeAll(DecomposeCanonical(utf8));
}

}  // namespace dysco::unicode
