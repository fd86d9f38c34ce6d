// Tests of request validation and sequence creation (core/engine/request.h, with the DySCO override
// rules of core/dysco/params.h), model-free: a SmolLM2-shaped ModelConfig built in code (vocab
// 49152, 30 layers, 9 query heads, chatml with SmolLM2's chat settings) and SmolLM2's tokenizer
// (tests/data/smollm2). One case per rule of SequenceFactory::Validate and ValidateDyscoOverrides,
// each INVALID_ARGUMENT with a message that names the field; DySCO overrides are checked even when
// DySCO is off; max_new_tokens 0 means the deployment's default and a count above the limit is
// refused; SequenceFactory::Create refuses inconsistent limits; Create turns a request into a
// Sequence (context, KV pool fit, DySCO parameters resolved against the prompt, no page taken);
// BuildPrompt's chat formatting, bos handling and token ids used as they are.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/dysco/params.h"
#include "core/engine/request.h"
#include "core/engine/sequence.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_config.h"
#include "core/text/chat_format.h"
#include "core/text/tokenizer.h"
#include "tests/cpp/smollm2_config.h"

namespace dysco {
namespace {

const std::string kTokenizer = std::string(DYSCO_SOURCE_DIR) + "/tests/data/smollm2/tokenizer.json";

class RequestTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::FromFile(kTokenizer);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tokenizer_ = std::move(t).value().release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(tokenizer_, nullptr);
    config_ = SmolLm2Config();
  }

  // A factory over config_ (which must not change while the factory lives).
  std::unique_ptr<SequenceFactory> Factory(RequestLimits limits = {}) {
    auto f = SequenceFactory::Create(config_, *tokenizer_, limits);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    if (!f.ok()) return nullptr;
    return std::make_unique<SequenceFactory>(std::move(f).value());
  }

  // A CPU pool of `pages` pages of 16 tokens shaped for config_.
  std::unique_ptr<KvPagePool> Pool(int64_t pages) {
    KvPagePoolOptions o;
    o.page_size = 16;
    o.num_pages = pages;
    auto pool = KvPagePool::Create(config_, o);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    return pool.ok() ? std::move(pool).value() : nullptr;
  }

  static GenerateRequest Text(const std::string& prompt, int64_t max_new_tokens = 4) {
    GenerateRequest r;
    r.prompt = prompt;
    r.max_new_tokens = max_new_tokens;
    return r;
  }
  static GenerateRequest Chat(const std::string& prompt, int64_t max_new_tokens = 4) {
    GenerateRequest r = Text(prompt, max_new_tokens);
    r.chat = true;
    return r;
  }
  static GenerateRequest Ids(int64_t n, int64_t max_new_tokens = 4) {
    GenerateRequest r;
    for (int64_t i = 0; i < n; ++i) r.prompt_token_ids.push_back(static_cast<int32_t>(100 + i));
    r.max_new_tokens = max_new_tokens;
    return r;
  }

  static void ExpectInvalid(const Status& s, const std::string& field, const std::string& what) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << what << ": " << s.ToString();
    EXPECT_EQ(s.message().rfind(field, 0), 0u)
        << what << ": the message must start with \"" << field << "\": " << s.message();
  }

  inline static Tokenizer* tokenizer_ = nullptr;
  ModelConfig config_;
};

// ---------------------------------------------------------------------------------------------
// SequenceFactory::Validate: one case per rule

struct Case {
  std::string name;
  GenerateRequest request;
  std::string field;  // the message starts with it
};

