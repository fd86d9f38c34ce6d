#include "core/engine/sequence.h"

#include <algorithm>

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
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadlineExceeded:
      return "deadline_exceeded";
    case FinishReason::kError:
      return "error";
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

int64_t Sequence::MaxTokensToFeed() const {
  if (finished()) return 0;
  if (dysco_ != nullptr) return dysco_->MaxTokensToFeed(num_cached_, num_uncached());
  return num_uncached();
}

Status Sequence::PrepareFeed(int64_t max_tokens, ForwardRow* row) {
  if (finished()) return FailedPreconditionError("sequence is finished");
  if (max_tokens <= 0) return InvalidArgumentError("max_tokens must be > 0");
  const int64_t n = std::min(max_tokens, MaxTokensToFeed());
  if (n == 0) return FailedPreconditionError("sequence has no uncached token to run");
  DYSCO_RETURN_IF_ERROR(pages_.EnsureCapacity(num_cached_ + n));
  pending_ = n;
  row->token_ids = ConstSpan<int32_t>(tokens_.data() + num_cached_, static_cast<size_t>(n));
  row->start_position = num_cached_;
  row->page_ids = ConstSpan<int32_t>(pages_.ids());
  row->key_bias = {};
  row->key_bias_device.reset();
  return OkStatus();
}

bool Sequence::CommitFeed() {
  num_cached_ += pending_;
  pending_ = 0;
  return num_uncached() == 0;
}

TokenDelta Sequence::AcceptLogits(const float* logits, int vocab) {
  return AcceptToken(sampler_.Sample(logits, vocab, tokens_));
}

TokenDelta Sequence::AcceptToken(int32_t token) {
  TokenDelta delta;
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

}  // namespace dysco
