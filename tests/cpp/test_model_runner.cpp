// Tests of ModelRunner on the default model package (models/smollm2-135m-instruct, exported by
// `make model`, loaded once by the shared DefaultModelTest fixture): chunked prefill and
// token-by-token decode agree with a one-shot prefill, a batch equals its sequences run alone,
// probe-head probabilities are distributions, the speculative (last_layer) pass, key bias
// semantics, and input validation; and (on copies of the tiny package) every way a package's
// weights.safetensors can fail to load. The KV cache and outputs are poisoned with NaN first, so
// reading an unwritten slot or leaving an output element unwritten shows up.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <utility>

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <nlohmann/json.hpp>

#include "core/model/device_tensor.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"
#include "tests/cpp/model_fixture.h"
#include "tests/cpp/temp_dir.h"

namespace dysco {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class ModelRunnerTest : public DefaultModelTest {
 protected:
  void SetUp() override {
    DefaultModelTest::SetUp();
    if (ModelMissing()) return;
    KvPagePoolOptions o;
    o.page_size = 16;
    o.num_pages = 64;
    auto pool = KvPagePool::Create(runner_->config(), o);
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    pool_ = std::move(pool).value();
    pool_->kv_cache().fill_(kNaN);  // only slots written by the steps may ever be read
  }

  const ModelConfig& config() const { return runner_->config(); }

  std::vector<int32_t> RandomTokens(int n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int32_t> d(3, static_cast<int32_t>(config().vocab_size) - 1);
    std::vector<int32_t> v(n);
    for (auto& t : v) t = d(rng);
    return v;
  }

  PageList Pages(int64_t tokens) {
    PageList p(pool_.get());
    EXPECT_TRUE(p.EnsureCapacity(tokens).ok());
    return p;
  }

  // Runs `tokens[start, start + n)` of one sequence; returns its last logits.
  std::vector<float> RunOne(const std::vector<int32_t>& tokens, int64_t start, int64_t n,
                            const PageList& pages, const std::vector<float>& bias = {}) {
    ForwardBatch batch;
    batch.kv_pool = pool_.get();
    batch.sequences.push_back(
        {ConstSpan<int32_t>(tokens.data() + start, n), start, pages.ids(), ConstSpan<float>(bias)});
    ForwardOutput out;
    out.logits.assign(config().vocab_size, kNaN);
    Status s = runner_->Forward(batch, &out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(out.batch_size, 1);
    EXPECT_EQ(out.vocab_size, config().vocab_size);
    return out.logits;
  }

  static void ExpectClose(const std::vector<float>& a, const std::vector<float>& b, float tol,
                          const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    float worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_FALSE(std::isnan(a[i]) || std::isnan(b[i])) << what << ": NaN at " << i;
      const float d = std::fabs(a[i] - b[i]);
      if (d > worst) worst = d, at = i;
    }
    EXPECT_LE(worst, tol) << what << ": max |diff| " << worst << " at " << at << " (" << a[at]
                          << " vs " << b[at] << ")";
  }

