// Sequence: one generation's state: its tokens (prompt + generated), its KV pages, its sampler,
// streaming detokenizer and stop matching, and with DySCO its DyscoController. It knows nothing of
// the loop that drives it: BatchStepper feeds it (PrepareFeed / CommitFeed / AcceptLogits), the
// Generator and the Scheduler decide when.
//
// Thread-safety: a Sequence (and its StopStringMatcher) belongs to one driver thread at a time.
// Ownership: a Sequence owns its pages (returned to the pool when it is destroyed or ReleasePages
// is called, so every exit path frees them) and its DyscoController (relevance state and trace,
// freed with it); it references the tokenizer and the pool, which must outlive it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/controller.h"
#include "core/engine/finish_reason.h"
#include "core/engine/sampler.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"
#include "core/text/tokenizer.h"

namespace dysco {

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

// What a sequence needs besides its prompt (resolved by SequenceFactory, core/engine/request.h).
struct SequenceParams {
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;  // eos ids included
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
  // `prompt` must be non-empty and at most params.max_context tokens; params already validated.
  Sequence(std::vector<int32_t> prompt, SequenceParams params, const Tokenizer& tokenizer,
           KvPagePool* pool);
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  // Makes this a DySCO sequence (before its first step): from then on its feeding follows
  // DyscoController::MaxTokensToFeed.
  void AttachDysco(std::unique_ptr<DyscoController> dysco) { dysco_ = std::move(dysco); }
  DyscoController* dysco() { return dysco_.get(); }
  const DyscoController* dysco() const { return dysco_.get(); }

  // How many of the uncached tokens the next step may feed at most: all of them for a plain
  // sequence (the caller chunks), the DySCO rule otherwise. 0 when finished.
  int64_t MaxTokensToFeed() const;

  // Fills `row` with the next min(max_tokens, MaxTokensToFeed()) uncached tokens, allocating pages
  // for them (RESOURCE_EXHAUSTED, nothing taken, when the pool is full). `row` views this
  // sequence's buffers: it stays valid until CommitFeed or AbortFeed.
  Status PrepareFeed(int64_t max_tokens, ForwardRow* row);
  // Marks the tokens of the last PrepareFeed as cached. Returns true when no uncached token is
  // left, i.e. the step's logits predict the next token and must be passed to AcceptLogits.
  bool CommitFeed();
  // Forgets the last PrepareFeed (its step was not run); the pages stay with the sequence.
  void AbortFeed() { pending_ = 0; }
  // Samples the next token from the logits of the last cached token and updates text and stop
  // state.
  TokenDelta AcceptLogits(const float* logits, int vocab);
  // The same with the token already picked: GreedyTokenId of those logits, which is what
  // AcceptLogits samples when !needs_logits().
  TokenDelta AcceptToken(int32_t token);
  // Whether sampling needs the logits on the host; false for plain greedy sampling, whose token
  // the runner can pick where the logits are (ForwardBatch::logits_to_host).
  bool needs_logits() const { return !params_.sampling.plain_greedy(); }
  // Reserves pages for `num_tokens` tokens ahead of time (RESOURCE_EXHAUSTED when they do not fit).
  Status ReservePages(int64_t num_tokens) { return pages_.EnsureCapacity(num_tokens); }
  void ReleasePages() { pages_.Release(); }
  // The most tokens the cache will ever hold for this sequence: prompt + max_new_tokens - 1 (the
  // last sampled token is never fed back), capped by the context. What admission reserves.
  int64_t max_cached_tokens() const {
    return std::min(num_prompt_ + params_.max_new_tokens - 1, params_.max_context);
  }

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
  int64_t pending_ = 0;  // tokens handed out by the last PrepareFeed
  PageList pages_;
  Sampler sampler_;
  StreamingDecoder decoder_;
  StopStringMatcher stop_matcher_;
  std::string text_;
  FinishReason finish_reason_ = FinishReason::kNone;
  std::unique_ptr<DyscoController> dysco_;
};

}  // namespace dysco
