#include "core/engine/request.h"

#include <cstdint>
#include <utility>

#include "core/base/format.h"

namespace dysco {

namespace {

Status Bad(const std::string& message) { return InvalidArgumentError(message); }

Status CheckTokenId(int64_t id, int64_t vocab_size, const std::string& field) {
  if (id < 0 || id >= vocab_size) {
    return Bad(field + " = " + std::to_string(id) + " is outside the vocabulary [0, " +
               std::to_string(vocab_size) + ")");
  }
  return OkStatus();
}

std::string Indexed(const char* field, size_t i) {
  return std::string(field) + "[" + std::to_string(i) + "]";
}

}  // namespace

StatusOr<SequenceFactory> SequenceFactory::Create(const ModelConfig& config,
                                                  const Tokenizer& tokenizer,
                                                  RequestLimits limits) {
  if (limits.max_new_tokens_limit < 1) return Bad("max_new_tokens_limit must be >= 1");
  if (limits.max_new_tokens_default < 1 ||
      limits.max_new_tokens_default > limits.max_new_tokens_limit) {
    return Bad("max_new_tokens_default must be in [1, max_new_tokens_limit]");
  }
  if (limits.max_context_tokens < 0 || limits.max_context_tokens > config.max_position_embeddings) {
    return Bad("max_context_tokens must be in [0, " +
               std::to_string(config.max_position_embeddings) + "]");
  }
  if (limits.max_context_tokens == 0) limits.max_context_tokens = config.max_position_embeddings;
  const size_t per_token = tokenizer.max_input_bytes_per_token();
  const size_t context = static_cast<size_t>(limits.max_context_tokens);
  const size_t max_bytes = per_token > SIZE_MAX / 4 / context ? SIZE_MAX / 4 : per_token * context;
  return SequenceFactory(config, tokenizer, limits, CountGenerationPromptTokens(config, tokenizer),
                         max_bytes);
}

Status SequenceFactory::CheckTextBytes(const std::string& field, size_t bytes) const {
  if (bytes <= max_prompt_bytes_) return OkStatus();
  return Bad(field + ": " + std::to_string(bytes) + " bytes cannot fit the context of " +
             std::to_string(limits_.max_context_tokens) + " tokens (at most " +
             std::to_string(max_prompt_bytes_) + " bytes)");
}

Status SequenceFactory::ValidatePromptSource(const GenerateRequest& r) const {
  const int sources = (!r.prompt.empty() ? 1 : 0) + (!r.messages.empty() ? 1 : 0) +
                      (!r.prompt_token_ids.empty() ? 1 : 0);
  if (sources == 0) return Bad("prompt is empty (set prompt, messages or prompt_token_ids)");
  if (sources > 1) {
    return Bad("prompt, messages, prompt_token_ids: set only one of them, got " +
               std::to_string(sources));
  }
  if (r.messages.size() > limits_.max_chat_messages) {
    return Bad("messages: at most " + std::to_string(limits_.max_chat_messages) +
               " messages, got " + std::to_string(r.messages.size()));
  }
  DYSCO_RETURN_IF_ERROR(CheckTextBytes("prompt", r.prompt.size()));
  size_t message_bytes = 0;
  for (const ChatMessage& m : r.messages) message_bytes += m.role.size() + m.content.size();
  DYSCO_RETURN_IF_ERROR(CheckTextBytes("messages", message_bytes));
  for (size_t i = 0; i < r.messages.size(); ++i) {
    if (!IsKnownChatRole(r.messages[i].role)) {
      return Bad(Indexed("messages", i) + ".role: unknown role " +
                 QuoteUntrusted(r.messages[i].role) + " (system, user, assistant or tool)");
    }
  }
  for (size_t i = 0; i < r.prompt_token_ids.size(); ++i) {
    DYSCO_RETURN_IF_ERROR(
        CheckTokenId(r.prompt_token_ids[i], config_->vocab_size, Indexed("prompt_token_ids", i)));
  }
  // Token ids are counted without encoding: a prompt over the context is refused here, before a
  // full queue could answer RESOURCE_EXHAUSTED to a request that no retry can make valid (text
  // prompts are counted once encoded, in Create).
  if (static_cast<int64_t>(r.prompt_token_ids.size()) > limits_.max_context_tokens) {
    return Bad("prompt_token_ids has " + std::to_string(r.prompt_token_ids.size()) +
               " tokens, more than the context of " + std::to_string(limits_.max_context_tokens));
  }
  return OkStatus();
}

Status SequenceFactory::ValidateStops(const GenerateRequest& r) const {
  if (r.stop_strings.size() > limits_.max_stop_strings) {
    return Bad("stop_strings: at most " + std::to_string(limits_.max_stop_strings) +
               " stop strings, got " + std::to_string(r.stop_strings.size()));
  }
  for (size_t i = 0; i < r.stop_strings.size(); ++i) {
    const std::string field = Indexed("stop_strings", i);
    if (r.stop_strings[i].empty()) return Bad(field + ": must not be empty");
    if (r.stop_strings[i].size() > limits_.max_stop_string_bytes) {
      return Bad(field + ": at most " + std::to_string(limits_.max_stop_string_bytes) +
                 " bytes, got " + std::to_string(r.stop_strings[i].size()));
    }
  }
  if (r.stop_token_ids.size() > limits_.max_stop_token_ids) {
    return Bad("stop_token_ids: at most " + std::to_string(limits_.max_stop_token_ids) +
               " ids, got " + std::to_string(r.stop_token_ids.size()));
  }
  for (size_t i = 0; i < r.stop_token_ids.size(); ++i) {
    DYSCO_RETURN_IF_ERROR(
        CheckTokenId(r.stop_token_ids[i], config_->vocab_size, Indexed("stop_token_ids", i)));
  }
  return OkStatus();
}

Status SequenceFactory::Validate(const GenerateRequest& r) const {
  DYSCO_RETURN_IF_ERROR(ValidatePromptSource(r));
  if (r.max_new_tokens < 0) {
    return Bad("max_new_tokens must be >= 0 (0 = the default), got " +
               std::to_string(r.max_new_tokens));
  }
  if (r.max_new_tokens > limits_.max_new_tokens_limit) {
    return Bad("max_new_tokens must be <= " + std::to_string(limits_.max_new_tokens_limit) +
               ", got " + std::to_string(r.max_new_tokens));
  }
  DYSCO_RETURN_IF_ERROR(r.sampling.Validate());
  DYSCO_RETURN_IF_ERROR(ValidateStops(r));
  return ValidateDyscoOverrides(*config_, r.dysco_overrides);
}

StatusOr<std::vector<int32_t>> SequenceFactory::BuildPrompt(const GenerateRequest& r) const {
  if (!r.prompt_token_ids.empty()) return r.prompt_token_ids;
  std::vector<int32_t> ids;
  if (IsChatFormatted(r)) {
    std::vector<ChatMessage> messages = r.messages;
    if (messages.empty()) messages.push_back({"user", r.prompt});
    DYSCO_ASSIGN_OR_RETURN(ChatPrompt chat,
                           RenderChat(config_->chat_format, config_->chat, messages));
    // Special tokens come from the template only, unless the caller opted in for its contents.
    ids = r.parse_special_in_messages
              ? tokenizer_->Encode(chat.text, /*parse_special=*/true)
              : tokenizer_->EncodeWithPlainSpans(chat.text, chat.content_spans);
  } else {
    ids = tokenizer_->Encode(r.prompt, /*parse_special=*/false);
  }
  const SpecialTokens& st = config_->special_tokens;
  if (st.add_bos && st.bos_token_id && (ids.empty() || ids.front() != *st.bos_token_id)) {
    ids.insert(ids.begin(), *st.bos_token_id);
  }
  if (ids.empty()) return Bad("prompt encodes to no tokens");
  return ids;
}

SequenceParams SequenceFactory::MakeSequenceParams(const GenerateRequest& r) const {
  SequenceParams params;
  params.max_new_tokens = r.max_new_tokens == 0 ? limits_.max_new_tokens_default : r.max_new_tokens;
  params.sampling = r.sampling;
  params.stop_strings = r.stop_strings;
  if (r.chat || !r.messages.empty()) {
    params.stop_strings.insert(params.stop_strings.end(), config_->chat.stop_strings.begin(),
                               config_->chat.stop_strings.end());
  }
  if (!r.ignore_eos) params.stop_token_ids = config_->special_tokens.eos_token_ids;
  params.stop_token_ids.insert(params.stop_token_ids.end(), r.stop_token_ids.begin(),
                               r.stop_token_ids.end());
  params.max_context = limits_.max_context_tokens;
  return params;
}

Status SequenceFactory::AttachDysco(const GenerateRequest& r, Sequence* sequence) const {
  const bool chat_formatted = IsChatFormatted(r);
  DYSCO_ASSIGN_OR_RETURN(
      DyscoParams params,
      ResolveDyscoParams(*config_, r.dysco_overrides, chat_formatted, sequence->num_prompt_tokens(),
                         chat_formatted ? generation_prompt_tokens_ : -1));
  DYSCO_ASSIGN_OR_RETURN(
      std::unique_ptr<DyscoController> controller,
      DyscoController::Create(std::move(params), sequence->tokens(), r.dysco_trace));
  sequence->AttachDysco(std::move(controller));
  return OkStatus();
}

StatusOr<std::unique_ptr<Sequence>> SequenceFactory::Create(const GenerateRequest& r,
                                                            KvPagePool* pool) const {
  DYSCO_RETURN_IF_ERROR(Validate(r));
  DYSCO_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, BuildPrompt(r));
  const int64_t num_prompt = static_cast<int64_t>(prompt.size());
  if (num_prompt > limits_.max_context_tokens) {
    return Bad("prompt has " + std::to_string(num_prompt) + " tokens, more than the context of " +
               std::to_string(limits_.max_context_tokens));
  }
  SequenceParams params = MakeSequenceParams(r);
  const int64_t max_new = params.max_new_tokens;
  auto sequence =
      std::make_unique<Sequence>(std::move(prompt), std::move(params), *tokenizer_, pool);
  const int64_t pages = pool->pages_for_tokens(sequence->max_cached_tokens());
  if (pages > pool->num_total()) {
    return ResourceExhaustedError("request needs " + std::to_string(pages) + " KV pages (prompt " +
                                  std::to_string(num_prompt) + " + max_new_tokens " +
                                  std::to_string(max_new) + " tokens) but the KV pool has only " +
                                  std::to_string(pool->num_total()));
  }
  if (r.dysco) DYSCO_RETURN_IF_ERROR(AttachDysco(r, sequence.get()));
  return sequence;
}

}  // namespace dysco