  std::unique_ptr<KvPagePool> pool_;
};

TEST_F(ModelRunnerTest, OpsAreRegistered) { EXPECT_TRUE(CheckDyscoOpsRegistered().ok()); }

TEST_F(ModelRunnerTest, ChunkedAndTokenByTokenPrefillMatchOneShot) {
  // 35 tokens: chunks cross page boundaries (page size 16) at different offsets.
  const auto tokens = RandomTokens(35, 1);
  const PageList p1 = Pages(35), p2 = Pages(35), p3 = Pages(35);
  const auto one_shot = RunOne(tokens, 0, 35, p1);

  std::vector<float> chunked;
  for (int64_t start = 0; start < 35; start += 10) {
    chunked = RunOne(tokens, start, std::min<int64_t>(10, 35 - start), p2);
  }
  ExpectClose(one_shot, chunked, 1e-4f, "chunks of 10");

  std::vector<float> stepwise;
  for (int64_t i = 0; i < 35; ++i) stepwise = RunOne(tokens, i, 1, p3);
  ExpectClose(one_shot, stepwise, 1e-4f, "token by token");
}

TEST_F(ModelRunnerTest, BatchEqualsEachSequenceAlone) {
  const std::vector<std::vector<int32_t>> seqs = {RandomTokens(21, 2), RandomTokens(40, 3),
                                                  RandomTokens(6, 4)};
  // Alone: prefill all but the last token, then the last token as a decode step.
  std::vector<std::vector<float>> alone_prefill, alone_decode;
  for (const auto& s : seqs) {
    const PageList p = Pages(static_cast<int64_t>(s.size()));
    alone_prefill.push_back(RunOne(s, 0, static_cast<int64_t>(s.size()) - 1, p));
    alone_decode.push_back(RunOne(s, static_cast<int64_t>(s.size()) - 1, 1, p));
  }
  // Together: one step with the three prefills, then one with the three decode tokens.
  std::vector<PageList> pages;
  for (const auto& s : seqs) pages.push_back(Pages(static_cast<int64_t>(s.size())));
  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  for (size_t b = 0; b < seqs.size(); ++b) {
    batch.sequences.push_back(
        {ConstSpan<int32_t>(seqs[b].data(), seqs[b].size() - 1), 0, pages[b].ids(), {}});
  }
  ForwardOutput out;
  out.logits.assign(3 * config().vocab_size, kNaN);
  ASSERT_TRUE(runner_->Forward(batch, &out).ok());
  ASSERT_EQ(out.batch_size, 3);
  for (int b = 0; b < 3; ++b) {
    std::vector<float> row(out.logits_row(b), out.logits_row(b) + config().vocab_size);
    ExpectClose(alone_prefill[b], row, 1e-4f, "batched prefill of sequence " + std::to_string(b));
  }
  for (size_t b = 0; b < seqs.size(); ++b) {
    const int64_t last = static_cast<int64_t>(seqs[b].size()) - 1;
    batch.sequences[b] = {ConstSpan<int32_t>(seqs[b].data() + last, 1), last, pages[b].ids(), {}};
  }
  out.logits.assign(3 * config().vocab_size, kNaN);
  ASSERT_TRUE(runner_->Forward(batch, &out).ok());
  for (int b = 0; b < 3; ++b) {
    std::vector<float> row(out.logits_row(b), out.logits_row(b) + config().vocab_size);
    ExpectClose(alone_decode[b], row, 1e-4f, "batched decode of sequence " + std::to_string(b));
  }
}

TEST_F(ModelRunnerTest, MixedPrefillAndDecodeInOneStep) {
  const auto a = RandomTokens(20, 5), b = RandomTokens(12, 6);
  const PageList pa = Pages(20), pb = Pages(12), qa = Pages(20), qb = Pages(12);
  const auto a_alone = [&] {
    RunOne(a, 0, 19, pa);
    return RunOne(a, 19, 1, pa);
  }();
  const auto b_alone = RunOne(b, 0, 12, pb);
  RunOne(a, 0, 19, qa);
  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  batch.sequences.push_back({ConstSpan<int32_t>(a.data() + 19, 1), 19, qa.ids(), {}});  // decode
  batch.sequences.push_back({ConstSpan<int32_t>(b), 0, qb.ids(), {}});                  // prefill
  ForwardOutput out;
  ASSERT_TRUE(runner_->Forward(batch, &out).ok());
  const int64_t V = config().vocab_size;
  ExpectClose(a_alone, std::vector<float>(out.logits_row(0), out.logits_row(0) + V), 1e-4f,
              "decode");
  ExpectClose(b_alone, std::vector<float>(out.logits_row(1), out.logits_row(1) + V), 1e-4f,
              "prefill");
}

// ModelRunnerOptions::mixed_bias_split: on CUDA a step that mixes a biased (DySCO decode) row
// with prefill chunks runs as two forwards so that the chunks keep flash attention. Forced here on
// the CPU, it must give the one forward's outputs, in the batch's row order, and write the same
// K/V.
TEST_F(ModelRunnerTest, MixedBiasedStepRunAsTwoForwardsEqualsOneForward) {
  ModelRunnerOptions split_options;
  split_options.mixed_bias_split = ModelRunnerOptions::MixedBiasSplit::kAlways;
  auto split_runner = ModelRunner::Load(runner_->package_dir(), split_options);
  ASSERT_TRUE(split_runner.ok()) << split_runner.status().ToString();
  KvPagePoolOptions o;
  o.page_size = 16;
  o.num_pages = 64;
  auto split_pool = KvPagePool::Create(config(), o);
  ASSERT_TRUE(split_pool.ok()) << split_pool.status().ToString();
  (*split_pool)->kv_cache().fill_(kNaN);

  const auto a = RandomTokens(40, 7), b = RandomTokens(24, 8), c = RandomTokens(30, 9);
  std::vector<float> bias(40, 0.0f);  // row a's DySCO bias: boosts, a -inf key, zeros
  for (int i = 0; i < 40; i += 3) bias[i] = 1.5f;
  bias[5] = -std::numeric_limits<float>::infinity();
  const int64_t V = config().vocab_size;
  ForwardOutput outs[2];
  ForwardOutput nexts[2];
  int run = 0;
  for (auto [runner, pool] :
       {std::pair{runner_, pool_.get()}, std::pair{split_runner->get(), split_pool->get()}}) {
    PageList pa(pool), pb(pool), pc(pool);  // fresh pools: the same page ids in both
    ASSERT_TRUE(pa.EnsureCapacity(40).ok() && pb.EnsureCapacity(25).ok() &&
                pc.EnsureCapacity(30).ok());
    for (auto [tokens, pages, n] : {std::tuple{&a, &pa, 39}, std::tuple{&c, &pc, 29}}) {
      ForwardBatch prefill;
      prefill.kv_pool = pool;
      prefill.sequences.push_back({ConstSpan<int32_t>(tokens->data(), n), 0, pages->ids(), {}});
      ForwardOutput ignored;
      ASSERT_TRUE(runner->Forward(prefill, &ignored).ok());
    }
    ForwardBatch mixed;
    mixed.kv_pool = pool;
    mixed.probe_heads = {{0, 0}, {3, 8}, {1, 2}};
    mixed.sequences.push_back({ConstSpan<int32_t>(a.data() + 39, 1), 39, pa.ids(), bias});
    mixed.sequences.push_back({ConstSpan<int32_t>(b), 0, pb.ids(), {}});  // prefill chunk
    mixed.sequences.push_back({ConstSpan<int32_t>(c.data() + 29, 1), 29, pc.ids(), {}});
    ASSERT_TRUE(runner->Forward(mixed, &outs[run]).ok());
    // The chunk's K/V as written by the mixed step: one more token of b after it.
    const std::vector<int32_t> next = {b[5]};
    ForwardBatch decode;
    decode.kv_pool = pool;
    decode.sequences.push_back({ConstSpan<int32_t>(next), 24, pb.ids(), {}});
    ASSERT_TRUE(runner->Forward(decode, &nexts[run]).ok());
    ++run;
  }
  ASSERT_EQ(outs[1].batch_size, 3);
  ASSERT_EQ(outs[1].vocab_size, V);
  ASSERT_EQ(outs[1].num_probe_heads, 3);
  ASSERT_EQ(outs[1].probs_len, outs[0].probs_len);
  ExpectClose(outs[0].logits, outs[1].logits, 1e-4f, "logits");
  ExpectClose(outs[0].probs, outs[1].probs, 1e-5f, "probs");
  ExpectClose(nexts[0].logits, nexts[1].logits, 1e-4f, "the next step after the chunk");
  // Not a no-op: the biased row differs from the same row without its bias.
  ForwardOutput unbiased;
  {
    PageList pa(pool_.get());
    ASSERT_TRUE(pa.EnsureCapacity(40).ok());
    ForwardBatch one;
    one.kv_pool = pool_.get();
    one.sequences.push_back({ConstSpan<int32_t>(a), 0, pa.ids(), {}});
    ASSERT_TRUE(runner_->Forward(one, &unbiased).ok());
  }
  float diff = 0.0f;
  for (int64_t v = 0; v < V; ++v) {
    diff = std::max(diff, std::fabs(unbiased.logits[v] - outs[1].logits_row(0)[v]));
  }
  EXPECT_GT(diff, 1e-3f) << "the bias had no effect";
}

TEST_F(ModelRunnerTest, ProbeHeadsAreDistributionsAndSpeculativePassMatches) {
  const auto a = RandomTokens(30, 7), b = RandomTokens(9, 8);
  const PageList pa = Pages(30), pb = Pages(9);
  RunOne(a, 0, 29, pa);
  RunOne(b, 0, 8, pb);
  const std::vector<std::pair<int, int>> heads = {{0, 0}, {3, 8}, {5, 4}};

  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  batch.sequences.push_back({ConstSpan<int32_t>(a.data() + 29, 1), 29, pa.ids(), {}});
  batch.sequences.push_back({ConstSpan<int32_t>(b.data() + 8, 1), 8, pb.ids(), {}});
  batch.probe_heads = heads;
  batch.last_layer = 5;  // speculative pass: layers 0..5 only
  ForwardOutput spec;
  spec.probs.assign(2 * 3 * 30, kNaN);
  ASSERT_TRUE(runner_->Forward(batch, &spec).ok());
  EXPECT_EQ(spec.vocab_size, 0);
  EXPECT_TRUE(spec.logits.empty());
  ASSERT_EQ(spec.num_probe_heads, 3);
  ASSERT_GE(spec.probs_len, 30);
  const int64_t lens[2] = {30, 9};
  for (int s = 0; s < 2; ++s) {
    for (int h = 0; h < 3; ++h) {
      const float* row = spec.probs_row(s, h);
      double sum = 0;
      for (int64_t j = 0; j < spec.probs_len; ++j) {
        ASSERT_FALSE(std::isnan(row[j])) << s << "," << h << "," << j;
        ASSERT_GE(row[j], 0.0f);
        if (j >= lens[s]) {
          EXPECT_EQ(row[j], 0.0f) << "probability past the sequence length";
        }
        sum += row[j];
      }
      EXPECT_NEAR(sum, 1.0, 1e-5) << "sequence " << s << " head " << h;
    }
  }

  // The real pass of the same tokens rewrites the same K/V slots; its probes of layers <= 5 must
  // equal the speculative ones, and its logits must equal a plain decode.
  batch.last_layer = -1;
  ForwardOutput full;
  ASSERT_TRUE(runner_->Forward(batch, &full).ok());
  ASSERT_EQ(full.vocab_size, config().vocab_size);
  ASSERT_EQ(full.probs.size(), spec.probs.size());
  for (size_t i = 0; i < full.probs.size(); ++i)
    ASSERT_NEAR(full.probs[i], spec.probs[i], 1e-5) << i;
  const PageList qa = Pages(30);
  const auto plain = RunOne(a, 0, 30, qa);
  ExpectClose(plain,
              std::vector<float>(full.logits_row(0), full.logits_row(0) + config().vocab_size),
              1e-4f, "decode after a speculative pass");

  // Probes in any order (the runner groups them by layer for the model and returns them in the
  // batch's order): the same rows, permuted; a layer's probes split by another layer's included.
  ForwardBatch shuffled = batch;
  shuffled.probe_heads = {{5, 4}, {0, 0}, {5, 1}, {3, 8}, {0, 2}};
  const int perm[5] = {2, 0, -1, 1, -1};  // index of each in `heads`, -1 = not there
  ForwardOutput out;
  ASSERT_TRUE(runner_->Forward(shuffled, &out).ok());
  ASSERT_EQ(out.num_probe_heads, 5);
  ASSERT_EQ(out.probs_len, full.probs_len);
  for (int s = 0; s < 2; ++s) {
    for (int h = 0; h < 5; ++h) {
      const float* got = out.probs_row(s, h);
      double sum = 0;
      for (int64_t j = 0; j < out.probs_len; ++j) sum += got[j];
      EXPECT_NEAR(sum, 1.0, 1e-5) << "sequence " << s << " probe " << h;
      if (perm[h] < 0) continue;
      const float* want = full.probs_row(s, perm[h]);
      for (int64_t j = 0; j < out.probs_len; ++j) {
        ASSERT_NEAR(got[j], want[j], 1e-6) << s << "," << h << "," << j;
      }
    }
  }
  // Probe (5, 1) is not (5, 4): the permutation did not just copy one layer's rows around.
  double diff = 0;
  for (int64_t j = 0; j < out.probs_len; ++j) {
    diff += std::fabs(out.probs_row(0, 2)[j] - out.probs_row(0, 0)[j]);
  }
  EXPECT_GT(diff, 1e-4);

  // last_layer = L-1 runs every layer and returns logits.
  batch.last_layer = config().num_layers - 1;
  batch.probe_heads.clear();
  ForwardOutput last;
  ASSERT_TRUE(runner_->Forward(batch, &last).ok());
  EXPECT_EQ(last.num_probe_heads, 0);
  ASSERT_EQ(last.vocab_size, config().vocab_size);
  for (size_t i = 0; i < last.logits.size(); ++i) ASSERT_NEAR(last.logits[i], full.logits[i], 1e-4);
}

// ForwardBatch::probe_mean_heads: each row's mean over its listed probes, in the listed order
// (first head, plus each next, times 1/count, fp32), exactly the host loop DySCO used before the
// mean moved into the runner; rows sharing a list are reduced together, an empty list gives
// zeros, and the per-head probs are not returned.
TEST_F(ModelRunnerTest, ProbeMeanHeadsAreEachRowsMeanInItsOrder) {
  const auto a = RandomTokens(30, 17), b = RandomTokens(9, 18), c = RandomTokens(20, 19);
  const PageList pa = Pages(30), pb = Pages(9), pc = Pages(20);
  RunOne(a, 0, 29, pa);
  RunOne(b, 0, 8, pb);
  RunOne(c, 0, 19, pc);
  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  batch.sequences.push_back({ConstSpan<int32_t>(a.data() + 29, 1), 29, pa.ids(), {}});
  batch.sequences.push_back({ConstSpan<int32_t>(b.data() + 8, 1), 8, pb.ids(), {}});
  batch.sequences.push_back({ConstSpan<int32_t>(c.data() + 19, 1), 19, pc.ids(), {}});
  // Out of layer order, so the runner's grouping by layer permutes them.
  batch.probe_heads = {{5, 4}, {0, 0}, {3, 8}, {5, 1}};
  batch.last_layer = 5;
  ForwardOutput per_head;
  ASSERT_TRUE(runner_->Forward(batch, &per_head).ok());
  ASSERT_EQ(per_head.num_probe_heads, 4);

  const std::vector<std::vector<int>> lists = {{2, 0, 3}, {}, {2, 0, 3}};
  batch.probe_mean_heads = lists;
  ForwardOutput mean;
  mean.probe_mean.assign(3 * 40, kNaN);
  mean.probs.assign(10, kNaN);
  ASSERT_TRUE(runner_->Forward(batch, &mean).ok());
  EXPECT_TRUE(mean.probs.empty());
  ASSERT_EQ(mean.probs_len, per_head.probs_len);
  ASSERT_EQ(mean.probe_mean.size(), static_cast<size_t>(3 * mean.probs_len));
  for (int s = 0; s < 3; ++s) {
    for (int64_t j = 0; j < mean.probs_len; ++j) {
      float want = 0.0f;
      if (!lists[s].empty()) {
        want = per_head.probs_row(s, lists[s][0])[j];
        for (size_t h = 1; h < lists[s].size(); ++h) want += per_head.probs_row(s, lists[s][h])[j];
        want *= 1.0f / static_cast<float>(lists[s].size());
      }
      ASSERT_EQ(mean.probe_mean_row(s)[j], want) << s << "," << j;
    }
  }
  // A second list in the batch (rows reduced in two groups), its own order.
  batch.probe_mean_heads = {{1}, {3, 2}, {2, 0, 3}};
  ASSERT_TRUE(runner_->Forward(batch, &mean).ok());
  for (int64_t j = 0; j < mean.probs_len; ++j) {
    ASSERT_EQ(mean.probe_mean_row(0)[j], per_head.probs_row(0, 1)[j]) << j;
    const float want1 = (per_head.probs_row(1, 3)[j] + per_head.probs_row(1, 2)[j]) * 0.5f;
    ASSERT_EQ(mean.probe_mean_row(1)[j], want1) << j;
  }

  batch.probe_mean_heads = {{0}, {4}, {1}};
  Status st = runner_->Forward(batch, &mean);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("probe_mean_heads[1]"), std::string::npos) << st.message();
  batch.probe_mean_heads = {{0}};
  st = runner_->Forward(batch, &mean);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("probe_mean_heads"), std::string::npos) << st.message();
}

