// Tests of the sampler: greedy, top-k/top-p support (against a plain reference of HF's rules),
// seeds, repetition penalty math, sampled frequencies, and parameter validation.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "core/engine/sampler.h"
#include "core/model/model_runner.h"

namespace dysco {
namespace {

std::vector<float> RandomLogits(int vocab, uint64_t seed, float scale = 3.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(vocab);
  for (float& x : v) x = dist(rng);
  return v;
}

int Argmax(const std::vector<float>& v) {
  return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
}

// Reference top-k set (HF: keep scores >= the k-th largest).
std::set<int> TopKSet(const std::vector<float>& logits, int k) {
  std::vector<float> sorted = logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  const float threshold = sorted[k - 1];
  std::set<int> out;
  for (int i = 0; i < static_cast<int>(logits.size()); ++i) {
    if (logits[i] >= threshold) out.insert(i);
  }
  return out;
}

// Reference top-p set over the given candidates (HF: sort ascending, drop while cumsum <= 1 - p).
std::set<int> TopPSet(const std::vector<float>& logits, double temperature, double p,
                      const std::set<int>& candidates) {
  std::vector<int> ids(candidates.begin(), candidates.end());
  double mx = -INFINITY;
  for (int i : ids) mx = std::max<double>(mx, logits[i]);
  std::vector<double> w;
  double total = 0;
  for (int i : ids) {
    w.push_back(std::exp((logits[i] - mx) / temperature));
    total += w.back();
  }
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return w[a] < w[b]; });
  std::set<int> out;
  double cum = 0;
  for (size_t r = 0; r < order.size(); ++r) {
    cum += w[order[r]] / total;
    if (cum > 1.0 - p || r + 1 == order.size()) out.insert(ids[order[r]]);
  }
  return out;
}

std::set<int> AllIds(int vocab) {
  std::set<int> s;
  for (int i = 0; i < vocab; ++i) s.insert(i);
  return s;
}

TEST(SamplingParamsTest, ValidateNamesTheField) {
  SamplingParams p;
  EXPECT_TRUE(p.Validate().ok());
  p.top_p = 1.5;
  Status s = p.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "sampling.top_p must be in (0, 1], got 1.5");
  p.top_p = 0.0;
  EXPECT_NE(p.Validate().message().find("sampling.top_p"), std::string::npos);
  p = SamplingParams();
  p.temperature = -0.5;
  EXPECT_NE(p.Validate().message().find("sampling.temperature"), std::string::npos);
  p.temperature = NAN;
  EXPECT_NE(p.Validate().message().find("sampling.temperature"), std::string::npos);
  p = SamplingParams();
  p.top_k = -1;
  EXPECT_NE(p.Validate().message().find("sampling.top_k"), std::string::npos);
  p = SamplingParams();
  p.repetition_penalty = 0.0;
  EXPECT_NE(p.Validate().message().find("sampling.repetition_penalty"), std::string::npos);
  p.repetition_penalty = INFINITY;
  EXPECT_FALSE(p.Validate().ok());
}

TEST(SamplerTest, GreedyIsArgmaxWithLowestIdOnTies) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto logits = RandomLogits(1000, seed);
    Sampler s(SamplingParams{});
    EXPECT_EQ(s.Sample(logits.data(), 1000, {}), Argmax(logits));
  }
  std::vector<float> ties = {0.0f, 5.0f, -1.0f, 5.0f, 5.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(ties.data(), 5, {}), 1);
}

