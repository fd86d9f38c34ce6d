#include "core/dysco/params.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "core/base/format.h"
#include "core/text/tokenizer.h"

namespace dysco {

namespace {

Status Bad(const std::string& message) { return InvalidArgumentError(message); }

Status CheckHeads(const ModelConfig& config, const std::vector<std::pair<int, int>>& heads) {
  std::set<std::pair<int, int>> seen;
  for (size_t i = 0; i < heads.size(); ++i) {
    const auto& [layer, head] = heads[i];
    const std::string field = "dysco.selected_heads[" + std::to_string(i) + "]";
    if (layer < 0 || layer >= config.num_layers) {
      return Bad(field + ": layer " + std::to_string(layer) + " out of range [0, " +
                 std::to_string(config.num_layers) + ")");
    }
    if (head < 0 || head >= config.num_attention_heads) {
      return Bad(field + ": query head " + std::to_string(head) + " out of range [0, " +
                 std::to_string(config.num_attention_heads) + ")");
    }
    if (!seen.insert(heads[i]).second) {
      return Bad(field + ": (" + std::to_string(layer) + ", " + std::to_string(head) +
                 ") is listed twice");
    }
  }
  return OkStatus();
}

Status CheckTemplates(const ModelConfig& config,
                      const std::vector<std::vector<int32_t>>& sequences) {
  for (size_t i = 0; i < sequences.size(); ++i) {
    const std::string field = "dysco.template_sequences[" + std::to_string(i) + "]";
    if (sequences[i].empty()) return Bad(field + " is empty");
    for (size_t k = 0; k < sequences[i].size(); ++k) {
      const int32_t t = sequences[i][k];
      if (t < 0 || t >= config.vocab_size) {
        return Bad(field + "[" + std::to_string(k) + "] = " + std::to_string(t) +
                   " is outside the vocabulary [0, " + std::to_string(config.vocab_size) + ")");
      }
    }
  }
  return OkStatus();
}

// The range rules of the scalar parameters, for an override or a package default alike.
Status CheckTopP(double top_p) {
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    return Bad("dysco.top_p must be in (0, 1], got " + FormatNumber(top_p));
  }
  return OkStatus();
}
Status CheckTopK(int64_t top_k) {
  if (top_k < 1) return Bad("dysco.top_k must be >= 1, got " + std::to_string(top_k));
  return OkStatus();
}
Status CheckStrength(double strength) {
  if (!(strength > 0.0) || std::isinf(strength)) {
    return Bad("dysco.strength must be > 0, got " + FormatNumber(strength));
  }
  return OkStatus();
}
Status CheckDecay(double decay) {
  if (!(decay >= 0.0 && decay < 1.0)) {
    return Bad("dysco.decay_factor must be in [0, 1), got " + FormatNumber(decay));
  }
  return OkStatus();
}
Status CheckContextWarmup(int64_t steps) {
  if (steps < 0) {
    return Bad("dysco.context_warmup_steps must be >= 0, got " + std::to_string(steps));
  }
  return OkStatus();
}
Status CheckInterventionWarmup(int64_t steps) {
  if (steps < -1) {
    return Bad("dysco.intervention_warmup must be >= 0 or -1 (auto), got " + std::to_string(steps));
  }
  return OkStatus();
}

}  // namespace

int DyscoParams::max_head_layer() const {
  int m = 0;
  for (const auto& [layer, head] : selected_heads) m = std::max(m, layer);
  return m;
}

int64_t CountGenerationPromptTokens(const ModelConfig& config, const Tokenizer& tokenizer) {
  return static_cast<int64_t>(
      tokenizer.Encode(config.chat.generation_prompt, /*parse_special=*/true).size());
}

Status ValidateDyscoOverrides(const ModelConfig& config, const DyscoOverrides& o) {
  if (o.selected_heads) {
    if (o.selected_heads->empty()) return Bad("dysco.selected_heads is empty");
    DYSCO_RETURN_IF_ERROR(CheckHeads(config, *o.selected_heads));
  }
  if (o.top_p && *o.top_p != 0.0) DYSCO_RETURN_IF_ERROR(CheckTopP(*o.top_p));  // 0 = unset
  if (o.top_k && *o.top_k != 0) DYSCO_RETURN_IF_ERROR(CheckTopK(*o.top_k));    // 0 = unset
  if (o.strength) DYSCO_RETURN_IF_ERROR(CheckStrength(*o.strength));
  if (o.decay_factor) DYSCO_RETURN_IF_ERROR(CheckDecay(*o.decay_factor));
  if (o.context_warmup_steps) DYSCO_RETURN_IF_ERROR(CheckContextWarmup(*o.context_warmup_steps));
  if (o.intervention_warmup) {
    DYSCO_RETURN_IF_ERROR(CheckInterventionWarmup(*o.intervention_warmup));
  }
  if (o.template_sequences) DYSCO_RETURN_IF_ERROR(CheckTemplates(config, *o.template_sequences));
  return OkStatus();
}

