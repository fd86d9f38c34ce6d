#include "core/text/tokenizer.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "core/text/tokenizer_bpe.h"
#include "core/text/tokenizer_regex.h"
#include "core/text/unicode_text.h"

namespace dysco {

using json = nlohmann::json;
using tokenizer_internal::BpeModel;
using tokenizer_internal::BpeOptions;
using tokenizer_internal::SplitRegex;

namespace {

// GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others are moved to
// U+0100...
struct ByteAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<char32_t, uint8_t> char_to_byte;

  ByteAlphabet() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      unicode::AppendUtf8(cp, &byte_to_utf8[b]);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

enum class Normalization { kNfc, kNfd };

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kByteLevel, kSplitRegex, kSplitString, kDigits } kind;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel
  SplitRegex regex = SplitRegex::kGpt2;
  std::string literal;  // Split with a String pattern
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool individual_digits = false;
};

struct AddedToken {
  int32_t id;
  std::string content;  // what is matched: normalized already when `normalized`
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

// Leftmost-longest matcher over a set of added tokens (what `tokenizers` builds with Aho-Corasick).
class AddedTokenMatcher {
 public:
  void Add(size_t token_index, const std::string& content) {
    if (content.empty()) return;
    has_any_ = true;
    by_first_byte_[static_cast<unsigned char>(content[0])].push_back({token_index, content});
  }
  void Finish() {
    for (auto& bucket : by_first_byte_) {
      std::stable_sort(bucket.begin(), bucket.end(), [](const Entry& a, const Entry& b) {
        return a.content.size() > b.content.size();
      });
    }
  }
  bool empty() const { return !has_any_; }
  // Longest token starting at text[pos]: its index, or -1.
  int64_t LongestAt(std::string_view text, size_t pos, size_t* length) const {
    for (const Entry& e : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      if (text.compare(pos, e.content.size(), e.content) == 0) {
        *length = e.content.size();
        return static_cast<int64_t>(e.token_index);
      }
    }
    return -1;
  }

 private:
  struct Entry {
    size_t token_index;
    std::string content;
  };
  std::array<std::vector<Entry>, 256> by_first_byte_;
  bool has_any_ = false;
};

// A piece of the input: either text still to tokenize, or an added token already recognised.
struct Segment {
  std::string text;
  int32_t id = -1;
  size_t begin = 0;  // offset of `text` in the string that was split
};

// Spans of a text in which special tokens are not parsed (sorted, half-open byte ranges).
using PlainSpans = std::vector<std::pair<size_t, size_t>>;

bool OverlapsPlain(const PlainSpans* plain, size_t begin, size_t end) {
  if (plain == nullptr) return false;
  for (const auto& [b, e] : *plain) {
    if (b < end && begin < e) return true;
  }
  return false;
}

char32_t LastChar(std::string_view s) {
  size_t pos = s.size() - 1;
  while (pos > 0 && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) --pos;
  size_t len;
  return unicode::DecodeValidUtf8(s, pos, &len);
}

char32_t FirstChar(std::string_view s) {
  size_t len;
  return unicode::DecodeValidUtf8(s, 0, &len);
}

// Start of the whitespace run that ends `s` (s.size() if none).
size_t TrailingSpaceStart(std::string_view s) {
  size_t pos = s.size();
  while (pos > 0) {
    size_t start = pos - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t len;
    if (!unicode::IsWhiteSpace(unicode::DecodeValidUtf8(s, start, &len))) break;
    pos = start;
  }
  return pos;
}

size_t LeadingSpaceLength(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t len;
    if (!unicode::IsWhiteSpace(unicode::DecodeValidUtf8(s, pos, &len))) break;
    pos += len;
  }
  return pos;
}

struct Span {
  size_t begin;
  size_t end;
  bool match;
};