TEST_F(RequestTest, ValidateNamesTheFieldOfEveryRule) {
  RequestLimits limits;
  limits.max_chat_messages = 2;
  limits.max_stop_strings = 2;
  limits.max_stop_string_bytes = 4;
  limits.max_stop_token_ids = 2;
  limits.max_new_tokens_limit = 100;
  limits.max_new_tokens_default = 10;
  auto factory = Factory(limits);
  ASSERT_NE(factory, nullptr);

  std::vector<Case> cases;
  auto add = [&](const std::string& name, const std::function<void(GenerateRequest&)>& edit,
                 const std::string& field) {
    GenerateRequest r = Text("Hello");
    edit(r);
    cases.push_back({name, std::move(r), field});
  };
  // Prompt source.
  add(
      "no prompt source", [](GenerateRequest& r) { r.prompt.clear(); }, "prompt is empty");
  add(
      "too many messages",
      [](GenerateRequest& r) {
        r.prompt.clear();
        r.messages = {{"system", "s"}, {"user", "u"}, {"assistant", "a"}};
      },
      "messages: at most 2 messages, got 3");
  add(
      "unknown role",
      [](GenerateRequest& r) {
        r.prompt.clear();
        r.messages = {{"user", "u"}, {"robot", "r"}};
      },
      "messages[1].role: unknown role \"robot\"");
  add(
      "empty role",
      [](GenerateRequest& r) {
        r.prompt.clear();
        r.messages = {{"", "u"}};
      },
      "messages[0].role");
  add(
      "token id at the vocabulary size",
      [](GenerateRequest& r) {
        r.prompt.clear();
        r.prompt_token_ids = {1, 2, 3, 49152};
      },
      "prompt_token_ids[3] = 49152 is outside the vocabulary [0, 49152)");
  add(
      "negative token id",
      [](GenerateRequest& r) {
        r.prompt.clear();
        r.prompt_token_ids = {-1};
      },
      "prompt_token_ids[0] = -1 is outside the vocabulary");
  // max_new_tokens.
  add(
      "max_new_tokens negative", [](GenerateRequest& r) { r.max_new_tokens = -1; },
      "max_new_tokens must be >= 0 (0 = the default), got -1");
  add(
      "max_new_tokens above the limit", [](GenerateRequest& r) { r.max_new_tokens = 101; },
      "max_new_tokens must be <= 100, got 101");
  // Sampling.
  add(
      "negative temperature", [](GenerateRequest& r) { r.sampling.temperature = -0.5; },
      "sampling.temperature must be >= 0");
  add(
      "infinite temperature",
      [](GenerateRequest& r) { r.sampling.temperature = std::numeric_limits<double>::infinity(); },
      "sampling.temperature");
  add(
      "negative top_k", [](GenerateRequest& r) { r.sampling.top_k = -3; }, "sampling.top_k");
  add(
      "top_p 0", [](GenerateRequest& r) { r.sampling.top_p = 0.0; }, "sampling.top_p");
  add(
      "top_p above 1", [](GenerateRequest& r) { r.sampling.top_p = 1.5; },
      "sampling.top_p must be in (0, 1], got 1.5");
  add(
      "zero repetition penalty", [](GenerateRequest& r) { r.sampling.repetition_penalty = 0.0; },
      "sampling.repetition_penalty");
  // Stops.
  add(
      "too many stop strings",
      [](GenerateRequest& r) {
        r.stop_strings = {"a", "b", "c"};
      },
      "stop_strings: at most 2 stop strings, got 3");
  add(
      "empty stop string",
      [](GenerateRequest& r) {
        r.stop_strings = {"ok", ""};
      },
      "stop_strings[1]: must not be empty");
  add(
      "stop string too long", [](GenerateRequest& r) { r.stop_strings = {"abcde"}; },
      "stop_strings[0]: at most 4 bytes, got 5");
  add(
      "too many stop token ids",
      [](GenerateRequest& r) {
        r.stop_token_ids = {5, 6, 7};
      },
      "stop_token_ids: at most 2 ids, got 3");
  add(
      "stop token id outside the vocabulary",
      [](GenerateRequest& r) {
        r.stop_token_ids = {5, 49152};
      },
      "stop_token_ids[1] = 49152 is outside the vocabulary");
  add(
      "negative stop token id", [](GenerateRequest& r) { r.stop_token_ids = {-4}; },
      "stop_token_ids[0] = -4");
  // DySCO (the override rules have their own test below).
  add(
      "dysco override", [](GenerateRequest& r) { r.dysco_overrides.top_p = 1.5; },
      "dysco.top_p must be in (0, 1], got 1.5");

  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  for (const Case& c : cases) {
    ExpectInvalid(factory->Validate(c.request), c.field, c.name);
    // Create validates first, with the same message, and takes nothing from the pool.
    auto seq = factory->Create(c.request, pool.get());
    ASSERT_FALSE(seq.ok()) << c.name;
    EXPECT_EQ(seq.status().ToString(), factory->Validate(c.request).ToString()) << c.name;
    EXPECT_EQ(pool->num_free(), pool->num_total()) << c.name;
  }
}

