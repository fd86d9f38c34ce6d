// libFuzzer target: the tokenizer (core/text/tokenizer.h) with SmolLM2's and Qwen3's
// tokenizer.json, both loaded once. The first input byte picks the tokenizer (bit 0), the operation
// (bits 1-2) and skip_special (bit 3); the rest is the text, or the ids:
//   0 Encode, parse_special on and off: ids in the vocabulary, plain text never yields a special
//     token, and Decode(Encode(s)) gives s back: repaired if not UTF-8, without the bytes that have
//     no token (SmolLM2 has none for 0x1D, which `tokenizers` drops too), and for Qwen3's NFC
//     normalizer equal after NFC.
//   1 EncodeWithPlainSpans with random sorted spans: ids in the vocabulary, the text comes back, no
//     span is Encode(s, true) for UTF-8 text, one span over everything (or text that is not UTF-8,
//     which gets no special token) is Encode(s, false).
//   2 Decode of random ids (negative and out of range included): valid UTF-8; skip_special drops
//     exactly the special ids.
//   3 StreamingDecoder fed random ids: every piece valid UTF-8, the pieces and Flush add up to
//     Decode of the same ids.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/text/tokenizer.h"
#include "core/text/unicode_text.h"
#include "tests/fuzz/fuzz_check.h"

namespace dysco {
namespace {

struct Loaded {
  std::unique_ptr<Tokenizer> tokenizer;
  bool nfc = false;                 // the tokenizer's normalizer is NFC (Qwen3)
  std::array<bool, 256> dropped{};  // bytes whose byte-level character has no token
};

// GPT-2's byte-level alphabet: the character that stands for byte b.
char32_t ByteLevelChar(int b) {
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
  char32_t n = 0;
  for (int x = 0; x < b; ++x) {
    if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) ++n;
  }
  return 256 + n;
}

Loaded Load(const std::string& relative, bool nfc) {
  auto t = Tokenizer::FromFile(fuzz::DataPath(relative));
  FUZZ_CHECK(t.ok(), t.status().ToString());
  Loaded l{std::move(t).value(), nfc, {}};
  for (int b = 0; b < 256; ++b) {
    std::string c;
    unicode::AppendUtf8(ByteLevelChar(b), &c);
    l.dropped[b] = !l.tokenizer->TokenToId(c).has_value();
  }
  // The expected text below drops bytes before normalizing; with NFC that is exact only when the
  // tokenizer has a token for every byte.
  FUZZ_CHECK(!nfc || std::find(l.dropped.begin(), l.dropped.end(), true) == l.dropped.end(),
             relative + ": an NFC tokenizer without a token for some byte");
  return l;
}

const Loaded& Get(bool qwen3) {
  static const Loaded smollm2 = Load("smollm2/tokenizer.json", false);
  static const Loaded qwen = Load("qwen3/tokenizer.json", true);
  return qwen3 ? qwen : smollm2;
}

std::string Ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

std::string Hex(const std::string& s) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s.substr(0, 512)) {
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}

void CheckIds(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < tok.vocab_size(),
               "id " + std::to_string(id) + " outside the vocabulary");
  }
}

// Decode(ids) gives `text` back (repaired, without the bytes that have no token): exactly, or after
// NFC for a normalizing tokenizer.
void CheckRoundTrip(const Loaded& l, const std::string& text, const std::vector<int32_t>& ids,
                    const char* what) {
  std::string kept;
  for (unsigned char c : unicode::Utf8Lossy(text)) {
    if (!l.dropped[c]) kept += static_cast<char>(c);
  }
  const std::string repaired = unicode::Utf8Lossy(kept);
  std::string decoded = l.tokenizer->Decode(ids);
  if (l.nfc) {
    FUZZ_CHECK(unicode::Nfc(decoded) == unicode::Nfc(repaired),
               std::string(what) + ": text " + Hex(text) + " decoded " + Hex(decoded));
  } else {
    FUZZ_CHECK(decoded == repaired,
               std::string(what) + ": text " + Hex(text) + " decoded " + Hex(decoded));
  }
}

void FuzzEncode(const Loaded& l, const std::string& text) {
  const Tokenizer& tok = *l.tokenizer;
  const std::vector<int32_t> plain = tok.Encode(text, /*parse_special=*/false);
  CheckIds(tok, plain);
  for (int32_t id : plain) {
    FUZZ_CHECK(!tok.IsSpecial(id),
               "plain text " + Hex(text) + " gave special token " + std::to_string(id));
  }
  CheckRoundTrip(l, text, plain, "Encode(parse_special=false)");
  const std::vector<int32_t> special = tok.Encode(text, /*parse_special=*/true);
  CheckIds(tok, special);
  CheckRoundTrip(l, text, special, "Encode(parse_special=true)");
}

