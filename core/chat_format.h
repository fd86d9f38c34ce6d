// Chat formatting: renders a list of chat messages into the prompt text a model was trained on,
// exactly as the model's own chat template does ("chatml": SmolLM2 / Qwen3, "llama3": Llama 3.x),
// generation prompt included. The text is then encoded with special-token parsing on.
//
// Thread-safety: free functions over their arguments; safe from any thread.
// Ownership: returns a new string owned by the caller; on failure nothing is returned.
#pragma once

#include <string>
#include <vector>

#include "core/model_config.h"
#include "core/status.h"

namespace dysco {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant" | "tool"
  std::string content;
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
//   message, content trimmed of surrounding whitespace as the Llama 3 template does.
// Both append `chat.generation_prompt` when add_generation_prompt.
StatusOr<std::string> FormatChat(ChatFormat format, const ChatSettings& chat,
                                 const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt = true);

inline StatusOr<std::string> FormatChat(const ModelConfig& config,
                                        const std::vector<ChatMessage>& messages,
                                        bool add_generation_prompt = true) {
  return FormatChat(config.chat_format, config.chat, messages, add_generation_prompt);
}

}  // namespace dysco
