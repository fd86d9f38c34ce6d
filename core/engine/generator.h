// Generator: one generation from request to result without a scheduler thread: a Sequence made by
// the SequenceFactory, driven step by step (PlanStep -> BatchStepper::Execute) until it finishes.
// What dysco-generate, the head detector's tools and the tests use; the Scheduler drives many
// sequences with the same pieces.
//
// Thread-safety: Generate may be called from several threads at once (the runner serialises its
// forwards, the pool is thread-safe), each call owning its own Sequence.
// Ownership: the Generator references (does not own) runner, pool and factory, which must outlive
// it. Pages and DySCO state are freed on every path; results are owned by the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/trace.h"
#include "core/engine/request.h"
#include "core/engine/sequence.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"

namespace dysco {

struct GenerateResult {
  std::string text;
  std::vector<int32_t> token_ids;  // generated tokens (a final eos / stop token included)
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_seconds = 0.0;  // until the first token was sampled
  double decode_seconds = 0.0;   // after it
  // DySCO only: one record per DySCO step (empty unless request.dysco_trace), and the counters.
  std::vector<DyscoTraceRecord> dysco_trace;
  DyscoTotals dysco_totals;
};

struct GeneratorOptions {
  int64_t prefill_chunk_tokens = 512;
};

class Generator {
 public:
  Generator(ModelRunner* runner, KvPagePool* pool, const SequenceFactory* factory,
            GeneratorOptions options = {});

  using TokenCallback = std::function<void(const TokenDelta&)>;
  // Generates until a finish reason; `on_token` (optional) sees every accepted token as it is
  // produced. The factory's statuses for a bad request (INVALID_ARGUMENT naming the field,
  // RESOURCE_EXHAUSTED when the KV pool can never hold it), RESOURCE_EXHAUSTED when its pages are
  // not free now, INTERNAL for a model failure.
  StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                    const TokenCallback& on_token = nullptr);

 private:
  ModelRunner* runner_;
  KvPagePool* pool_;
  const SequenceFactory* factory_;
  GeneratorOptions options_;
};

}  // namespace dysco