TEST_F(RequestTest, MoreThanOnePromptSourceNamesTheFields) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  std::vector<GenerateRequest> requests(3);
  requests[0].prompt = "a";
  requests[0].messages = {{"user", "b"}};
  requests[1].prompt = "a";
  requests[1].prompt_token_ids = {1};
  requests[2].messages = {{"user", "b"}};
  requests[2].prompt_token_ids = {1};
  for (const GenerateRequest& r : requests) {
    const Status s = factory->Validate(r);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    // The one message that starts with three fields: it is about their combination.
    EXPECT_EQ(s.message().rfind("prompt, messages, prompt_token_ids: set only one", 0), 0u)
        << s.message();
  }
}

TEST_F(RequestTest, ValidRequestsPass) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  std::vector<GenerateRequest> ok = {Text("Hello"), Chat("Hello"), Ids(3)};
  GenerateRequest messages;
  messages.messages = {{"system", "Be brief."},
                       {"user", "Hi"},
                       {"assistant", "Hello!"},
                       {"tool", "{}"},
                       {"user", "Bye"}};
  ok.push_back(messages);
  GenerateRequest edges = Text("Hello", 4096);  // max_new_tokens at the limit
  edges.sampling.temperature = 0.7;
  edges.sampling.top_k = 0;
  edges.sampling.top_p = 1.0;
  edges.sampling.repetition_penalty = 1.3;
  edges.stop_strings = std::vector<std::string>(16, std::string(256, 'x'));
  edges.stop_token_ids = std::vector<int32_t>(64, 49151);
  ok.push_back(edges);
  GenerateRequest ids = Ids(2);
  ids.prompt_token_ids = {0, 49151};
  ok.push_back(ids);
  for (size_t i = 0; i < ok.size(); ++i) {
    const Status s = factory->Validate(ok[i]);
    EXPECT_TRUE(s.ok()) << "request " << i << ": " << s.ToString();
  }
}

// ---------------------------------------------------------------------------------------------
// ValidateDyscoOverrides: one case per rule, whatever `dysco` says

struct DyscoCase {
  std::string name;
  DyscoOverrides o;
  std::string message;  // exact
};

std::vector<DyscoCase> BadDyscoOverrides() {
  std::vector<DyscoCase> cases;
  auto add = [&](const std::string& name, const std::function<void(DyscoOverrides&)>& set,
                 const std::string& message) {
    DyscoOverrides o;
    set(o);
    cases.push_back({name, std::move(o), message});
  };
  using Heads = std::vector<std::pair<int, int>>;
  add(
      "no heads", [](DyscoOverrides& o) { o.selected_heads = Heads(); },
      "dysco.selected_heads is empty");
  add(
      "layer out of range",
      [](DyscoOverrides& o) {
        o.selected_heads = Heads{{1, 0}, {30, 1}};
      },
      "dysco.selected_heads[1]: layer 30 out of range [0, 30)");
  add(
      "negative layer",
      [](DyscoOverrides& o) {
        o.selected_heads = Heads{{-1, 0}};
      },
      "dysco.selected_heads[0]: layer -1 out of range [0, 30)");
  add(
      "head out of range",
      [](DyscoOverrides& o) {
        o.selected_heads = Heads{{1, 9}};
      },
      "dysco.selected_heads[0]: query head 9 out of range [0, 9)");
  add(
      "negative head",
      [](DyscoOverrides& o) {
        o.selected_heads = Heads{{1, 0}, {2, -1}};
      },
      "dysco.selected_heads[1]: query head -1 out of range [0, 9)");
  add(
      "duplicate head",
      [](DyscoOverrides& o) {
        o.selected_heads = Heads{{5, 1}, {6, 2}, {5, 1}};
      },
      "dysco.selected_heads[2]: (5, 1) is listed twice");
  add(
      "top_p above 1", [](DyscoOverrides& o) { o.top_p = 1.5; },
      "dysco.top_p must be in (0, 1], got 1.5");
  add(
      "top_p negative", [](DyscoOverrides& o) { o.top_p = -0.25; },
      "dysco.top_p must be in (0, 1], got -0.25");
  add(
      "top_p NaN", [](DyscoOverrides& o) { o.top_p = std::nan(""); },
      "dysco.top_p must be in (0, 1], got nan");
  add(
      "top_k negative", [](DyscoOverrides& o) { o.top_k = -3; },
      "dysco.top_k must be >= 1, got -3");
  add(
      "strength 0", [](DyscoOverrides& o) { o.strength = 0.0; },
      "dysco.strength must be > 0, got 0");
  add(
      "strength negative", [](DyscoOverrides& o) { o.strength = -2.0; },
      "dysco.strength must be > 0, got -2");
  add(
      "strength infinite",
      [](DyscoOverrides& o) { o.strength = std::numeric_limits<double>::infinity(); },
      "dysco.strength must be > 0, got inf");
  add(
      "decay 1", [](DyscoOverrides& o) { o.decay_factor = 1.0; },
      "dysco.decay_factor must be in [0, 1), got 1");
  add(
      "decay negative", [](DyscoOverrides& o) { o.decay_factor = -0.5; },
      "dysco.decay_factor must be in [0, 1), got -0.5");
  add(
      "context warm-up negative", [](DyscoOverrides& o) { o.context_warmup_steps = -1; },
      "dysco.context_warmup_steps must be >= 0, got -1");
  add(
      "intervention warm-up -2", [](DyscoOverrides& o) { o.intervention_warmup = -2; },
      "dysco.intervention_warmup must be >= 0 or -1 (auto), got -2");
  add(
      "empty template sequence",
      [](DyscoOverrides& o) {
        o.template_sequences = {{1, 2}, {}};
      },
      "dysco.template_sequences[1] is empty");
  add(
      "template id outside the vocabulary",
      [](DyscoOverrides& o) {
        o.template_sequences = {{1, 49152}};
      },
      "dysco.template_sequences[0][1] = 49152 is outside the vocabulary [0, 49152)");
  add(
      "negative template id",
      [](DyscoOverrides& o) {
        o.template_sequences = std::vector<std::vector<int32_t>>{{1, -7}};
      },
      "dysco.template_sequences[0][1] = -7 is outside the vocabulary [0, 49152)");
  return cases;
}

