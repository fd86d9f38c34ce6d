// Tests of retrieval-head detection (core/dysco/head_detection.h): the per-paragraph score against a
// plain reference and hand-made vectors, JSONL parsing errors, exact paragraph and query token
// spans on the SmolLM2 and Qwen3 tokenizers (tests/data), writing the heads into a config.json
// copy, and, with the default model package, a detection over a few examples whose selected heads
// score far above the median head and whose numbers do not depend on how many query rows share a
// step.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/dysco/head_detection.h"
#include "tests/cpp/model_fixture.h"
#include "tests/cpp/temp_dir.h"

namespace dysco {
namespace {

const std::string kSource = DYSCO_SOURCE_DIR;
const std::string kExamples = kSource + "/tests/data/head_detection_examples.jsonl";

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string TempPath(const std::string& name) {
  const char* base = std::getenv("TMPDIR");
  return std::string(base != nullptr && *base != '\0' ? base : "/tmp") +
         "/dysco_test_head_detection_" + std::to_string(::getpid()) + "_" + name;
}

// The obvious formula, two passes, no shortcuts.
double ReferenceScore(const std::vector<double>& c) {
  const size_t n = c.size();
  if (n < 2) return 0.0;
  double mean = 0;
  for (double x : c) mean += x;
  mean /= n;
  double var = 0;
  for (double x : c) var += (x - mean) * (x - mean);
  var /= (n - 1);
  const double thr = mean - 2 * std::sqrt(var);
  double sum = 0;
  for (double x : c) sum += x > thr ? x : 0.0;
  return sum;
}

TEST(ParagraphScoreTest, HandMadeVectors) {
  // No entry is far below the mean: everything counts.
  const std::vector<double> all = {1, 2, 3, 4, 100};
  EXPECT_DOUBLE_EQ(ParagraphScore(all.data(), all.size()), 110.0);
  // {0, 0, 0, 0, -1}: mean -0.2; unbiased std sqrt(0.2) = 0.447 gives threshold -1.094, so -1 is
  // kept (sum -1). The biased std (0.4) would give threshold -1.0 and drop it (sum 0).
  const std::vector<double> unbiased = {0, 0, 0, 0, -1};
  EXPECT_DOUBLE_EQ(ParagraphScore(unbiased.data(), unbiased.size()), -1.0);
  // A strong negative outlier is dropped: mean -0.1, std 3.48, threshold -7.06.
  const std::vector<double> outlier = {1, 1, 1, 1, 1, 1, 1, 1, 1, -10};
  EXPECT_DOUBLE_EQ(ParagraphScore(outlier.data(), outlier.size()), 9.0);
  // Strictly above: a constant vector has std 0 and threshold equal to every entry.
  const std::vector<double> constant = {0.25, 0.25, 0.25};
  EXPECT_EQ(ParagraphScore(constant.data(), constant.size()), 0.0);
  // Too short for an unbiased std.
  const std::vector<double> one = {5.0};
  EXPECT_EQ(ParagraphScore(one.data(), 1), 0.0);
  EXPECT_EQ(ParagraphScore(nullptr, 0), 0.0);
}

TEST(ParagraphScoreTest, MatchesReferenceOnRandomVectors) {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 1e-3);
  std::uniform_int_distribution<int> len(2, 80);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> c(len(rng));
    for (double& x : c) x = normal(rng);
    if (trial % 3 == 0) c[trial % c.size()] = -0.05;  // an outlier to drop
    EXPECT_NEAR(ParagraphScore(c.data(), c.size()), ReferenceScore(c), 1e-12) << trial;
  }
}

TEST(ParseDetectionExampleTest, AcceptsValidLine) {
  auto ex = ParseDetectionExample(
      R"({"question": "q?", "paragraphs": [{"title": "t0", "text": "x"}, {"title": "t1", "text": "y"}], "gold_ids": [1]})");
  ASSERT_TRUE(ex.ok()) << ex.status().ToString();
  EXPECT_EQ(ex->question, "q?");
  ASSERT_EQ(ex->paragraphs.size(), 2u);
  EXPECT_EQ(ex->paragraphs[1].title, "t1");
  EXPECT_EQ(ex->paragraphs[1].text, "y");
  EXPECT_EQ(ex->gold_ids, std::vector<int>{1});
}

