// Single-sequence text generation over ModelRunner + KvPagePool + Tokenizer + Sampler.
//
// The per-sequence state (tokens, pages, sampler, detokenizer, stop matching, and with DySCO its
// DyscoController) lives in `Sequence`, which knows nothing of the loop that drives it:
// `Generator` drives one Sequence through a BatchStepper (core/batch_stepper.h), which a batching
// scheduler uses the same way for many sequences at once.
//
// Thread-safety: a Sequence and a StopStringMatcher belong to one driver thread.
// Generator::Generate may be called from several threads at once (the runner serialises its steps,
// the pool is thread-safe), each call owning its own Sequence.
//
// Ownership: the Generator references (does not own) runner, pool and tokenizer, which must outlive
// it. A Sequence owns its pages (returned to the pool when it is destroyed or ReleasePages is
// called, so every exit path frees them) and its DyscoController (relevance state and trace, freed
// with it), and references the tokenizer and pool. Results are owned by the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/chat_format.h"
#include "core/dysco.h"
#include "core/kv_page_pool.h"
#include "core/model_config.h"
#include "core/model_runner.h"
#include "core/sampler.h"
#include "core/status.h"
#include "core/tokenizer.h"

namespace dysco {

enum class FinishReason {
  kNone,        // still running
  kStop,        // an eos token or a stop token id was generated
  kLength,      // max_new_tokens reached, or the context is full
  kStopString,  // a stop string appeared; the text ends right before it
};
const char* FinishReasonName(FinishReason reason);  // "none", "stop", "length", "stop_string"

// Streams text while holding back the tail that could be the start of a stop string, so that a stop
// string split across tokens is never partly emitted.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stop_strings);
  // Appends generated text; returns the text that is now safe to emit. Once a stop string is found,
  // matched() is true, the returned text ends right before it, and later calls return "".
  std::string Push(const std::string& text);
  // End of generation without a match: returns the held-back text.
  std::string Flush();
  bool matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool matched_ = false;
};

// What a sequence needs besides its prompt.
struct SequenceParams {
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;  // eos ids included by the caller
  int64_t max_context = 0;              // total tokens (prompt + generated) at most
};

// The text produced by one accepted token.
struct TokenDelta {
  int32_t token_id = -1;
  std::string text;  // may be empty (a held-back stop-string prefix or a split UTF-8 character)
  FinishReason finish_reason = FinishReason::kNone;
};

class Sequence {
 public:
  // `prompt` must be non-empty and shorter than or equal to params.max_context; sampling already
  // validated.
  Sequence(std::vector<int32_t> prompt, SequenceParams params, const Tokenizer& tokenizer,
           KvPagePool* pool);
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  // Makes this a DySCO sequence (before its first step): the prefill then stops at
  // dysco->prefill_length() and every later token is fed alone.
  void AttachDysco(std::unique_ptr<DyscoController> dysco) { dysco_ = std::move(dysco); }
  DyscoController* dysco() { return dysco_.get(); }
  const DyscoController* dysco() const { return dysco_.get(); }

  // Fills `step` with the next (at most max_tokens) tokens whose K/V is not cached yet, allocating
  // pages for them (RESOURCE_EXHAUSTED, nothing taken, when the pool is full). `step` views this
  // sequence's buffers: it stays valid until CommitStep.
  Status PrepareStep(int64_t max_tokens, SequenceStep* step);
  // Marks the tokens of the last PrepareStep as cached. Returns true when no uncached token is
  // left, i.e. the step's logits predict the next token and must be passed to AcceptLogits.
  bool CommitStep();
  // Forgets the last PrepareStep (its step was not run); the pages stay with the sequence.
  void AbortStep() { pending_ = 0; }
  // Samples the next token from the logits of the last cached token and updates text and stop
  // state.
  TokenDelta AcceptLogits(const float* logits, int vocab);
  // Reserves pages for `num_tokens` tokens ahead of time (RESOURCE_EXHAUSTED when they do not fit).
  Status ReservePages(int64_t num_tokens) { return pages_.EnsureCapacity(num_tokens); }
  void ReleasePages() { pages_.Release(); }

