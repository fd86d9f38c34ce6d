#include "core/batch_stepper.h"

#include <algorithm>
#include <chrono>

#include "core/dysco_ops.h"

namespace dysco {

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Sorted, duplicate-free union of the selected heads of `rows`.
std::vector<std::pair<int, int>> HeadUnion(const std::vector<size_t>& rows,
                                           const std::vector<Sequence*>& seqs) {
  std::vector<std::pair<int, int>> heads;
  for (size_t i : rows) {
    const auto& h = seqs[i]->dysco()->params().selected_heads;
    heads.insert(heads.end(), h.begin(), h.end());
  }
  std::sort(heads.begin(), heads.end());
  heads.erase(std::unique(heads.begin(), heads.end()), heads.end());
  return heads;
}

// Fills rows [0, width) of `dst` from `src` (shorter) and zeros.
template <typename T>
void CopyRow(const std::vector<T>& src, int64_t count, T* dst, int64_t width) {
  const int64_t k = std::min<int64_t>(count, static_cast<int64_t>(src.size()));
  std::copy(src.begin(), src.begin() + k, dst);
  std::fill(dst + k, dst + width, T{0});
}

}  // namespace

Status BatchStepper::UpdateRelevance(const std::vector<size_t>& rows, const StepOutput& out,
                                     const std::vector<int64_t>& out_row,
                                     const std::vector<std::pair<int, int>>& probe_heads) {
  const int64_t D = static_cast<int64_t>(rows.size());
  int64_t width = 0;
  for (size_t i : rows) width = std::max(width, steps_[i].start_position + 1);
  op_relevance_.resize(D * width);
  op_probs_.resize(D * width);
  op_num_keys_.resize(D);
  op_decay_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const size_t i = rows[d];
    DyscoController* c = seqs_[i]->dysco();
    RelevanceState& s = c->state();
    const int64_t n = steps_[i].start_position + 1;
    if (static_cast<int64_t>(s.relevance.size()) != n - 1 || out.probs_len < n) {
      return InternalError("DySCO relevance of a sequence at position " + std::to_string(n - 1) +
                           " has " + std::to_string(s.relevance.size()) + " entries");
    }
    // The mean over the sequence's own heads, in its own head order, summed in fp32 and scaled as
    // the op does, then handed to the op as a single head: each row is then independent of which
    // heads (and how many) its batch-mates have.
    float* mean = op_probs_.data() + d * width;
    const auto& heads = c->params().selected_heads;
    for (size_t h = 0; h < heads.size(); ++h) {
      const auto it = std::lower_bound(probe_heads.begin(), probe_heads.end(), heads[h]);
      const float* p = out.probs_row(out_row[d], it - probe_heads.begin());
      if (h == 0) {
        std::copy(p, p + n, mean);
      } else {
        for (int64_t j = 0; j < n; ++j) mean[j] += p[j];
      }
    }
    const float inv_heads = 1.0f / static_cast<float>(heads.size());
    for (int64_t j = 0; j < n; ++j) mean[j] *= inv_heads;
    std::fill(mean + n, mean + width, 0.0f);
    CopyRow(s.relevance, n - 1, op_relevance_.data() + d * width, width);
    op_num_keys_[d] = n;
    op_decay_[d] = static_cast<float>(c->params().decay_factor);
  }
  DYSCO_RETURN_IF_ERROR(DyscoRelevanceUpdate(op_relevance_.data(), D, width, op_probs_.data(), 1,
                                             width, op_num_keys_.data(), op_decay_.data()));
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = op_num_keys_[d];
    const float* r = op_relevance_.data() + d * width;
    seqs_[rows[d]]->dysco()->state().relevance.assign(r, r + n);
  }
  return OkStatus();
}

Status BatchStepper::SelectRows(const std::vector<size_t>& rows,
                                const std::vector<int64_t>& num_keys, int64_t* width) {
  const int64_t D = static_cast<int64_t>(rows.size());
  *width = 0;
  for (int64_t n : num_keys) *width = std::max(*width, n);
  const int64_t w = *width;
  op_relevance_.resize(D * w);
  op_template_.resize(D * w);
  op_bias_.resize(D * w);
  op_selected_.resize(D * w);
  op_stats_.resize(D * 2);
  op_num_keys_.resize(D);
  op_top_p_.resize(D);
  op_top_k_.resize(D);
  op_strength_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const DyscoController* c = seqs_[rows[d]]->dysco();
    const DyscoParams& p = c->params();
    const int64_t n = num_keys[d];
    CopyRow(c->state().relevance, n, op_relevance_.data() + d * w, w);
    CopyRow(c->state().template_mask, n, op_template_.data() + d * w, w);
    op_num_keys_[d] = n;
    op_top_p_[d] = p.top_p ? static_cast<float>(*p.top_p) : 0.0f;
    op_top_k_[d] = p.top_k ? *p.top_k : 0;
    op_strength_[d] = static_cast<float>(p.strength);
  }
  return DyscoSelectBias(op_bias_.data(), op_selected_.data(), op_stats_.data(),
                         op_relevance_.data(), D, w, op_num_keys_.data(), op_template_.data(),
                         op_top_p_.data(), op_top_k_.data(), op_strength_.data());
}

