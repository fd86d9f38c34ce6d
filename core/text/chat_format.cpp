#include "core/text/chat_format.h"

#include "core/base/format.h"
#include "core/text/unicode_text.h"

namespace dysco {

bool IsKnownChatRole(const std::string& role) {
  return role == "system" || role == "user" || role == "assistant" || role == "tool";
}

const char* ChatFormatName(ChatFormat format) {
  switch (format) {
    case ChatFormat::kNone:
      return "none";
    case ChatFormat::kChatml:
      return "chatml";
    case ChatFormat::kLlama3:
      return "llama3";
  }
  return "unknown";
}

namespace {

// What Python's str.isspace() (and so Jinja's `trim`) counts as whitespace: Unicode White_Space
// plus U+001C..U+001F (bidirectional class B or S).
bool IsPythonSpace(char32_t cp) { return unicode::IsWhiteSpace(cp) || (cp >= 0x1C && cp <= 0x1F); }

// Jinja's `trim` (Python's str.strip()) over valid UTF-8: strips leading and trailing whitespace,
// every Unicode whitespace character included (U+00A0, U+3000, ...), not only ASCII's.
std::string Trim(const std::string& s) {
  size_t begin = 0, len = 0;
  while (begin < s.size() && IsPythonSpace(unicode::DecodeValidUtf8(s, begin, &len))) begin += len;
  size_t end = s.size();
  while (end > begin) {
    size_t start = end - 1;  // the first byte of the last character
    while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    if (!IsPythonSpace(unicode::DecodeValidUtf8(s, start, &len))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

std::string Repaired(const std::string& content) {
  return unicode::IsValidUtf8(content) ? content : unicode::Utf8Lossy(content);
}

// Appends a client's content, valid UTF-8 (repaired if need be, so spans stay byte-exact), and
// records where it is.
void AppendContent(const std::string& content, ChatPrompt* out) {
  const size_t begin = out->text.size();
  out->text += Repaired(content);
  if (out->text.size() > begin) out->content_spans.emplace_back(begin, out->text.size());
}

void AppendChatml(const std::string& role, const std::string& content, bool trusted,
                  ChatPrompt* out) {
  out->text.append("<|im_start|>").append(role).append("\n");
  if (trusted) {
    out->text += content;
  } else {
    AppendContent(content, out);
  }
  out->text.append("<|im_end|>\n");
}

}  // namespace

StatusOr<std::string> FormatChat(ChatFormat format, const ChatSettings& chat,
                                 const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt) {
  DYSCO_ASSIGN_OR_RETURN(ChatPrompt prompt,
                         RenderChat(format, chat, messages, add_generation_prompt));
  return std::move(prompt.text);
}

StatusOr<ChatPrompt> RenderChat(ChatFormat format, const ChatSettings& chat,
                                const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) {
  if (format == ChatFormat::kNone) {
    return FailedPreconditionError(
        "the model has no chat format (config.json chat_format is \"none\")");
  }
  if (messages.empty()) return InvalidArgumentError("messages must not be empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!IsKnownChatRole(messages[i].role)) {
      return InvalidArgumentError("messages[" + std::to_string(i) +
                                  "].role must be one of system, user, assistant, tool; got " +
                                  QuoteUntrusted(messages[i].role));
    }
  }

  ChatPrompt out;
  if (format == ChatFormat::kChatml) {
    if (chat.default_system && messages[0].role != "system") {
      AppendChatml("system", *chat.default_system, /*trusted=*/true, &out);  // the package's
    }
    for (const ChatMessage& m : messages) AppendChatml(m.role, m.content, false, &out);
  } else {  // kLlama3
    out.text = "<|begin_of_text|>";
    for (const ChatMessage& m : messages) {
      out.text.append("<|start_header_id|>").append(m.role).append("<|end_header_id|>\n\n");
      AppendContent(Trim(Repaired(m.content)), &out);  // Jinja trims decoded text
      out.text.append("<|eot_id|>");
    }
  }
  if (add_generation_prompt) out.text += chat.generation_prompt;
  return out;
}

}  // namespace dysco