TEST(ParseDetectionExampleTest, RejectsBadLinesNamingTheField) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"{not json", "not valid JSON"},
      {"[1, 2]", "not a JSON object"},
      {R"({"paragraphs": [{"title": "t", "text": "x"}], "gold_ids": [0]})", "question"},
      {R"({"question": "q", "paragraphs": [], "gold_ids": []})", "paragraphs"},
      {R"({"question": "q", "paragraphs": [{"title": "t"}], "gold_ids": [0]})",
       "paragraphs[0].text"},
      {R"({"question": "q", "paragraphs": [{"title": "t", "text": "x"}]})", "gold_ids"},
      {R"({"question": "q", "paragraphs": [{"title": "t", "text": "x"}], "gold_ids": [1]})",
       "gold_ids[0] = 1"},
      {R"({"question": "q", "paragraphs": [{"title": "t", "text": "x"}], "gold_ids": ["0"]})",
       "gold_ids[0]"},
  };
  for (const auto& [line, what] : bad) {
    auto ex = ParseDetectionExample(line);
    ASSERT_FALSE(ex.ok()) << line;
    EXPECT_EQ(ex.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(ex.status().message().find(what), std::string::npos) << ex.status().message();
  }
}

TEST(LoadDetectionExamplesTest, NamesFileAndLineOfABadLine) {
  const std::string path = TempPath("bad.jsonl");
  {
    std::ofstream f(path);
    f << R"({"question": "q", "paragraphs": [{"title": "t", "text": "x"}], "gold_ids": [0]})"
      << "\n\n"
      << R"({"question": "q", "paragraphs": [{"title": "t", "text": "x"}], "gold_ids": [3]})"
      << "\n";
  }
  auto ex = LoadDetectionExamples(path);
  ASSERT_FALSE(ex.ok());
  EXPECT_NE(ex.status().message().find(path + ":3: gold_ids[0]"), std::string::npos)
      << ex.status().message();
  auto first = LoadDetectionExamples(path, /*max_examples=*/1);  // stops before the bad line
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(first->size(), 1u);
  std::remove(path.c_str());
  EXPECT_EQ(LoadDetectionExamples(path).status().code(), StatusCode::kNotFound);
}

ModelConfig ChatmlConfig(bool smollm_system) {
  ModelConfig c;
  c.chat_format = ChatFormat::kChatml;
  if (smollm_system) {
    c.chat.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
  }
  c.chat.generation_prompt = "<|im_start|>assistant\n";
  return c;
}

std::vector<DetectionParagraph> SpanParagraphs() {
  return {
      {"The musicians of the orchestra",
       "The instrument that Jonas Eckhart plays in the town orchestra is the clarinet."},
      {"Numbers 1234 and 56789", "Digits 2024, 3.14159 and 1e-5 split into pieces."},
      {"Unicode: caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac",
       "Na\xc3\xafve r\xc3\xa9sum\xc3\xa9, \xe2\x80\x9cquotes\xe2\x80\x9d and an emoji "
       "\xf0\x9f\x8e\xbb."},
      {"Trailing punctuation?!", "Ends with a parenthesis (like this)"},
      {"", "An empty title."},
      {"Last", "This one ends with a word"},
  };
}