// NormalizedString::split of `tokenizers`: turns match/non-match spans covering `piece` into
// pieces.
void AppendSplits(std::string_view piece, const std::vector<Span>& spans, SplitBehavior behavior,
                  bool invert, std::vector<std::string>* out) {
  std::vector<std::pair<Span, bool>> splits;  // span, remove
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : spans) splits.push_back({s, false});
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) splits.push_back({s, s.match != invert});
      break;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        const bool m = s.match != invert;
        if (m == previous_match && !splits.empty()) {
          splits.back().first.end = s.end;
        } else {
          splits.push_back({s, false});
        }
        previous_match = m;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        const bool m = s.match != invert;
        if (m && !previous_match && !splits.empty()) {
          splits.back().first.end = s.end;
        } else {
          splits.push_back({s, false});
        }
        previous_match = m;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const bool m = it->match != invert;
        if (m && !previous_match && !splits.empty()) {
          splits.back().first.begin = it->begin;
        } else {
          splits.push_back({*it, false});
        }
        previous_match = m;
      }
      std::reverse(splits.begin(), splits.end());
      break;
  }
  for (const auto& [span, remove] : splits) {
    if (!remove && span.end > span.begin)
      out->emplace_back(piece.substr(span.begin, span.end - span.begin));
  }
}

// Spans of a regex's successive matches and the text between them.
std::vector<Span> SpansFromMatches(size_t length,
                                   const std::vector<std::pair<size_t, size_t>>& matches) {
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) spans.push_back({prev, b, false});
    spans.push_back({b, e, true});
    prev = e;
  }
  if (prev != length) spans.push_back({prev, length, false});
  return spans;
}

// ---- JSON helpers: every error names the file and the field. ----

class JsonReader {
 public:
  explicit JsonReader(std::string origin) : origin_(std::move(origin)) {}

  Status Error(const std::string& field, const std::string& what) const {
    return InvalidArgumentError(origin_ + ": " + field + " " + what);
  }
  Status Unsupported(const std::string& field, const std::string& what) const {
    return UnimplementedError(origin_ + ": " + field + " " + what);
  }
  // Optional boolean (absent or null gives `fallback`).
  StatusOr<bool> Bool(const json& obj, const std::string& key, const std::string& path,
                      bool fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) return Error(path + "." + key, "must be a boolean");
    return it->get<bool>();
  }
  StatusOr<std::string> String(const json& obj, const std::string& key,
                               const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_string()) return Error(path + "." + key, "must be a string");
    return it->get<std::string>();
  }
  // Optional string (absent or null gives nullopt).
  StatusOr<std::optional<std::string>> OptionalString(const json& obj, const std::string& key,
                                                      const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::optional<std::string>();
    if (!it->is_string()) return Error(path + "." + key, "must be a string or null");
    return std::optional<std::string>(it->get<std::string>());
  }
  const std::string& origin() const { return origin_; }

 private:
  std::string origin_;
};

}  // namespace

struct Tokenizer::Impl {
  std::vector<Normalization> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::unique_ptr<BpeModel> bpe;
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> added_by_content;  // original content -> id
  AddedTokenMatcher raw_matcher;  // tokens with normalized == false, matched on the input
  AddedTokenMatcher
      normalized_matcher;  // tokens with normalized == true, matched after normalization
  std::vector<std::string> id_to_token;
  std::vector<std::string> token_bytes;
  std::vector<uint8_t> is_special;

  Status ParseNormalizer(const JsonReader& r, const json& n, const std::string& path);
  Status ParsePreTokenizer(const JsonReader& r, const json& p, const std::string& path);
  Status ParseDecoder(const JsonReader& r, const json& d, const std::string& path);
  Status ParseModel(const JsonReader& r, const json& m);
  Status ParseAddedTokens(const JsonReader& r, const json& tokens);

  std::string Normalize(std::string text) const;
  // `plain` (may be null): special tokens overlapping these spans are not parsed.
  void SplitAddedTokens(const std::string& text, const AddedTokenMatcher& matcher,
                        bool parse_special, const PlainSpans* plain,
                        std::vector<Segment>* out) const;
  std::vector<int32_t> Encode(std::string_view text, bool parse_special,
                              const PlainSpans* plain) const;
  void PreTokenize(std::string text, std::vector<std::string>* words) const;
};

