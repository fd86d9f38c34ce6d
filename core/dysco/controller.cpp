#include "core/dysco/controller.h"

#include <algorithm>
#include <string>

#include "core/model/dysco_host_ops.h"

namespace dysco {

namespace {

constexpr int kTopRelevanceEntries = 8;

Status Mismatch(const char* what, size_t got, int64_t expected) {
  return InternalError(std::string("DyscoController: ") + what + " has " + std::to_string(got) +
                       " entries, expected " + std::to_string(expected));
}

}  // namespace

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

int64_t DyscoController::MaxTokensToFeed(int64_t num_cached, int64_t num_uncached) const {
  const int64_t prefill_end = params_.prefill_len();
  if (num_cached < prefill_end) return std::min(num_uncached, prefill_end - num_cached);
  return std::min<int64_t>(num_uncached, 1);
}

Status DyscoController::ApplyRelevance(std::vector<float> relevance) {
  if (relevance.size() != state_.relevance.size() + 1) {
    return Mismatch("the relevance update", relevance.size(),
                    static_cast<int64_t>(state_.relevance.size()) + 1);
  }
  state_.relevance = std::move(relevance);
  return OkStatus();
}

Status DyscoController::ApplySelection(DyscoSelection selection) {
  if (selection.bias.size() != selection.selected.size()) {
    return Mismatch("the selection's bias", selection.bias.size(),
                    static_cast<int64_t>(selection.selected.size()));
  }
  state_.bias = std::move(selection.bias);
  state_.selected = std::move(selection.selected);
  state_.num_selected = selection.num_selected;
  state_.selected_mass = selection.selected_mass;
  return OkStatus();
}

Status DyscoController::FreezeSelection(DyscoSelection selection) {
  if (selection.selected.size() != state_.relevance.size()) {
    return Mismatch("the static selection", selection.selected.size(),
                    static_cast<int64_t>(state_.relevance.size()));
  }
  // The bias of the moment of choice is dropped: the keys grow from here on.
  state_.selected = std::move(selection.selected);
  state_.num_selected = selection.num_selected;
  state_.selected_mass = selection.selected_mass;
  state_.static_set_frozen = true;
  return OkStatus();
}

Status DyscoController::ApplyBias(std::vector<float> bias) {
  if (bias.size() < state_.selected.size()) {
    return Mismatch("the static bias", bias.size(), static_cast<int64_t>(state_.selected.size()));
  }
  state_.bias = std::move(bias);
  return OkStatus();
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
  trace_.push_back(MakeRecord(kind, step, position, token, timings));
}

void DyscoController::RecordNextToken(int32_t token, double sample_seconds) {
  totals_.seconds.sample_seconds += sample_seconds;
  if (trace_.empty() || trace_mode_ == DyscoTraceMode::kOff) return;
  trace_.back().next_token = token;
  trace_.back().timings.sample_seconds += sample_seconds;
}

DyscoTraceRecord DyscoController::MakeRecord(DyscoStepKind kind, int64_t step, int64_t position,
                                             int32_t token, const DyscoStepTimings& timings) const {
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
  return r;
}

}  // namespace dysco