// Every span decodes to exactly its piece of text and the tokens before it to exactly the text
// before it. Where the tokenizer merges the end of a paragraph with the "\n\n" after it into one
// token (Qwen2-style pre-tokenizers glue newlines to punctuation), the span keeps that token and
// is counted as inexact. Note that tokenizing the prompt prefix up to a boundary is not a way to
// find spans: SmolLM2 encodes a prefix's final "\n\n" as one token but "\n\n[" as "\n", "\n", "[".
void ExpectSpans(const Tokenizer& tok, const ModelConfig& config, int expected_inexact) {
  const auto paragraphs = SpanParagraphs();
  const std::string question = "Which instrument does Jonas Eckhart play?";
  auto built = BuildDetectionPrompt(config, tok, question, paragraphs);
  ASSERT_TRUE(built.ok()) << built.status().ToString();
  const DetectionPrompt& p = *built;
  EXPECT_EQ(p.inexact_spans, expected_inexact);
  EXPECT_EQ(p.token_ids, tok.Encode(p.text, true));
  ASSERT_EQ(p.paragraph_spans.size(), paragraphs.size());
  const auto decode = [&](int64_t from, int64_t to) {
    return tok.Decode(std::vector<int32_t>(p.token_ids.begin() + from, p.token_ids.begin() + to));
  };
  int inexact = 0;
  int64_t last_end = 0;
  for (size_t i = 0; i < paragraphs.size(); ++i) {
    const TokenSpan& s = p.paragraph_spans[i];
    const ByteSpan& b = p.paragraph_bytes[i];
    const std::string piece =
        "[" + std::to_string(i + 1) + "] " + paragraphs[i].title + "\n" + paragraphs[i].text;
    EXPECT_EQ(p.text.substr(b.begin, b.end - b.begin), piece);
    EXPECT_EQ(decode(0, s.begin), p.text.substr(0, b.begin)) << i;
    const std::string got = decode(s.begin, s.end);
    if (got != piece) {
      ++inexact;
      // Only the separator's whitespace may ride along, inside the paragraph's last token.
      EXPECT_EQ(got.substr(0, piece.size()), piece) << i;
      EXPECT_EQ(got.substr(piece.size()), p.text.substr(b.end, got.size() - piece.size())) << i;
      EXPECT_EQ(got.find_first_not_of("\n", piece.size()), std::string::npos) << i;
    }
    EXPECT_GE(s.begin, last_end);
    last_end = s.end;
  }
  EXPECT_EQ(inexact, expected_inexact);
  EXPECT_GE(p.query_span.begin, last_end);
  EXPECT_EQ(p.query_span.end, static_cast<int64_t>(p.token_ids.size()));
  const std::string query = decode(p.query_span.begin, p.query_span.end);
  EXPECT_EQ(query,
            "Please find information that are relevant to the following query in the paragraphs "
            "above. Query: " +
                question + "<|im_end|>\n");
  EXPECT_EQ(p.text.substr(p.query_bytes.begin), query);
  EXPECT_EQ(decode(0, p.query_span.begin), p.text.substr(0, p.query_bytes.begin));
  // One user message, no generation prompt.
  EXPECT_EQ(p.text.find("<|im_start|>assistant"), std::string::npos);
  EXPECT_NE(p.text.find("<|im_start|>user\nHere are some paragraphs:\n\n[1] The musicians"),
            std::string::npos);
  EXPECT_EQ(config.chat.default_system.has_value(), p.text.rfind("<|im_start|>system\n", 0) == 0);

  // The "N/A" prompt shares every token before the query span.
  auto null_built = BuildDetectionPrompt(config, tok, "N/A", paragraphs);
  ASSERT_TRUE(null_built.ok());
  EXPECT_EQ(null_built->query_span.begin, p.query_span.begin);
  EXPECT_TRUE(std::equal(p.token_ids.begin(), p.token_ids.begin() + p.query_span.begin,
                         null_built->token_ids.begin()));
}

