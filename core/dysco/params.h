// DySCO parameters of one sequence (docs/dysco.md; the reference algorithm is
// docs/dysco-reference-algorithm.md): the request's overrides of the package defaults, validated
// and resolved against the prompt, and the phase schedule they imply.
//
// Schedule (P prompt tokens, T = context_warmup_steps + intervention_warmup, 1 <= T < P):
//   positions 0 .. P-T-1          prefill (ordinary attention, chunked as usual)
//   position i in P-T .. P-1      one token at a time: context warm-up when i + 1 < P -
//                                 intervention_warmup (full pass, probe heads read in the same
//                                 pass), else intervention warm-up
//   positions P ..                generation; every fed token is an intervention step
// An intervention step is, dynamic: speculative pass (layers 0..max head layer, probe heads, no
// bias), relevance update, selection, bias, then the real pass with the bias; static
// (dynamic_rescale = false): the real pass with the set chosen once after the context warm-up.
//
// Thread-safety: value types and pure functions. Ownership: results are values owned by the
// caller; functions returning StatusOr return nothing on failure.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/model/model_config.h"
#include "kernels/dysco_constants.h"

namespace dysco {

class Tokenizer;

// Per-request overrides; nullopt = the package default (config.json "dysco").
struct DyscoOverrides {
  std::optional<std::vector<std::pair<int, int>>> selected_heads;  // (layer, QUERY head)
  std::optional<double> top_p;              // (0, 1]; 0 = unset (no nucleus: top_k alone)
  std::optional<int64_t> top_k;             // >= 1; 0 = unset (no cap: top_p alone)
  std::optional<double> strength;           // > 0; >= 99 = hard sparse attention
  std::optional<double> decay_factor;       // [0, 1)
  std::optional<int> context_warmup_steps;  // >= 0
  std::optional<int> intervention_warmup;   // >= 0, or -1 = auto
  std::optional<bool> dynamic_rescale;      // false = static variant
  std::optional<std::vector<std::vector<int32_t>>> template_sequences;
};

// Resolved and validated parameters of one DySCO sequence.
struct DyscoParams {
  std::vector<std::pair<int, int>> selected_heads;  // non-empty, in range, no duplicates
  std::optional<double> top_p;                      // at least one of top_p / top_k is set
  std::optional<int64_t> top_k;
  double strength = 2.0;
  double decay_factor = 0.75;
  int64_t context_warmup_steps = 8;
  int64_t intervention_warmup = 2;  // auto already resolved
  bool dynamic_rescale = true;
  std::vector<std::vector<int32_t>> template_sequences;
  int64_t prompt_len = 0;

  int64_t warmup_tokens() const { return context_warmup_steps + intervention_warmup; }  // T
  int64_t prefill_len() const { return prompt_len - warmup_tokens(); }                  // P - T
  int max_head_layer() const;  // the speculative pass runs layers 0..this
  bool hard_mask() const { return strength >= kHardMaskStrength; }
};

// Tokens of the model's chat generation prompt (config.chat.generation_prompt, special tokens
// parsed): what intervention_warmup "auto" means for a chat-formatted prompt (Qwen3 without
// thinking 7, Llama-3.1 4, SmolLM2 ChatML 4: its tokenizer splits "assistant" in two).
int64_t CountGenerationPromptTokens(const ModelConfig& config, const Tokenizer& tokenizer);

// The range of every field the overrides set, with the package's model shape (heads in range,
// template ids in the vocabulary); nothing that depends on the prompt. The one home of these rules:
// ResolveDyscoParams calls it, and request validation calls it even when DySCO is off, so a bad
// override is refused whatever `enabled` says.
Status ValidateDyscoOverrides(const ModelConfig& config, const DyscoOverrides& overrides);

// Package defaults + overrides, validated for this prompt. intervention_warmup auto resolves to
// `generation_prompt_tokens` when the prompt was chat-formatted, 2 otherwise. INVALID_ARGUMENT
// naming the field as a client writes it, e.g. "dysco.top_p must be in (0, 1], got 1.5",
// "dysco.selected_heads[3]: layer 40 out of range [0, 30)", a warm-up as long as the prompt, the
// static variant with context_warmup_steps < 2, no heads, neither top_p nor top_k.
StatusOr<DyscoParams> ResolveDyscoParams(const ModelConfig& config, const DyscoOverrides& overrides,
                                         bool chat_formatted, int64_t prompt_len,
                                         int64_t generation_prompt_tokens);

enum class DyscoPhase { kPrefill, kContextWarmup, kInterventionWarmup, kGenerate };
// "prefill", "context_warmup", "intervention_warmup", "generate" (the trace's "phase").
const char* DyscoPhaseName(DyscoPhase phase);

// What one fed token (or prefill chunk) needs from the engine.
enum class DyscoStepKind {
  kPrefill,        // ordinary pass, no DySCO work
  kContextWarmup,  // ordinary full pass with the probe heads; relevance update after it
  kDynamic,        // speculative pass, update + select + bias, real pass with the bias
  kStatic,         // real pass with the static set's bias, no speculative pass
};

// The phase of the token at `position` (0-based) of a sequence with these parameters.
DyscoPhase DyscoPhaseAt(const DyscoParams& params, int64_t position);
DyscoStepKind DyscoStepKindAt(const DyscoParams& params, int64_t position);

}  // namespace dysco
