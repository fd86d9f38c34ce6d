// Chat formatting: renders a list of chat messages into the prompt text a model was trained on,
// exactly as the model's own chat template does ("chatml": SmolLM2 / Qwen3, "llama3": Llama 3.x),
// generation prompt included. The text is then encoded with special tokens parsed only outside the
// message contents (ChatPrompt::content_spans).
//
// Thread-safety: free functions over their arguments; safe from any thread.
// Ownership: returns a new string owned by the caller; on failure nothing is returned.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"

namespace dysco {

enum class ChatFormat { kNone, kChatml, kLlama3 };
const char* ChatFormatName(ChatFormat format);  // "none", "chatml", "llama3"

// The parts of a model's chat template that vary between packages (config.json "chat").
struct ChatSettings {
  std::optional<std::string> default_system;  // inserted when the first message is not "system"
  std::string generation_prompt;              // appended after the messages
  std::vector<std::string> stop_strings;      // extra stop strings for chat generation
};

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant" | "tool"
  std::string content;
};

// "system", "user", "assistant" or "tool": the roles every supported format renders.
bool IsKnownChatRole(const std::string& role);

// A rendered chat prompt and where the clients' message contents lie in it (sorted half-open byte
// ranges): Tokenizer::EncodeWithPlainSpans encodes special tokens only outside them, so that
// content cannot forge a turn.
struct ChatPrompt {
  std::string text;
  std::vector<std::pair<size_t, size_t>> content_spans;
};

// Renders `messages`. Errors: INVALID_ARGUMENT naming `messages[i].role` for an unknown role or
// "messages" when empty; FAILED_PRECONDITION when the format is kNone (the model has no chat
// template).
//
// chatml: "<|im_start|>{role}\n{content}<|im_end|>\n" per message; when `chat.default_system` is
// set and
//   the first message is not "system", a system message with it comes first (SmolLM2's template
//   does this; Qwen3 has none).
// llama3: "<|begin_of_text|>" then
// "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>" per
//   message, content trimmed of surrounding whitespace as the Llama 3 template's `| trim` does
//   (Python's str.strip(): every Unicode whitespace character, U+001C..U+001F included).
// Both append `chat.generation_prompt` when add_generation_prompt. Content that is not valid UTF-8
// is repaired (U+FFFD) so that the spans are exact.
StatusOr<ChatPrompt> RenderChat(ChatFormat format, const ChatSettings& chat,
                                const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt = true);
// RenderChat's text alone.
StatusOr<std::string> FormatChat(ChatFormat format, const ChatSettings& chat,
                                 const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt = true);

}  // namespace dysco
