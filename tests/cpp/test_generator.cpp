// Tests of generation: the stop-string matcher on its own, then end-to-end generation with the
// default model package (chat answer, stop strings split across tokens, length limits, chunked
// prefill, seeded sampling, pages freed on every path) and, when tests/data/smollm2_golden.json
// exists, greedy continuations equal to Hugging Face transformers' for the first 32 tokens.
#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/engine/generator.h"
#include "tests/cpp/model_fixture.h"

namespace dysco {
namespace {

const std::string kGolden = std::string(DYSCO_SOURCE_DIR) + "/tests/data/smollm2_golden.json";
const char kFrance[] = "What is the capital of France? Answer in one sentence.";

// Pushes `pieces` one by one; returns everything emitted (Flush included when no match).
std::string Stream(StopStringMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += m.Push(p);
  if (!m.matched()) out += m.Flush();
  return out;
}

TEST(StopStringMatcherTest, NoStopsPassesEverythingThrough) {
  StopStringMatcher m({});
  EXPECT_EQ(m.Push("abc"), "abc");
  EXPECT_EQ(m.Push(""), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcherTest, HoldsBackPossiblePrefixAndReleasesIt) {
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(m.Push("hello ST"), "hello ");  // "ST" could start "STOP"
  EXPECT_EQ(m.Push("ART"), "START");        // it did not
  EXPECT_EQ(m.Push("xS"), "x");
  EXPECT_FALSE(m.matched());
  EXPECT_EQ(m.Flush(), "S");
}

TEST(StopStringMatcherTest, MatchSplitAcrossPieces) {
  StopStringMatcher m({"<END>"});
  EXPECT_EQ(Stream(m, {"The answer", " is 4<", "E", "ND> and more", "ignored"}), "The answer is 4");
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(m.Push("later"), "");
}

TEST(StopStringMatcherTest, EarliestOfSeveralStops) {
  StopStringMatcher m({"world", "lo w"});
  EXPECT_EQ(Stream(m, {"hel", "lo wor", "ld"}), "hel");
  EXPECT_TRUE(m.matched());
}

TEST(StopStringMatcherTest, OverlappingPrefixes) {
  StopStringMatcher m({"aab"});
  EXPECT_EQ(Stream(m, {"a", "a", "a", "b", "c"}), "a");
  StopStringMatcher n({"aab"});
  EXPECT_EQ(Stream(n, {"aaa", "c"}), "aaac");
  EXPECT_FALSE(n.matched());
}

TEST(StopStringMatcherTest, StopAtVeryStart) {
  StopStringMatcher m({"\n\n"});
  EXPECT_EQ(Stream(m, {"\n", "\nrest"}), "");
  EXPECT_TRUE(m.matched());
}

class GeneratorTest : public DefaultModelTest {
 protected:
  void SetUp() override {
    DefaultModelTest::SetUp();
    if (ModelMissing()) return;
    pool_ = MakePool(64);
  }

  StatusOr<GenerateResult> Generate(const GenerateRequest& r, GeneratorOptions o = {},
                                    std::string* streamed = nullptr) {
    Generator g(runner_, pool_.get(), factory_, o);
    return g.Generate(r, [streamed](const TokenDelta& d) {
      if (streamed != nullptr) *streamed += d.text;
    });
  }

  static GenerateRequest France(int64_t max_new_tokens) {
    GenerateRequest r;
    r.prompt = kFrance;
    r.chat = true;
    r.max_new_tokens = max_new_tokens;
    return r;
  }

  std::unique_ptr<KvPagePool> pool_;
};

TEST_F(GeneratorTest, GreedyChatAnswerNamesParis) {
  std::string streamed;
  auto r = Generate(France(48), {}, &streamed);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_NE(r->text.find("Paris"), std::string::npos) << r->text;
  EXPECT_EQ(r->finish_reason, FinishReason::kStop) << r->text;
  EXPECT_EQ(r->token_ids.back(), 2);  // <|im_end|>, not part of the text
  EXPECT_EQ(r->text.find("<|im_end|>"), std::string::npos);
  EXPECT_EQ(streamed, r->text);
  EXPECT_EQ(r->generated_tokens, static_cast<int64_t>(r->token_ids.size()));
  EXPECT_GT(r->prompt_tokens, 30);
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
  EXPECT_DOUBLE_EQ(pool_->usage_ratio(), 0.0);
}

TEST_F(GeneratorTest, MessagesEqualChatPrompt) {
  GenerateRequest a = France(6);
  GenerateRequest b;
  b.messages = {{"user", kFrance}};
  b.max_new_tokens = 6;
  auto ra = Generate(a), rb = Generate(b);
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_EQ(ra->token_ids, rb->token_ids);
  EXPECT_EQ(ra->prompt_tokens, rb->prompt_tokens);
}

TEST_F(GeneratorTest, MaxNewTokensGivesLength) {
  auto r = Generate(France(5));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->finish_reason, FinishReason::kLength);
  EXPECT_EQ(r->generated_tokens, 5);
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

TEST_F(GeneratorTest, StopStringTruncatesAcrossTokens) {
  auto full = Generate(France(48));
  ASSERT_TRUE(full.ok());
  const std::string& text = full->text;
  const size_t paris = text.find("Paris");
  ASSERT_NE(paris, std::string::npos) << text;
  // A stop string spanning the end of one token and the start of the next: " Pa" + "ris".
  for (const std::string& stop :
       {std::string("Paris"), std::string("s Pa"), text.substr(paris - 3, 6)}) {
    GenerateRequest r = France(48);
    r.stop_strings = {stop};
    std::string streamed;
    auto s = Generate(r, {}, &streamed);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_EQ(s->finish_reason, FinishReason::kStopString) << stop;
    EXPECT_EQ(s->text, text.substr(0, text.find(stop))) << stop;
    EXPECT_EQ(streamed, s->text) << "streamed text must never include any part of the stop string";
    EXPECT_EQ(pool_->num_free(), pool_->num_total());
  }
  // A stop string that never appears changes nothing.
  GenerateRequest r = France(48);
  r.stop_strings = {"Berlin"};
  auto s = Generate(r);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->text, text);
  EXPECT_EQ(s->finish_reason, full->finish_reason);
}

TEST_F(GeneratorTest, StopTokenIds) {
  auto full = Generate(France(10));
  ASSERT_TRUE(full.ok());
  ASSERT_GE(full->token_ids.size(), 4u);
  GenerateRequest r = France(10);
  r.stop_token_ids = {full->token_ids[2]};
  auto s = Generate(r);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->finish_reason, FinishReason::kStop);
  EXPECT_EQ(s->token_ids,
            std::vector<int32_t>(full->token_ids.begin(), full->token_ids.begin() + 3));
}

TEST_F(GeneratorTest, ChunkedPrefillGivesSameTokens) {
  auto whole = Generate(France(4));
  GeneratorOptions small;
  small.prefill_chunk_tokens = 9;
  auto chunked = Generate(France(4), small);
  ASSERT_TRUE(whole.ok() && chunked.ok());
  EXPECT_EQ(whole->token_ids, chunked->token_ids);
}

TEST_F(GeneratorTest, SeededSamplingIsReproducible) {
  GenerateRequest r = France(8);
  r.sampling.temperature = 1.0;
  r.sampling.top_p = 0.95;
  r.sampling.seed = 7;
  auto a = Generate(r), b = Generate(r);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->token_ids, b->token_ids);
  EXPECT_EQ(a->text, b->text);
}