Status BatchStepper::SelectDynamic(const std::vector<size_t>& rows) {
  std::vector<int64_t> num_keys;
  for (size_t i : rows) num_keys.push_back(steps_[i].start_position + 1);
  int64_t width = 0;
  DYSCO_RETURN_IF_ERROR(SelectRows(rows, num_keys, &width));
  for (size_t d = 0; d < rows.size(); ++d) {
    RelevanceState& s = seqs_[rows[d]]->dysco()->state();
    const int64_t n = op_num_keys_[d];
    s.bias.assign(op_bias_.data() + d * width, op_bias_.data() + d * width + n);
    s.selected.assign(op_selected_.data() + d * width, op_selected_.data() + d * width + n);
    s.num_selected = static_cast<int64_t>(op_stats_[2 * d]);
    s.selected_mass = op_stats_[2 * d + 1];
  }
  return OkStatus();
}

Status BatchStepper::BiasStatic(const std::vector<size_t>& rows) {
  // First static step of a sequence: its set, chosen once from the relevance the context warm-up
  // left (bias discarded: the keys grow from here on).
  std::vector<size_t> first;
  std::vector<int64_t> first_keys;
  for (size_t i : rows) {
    const RelevanceState& s = seqs_[i]->dysco()->state();
    if (s.static_set_chosen) continue;
    first.push_back(i);
    first_keys.push_back(static_cast<int64_t>(s.relevance.size()));
  }
  if (!first.empty()) {
    int64_t width = 0;
    DYSCO_RETURN_IF_ERROR(SelectRows(first, first_keys, &width));
    for (size_t d = 0; d < first.size(); ++d) {
      RelevanceState& s = seqs_[first[d]]->dysco()->state();
      const int64_t m = op_num_keys_[d];
      s.selected.assign(op_selected_.data() + d * width, op_selected_.data() + d * width + m);
      s.num_selected = static_cast<int64_t>(op_stats_[2 * d]);
      s.selected_mass = op_stats_[2 * d + 1];
      s.static_set_chosen = true;
    }
  }

  const int64_t D = static_cast<int64_t>(rows.size());
  int64_t width = 0;
  for (size_t i : rows) width = std::max(width, steps_[i].start_position + 1);
  op_selected_.resize(D * width);
  op_template_.resize(D * width);
  op_bias_.resize(D * width);
  op_num_keys_.resize(D);
  op_strength_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const DyscoController* c = seqs_[rows[d]]->dysco();
    const int64_t n = steps_[rows[d]].start_position + 1;
    // The frozen set, new keys unselected (the current one still gets the bias from the op).
    CopyRow(c->state().selected, n, op_selected_.data() + d * width, width);
    CopyRow(c->state().template_mask, n, op_template_.data() + d * width, width);
    op_num_keys_[d] = n;
    op_strength_[d] = static_cast<float>(c->params().strength);
  }
  DYSCO_RETURN_IF_ERROR(DyscoBiasFromSelection(op_bias_.data(), op_selected_.data(), D, width,
                                               op_num_keys_.data(), op_template_.data(),
                                               op_strength_.data()));
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = op_num_keys_[d];
    seqs_[rows[d]]->dysco()->state().bias.assign(op_bias_.data() + d * width,
                                                 op_bias_.data() + d * width + n);
  }
  return OkStatus();
}

