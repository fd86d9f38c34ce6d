// DySCO decoding for one sequence (docs/dysco.md, /work/shared/dysco/ALGORITHM.md): the request's
// parameters (overrides of the package defaults, validated and resolved against the prompt), the
// phase schedule of one generation, the per-sequence relevance state and the trace records.
// The ops themselves run batched in BatchStepper (core/batch_stepper.h); this file is torch-free.
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
// Thread-safety: DyscoOverrides, DyscoParams and DyscoTraceRecord are value types. A
// DyscoController belongs to one sequence and is used by the one thread stepping that sequence.
// Ownership: a DyscoController owns its RelevanceState and its trace; the Sequence that holds the
// controller frees both with it. Functions returning StatusOr return nothing on failure.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/model_config.h"
#include "core/status.h"

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
  bool hard_mask() const { return strength >= 99.0; }
};

// Tokens of the model's chat generation prompt (config.chat.generation_prompt, special tokens
// parsed): what intervention_warmup "auto" means for a chat-formatted prompt (Qwen3 without
// thinking 7, Llama-3.1 4, SmolLM2 ChatML 4: its tokenizer splits "assistant" in two).
int64_t CountGenerationPromptTokens(const ModelConfig& config, const Tokenizer& tokenizer);

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
const char* DyscoStepKindName(DyscoStepKind kind);

// The phase of the token at `position` (0-based) of a sequence with these parameters.
DyscoPhase DyscoPhaseAt(const DyscoParams& params, int64_t position);
DyscoStepKind DyscoStepKindAt(const DyscoParams& params, int64_t position);

// Wall time of the parts of one step. A batched pass is shared: every sequence in it records the
// pass's whole time.
struct DyscoStepTimings {
  double speculative_seconds = 0.0;
  double select_seconds = 0.0;  // relevance update, selection, bias (host copies included)
  double real_seconds = 0.0;
  double sample_seconds = 0.0;
};

// One line of the trace (docs/dysco.md "Trace").
struct DyscoTraceRecord {
  int64_t step = 0;
  DyscoPhase phase = DyscoPhase::kContextWarmup;
  int64_t position = 0;
  int32_t token = 0;
  int64_t num_keys = 0;
  int64_t num_selected = 0;
  double nucleus_mass = 0.0;
  std::vector<std::pair<int64_t, int64_t>> selected;     // half-open ranges, sorted
  std::vector<std::pair<int64_t, float>> top_relevance;  // up to 8, descending
  std::optional<int32_t> next_token;                     // null when the logits are discarded
  std::vector<float> relevance;                          // only in DyscoTraceMode::kFull
  DyscoStepTimings timings;                              // not part of the JSON line
};

// The JSON line of a record (no trailing newline); "relevance" only when the record has one.
std::string DyscoTraceRecordToJson(const DyscoTraceRecord& record);

enum class DyscoTraceMode { kOff, kSteps, kFull };

// Counters of one sequence's DySCO work, kept whatever the trace mode (for metrics).
struct DyscoTotals {
  int64_t context_warmup_steps = 0;
  int64_t dynamic_steps = 0;  // with a speculative pass
  int64_t static_steps = 0;
  DyscoStepTimings seconds;  // sums over the steps
};

// Per-sequence DySCO state, grown by one key per fed token.
struct RelevanceState {
  // r over keys [0, n) after the last update; zeros(P - T) before the first warm-up step. In the
  // static variant it stops changing once the set is chosen.
  std::vector<float> relevance;
  // 1 at prompt positions inside a template sequence (length P); generated tokens never are.
  std::vector<uint8_t> template_mask;
  // The last selection (0/1 over the keys it was made on); the static variant's frozen set.
  std::vector<uint8_t> selected;
  int64_t num_selected = 0;
  double selected_mass = 0.0;
  bool static_set_chosen = false;
  // The bias of the current step's real pass (length n), valid after the select stage.
  std::vector<float> bias;
};

// Drives one sequence through the DySCO schedule: which kind each step is, the relevance state the
// batched ops read and write, and the trace.
class DyscoController {
 public:
  // Computes the template mask of `prompt` (dysco_template_mask op). `prompt` has params.prompt_len
  // tokens. INTERNAL when the op fails.
  static StatusOr<std::unique_ptr<DyscoController>> Create(DyscoParams params,
                                                           const std::vector<int32_t>& prompt,
                                                           DyscoTraceMode trace_mode);

  const DyscoParams& params() const { return params_; }
  int64_t prefill_length() const { return params_.prefill_len(); }
  DyscoStepKind StepKindAt(int64_t position) const { return DyscoStepKindAt(params_, position); }

  RelevanceState& state() { return state_; }
  const RelevanceState& state() const { return state_; }

  // Appends the record of the step that fed `token` at `position` (read from the state after the
  // select stage / relevance update), unless tracing is off; always adds to totals().
  void RecordStep(DyscoStepKind kind, int64_t position, int32_t token,
                  const DyscoStepTimings& timings);
  // The token the last recorded step's logits produced, and the time its sampling took.
  void RecordNextToken(int32_t token, double sample_seconds);

  DyscoTraceMode trace_mode() const { return trace_mode_; }
  const std::vector<DyscoTraceRecord>& trace() const { return trace_; }
  std::vector<DyscoTraceRecord> TakeTrace() { return std::move(trace_); }
  const DyscoTotals& totals() const { return totals_; }
  int64_t num_steps() const { return num_steps_; }

 private:
  DyscoController(DyscoParams params, DyscoTraceMode trace_mode)
      : params_(std::move(params)), trace_mode_(trace_mode) {}

  DyscoParams params_;
  DyscoTraceMode trace_mode_;
  RelevanceState state_;
  std::vector<DyscoTraceRecord> trace_;
  DyscoTotals totals_;
  int64_t num_steps_ = 0;
};

}  // namespace dysco