void FuzzPlainSpans(const Loaded& l, FuzzedDataProvider* in) {
  const Tokenizer& tok = *l.tokenizer;
  const size_t cuts = in->ConsumeIntegralInRange<size_t>(0, 12);
  std::vector<uint16_t> raw_cuts;
  for (size_t i = 0; i < cuts; ++i) raw_cuts.push_back(in->ConsumeIntegral<uint16_t>());
  const std::string text = in->ConsumeRemainingBytesAsString();
  // Sorted cut points, paired into sorted, disjoint, non-empty half-open spans.
  std::vector<size_t> points;
  for (uint16_t c : raw_cuts) points.push_back(c % (text.size() + 1));
  std::sort(points.begin(), points.end());
  std::vector<std::pair<size_t, size_t>> spans;
  for (size_t i = 0; i + 1 < points.size(); i += 2) {
    if (points[i] < points[i + 1]) spans.emplace_back(points[i], points[i + 1]);
  }
  const std::vector<int32_t> ids = tok.EncodeWithPlainSpans(text, spans);
  CheckIds(tok, ids);
  CheckRoundTrip(l, text, ids, "EncodeWithPlainSpans");
  if (spans.empty() && unicode::IsValidUtf8(text)) {  // not UTF-8: no special token at all
    FUZZ_CHECK(ids == tok.Encode(text, true),
               "no span differs from Encode(parse_special=true): " + Hex(text));
  }
  const bool everything =
      spans.size() == 1 && spans[0].first == 0 && spans[0].second == text.size();
  if (everything || !unicode::IsValidUtf8(text)) {
    FUZZ_CHECK(ids == tok.Encode(text, false),
               "plain everywhere differs from Encode(parse_special=false): " + Hex(text) + " -> " +
                   Ids(ids));
  }
}

std::vector<int32_t> ConsumeIds(const Tokenizer& tok, FuzzedDataProvider* in) {
  std::vector<int32_t> ids;
  while (in->remaining_bytes() > 0 && ids.size() < 2048) {
    // Mostly ids of the vocabulary (whose bytes split UTF-8 characters), some outside it.
    ids.push_back(in->ConsumeIntegralInRange<int32_t>(-3, tok.vocab_size() + 3));
  }
  return ids;
}

void FuzzDecode(const Loaded& l, FuzzedDataProvider* in, bool skip_special) {
  const Tokenizer& tok = *l.tokenizer;
  const std::vector<int32_t> ids = ConsumeIds(tok, in);
  const std::string text = tok.Decode(ids, skip_special);
  FUZZ_CHECK(unicode::IsValidUtf8(text), "Decode gave invalid UTF-8 for " + Ids(ids));
  std::vector<int32_t> kept;
  for (int32_t id : ids) {
    if (!tok.IsSpecial(id)) kept.push_back(id);
  }
  FUZZ_CHECK(tok.Decode(ids, true) == tok.Decode(kept, false),
             "skip_special is not dropping the special ids of " + Ids(ids));
}

void FuzzStreaming(const Loaded& l, FuzzedDataProvider* in, bool skip_special) {
  const Tokenizer& tok = *l.tokenizer;
  const std::vector<int32_t> ids = ConsumeIds(tok, in);
  StreamingDecoder decoder(tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string piece = decoder.Push(id);
    FUZZ_CHECK(unicode::IsValidUtf8(piece), "Push gave invalid UTF-8 for " + Ids(ids));
    streamed += piece;
  }
  const std::string rest = decoder.Flush();
  FUZZ_CHECK(unicode::IsValidUtf8(rest), "Flush gave invalid UTF-8 for " + Ids(ids));
  streamed += rest;
  const std::string whole = tok.Decode(ids, skip_special);
  FUZZ_CHECK(streamed == whole,
             "streamed " + Hex(streamed) + " != decoded " + Hex(whole) + " for " + Ids(ids));
  FUZZ_CHECK(decoder.Flush().empty(), "Flush did not reset");
}

}  // namespace
}  // namespace dysco

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  dysco::Get(false);
  dysco::Get(true);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  FuzzedDataProvider in(data + 1, size - 1);
  const uint8_t mode = data[0];
  const dysco::Loaded& l = dysco::Get(mode & 1);
  const bool skip_special = (mode & 8) != 0;
  switch ((mode >> 1) & 3) {
    case 0:
      dysco::FuzzEncode(l, in.ConsumeRemainingBytesAsString());
      break;
    case 1:
      dysco::FuzzPlainSpans(l, &in);
      break;
    case 2:
      dysco::FuzzDecode(l, &in, skip_special);
      break;
    default:
      dysco::FuzzStreaming(l, &in, skip_special);
      break;
  }
  return 0;
}
