// Token sampling from one sequence's logits: repetition penalty, temperature, top-k, top-p, in the
// order Hugging Face transformers applies them, with a per-sequence seeded RNG so that the same
// seed gives the same tokens.
//
// Thread-safety: a Sampler belongs to one sequence and is not thread-safe; distinct Samplers may
// run on distinct threads. SamplingParams is a value type.
//
// Ownership: Sample reads the caller's logits and context only during the call.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "core/base/status.h"

namespace dysco {

struct SamplingParams {
  double temperature = 0.0;  // 0 = greedy (GreedyTokenId: ties -> lowest id)
  int top_k = 0;             // 0 = off
  double top_p = 1.0;        // 1 = off; keeps the smallest set of top tokens with mass >= top_p
  uint64_t seed = 0;
  double repetition_penalty =
      1.0;  // 1 = off; HF: positive logits / r, negative * r, over prompt + output

  // INVALID_ARGUMENT naming the field, e.g. "sampling.top_p must be in (0, 1], got 1.5".
  Status Validate() const;
  bool greedy() const { return temperature == 0.0; }
  // Greedy without a repetition penalty: the token is GreedyTokenId of the raw logits, which the
  // runner can pick where the logits are (ForwardBatch::logits_to_host).
  bool plain_greedy() const { return greedy() && repetition_penalty == 1.0; }
};

class Sampler {
 public:
  // `params` must have passed Validate().
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from logits[0 .. vocab). `context` is every token of the sequence so far
  // (prompt and generated); only the repetition penalty reads it.
  int32_t Sample(const float* logits, int vocab, const std::vector<int32_t>& context);

  const SamplingParams& params() const { return params_; }

 private:
  // Uniform double in [0, 1) from the 53 high bits, so results do not depend on the standard
  // library's distribution implementation.
  double NextUniform();

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> scores_;                   // penalised logits
  std::vector<std::pair<float, int32_t>> top_;  // candidate (score, then weight, id) pairs
};

}  // namespace dysco