TEST(BuildDetectionPromptTest, ExactSpansSmolLM2) {
  auto tok = Tokenizer::FromFile(kSource + "/tests/data/smollm2/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  ExpectSpans(**tok, ChatmlConfig(true), 0);
}

TEST(BuildDetectionPromptTest, SpansQwen3) {
  auto tok = Tokenizer::FromFile(kSource + "/tests/data/qwen3/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  // Every paragraph but the one ending in a letter ends in punctuation, which Qwen3's
  // pre-tokenizer joins with the following "\n\n".
  ExpectSpans(**tok, ChatmlConfig(false), static_cast<int>(SpanParagraphs().size()) - 1);
}

TEST(BuildDetectionPromptTest, PlainPromptWithBos) {
  auto tok = Tokenizer::FromFile(kSource + "/tests/data/smollm2/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  ModelConfig c;  // chat format "none", bos prepended
  c.special_tokens.bos_token_id = 1;
  c.special_tokens.add_bos = true;
  const std::vector<DetectionParagraph> paragraphs = {{"a", "text with trailing spaces   "},
                                                      {"b", "plain <|im_end|>"}};
  auto built = BuildDetectionPrompt(c, **tok, "q", paragraphs);
  ASSERT_TRUE(built.ok()) << built.status().ToString();
  const DetectionPrompt& p = *built;
  EXPECT_EQ(p.token_ids.front(), 1);
  EXPECT_EQ(p.token_ids, [&] {
    std::vector<int32_t> ids = (*tok)->Encode(p.text, /*parse_special=*/false);
    ids.insert(ids.begin(), 1);
    return ids;
  }());
  EXPECT_EQ(p.text.rfind("Here are some paragraphs:", 0), 0u);
  EXPECT_EQ(p.inexact_spans, 0);
  for (size_t i = 0; i < paragraphs.size(); ++i) {
    const TokenSpan& s = p.paragraph_spans[i];
    EXPECT_EQ((*tok)->Decode(
                  std::vector<int32_t>(p.token_ids.begin() + s.begin, p.token_ids.begin() + s.end)),
              "[" + std::to_string(i + 1) + "] " + paragraphs[i].title + "\n" + paragraphs[i].text);
  }
  EXPECT_EQ((*tok)->Decode(
                std::vector<int32_t>(p.token_ids.begin() + p.query_span.begin, p.token_ids.end())),
            "Please find information that are relevant to the following query in the paragraphs "
            "above. Query: q");
}

TEST(WriteSelectedHeadsTest, KeepsTheRestOfTheConfig) {
  const std::string dir = MakeTempDir("dysco_test_head_detection_package_");
  ASSERT_FALSE(dir.empty()) << "mkdtemp failed";
  const std::string original = R"({
  "format_version": 4,
  "model_name": "Tiny [test]",
  "architecture": "llama",
  "dtype": "float32",
  "vocab_size": 49152,
  "hidden_size": 8,
  "intermediate_size": 16,
  "num_layers": 2,
  "num_attention_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 4,
  "rms_norm_eps": 1e-05,
  "rope_theta": 100000.0,
  "rope_scaling": null,
  "max_position_embeddings": 64,
  "tie_word_embeddings": true,
  "qk_norm": false,
  "special_tokens": {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2, "add_bos": false},
  "chat_format": "chatml",
  "chat": {"default_system": "say [1, 2]", "generation_prompt": "<|im_start|>assistant\n", "stop_strings": []},
  "dysco": {"selected_heads": [], "top_p": 0.975, "top_k": 4096, "strength": 2.0, "decay_factor": 0.75,
            "context_warmup_steps": 8, "intervention_warmup": "auto", "dynamic_rescale": true,
            "template_sequences": [[1, 9690, 198], [1, 4, 198]]},
  "source": {"kind": "gguf", "path": "x.gguf", "sha256": "ab", "exporter_version": "cd"}
})";
  { std::ofstream(dir + "/config.json") << original; }
  auto before = LoadModelConfig(dir);
  ASSERT_TRUE(before.ok()) << before.status().ToString();

  const std::vector<std::pair<int, int>> heads = {{1, 0}, {0, 1}};
  ASSERT_TRUE(WriteSelectedHeads(dir, heads, "data.jsonl", 7).ok());
  auto after = LoadModelConfig(dir);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_EQ(after->dysco.selected_heads, heads);
  EXPECT_EQ(after->dysco.template_sequences, before->dysco.template_sequences);
  EXPECT_EQ(after->model_name, before->model_name);
  EXPECT_EQ(after->chat.default_system, before->chat.default_system);
  EXPECT_EQ(after->rms_norm_eps, before->rms_norm_eps);

  const std::string text = ReadFile(dir + "/config.json");
  const auto j = nlohmann::json::parse(text);
  auto expected = nlohmann::json::parse(original);
  expected["dysco"]["selected_heads"] = {{1, 0}, {0, 1}};
  expected["dysco"]["heads_source"] = {
      {"method", "qrhead"}, {"data", "data.jsonl"}, {"examples", 7}};
  EXPECT_EQ(j, expected);
  // Key order kept, number lists on one line, strings untouched.
  EXPECT_LT(text.find("\"format_version\""), text.find("\"model_name\""));
  EXPECT_LT(text.find("\"dysco\""), text.find("\"source\""));
  EXPECT_NE(text.find("\"selected_heads\": [\n      [1, 0],\n      [0, 1]\n    ],"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("[1, 4, 198]"), std::string::npos) << text;
  EXPECT_NE(text.find("\"say [1, 2]\""), std::string::npos) << text;
  EXPECT_FALSE(PathExists(dir + "/config.json.tmp"));

  // A broken config is left as it is.
  { std::ofstream(dir + "/config.json") << "{broken"; }
  EXPECT_EQ(WriteSelectedHeads(dir, heads, "d", 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadFile(dir + "/config.json"), "{broken");
  ASSERT_TRUE(RemoveTree(dir)) << dir;
  EXPECT_EQ(WriteSelectedHeads(dir, heads, "d", 1).code(), StatusCode::kNotFound);
}

TEST(MedianHeadScoreTest, OddEvenEmpty) {
  EXPECT_EQ(MedianHeadScore({}), 0.0);
  EXPECT_EQ(MedianHeadScore({{0, 0, 3.0}, {0, 1, 1.0}, {0, 2, 2.0}}), 2.0);
  EXPECT_EQ(MedianHeadScore({{0, 0, 4.0}, {0, 1, 1.0}, {0, 2, 2.0}, {0, 3, 10.0}}), 3.0);
}

class HeadDetectionModelTest : public DefaultModelTest {
 protected:
  void SetUp() override {
    DefaultModelTest::SetUp();
    if (ModelMissing()) return;
    KvPagePoolOptions o;
    o.page_size = 16;
    o.num_pages = 256;
    auto pool = KvPagePool::Create(runner_->config(), o);
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    pool_ = std::move(pool).value();
  }

  std::unique_ptr<KvPagePool> pool_;
};

TEST_F(HeadDetectionModelTest, SelectedHeadsScoreFarAboveTheMedian) {
  auto examples = LoadDetectionExamples(kExamples);
  ASSERT_TRUE(examples.ok()) << examples.status().ToString();
  auto result = DetectRetrievalHeads(runner_, pool_.get(), *tokenizer_, *examples);
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_EQ(pool_->num_free(), pool_->num_total());  // every page returned
  const ModelConfig& c = runner_->config();
  ASSERT_EQ(result->ranked.size(), static_cast<size_t>(c.num_layers * c.num_attention_heads));
  EXPECT_EQ(result->num_examples, static_cast<int64_t>(examples->size()));
  EXPECT_EQ(result->inexact_spans, 0);
  for (size_t i = 1; i < result->ranked.size(); ++i) {
    EXPECT_GE(result->ranked[i - 1].score, result->ranked[i].score);
    EXPECT_TRUE(std::isfinite(result->ranked[i].score));
  }
  double selected = 0.0;
  for (int i = 0; i < 16; ++i) selected += result->ranked[i].score / 16;
  const double median = MedianHeadScore(result->ranked);
  std::printf("examples=%lld selected_mean=%.5f median=%.5f best=%.5f (layer %d head %d)\n",
              static_cast<long long>(result->num_examples), selected, median,
              result->ranked[0].score, result->ranked[0].layer, result->ranked[0].head);
  EXPECT_GT(selected, 0.0);
  EXPECT_GT(selected, 10.0 * std::abs(median));
}

TEST_F(HeadDetectionModelTest, RowsPerStepDoesNotChangeScores) {
  auto examples = LoadDetectionExamples(kExamples, /*max_examples=*/1);
  ASSERT_TRUE(examples.ok()) << examples.status().ToString();
  // A short prompt (the gold paragraph and two others), to keep the three runs quick.
  DetectionExample& ex = examples->front();
  const DetectionParagraph gold = ex.paragraphs[ex.gold_ids[0]];
  ex.paragraphs = {ex.paragraphs[ex.gold_ids[0] == 0 ? 1 : 0], gold,
                   ex.paragraphs[ex.gold_ids[0] == 2 ? 3 : 2]};
  ex.gold_ids = {1};
  HeadDetectionOptions one_row;
  one_row.rows_per_step = 1;
  one_row.prefill_chunk_tokens = 100;  // several prefix chunks, the last riding with the rows
  HeadDetectionOptions some_rows;
  some_rows.rows_per_step = 7;  // groups that do not divide the query span
  auto a = DetectRetrievalHeads(runner_, pool_.get(), *tokenizer_, *examples, one_row);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  auto b = DetectRetrievalHeads(runner_, pool_.get(), *tokenizer_, *examples, some_rows);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto all = DetectRetrievalHeads(runner_, pool_.get(), *tokenizer_, *examples);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  const auto by_head = [](const HeadDetectionResult& r) {
    std::map<std::pair<int, int>, double> m;
    for (const HeadScore& h : r.ranked) m[{h.layer, h.head}] = h.score;
    return m;
  };
  const auto ma = by_head(*a), mb = by_head(*b), mall = by_head(*all);
  double max_score = 0;
  for (const auto& [k, v] : ma) max_score = std::max(max_score, std::abs(v));
  ASSERT_GT(max_score, 0.0);
  for (const auto& [k, v] : ma) {
    EXPECT_NEAR(mb.at(k), v, 1e-5) << "layer " << k.first << " head " << k.second;
    EXPECT_NEAR(mall.at(k), v, 1e-5) << "layer " << k.first << " head " << k.second;
  }
}

TEST_F(HeadDetectionModelTest, PoolTooSmallIsResourceExhausted) {
  auto examples = LoadDetectionExamples(kExamples, 1);
  ASSERT_TRUE(examples.ok());
  KvPagePoolOptions o;
  o.page_size = 16;
  o.num_pages = 4;
  auto small = KvPagePool::Create(runner_->config(), o);
  ASSERT_TRUE(small.ok());
  auto r = DetectRetrievalHeads(runner_, small->get(), *tokenizer_, *examples);
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ((*small)->num_free(), (*small)->num_total());
}

}  // namespace
}  // namespace dysco
