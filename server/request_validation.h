// Proto-level validation of dysco.v1 requests and their conversion into core requests. What only
// the engine can judge (prompt length against the context and the KV pool, DySCO warm-up against
// the prompt, ...) is left to Scheduler::Submit, whose statuses name the field the same way.
//
// Every error is INVALID_ARGUMENT and its message starts with the field as a client writes it:
// "token_ids.ids[3]: 50000 is outside the vocabulary [0, 49152)".
//
// Thread-safety: pure functions. Ownership: results are owned by the caller; nothing on failure.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/text/chat_format.h"
#include "core/engine/scheduler.h"
#include "core/base/status.h"
#include "dysco/v1/generation.pb.h"

namespace dysco::server {

// Bounds of the request fields that are not the model's business.
inline constexpr size_t kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr size_t kMaxStopTokenIds = 64;
inline constexpr size_t kMaxRequestIdBytes = 128;
inline constexpr size_t kMaxChatMessages = 4096;

struct RequestLimits {
  int64_t vocab_size = 0;
  int num_layers = 0;
  int num_attention_heads = 0;
  int64_t max_new_tokens_limit = 0;
};

// Validates `request` and converts it. The SessionRequest's request_id is the client's (possibly
// empty: the caller generates one); its deadline is left unset.
StatusOr<SessionRequest> ToSessionRequest(const v1::GenerateRequest& request,
                                          const RequestLimits& limits);

// Validates chat messages (non-empty list, known roles); `field` prefixes error messages.
StatusOr<std::vector<ChatMessage>> ToChatMessages(const v1::ChatMessages& messages,
                                                  const std::string& field);

// Empty, or 1..kMaxRequestIdBytes printable ASCII characters without spaces (it goes into logs).
Status ValidateRequestId(const std::string& request_id);

}  // namespace dysco::server
