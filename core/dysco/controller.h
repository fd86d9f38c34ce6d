// DyscoController: one sequence's DySCO decoding (docs/dysco.md): which kind each fed token's step
// is, the sequence's relevance state, and its trace. The state is private: the batched ops
// (core/dysco/batch_ops.h) read it through const views and hand their results back as values
// through the Apply* methods, so there is one writer and one place to check its invariants.
//
// Thread-safety: a controller belongs to one sequence and is used by the one thread stepping it.
// Ownership: the controller owns its relevance state and trace; the Sequence that holds it frees
// both with it. Create returns nothing on failure.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/params.h"
#include "core/dysco/trace.h"

namespace dysco {

// One selection made by dysco_select_bias (or the static variant's frozen set).
struct DyscoSelection {
  std::vector<uint8_t> selected;  // 0/1 over the keys the selection was made on
  std::vector<float> bias;        // the real pass's bias over the current keys; may be empty
  int64_t num_selected = 0;
  double selected_mass = 0.0;  // relevance mass of the selected keys
};

class DyscoController {
 public:
  // Computes the template mask of `prompt` (dysco_template_mask op). `prompt` has params.prompt_len
  // tokens. INVALID_ARGUMENT when it does not, INTERNAL when the op fails.
  static StatusOr<std::unique_ptr<DyscoController>> Create(DyscoParams params,
                                                           const std::vector<int32_t>& prompt,
                                                           DyscoTraceMode trace_mode);

  const DyscoParams& params() const { return params_; }
  DyscoStepKind StepKindAt(int64_t position) const { return DyscoStepKindAt(params_, position); }

  // The one home of DySCO's feeding rule: the prompt is prefilled (in chunks) up to
  // params().prefill_len(), then every token, warm-up and generated, is fed alone. Returns how many
  // of the next uncached tokens one step may feed, given that `num_cached` are cached.
  int64_t MaxTokensToFeed(int64_t num_cached, int64_t num_uncached) const;

  // ---- Inputs of the batched ops: views valid until the next Apply*/Freeze* call.
  // r over the keys of the last update; zeros(P - T) before the first warm-up step. In the static
  // variant it stops changing once the set is frozen.
  const std::vector<float>& relevance() const { return state_.relevance; }
  // 1 at prompt positions inside a template sequence (length P); generated tokens never are.
  const std::vector<uint8_t>& template_mask() const { return state_.template_mask; }
  // The last selection (over the keys it was made on); in the static variant the frozen set.
  const std::vector<uint8_t>& selection() const { return state_.selected; }
  bool static_set_frozen() const { return state_.static_set_frozen; }
  // This step's bias of the real pass, set by ApplySelection or ApplyBias.
  const std::vector<float>& bias() const { return state_.bias; }
  int64_t num_selected() const { return state_.num_selected; }

  // ---- Results of the batched ops. INTERNAL when a result does not fit the state (a bug).
  // r_t over the current keys: one more entry than relevance() had.
  Status ApplyRelevance(std::vector<float> relevance);
  // A dynamic step's selection and bias.
  Status ApplySelection(DyscoSelection selection);
  // The static variant's set, chosen once from the relevance the context warm-up left.
  Status FreezeSelection(DyscoSelection selection);
  // A static step's bias of the frozen set.
  Status ApplyBias(std::vector<float> bias);

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

 private:
  // Grown by one key per fed token.
  struct RelevanceState {
    std::vector<float> relevance;
    std::vector<uint8_t> template_mask;
    std::vector<uint8_t> selected;
    int64_t num_selected = 0;
    double selected_mass = 0.0;
    bool static_set_frozen = false;
    std::vector<float> bias;
  };

  DyscoController(DyscoParams params, DyscoTraceMode trace_mode)
      : params_(std::move(params)), trace_mode_(trace_mode) {}
  DyscoTraceRecord MakeRecord(DyscoStepKind kind, int64_t step, int64_t position, int32_t token,
                              const DyscoStepTimings& timings) const;

  DyscoParams params_;
  DyscoTraceMode trace_mode_;
  RelevanceState state_;
  std::vector<DyscoTraceRecord> trace_;
  DyscoTotals totals_;
  int64_t num_steps_ = 0;
};

}  // namespace dysco