Status Tokenizer::Impl::ParseNormalizer(const JsonReader& r, const json& n,
                                        const std::string& path) {
  if (n.is_null()) return OkStatus();
  if (!n.is_object()) return r.Error(path, "must be an object or null");
  DYSCO_ASSIGN_OR_RETURN(std::string type, r.String(n, "type", path));
  if (type == "NFC") {
    normalizers.push_back(Normalization::kNfc);
  } else if (type == "NFD") {
    normalizers.push_back(Normalization::kNfd);
  } else if (type == "Sequence") {
    auto it = n.find("normalizers");
    if (it == n.end() || !it->is_array()) return r.Error(path + ".normalizers", "must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      DYSCO_RETURN_IF_ERROR(
          ParseNormalizer(r, (*it)[i], path + ".normalizers[" + std::to_string(i) + "]"));
    }
  } else {
    return r.Unsupported(path + ".type", "'" + type + "' is not supported (NFC, NFD, Sequence)");
  }
  return OkStatus();
}

Status Tokenizer::Impl::ParsePreTokenizer(const JsonReader& r, const json& p,
                                          const std::string& path) {
  if (p.is_null()) return OkStatus();
  if (!p.is_object()) return r.Error(path, "must be an object or null");
  DYSCO_ASSIGN_OR_RETURN(std::string type, r.String(p, "type", path));
  PreTokenizerStep step;
  if (type == "Sequence") {
    auto it = p.find("pretokenizers");
    if (it == p.end() || !it->is_array())
      return r.Error(path + ".pretokenizers", "must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      DYSCO_RETURN_IF_ERROR(
          ParsePreTokenizer(r, (*it)[i], path + ".pretokenizers[" + std::to_string(i) + "]"));
    }
    return OkStatus();
  }
  if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    DYSCO_ASSIGN_OR_RETURN(step.add_prefix_space, r.Bool(p, "add_prefix_space", path, true));
    DYSCO_ASSIGN_OR_RETURN(step.use_regex, r.Bool(p, "use_regex", path, true));
  } else if (type == "Digits") {
    step.kind = PreTokenizerStep::Kind::kDigits;
    DYSCO_ASSIGN_OR_RETURN(step.individual_digits, r.Bool(p, "individual_digits", path, false));
  } else if (type == "Split") {
    auto pattern = p.find("pattern");
    if (pattern == p.end() || !pattern->is_object()) {
      return r.Error(path + ".pattern", "must be an object {\"Regex\": ...} or {\"String\": ...}");
    }
    if (auto re = pattern->find("Regex"); re != pattern->end() && re->is_string()) {
      const std::string text = re->get<std::string>();
      auto known = tokenizer_internal::RecognizeSplitRegex(text);
      if (!known) {
        return r.Unsupported(
            path + ".pattern.Regex",
            "'" + text + "' is not one of the supported regexes (GPT-2, Llama-3, Qwen2)");
      }
      step.kind = PreTokenizerStep::Kind::kSplitRegex;
      step.regex = *known;
    } else if (auto lit = pattern->find("String"); lit != pattern->end() && lit->is_string()) {
      step.kind = PreTokenizerStep::Kind::kSplitString;
      step.literal = lit->get<std::string>();
    } else {
      return r.Error(path + ".pattern", "must be an object {\"Regex\": ...} or {\"String\": ...}");
    }
    DYSCO_ASSIGN_OR_RETURN(std::string behavior, r.String(p, "behavior", path));
    static const std::unordered_map<std::string, SplitBehavior> kBehaviors = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    auto b = kBehaviors.find(behavior);
    if (b == kBehaviors.end())
      return r.Error(path + ".behavior", "'" + behavior + "' is not a split behavior");
    step.behavior = b->second;
    DYSCO_ASSIGN_OR_RETURN(step.invert, r.Bool(p, "invert", path, false));
  } else {
    return r.Unsupported(path + ".type",
                         "'" + type + "' is not supported (ByteLevel, Split, Digits, Sequence)");
  }
  pre_tokenizers.push_back(std::move(step));
  return OkStatus();
}

Status Tokenizer::Impl::ParseDecoder(const JsonReader& r, const json& d, const std::string& path) {
  if (!d.is_object())
    return r.Unsupported(path, "must be a ByteLevel decoder (byte-level BPE only)");
  DYSCO_ASSIGN_OR_RETURN(std::string type, r.String(d, "type", path));
  if (type == "ByteLevel") return OkStatus();
  if (type == "Sequence") {
    auto it = d.find("decoders");
    if (it == d.end() || !it->is_array() || it->empty())
      return r.Error(path + ".decoders", "must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      DYSCO_RETURN_IF_ERROR(
          ParseDecoder(r, (*it)[i], path + ".decoders[" + std::to_string(i) + "]"));
    }
    return OkStatus();
  }
  return r.Unsupported(path + ".type",
                       "'" + type + "' is not supported (only byte-level BPE: ByteLevel)");
}

