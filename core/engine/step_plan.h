// StepPlan: which sequences one engine step runs and how many tokens each feeds: the "plan" of
// plan -> execute -> apply (docs/architecture.md). PlanStep is the one place that applies the
// chunked-prefill budget; how many tokens a sequence may feed at all is Sequence::MaxTokensToFeed
// (with DySCO: DyscoController::MaxTokensToFeed).
//
// Thread-safety: plain values and a pure function. Ownership: a plan points at (does not own) the
// sequences it was made from; they must outlive its execution.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/engine/sequence.h"

namespace dysco {

struct PlannedRow {
  Sequence* sequence = nullptr;  // unfinished
  int64_t num_tokens = 1;        // tokens it feeds this step, >= 1
  size_t source = 0;             // its index in the list the plan was made from
};

struct StepPlan {
  std::vector<PlannedRow> rows;
  bool empty() const { return rows.empty(); }
};

struct StepBudget {
  int64_t prefill_chunk_tokens = 256;  // tokens one sequence may prefill per step
  int64_t max_step_tokens = 1024;      // tokens of all sequences in one step
};

// Decoders (and DySCO sequences past their prefill) always feed their one token; prefilling
// sequences get a chunk each, in list order, within what max_step_tokens leaves, the first of them
// always at least one token so that prefill never starves. A prefilling sequence that gets no
// budget is left out of the step.
StepPlan PlanStep(const std::vector<Sequence*>& sequences, const StepBudget& budget);

}  // namespace dysco