// ForwardBatch::logits_to_host = false: no logits, and each row's greedy token is what
// GreedyTokenId picks from the logits of the same step; through one forward and through the mixed
// biased step's two (RunSplitLocked). A speculative pass (no logits) returns no tokens either.
TEST_F(ModelRunnerTest, GreedyTokensArePickedWhereTheLogitsAre) {
  ModelRunnerOptions split_options;
  split_options.mixed_bias_split = ModelRunnerOptions::MixedBiasSplit::kAlways;
  auto split_runner = ModelRunner::Load(runner_->package_dir(), split_options);
  ASSERT_TRUE(split_runner.ok()) << split_runner.status().ToString();
  const auto a = RandomTokens(30, 21), b = RandomTokens(19, 22), c = RandomTokens(26, 23);
  std::vector<float> bias(30, 0.0f);
  for (int i = 0; i < 30; i += 4) bias[i] = 2.0f;
  for (ModelRunner* runner : {runner_, split_runner->get()}) {
    const std::string what = runner == runner_ ? "one forward" : "two forwards";
    const PageList pa = Pages(30), pb = Pages(19), pc = Pages(26);
    for (auto [tokens, pages, n] : {std::tuple{&a, &pa, 29}, std::tuple{&c, &pc, 25}}) {
      ForwardBatch prefill;
      prefill.kv_pool = pool_.get();
      prefill.sequences.push_back({ConstSpan<int32_t>(tokens->data(), n), 0, pages->ids(), {}});
      ForwardOutput ignored;
      ASSERT_TRUE(runner->Forward(prefill, &ignored).ok());
    }
    ForwardBatch step;
    step.kv_pool = pool_.get();
    step.sequences.push_back({ConstSpan<int32_t>(a.data() + 29, 1), 29, pa.ids(), bias});
    step.sequences.push_back({ConstSpan<int32_t>(b), 0, pb.ids(), {}});  // prefill chunk
    step.sequences.push_back({ConstSpan<int32_t>(c.data() + 25, 1), 25, pc.ids(), {}});
    ForwardOutput with_logits, picked;
    ASSERT_TRUE(runner->Forward(step, &with_logits).ok()) << what;
    step.logits_to_host = false;
    picked.logits.assign(3, kNaN);  // stale contents must go
    picked.greedy_tokens.assign(7, -1);
    ASSERT_TRUE(runner->Forward(step, &picked).ok()) << what;  // rewrites the same K/V
    EXPECT_TRUE(with_logits.greedy_tokens.empty()) << what;
    EXPECT_TRUE(picked.logits.empty()) << what;
    EXPECT_EQ(picked.vocab_size, config().vocab_size) << what;
    ASSERT_EQ(picked.greedy_tokens.size(), 3u) << what;
    std::set<int32_t> distinct;
    for (int64_t r = 0; r < 3; ++r) {
      EXPECT_EQ(picked.greedy_tokens[r],
                GreedyTokenId(with_logits.logits_row(r), with_logits.vocab_size))
          << what << ", row " << r;
      distinct.insert(picked.greedy_tokens[r]);
    }
    EXPECT_GT(distinct.size(), 1u) << what << ": every row picked the same token";
    ForwardBatch speculative = step;
    speculative.sequences.resize(1);
    speculative.last_layer = 1;
    ForwardOutput none;
    none.greedy_tokens.assign(2, 5);
    ASSERT_TRUE(runner->Forward(speculative, &none).ok()) << what;
    EXPECT_EQ(none.vocab_size, 0) << what;
    EXPECT_TRUE(none.greedy_tokens.empty()) << what;
  }
}

