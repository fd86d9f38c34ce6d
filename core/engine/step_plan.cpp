#include "core/engine/step_plan.h"

#include <algorithm>

namespace dysco {

StepPlan PlanStep(const std::vector<Sequence*>& sequences, const StepBudget& budget) {
  std::vector<int64_t> want(sequences.size(), 1);
  int64_t single = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    want[i] = std::max<int64_t>(sequences[i]->MaxTokensToFeed(), 1);
    if (want[i] == 1) ++single;
  }
  int64_t left = budget.max_step_tokens - single;
  bool first_prefill = true;
  StepPlan plan;
  for (size_t i = 0; i < sequences.size(); ++i) {
    int64_t n = 1;
    if (want[i] > 1) {
      n = std::min({want[i], budget.prefill_chunk_tokens, left});
      if (first_prefill) n = std::max<int64_t>(n, 1);
      first_prefill = false;
      if (n <= 0) continue;
      left -= n;
    }
    plan.rows.push_back({sequences[i], n, i});
  }
  return plan;
}

}  // namespace dysco