TEST_F(RequestTest, DyscoOverridesAreValidatedEvenWithDyscoOff) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  for (const DyscoCase& c : BadDyscoOverrides()) {
    const Status direct = ValidateDyscoOverrides(config_, c.o);
    EXPECT_EQ(direct.code(), StatusCode::kInvalidArgument) << c.name;
    EXPECT_EQ(direct.message(), c.message) << c.name;
    for (bool dysco : {false, true}) {
      GenerateRequest r = Ids(40);
      r.dysco = dysco;
      r.dysco_overrides = c.o;
      const Status s = factory->Validate(r);
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.name << " dysco=" << dysco;
      EXPECT_EQ(s.message(), c.message) << c.name << " dysco=" << dysco;
      auto seq = factory->Create(r, pool.get());
      ASSERT_FALSE(seq.ok()) << c.name << " dysco=" << dysco;
      EXPECT_EQ(seq.status().message(), c.message) << c.name << " dysco=" << dysco;
    }
    // ResolveDyscoParams applies the same rule with the same message.
    auto p = ResolveDyscoParams(config_, c.o, false, 40, -1);
    ASSERT_FALSE(p.ok()) << c.name;
    EXPECT_EQ(p.status().message(), c.message) << c.name;
  }
  EXPECT_EQ(pool->num_free(), pool->num_total());
}

TEST_F(RequestTest, DyscoOverrideEdgeValuesPass) {
  std::vector<DyscoOverrides> ok(8);
  ok[0].top_p = 0.0;  // unset: top_k alone
  ok[1].top_k = 0;    // unset: top_p alone
  ok[2].top_p = 1.0;
  ok[2].top_k = 1;
  ok[3].decay_factor = 0.0;
  ok[3].strength = 1e-6;
  ok[4].strength = 100.0;  // hard mask
  ok[4].context_warmup_steps = 0;
  ok[4].intervention_warmup = 1;
  ok[5].intervention_warmup = -1;  // auto
  ok[6].template_sequences = std::vector<std::vector<int32_t>>();
  ok[6].selected_heads = std::vector<std::pair<int, int>>{{0, 0}, {29, 8}};
  ok[7].template_sequences = std::vector<std::vector<int32_t>>{{0, 5}, {49151, 1}};
  for (size_t i = 0; i < ok.size(); ++i) {
    const Status s = ValidateDyscoOverrides(config_, ok[i]);
    EXPECT_TRUE(s.ok()) << i << ": " << s.ToString();
  }
  // top_p = 0 and top_k = 0 each pass alone; both unset is a resolution error (DySCO on only).
  DyscoOverrides neither;
  neither.top_p = 0.0;
  neither.top_k = 0;
  EXPECT_TRUE(ValidateDyscoOverrides(config_, neither).ok());
}

// ---------------------------------------------------------------------------------------------
// max_new_tokens: 0 = the default, above the limit refused