  bool finished() const { return finish_reason_ != FinishReason::kNone; }
  FinishReason finish_reason() const { return finish_reason_; }
  int64_t num_prompt_tokens() const { return num_prompt_; }
  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t num_cached() const { return num_cached_; }
  int64_t num_uncached() const { return num_tokens() - num_cached_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }  // prompt + generated
  std::vector<int32_t> generated_ids() const {
    return std::vector<int32_t>(tokens_.begin() + num_prompt_, tokens_.end());
  }
  const std::string& text() const { return text_; }  // everything emitted so far
  const PageList& pages() const { return pages_; }

 private:
  SequenceParams params_;
  std::vector<int32_t> tokens_;
  int64_t num_prompt_ = 0;
  int64_t num_cached_ = 0;
  int64_t pending_ = 0;  // tokens handed out by the last PrepareStep
  PageList pages_;
  Sampler sampler_;
  StreamingDecoder decoder_;
  StopStringMatcher stop_matcher_;
  std::string text_;
  FinishReason finish_reason_ = FinishReason::kNone;
  std::unique_ptr<DyscoController> dysco_;
};

struct GenerateRequest {
  // Exactly one prompt source: `prompt` (plain text, or with `chat` a single user message),
  // `messages` (always chat-formatted) or `prompt_token_ids` (used as is).
  std::string prompt;
  std::vector<ChatMessage> messages;
  std::vector<int32_t> prompt_token_ids;
  bool chat = false;
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;  // besides the model's eos ids
  // DySCO decoding (docs/dysco.md) with the package defaults overridden by `dysco_overrides`.
  bool dysco = false;
  DyscoOverrides dysco_overrides;
  DyscoTraceMode dysco_trace = DyscoTraceMode::kOff;  // what GenerateResult::dysco_trace keeps
};

struct GenerateResult {
  std::string text;
  std::vector<int32_t> token_ids;  // generated tokens (a final eos / stop token included)
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_seconds = 0.0;  // until the first token was sampled
  double decode_seconds = 0.0;   // after it
  // DySCO only: one record per DySCO step (empty unless request.dysco_trace), and the counters.
  std::vector<DyscoTraceRecord> dysco_trace;
  DyscoTotals dysco_totals;
};

struct GeneratorOptions {
  int64_t prefill_chunk_tokens = 512;
};

// Encodes the request's prompt: chat formatting for `messages` or `chat`, bos prepended per the
// config when add_bos is set and the text does not already start with it. INVALID_ARGUMENT for none
// or several prompt sources, an empty prompt, or chat formatting errors.
StatusOr<std::vector<int32_t>> BuildPromptTokens(const ModelConfig& config,
                                                 const Tokenizer& tokenizer,
                                                 const GenerateRequest& request);
// Whether BuildPromptTokens chat-formats the request (which decides DySCO's auto
// intervention_warmup).
inline bool IsChatFormatted(const GenerateRequest& request) {
  return request.prompt_token_ids.empty() && (request.chat || !request.messages.empty());
}

class Generator {
 public:
  Generator(ModelRunner* runner, KvPagePool* pool, const Tokenizer* tokenizer,
            GeneratorOptions options = {});

  using TokenCallback = std::function<void(const TokenDelta&)>;
  // Generates until a finish reason; `on_token` (optional) sees every accepted token as it is
  // produced. INVALID_ARGUMENT for a bad request (field named; DySCO parameters as
  // "dysco.<field>"), RESOURCE_EXHAUSTED when the KV pool cannot hold the prompt + max_new_tokens,
  // INTERNAL for a model failure. Pages and DySCO state are freed on every path.
  StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                    const TokenCallback& on_token = nullptr);

 private:
  ModelRunner* runner_;
  KvPagePool* pool_;
  const Tokenizer* tokenizer_;
  GeneratorOptions options_;
};

}  // namespace dysco