TEST_F(GeneratorTest, ContextFullGivesLength) {
  // Sequence stops with LENGTH once prompt + generated tokens fill max_context (the generator sets
  // it to max_position_embeddings; a small one keeps the test fast).
  auto prompt = factory_->BuildPrompt(France(1));
  ASSERT_TRUE(prompt.ok());
  SequenceParams params;
  params.max_new_tokens = 10;
  params.max_context = static_cast<int64_t>(prompt->size()) + 3;
  Sequence seq(*prompt, params, *tokenizer_, pool_.get());
  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  batch.sequences.resize(1);
  ForwardOutput out;
  while (!seq.finished()) {
    ASSERT_TRUE(seq.PrepareFeed(512, &batch.sequences[0]).ok());
    ASSERT_TRUE(runner_->Forward(batch, &out).ok());
    ASSERT_TRUE(seq.CommitFeed());
    seq.AcceptLogits(out.logits_row(0), static_cast<int>(out.vocab_size));
  }
  EXPECT_EQ(seq.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(seq.num_tokens(), params.max_context);
  EXPECT_EQ(seq.generated_ids().size(), 3u);
  // The last sampled token is never fed: the cache holds max_context - 1 tokens.
  EXPECT_EQ(seq.num_cached(), params.max_context - 1);
  seq.ReleasePages();

  // A prompt longer than the model's context is refused before anything runs.
  GenerateRequest r;
  r.prompt_token_ids.assign(runner_->config().max_position_embeddings + 1, 1);
  r.max_new_tokens = 1;
  auto s = Generate(r);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

TEST_F(GeneratorTest, ErrorsFreePagesAndNameFields) {
  pool_ = MakePool(3);  // 48 tokens: too small for the chat prompt + 48 new tokens
  auto r = Generate(France(48));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_->num_free(), 3);

  GenerateRequest bad = France(4);
  bad.sampling.top_p = 1.5;
  EXPECT_EQ(Generate(bad).status().message(), "sampling.top_p must be in (0, 1], got 1.5");
  bad = France(-1);  // 0 means the default; a negative count is refused
  EXPECT_NE(Generate(bad).status().message().find("max_new_tokens"), std::string::npos);
  bad = France(factory_->limits().max_new_tokens_limit + 1);
  EXPECT_NE(Generate(bad).status().message().find("max_new_tokens"), std::string::npos);
  bad = France(4);
  bad.messages = {{"user", "x"}};
  EXPECT_EQ(Generate(bad).status().code(), StatusCode::kInvalidArgument);
  bad = GenerateRequest();
  bad.messages = {{"narrator", "x"}};
  EXPECT_NE(Generate(bad).status().message().find("messages[0].role"), std::string::npos);
  bad = GenerateRequest();
  EXPECT_EQ(Generate(bad).status().code(), StatusCode::kInvalidArgument);
  bad.prompt_token_ids = {1, -5};
  EXPECT_NE(Generate(bad).status().message().find("prompt_token_ids[1]"), std::string::npos);
  EXPECT_EQ(pool_->num_free(), 3);
}

TEST_F(GeneratorTest, GoldenGreedyContinuations) {
  std::ifstream in(kGolden);
  if (!in) GTEST_SKIP() << kGolden << " not present";
  const nlohmann::json golden = nlohmann::json::parse(in);
  std::vector<std::string> names;
  std::vector<std::vector<int32_t>> expected;
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (const auto& c : golden.at("cases")) {
    names.push_back(c.at("name").get<std::string>());
    const auto prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    expected.push_back(c.at("greedy_ids").get<std::vector<int32_t>>());
    ASSERT_GE(expected.back().size(), 32u);
    expected.back().resize(32);
    if (c.at("chat").get<bool>()) {  // our chat format + tokenizer give the same prompt ids
      GenerateRequest r;
      for (const auto& m : c.at("messages")) {
        r.messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
      }
      auto ids = factory_->BuildPrompt(r);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      EXPECT_EQ(*ids, prompt) << names.back();
    }
    // The reference does not stop at <|im_end|>, so the sequences have no stop tokens.
    SequenceParams params;
    params.max_new_tokens = 32;
    params.max_context = runner_->config().max_position_embeddings;
    seqs.push_back(std::make_unique<Sequence>(prompt, params, *tokenizer_, pool_.get()));
  }
  // All cases in one batch per step, as a scheduler would drive them (batching must not change
  // greedy tokens: the batch test of the runner bounds the logit difference by 1e-4, and the golden
  // margins are far larger).
  ForwardBatch batch;
  batch.kv_pool = pool_.get();
  batch.sequences.resize(seqs.size());
  ForwardOutput out;
  for (int step = 0; step < 32; ++step) {
    for (size_t i = 0; i < seqs.size(); ++i) {
      ASSERT_FALSE(seqs[i]->finished());
      ASSERT_TRUE(seqs[i]->PrepareFeed(512, &batch.sequences[i]).ok());
    }
    Status s = runner_->Forward(batch, &out);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (size_t i = 0; i < seqs.size(); ++i) {
      ASSERT_TRUE(seqs[i]->CommitFeed());
      seqs[i]->AcceptLogits(out.logits_row(static_cast<int64_t>(i)),
                            static_cast<int>(out.vocab_size));
    }
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_EQ(seqs[i]->finish_reason(), FinishReason::kLength) << names[i];
    EXPECT_EQ(seqs[i]->generated_ids(), expected[i]) << names[i];
  }
  seqs.clear();
  EXPECT_EQ(pool_->num_free(), pool_->num_total()) << "destroyed sequences must return their pages";
}

}  // namespace
}  // namespace dysco
