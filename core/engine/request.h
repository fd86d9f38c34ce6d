// A generation request as core/ sees it, and SequenceFactory: the one place where a request is
// validated, its defaults resolved and its prompt encoded, and where it becomes a Sequence
// (Triton's InferenceRequest::PrepareForInference). The server converts its proto into a
// GenerateRequest and checks only what is about the proto itself; the Generator, the Scheduler and
// the tools all go through the same factory, so every caller gets the same rules and the same
// messages.
//
// Every error is INVALID_ARGUMENT with a message that starts with the field, named as in
// GenerateRequest ("sampling.top_p must be in (0, 1], got 1.5", "stop_strings[2]: ...",
// "dysco.selected_heads[3]: ..."), except RESOURCE_EXHAUSTED for a request whose KV pages can never
// fit the pool and FAILED_PRECONDITION for a chat request to a package without a chat format.
//
// Thread-safety: SequenceFactory is immutable after Create; its methods may run on any number of
// threads at once. Ownership: the factory references the config and tokenizer (which must outlive
// it); Create returns a Sequence owned by the caller (its pages are not reserved yet).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/params.h"
#include "core/dysco/trace.h"
#include "core/engine/sampler.h"
#include "core/engine/sequence.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_config.h"
#include "core/text/chat_format.h"
#include "core/text/tokenizer.h"

namespace dysco {

struct GenerateRequest {
  // Exactly one prompt source: `prompt` (plain text, or with `chat` a single user message),
  // `messages` (always chat-formatted) or `prompt_token_ids` (used as is).
  std::string prompt;
  std::vector<ChatMessage> messages;
  std::vector<int32_t> prompt_token_ids;
  bool chat = false;
  // Chat prompts: special-token text inside message contents becomes special tokens (trusted callers
  // only); by default it is plain text and only the template opens and closes turns.
  bool parse_special_in_messages = false;
  int64_t max_new_tokens = 0;  // 0 = RequestLimits::max_new_tokens_default
  SamplingParams sampling;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;  // besides the model's eos ids
  bool ignore_eos = false;  // the model's eos ids do not stop it (benchmarks: exact lengths)
  // DySCO decoding (docs/dysco.md) with the package defaults overridden by `dysco_overrides`
  // (validated even when `dysco` is false).
  bool dysco = false;
  DyscoOverrides dysco_overrides;
  DyscoTraceMode dysco_trace = DyscoTraceMode::kOff;  // what the controller's trace keeps
};

// Whether the request's prompt is chat-formatted (which decides DySCO's auto intervention_warmup).
inline bool IsChatFormatted(const GenerateRequest& request) {
  return request.prompt_token_ids.empty() && (request.chat || !request.messages.empty());
}

// The bounds a deployment puts on requests (server flags), beside the model's own.
struct RequestLimits {
  int64_t max_new_tokens_default = 256;
  int64_t max_new_tokens_limit = 4096;
  int64_t max_context_tokens = 0;  // 0 = the model's max_position_embeddings
  size_t max_stop_strings = 16;
  size_t max_stop_string_bytes = 256;
  size_t max_stop_token_ids = 64;
  size_t max_chat_messages = 4096;
};

class SequenceFactory {
 public:
  // INVALID_ARGUMENT for inconsistent limits (max_new_tokens_default outside
  // [1, max_new_tokens_limit], max_context_tokens beyond the model's).
  static StatusOr<SequenceFactory> Create(const ModelConfig& config, const Tokenizer& tokenizer,
                                          RequestLimits limits);

  // Everything about `request` that does not need its prompt encoded: prompt sources, chat roles,
  // max_new_tokens, sampling, stops, token ids against the vocabulary, the DySCO overrides' ranges.
  Status Validate(const GenerateRequest& request) const;
  // Validate, then encode the prompt (BuildPrompt), check it against the context, resolve the DySCO
  // parameters against it, and check that the sequence's pages can ever fit `pool`.
  StatusOr<std::unique_ptr<Sequence>> Create(const GenerateRequest& request,
                                             KvPagePool* pool) const;
  // The prompt tokens of a valid request: chat formatting for `messages` or `chat`, bos prepended
  // per the config when add_bos is set and the text does not already start with it.
  StatusOr<std::vector<int32_t>> BuildPrompt(const GenerateRequest& request) const;

  // INVALID_ARGUMENT naming `field` when `bytes` of text cannot fit the context whatever they encode
  // to (more than max_prompt_bytes()): checked before any tokenization, so that a huge prompt costs
  // no CPU.
  Status CheckTextBytes(const std::string& field, size_t bytes) const;
  // max_context_tokens x Tokenizer::max_input_bytes_per_token().
  size_t max_prompt_bytes() const { return max_prompt_bytes_; }

  // Limits with max_context_tokens resolved (never 0).
  const RequestLimits& limits() const { return limits_; }
  const ModelConfig& config() const { return *config_; }

 private:
  SequenceFactory(const ModelConfig& config, const Tokenizer& tokenizer, RequestLimits limits,
                  int64_t generation_prompt_tokens, size_t max_prompt_bytes)
      : config_(&config),
        tokenizer_(&tokenizer),
        limits_(limits),
        generation_prompt_tokens_(generation_prompt_tokens),
        max_prompt_bytes_(max_prompt_bytes) {}
  Status ValidatePromptSource(const GenerateRequest& request) const;
  Status ValidateStops(const GenerateRequest& request) const;
  SequenceParams MakeSequenceParams(const GenerateRequest& request) const;
  Status AttachDysco(const GenerateRequest& request, Sequence* sequence) const;

  const ModelConfig* config_;
  const Tokenizer* tokenizer_;
  RequestLimits limits_;
  int64_t generation_prompt_tokens_;  // DySCO's auto intervention_warmup for chat prompts
  size_t max_prompt_bytes_;
};

}  // namespace dysco