namespace {

// The prompt-dependent rules, on the resolved parameters.
Status CheckAgainstPrompt(const DyscoParams& p, int64_t prompt_len) {
  const std::string warmup = "dysco.context_warmup_steps + dysco.intervention_warmup (" +
                             std::to_string(p.context_warmup_steps) + " + " +
                             std::to_string(p.intervention_warmup) + ")";
  if (p.warmup_tokens() < 1) return Bad(warmup + " must be >= 1");
  if (p.warmup_tokens() >= prompt_len) {
    return Bad(warmup + " must be less than the prompt length " + std::to_string(prompt_len) +
               ": the warm-up is fed from the prompt and the prefill keeps at least one token");
  }
  if (!p.dynamic_rescale && p.context_warmup_steps < 2) {
    return Bad(
        "dysco.context_warmup_steps must be >= 2 when dysco.dynamic_rescale is false (the static "
        "set is chosen after the context warm-up, which runs context_warmup_steps - 1 steps), "
        "got " +
        std::to_string(p.context_warmup_steps));
  }
  return OkStatus();
}

}  // namespace

StatusOr<DyscoParams> ResolveDyscoParams(const ModelConfig& config, const DyscoOverrides& o,
                                         bool chat_formatted, int64_t prompt_len,
                                         int64_t generation_prompt_tokens) {
  DYSCO_RETURN_IF_ERROR(ValidateDyscoOverrides(config, o));
  // The package defaults were range-checked when config.json was parsed only in part (a package
  // written by hand may hold anything): each default that is used goes through the same rule.
  const DyscoDefaults& d = config.dysco;
  DyscoParams p;
  p.prompt_len = prompt_len;
  p.selected_heads = o.selected_heads ? *o.selected_heads : d.selected_heads;
  if (p.selected_heads.empty()) {
    return Bad(
        "dysco.selected_heads is empty: the model package has no retrieval heads, pass "
        "dysco.selected_heads");
  }
  if (!o.selected_heads) DYSCO_RETURN_IF_ERROR(CheckHeads(config, p.selected_heads));
  if (o.top_p) {
    if (*o.top_p != 0.0) p.top_p = *o.top_p;
  } else {
    DYSCO_RETURN_IF_ERROR(CheckTopP(d.top_p));
    p.top_p = d.top_p;
  }
  if (o.top_k) {
    if (*o.top_k != 0) p.top_k = *o.top_k;
  } else {
    DYSCO_RETURN_IF_ERROR(CheckTopK(d.top_k));
    p.top_k = d.top_k;
  }
  if (!p.top_p && !p.top_k) {
    return Bad("dysco.top_p and dysco.top_k are both unset: set at least one");
  }
  p.strength = o.strength.value_or(d.strength);
  DYSCO_RETURN_IF_ERROR(CheckStrength(p.strength));
  p.decay_factor = o.decay_factor.value_or(d.decay_factor);
  DYSCO_RETURN_IF_ERROR(CheckDecay(p.decay_factor));
  p.context_warmup_steps = o.context_warmup_steps.value_or(d.context_warmup_steps);
  DYSCO_RETURN_IF_ERROR(CheckContextWarmup(p.context_warmup_steps));
  const int64_t iw = o.intervention_warmup.value_or(d.intervention_warmup);
  DYSCO_RETURN_IF_ERROR(CheckInterventionWarmup(iw));
  p.intervention_warmup =
      iw >= 0 ? iw
              : (chat_formatted && generation_prompt_tokens >= 0 ? generation_prompt_tokens : 2);
  p.dynamic_rescale = o.dynamic_rescale.value_or(d.dynamic_rescale);
  p.template_sequences = o.template_sequences ? *o.template_sequences : d.template_sequences;
  if (!o.template_sequences) DYSCO_RETURN_IF_ERROR(CheckTemplates(config, p.template_sequences));
  DYSCO_RETURN_IF_ERROR(CheckAgainstPrompt(p, prompt_len));
  return p;
}

const char* DyscoPhaseName(DyscoPhase phase) {
  switch (phase) {
    case DyscoPhase::kPrefill:
      return "prefill";
    case DyscoPhase::kContextWarmup:
      return "context_warmup";
    case DyscoPhase::kInterventionWarmup:
      return "intervention_warmup";
    case DyscoPhase::kGenerate:
      return "generate";
  }
  return "unknown";
}

DyscoPhase DyscoPhaseAt(const DyscoParams& params, int64_t position) {
  const int64_t P = params.prompt_len;
  if (position < params.prefill_len()) return DyscoPhase::kPrefill;
  if (position >= P) return DyscoPhase::kGenerate;
  // The reference compares the current length (this token included) with P - intervention_warmup.
  return position + 1 < P - params.intervention_warmup ? DyscoPhase::kContextWarmup
                                                       : DyscoPhase::kInterventionWarmup;
}

DyscoStepKind DyscoStepKindAt(const DyscoParams& params, int64_t position) {
  switch (DyscoPhaseAt(params, position)) {
    case DyscoPhase::kPrefill:
      return DyscoStepKind::kPrefill;
    case DyscoPhase::kContextWarmup:
      return DyscoStepKind::kContextWarmup;
    case DyscoPhase::kInterventionWarmup:
    case DyscoPhase::kGenerate:
      break;
  }
  return params.dynamic_rescale ? DyscoStepKind::kDynamic : DyscoStepKind::kStatic;
}

}  // namespace dysco
