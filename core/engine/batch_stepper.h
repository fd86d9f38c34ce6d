// BatchStepper: executes one StepPlan (core/engine/step_plan.h), plain and DySCO sequences mixed,
// some prefilling a chunk, some decoding (docs/dysco.md, docs/architecture.md). Shared by the
// Generator and the Scheduler.
//
// Execute runs:
//   1. feed: each planned sequence hands out its tokens (Sequence::PrepareFeed);
//   2. intervention, for the DySCO rows at a dynamic step: one speculative forward of just those
//      rows (layers 0..their deepest head layer, probe heads = the union of their heads), then one
//      relevance-update and one selection op call for all of them (DyscoBatchOps); rows at a static
//      step get the bias of their frozen set;
//   3. the real forward of every row, each DySCO row with its bias, and the probe heads of the rows
//      at a context warm-up step, whose relevance is then updated in one op call. On a GPU the
//      dynamic rows' biases are read where the selection wrote them, and their results are
//      copied out after this forward: the device runs both passes and the selection back to back
//      (docs/gpu.md "The DySCO stage without a wait");
//   4. commit: the DySCO results staged by 2 and 3 go to their controllers, each row's fed tokens
//      become cached, and a row whose step ended its uncached tokens samples its next token (a
//      DySCO warm-up token's logits are discarded, except the last prompt token's). When no such
//      row needs its logits on the host (plain greedy sampling), the runner picks the tokens where
//      the logits are, and only the ids are read back.
// The step is a transaction up to the commit: until then no sequence and no DySCO controller is
// changed, so a failed step leaves every sequence exactly as it was and can be retried (the KV
// slots it wrote belong to uncached tokens, which the retry writes again). Every DySCO computation
// is per row, so a sequence's results do not depend on its batch-mates.
//
// Thread-safety: one BatchStepper per driving thread (it keeps staging buffers); the runner
// serialises the forwards of several steppers. Ownership: references (does not own) the runner and
// the pool, which must outlive it, and the plan's sequences during Execute. On error no token is
// sampled and every fed token is handed back (AbortFeed): the sequences are as before the step.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/batch_ops.h"
#include "core/dysco/params.h"
#include "core/dysco/trace.h"
#include "core/engine/sequence.h"
#include "core/engine/step_plan.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"

namespace dysco {

// What one planned row got from the step.
struct RowOutcome {
  bool sampled = false;  // the step's logits gave the sequence its next token: `delta`
  TokenDelta delta;
  DyscoStepKind kind = DyscoStepKind::kPrefill;  // always kPrefill for a plain sequence
};

// What the step as a whole did (each DySCO sequence's trace also has its share).
struct StepOutcome {
  std::vector<RowOutcome> rows;  // row i = plan.rows[i]
  int64_t speculative_rows = 0;  // sequences in the speculative forward (0: none ran)
  int64_t real_rows = 0;
  // Whether the real forward copied its logits to the host (a row that sampled needed them) or
  // returned only the greedy tokens picked where the logits are.
  bool logits_to_host = false;
  DyscoStepTimings timings;  // sample_seconds summed over the sampled sequences
};

class BatchStepper {
 public:
  BatchStepper(ModelRunner* runner, KvPagePool* pool)
      : runner_(runner), pool_(pool), dysco_ops_(runner->device()) {}

  // Executes `plan` (at least one row). Errors: from Sequence::PrepareFeed (RESOURCE_EXHAUSTED:
  // pool full), from the runner or the DySCO ops (INTERNAL...); every sequence is left as it was.
  Status Execute(const StepPlan& plan, StepOutcome* outcome);

 private:
  // Row indices of the plan by DySCO step kind.
  struct RowsByKind {
    std::vector<size_t> dynamic, fixed, warmup;
  };
  // A DySCO row's results of this step, applied to its controller only at the commit.
  struct StagedDysco {
    std::vector<float> relevance;  // r_t (dynamic and context warm-up rows)
    bool has_relevance = false;
    DyscoSelection selection;  // dynamic rows: the set and the real pass's bias
    bool has_selection = false;
    DyscoSelection frozen;  // static rows at their first static step: the set
    bool has_frozen = false;
    std::vector<float> bias;  // static rows: this step's bias
    // Dynamic rows on a GPU until FinishDynamic: the bias where the selection op writes it, read
    // by the real forward (ForwardRow::key_bias_device).
    std::shared_ptr<const DeviceTensor> device_bias;
    // The bias the real forward uses.
    const std::vector<float>& real_bias() const { return has_selection ? selection.bias : bias; }
  };

  Status Feed(const StepPlan& plan);
  RowsByKind ClassifyRows() const;
  Status Intervene(const RowsByKind& rows, StepOutcome* outcome);
  Status InterveneDynamic(const std::vector<size_t>& rows, StepOutcome* outcome);
  // Copies the dynamic rows' (`rows`, InterveneDynamic's) relevance and selections out of
  // DyscoBatchOps into staged_ once the device has them (no-op when none is pending).
  Status FinishDynamic(const std::vector<size_t>& rows);
  Status InterveneStatic(const std::vector<size_t>& rows);
  Status RealForward(const RowsByKind& rows, StepOutcome* outcome);
  Status ApplyStaged();
  void RecordDyscoSteps(const StepOutcome& outcome) const;
  void CommitAndSample(StepOutcome* outcome);

  std::vector<const DyscoController*> Controllers(const std::vector<size_t>& rows) const;
  std::vector<int64_t> NumKeys(const std::vector<size_t>& rows) const;

  ModelRunner* runner_;
  KvPagePool* pool_;
  DyscoBatchOps dysco_ops_;

  // Staging reused across steps; valid during Execute.
  std::vector<Sequence*> seqs_;
  std::vector<ForwardRow> fed_;
  std::vector<DyscoStepKind> kinds_;
  std::vector<StagedDysco> staged_;  // by plan row
  // Whether the dynamic rows' selection results are still to be copied out of DyscoBatchOps
  // (FinishDynamic).
  bool selection_pending_ = false;
  // Per-kind shares of the step's wall time, for the DySCO rows' records.
  double dynamic_select_seconds_ = 0.0, static_seconds_ = 0.0, warmup_seconds_ = 0.0;
  ForwardBatch spec_batch_, real_batch_;
  ForwardOutput spec_out_, real_out_;
};

}  // namespace dysco