TEST_F(RequestTest, MaxNewTokensZeroMeansTheDefault) {
  RequestLimits limits;
  limits.max_new_tokens_default = 7;
  limits.max_new_tokens_limit = 50;
  auto factory = Factory(limits);
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  // The cache holds at most prompt + max_new_tokens - 1 tokens (the last token is never fed).
  auto defaulted = factory->Create(Ids(10, 0), pool.get());
  ASSERT_TRUE(defaulted.ok()) << defaulted.status().ToString();
  EXPECT_EQ((*defaulted)->max_cached_tokens(), 10 + 7 - 1);
  auto explicit_count = factory->Create(Ids(10, 3), pool.get());
  ASSERT_TRUE(explicit_count.ok());
  EXPECT_EQ((*explicit_count)->max_cached_tokens(), 10 + 3 - 1);
  auto at_limit = factory->Create(Ids(10, 50), pool.get());
  ASSERT_TRUE(at_limit.ok()) << at_limit.status().ToString();
  EXPECT_EQ((*at_limit)->max_cached_tokens(), 10 + 50 - 1);
  auto above = factory->Create(Ids(10, 51), pool.get());
  ASSERT_FALSE(above.ok());
  ExpectInvalid(above.status(), "max_new_tokens must be <= 50", "above the limit");
}

// ---------------------------------------------------------------------------------------------
// SequenceFactory::Create(config, tokenizer, limits)

TEST_F(RequestTest, FactoryRefusesInconsistentLimits) {
  struct LimitCase {
    std::string name;
    std::function<void(RequestLimits&)> edit;
    std::string field;
  };
  const std::vector<LimitCase> cases = {
      {"limit 0", [](RequestLimits& l) { l.max_new_tokens_limit = 0; }, "max_new_tokens_limit"},
      {"default 0", [](RequestLimits& l) { l.max_new_tokens_default = 0; },
       "max_new_tokens_default"},
      {"default negative", [](RequestLimits& l) { l.max_new_tokens_default = -5; },
       "max_new_tokens_default"},
      {"default above the limit",
       [](RequestLimits& l) {
         l.max_new_tokens_limit = 10;
         l.max_new_tokens_default = 11;
       },
       "max_new_tokens_default"},
      {"negative context", [](RequestLimits& l) { l.max_context_tokens = -1; },
       "max_context_tokens"},
      {"context beyond the model's", [](RequestLimits& l) { l.max_context_tokens = 8193; },
       "max_context_tokens must be in [0, 8192]"},
  };
  for (const LimitCase& c : cases) {
    RequestLimits limits;
    c.edit(limits);
    auto f = SequenceFactory::Create(config_, *tokenizer_, limits);
    ASSERT_FALSE(f.ok()) << c.name;
    ExpectInvalid(f.status(), c.field, c.name);
  }
  // Consistent limits; max_context_tokens 0 resolves to the model's context.
  auto f = SequenceFactory::Create(config_, *tokenizer_, RequestLimits());
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->limits().max_context_tokens, 8192);
  EXPECT_EQ(&f->config(), &config_);
  RequestLimits edge;
  edge.max_new_tokens_limit = 1;
  edge.max_new_tokens_default = 1;
  edge.max_context_tokens = 8192;
  f = SequenceFactory::Create(config_, *tokenizer_, edge);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->limits().max_context_tokens, 8192);
  edge.max_context_tokens = 100;
  f = SequenceFactory::Create(config_, *tokenizer_, edge);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->limits().max_context_tokens, 100);
}

// ---------------------------------------------------------------------------------------------
// SequenceFactory::Create(request, pool)

TEST_F(RequestTest, CreateBuildsTheSequenceWithoutTakingPages) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  const GenerateRequest r = Chat("What is the capital of France?", 5);
  auto prompt = factory->BuildPrompt(r);
  ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
  auto seq = factory->Create(r, pool.get());
  ASSERT_TRUE(seq.ok()) << seq.status().ToString();
  const Sequence& s = **seq;
  EXPECT_EQ(s.tokens(), *prompt);
  EXPECT_EQ(s.num_prompt_tokens(), static_cast<int64_t>(prompt->size()));
  EXPECT_EQ(s.num_cached(), 0);
  EXPECT_FALSE(s.finished());
  EXPECT_EQ(s.dysco(), nullptr);
  EXPECT_EQ(s.MaxTokensToFeed(), static_cast<int64_t>(prompt->size()));  // plain: all of it
  EXPECT_EQ(s.max_cached_tokens(), static_cast<int64_t>(prompt->size()) + 5 - 1);
  EXPECT_TRUE(s.pages().ids().empty()) << "Create must not reserve pages";
  EXPECT_EQ(pool->num_free(), pool->num_total());
  // DySCO overrides without `dysco` attach nothing.
  GenerateRequest off = r;
  off.dysco_overrides.strength = 3.0;
  auto plain = factory->Create(off, pool.get());
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_EQ((*plain)->dysco(), nullptr);
}

