#include "server/request_validation.h"

#include <cmath>
#include <sstream>
#include <utility>

namespace dysco::server {
namespace {

std::string Num(double x) {
  std::ostringstream s;
  s << x;
  return s.str();
}

Status CheckTokenId(int64_t id, int64_t vocab_size, const std::string& field) {
  if (id < 0 || id >= vocab_size) {
    return InvalidArgumentError(field + ": " + std::to_string(id) +
                                " is outside the vocabulary [0, " + std::to_string(vocab_size) +
                                ")");
  }
  return OkStatus();
}

Status ToSampling(const v1::SamplingParams& in, SamplingParams* out) {
  if (in.has_temperature()) {
    if (!std::isfinite(in.temperature()) || in.temperature() < 0.0f) {
      return InvalidArgumentError("sampling.temperature must be >= 0 (0 = greedy), got " +
                                  Num(in.temperature()));
    }
    out->temperature = in.temperature();
  }
  if (in.has_top_k()) {
    if (in.top_k() < 0) {
      return InvalidArgumentError("sampling.top_k must be >= 0 (0 = off), got " +
                                  std::to_string(in.top_k()));
    }
    out->top_k = in.top_k();
  }
  if (in.has_top_p()) {
    if (!(in.top_p() > 0.0f && in.top_p() <= 1.0f)) {
      return InvalidArgumentError("sampling.top_p must be in (0, 1], got " + Num(in.top_p()));
    }
    out->top_p = in.top_p();
  }
  if (in.has_seed()) out->seed = in.seed();
  if (in.has_repetition_penalty()) {
    if (!std::isfinite(in.repetition_penalty()) || in.repetition_penalty() <= 0.0f) {
      return InvalidArgumentError("sampling.repetition_penalty must be > 0 (1 = off), got " +
                                  Num(in.repetition_penalty()));
    }
    out->repetition_penalty = in.repetition_penalty();
  }
  return out->Validate();
}

Status ToDyscoOverrides(const v1::DyscoParams& in, const RequestLimits& limits,
                        DyscoOverrides* out) {
  if (in.selected_heads_size() > 0) {
    std::vector<std::pair<int, int>> heads;
    for (int i = 0; i < in.selected_heads_size(); ++i) {
      const v1::DyscoHead& h = in.selected_heads(i);
      const std::string field = "dysco.selected_heads[" + std::to_string(i) + "]";
      if (h.layer() < 0 || h.layer() >= limits.num_layers) {
        return InvalidArgumentError(field + ": layer " + std::to_string(h.layer()) +
                                    " out of range [0, " + std::to_string(limits.num_layers) + ")");
      }
      if (h.head() < 0 || h.head() >= limits.num_attention_heads) {
        return InvalidArgumentError(field + ": head " + std::to_string(h.head()) +
                                    " out of range [0, " +
                                    std::to_string(limits.num_attention_heads) + ")");
      }
      heads.emplace_back(h.layer(), h.head());
    }
    out->selected_heads = std::move(heads);
  }
  if (in.has_top_p()) {
    if (!(in.top_p() > 0.0f && in.top_p() <= 1.0f)) {
      return InvalidArgumentError("dysco.top_p must be in (0, 1], got " + Num(in.top_p()));
    }
    out->top_p = in.top_p();
  }
  if (in.has_top_k()) {
    if (in.top_k() < 1) {
      return InvalidArgumentError("dysco.top_k must be >= 1, got " + std::to_string(in.top_k()));
    }
    out->top_k = in.top_k();
  }
  if (in.has_strength()) {
    if (!std::isfinite(in.strength()) || in.strength() <= 0.0f) {
      return InvalidArgumentError("dysco.strength must be > 0, got " + Num(in.strength()));
    }
    out->strength = in.strength();
  }
  if (in.has_decay_factor()) {
    if (!(in.decay_factor() >= 0.0f && in.decay_factor() < 1.0f)) {
      return InvalidArgumentError("dysco.decay_factor must be in [0, 1), got " +
                                  Num(in.decay_factor()));
    }
    out->decay_factor = in.decay_factor();
  }
  if (in.has_context_warmup_steps()) {
    if (in.context_warmup_steps() < 0) {
      return InvalidArgumentError("dysco.context_warmup_steps must be >= 0, got " +
                                  std::to_string(in.context_warmup_steps()));
    }
    out->context_warmup_steps = in.context_warmup_steps();
  }
  if (in.has_intervention_warmup()) {
    if (in.intervention_warmup() < -1) {
      return InvalidArgumentError("dysco.intervention_warmup must be >= 0 or -1 (auto), got " +
                                  std::to_string(in.intervention_warmup()));
    }
    out->intervention_warmup = in.intervention_warmup();
  }
  if (in.has_dynamic_rescale()) out->dynamic_rescale = in.dynamic_rescale();
  if (in.clear_template_sequences() && in.template_sequences_size() > 0) {
    return InvalidArgumentError(
        "dysco.clear_template_sequences: cannot be set together with dysco.template_sequences");
  }
  if (in.clear_template_sequences()) {
    out->template_sequences = std::vector<std::vector<int32_t>>();
  } else if (in.template_sequences_size() > 0) {
    std::vector<std::vector<int32_t>> sequences;
    for (int i = 0; i < in.template_sequences_size(); ++i) {
      const auto& ids = in.template_sequences(i).token_ids();
      const std::string field = "dysco.template_sequences[" + std::to_string(i) + "]";
      if (ids.empty()) return InvalidArgumentError(field + ".token_ids: must not be empty");
      for (int j = 0; j < ids.size(); ++j) {
        DYSCO_RETURN_IF_ERROR(CheckTokenId(ids[j], limits.vocab_size,
                                           field + ".token_ids[" + std::to_string(j) + "]"));
      }
      sequences.emplace_back(ids.begin(), ids.end());
    }
    out->template_sequences = std::move(sequences);
  }
  return OkStatus();
}

}  // namespace

Status ValidateRequestId(const std::string& request_id) {
  if (request_id.size() > kMaxRequestIdBytes) {
    return InvalidArgumentError("request_id: at most " + std::to_string(kMaxRequestIdBytes) +
                                " characters, got " + std::to_string(request_id.size()));
  }
  for (const char c : request_id) {
    if (c < 0x21 || c > 0x7e) {
      return InvalidArgumentError(
          "request_id: only printable ASCII characters without spaces are allowed");
    }
  }
  return OkStatus();
}

StatusOr<std::vector<ChatMessage>> ToChatMessages(const v1::ChatMessages& messages,
                                                  const std::string& field) {
  if (messages.messages_size() == 0) return InvalidArgumentError(field + ": must not be empty");
  if (static_cast<size_t>(messages.messages_size()) > kMaxChatMessages) {
    return InvalidArgumentError(field + ": at most " + std::to_string(kMaxChatMessages) +
                                " messages, got " + std::to_string(messages.messages_size()));
  }
  std::vector<ChatMessage> out;
  out.reserve(messages.messages_size());
  for (int i = 0; i < messages.messages_size(); ++i) {
    const v1::ChatMessage& m = messages.messages(i);
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant" &&
        m.role() != "tool") {
      return InvalidArgumentError(field + "[" + std::to_string(i) + "].role: unknown role \"" +
                                  m.role() + "\" (system, user, assistant or tool)");
    }
    out.push_back({m.role(), m.content()});
  }
  return out;
}

