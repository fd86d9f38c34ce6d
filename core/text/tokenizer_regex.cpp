#include "core/text/tokenizer_regex.h"

#include <cstdint>

#include "core/text/unicode_text.h"

namespace dysco::tokenizer_internal {
namespace {

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The text as code points with their classes; offsets has one extra entry (the text length).
struct DecodedText {
  std::vector<char32_t> cps;
  std::vector<uint8_t> classes;
  std::vector<size_t> offsets;

  explicit DecodedText(std::string_view text) {
    cps.reserve(text.size());
    classes.reserve(text.size());
    offsets.reserve(text.size() + 1);
    for (size_t pos = 0; pos < text.size();) {
      size_t len;
      const char32_t cp = unicode::DecodeValidUtf8(text, pos, &len);
      cps.push_back(cp);
      classes.push_back(unicode::ClassesOf(cp));
      offsets.push_back(pos);
      pos += len;
    }
    offsets.push_back(text.size());
  }
  size_t size() const { return cps.size(); }
  bool Letter(size_t i) const { return classes[i] & unicode::kLetter; }
  bool Number(size_t i) const { return classes[i] & unicode::kNumber; }
  bool Space(size_t i) const { return classes[i] & unicode::kWhiteSpace; }
  // [^\s\p{L}\p{N}]
  bool Other(size_t i) const {
    return !(classes[i] & (unicode::kLetter | unicode::kNumber | unicode::kWhiteSpace));
  }
  bool CrLf(size_t i) const { return cps[i] == '\r' || cps[i] == '\n'; }
};

template <typename Pred>
size_t RunEnd(const DecodedText& t, size_t i, Pred pred) {
  while (i < t.size() && pred(i)) ++i;
  return i;
}

// Case-insensitive match of one ASCII letter under Unicode simple case folding (U+017F LONG S folds
// to s).
bool FoldEquals(char32_t c, char lower) {
  if (c == static_cast<char32_t>(lower) || c == static_cast<char32_t>(lower - 'a' + 'A'))
    return true;
  return lower == 's' && c == 0x17F;
}

// 's|'t|'re|'ve|'m|'ll|'d at i: end index, or i when none.
size_t MatchContraction(const DecodedText& t, size_t i, bool ignore_case) {
  const size_t n = t.size();
  if (t.cps[i] != '\'' || i + 1 >= n) return i;
  const auto is = [&](size_t k, char lower) {
    return k < n &&
           (ignore_case ? FoldEquals(t.cps[k], lower) : t.cps[k] == static_cast<char32_t>(lower));
  };
  if (is(i + 1, 's') || is(i + 1, 't')) return i + 2;
  if ((is(i + 1, 'r') || is(i + 1, 'v')) && is(i + 2, 'e')) return i + 3;
  if (is(i + 1, 'm')) return i + 2;
  if (is(i + 1, 'l') && is(i + 2, 'l')) return i + 3;
  if (is(i + 1, 'd')) return i + 2;
  return i;
}

// \s+(?!\S)|\s+ at a whitespace character i.
size_t MatchTrailingSpace(const DecodedText& t, size_t i) {
  const size_t j = RunEnd(t, i, [&](size_t k) { return t.Space(k); });
  if (j == t.size()) return j;
  // Followed by a non-space: leave the last space to prefix the next word, unless it is the only
  // one.
  return j - 1 > i ? j - 1 : j;
}

size_t MatchGpt2(const DecodedText& t, size_t i) {
  const size_t n = t.size();
  if (size_t e = MatchContraction(t, i, /*ignore_case=*/false); e != i) return e;
  const bool space = t.cps[i] == ' ' && i + 1 < n;
  if (t.Letter(i)) return RunEnd(t, i, [&](size_t k) { return t.Letter(k); });
  if (space && t.Letter(i + 1)) return RunEnd(t, i + 1, [&](size_t k) { return t.Letter(k); });
  if (t.Number(i)) return RunEnd(t, i, [&](size_t k) { return t.Number(k); });
  if (space && t.Number(i + 1)) return RunEnd(t, i + 1, [&](size_t k) { return t.Number(k); });
  if (t.Other(i)) return RunEnd(t, i, [&](size_t k) { return t.Other(k); });
  if (space && t.Other(i + 1)) return RunEnd(t, i + 1, [&](size_t k) { return t.Other(k); });
  return MatchTrailingSpace(t, i);  // every remaining character is whitespace
}

size_t MatchLlama3(const DecodedText& t, size_t i, size_t max_digits) {
  const size_t n = t.size();
  if (size_t e = MatchContraction(t, i, /*ignore_case=*/true); e != i) return e;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (t.Letter(i)) return RunEnd(t, i, [&](size_t k) { return t.Letter(k); });
  if (!t.CrLf(i) && !t.Number(i) && i + 1 < n && t.Letter(i + 1)) {
    return RunEnd(t, i + 1, [&](size_t k) { return t.Letter(k); });
  }
  // \p{N}{1,max}
  if (t.Number(i)) {
    size_t e = i;
    while (e < n && e - i < max_digits && t.Number(e)) ++e;
    return e;
  }
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  size_t other_start = n;
  if (t.Other(i)) {
    other_start = i;
  } else if (t.cps[i] == ' ' && i + 1 < n && t.Other(i + 1)) {
    other_start = i + 1;
  }
  if (other_start != n) {
    const size_t e = RunEnd(t, other_start, [&](size_t k) { return t.Other(k); });
    return RunEnd(t, e, [&](size_t k) { return t.CrLf(k); });
  }
  // Every remaining character is whitespace. \s*[\r\n]+ ends after the last CR/LF of the run.
  const size_t j = RunEnd(t, i, [&](size_t k) { return t.Space(k); });
  for (size_t k = j; k > i; --k) {
    if (t.CrLf(k - 1)) return k;
  }
  return MatchTrailingSpace(t, i);
}

}  // namespace

std::optional<SplitRegex> RecognizeSplitRegex(std::string_view pattern) {
  if (pattern == kGpt2Pattern) return SplitRegex::kGpt2;
  if (pattern == kLlama3Pattern) return SplitRegex::kLlama3;
  if (pattern == kQwen2Pattern) return SplitRegex::kQwen2;
  return std::nullopt;
}

void FindRegexMatches(SplitRegex regex, std::string_view text,
                      std::vector<std::pair<size_t, size_t>>* matches) {
  matches->clear();
  const DecodedText t(text);
  for (size_t i = 0; i < t.size();) {
    size_t e;
    switch (regex) {
      case SplitRegex::kGpt2:
        e = MatchGpt2(t, i);
        break;
      case SplitRegex::kLlama3:
        e = MatchLlama3(t, i, 3);
        break;
      case SplitRegex::kQwen2:
      default:
        e = MatchLlama3(t, i, 1);
        break;
    }
    matches->emplace_back(t.offsets[i], t.offsets[e]);
    i = e;
  }
}

}  // namespace dysco::tokenizer_internal