Status Tokenizer::Impl::ParseModel(const JsonReader& r, const json& m) {
  if (!m.is_object()) return r.Error("model", "must be an object");
  std::string type =
      "BPE";  // `tokenizers` infers the type when the field is absent; BPE is the one with merges
  if (m.contains("type")) {
    DYSCO_ASSIGN_OR_RETURN(type, r.String(m, "type", "model"));
  } else if (!m.contains("merges")) {
    return r.Unsupported("model", "has no type and no merges: only BPE models are supported");
  }
  if (type != "BPE")
    return r.Unsupported("model.type", "'" + type + "' is not supported (only BPE)");
  if (auto it = m.find("dropout"); it != m.end() && !it->is_null()) {
    if (!it->is_number()) return r.Error("model.dropout", "must be a number or null");
    if (it->get<double>() != 0.0)
      return r.Unsupported("model.dropout", "must be null (BPE dropout is not supported)");
  }
  BpeOptions options;
  DYSCO_ASSIGN_OR_RETURN(options.unk_token, r.OptionalString(m, "unk_token", "model"));
  DYSCO_ASSIGN_OR_RETURN(auto prefix, r.OptionalString(m, "continuing_subword_prefix", "model"));
  DYSCO_ASSIGN_OR_RETURN(auto suffix, r.OptionalString(m, "end_of_word_suffix", "model"));
  options.continuing_subword_prefix = prefix.value_or("");
  options.end_of_word_suffix = suffix.value_or("");
  DYSCO_ASSIGN_OR_RETURN(options.fuse_unk, r.Bool(m, "fuse_unk", "model", false));
  DYSCO_ASSIGN_OR_RETURN(options.byte_fallback, r.Bool(m, "byte_fallback", "model", false));
  DYSCO_ASSIGN_OR_RETURN(options.ignore_merges, r.Bool(m, "ignore_merges", "model", false));

  auto vocab_it = m.find("vocab");
  if (vocab_it == m.end() || !vocab_it->is_object())
    return r.Error("model.vocab", "must be an object");
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(vocab_it->size());
  int64_t max_id = -1;
  for (auto it = vocab_it->begin(); it != vocab_it->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX) {
      return r.Error("model.vocab['" + it.key() + "']", "must be a non-negative 32-bit integer id");
    }
    const int64_t id = it.value().get<int64_t>();
    vocab[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }
  if (max_id >= static_cast<int64_t>(vocab.size()) * 4 + (1 << 20)) {
    return r.Error("model.vocab",
                   "has ids far beyond its size (largest " + std::to_string(max_id) + ")");
  }

  auto merges_it = m.find("merges");
  if (merges_it == m.end() || !merges_it->is_array())
    return r.Error("model.merges", "must be an array");
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(merges_it->size());
  for (size_t i = 0; i < merges_it->size(); ++i) {
    const json& e = (*merges_it)[i];
    const std::string path = "model.merges[" + std::to_string(i) + "]";
    if (e.is_string()) {
      const std::string s = e.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return r.Error(path, "'" + s + "' must be two tokens separated by one space");
      }
      merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      return r.Error(path, "must be \"a b\" or [\"a\", \"b\"]");
    }
  }

  id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [token, id] : vocab) id_to_token[id] = token;
  DYSCO_ASSIGN_OR_RETURN(
      bpe, BpeModel::Create(std::move(vocab), merges, std::move(options), r.origin()));
  return OkStatus();
}

