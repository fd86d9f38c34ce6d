#include "core/engine/batch_stepper.h"

#include <algorithm>

#include "core/base/scoped_timer.h"

namespace dysco {

namespace {

// Hands every fed token of the step back (AbortFeed) unless the step completed: an error or an
// exception anywhere between Feed and the commit leaves no sequence with a half-taken feed.
class FeedRollback {
 public:
  explicit FeedRollback(const std::vector<Sequence*>& sequences) : sequences_(sequences) {}
  ~FeedRollback() {
    if (!armed_) return;
    for (Sequence* s : sequences_) {
      if (s != nullptr) s->AbortFeed();  // harmless for a sequence that was not fed yet
    }
  }
  void Disarm() { armed_ = false; }
  FeedRollback(const FeedRollback&) = delete;
  FeedRollback& operator=(const FeedRollback&) = delete;

 private:
  const std::vector<Sequence*>& sequences_;
  bool armed_ = true;
};

}  // namespace

std::vector<const DyscoController*> BatchStepper::Controllers(
    const std::vector<size_t>& rows) const {
  std::vector<const DyscoController*> out;
  out.reserve(rows.size());
  for (size_t i : rows) out.push_back(seqs_[i]->dysco());
  return out;
}

std::vector<int64_t> BatchStepper::NumKeys(const std::vector<size_t>& rows) const {
  std::vector<int64_t> out;
  out.reserve(rows.size());
  for (size_t i : rows) out.push_back(fed_[i].start_position + 1);
  return out;
}

Status BatchStepper::Feed(const StepPlan& plan) {
  const size_t B = plan.rows.size();
  seqs_.assign(B, nullptr);
  fed_.assign(B, ForwardRow());
  kinds_.assign(B, DyscoStepKind::kPrefill);
  staged_.assign(B, StagedDysco());
  for (size_t i = 0; i < B; ++i) {
    if (plan.rows[i].sequence == nullptr) {
      return InvalidArgumentError("step plan row " + std::to_string(i) + " has no sequence");
    }
    seqs_[i] = plan.rows[i].sequence;
    DYSCO_RETURN_IF_ERROR(seqs_[i]->PrepareFeed(plan.rows[i].num_tokens, &fed_[i]));
    if (const DyscoController* c = seqs_[i]->dysco()) {
      kinds_[i] = c->StepKindAt(fed_[i].start_position);
    }
  }
  return OkStatus();
}

BatchStepper::RowsByKind BatchStepper::ClassifyRows() const {
  RowsByKind rows;
  for (size_t i = 0; i < kinds_.size(); ++i) {
    if (kinds_[i] == DyscoStepKind::kDynamic) rows.dynamic.push_back(i);
    if (kinds_[i] == DyscoStepKind::kStatic) rows.fixed.push_back(i);
    if (kinds_[i] == DyscoStepKind::kContextWarmup) rows.warmup.push_back(i);
  }
  return rows;
}

Status BatchStepper::InterveneDynamic(const std::vector<size_t>& rows, StepOutcome* outcome) {
  const std::vector<const DyscoController*> controllers = Controllers(rows);
  spec_batch_.kv_pool = pool_;
  spec_batch_.last_layer = DeepestHeadLayer(controllers);
  spec_batch_.probe_heads = UnionOfHeads(controllers);
  spec_batch_.probe_mean_heads = ProbeMeanHeads(controllers, spec_batch_.probe_heads);
  // On a GPU the head means stay there for the relevance update, and the forward returns without
  // waiting: the select stage packs its inputs while the pass runs (its time then includes the
  // wait; docs/operations.md "Metrics").
  spec_batch_.probe_mean_on_device = dysco_ops_.on_device();
  spec_batch_.sequences.clear();
  for (size_t i : rows) spec_batch_.sequences.push_back(fed_[i]);
  {
    ScopedTimer timer(&outcome->timings.speculative_seconds);
    DYSCO_RETURN_IF_ERROR(runner_->Forward(spec_batch_, &spec_out_));
  }
  outcome->speculative_rows = static_cast<int64_t>(rows.size());
  ScopedTimer timer(&dynamic_select_seconds_);
  DYSCO_RETURN_IF_ERROR(
      dysco_ops_.StartUpdateRelevanceAndSelect(controllers, NumKeys(rows), spec_out_));
  selection_pending_ = true;
  // On a GPU the selection's results are still on their way: the real forward reads each row's
  // bias where the op wrote it, and FinishDynamic copies the results out after it (docs/gpu.md
  // "The DySCO stage without a wait"). On the host they are there already.
  for (size_t d = 0; d < rows.size(); ++d) {
    staged_[rows[d]].device_bias = dysco_ops_.DeviceBias(static_cast<int64_t>(d));
  }
  if (staged_[rows[0]].device_bias == nullptr) return FinishDynamic(rows);
  return OkStatus();
}

Status BatchStepper::FinishDynamic(const std::vector<size_t>& rows) {
  if (!selection_pending_) return OkStatus();
  selection_pending_ = false;
  std::vector<std::vector<float>> relevance;
  std::vector<DyscoSelection> selections;
  DYSCO_RETURN_IF_ERROR(dysco_ops_.FinishUpdateRelevanceAndSelect(&relevance, &selections));
  for (size_t d = 0; d < rows.size(); ++d) {
    StagedDysco& st = staged_[rows[d]];
    st.relevance = std::move(relevance[d]);
    st.has_relevance = true;
    st.selection = std::move(selections[d]);
    st.has_selection = true;
    st.device_bias.reset();
  }
  return OkStatus();
}

Status BatchStepper::InterveneStatic(const std::vector<size_t>& rows) {
  ScopedTimer timer(&static_seconds_);
  // First static step of a row: its set, chosen once from the relevance the context warm-up left.
  std::vector<size_t> first;
  for (size_t i : rows) {
    if (!seqs_[i]->dysco()->static_set_frozen()) first.push_back(i);
  }
  if (!first.empty()) {
    const std::vector<const DyscoController*> controllers = Controllers(first);
    std::vector<const std::vector<float>*> views;
    std::vector<int64_t> keys;
    for (const DyscoController* c : controllers) {
      views.push_back(&c->relevance());
      keys.push_back(static_cast<int64_t>(c->relevance().size()));
    }
    std::vector<DyscoSelection> frozen;
    DYSCO_RETURN_IF_ERROR(dysco_ops_.Select(controllers, views, keys, &frozen));
    for (size_t d = 0; d < first.size(); ++d) {
      staged_[first[d]].frozen = std::move(frozen[d]);
      staged_[first[d]].has_frozen = true;
    }
  }
  std::vector<const std::vector<uint8_t>*> sets;
  for (size_t i : rows) {
    sets.push_back(staged_[i].has_frozen ? &staged_[i].frozen.selected
                                         : &seqs_[i]->dysco()->selection());
  }
  std::vector<std::vector<float>> bias;
  DYSCO_RETURN_IF_ERROR(
      dysco_ops_.BiasFromSelection(Controllers(rows), sets, NumKeys(rows), &bias));
  for (size_t d = 0; d < rows.size(); ++d) staged_[rows[d]].bias = std::move(bias[d]);
  return OkStatus();
}

Status BatchStepper::Intervene(const RowsByKind& rows, StepOutcome* outcome) {
  selection_pending_ = false;
  if (!rows.dynamic.empty()) DYSCO_RETURN_IF_ERROR(InterveneDynamic(rows.dynamic, outcome));
  if (!rows.fixed.empty()) {
    // The static rows' ops reuse the selection's staging buffer: the dynamic rows' results come
    // out of it first.
    {
      ScopedTimer timer(&dynamic_select_seconds_);
      DYSCO_RETURN_IF_ERROR(FinishDynamic(rows.dynamic));
    }
    DYSCO_RETURN_IF_ERROR(InterveneStatic(rows.fixed));
  }
  return OkStatus();
}

Status BatchStepper::RealForward(const RowsByKind& rows, StepOutcome* outcome) {
  real_batch_.kv_pool = pool_;
  real_batch_.last_layer = -1;
  real_batch_.sequences = fed_;
  // The logits cross to the host only when a row that samples in this step needs them; otherwise
  // the runner picks each row's greedy token where they are (ForwardBatch::logits_to_host).
  real_batch_.logits_to_host = false;
  for (size_t i = 0; i < fed_.size(); ++i) {
    const bool samples = static_cast<int64_t>(fed_[i].token_ids.size) == seqs_[i]->num_uncached();
    if (samples && seqs_[i]->needs_logits()) real_batch_.logits_to_host = true;
  }
  for (size_t i : rows.dynamic) {
    if (selection_pending_) {
      real_batch_.sequences[i].key_bias_device = staged_[i].device_bias;
    } else {
      real_batch_.sequences[i].key_bias = staged_[i].real_bias();
    }
  }
  for (size_t i : rows.fixed) real_batch_.sequences[i].key_bias = staged_[i].real_bias();
  const std::vector<const DyscoController*> warmup = Controllers(rows.warmup);
  real_batch_.probe_heads = UnionOfHeads(warmup);
  real_batch_.probe_mean_heads.clear();
  if (!warmup.empty()) {
    // The warm-up rows' head means; the other rows take no probabilities (empty lists).
    const std::vector<std::vector<int>> lists = ProbeMeanHeads(warmup, real_batch_.probe_heads);
    real_batch_.probe_mean_heads.assign(fed_.size(), {});
    for (size_t d = 0; d < rows.warmup.size(); ++d) {
      real_batch_.probe_mean_heads[rows.warmup[d]] = lists[d];
    }
  }
  {
    ScopedTimer timer(&outcome->timings.real_seconds);
    DYSCO_RETURN_IF_ERROR(runner_->Forward(real_batch_, &real_out_));
  }
  outcome->real_rows = static_cast<int64_t>(fed_.size());
  outcome->logits_to_host = real_batch_.logits_to_host;
  {
    // The dynamic rows' selections, copied back while the real pass ran.
    ScopedTimer timer(&dynamic_select_seconds_);
    DYSCO_RETURN_IF_ERROR(FinishDynamic(rows.dynamic));
  }
  if (warmup.empty()) return OkStatus();
  ScopedTimer timer(&warmup_seconds_);
  const std::vector<int64_t> out_rows(rows.warmup.begin(), rows.warmup.end());
  std::vector<std::vector<float>> relevance;
  DYSCO_RETURN_IF_ERROR(
      dysco_ops_.UpdateRelevance(warmup, NumKeys(rows.warmup), real_out_, out_rows, &relevance));
  for (size_t d = 0; d < rows.warmup.size(); ++d) {
    staged_[rows.warmup[d]].relevance = std::move(relevance[d]);
    staged_[rows.warmup[d]].has_relevance = true;
  }
  return OkStatus();
}

Status BatchStepper::ApplyStaged() {
  for (size_t i = 0; i < seqs_.size(); ++i) {
    DyscoController* c = seqs_[i]->dysco();
    if (c == nullptr || kinds_[i] == DyscoStepKind::kPrefill) continue;
    StagedDysco& st = staged_[i];
    if (st.has_relevance) DYSCO_RETURN_IF_ERROR(c->ApplyRelevance(std::move(st.relevance)));
    if (st.has_frozen) DYSCO_RETURN_IF_ERROR(c->FreezeSelection(std::move(st.frozen)));
    if (st.has_selection) {
      DYSCO_RETURN_IF_ERROR(c->ApplySelection(std::move(st.selection)));
    } else if (kinds_[i] == DyscoStepKind::kStatic) {
      DYSCO_RETURN_IF_ERROR(c->ApplyBias(std::move(st.bias)));
    }
  }
  return OkStatus();
}

void BatchStepper::RecordDyscoSteps(const StepOutcome& outcome) const {
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (kinds_[i] == DyscoStepKind::kPrefill) continue;
    DyscoStepTimings t;
    t.real_seconds = outcome.timings.real_seconds;
    if (kinds_[i] == DyscoStepKind::kDynamic) {
      t.speculative_seconds = outcome.timings.speculative_seconds;
      t.select_seconds = dynamic_select_seconds_;
    } else if (kinds_[i] == DyscoStepKind::kStatic) {
      t.select_seconds = static_seconds_;
    } else {
      t.select_seconds = warmup_seconds_;
    }
    seqs_[i]->dysco()->RecordStep(kinds_[i], fed_[i].start_position, fed_[i].token_ids[0], t);
  }
}