// The greedy rule ATen's argmax follows on every device (core/model/model_runner.h): ties go to the
// lowest id, NaN counts as the largest value (the first NaN wins), -inf is a value like any other.
TEST(SamplerTest, GreedyTokenIdIsAtensArgmaxRule) {
  const float nan = std::nanf(""), inf = INFINITY;
  EXPECT_EQ(GreedyTokenId(std::vector<float>{1, 3, 2, 3}.data(), 4), 1);
  EXPECT_EQ(GreedyTokenId(std::vector<float>{1, nan, inf, nan}.data(), 4), 1);
  EXPECT_EQ(GreedyTokenId(std::vector<float>{nan, 2, nan}.data(), 3), 0);
  EXPECT_EQ(GreedyTokenId(std::vector<float>{2, inf, 1, inf}.data(), 4), 1);
  EXPECT_EQ(GreedyTokenId(std::vector<float>{-inf, -inf, -inf}.data(), 3), 0);
  EXPECT_EQ(GreedyTokenId(std::vector<float>{-inf, -5, -inf}.data(), 3), 1);
  // The Sampler's greedy draw is that rule too.
  std::vector<float> with_nan = {0.5f, 7.0f, nan, 9.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(with_nan.data(), 4, {}), 2);
  SamplingParams penalised;
  penalised.repetition_penalty = 1.5;
  EXPECT_FALSE(penalised.plain_greedy());
  EXPECT_TRUE(SamplingParams{}.plain_greedy());
}

TEST(SamplerTest, TopK1EqualsGreedy) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto logits = RandomLogits(5000, seed);
    SamplingParams p;
    p.temperature = 1.5;
    p.top_k = 1;
    p.seed = seed;
    Sampler s(p);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(s.Sample(logits.data(), 5000, {}), Argmax(logits));
  }
}

TEST(SamplerTest, SameSeedSameTokens) {
  auto logits = RandomLogits(2000, 7, 1.0f);
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.95;
  p.seed = 1234;
  Sampler a(p), b(p);
  std::vector<int> ta, tb;
  for (int i = 0; i < 300; ++i) {
    ta.push_back(a.Sample(logits.data(), 2000, {}));
    tb.push_back(b.Sample(logits.data(), 2000, {}));
  }
  EXPECT_EQ(ta, tb);
  p.seed = 1235;
  Sampler c(p);
  std::vector<int> tc;
  for (int i = 0; i < 300; ++i) tc.push_back(c.Sample(logits.data(), 2000, {}));
  EXPECT_NE(ta, tc);
  EXPECT_GT(std::set<int>(ta.begin(), ta.end()).size(), 10u) << "sampling should not be degenerate";
}

TEST(SamplerTest, TopKRestrictsSupport) {
  const int vocab = 3000;
  auto logits = RandomLogits(vocab, 11, 0.5f);  // flat-ish, so many tokens are likely
  SamplingParams p;
  p.temperature = 1.0;
  p.top_k = 20;
  p.seed = 5;
  const std::set<int> allowed = TopKSet(logits, 20);
  ASSERT_EQ(allowed.size(), 20u);
  Sampler s(p);
  std::set<int> seen;
  for (int i = 0; i < 2000; ++i) {
    const int t = s.Sample(logits.data(), vocab, {});
    ASSERT_TRUE(allowed.count(t)) << "token " << t << " outside the top-k set";
    seen.insert(t);
  }
  EXPECT_EQ(seen.size(), 20u) << "every top-k token should appear in 2000 draws";
}

TEST(SamplerTest, TopPRestrictsSupport) {
  const int vocab = 4000;
  for (double top_p : {0.5, 0.9}) {
    auto logits = RandomLogits(vocab, 21, 1.5f);
    SamplingParams p;
    p.temperature = 0.8;
    p.top_p = top_p;
    p.seed = 9;
    const std::set<int> allowed = TopPSet(logits, 0.8, top_p, AllIds(vocab));
    ASSERT_GT(allowed.size(), 3u);
    ASSERT_LT(allowed.size(), static_cast<size_t>(vocab / 2));
    Sampler s(p);
    std::set<int> seen;
    for (int i = 0; i < 2000; ++i) {
      const int t = s.Sample(logits.data(), vocab, {});
      ASSERT_TRUE(allowed.count(t))
          << "token " << t << " outside the top-p set (p=" << top_p << ")";
      seen.insert(t);
    }
    EXPECT_GT(seen.size(), allowed.size() / 3);
  }
}