Status Tokenizer::Impl::ParseAddedTokens(const JsonReader& r, const json& tokens) {
  if (tokens.is_null()) return OkStatus();
  if (!tokens.is_array()) return r.Error("added_tokens", "must be an array");
  for (size_t i = 0; i < tokens.size(); ++i) {
    const json& t = tokens[i];
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    if (!t.is_object()) return r.Error(path, "must be an object");
    AddedToken token;
    DYSCO_ASSIGN_OR_RETURN(token.content, r.String(t, "content", path));
    if (token.content.empty()) continue;  // ignored by `tokenizers`
    if (!unicode::IsValidUtf8(token.content))
      return r.Error(path + ".content", "is not valid UTF-8");
    auto id_it = t.find("id");
    if (id_it == t.end() || !id_it->is_number_integer() || id_it->get<int64_t>() < 0 ||
        id_it->get<int64_t>() > INT32_MAX) {
      return r.Error(path + ".id", "must be a non-negative 32-bit integer");
    }
    token.id = static_cast<int32_t>(id_it->get<int64_t>());
    // A token already in the model vocabulary keeps its model id, as in `tokenizers`.
    if (auto v = bpe->vocab().find(token.content); v != bpe->vocab().end()) token.id = v->second;
    if (token.id >= static_cast<int32_t>(id_to_token.size()) + (1 << 20)) {
      return r.Error(path + ".id", "is far beyond the vocabulary size");
    }
    DYSCO_ASSIGN_OR_RETURN(token.special, r.Bool(t, "special", path, false));
    DYSCO_ASSIGN_OR_RETURN(token.single_word, r.Bool(t, "single_word", path, false));
    DYSCO_ASSIGN_OR_RETURN(token.lstrip, r.Bool(t, "lstrip", path, false));
    DYSCO_ASSIGN_OR_RETURN(token.rstrip, r.Bool(t, "rstrip", path, false));
    DYSCO_ASSIGN_OR_RETURN(token.normalized, r.Bool(t, "normalized", path, !token.special));
    added_by_content[token.content] = token.id;
    added.push_back(std::move(token));
  }
  return OkStatus();
}

std::string Tokenizer::Impl::Normalize(std::string text) const {
  for (Normalization n : normalizers)
    text = n == Normalization::kNfc ? unicode::Nfc(text) : unicode::Nfd(text);
  return text;
}

// AddedVocabulary::find_matches of `tokenizers`.
void Tokenizer::Impl::SplitAddedTokens(const std::string& text, const AddedTokenMatcher& matcher,
                                       bool parse_special, const PlainSpans* plain,
                                       std::vector<Segment>* out) const {
  if (matcher.empty()) {
    if (!text.empty()) out->push_back({text, -1, 0});
    return;
  }
  const std::string_view s(text);
  size_t start_offset = 0;
  for (size_t pos = 0; pos < s.size();) {
    size_t length = 0;
    const int64_t index = matcher.LongestAt(s, pos, &length);
    if (index < 0) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + length;
    pos = stop;  // the scan goes on after the match even when the match is then discarded
    const AddedToken& token = added[index];
    if (token.special && (!parse_special || OverlapsPlain(plain, start, stop))) continue;
    if (token.single_word) {
      const bool space_before = start == 0 || !unicode::IsWordChar(LastChar(s.substr(0, start)));
      const bool space_after = stop == s.size() || !unicode::IsWordChar(FirstChar(s.substr(stop)));
      if (!space_before || !space_after) continue;
    }
    if (token.lstrip) start = std::max(TrailingSpaceStart(s.substr(0, start)), start_offset);
    if (token.rstrip) stop += LeadingSpaceLength(s.substr(stop));
    if (start_offset < start) {
      out->push_back({text.substr(start_offset, start - start_offset), -1, start_offset});
    }
    out->push_back({std::string(), token.id, start});
    start_offset = stop;
  }
  if (start_offset < s.size()) out->push_back({text.substr(start_offset), -1, start_offset});
}

