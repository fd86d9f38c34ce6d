#include "core/text/chat_format.h"

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

// Jinja's `trim`: strips leading and trailing whitespace.
std::string Trim(const std::string& s) {
  const char* kSpace = " \t\n\r\f\v";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string::npos) return "";
  const size_t end = s.find_last_not_of(kSpace);
  return s.substr(begin, end - begin + 1);
}

void AppendChatml(const std::string& role, const std::string& content, std::string* out) {
  out->append("<|im_start|>").append(role).append("\n").append(content).append("<|im_end|>\n");
}

}  // namespace

StatusOr<std::string> FormatChat(ChatFormat format, const ChatSettings& chat,
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
                                  "].role must be one of system, "
                                  "user, assistant, tool; got \"" +
                                  messages[i].role + "\"");
    }
  }

  std::string out;
  if (format == ChatFormat::kChatml) {
    if (chat.default_system && messages[0].role != "system") {
      AppendChatml("system", *chat.default_system, &out);
    }
    for (const ChatMessage& m : messages) AppendChatml(m.role, m.content, &out);
  } else {  // kLlama3
    out = "<|begin_of_text|>";
    for (const ChatMessage& m : messages) {
      out.append("<|start_header_id|>").append(m.role).append("<|end_header_id|>\n\n");
      out.append(Trim(m.content)).append("<|eot_id|>");
    }
  }
  if (add_generation_prompt) out += chat.generation_prompt;
  return out;
}

}  // namespace dysco
