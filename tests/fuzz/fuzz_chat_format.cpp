// libFuzzer target: chat formatting (core/text/chat_format.h), RenderChat and FormatChat of fuzzed
// messages in both formats (and "none"), with fuzzed chat settings. The result is checked against
// the templates written out independently here:
//   chatml: [<|im_start|>system\n{default_system}<|im_end|>\n] +
//   <|im_start|>{role}\n{content}<|im_end|>\n llama3: <|begin_of_text|> +
//   <|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>
// then the generation prompt; content repaired to valid UTF-8 and, for llama3, trimmed as Jinja's
// `trim` does (Python's str.strip(): every Unicode whitespace character). content_spans must be
// sorted, disjoint, non-empty, inside the text, one per message whose content is not empty, and
// each span's bytes that message's (repaired) content. Errors: FAILED_PRECONDITION for "none",
// INVALID_ARGUMENT naming messages[i].role for the first unknown role, or for no messages.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/text/chat_format.h"
#include "core/text/unicode_text.h"
#include "tests/fuzz/fuzz_check.h"

namespace dysco {
namespace {

// Python's str.isspace(): general category Zs or bidirectional class WS, B or S.
bool IsPythonSpace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Jinja's `trim` filter (Python's str.strip()) over valid UTF-8.
std::string JinjaTrim(const std::string& s) {
  std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, code point)
  for (size_t pos = 0, len = 0; pos < s.size(); pos += len) {
    chars.emplace_back(pos, unicode::DecodeValidUtf8(s, pos, &len));
  }
  size_t first = 0, last = chars.size();
  while (first < last && IsPythonSpace(chars[first].second)) ++first;
  while (last > first && IsPythonSpace(chars[last - 1].second)) --last;
  if (first == last) return "";
  const size_t end = last == chars.size() ? s.size() : chars[last].first;
  return s.substr(chars[first].first, end - chars[first].first);
}

const char* const kRoles[] = {"system", "user", "assistant", "tool"};

struct Expected {
  std::string text;
  std::vector<std::pair<size_t, size_t>> spans;
};

void AddContent(const std::string& content, Expected* e) {
  const size_t begin = e->text.size();
  e->text += content;
  if (!content.empty()) e->spans.emplace_back(begin, e->text.size());
}

Expected Render(ChatFormat format, const ChatSettings& chat,
                const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  Expected e;
  if (format == ChatFormat::kChatml) {
    if (chat.default_system && messages[0].role != "system") {
      e.text += "<|im_start|>system\n" + *chat.default_system + "<|im_end|>\n";
    }
    for (const ChatMessage& m : messages) {
      e.text += "<|im_start|>" + m.role + "\n";
      AddContent(unicode::Utf8Lossy(m.content), &e);
      e.text += "<|im_end|>\n";
    }
  } else {
    e.text = "<|begin_of_text|>";
    for (const ChatMessage& m : messages) {
      e.text += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n";
      AddContent(JinjaTrim(unicode::Utf8Lossy(m.content)), &e);
      e.text += "<|eot_id|>";
    }
  }
  if (add_generation_prompt) e.text += chat.generation_prompt;
  return e;
}

std::string Hex(const std::string& s) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s.substr(0, 400)) {
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}

std::string Spans(const std::vector<std::pair<size_t, size_t>>& spans) {
  std::string s;
  for (const auto& [b, e] : spans) s += "[" + std::to_string(b) + "," + std::to_string(e) + ") ";
  return s;
}

void Fuzz(FuzzedDataProvider* in) {
  const uint8_t flags = in->ConsumeIntegral<uint8_t>();
  const ChatFormat format = (flags & 3) == 0   ? ChatFormat::kChatml
                            : (flags & 3) == 1 ? ChatFormat::kLlama3
                            : (flags & 3) == 2 ? ChatFormat::kChatml
                                               : ChatFormat::kNone;
  const bool add_generation_prompt = (flags & 4) == 0;
  ChatSettings chat;
  if (flags & 8) chat.default_system = in->ConsumeRandomLengthString(64);
  chat.generation_prompt = (flags & 16) ? in->ConsumeRandomLengthString(32)
                           : format == ChatFormat::kLlama3
                               ? "<|start_header_id|>assistant<|end_header_id|>\n\n"
                               : "<|im_start|>assistant\n";
  std::vector<ChatMessage> messages;
  int first_unknown = -1;
  while (in->remaining_bytes() > 0 && messages.size() < 64) {
    const uint8_t r = in->ConsumeIntegral<uint8_t>();
    ChatMessage m;
    m.role = r < 250 ? kRoles[r % 4] : in->ConsumeRandomLengthString(16);
    m.content = in->ConsumeRandomLengthString(4096);
    if (first_unknown < 0 && !IsKnownChatRole(m.role))
      first_unknown = static_cast<int>(messages.size());
    messages.push_back(std::move(m));
  }

  StatusOr<ChatPrompt> prompt = RenderChat(format, chat, messages, add_generation_prompt);
  StatusOr<std::string> text = FormatChat(format, chat, messages, add_generation_prompt);
  FUZZ_CHECK(prompt.ok() == text.ok(), "RenderChat and FormatChat disagree");
  if (format == ChatFormat::kNone) {
    FUZZ_CHECK(prompt.status().code() == StatusCode::kFailedPrecondition,
               prompt.status().ToString());
    return;
  }
  if (messages.empty()) {
    FUZZ_CHECK(prompt.status().code() == StatusCode::kInvalidArgument, prompt.status().ToString());
    return;
  }
  if (first_unknown >= 0) {
    FUZZ_CHECK(prompt.status().code() == StatusCode::kInvalidArgument, prompt.status().ToString());
    const std::string field = "messages[" + std::to_string(first_unknown) + "].role";
    FUZZ_CHECK(prompt.status().message().rfind(field, 0) == 0, prompt.status().ToString());
    return;
  }
  FUZZ_CHECK(prompt.ok(), prompt.status().ToString());
  const ChatPrompt& p = prompt.value();
  FUZZ_CHECK(p.text == text.value(), "FormatChat's text differs from RenderChat's");

  // The spans: sorted, disjoint, non-empty, in bounds, valid UTF-8.
  size_t previous_end = 0;
  for (const auto& [b, e] : p.content_spans) {
    FUZZ_CHECK(b >= previous_end && b < e && e <= p.text.size(), Spans(p.content_spans));
    FUZZ_CHECK(unicode::IsValidUtf8(std::string_view(p.text).substr(b, e - b)),
               "span [" + std::to_string(b) + "," + std::to_string(e) + ") is not valid UTF-8");
    previous_end = e;
  }
  const Expected want = Render(format, chat, messages, add_generation_prompt);
  FUZZ_CHECK(p.text == want.text, std::string(ChatFormatName(format)) +
                                      " text differs from the template (hex):\n  got  " +
                                      Hex(p.text) + "\n  want " + Hex(want.text));
  FUZZ_CHECK(p.content_spans == want.spans,
             "spans " + Spans(p.content_spans) + " want " + Spans(want.spans));
}

}  // namespace
}  // namespace dysco

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  dysco::Fuzz(&in);
  return 0;
}
