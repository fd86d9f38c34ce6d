// What a DySCO sequence records about its steps: per-step wall times, the trace records that
// `--trace` and `return_selection` expose (docs/dysco.md "Trace"), and the counters that metrics
// read.
//
// Thread-safety: value types and pure functions. Ownership: values owned by their holder.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/dysco/params.h"

namespace dysco {

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

}  // namespace dysco