TEST_F(ModelRunnerTest, KeyBiasSemantics) {
  const auto t = RandomTokens(18, 9);
  const PageList p0 = Pages(18), p1 = Pages(18), p2 = Pages(18);
  const auto plain = RunOne(t, 0, 18, p0);
  // A bias that is the same for every key shifts all logits of a softmax row equally: no effect.
  const auto shifted = RunOne(t, 0, 18, p1, std::vector<float>(24, 3.0f));
  ExpectClose(plain, shifted, 1e-4f, "constant bias");
  // Masking keys changes the result.
  std::vector<float> mask(18, 0.0f);
  for (int j = 2; j < 12; ++j) mask[j] = -std::numeric_limits<float>::infinity();
  const auto masked = RunOne(t, 0, 18, p2, mask);
  float diff = 0;
  for (size_t i = 0; i < plain.size(); ++i) diff = std::max(diff, std::fabs(plain[i] - masked[i]));
  EXPECT_GT(diff, 1e-2f);
  for (float x : masked) ASSERT_FALSE(std::isnan(x));
}

// ForwardRow::key_bias_device (on a CPU runner: a CPU tensor) gives the same logits, bit for bit,
// as the same bias through key_bias, in a batch that mixes it with a host bias and no bias; and it
// is refused with the field's name when it is short, of another dtype or set with key_bias.
TEST_F(ModelRunnerTest, KeyBiasOnTheDeviceEqualsTheHostBias) {
  const std::vector<std::vector<int32_t>> seqs = {RandomTokens(20, 11), RandomTokens(33, 12),
                                                  RandomTokens(9, 13)};
  std::mt19937_64 rng(14);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<std::vector<float>> bias(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    bias[s].resize(seqs[s].size() + 7);  // longer than the row, as a selection's padded row
    for (float& b : bias[s]) b = u(rng);
    bias[s][1] = -std::numeric_limits<float>::infinity();
  }
  auto run = [&](bool on_device, ForwardOutput* out) {
    std::vector<PageList> pages;
    ForwardBatch prefill, decode;
    prefill.kv_pool = decode.kv_pool = pool_.get();
    for (const auto& t : seqs) {
      pages.push_back(Pages(static_cast<int64_t>(t.size())));
      const int64_t n = static_cast<int64_t>(t.size()) - 1;
      prefill.sequences.push_back({ConstSpan<int32_t>(t.data(), n), 0, pages.back().ids(), {}});
    }
    ForwardOutput unused;
    ASSERT_TRUE(runner_->Forward(prefill, &unused).ok());
    for (size_t s = 0; s < seqs.size(); ++s) {
      const int64_t n = static_cast<int64_t>(seqs[s].size()) - 1;
      ForwardRow row{ConstSpan<int32_t>(seqs[s].data() + n, 1), n, pages[s].ids(), {}};
      if (s == 0 || (s == 2 && !on_device)) row.key_bias = ConstSpan<float>(bias[s]);
      if (s == 2 && on_device) {
        row.key_bias_device = std::make_shared<const DeviceTensor>(
            DeviceTensor{torch::tensor(bias[s], torch::kFloat)});
      }
      decode.sequences.push_back(row);  // row 1: no bias
    }
    const Status st = runner_->Forward(decode, out);
    ASSERT_TRUE(st.ok()) << st.ToString();
  };
  ForwardOutput host, device;
  run(false, &host);
  run(true, &device);
  ASSERT_EQ(host.logits.size(), 3 * static_cast<size_t>(config().vocab_size));
  EXPECT_EQ(host.logits, device.logits);

  // Refusals.
  const std::vector<int32_t> t = RandomTokens(12, 15);
  const PageList p = Pages(12);
  ForwardBatch bad;
  bad.kv_pool = pool_.get();
  bad.sequences.push_back({ConstSpan<int32_t>(t.data(), 12), 0, p.ids(), {}});
  auto refused = [&](at::Tensor tensor, bool with_host_bias, const std::string& what) {
    const std::vector<float> host_bias(12, 0.0f);
    ForwardBatch b = bad;
    b.sequences[0].key_bias_device = std::make_shared<const DeviceTensor>(DeviceTensor{tensor});
    if (with_host_bias) b.sequences[0].key_bias = ConstSpan<float>(host_bias);
    ForwardOutput out;
    const Status st = runner_->Forward(b, &out);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << what;
    EXPECT_NE(st.message().find("sequences[0]"), std::string::npos) << what << ": " << st.message();
    EXPECT_NE(st.message().find("key_bias"), std::string::npos) << what << ": " << st.message();
  };
  refused(torch::zeros({11}), false, "short");
  refused(torch::zeros({12}, torch::kDouble), false, "double");
  refused(torch::zeros({1, 12}), false, "two dimensions");
  refused(torch::zeros({12}), true, "with key_bias too");
}