void Tokenizer::Impl::PreTokenize(std::string text, std::vector<std::string>* words) const {
  std::vector<std::string> pieces;
  pieces.push_back(std::move(text));
  std::vector<std::string> next;
  std::vector<std::pair<size_t, size_t>> matches;
  std::vector<Span> spans;
  const ByteAlphabet& alphabet = Alphabet();
  for (const PreTokenizerStep& step : pre_tokenizers) {
    next.clear();
    for (std::string& piece : pieces) {
      switch (step.kind) {
        case PreTokenizerStep::Kind::kByteLevel: {
          if (step.add_prefix_space && (piece.empty() || piece[0] != ' '))
            piece.insert(piece.begin(), ' ');
          const size_t first = next.size();
          if (step.use_regex) {
            tokenizer_internal::FindRegexMatches(SplitRegex::kGpt2, piece, &matches);
            AppendSplits(piece, SpansFromMatches(piece.size(), matches), SplitBehavior::kIsolated,
                         false, &next);
          } else if (!piece.empty()) {
            next.push_back(std::move(piece));
          }
          for (size_t i = first; i < next.size(); ++i) {
            std::string mapped;
            mapped.reserve(next[i].size() * 2);
            for (char c : next[i]) mapped += alphabet.byte_to_utf8[static_cast<unsigned char>(c)];
            next[i] = std::move(mapped);
          }
          break;
        }
        case PreTokenizerStep::Kind::kSplitRegex:
          tokenizer_internal::FindRegexMatches(step.regex, piece, &matches);
          AppendSplits(piece, SpansFromMatches(piece.size(), matches), step.behavior, step.invert,
                       &next);
          break;
        case PreTokenizerStep::Kind::kSplitString: {
          matches.clear();
          if (!step.literal.empty()) {
            for (size_t at = piece.find(step.literal); at != std::string::npos;
                 at = piece.find(step.literal, at + step.literal.size())) {
              matches.emplace_back(at, at + step.literal.size());
            }
          }
          AppendSplits(piece, SpansFromMatches(piece.size(), matches), step.behavior, step.invert,
                       &next);
          break;
        }
        case PreTokenizerStep::Kind::kDigits: {
          // Each numeric character is its own match (the char-predicate Pattern of `tokenizers`).
          matches.clear();
          for (size_t pos = 0; pos < piece.size();) {
            size_t len;
            const char32_t cp = unicode::DecodeValidUtf8(piece, pos, &len);
            if (unicode::IsRustNumeric(cp)) matches.emplace_back(pos, pos + len);
            pos += len;
          }
          AppendSplits(
              piece, SpansFromMatches(piece.size(), matches),
              step.individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false,
              &next);
          break;
        }
      }
    }
    pieces.swap(next);
  }
  for (std::string& p : pieces) {
    if (!p.empty()) words->push_back(std::move(p));
  }
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("tokenizer file not found or unreadable: " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return DataLossError("error reading tokenizer file " + path);
  return FromJson(buffer.str(), path);
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text,
                                                         const std::string& origin) {
  const JsonReader r(origin);
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return InvalidArgumentError(origin + ": not valid JSON (" + e.what() + ")");
  }
  if (!root.is_object()) return InvalidArgumentError(origin + ": top level must be a JSON object");
  auto impl = std::make_unique<Impl>();
  try {
    auto model = root.find("model");
    if (model == root.end()) return r.Error("model", "is missing");
    DYSCO_RETURN_IF_ERROR(impl->ParseModel(r, *model));
    const json null_value;
    const auto field = [&](const char* key) -> const json& {
      auto it = root.find(key);
      return it == root.end() ? null_value : *it;
    };
    DYSCO_RETURN_IF_ERROR(impl->ParseNormalizer(r, field("normalizer"), "normalizer"));
    DYSCO_RETURN_IF_ERROR(impl->ParsePreTokenizer(r, field("pre_tokenizer"), "pre_tokenizer"));
    DYSCO_RETURN_IF_ERROR(impl->ParseDecoder(r, field("decoder"), "decoder"));
    DYSCO_RETURN_IF_ERROR(impl->ParseAddedTokens(r, field("added_tokens")));
  } catch (const json::exception& e) {
    return InvalidArgumentError(origin + ": unexpected JSON structure (" + e.what() + ")");
  }

  // Id tables: model vocabulary, then added tokens on top.
  int32_t max_id = static_cast<int32_t>(impl->id_to_token.size()) - 1;
  for (const AddedToken& t : impl->added) max_id = std::max(max_id, t.id);
  impl->id_to_token.resize(static_cast<size_t>(max_id) + 1);
  impl->is_special.assign(impl->id_to_token.size(), 0);
  for (const AddedToken& t : impl->added) {
    impl->id_to_token[t.id] = t.content;
    impl->is_special[t.id] = t.special;
  }
  // The ByteLevel decoder: a token made only of alphabet characters stands for those bytes; any
  // other token (e.g. an added token with a raw space or newline) for its own UTF-8.
  const ByteAlphabet& alphabet = Alphabet();
  impl->token_bytes.resize(impl->id_to_token.size());
  for (size_t id = 0; id < impl->id_to_token.size(); ++id) {
    const std::string& token = impl->id_to_token[id];
    std::string bytes;
    bool all_in_alphabet = true;
    for (size_t pos = 0; pos < token.size() && all_in_alphabet;) {
      size_t len;
      auto it = alphabet.char_to_byte.find(unicode::DecodeValidUtf8(token, pos, &len));
      if (it == alphabet.char_to_byte.end()) {
        all_in_alphabet = false;
      } else {
        bytes.push_back(static_cast<char>(it->second));
      }
      pos += len;
    }
    impl->token_bytes[id] = all_in_alphabet ? std::move(bytes) : token;
  }

  // Added-token matchers; tokens matched after normalization are matched in their normalized form.
  for (size_t i = 0; i < impl->added.size(); ++i) {
    AddedToken& t = impl->added[i];
    if (t.normalized) {
      t.content = impl->Normalize(t.content);
      impl->normalized_matcher.Add(i, t.content);
    } else {
      impl->raw_matcher.Add(i, t.content);
    }
  }
  impl->raw_matcher.Finish();
  impl->normalized_matcher.Finish();
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool parse_special) const {
  // Input that is not UTF-8 is repaired the way Python's bytes.decode(errors="replace") would.
  if (!unicode::IsValidUtf8(text))
    return impl_->Encode(unicode::Utf8Lossy(text), parse_special, nullptr);
  return impl_->Encode(text, parse_special, nullptr);
}

