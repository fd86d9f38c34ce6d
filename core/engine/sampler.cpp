#include "core/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/base/format.h"
#include "core/model/model_runner.h"

namespace dysco {

namespace {

// Higher score first; equal scores by lower id, so every ordering here is deterministic.
bool Before(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0) {
    return InvalidArgumentError("sampling.temperature must be >= 0, got " +
                                FormatNumber(temperature));
  }
  if (top_k < 0) {
    return InvalidArgumentError("sampling.top_k must be >= 0 (0 = off), got " +
                                std::to_string(top_k));
  }
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    return InvalidArgumentError("sampling.top_p must be in (0, 1], got " + FormatNumber(top_p));
  }
  if (!std::isfinite(repetition_penalty) || repetition_penalty <= 0.0) {
    return InvalidArgumentError("sampling.repetition_penalty must be > 0 (1 = off), got " +
                                FormatNumber(repetition_penalty));
  }
  return OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

double Sampler::NextUniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::Sample(const float* logits, int vocab, const std::vector<int32_t>& context) {
  const float* scores = logits;
  if (params_.repetition_penalty != 1.0) {
    scores_.assign(logits, logits + vocab);
    const float r = static_cast<float>(params_.repetition_penalty);
    // HF gathers the original logit of each context token and scatters the penalised value back, so
    // a token that occurs many times is penalised once: mark and skip repeats.
    for (int32_t t : context) {
      if (t < 0 || t >= vocab) continue;
      const float original = logits[t];
      if (scores_[t] != original) continue;  // already penalised (or r makes no difference)
      scores_[t] = original < 0 ? original * r : original / r;
    }
    scores = scores_.data();
  }

  // The runner's rule (core/model/model_runner.h), so that a token picked on the device equals
  // the one picked here.
  if (params_.greedy()) return GreedyTokenId(scores, vocab);

  top_.resize(static_cast<size_t>(vocab));
  for (int32_t i = 0; i < vocab; ++i) top_[i] = {scores[i], i};
  size_t n = top_.size();
  if (params_.top_k > 0 && params_.top_k < vocab) {
    const size_t k = static_cast<size_t>(params_.top_k);
    std::nth_element(top_.begin(), top_.begin() + (k - 1), top_.end(), Before);
    // HF keeps every token scoring at least the k-th score (ties at the boundary included).
    const float threshold = top_[k - 1].first;
    n = static_cast<size_t>(
        std::partition(top_.begin(), top_.end(),
                       [threshold](const auto& p) { return p.first >= threshold; }) -
        top_.begin());
  }

  float max_score = -INFINITY;
  for (size_t i = 0; i < n; ++i) max_score = std::max(max_score, top_[i].first);
  if (!std::isfinite(max_score)) return top_[0].second;  // nothing finite to sample from
  // Replace each candidate's score by its unnormalised probability exp((s - max) / T): monotonic,
  // so the ordering (and top-p below) is unchanged, and each exp is computed once.
  const double inv_t = 1.0 / params_.temperature;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    top_[i].first =
        static_cast<float>(std::exp((static_cast<double>(top_[i].first) - max_score) * inv_t));
    total += top_[i].first;
  }

  if (params_.top_p < 1.0) {
    const double limit = params_.top_p * total;
    // HF keeps a token when the mass of the tokens ranked above it is < top_p: the kept count K is
    // the smallest d whose top-d mass reaches the limit. Bisect for it with nth_element (expected
    // O(n)) instead of sorting the whole candidate list; the sampled set needs no order. Invariant:
    // [0, lo) are the top-lo tokens, their mass `before` is < limit, and K lies in (lo, hi].
    size_t lo = 0, hi = n;
    double before = 0.0;
    while (hi - lo > 64) {
      const size_t mid = lo + (hi - lo) / 2;
      std::nth_element(top_.begin() + lo, top_.begin() + mid, top_.begin() + hi, Before);
      double mass = 0.0;
      for (size_t i = lo; i < mid; ++i) mass += top_[i].first;
      if (before + mass >= limit) {
        hi = mid;
      } else {
        before += mass;
        lo = mid;
      }
    }
    std::sort(top_.begin() + lo, top_.begin() + hi, Before);
    size_t kept = lo;
    for (; kept < hi; ++kept) {
      if (kept > 0 && before >= limit) break;
      before += top_[kept].first;
    }
    n = kept;
    total = before;
  }

  double u = NextUniform() * total;
  for (size_t i = 0; i < n; ++i) {
    u -= top_[i].first;
    if (u < 0.0) return top_[i].second;
  }
  // Rounding left u >= 0 after the last token: take the last one with non-zero weight.
  for (size_t i = n; i-- > 0;) {
    if (top_[i].first > 0.0f) return top_[i].second;
  }
  return top_[0].second;
}

}  // namespace dysco