TEST_F(ModelRunnerTest, ValidationErrorsNameTheField) {
  const auto t = RandomTokens(20, 10);
  const PageList p = Pages(20);
  auto run = [&](ForwardBatch b) {
    b.kv_pool = b.kv_pool == nullptr ? pool_.get() : b.kv_pool;
    ForwardOutput out;
    return runner_->Forward(b, &out);
  };
  ForwardBatch ok;
  ok.sequences.push_back({ConstSpan<int32_t>(t), 0, p.ids(), {}});
  EXPECT_TRUE(run(ok).ok());

  EXPECT_EQ(run(ForwardBatch{}).code(), StatusCode::kInvalidArgument);

  ForwardBatch bad = ok;
  bad.sequences.push_back({ConstSpan<int32_t>(), 0, p.ids(), {}});
  Status s = run(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sequences[1].token_ids"), std::string::npos) << s.message();

  const std::vector<int32_t> oov = {1, static_cast<int32_t>(config().vocab_size)};
  bad = ok;
  bad.sequences[0].token_ids = ConstSpan<int32_t>(oov);
  s = run(bad);
  EXPECT_NE(s.message().find("sequences[0].token_ids"), std::string::npos) << s.message();

  bad = ok;
  bad.sequences[0].start_position = 100;  // 120 tokens do not fit in 2 pages
  s = run(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sequences[0].page_ids"), std::string::npos) << s.message();

  bad = ok;
  bad.sequences[0].start_position = config().max_position_embeddings;
  EXPECT_EQ(run(bad).code(), StatusCode::kOutOfRange);

  const std::vector<int32_t> bad_pages = {1, 100000};
  bad = ok;
  bad.sequences[0].page_ids = ConstSpan<int32_t>(bad_pages);
  s = run(bad);
  EXPECT_NE(s.message().find("sequences[0].page_ids[1]"), std::string::npos) << s.message();

  const std::vector<float> short_bias(10, 0.0f);
  bad = ok;
  bad.sequences[0].key_bias = ConstSpan<float>(short_bias);
  s = run(bad);
  EXPECT_NE(s.message().find("sequences[0].key_bias"), std::string::npos) << s.message();

  bad = ok;
  bad.last_layer = config().num_layers;
  EXPECT_NE(run(bad).message().find("last_layer"), std::string::npos);

  bad = ok;
  bad.probe_heads = {{0, config().num_attention_heads}};
  EXPECT_NE(run(bad).message().find("probe_heads[0]"), std::string::npos);
  bad.probe_heads = {{7, 0}};
  bad.last_layer = 5;  // layer 7 does not run
  EXPECT_NE(run(bad).message().find("probe_heads[0]"), std::string::npos);

  ModelConfig other = config();
  other.num_kv_heads += 1;
  KvPagePoolOptions o;
  o.num_pages = 4;
  auto wrong_pool = KvPagePool::Create(other, o);
  ASSERT_TRUE(wrong_pool.ok());
  bad = ok;
  bad.kv_pool = wrong_pool->get();
  EXPECT_EQ(run(bad).code(), StatusCode::kInvalidArgument);

  // A pool of the right shape on another device (torch's "meta": no memory, on any build) is
  // refused before the model sees it.
  KvPagePoolOptions meta;
  meta.num_pages = 4;
  meta.device = "meta";
  auto elsewhere = KvPagePool::Create(config(), meta);
  ASSERT_TRUE(elsewhere.ok()) << elsewhere.status().ToString();
  bad = ok;
  bad.kv_pool = elsewhere->get();
  s = run(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("kv_pool is on meta, the model on cpu"), std::string::npos)
      << s.message();
}

// On the CPU the graph path never runs, whatever the options say: every forward is eager.
TEST_F(ModelRunnerTest, CpuForwardsAreEagerWithCudaGraphsOn) {
  const auto t = RandomTokens(5, 21);
  const PageList p = Pages(6);
  const ModelRunner::CudaGraphStats before = runner_->cuda_graph_stats();
  RunOne(t, 0, 5, p);
  RunOne(t, 4, 1, p);  // a decode step: a graph candidate on CUDA
  const ModelRunner::CudaGraphStats after = runner_->cuda_graph_stats();
  EXPECT_EQ(after.eager_forwards - before.eager_forwards, 2);
  EXPECT_EQ(after.graphs, 0);
  EXPECT_EQ(after.replays, 0);
  EXPECT_EQ(after.pool_bytes, 0);
}

TEST(ModelRunnerLoadTest, MissingPackage) {
  auto r = ModelRunner::Load("/nonexistent/package");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
}

TEST(ModelRunnerLoadTest, CudaGraphMaxBatchMustBePositive) {
  ModelRunnerOptions o;
  o.cuda_graph_max_batch = 0;
  auto r = ModelRunner::Load("/nonexistent/package", o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cuda_graph_max_batch must be >= 1"), std::string::npos)
      << r.status().ToString();
}

// ---------------------------------------------------------------------------------------------
// ModelRunnerOptions::native_cpu_decode: CPU decode steps run from C++ give the TorchScript
// forward's logits bit for bit, on the tiny llama and the tiny qwen3 (q/k norms) packages: three
// sequences prefilled (through TorchScript on both), then decode steps of batch 3, every second
// one with a key bias holding -inf; a step with probe heads and a speculative pass fall back to
// TorchScript (not counted as native). The caches are poisoned first, as in ModelRunnerTest.
TEST(NativeCpuDecodeTest, EqualsTheTorchScriptForwardBitForBit) {
  std::vector<std::string> dirs;
  const PackageLocation llama = TinyPackage::Locate();
  if (!llama.present) {
    if (std::getenv("CI") != nullptr) FAIL() << llama.missing;
    GTEST_SKIP() << llama.missing;
  }
  dirs.push_back(llama.dir);
  if (const char* qwen3 = std::getenv("DYSCO_TINY_QWEN3_MODEL_DIR")) dirs.push_back(qwen3);
  // The default model too: its head size (64) is one the C++ step takes cos/sin from a table for
  // (the tiny packages' 16 is not).
  if (const PackageLocation def = DefaultPackage::Locate(); def.present) dirs.push_back(def.dir);
  for (const std::string& dir : dirs) {
    SCOPED_TRACE(dir);
    std::unique_ptr<ModelRunner> runners[2];
    std::unique_ptr<KvPagePool> pools[2];
    for (int native = 0; native < 2; ++native) {
      ModelRunnerOptions o;
      o.native_cpu_decode = native == 1;
      auto r = ModelRunner::Load(dir, o);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      KvPagePoolOptions po;
      po.page_size = 16;
      po.num_pages = 16;
      auto p = KvPagePool::Create((*r)->config(), po);
      ASSERT_TRUE(p.ok()) << p.status().ToString();
      (*p)->kv_cache().fill_(kNaN);
      runners[native] = std::move(r).value();
      pools[native] = std::move(p).value();
    }
    const ModelConfig& c = runners[0]->config();
    std::mt19937_64 rng(11);
    std::uniform_int_distribution<int32_t> id(3, static_cast<int32_t>(c.vocab_size) - 1);
    std::uniform_real_distribution<float> u(-2.0f, 1.0f);
    const std::vector<int64_t> prompt = {9, 20, 33};
    std::vector<std::vector<int32_t>> tokens(3);
    std::vector<std::vector<int32_t>> pages(3);
    for (size_t s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < prompt[s] + 8; ++i) tokens[s].push_back(id(rng));
      auto p0 = pools[0]->Allocate(4);
      auto p1 = pools[1]->Allocate(4);
      ASSERT_TRUE(p0.ok() && p1.ok());
      ASSERT_EQ(*p0, *p1);
      pages[s] = *p0;
    }
    auto step = [&](const ForwardBatch& batch, const std::string& what) {
      ForwardOutput outs[2];
      for (int native = 0; native < 2; ++native) {
        ForwardBatch b = batch;
        b.kv_pool = pools[native].get();
        const Status st = runners[native]->Forward(b, &outs[native]);
        ASSERT_TRUE(st.ok()) << what << ": " << st.ToString();
      }
      EXPECT_EQ(outs[1].logits, outs[0].logits) << what;
      EXPECT_EQ(outs[1].probs, outs[0].probs) << what;
      for (float v : outs[1].logits) ASSERT_TRUE(std::isfinite(v)) << what;
    };
    ForwardBatch prefill;
    for (size_t s = 0; s < 3; ++s) {
      prefill.sequences.push_back(
          {ConstSpan<int32_t>(tokens[s].data(), static_cast<size_t>(prompt[s])), 0, pages[s], {}});
    }
    step(prefill, "prefill");
    std::vector<std::vector<float>> bias(3);
    for (int t = 0; t < 6; ++t) {
      ForwardBatch decode;
      for (size_t s = 0; s < 3; ++s) {
        const int64_t pos = prompt[s] + t;
        ForwardRow row{
            ConstSpan<int32_t>(&tokens[s][static_cast<size_t>(pos)], 1), pos, pages[s], {}};
        if (t % 2 == 1) {
          bias[s].assign(static_cast<size_t>(pos + 1), 0.0f);
          for (float& b : bias[s]) b = u(rng);
          bias[s][static_cast<size_t>(pos) / 2] = -std::numeric_limits<float>::infinity();
          bias[s][static_cast<size_t>(pos)] = 0.0f;
          row.key_bias = bias[s];
        }
        decode.sequences.push_back(row);
      }
      if (t == 4) {
        // A speculative pass with probes first (TorchScript on both), then the step itself.
        ForwardBatch spec = decode;
        spec.last_layer = 0;
        spec.probe_heads = {{0, 1}};
        step(spec, "speculative pass");
      }
      if (t == 5) decode.probe_heads = {{c.num_layers - 1, 0}};  // TorchScript on both
      step(decode, "decode step " + std::to_string(t));
    }
    // Batch 1 (its cos/sin a view of the table's row, where there is a table).
    {
      const int64_t pos = prompt[1] + 6;
      ForwardBatch one;
      one.sequences.push_back(
          {ConstSpan<int32_t>(&tokens[1][static_cast<size_t>(pos)], 1), pos, pages[1], {}});
      step(one, "decode step of one sequence");
    }
    EXPECT_EQ(runners[1]->cuda_graph_stats().native_decode_forwards, 6);
    EXPECT_EQ(runners[0]->cuda_graph_stats().native_decode_forwards, 0);
  }
}

// Loading format-3 packages: weights.safetensors checked against config.json and bound to
// model.pt's parameters. Each case copies the tiny package (DYSCO_TINY_MODEL_DIR, ctest's
// export_tiny_model) and breaks one thing.

class WeightsLoadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const PackageLocation where = TinyPackage::Locate();
    if (!where.present) {
      if (std::getenv("CI") != nullptr) FAIL() << where.missing;
      GTEST_SKIP() << where.missing;
    }
    dir_ = MakeTempDir("weights_load_test_");
    ASSERT_FALSE(dir_.empty());
    for (const char* name : {"config.json", "model.pt", "tokenizer.json", "weights.safetensors"}) {
      WriteFile(dir_ + "/" + name, ReadFile(where.dir + "/" + name));
    }
  }
  void TearDown() override {
    if (!dir_.empty()) RemoveTree(dir_);
  }

  static std::string ReadFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }
  static void WriteFile(const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }
  std::string weights() const { return dir_ + "/weights.safetensors"; }

  // Rewrites the header of weights.safetensors (the data section is kept; the header is padded
  // again so that the data stays 64-byte aligned).
  // `append` is added after the data section (offsets: data_size() onwards).
  void EditHeader(const std::function<void(nlohmann::json&)>& edit,
                  const std::string& append = "") {
    const std::string file = ReadFile(weights());
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
    nlohmann::json header = nlohmann::json::parse(file.substr(8, n));
    edit(header);
    std::string text = header.dump();
    while ((8 + text.size()) % 64 != 0) text += ' ';
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
    WriteFile(weights(), out + text + file.substr(8 + n) + append);
  }
  // Bytes in the data section of weights.safetensors.
  uint64_t data_size() const {
    const std::string file = ReadFile(weights());
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
    return file.size() - 8 - n;
  }
  void EditConfig(const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json config = nlohmann::json::parse(ReadFile(dir_ + "/config.json"));
    edit(config);
    WriteFile(dir_ + "/config.json", config.dump());
  }

  void ExpectLoadError(StatusCode code, const std::vector<std::string>& needles) {
    auto r = ModelRunner::Load(dir_);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status().ToString();
    for (const std::string& needle : needles) {
      EXPECT_NE(r.status().message().find(needle), std::string::npos)
          << "expected \"" << needle << "\" in: " << r.status().message();
    }
  }

  std::string dir_;
};