TEST_F(RequestTest, CreateRefusesARequestThatCanNeverFitThePool) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);  // 128 tokens
  ASSERT_NE(pool, nullptr);
  // 10 + 119 - 1 = 128 tokens: exactly 8 pages.
  auto fits = factory->Create(Ids(10, 119), pool.get());
  ASSERT_TRUE(fits.ok()) << fits.status().ToString();
  EXPECT_EQ(pool->pages_for_tokens((*fits)->max_cached_tokens()), 8);
  // One more token needs a 9th page.
  auto too_big = factory->Create(Ids(10, 120), pool.get());
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted) << too_big.status().ToString();
  EXPECT_NE(too_big.status().message().find("KV pages"), std::string::npos)
      << too_big.status().message();
  EXPECT_NE(too_big.status().message().find("max_new_tokens 120"), std::string::npos)
      << too_big.status().message();
  EXPECT_EQ(pool->num_free(), pool->num_total());
  // The check is against the pool's size, not what is free now: pages taken by others do not
  // make a request that fits the pool fail here.
  auto taken = pool->Allocate(8);
  ASSERT_TRUE(taken.ok());
  EXPECT_TRUE(factory->Create(Ids(10, 119), pool.get()).ok());
  ASSERT_TRUE(pool->Free(*taken).ok());
}

TEST_F(RequestTest, CreateAppliesTheContext) {
  RequestLimits limits;
  limits.max_context_tokens = 32;
  auto factory = Factory(limits);
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  // A prompt longer than the context is refused, naming the prompt: token ids already by Validate
  // (the cheap checks a full queue does not pre-empt), text once encoded.
  auto longer = factory->Create(Ids(33, 1), pool.get());
  ASSERT_FALSE(longer.ok());
  ExpectInvalid(longer.status(), "prompt_token_ids has 33 tokens, more than the context of 32",
                "context");
  ExpectInvalid(factory->Validate(Ids(33, 1)),
                "prompt_token_ids has 33 tokens, more than the context of 32", "context");
  // A prompt that fills the context exactly is accepted.
  auto full = factory->Create(Ids(32, 1), pool.get());
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  // max_new_tokens beyond the context: the cache never holds more than the context (and the pool
  // check uses that: 200 new tokens pass it with 8 pages here).
  auto capped = factory->Create(Ids(10, 200), pool.get());
  ASSERT_TRUE(capped.ok()) << capped.status().ToString();
  EXPECT_EQ((*capped)->max_cached_tokens(), 32);
}

