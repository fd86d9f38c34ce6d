// Conversion of dysco.v1 requests into core requests, with the checks that are about the proto
// itself: which oneof input is set, an input that is set but empty, proto-only constraints (chat
// with token ids, clear_template_sequences with template_sequences, DySCO top_p / top_k of 0, which
// the proto cannot express as "off"), and the request id that goes into the logs. Everything about
// the request's meaning (ranges, vocabulary, limits, roles, DySCO parameters) is validated once, by
// core's SequenceFactory (core/engine/request.h), whose messages name core's fields;
// ToProtoFieldPath renames them to the proto's field paths.
//
// Every error is INVALID_ARGUMENT and its message starts with the field as a client writes it:
// "token_ids.ids[3] = 50000 is outside the vocabulary [0, 49152)".
//
// Thread-safety: pure functions. Ownership: results are owned by the caller; nothing on failure.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "core/base/status.h"
#include "core/engine/scheduler.h"
#include "core/text/chat_format.h"
#include "dysco/v1/generation.pb.h"

namespace dysco::server {

inline constexpr size_t kMaxRequestIdBytes = 128;

// Converts `request`. The SessionRequest's request_id is the client's (possibly empty: the caller
// generates one); its deadline is left unset.
StatusOr<SessionRequest> ToSessionRequest(const v1::GenerateRequest& request);

// The messages of a ChatMessages input (roles are checked by core).
std::vector<ChatMessage> ToChatMessages(const v1::ChatMessages& messages);

// Empty, or 1..kMaxRequestIdBytes printable ASCII characters without spaces (it goes into logs).
Status ValidateRequestId(const std::string& request_id);

// A core status whose message starts with a core field path, renamed to the proto's path where the
// two differ (messages[i] -> messages.messages[i], prompt_token_ids[i] -> token_ids.ids[i],
// stop_strings -> stop).
Status ToProtoFieldPath(const Status& status);

}  // namespace dysco::server