Status BatchStepper::Step(const std::vector<BatchStepEntry>& entries,
                          std::vector<BatchStepResult>* results) {
  stats_ = {};
  const size_t B = entries.size();
  if (B == 0) return InvalidArgumentError("BatchStepper::Step: no sequences");
  seqs_.resize(B);
  steps_.assign(B, SequenceStep());
  kinds_.assign(B, DyscoStepKind::kPrefill);
  for (size_t i = 0; i < B; ++i) {
    seqs_[i] = entries[i].sequence;
    Status st = seqs_[i] == nullptr ? InvalidArgumentError("BatchStepper::Step: entries[" +
                                                           std::to_string(i) + "] has no sequence")
                                    : seqs_[i]->PrepareStep(entries[i].max_tokens, &steps_[i]);
    if (!st.ok()) {
      for (size_t k = 0; k < i; ++k) seqs_[k]->AbortStep();
      return st;
    }
    if (const DyscoController* c = seqs_[i]->dysco()) {
      kinds_[i] = c->StepKindAt(steps_[i].start_position);
    }
  }
  Status status = [&]() -> Status {
    std::vector<size_t> dynamic, fixed, warmup;
    for (size_t i = 0; i < B; ++i) {
      if (kinds_[i] == DyscoStepKind::kDynamic) dynamic.push_back(i);
      if (kinds_[i] == DyscoStepKind::kStatic) fixed.push_back(i);
      if (kinds_[i] == DyscoStepKind::kContextWarmup) warmup.push_back(i);
    }
    double spec_seconds = 0.0, dynamic_select_seconds = 0.0, static_seconds = 0.0;
    double real_seconds = 0.0, warmup_seconds = 0.0;

    // (a) Speculative pass and selection of the dynamic intervention steps.
    if (!dynamic.empty()) {
      spec_batch_.kv_pool = pool_;
      spec_batch_.sequences.clear();
      spec_batch_.last_layer = 0;
      for (size_t i : dynamic) {
        spec_batch_.sequences.push_back(steps_[i]);
        spec_batch_.last_layer =
            std::max(spec_batch_.last_layer, seqs_[i]->dysco()->params().max_head_layer());
      }
      spec_batch_.probe_heads = HeadUnion(dynamic, seqs_);
      auto t0 = Clock::now();
      DYSCO_RETURN_IF_ERROR(runner_->Step(spec_batch_, &spec_out_));
      spec_seconds = Since(t0);
      stats_.speculative_rows = static_cast<int64_t>(dynamic.size());
      t0 = Clock::now();
      std::vector<int64_t> out_row(dynamic.size());
      for (size_t d = 0; d < dynamic.size(); ++d) out_row[d] = static_cast<int64_t>(d);
      DYSCO_RETURN_IF_ERROR(UpdateRelevance(dynamic, spec_out_, out_row, spec_batch_.probe_heads));
      DYSCO_RETURN_IF_ERROR(SelectDynamic(dynamic));
      dynamic_select_seconds = Since(t0);
    }
    if (!fixed.empty()) {
      const auto t0 = Clock::now();
      DYSCO_RETURN_IF_ERROR(BiasStatic(fixed));
      static_seconds = Since(t0);
    }

    // (b) The real pass of every sequence.
    real_batch_.kv_pool = pool_;
    real_batch_.last_layer = -1;
    real_batch_.sequences = steps_;
    for (size_t i : dynamic) real_batch_.sequences[i].key_bias = seqs_[i]->dysco()->state().bias;
    for (size_t i : fixed) real_batch_.sequences[i].key_bias = seqs_[i]->dysco()->state().bias;
    real_batch_.probe_heads = HeadUnion(warmup, seqs_);
    auto t0 = Clock::now();
    DYSCO_RETURN_IF_ERROR(runner_->Step(real_batch_, &real_out_));
    real_seconds = Since(t0);
    stats_.real_rows = static_cast<int64_t>(B);
    if (!warmup.empty()) {
      t0 = Clock::now();
      std::vector<int64_t> out_row(warmup.begin(), warmup.end());
      DYSCO_RETURN_IF_ERROR(UpdateRelevance(warmup, real_out_, out_row, real_batch_.probe_heads));
      warmup_seconds = Since(t0);
    }

    for (size_t i = 0; i < B; ++i) {
      if (kinds_[i] == DyscoStepKind::kPrefill) continue;
      DyscoStepTimings t;
      t.real_seconds = real_seconds;
      if (kinds_[i] == DyscoStepKind::kDynamic) {
        t.speculative_seconds = spec_seconds;
        t.select_seconds = dynamic_select_seconds;
      } else if (kinds_[i] == DyscoStepKind::kStatic) {
        t.select_seconds = static_seconds;
      } else {
        t.select_seconds = warmup_seconds;
      }
      seqs_[i]->dysco()->RecordStep(kinds_[i], steps_[i].start_position, steps_[i].token_ids[0], t);
    }
    stats_.timings.speculative_seconds = spec_seconds;
    stats_.timings.select_seconds = dynamic_select_seconds + static_seconds + warmup_seconds;
    stats_.timings.real_seconds = real_seconds;
    return OkStatus();
  }();
  if (!status.ok()) {
    for (Sequence* s : seqs_) s->AbortStep();
    return status;
  }

  results->assign(B, BatchStepResult());
  for (size_t i = 0; i < B; ++i) {
    BatchStepResult& r = (*results)[i];
    r.kind = kinds_[i];
    if (!seqs_[i]->CommitStep()) continue;  // a prefill chunk or warm-up token before the last
    const auto t0 = Clock::now();
    r.delta = seqs_[i]->AcceptLogits(real_out_.logits_row(static_cast<int64_t>(i)),
                                     static_cast<int>(real_out_.vocab_size));
    const double dt = Since(t0);
    r.sampled = true;
    stats_.timings.sample_seconds += dt;
    if (DyscoController* c = seqs_[i]->dysco(); c != nullptr && r.kind != DyscoStepKind::kPrefill) {
      c->RecordNextToken(r.delta.token_id, dt);
    }
  }
  return OkStatus();
}

}  // namespace dysco