TEST_F(RequestTest, CreateResolvesDyscoAgainstThePrompt) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(16);
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(CountGenerationPromptTokens(config_, *tokenizer_), 4);  // <|im_start|> ass istant \n

  // Token ids are not chat-formatted: intervention_warmup auto = 2; defaults 8 + 2 warm-up tokens.
  GenerateRequest ids = Ids(40);
  ids.dysco = true;
  ids.dysco_trace = DyscoTraceMode::kFull;
  auto a = factory->Create(ids, pool.get());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  const DyscoController* c = (*a)->dysco();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->params().prompt_len, 40);
  EXPECT_EQ(c->params().intervention_warmup, 2);
  EXPECT_EQ(c->params().prefill_len(), 40 - 8 - 2);
  EXPECT_EQ(c->params().selected_heads, config_.dysco.selected_heads);
  EXPECT_EQ(c->trace_mode(), DyscoTraceMode::kFull);
  EXPECT_EQ((*a)->MaxTokensToFeed(), 30);  // the prefill stops at P - T
  EXPECT_EQ(c->relevance().size(), 30u);
  EXPECT_EQ(c->template_mask().size(), 40u);

  // A chat-formatted prompt: auto = the generation prompt's 4 tokens; overrides apply.
  GenerateRequest chat = Chat("Which city is the capital of France, and why is it famous?");
  chat.dysco = true;
  chat.dysco_overrides.selected_heads = std::vector<std::pair<int, int>>{{29, 8}};
  chat.dysco_overrides.strength = 3.0;
  auto b = factory->Create(chat, pool.get());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_NE((*b)->dysco(), nullptr);
  EXPECT_EQ((*b)->dysco()->params().intervention_warmup, 4);
  EXPECT_EQ((*b)->dysco()->params().strength, 3.0);
  EXPECT_EQ((*b)->dysco()->params().max_head_layer(), 29);
  EXPECT_EQ((*b)->dysco()->trace_mode(), DyscoTraceMode::kOff);

  // A warm-up as long as the prompt: 8 + 2 = 10 tokens of a 10-token prompt.
  GenerateRequest short_prompt = Ids(10);
  short_prompt.dysco = true;
  auto too_short = factory->Create(short_prompt, pool.get());
  ASSERT_FALSE(too_short.ok());
  ExpectInvalid(too_short.status(), "dysco.context_warmup_steps", "warm-up longer than the prompt");
  EXPECT_NE(too_short.status().message().find("prompt length 10"), std::string::npos)
      << too_short.status().message();
  // Without DySCO the same prompt is fine: the prompt-dependent rules apply to DySCO requests only.
  short_prompt.dysco = false;
  EXPECT_TRUE(factory->Create(short_prompt, pool.get()).ok());

  // The other resolution rules, each naming its field.
  GenerateRequest neither = Ids(40);
  neither.dysco = true;
  neither.dysco_overrides.top_p = 0.0;
  neither.dysco_overrides.top_k = 0;
  auto n = factory->Create(neither, pool.get());
  ASSERT_FALSE(n.ok());
  ExpectInvalid(n.status(), "dysco.top_p and dysco.top_k are both unset",
                "neither top_p nor top_k");
  GenerateRequest fixed = Ids(40);
  fixed.dysco = true;
  fixed.dysco_overrides.dynamic_rescale = false;
  fixed.dysco_overrides.context_warmup_steps = 1;
  auto f = factory->Create(fixed, pool.get());
  ASSERT_FALSE(f.ok());
  ExpectInvalid(f.status(), "dysco.context_warmup_steps must be >= 2", "static variant");
  GenerateRequest no_warmup = Ids(40);
  no_warmup.dysco = true;
  no_warmup.dysco_overrides.context_warmup_steps = 0;
  no_warmup.dysco_overrides.intervention_warmup = 0;
  auto w = factory->Create(no_warmup, pool.get());
  ASSERT_FALSE(w.ok());
  ExpectInvalid(w.status(), "dysco.context_warmup_steps + dysco.intervention_warmup (0 + 0)",
                "no warm-up");
  EXPECT_EQ(pool->num_free(), pool->num_total());
}

TEST_F(RequestTest, DyscoOnAPackageWithoutHeadsNeedsHeads) {
  config_.dysco.selected_heads.clear();
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  GenerateRequest r = Ids(40);
  r.dysco = true;
  auto s = factory->Create(r, pool.get());
  ASSERT_FALSE(s.ok());
  ExpectInvalid(s.status(),
                "dysco.selected_heads is empty: the model package has no retrieval heads",
                "no heads");
  r.dysco_overrides.selected_heads = std::vector<std::pair<int, int>>{{3, 4}};
  auto with_heads = factory->Create(r, pool.get());
  ASSERT_TRUE(with_heads.ok()) << with_heads.status().ToString();
  EXPECT_EQ((*with_heads)->dysco()->params().selected_heads,
            (std::vector<std::pair<int, int>>{{3, 4}}));
}

// ---------------------------------------------------------------------------------------------
// BuildPrompt