TEST_F(WeightsLoadTest, BindsEveryParameterZeroCopyOnTheCpu) {
  auto r = ModelRunner::Load(dir_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // The copy's own test: its outputs equal those of the original package (ctest's tiny model).
  auto original = ModelRunner::Load(TinyPackage::Locate().dir);
  ASSERT_TRUE(original.ok()) << original.status().ToString();
  KvPagePoolOptions o;
  o.page_size = 16;
  o.num_pages = 4;
  const std::vector<int32_t> tokens = {5, 17, 300, 2, 99, 1000, 7};
  const std::vector<int32_t> pages = {0, 1};
  ForwardOutput a, b;
  for (auto [runner, out] : {std::pair{r->get(), &a}, std::pair{original->get(), &b}}) {
    auto pool = KvPagePool::Create(runner->config(), o);
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    ForwardBatch batch;
    batch.kv_pool = pool->get();
    batch.sequences.push_back(ForwardRow{tokens, 0, pages, {}});
    const Status s = runner->Forward(batch, out);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_EQ(a.logits, b.logits);
  for (float v : a.logits) ASSERT_TRUE(std::isfinite(v));
}

// The fused q/k/v weight binds over the file's bytes when its parts follow each other (the exported
// layout, the test above); a package whose parts lie apart binds a copy of each part, in order.
TEST_F(WeightsLoadTest, FusedWeightsWhosePartsLieApartAreCopied) {
  const std::string file = ReadFile(weights());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
  const nlohmann::json header = nlohmann::json::parse(file.substr(8, n));
  const std::string name = "model.layers.1.self_attn.k_proj.weight";
  const uint64_t begin = header[name]["data_offsets"][0];
  const uint64_t end = header[name]["data_offsets"][1];
  const std::string k_bytes = file.substr(8 + n + begin, end - begin);
  auto logits = [&](const std::string& dir) {
    auto runner = ModelRunner::Load(dir);
    EXPECT_TRUE(runner.ok()) << runner.status().ToString();
    if (!runner.ok()) return std::vector<float>{};
    KvPagePoolOptions o;
    o.page_size = 16;
    o.num_pages = 4;
    auto pool = KvPagePool::Create((*runner)->config(), o);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    const std::vector<int32_t> tokens = {5, 17, 300, 2, 99};
    const std::vector<int32_t> pages = {0};
    ForwardBatch batch;
    batch.kv_pool = pool->get();
    batch.sequences.push_back(ForwardRow{tokens, 0, pages, {}});
    ForwardOutput out;
    const Status s = (*runner)->Forward(batch, &out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out.logits;
  };
  const std::vector<float> expected = logits(TinyPackage::Locate().dir);
  ASSERT_FALSE(expected.empty());
  // k_proj's entry pointing past the data section (64-byte aligned) at `bytes`.
  auto move_k_proj = [&](const std::string& bytes) {
    WriteFile(weights(), file);
    const uint64_t moved = (data_size() + 63) / 64 * 64;
    EditHeader(
        [&](nlohmann::json& h) {
          h[name]["data_offsets"] = {moved, moved + bytes.size()};
        },
        std::string(moved - data_size(), '\0') + bytes);
  };
  move_k_proj(k_bytes);
  EXPECT_EQ(logits(dir_), expected);
  // The moved bytes are the ones bound: other values there change the logits.
  move_k_proj(std::string(k_bytes.size(), '\0'));
  const std::vector<float> zeroed = logits(dir_);
  ASSERT_EQ(zeroed.size(), expected.size());
  EXPECT_NE(zeroed, expected);
}

// num_threads = 0 runs torch's intra-op regions on every CPU the process may use (Debian's libtorch
// would otherwise keep one thread).
TEST_F(WeightsLoadTest, DefaultThreadsAreTheAvailableCpus) {
  const int previous = at::get_num_threads();
  at::set_num_threads(1);
  auto r = ModelRunner::Load(dir_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GE(AvailableCpus(), 1);
  EXPECT_LE(AvailableCpus(), static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_EQ(at::get_num_threads(), AvailableCpus());
  EXPECT_EQ((*r)->cpu_threads(), AvailableCpus());
  ModelRunnerOptions three;
  three.num_threads = 3;
  auto r3 = ModelRunner::Load(dir_, three);
  ASSERT_TRUE(r3.ok()) << r3.status().ToString();
  EXPECT_EQ((*r3)->cpu_threads(), 3);
  EXPECT_EQ(at::get_num_threads(), 3);
  at::set_num_threads(previous);
}

TEST_F(WeightsLoadTest, FormatVersion1IsRefused) {
  EditConfig([](nlohmann::json& c) { c["format_version"] = 1; });
  ExpectLoadError(StatusCode::kFailedPrecondition, {"format_version 1", "re-export"});
}

TEST_F(WeightsLoadTest, MissingWeightsFile) {
  ASSERT_EQ(std::remove(weights().c_str()), 0);
  ExpectLoadError(StatusCode::kNotFound, {"weights.safetensors: cannot open"});
}

TEST_F(WeightsLoadTest, MissingTensor) {
  EditHeader([](nlohmann::json& h) { h.erase("model.layers.2.mlp.up_proj.weight"); });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"weights.safetensors: missing tensor 'model.layers.2.mlp.up_proj.weight'"});
}

TEST_F(WeightsLoadTest, ExtraTensor) {
  EditHeader([](nlohmann::json& h) {
    h["model.layers.9.mlp.up_proj.weight"] = {
        {"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {0, 0}}};
  });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"tensor 'model.layers.9.mlp.up_proj.weight' is not a weight of this model"});
}

TEST_F(WeightsLoadTest, WrongShape) {
  EditHeader([](nlohmann::json& h) {
    auto& e = h["model.layers.1.self_attn.k_proj.weight"];
    e["shape"] = {e["shape"][1], e["shape"][0]};  // same bytes, transposed shape
  });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"tensor 'model.layers.1.self_attn.k_proj.weight' has shape [64, 32], "
                   "config.json implies [32, 64]"});
}

TEST_F(WeightsLoadTest, ConfigContradictsTheWeights) {
  EditConfig([](nlohmann::json& c) { c["intermediate_size"] = 96; });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], "
                   "config.json implies [96, 64]"});
}

