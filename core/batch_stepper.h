// BatchStepper: runs one engine step for a set of active sequences, plain and DySCO mixed, some
// prefilling a chunk, some decoding (docs/dysco.md). Shared by the single-sequence Generator and
// the continuous-batching scheduler.
//
// One step is:
//   (a) when some DySCO sequences are at a dynamic intervention step: one speculative StepBatch of
//       just those (last_layer = the deepest head layer over them, probe heads = the union of their
//       heads, each reading its own), then, for all of them in one op call each, the relevance
//       update and selection + bias; DySCO sequences at a static step get their bias from their
//       frozen set (chosen, batched, at their first static step);
//   (b) one real StepBatch of every sequence, each DySCO row with its bias (plain rows: none), and
//       the probe heads of the sequences at a context warm-up step, whose relevance is then updated
//       in one op call;
//   then each sequence whose step ended its uncached tokens samples its next token (a DySCO
//   warm-up token's logits are discarded, except the last prompt token's).
// Sequences with different DySCO parameters (heads, top_p, strength, ...) may share a step: every
// DySCO computation is per row, so a sequence's results do not depend on its batch-mates.
//
// Thread-safety: one BatchStepper per driving thread (it keeps staging buffers); the runner
// serialises the passes of several steppers.
// Ownership: references (does not own) the runner and the pool, which must outlive it, and the
// sequences during Step. On error no token is sampled and the step's sequences must be dropped:
// their caches and DySCO state may hold part of the failed step.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/dysco.h"
#include "core/generator.h"
#include "core/kv_page_pool.h"
#include "core/model_runner.h"
#include "core/status.h"

namespace dysco {

struct BatchStepEntry {
  Sequence* sequence = nullptr;  // unfinished; DySCO when sequence->dysco() is set
  int64_t max_tokens = 1;        // most prompt tokens this step may prefill (decode feeds one)
};

struct BatchStepResult {
  bool sampled = false;  // the step's logits gave the sequence its next token: `delta`
  TokenDelta delta;
  DyscoStepKind kind = DyscoStepKind::kPrefill;  // always kPrefill for a plain sequence
};

// The step as a whole (each DySCO sequence's trace also has its share).
struct BatchStepStats {
  int64_t speculative_rows = 0;  // sequences in the speculative pass (0: none ran)
  int64_t real_rows = 0;
  DyscoStepTimings timings;  // sample_seconds summed over the sampled sequences
};

class BatchStepper {
 public:
  BatchStepper(ModelRunner* runner, KvPagePool* pool) : runner_(runner), pool_(pool) {}

  // One step of every entry (at least one). `results` gets one row per entry, in order.
  // Errors: from Sequence::PrepareStep (RESOURCE_EXHAUSTED: pool full; nothing was run, every
  // sequence is left as it was), from the runner or the DySCO ops (INTERNAL...).
  Status Step(const std::vector<BatchStepEntry>& entries, std::vector<BatchStepResult>* results);

  const BatchStepStats& last_stats() const { return stats_; }
  // The last step's real-pass output: row i = entries[i] (logits of its last new token).
  const StepOutput& last_real_output() const { return real_out_; }

 private:
  // Relevance update of rows `rows` (entries indices) from per-row head probabilities gathered out
  // of `out` (row of entry i = out_row[i], its heads at head_index[i]).
  Status UpdateRelevance(const std::vector<size_t>& rows, const StepOutput& out,
                         const std::vector<int64_t>& out_row,
                         const std::vector<std::pair<int, int>>& probe_heads);
  // Batched selection + bias of `rows`, row d over its first num_keys[d] relevance entries; the
  // results stay in the op_* staging buffers, row d at d * *width.
  Status SelectRows(const std::vector<size_t>& rows, const std::vector<int64_t>& num_keys,
                    int64_t* width);
  Status SelectDynamic(const std::vector<size_t>& rows);
  Status BiasStatic(const std::vector<size_t>& rows);

  ModelRunner* runner_;
  KvPagePool* pool_;
  BatchStepStats stats_;

  // Staging reused across steps.
  std::vector<Sequence*> seqs_;
  std::vector<SequenceStep> steps_;
  std::vector<DyscoStepKind> kinds_;
  StepBatch spec_batch_, real_batch_;
  StepOutput spec_out_, real_out_;
  std::vector<float> op_relevance_, op_probs_, op_bias_, op_stats_, op_decay_, op_top_p_,
      op_strength_;
  std::vector<uint8_t> op_selected_, op_template_;
  std::vector<int64_t> op_num_keys_, op_top_k_;
};

}  // namespace dysco
