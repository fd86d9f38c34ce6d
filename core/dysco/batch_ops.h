// DyscoBatchOps: the DySCO stages of one engine step, run for many sequences at once with one op
// call each (relevance update, selection + bias, bias of a frozen set; docs/dysco.md "Ops"). Each
// stage reads its rows' state through their DyscoControllers' const views, calls the op on packed
// host buffers, and hands every row its result back as a value (DyscoController::Apply*).
//
// Every computation is per row: a row's result does not depend on its batch-mates (their heads,
// parameters or lengths), which is what lets DySCO sequences with different parameters share a
// step and still equal their solo runs.
//
// Thread-safety: one DyscoBatchOps per stepping thread (it keeps staging buffers); the controllers
// passed in belong to that thread for the call. Ownership: borrows the controllers and the forward
// output for the call only. On failure the rows that were already given their results keep them;
// the caller drops the whole step's sequences (BatchStepper does).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/controller.h"
#include "core/model/model_runner.h"

namespace dysco {

// Sorted, duplicate-free union of the selected heads of `rows`: the probe heads of a pass.
std::vector<std::pair<int, int>> UnionOfHeads(const std::vector<DyscoController*>& rows);
// The deepest selected-head layer of `rows`: the last layer a speculative pass must run.
int DeepestHeadLayer(const std::vector<DyscoController*>& rows);

class DyscoBatchOps {
 public:
  // r_t of each row: row d fed the token at position num_keys[d] - 1; its heads' attention
  // probabilities are row out_rows[d] of `out`, whose probe heads are `probe_heads` (sorted).
  Status UpdateRelevance(const std::vector<DyscoController*>& rows,
                         const std::vector<int64_t>& num_keys, const ForwardOutput& out,
                         const std::vector<int64_t>& out_rows,
                         const std::vector<std::pair<int, int>>& probe_heads);
  // Dynamic intervention: selection over each row's relevance (num_keys[d] entries) and the bias
  // of the real pass.
  Status SelectDynamic(const std::vector<DyscoController*>& rows,
                       const std::vector<int64_t>& num_keys);
  // Static intervention: the bias of each row's frozen set over num_keys[d] keys, freezing the set
  // first where this is the row's first static step.
  Status BiasStatic(const std::vector<DyscoController*>& rows,
                    const std::vector<int64_t>& num_keys);

 private:
  // One dysco_select_bias call over `rows`, row d over its first num_keys[d] relevance entries.
  StatusOr<std::vector<DyscoSelection>> Select(const std::vector<DyscoController*>& rows,
                                               const std::vector<int64_t>& num_keys);
  // The mean over the row's own heads of their probabilities, into `mean` [0, width).
  static Status HeadMean(const DyscoController& row, int64_t num_keys, const ForwardOutput& out,
                         int64_t out_row, const std::vector<std::pair<int, int>>& probe_heads,
                         float* mean, int64_t width);

  std::vector<float> relevance_, probs_, bias_, stats_, decay_, top_p_, strength_;
  std::vector<uint8_t> selected_, template_;
  std::vector<int64_t> num_keys_, top_k_;
};

}  // namespace dysco
