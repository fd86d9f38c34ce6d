// Retrieval-head detection (QRHead, docs/dysco-reference-algorithm.md "Retrieval-head detection"):
// scores every (layer, query head) of a model by how much more its query-span attention lands on
// the gold paragraphs with the real question than with the question replaced by "N/A", and ranks
// the heads. The best ones become a package's config.json "dysco.selected_heads".
//
// The pieces are separate so that each can be tested alone: reading the JSONL examples, building
// one example's prompt with exact token spans, the per-paragraph score of a calibrated attention
// vector, the detection loop over a ModelRunner, and writing the heads into config.json.
//
// Thread-safety: free functions over their arguments. DetectRetrievalHeads steps the runner (which
// serialises its own steps) and allocates pages from the pool (thread-safe), so it may run beside
// other users of the same runner and pool; it is not itself parallel.
// Ownership: everything returned is a value owned by the caller; the runner, pool and tokenizer are
// borrowed for the call only. Pages taken from the pool are returned on every path. On failure
// nothing is returned and WriteSelectedHeads leaves config.json as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_config.h"
#include "core/model/model_runner.h"
#include "core/text/tokenizer.h"

namespace dysco {

struct DetectionParagraph {
  std::string title;
  std::string text;
};

// One detection example: {"question": str, "paragraphs": [{"title", "text"}], "gold_ids": [int]}
// with 0-based gold ids into paragraphs.
struct DetectionExample {
  std::string question;
  std::vector<DetectionParagraph> paragraphs;
  std::vector<int> gold_ids;
};

// Parses one JSONL line. INVALID_ARGUMENT naming the field for malformed JSON, a missing or
// mistyped field, no paragraphs, or a gold id out of range. An empty gold_ids is accepted (the
// example then scores 0 for every head, as in the reference).
StatusOr<DetectionExample> ParseDetectionExample(const std::string& line);

// Reads a JSONL file (blank lines skipped), at most `max_examples` examples when > 0. NOT_FOUND
// for a missing file; INVALID_ARGUMENT "<path>:<line>: <what>" for a bad line, or when the file
// has no example.
StatusOr<std::vector<DetectionExample>> LoadDetectionExamples(const std::string& path,
                                                              int64_t max_examples = 0);

// Token positions [begin, end) of the prompt.
struct TokenSpan {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

// Byte positions [begin, end) of the rendered prompt text.
struct ByteSpan {
  size_t begin = 0;
  size_t end = 0;
};

// One example's prompt. The user message is
//   "Here are some paragraphs:" \n\n "[1] title\ntext" \n\n ... \n\n "[n] title\ntext" \n\n
//   "Please find information that are relevant to the following query in the paragraphs above.
//   Query: {question}"
// (paragraphs numbered from 1 as in the reference code), rendered through the model's chat format
// as the only user message (the format's default system message included) WITHOUT the generation
// prompt; with chat format "none" the message is the prompt as is. A paragraph span covers
// "[i] title\ntext"; the query span runs from "Please find" to the end of the prompt (the chat
// format's end-of-message tokens included).
struct DetectionPrompt {
  std::string text;                // what was encoded (a prepended bos not included)
  std::vector<int32_t> token_ids;  // the whole prompt
  std::vector<TokenSpan> paragraph_spans;
  std::vector<ByteSpan> paragraph_bytes;  // in `text`
  TokenSpan query_span;                   // ends at token_ids.size()
  ByteSpan query_bytes;                   // ends at text.size()
  // Paragraph spans whose text boundary falls inside a token; such a span is widened to the
  // tokens that overlap the paragraph (as the reference's offset mapping does). 0 in practice:
  // paragraphs start with "[" and are followed by "\n\n", which pre-tokenizers split at.
  int inexact_spans = 0;
};

// Spans come from one encoding of the whole prompt: the raw bytes of its tokens
// (Tokenizer::TokenBytes), concatenated, must give back the prompt text exactly, so each token's
// byte range is known and a piece's token span is the tokens that start inside it. The query span
// must start exactly on a token boundary (INVALID_ARGUMENT otherwise), since the "N/A" prompt
// shares every token before it. Errors: INVALID_ARGUMENT when the tokenizer does not reproduce the
// text byte for byte (a normalizer changed it), FAILED_PRECONDITION from the chat format.
StatusOr<DetectionPrompt> BuildDetectionPrompt(const ModelConfig& config,
                                               const Tokenizer& tokenizer,
                                               const std::string& question,
                                               const std::vector<DetectionParagraph>& paragraphs);

// The QRHead score of one paragraph from its calibrated attention C_d (n entries): the sum of the
// entries strictly above mean(C_d) - 2 * std(C_d), std unbiased (n - 1). n == 0 gives 0; n == 1
// gives 0 (its one entry equals the mean, and the reference's NaN threshold masks it out).
double ParagraphScore(const double* calibrated, size_t n);

struct HeadScore {
  int layer = 0;
  int head = 0;  // query head
  double score = 0.0;
};

struct HeadDetectionOptions {
  int64_t prefill_chunk_tokens = 1024;
  // Query rows (of each of the two prompts) fed per step: 1 is the plain one-token-per-step
  // teacher forcing; more rows per step give the same numbers in fewer forwards. 0 = as many as
  // keep the returned probabilities (rows x layers x heads x prompt length, fp32) within
  // probs_budget_bytes.
  int64_t rows_per_step = 0;
  int64_t probs_budget_bytes = int64_t{256} << 20;
  std::string null_question = "N/A";
  // Called after each example (index from 0, count), e.g. for progress output; may be empty.
  std::function<void(int64_t, int64_t, const DetectionPrompt&)> on_example;
};

struct HeadDetectionResult {
  // Every (layer, query head) of the model, best first (ties: lower layer, then lower head).
  std::vector<HeadScore> ranked;
  int64_t num_examples = 0;
  int64_t num_prompt_tokens = 0;  // over all examples, question prompts only
  int inexact_spans = 0;          // over all examples
};

// Runs the detection over `examples`. Per example: the question prompt's tokens before the query
// span are computed once (their full pages are shared by the question and the "N/A" sequence);
// then every query-span token of both prompts is fed as a one-token sequence probing every (layer,
// query head), rows_per_step rows of each prompt per step batch; each query row's probabilities
// over the positions before the query span are averaged over the rows (S_q, S_null), C = S_q -
// S_null, and a head's example score is the sum of ParagraphScore over the gold paragraphs. A
// head's score is the mean over examples.
// INVALID_ARGUMENT for no examples, a prompt longer than the model's context or a bad span;
// RESOURCE_EXHAUSTED when the pool cannot hold one example (DetectionPagesNeeded); the runner's
// errors.
StatusOr<HeadDetectionResult> DetectRetrievalHeads(ModelRunner* runner, KvPagePool* pool,
                                                   const Tokenizer& tokenizer,
                                                   const std::vector<DetectionExample>& examples,
                                                   const HeadDetectionOptions& options = {});

// Pages a pool needs so that DetectRetrievalHeads can run `prompt` (question prompt) beside the
// "N/A" prompt of `null_tokens` tokens.
int64_t DetectionPagesNeeded(const DetectionPrompt& prompt, int64_t null_tokens, int page_size);

// Median of the scores (mean of the middle two for an even count); 0 for none.
double MedianHeadScore(const std::vector<HeadScore>& heads);

// Rewrites `package_dir`/config.json with "dysco.selected_heads" = `heads` (as [layer, head]
// pairs, in order) and "dysco.heads_source" = {"method": "qrhead", "data": data_name, "examples":
// num_examples}, keeping every other field and the order of the keys; lists of numbers are written
// on one line, as the exporter does. Written to a temporary file and renamed over the old one.
// NOT_FOUND / INVALID_ARGUMENT for a missing or unparsable config, INTERNAL when writing fails.
Status WriteSelectedHeads(const std::string& package_dir,
                          const std::vector<std::pair<int, int>>& heads,
                          const std::string& data_name, int64_t num_examples);

}  // namespace dysco
