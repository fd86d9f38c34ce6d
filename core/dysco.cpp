#include "core/dysco.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/dysco_ops.h"
#include "core/tokenizer.h"

namespace dysco {

namespace {

// Shortest text that reads back as the same double ("1.5", "0.975").
std::string Num(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  std::string s = os.str();
  for (int p = 1; p <= 17; ++p) {
    std::ostringstream t;
    t.precision(p);
    t << x;
    if (std::strtod(t.str().c_str(), nullptr) == x) return t.str();
  }
  return s;
}

Status Bad(const std::string& message) { return InvalidArgumentError(message); }

constexpr int kTopRelevanceEntries = 8;

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

StatusOr<DyscoParams> ResolveDyscoParams(const ModelConfig& config, const DyscoOverrides& o,
                                         bool chat_formatted, int64_t prompt_len,
                                         int64_t generation_prompt_tokens) {
  const DyscoDefaults& d = config.dysco;
  DyscoParams p;
  p.prompt_len = prompt_len;

  p.selected_heads = o.selected_heads ? *o.selected_heads : d.selected_heads;
  if (p.selected_heads.empty()) {
    return Bad(o.selected_heads ? "dysco.selected_heads is empty"
                                : "dysco.selected_heads is empty: the model package has no "
                                  "retrieval heads, pass dysco.selected_heads");
  }
  std::set<std::pair<int, int>> seen;
  for (size_t i = 0; i < p.selected_heads.size(); ++i) {
    const auto& [layer, head] = p.selected_heads[i];
    const std::string field = "dysco.selected_heads[" + std::to_string(i) + "]";
    if (layer < 0 || layer >= config.num_layers) {
      return Bad(field + ": layer " + std::to_string(layer) + " out of range [0, " +
                 std::to_string(config.num_layers) + ")");
    }
    if (head < 0 || head >= config.num_attention_heads) {
      return Bad(field + ": query head " + std::to_string(head) + " out of range [0, " +
                 std::to_string(config.num_attention_heads) + ")");
    }
    if (!seen.insert(p.selected_heads[i]).second) {
      return Bad(field + ": (" + std::to_string(layer) + ", " + std::to_string(head) +
                 ") is listed twice");
    }
  }

  if (o.top_p) {
    if (*o.top_p != 0.0) p.top_p = *o.top_p;  // 0 = unset
    if (*o.top_p != 0.0 && !(*o.top_p > 0.0 && *o.top_p <= 1.0)) {
      return Bad("dysco.top_p must be in (0, 1], got " + Num(*o.top_p));
    }
  } else {
    p.top_p = d.top_p;
    if (!(d.top_p > 0.0 && d.top_p <= 1.0)) {
      return Bad("dysco.top_p must be in (0, 1], got " + Num(d.top_p));
    }
  }
  if (o.top_k) {
    if (*o.top_k < 0) return Bad("dysco.top_k must be >= 1, got " + std::to_string(*o.top_k));
    if (*o.top_k > 0) p.top_k = *o.top_k;  // 0 = unset
  } else {
    if (d.top_k < 1) return Bad("dysco.top_k must be >= 1, got " + std::to_string(d.top_k));
    p.top_k = d.top_k;
  }
  if (!p.top_p && !p.top_k) {
    return Bad("dysco.top_p and dysco.top_k are both unset: set at least one");
  }

  p.strength = o.strength.value_or(d.strength);
  if (!(p.strength > 0.0)) return Bad("dysco.strength must be > 0, got " + Num(p.strength));
  p.decay_factor = o.decay_factor.value_or(d.decay_factor);
  if (!(p.decay_factor >= 0.0 && p.decay_factor < 1.0)) {
    return Bad("dysco.decay_factor must be in [0, 1), got " + Num(p.decay_factor));
  }
  p.context_warmup_steps = o.context_warmup_steps.value_or(d.context_warmup_steps);
  if (p.context_warmup_steps < 0) {
    return Bad("dysco.context_warmup_steps must be >= 0, got " +
               std::to_string(p.context_warmup_steps));
  }
  const int64_t iw = o.intervention_warmup.value_or(d.intervention_warmup);
  if (iw < -1) {
    return Bad("dysco.intervention_warmup must be >= 0 or -1 (auto), got " + std::to_string(iw));
  }
  if (iw >= 0) {
    p.intervention_warmup = iw;
  } else {
    p.intervention_warmup =
        chat_formatted && generation_prompt_tokens >= 0 ? generation_prompt_tokens : 2;
  }
  p.dynamic_rescale = o.dynamic_rescale.value_or(d.dynamic_rescale);

  p.template_sequences = o.template_sequences ? *o.template_sequences : d.template_sequences;
  for (size_t i = 0; i < p.template_sequences.size(); ++i) {
    const std::string field = "dysco.template_sequences[" + std::to_string(i) + "]";
    if (p.template_sequences[i].empty()) return Bad(field + " is empty");
    for (size_t k = 0; k < p.template_sequences[i].size(); ++k) {
      const int32_t t = p.template_sequences[i][k];
      if (t < 0 || t >= config.vocab_size) {
        return Bad(field + "[" + std::to_string(k) + "] = " + std::to_string(t) +
                   " is outside the vocabulary [0, " + std::to_string(config.vocab_size) + ")");
      }
    }
  }

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

const char* DyscoStepKindName(DyscoStepKind kind) {
  switch (kind) {
    case DyscoStepKind::kPrefill:
      return "prefill";
    case DyscoStepKind::kContextWarmup:
      return "context_warmup";
    case DyscoStepKind::kDynamic:
      return "dynamic";
    case DyscoStepKind::kStatic:
      return "static";
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

std::string DyscoTraceRecordToJson(const DyscoTraceRecord& r) {
  nlohmann::ordered_json j;
  j["step"] = r.step;
  j["phase"] = DyscoPhaseName(r.phase);
  j["position"] = r.position;
  j["token"] = r.token;
  j["num_keys"] = r.num_keys;
  j["num_selected"] = r.num_selected;
  j["nucleus_mass"] = r.nucleus_mass;
  j["selected"] = nlohmann::ordered_json::array();
  for (const auto& [start, end] : r.selected) j["selected"].push_back({start, end});
  j["top_relevance"] = nlohmann::ordered_json::array();
  for (const auto& [pos, value] : r.top_relevance) {
    j["top_relevance"].push_back({pos, static_cast<double>(value)});
  }
  j["next_token"] = r.next_token ? nlohmann::ordered_json(*r.next_token) : nullptr;
  if (!r.relevance.empty()) {
    auto& rel = j["relevance"] = nlohmann::ordered_json::array();
    for (float v : r.relevance) rel.push_back(static_cast<double>(v));
  }
  return j.dump();
}

StatusOr<std::unique_ptr<DyscoController>> DyscoController::Create(
    DyscoParams params, const std::vector<int32_t>& prompt, DyscoTraceMode trace_mode) {
  if (static_cast<int64_t>(prompt.size()) != params.prompt_len || params.prefill_len() < 1) {
    return InvalidArgumentError("DyscoController: params were resolved for a prompt of " +
                                std::to_string(params.prompt_len) + " tokens, got " +
                                std::to_string(prompt.size()));
  }
  std::unique_ptr<DyscoController> c(new DyscoController(std::move(params), trace_mode));
  RelevanceState& s = c->state_;
  s.template_mask.assign(prompt.size(), 0);
  DYSCO_RETURN_IF_ERROR(DyscoTemplateMask(s.template_mask.data(), prompt.data(),
                                          static_cast<int64_t>(prompt.size()),
                                          c->params_.template_sequences));
  s.relevance.assign(static_cast<size_t>(c->params_.prefill_len()), 0.0f);
  return c;
}

void DyscoController::RecordStep(DyscoStepKind kind, int64_t position, int32_t token,
                                 const DyscoStepTimings& timings) {
  const int64_t step = num_steps_++;
  switch (kind) {
    case DyscoStepKind::kContextWarmup:
      ++totals_.context_warmup_steps;
      break;
    case DyscoStepKind::kDynamic:
      ++totals_.dynamic_steps;
      break;
    case DyscoStepKind::kStatic:
      ++totals_.static_steps;
      break;
    case DyscoStepKind::kPrefill:
      break;
  }
  totals_.seconds.speculative_seconds += timings.speculative_seconds;
  totals_.seconds.select_seconds += timings.select_seconds;
  totals_.seconds.real_seconds += timings.real_seconds;
  totals_.seconds.sample_seconds += timings.sample_seconds;
  if (trace_mode_ == DyscoTraceMode::kOff) return;

  DyscoTraceRecord r;
  r.step = step;
  r.phase = DyscoPhaseAt(params_, position);
  r.position = position;
  r.token = token;
  r.num_keys = position + 1;
  r.timings = timings;
  const std::vector<float>& rel = state_.relevance;
  if (kind != DyscoStepKind::kContextWarmup) {
    r.num_selected = state_.num_selected;
    r.nucleus_mass = state_.selected_mass;
    const int64_t m = static_cast<int64_t>(state_.selected.size());
    for (int64_t i = 0; i < m;) {
      if (!state_.selected[i]) {
        ++i;
        continue;
      }
      int64_t e = i;
      while (e < m && state_.selected[e]) ++e;
      r.selected.emplace_back(i, e);
      i = e;
    }
  }
  // Largest entries, ties by the lower position first (as the selection orders them).
  std::vector<int64_t> order(rel.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  const size_t top = std::min<size_t>(kTopRelevanceEntries, order.size());
  std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int64_t a, int64_t b) {
    return rel[a] > rel[b] || (rel[a] == rel[b] && a < b);
  });
  for (size_t i = 0; i < top; ++i) r.top_relevance.emplace_back(order[i], rel[order[i]]);
  if (trace_mode_ == DyscoTraceMode::kFull) {
    // Static steps keep the relevance frozen at the selection: padded with zeros to n keys.
    r.relevance = rel;
    r.relevance.resize(static_cast<size_t>(r.num_keys), 0.0f);
  }
  trace_.push_back(std::move(r));
}

void DyscoController::RecordNextToken(int32_t token, double sample_seconds) {
  totals_.seconds.sample_seconds += sample_seconds;
  if (trace_.empty() || trace_mode_ == DyscoTraceMode::kOff) return;
  trace_.back().next_token = token;
  trace_.back().timings.sample_seconds += sample_seconds;
}

}  // namespace dysco