TEST_F(RequestTest, BuildPromptChatFormatting) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  const std::string q = "What is the capital of France?";
  auto formatted = FormatChat(ChatFormat::kChatml, SmolLm2Chat(), {{"user", q}});
  ASSERT_TRUE(formatted.ok());
  const std::vector<int32_t> want = tokenizer_->Encode(*formatted, /*parse_special=*/true);

  // `chat` renders the prompt as one user message, special tokens parsed.
  auto chat = factory->BuildPrompt(Chat(q));
  ASSERT_TRUE(chat.ok()) << chat.status().ToString();
  EXPECT_EQ(*chat, want);
  EXPECT_EQ(chat->front(), *tokenizer_->TokenToId("<|im_start|>"));
  EXPECT_EQ(tokenizer_->Decode(*chat),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\n" +
                q + "<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_TRUE(IsChatFormatted(Chat(q)));

  // `messages` is always chat-formatted; the same single message gives the same ids.
  GenerateRequest m;
  m.messages = {{"user", q}};
  auto from_messages = factory->BuildPrompt(m);
  ASSERT_TRUE(from_messages.ok());
  EXPECT_EQ(*from_messages, want);
  EXPECT_TRUE(IsChatFormatted(m));

  // A system message of the request replaces the default one.
  m.messages = {{"system", "Be brief."}, {"user", q}};
  auto with_system = factory->BuildPrompt(m);
  ASSERT_TRUE(with_system.ok());
  EXPECT_EQ(tokenizer_->Decode(*with_system),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + q +
                "<|im_end|>\n<|im_start|>assistant\n");

  // A package without a chat template cannot format a chat request.
  config_.chat_format = ChatFormat::kNone;
  auto no_template = Factory();
  ASSERT_NE(no_template, nullptr);
  EXPECT_EQ(no_template->BuildPrompt(Chat(q)).status().code(), StatusCode::kFailedPrecondition);
  auto pool = Pool(8);
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(no_template->Create(Chat(q), pool.get()).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_TRUE(no_template->BuildPrompt(Text(q)).ok());  // plain text still works
}

TEST_F(RequestTest, BuildPromptPlainTextDoesNotParseSpecialTokens) {
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);
  const std::string text = "<|im_start|>user says hi";
  auto ids = factory->BuildPrompt(Text(text));
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  EXPECT_EQ(*ids, tokenizer_->Encode(text, /*parse_special=*/false));
  const int32_t im_start = *tokenizer_->TokenToId("<|im_start|>");
  EXPECT_EQ(std::count(ids->begin(), ids->end(), im_start), 0) << "plain text is encoded as text";
  EXPECT_EQ(tokenizer_->Decode(*ids), text);
  EXPECT_FALSE(IsChatFormatted(Text(text)));
}

TEST_F(RequestTest, BuildPromptBos) {
  const int32_t bos = *tokenizer_->TokenToId("<|im_start|>");
  ASSERT_EQ(bos, 1);
  config_.special_tokens.add_bos = true;
  config_.special_tokens.bos_token_id = bos;
  auto factory = Factory();
  ASSERT_NE(factory, nullptr);

  // Plain text gets the bos in front.
  auto plain = factory->BuildPrompt(Text("Hello world"));
  ASSERT_TRUE(plain.ok());
  std::vector<int32_t> want = {bos};
  const std::vector<int32_t> hello = tokenizer_->Encode("Hello world", false);
  want.insert(want.end(), hello.begin(), hello.end());
  EXPECT_EQ(*plain, want);

  // Text that already starts with it (a chatml prompt starts with <|im_start|>) does not get it
  // twice.
  auto chat = factory->BuildPrompt(Chat("Hello"));
  ASSERT_TRUE(chat.ok());
  auto formatted = FormatChat(ChatFormat::kChatml, SmolLm2Chat(), {{"user", "Hello"}});
  ASSERT_TRUE(formatted.ok());
  EXPECT_EQ(*chat, tokenizer_->Encode(*formatted, true));
  EXPECT_EQ(chat->at(0), bos);
  EXPECT_NE(chat->at(1), bos);

  // Token ids are used as they are: no bos added, none removed.
  GenerateRequest ids = Ids(3);
  auto as_is = factory->BuildPrompt(ids);
  ASSERT_TRUE(as_is.ok());
  EXPECT_EQ(*as_is, ids.prompt_token_ids);
  ids.prompt_token_ids = {bos, bos, 7};
  ids.chat = true;  // token ids are never chat-formatted
  EXPECT_FALSE(IsChatFormatted(ids));
  as_is = factory->BuildPrompt(ids);
  ASSERT_TRUE(as_is.ok());
  EXPECT_EQ(*as_is, ids.prompt_token_ids);

  // add_bos without a bos id adds nothing; without add_bos nothing is added either.
  config_.special_tokens.bos_token_id.reset();
  auto no_id = Factory();
  ASSERT_NE(no_id, nullptr);
  EXPECT_EQ(*no_id->BuildPrompt(Text("Hello world")), hello);
  config_.special_tokens.bos_token_id = bos;
  config_.special_tokens.add_bos = false;
  auto no_bos = Factory();
  ASSERT_NE(no_bos, nullptr);
  EXPECT_EQ(*no_bos->BuildPrompt(Text("Hello world")), hello);
}

}  // namespace
}  // namespace dysco