std::vector<int32_t> Tokenizer::EncodeWithPlainSpans(
    std::string_view text, const std::vector<std::pair<size_t, size_t>>& plain_spans) const {
  // Repairing would move the spans' offsets: such text is encoded with no special token at all.
  if (!unicode::IsValidUtf8(text)) return impl_->Encode(unicode::Utf8Lossy(text), false, nullptr);
  return impl_->Encode(text, true, &plain_spans);
}

std::vector<int32_t> Tokenizer::Impl::Encode(std::string_view text, bool parse_special,
                                             const PlainSpans* plain) const {
  std::vector<int32_t> ids;
  const std::string input(text);
  std::vector<Segment> raw_segments;
  SplitAddedTokens(input, raw_matcher, parse_special, plain, &raw_segments);
  std::vector<Segment> segments;
  std::vector<std::string> words;
  for (Segment& raw : raw_segments) {
    if (raw.id >= 0) {
      ids.push_back(raw.id);
      continue;
    }
    // After normalization the offsets no longer line up with the spans: a segment that touches a
    // plain span parses no special token at all.
    const bool segment_special =
        parse_special && !OverlapsPlain(plain, raw.begin, raw.begin + raw.text.size());
    segments.clear();
    SplitAddedTokens(Normalize(std::move(raw.text)), normalized_matcher, segment_special, nullptr,
                     &segments);
    for (Segment& seg : segments) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      words.clear();
      PreTokenize(std::move(seg.text), &words);
      for (const std::string& w : words) bpe->Tokenize(w, &ids);
    }
  }
  return ids;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;  // unknown ids are dropped, as in `tokenizers`
    if (skip_special && impl_->is_special[id]) continue;
    bytes += impl_->token_bytes[id];
  }
  return unicode::Utf8Lossy(bytes);
}

size_t Tokenizer::max_input_bytes_per_token() const {
  for (const AddedToken& t : impl_->added) {
    if (t.lstrip || t.rstrip) return SIZE_MAX / 4;
  }
  size_t longest = 1;
  for (const std::string& bytes : impl_->token_bytes) longest = std::max(longest, bytes.size());
  return impl_->normalizers.empty() ? longest : 3 * longest;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  const std::string key(token);
  if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end())
    return it->second;
  if (auto it = impl_->bpe->vocab().find(key); it != impl_->bpe->vocab().end()) return it->second;
  return std::nullopt;
}

std::string Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return std::string();
  return impl_->id_to_token[id];
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->is_special[id];
}

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return std::string();
  return impl_->token_bytes[id];
}

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

std::string StreamingDecoder::Push(int32_t id) {
  if (skip_special_ && tokenizer_.IsSpecial(id)) return std::string();
  pending_ += tokenizer_.TokenBytes(id);
  const size_t hold = unicode::IncompleteUtf8Tail(pending_);
  std::string out =
      unicode::Utf8Lossy(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StreamingDecoder::Flush() {
  std::string out = unicode::Utf8Lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace dysco
