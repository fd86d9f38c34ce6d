#include "core/engine/generator.h"

#include <chrono>
#include <memory>

#include "core/engine/batch_stepper.h"
#include "core/engine/step_plan.h"

namespace dysco {

Generator::Generator(ModelRunner* runner, KvPagePool* pool, const SequenceFactory* factory,
                     GeneratorOptions options)
    : runner_(runner), pool_(pool), factory_(factory), options_(options) {}

StatusOr<GenerateResult> Generator::Generate(const GenerateRequest& request,
                                             const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  if (options_.prefill_chunk_tokens < 1) {
    return InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  DYSCO_ASSIGN_OR_RETURN(std::unique_ptr<Sequence> seq, factory_->Create(request, pool_));
  // Reserving every page now fails fast instead of midway through generation.
  DYSCO_RETURN_IF_ERROR(seq->ReservePages(seq->max_cached_tokens()));

  GenerateResult result;
  result.prompt_tokens = seq->num_prompt_tokens();
  BatchStepper stepper(runner_, pool_);
  const StepBudget budget{options_.prefill_chunk_tokens, options_.prefill_chunk_tokens};
  StepOutcome outcome;
  const auto start = Clock::now();
  auto first_token_time = start;
  bool first = true;
  while (!seq->finished()) {
    DYSCO_RETURN_IF_ERROR(stepper.Execute(PlanStep({seq.get()}, budget), &outcome));
    if (!outcome.rows[0].sampled) continue;  // a prefill chunk or DySCO warm-up token
    if (first) first_token_time = Clock::now();
    first = false;
    if (on_token) on_token(outcome.rows[0].delta);
  }
  const auto end = Clock::now();
  seq->ReleasePages();
  if (DyscoController* c = seq->dysco()) {
    result.dysco_trace = c->TakeTrace();
    result.dysco_totals = c->totals();
  }
  result.text = seq->text();
  result.token_ids = seq->generated_ids();
  result.generated_tokens = static_cast<int64_t>(result.token_ids.size());
  result.finish_reason = seq->finish_reason();
  result.prefill_seconds = std::chrono::duration<double>(first_token_time - start).count();
  result.decode_seconds = std::chrono::duration<double>(end - first_token_time).count();
  return result;
}

}  // namespace dysco
