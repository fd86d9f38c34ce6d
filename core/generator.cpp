#include "core/generator.h"

#include <algorithm>
#include <chrono>

#include "core/batch_stepper.h"

namespace dysco {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStopString:
      return "stop_string";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------------------
// StopStringMatcher

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings) {
  for (std::string& s : stop_strings) {
    if (!s.empty()) stops_.push_back(std::move(s));
  }
}

std::string StopStringMatcher::Push(const std::string& text) {
  if (matched_) return "";
  std::string buf = held_ + text;
  held_.clear();
  if (stops_.empty()) return buf;
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, buf.find(s));
  if (first != std::string::npos) {
    matched_ = true;
    buf.resize(first);
    return buf;
  }
  // Hold back the longest tail of buf that is a proper prefix of some stop string: the next text
  // may complete it.
  size_t hold = 0;
  for (const std::string& s : stops_) {
    for (size_t len = std::min(s.size() - 1, buf.size()); len > hold; --len) {
      if (buf.compare(buf.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  held_ = buf.substr(buf.size() - hold);
  buf.resize(buf.size() - hold);
  return buf;
}

std::string StopStringMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Sequence

Sequence::Sequence(std::vector<int32_t> prompt, SequenceParams params, const Tokenizer& tokenizer,
                   KvPagePool* pool)
    : params_(std::move(params)),
      tokens_(std::move(prompt)),
      num_prompt_(static_cast<int64_t>(tokens_.size())),
      pages_(pool),
      sampler_(params_.sampling),
      decoder_(tokenizer, /*skip_special=*/true),
      stop_matcher_(params_.stop_strings) {}

Status Sequence::PrepareStep(int64_t max_tokens, SequenceStep* step) {
  if (finished()) return FailedPreconditionError("sequence is finished");
  if (max_tokens <= 0) return InvalidArgumentError("max_tokens must be > 0");
  int64_t n = std::min(max_tokens, num_uncached());
  if (n == 0) return FailedPreconditionError("sequence has no uncached token to run");
  if (dysco_ != nullptr) {
    // DySCO: the prefill stops before the warm-up tokens, which (like every later token) go alone.
    const int64_t prefill_end = dysco_->prefill_length();
    n = num_cached_ < prefill_end ? std::min(n, prefill_end - num_cached_) : 1;
  }
  DYSCO_RETURN_IF_ERROR(pages_.EnsureCapacity(num_cached_ + n));
  pending_ = n;
  step->token_ids = ConstSpan<int32_t>(tokens_.data() + num_cached_, static_cast<size_t>(n));
  step->start_position = num_cached_;
  step->page_ids = ConstSpan<int32_t>(pages_.ids());
  step->key_bias = {};
  return OkStatus();
}

bool Sequence::CommitStep() {
  num_cached_ += pending_;
  pending_ = 0;
  return num_uncached() == 0;
}

TokenDelta Sequence::AcceptLogits(const float* logits, int vocab) {
  TokenDelta delta;
  const int32_t token = sampler_.Sample(logits, vocab, tokens_);
  delta.token_id = token;
  tokens_.push_back(token);
  const int64_t generated = num_tokens() - num_prompt_;
  const bool is_stop_token = std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(),
                                       token) != params_.stop_token_ids.end();
  if (is_stop_token) {
    finish_reason_ = FinishReason::kStop;
  } else {
    delta.text = stop_matcher_.Push(decoder_.Push(token));
    if (stop_matcher_.matched()) finish_reason_ = FinishReason::kStopString;
  }
  if (!finished() && (generated >= params_.max_new_tokens || num_tokens() >= params_.max_context)) {
    finish_reason_ = FinishReason::kLength;
  }
  if (finished() && finish_reason_ != FinishReason::kStopString) {
    // Flush the detokenizer's incomplete UTF-8 bytes and the matcher's held-back tail; the flushed
    // text may itself complete a stop string.
    delta.text += stop_matcher_.Push(decoder_.Flush());
    if (stop_matcher_.matched()) {
      finish_reason_ = FinishReason::kStopString;
    } else {
      delta.text += stop_matcher_.Flush();
    }
  }
  delta.finish_reason = finish_reason_;
  text_ += delta.text;
  return delta;
}

// ---------------------------------------------------------------------------------------------------------
// Prompt building

StatusOr<std::vector<int32_t>> BuildPromptTokens(const ModelConfig& config,
                                                 const Tokenizer& tokenizer,
                                                 const GenerateRequest& request) {
  const int sources = (!request.prompt.empty() ? 1 : 0) + (!request.messages.empty() ? 1 : 0) +
                      (!request.prompt_token_ids.empty() ? 1 : 0);
  if (sources == 0) {
    return InvalidArgumentError("request has no prompt (set prompt, messages or prompt_token_ids)");
  }
  if (sources > 1) {
    return InvalidArgumentError(
        "request has more than one of prompt, messages and prompt_token_ids");
  }
  if (!request.prompt_token_ids.empty()) {
    for (size_t i = 0; i < request.prompt_token_ids.size(); ++i) {
      const int32_t t = request.prompt_token_ids[i];
      if (t < 0 || t >= config.vocab_size) {
        return InvalidArgumentError("prompt_token_ids[" + std::to_string(i) +
                                    "] = " + std::to_string(t) + " is outside the vocabulary [0, " +
                                    std::to_string(config.vocab_size) + ")");
      }
    }
    return request.prompt_token_ids;
  }
  std::string text;
  bool formatted = false;
  if (!request.messages.empty() || request.chat) {
    std::vector<ChatMessage> messages = request.messages;
    if (messages.empty()) messages.push_back({"user", request.prompt});
    DYSCO_ASSIGN_OR_RETURN(text, FormatChat(config, messages));
    formatted = true;
  } else {
    text = request.prompt;
  }
  std::vector<int32_t> ids = tokenizer.Encode(text, /*parse_special=*/formatted);
  const auto& st = config.special_tokens;
  if (st.add_bos && st.bos_token_id && (ids.empty() || ids.front() != *st.bos_token_id)) {
    ids.insert(ids.begin(), *st.bos_token_id);
  }
  if (ids.empty()) return InvalidArgumentError("prompt encodes to no tokens");
  return ids;
}

// ---------------------------------------------------------------------------------------------------------
// Generator

Generator::Generator(ModelRunner* runner, KvPagePool* pool, const Tokenizer* tokenizer,
                     GeneratorOptions options)
    : runner_(runner), pool_(pool), tokenizer_(tokenizer), options_(options) {}

StatusOr<GenerateResult> Generator::Generate(const GenerateRequest& request,
                                             const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  const ModelConfig& config = runner_->config();
  DYSCO_RETURN_IF_ERROR(request.sampling.Validate());
  if (request.max_new_tokens < 1) {
    return InvalidArgumentError("max_new_tokens must be >= 1, got " +
                                std::to_string(request.max_new_tokens));
  }
  for (size_t i = 0; i < request.stop_strings.size(); ++i) {
    if (request.stop_strings[i].empty()) {
      return InvalidArgumentError("stop_strings[" + std::to_string(i) + "] is empty");
    }
  }
  for (size_t i = 0; i < request.stop_token_ids.size(); ++i) {
    if (request.stop_token_ids[i] < 0 || request.stop_token_ids[i] >= config.vocab_size) {
      return InvalidArgumentError("stop_token_ids[" + std::to_string(i) +
                                  "] is outside the vocabulary");
    }
  }
  if (options_.prefill_chunk_tokens < 1) {
    return InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  DYSCO_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                         BuildPromptTokens(config, *tokenizer_, request));
  const int64_t num_prompt = static_cast<int64_t>(prompt.size());
  if (num_prompt > config.max_position_embeddings) {
    return InvalidArgumentError("prompt has " + std::to_string(num_prompt) +
                                " tokens, more than the model's context of " +
                                std::to_string(config.max_position_embeddings));
  }

  SequenceParams params;
  params.max_new_tokens = request.max_new_tokens;
  params.sampling = request.sampling;
  params.stop_strings = request.stop_strings;
  const bool chat = request.chat || !request.messages.empty();
  if (chat) {
    params.stop_strings.insert(params.stop_strings.end(), config.chat.stop_strings.begin(),
                               config.chat.stop_strings.end());
  }
  params.stop_token_ids = config.special_tokens.eos_token_ids;
  params.stop_token_ids.insert(params.stop_token_ids.end(), request.stop_token_ids.begin(),
                               request.stop_token_ids.end());
  params.max_context = config.max_position_embeddings;

  Sequence seq(std::move(prompt), std::move(params), *tokenizer_, pool_);
  if (request.dysco) {
    const bool chat_formatted = IsChatFormatted(request);
    DYSCO_ASSIGN_OR_RETURN(
        DyscoParams dysco_params,
        ResolveDyscoParams(config, request.dysco_overrides, chat_formatted, num_prompt,
                           chat_formatted ? CountGenerationPromptTokens(config, *tokenizer_) : -1));
    DYSCO_ASSIGN_OR_RETURN(
        std::unique_ptr<DyscoController> controller,
        DyscoController::Create(std::move(dysco_params), seq.tokens(), request.dysco_trace));
    seq.AttachDysco(std::move(controller));
  }
  // The last sampled token is never fed back, so the cache holds at most prompt + max_new - 1
  // tokens. Reserving them now fails fast instead of midway through generation.
  DYSCO_RETURN_IF_ERROR(seq.ReservePages(
      std::min(num_prompt + request.max_new_tokens - 1, config.max_position_embeddings)));

  GenerateResult result;
  result.prompt_tokens = num_prompt;
  BatchStepper stepper(runner_, pool_);
  const std::vector<BatchStepEntry> entries{{&seq, options_.prefill_chunk_tokens}};
  std::vector<BatchStepResult> results;
  const auto start = Clock::now();
  auto first_token_time = start;
  bool first = true;
  while (!seq.finished()) {
    DYSCO_RETURN_IF_ERROR(stepper.Step(entries, &results));
    if (!results[0].sampled) continue;  // a prefill chunk or DySCO warm-up token before the last
    if (first) first_token_time = Clock::now();
    first = false;
    if (on_token) on_token(results[0].delta);
  }
  const auto end = Clock::now();
  seq.ReleasePages();
  if (seq.dysco() != nullptr) {
    result.dysco_trace = seq.dysco()->TakeTrace();
    result.dysco_totals = seq.dysco()->totals();
  }

  result.text = seq.text();
  result.token_ids = seq.generated_ids();
  result.generated_tokens = static_cast<int64_t>(result.token_ids.size());
  result.finish_reason = seq.finish_reason();
  result.prefill_seconds = std::chrono::duration<double>(first_token_time - start).count();
  result.decode_seconds = std::chrono::duration<double>(end - first_token_time).count();
  return result;
}

}  // namespace dysco