TEST_F(WeightsLoadTest, WrongDtype) {
  EditHeader([](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "I32"; });
  ExpectLoadError(
      StatusCode::kInvalidArgument,
      {"tensor 'model.norm.weight' has dtype I32, config.json dtype float32 needs F32"});
  EditHeader([](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "F32"; });
  EditConfig([](nlohmann::json& c) { c["dtype"] = "bfloat16"; });
  ExpectLoadError(StatusCode::kInvalidArgument, {"has dtype F32, config.json dtype bfloat16"});
}

TEST_F(WeightsLoadTest, TruncatedFile) {
  const std::string file = ReadFile(weights());
  WriteFile(weights(), file.substr(0, file.size() - 1000));
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"weights.safetensors: tensor '", "truncated file"});
  WriteFile(weights(), file.substr(0, 6));
  ExpectLoadError(StatusCode::kInvalidArgument, {"no header length"});
}

TEST_F(WeightsLoadTest, OffsetsOutOfRangeOrOverlapping) {
  EditHeader([](nlohmann::json& h) {
    h["model.norm.weight"]["data_offsets"] = {1ull << 40, (1ull << 40) + 256};
  });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"tensor 'model.norm.weight': data_offsets end at"});
  EditHeader([](nlohmann::json& h) {
    h["model.norm.weight"]["data_offsets"] = h["model.embed_tokens.weight"]["data_offsets"];
    h["model.norm.weight"]["data_offsets"][1] =
        h["model.norm.weight"]["data_offsets"][0].get<uint64_t>() + 256;
  });
  ExpectLoadError(StatusCode::kInvalidArgument, {"overlap"});
}

