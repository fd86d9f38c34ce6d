#include "server/request_conversion.h"

#include <utility>

namespace dysco::server {
namespace {

// The proto has no "off" for these two (absent = the package default); core's DyscoOverrides uses
// 0 for "off" (the CLI's --dysco-top-p 0), so a 0 on the wire is refused here.
Status CheckNotZero(bool is_zero, const char* field, const char* range) {
  if (is_zero) return InvalidArgumentError(std::string(field) + " must be " + range + ", got 0");
  return OkStatus();
}

void ToSampling(const v1::SamplingParams& in, SamplingParams* out) {
  if (in.has_temperature()) out->temperature = in.temperature();
  if (in.has_top_k()) out->top_k = in.top_k();
  if (in.has_top_p()) out->top_p = in.top_p();
  if (in.has_seed()) out->seed = in.seed();
  if (in.has_repetition_penalty()) out->repetition_penalty = in.repetition_penalty();
}

Status ToDyscoOverrides(const v1::DyscoParams& in, DyscoOverrides* out) {
  if (in.selected_heads_size() > 0) {
    std::vector<std::pair<int, int>> heads;
    for (const v1::DyscoHead& h : in.selected_heads()) heads.emplace_back(h.layer(), h.head());
    out->selected_heads = std::move(heads);
  }
  if (in.has_top_p()) {
    DYSCO_RETURN_IF_ERROR(CheckNotZero(in.top_p() == 0.0f, "dysco.top_p", "in (0, 1]"));
    out->top_p = in.top_p();
  }
  if (in.has_top_k()) {
    DYSCO_RETURN_IF_ERROR(CheckNotZero(in.top_k() == 0, "dysco.top_k", ">= 1"));
    out->top_k = in.top_k();
  }
  if (in.has_strength()) out->strength = in.strength();
  if (in.has_decay_factor()) out->decay_factor = in.decay_factor();
  if (in.has_context_warmup_steps()) out->context_warmup_steps = in.context_warmup_steps();
  if (in.has_intervention_warmup()) out->intervention_warmup = in.intervention_warmup();
  if (in.has_dynamic_rescale()) out->dynamic_rescale = in.dynamic_rescale();
  if (in.clear_template_sequences() && in.template_sequences_size() > 0) {
    return InvalidArgumentError(
        "dysco.clear_template_sequences: cannot be set together with dysco.template_sequences");
  }
  if (in.clear_template_sequences()) {
    out->template_sequences = std::vector<std::vector<int32_t>>();
  } else if (in.template_sequences_size() > 0) {
    std::vector<std::vector<int32_t>> sequences;
    for (const v1::TemplateSequence& t : in.template_sequences()) {
      sequences.emplace_back(t.token_ids().begin(), t.token_ids().end());
    }
    out->template_sequences = std::move(sequences);
  }
  return OkStatus();
}

Status ToInput(const v1::GenerateRequest& request, GenerateRequest* g) {
  switch (request.input_case()) {
    case v1::GenerateRequest::kPrompt:
      if (request.prompt().empty()) return InvalidArgumentError("prompt: must not be empty");
      g->prompt = request.prompt();
      g->chat = request.chat();
      return OkStatus();
    case v1::GenerateRequest::kMessages:
      if (request.messages().messages_size() == 0) {
        return InvalidArgumentError("messages.messages: must not be empty");
      }
      g->messages = ToChatMessages(request.messages());
      g->chat = true;
      return OkStatus();
    case v1::GenerateRequest::kTokenIds:
      if (request.token_ids().ids().empty()) {
        return InvalidArgumentError("token_ids.ids: must not be empty");
      }
      if (request.chat()) {
        return InvalidArgumentError("chat: token_ids are used as is and cannot be chat-formatted");
      }
      g->prompt_token_ids.assign(request.token_ids().ids().begin(),
                                 request.token_ids().ids().end());
      return OkStatus();
    case v1::GenerateRequest::INPUT_NOT_SET:
      break;
  }
  return InvalidArgumentError("input: one of prompt, messages, token_ids is required");
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

std::vector<ChatMessage> ToChatMessages(const v1::ChatMessages& messages) {
  std::vector<ChatMessage> out;
  out.reserve(messages.messages_size());
  for (const v1::ChatMessage& m : messages.messages()) out.push_back({m.role(), m.content()});
  return out;
}

StatusOr<SessionRequest> ToSessionRequest(const v1::GenerateRequest& request) {
  SessionRequest session;
  GenerateRequest& g = session.generate;
  DYSCO_RETURN_IF_ERROR(ValidateRequestId(request.request_id()));
  session.request_id = request.request_id();
  DYSCO_RETURN_IF_ERROR(ToInput(request, &g));
  g.parse_special_in_messages = request.parse_special_in_messages();
  g.max_new_tokens = request.max_new_tokens();  // 0 = the server default
  if (request.has_sampling()) ToSampling(request.sampling(), &g.sampling);
  g.stop_strings.assign(request.stop().begin(), request.stop().end());
  g.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  if (request.has_dysco()) {
    g.dysco = request.dysco().enabled();
    DYSCO_RETURN_IF_ERROR(ToDyscoOverrides(request.dysco(), &g.dysco_overrides));
  }
  session.return_selection = request.return_selection();
  return session;
}

Status ToProtoFieldPath(const Status& status) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"messages[", "messages.messages["},
      {"prompt_token_ids[", "token_ids.ids["},
      {"stop_strings", "stop"},
  };
  const std::string& m = status.message();
  for (const auto& [core_path, proto_path] : kRenames) {
    if (m.rfind(core_path, 0) == 0) {
      return Status(status.code(), proto_path + m.substr(std::string(core_path).size()));
    }
  }
  return status;
}

}  // namespace dysco::server