StatusOr<SessionRequest> ToSessionRequest(const v1::GenerateRequest& request,
                                          const RequestLimits& limits) {
  SessionRequest session;
  GenerateRequest& g = session.generate;
  DYSCO_RETURN_IF_ERROR(ValidateRequestId(request.request_id()));
  session.request_id = request.request_id();

  switch (request.input_case()) {
    case v1::GenerateRequest::kPrompt:
      if (request.prompt().empty()) return InvalidArgumentError("prompt: must not be empty");
      g.prompt = request.prompt();
      g.chat = request.chat();
      break;
    case v1::GenerateRequest::kMessages: {
      DYSCO_ASSIGN_OR_RETURN(g.messages, ToChatMessages(request.messages(), "messages.messages"));
      g.chat = true;
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) return InvalidArgumentError("token_ids.ids: must not be empty");
      if (request.chat()) {
        return InvalidArgumentError("chat: token_ids are used as is and cannot be chat-formatted");
      }
      for (int i = 0; i < ids.size(); ++i) {
        DYSCO_RETURN_IF_ERROR(
            CheckTokenId(ids[i], limits.vocab_size, "token_ids.ids[" + std::to_string(i) + "]"));
      }
      g.prompt_token_ids.assign(ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::INPUT_NOT_SET:
      return InvalidArgumentError("input: one of prompt, messages, token_ids is required");
  }

  if (request.max_new_tokens() > static_cast<uint64_t>(limits.max_new_tokens_limit)) {
    return InvalidArgumentError(
        "max_new_tokens must be <= " + std::to_string(limits.max_new_tokens_limit) + ", got " +
        std::to_string(request.max_new_tokens()));
  }
  g.max_new_tokens = request.max_new_tokens();  // 0 = the server default
  if (request.has_sampling()) DYSCO_RETURN_IF_ERROR(ToSampling(request.sampling(), &g.sampling));

  if (static_cast<size_t>(request.stop_size()) > kMaxStopStrings) {
    return InvalidArgumentError("stop: at most " + std::to_string(kMaxStopStrings) +
                                " stop strings, got " + std::to_string(request.stop_size()));
  }
  for (int i = 0; i < request.stop_size(); ++i) {
    const std::string& s = request.stop(i);
    const std::string field = "stop[" + std::to_string(i) + "]";
    if (s.empty()) return InvalidArgumentError(field + ": must not be empty");
    if (s.size() > kMaxStopStringBytes) {
      return InvalidArgumentError(field + ": at most " + std::to_string(kMaxStopStringBytes) +
                                  " bytes, got " + std::to_string(s.size()));
    }
    g.stop_strings.push_back(s);
  }
  if (static_cast<size_t>(request.stop_token_ids_size()) > kMaxStopTokenIds) {
    return InvalidArgumentError("stop_token_ids: at most " + std::to_string(kMaxStopTokenIds) +
                                " ids, got " + std::to_string(request.stop_token_ids_size()));
  }
  for (int i = 0; i < request.stop_token_ids_size(); ++i) {
    DYSCO_RETURN_IF_ERROR(CheckTokenId(request.stop_token_ids(i), limits.vocab_size,
                                       "stop_token_ids[" + std::to_string(i) + "]"));
    g.stop_token_ids.push_back(request.stop_token_ids(i));
  }

  if (request.has_dysco()) {
    g.dysco = request.dysco().enabled();
    DYSCO_RETURN_IF_ERROR(ToDyscoOverrides(request.dysco(), limits, &g.dysco_overrides));
  }
  session.return_selection = request.return_selection();
  return session;
}

}  // namespace dysco::server