// Padding entries (U8 "__padding__.<k>") are skipped wherever they start; a bound tensor must start
// at a multiple of 64 bytes.
TEST_F(WeightsLoadTest, PaddingEntriesAreSkippedAndTensorsMustBeAligned) {
  const uint64_t end = data_size();
  EditHeader(
      [end](nlohmann::json& h) {
        h["__padding__.99"] = {{"dtype", "U8"}, {"shape", {4}}, {"data_offsets", {end, end + 4}}};
      },
      std::string(4, '\0'));
  auto r = ModelRunner::Load(dir_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // model.norm.weight (64 floats) moved to end + 4: in the file, but not 64-byte aligned.
  EditHeader(
      [end](nlohmann::json& h) {
        h["model.norm.weight"]["data_offsets"] = {end + 4, end + 4 + 256};
      },
      std::string(256, '\0'));
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"tensor 'model.norm.weight' starts at file offset", "not a multiple of 64"});
}

TEST_F(WeightsLoadTest, WeightsFileNameMustStayInThePackage) {
  EditConfig([](nlohmann::json& c) { c["weights"] = "../weights.safetensors"; });
  ExpectLoadError(StatusCode::kInvalidArgument,
                  {"config.json: weights must be a file name inside the package"});
}

}  // namespace
}  // namespace dysco