void BatchStepper::CommitAndSample(StepOutcome* outcome) {
  for (size_t i = 0; i < seqs_.size(); ++i) {
    RowOutcome& r = outcome->rows[i];
    r.kind = kinds_[i];
    if (!seqs_[i]->CommitFeed()) continue;  // a prefill chunk or warm-up token before the last
    double seconds = 0.0;
    {
      ScopedTimer timer(&seconds);
      r.delta = real_out_.greedy_tokens.empty()
                    ? seqs_[i]->AcceptLogits(real_out_.logits_row(static_cast<int64_t>(i)),
                                             static_cast<int>(real_out_.vocab_size))
                    : seqs_[i]->AcceptToken(real_out_.greedy_tokens[i]);
    }
    r.sampled = true;
    outcome->timings.sample_seconds += seconds;
    DyscoController* c = seqs_[i]->dysco();
    if (c != nullptr && r.kind != DyscoStepKind::kPrefill)
      c->RecordNextToken(r.delta.token_id, seconds);
  }
}

Status BatchStepper::Execute(const StepPlan& plan, StepOutcome* outcome) {
  *outcome = StepOutcome();
  if (plan.empty()) return InvalidArgumentError("BatchStepper::Execute: the plan has no rows");
  dynamic_select_seconds_ = static_seconds_ = warmup_seconds_ = 0.0;
  FeedRollback rollback(seqs_);
  DYSCO_RETURN_IF_ERROR(Feed(plan));
  const RowsByKind rows = ClassifyRows();
  DYSCO_RETURN_IF_ERROR(Intervene(rows, outcome));
  DYSCO_RETURN_IF_ERROR(RealForward(rows, outcome));
  outcome->timings.select_seconds = dynamic_select_seconds_ + static_seconds_ + warmup_seconds_;
  // The commit. ApplyStaged can fail only on a result that does not fit its controller (a bug,
  // INTERNAL): the caller then drops the step's sequences, whose DySCO state may be half-applied.
  DYSCO_RETURN_IF_ERROR(ApplyStaged());
  RecordDyscoSteps(*outcome);
  rollback.Disarm();
  outcome->rows.assign(plan.rows.size(), RowOutcome());
  CommitAndSample(outcome);
  return OkStatus();
}

}  // namespace dysco