TEST(SamplerTest, TopPLargeNucleus) {
  // Nearly uniform logits: the nucleus holds most of the vocabulary, most of the candidates.
  const int vocab = 2000;
  auto logits = RandomLogits(vocab, 3, 0.05f);
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.99;
  const std::set<int> allowed = TopPSet(logits, 1.0, 0.99, AllIds(vocab));
  ASSERT_GT(allowed.size(), 1900u);
  Sampler s(p);
  for (int i = 0; i < 2000; ++i) ASSERT_TRUE(allowed.count(s.Sample(logits.data(), vocab, {})));
}

TEST(SamplerTest, TopKThenTopP) {
  const int vocab = 1000;
  auto logits = RandomLogits(vocab, 31, 1.0f);
  SamplingParams p;
  p.temperature = 1.0;
  p.top_k = 50;
  p.top_p = 0.6;
  const std::set<int> allowed = TopPSet(logits, 1.0, 0.6, TopKSet(logits, 50));
  ASSERT_LT(allowed.size(), 50u);
  Sampler s(p);
  for (int i = 0; i < 2000; ++i) ASSERT_TRUE(allowed.count(s.Sample(logits.data(), vocab, {})));
}

TEST(SamplerTest, FrequenciesFollowSoftmax) {
  std::vector<float> logits = {1.0f, 2.0f, 0.0f, -1.0f};
  SamplingParams p;
  p.temperature = 0.7;
  p.seed = 99;
  std::vector<double> expected(4);
  double z = 0;
  for (int i = 0; i < 4; ++i) z += expected[i] = std::exp(logits[i] / 0.7);
  Sampler s(p);
  std::vector<int> counts(4);
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[s.Sample(logits.data(), 4, {})]++;
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(counts[i] / double(n), expected[i] / z, 0.015) << i;
}

TEST(SamplerTest, RepetitionPenaltyMath) {
  // HF: positive logits of context tokens are divided by r, negative ones multiplied.
  SamplingParams p;
  p.repetition_penalty = 2.0;
  {
    std::vector<float> logits = {3.0f, 1.6f, 0.0f};
    Sampler s(p);
    EXPECT_EQ(s.Sample(logits.data(), 3, {}), 0);         // no context: no penalty
    EXPECT_EQ(s.Sample(logits.data(), 3, {0}), 1);        // 3.0 / 2 = 1.5 < 1.6
    EXPECT_EQ(s.Sample(logits.data(), 3, {0, 0, 0}), 1);  // applied once however often it occurs
    std::vector<float> close = {3.0f, 1.4f, 0.0f};
    EXPECT_EQ(s.Sample(close.data(), 3, {0, 0}), 0);  // 1.5 > 1.4
  }
  {
    std::vector<float> logits = {-1.0f, -1.5f, -3.0f};
    Sampler s(p);
    EXPECT_EQ(s.Sample(logits.data(), 3, {0}), 1);  // -1 * 2 = -2 < -1.5
    EXPECT_EQ(s.Sample(logits.data(), 3, {2}), 0);
  }
  {
    // Sampled frequencies follow the penalised softmax.
    std::vector<float> logits = {2.0f, 1.0f, -1.0f};
    SamplingParams q;
    q.temperature = 1.0;
    q.repetition_penalty = 1.5;
    q.seed = 3;
    const std::vector<int32_t> context = {0, 2, 2};
    const double pen[3] = {2.0 / 1.5, 1.0, -1.0 * 1.5};
    double z = 0;
    for (double x : pen) z += std::exp(x);
    Sampler s(q);
    std::vector<int> counts(3);
    const int n = 20000;
    for (int i = 0; i < n; ++i) counts[s.Sample(logits.data(), 3, context)]++;
    for (int i = 0; i < 3; ++i)
      EXPECT_NEAR(counts[i] / double(n), std::exp(pen[i]) / z, 0.015) << i;
  }
}

TEST(SamplerTest, MinusInfinityIsNeverSampled) {
  std::vector<float> logits = {-INFINITY, 0.0f, -INFINITY, 0.5f};
  SamplingParams p;
  p.temperature = 2.0;
  Sampler s(p);
  for (int i = 0; i < 500; ++i) {
    const int t = s.Sample(logits.data(), 4, {});
    ASSERT_TRUE(t == 1 || t == 3);
  }
}

}  // namespace
}  // namespace dysco
