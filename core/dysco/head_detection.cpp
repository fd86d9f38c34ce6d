#include "core/dysco/head_detection.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/text/chat_format.h"

namespace dysco {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr char kIntro[] = "Here are some paragraphs:";
constexpr char kInstruction[] =
    "Please find information that are relevant to the following query in the paragraphs above. "
    "Query: ";
constexpr char kSeparator[] = "\n\n";

Status ExampleError(const std::string& what) { return InvalidArgumentError(what); }

// Index of the token whose byte range [starts[i], starts[i+1]) contains `byte` (starts has one
// entry per token plus the total length).
int64_t TokenAt(const std::vector<size_t>& starts, size_t byte) {
  const auto it = std::upper_bound(starts.begin(), starts.end(), byte);
  return static_cast<int64_t>(it - starts.begin()) - 1;
}

// Rewrites every JSON array that holds only integers onto one line ("[1, 9690, 198]"), leaving
// strings untouched, so that the file reads like the exporter's (tools/dysco_export/package.py).
std::string CompactNumberLists(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) {
        out += text[++i];
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
      out += c;
      continue;
    }
    if (c == '[') {
      // An all-integer list has only digits, '-', ',' and whitespace before its ']'.
      size_t j = i + 1;
      bool numbers_only = true, any_digit = false;
      for (; j < text.size() && text[j] != ']'; ++j) {
        const char d = text[j];
        if (d >= '0' && d <= '9') {
          any_digit = true;
        } else if (d != '-' && d != ',' && d != ' ' && d != '\n' && d != '\t' && d != '\r') {
          numbers_only = false;
          break;
        }
      }
      if (numbers_only && any_digit && j < text.size()) {
        std::string item;
        std::vector<std::string> items;
        for (size_t k = i + 1; k < j; ++k) {
          const char d = text[k];
          if (d == ',') {
            items.push_back(item);
            item.clear();
          } else if (d == '-' || (d >= '0' && d <= '9')) {
            item += d;
          }
        }
        items.push_back(item);
        out += '[';
        for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + items[k];
        out += ']';
        i = j;
        continue;
      }
    }
    out += c;
  }
  return out;
}

}  // namespace

StatusOr<DetectionExample> ParseDetectionExample(const std::string& line) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    return ExampleError(std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) return ExampleError("not a JSON object");
  DetectionExample ex;
  const auto q = j.find("question");
  if (q == j.end() || !q->is_string()) return ExampleError("\"question\" must be a string");
  ex.question = q->get<std::string>();
  if (ex.question.empty()) return ExampleError("\"question\" is empty");
  const auto ps = j.find("paragraphs");
  if (ps == j.end() || !ps->is_array() || ps->empty()) {
    return ExampleError("\"paragraphs\" must be a non-empty array");
  }
  for (size_t i = 0; i < ps->size(); ++i) {
    const json& p = (*ps)[i];
    const std::string field = "paragraphs[" + std::to_string(i) + "]";
    if (!p.is_object()) return ExampleError(field + " must be an object");
    const auto title = p.find("title");
    const auto text = p.find("text");
    if (title == p.end() || !title->is_string()) {
      return ExampleError(field + ".title must be a string");
    }
    if (text == p.end() || !text->is_string())
      return ExampleError(field + ".text must be a string");
    ex.paragraphs.push_back({title->get<std::string>(), text->get<std::string>()});
  }
  const auto gold = j.find("gold_ids");
  if (gold == j.end() || !gold->is_array()) return ExampleError("\"gold_ids\" must be an array");
  for (size_t i = 0; i < gold->size(); ++i) {
    const json& g = (*gold)[i];
    const std::string field = "gold_ids[" + std::to_string(i) + "]";
    if (!g.is_number_integer()) return ExampleError(field + " must be an integer");
    const int64_t id = g.get<int64_t>();
    if (id < 0 || id >= static_cast<int64_t>(ex.paragraphs.size())) {
      return ExampleError(field + " = " + std::to_string(id) + " is not a paragraph index [0, " +
                          std::to_string(ex.paragraphs.size()) + ")");
    }
    if (std::find(ex.gold_ids.begin(), ex.gold_ids.end(), static_cast<int>(id)) !=
        ex.gold_ids.end()) {
      return ExampleError(field + " = " + std::to_string(id) + " is listed twice");
    }
    ex.gold_ids.push_back(static_cast<int>(id));
  }
  return ex;
}

StatusOr<std::vector<DetectionExample>> LoadDetectionExamples(const std::string& path,
                                                              int64_t max_examples) {
  std::ifstream in(path);
  if (!in) return NotFoundError(path + ": cannot open detection data");
  std::vector<DetectionExample> examples;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (max_examples > 0 && static_cast<int64_t>(examples.size()) >= max_examples) break;
    auto ex = ParseDetectionExample(line);
    if (!ex.ok()) {
      return InvalidArgumentError(path + ":" + std::to_string(line_no) + ": " +
                                  ex.status().message());
    }
    examples.push_back(std::move(ex).value());
  }
  if (in.bad()) return InternalError(path + ": read error");
  if (examples.empty()) return InvalidArgumentError(path + ": no detection examples");
  return examples;
}

StatusOr<DetectionPrompt> BuildDetectionPrompt(const ModelConfig& config,
                                               const Tokenizer& tokenizer,
                                               const std::string& question,
                                               const std::vector<DetectionParagraph>& paragraphs) {
  // The user message, with each piece's byte range in it.
  std::string message = kIntro;
  std::vector<ByteSpan> in_message;
  for (size_t i = 0; i < paragraphs.size(); ++i) {
    message += kSeparator;
    ByteSpan span;
    span.begin = message.size();
    message += "[" + std::to_string(i + 1) + "] " + paragraphs[i].title + "\n" + paragraphs[i].text;
    span.end = message.size();
    in_message.push_back(span);
  }
  message += kSeparator;
  const size_t query_in_message = message.size();
  message += kInstruction + question;

  DetectionPrompt p;
  const bool chat = config.chat_format != ChatFormat::kNone;
  if (chat) {
    DYSCO_ASSIGN_OR_RETURN(p.text, FormatChat(config.chat_format, config.chat, {{"user", message}},
                                              /*add_generation_prompt=*/false));
  } else {
    p.text = message;
  }
  // FormatChat copies the content verbatim except for llama3's whitespace trimming, which our
  // message (starting with "Here", ending with the question) only meets for a question that ends
  // in whitespace.
  const size_t offset = p.text.find(message);
  if (offset == std::string::npos) {
    return InvalidArgumentError(
        "the chat format changed the user message (does the question end with whitespace?)");
  }
  p.token_ids = tokenizer.Encode(p.text, /*parse_special=*/chat);
  size_t bos_bytes = 0;
  const auto& st = config.special_tokens;
  if (st.add_bos && st.bos_token_id &&
      (p.token_ids.empty() || p.token_ids.front() != *st.bos_token_id)) {
    p.token_ids.insert(p.token_ids.begin(), *st.bos_token_id);
    bos_bytes = tokenizer.TokenBytes(*st.bos_token_id).size();
  }
  // starts[i]: byte offset of token i in (prepended bos bytes + text); starts.back(): total.
  std::vector<size_t> starts;
  starts.reserve(p.token_ids.size() + 1);
  std::string decoded;
  for (const int32_t id : p.token_ids) {
    starts.push_back(decoded.size());
    decoded += tokenizer.TokenBytes(id);
  }
  starts.push_back(decoded.size());
  if (decoded.size() != bos_bytes + p.text.size() ||
      decoded.compare(bos_bytes, std::string::npos, p.text) != 0) {
    return InvalidArgumentError(
        "the tokenizer does not reproduce the prompt text byte for byte (a normalizer changed "
        "it), so paragraph token spans cannot be located");
  }
  const size_t base = bos_bytes + offset;  // byte offset of the message in `decoded`
  for (const ByteSpan& m : in_message) {
    const size_t b = base + m.begin, e = base + m.end;
    TokenSpan t;
    t.begin = TokenAt(starts, b);
    t.end = TokenAt(starts, e - 1) + 1;  // paragraphs are never empty ("[i] title\n")
    if (starts[t.begin] != b || starts[t.end] != e) ++p.inexact_spans;
    p.paragraph_spans.push_back(t);
    p.paragraph_bytes.push_back({offset + m.begin, offset + m.end});
  }
  const size_t q = base + query_in_message;
  p.query_span.begin = TokenAt(starts, q);
  p.query_span.end = static_cast<int64_t>(p.token_ids.size());
  if (starts[p.query_span.begin] != q) {
    return InvalidArgumentError(
        "the query span does not start on a token boundary (\"Please find\" merged with the "
        "text before it)");
  }
  p.query_bytes = {offset + query_in_message, p.text.size()};
  return p;
}

double ParagraphScore(const double* c, size_t n) {
  if (n < 2) return 0.0;
  double mean = 0.0;
  for (size_t i = 0; i < n; ++i) mean += c[i];
  mean /= static_cast<double>(n);
  double ss = 0.0;
  for (size_t i = 0; i < n; ++i) ss += (c[i] - mean) * (c[i] - mean);
  const double threshold = mean - 2.0 * std::sqrt(ss / static_cast<double>(n - 1));
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (c[i] > threshold) sum += c[i];
  }
  return sum;
}

int64_t DetectionPagesNeeded(const DetectionPrompt& prompt, int64_t null_tokens, int page_size) {
  const int64_t aligned = prompt.query_span.begin / page_size * page_size;
  const auto pages = [&](int64_t tokens) { return (tokens + page_size - 1) / page_size; };
  return pages(aligned) + pages(static_cast<int64_t>(prompt.token_ids.size()) - aligned) +
         pages(null_tokens - aligned);
}

double MedianHeadScore(const std::vector<HeadScore>& heads) {
  if (heads.empty()) return 0.0;
  std::vector<double> s;
  for (const HeadScore& h : heads) s.push_back(h.score);
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

StatusOr<HeadDetectionResult> DetectRetrievalHeads(ModelRunner* runner, KvPagePool* pool,
                                                   const Tokenizer& tokenizer,
                                                   const std::vector<DetectionExample>& examples,
                                                   const HeadDetectionOptions& options) {
  if (examples.empty()) return InvalidArgumentError("no detection examples");
  if (options.prefill_chunk_tokens < 1) {
    return InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  const ModelConfig& config = runner->config();
  const int num_heads = config.num_attention_heads;
  const int total_heads = config.num_layers * num_heads;
  const int page_size = pool->page_size();

  ForwardBatch batch;
  batch.kv_pool = pool;
  std::vector<std::pair<int, int>> all_heads;
  for (int l = 0; l < config.num_layers; ++l) {
    for (int h = 0; h < num_heads; ++h) all_heads.emplace_back(l, h);
  }

  HeadDetectionResult result;
  std::vector<double> totals(total_heads, 0.0);
  ForwardOutput out;
  for (size_t e = 0; e < examples.size(); ++e) {
    const DetectionExample& ex = examples[e];
    const std::string where = "example " + std::to_string(e) + ": ";
    auto built = BuildDetectionPrompt(config, tokenizer, ex.question, ex.paragraphs);
    if (!built.ok()) return InvalidArgumentError(where + built.status().message());
    auto built_null = BuildDetectionPrompt(config, tokenizer, options.null_question, ex.paragraphs);
    if (!built_null.ok()) return InvalidArgumentError(where + built_null.status().message());
    const DetectionPrompt& pq = *built;
    const DetectionPrompt& pn = *built_null;
    const int64_t qs = pq.query_span.begin;
    if (pn.query_span.begin != qs ||
        !std::equal(pq.token_ids.begin(), pq.token_ids.begin() + qs, pn.token_ids.begin())) {
      return InvalidArgumentError(where +
                                  "the question and \"N/A\" prompts differ before the query span");
    }
    const int64_t len_q = static_cast<int64_t>(pq.token_ids.size());
    const int64_t len_n = static_cast<int64_t>(pn.token_ids.size());
    if (std::max(len_q, len_n) > config.max_position_embeddings) {
      return InvalidArgumentError(where + "the prompt has " + std::to_string(len_q) +
                                  " tokens, more than the model's context of " +
                                  std::to_string(config.max_position_embeddings));
    }

    // The prefix [0, qs) is computed once, in the question sequence's pages; the "N/A" sequence
    // shares the full pages of it and recomputes only the partial last one in its own page, so
    // that no page is written by two sequences.
    const int64_t aligned = qs / page_size * page_size;
    PageList shared(pool), own_q(pool), own_n(pool);
    DYSCO_RETURN_IF_ERROR(shared.EnsureCapacity(aligned));
    DYSCO_RETURN_IF_ERROR(own_q.EnsureCapacity(len_q - aligned));
    DYSCO_RETURN_IF_ERROR(own_n.EnsureCapacity(len_n - aligned));
    std::vector<int32_t> pages_q = shared.ids(), pages_n = shared.ids();
    pages_q.insert(pages_q.end(), own_q.ids().begin(), own_q.ids().end());
    pages_n.insert(pages_n.end(), own_n.ids().begin(), own_n.ids().end());
    const auto sequence = [](const std::vector<int32_t>& tokens, int64_t from, int64_t to,
                             const std::vector<int32_t>& pages) {
      ForwardRow s;
      s.token_ids = ConstSpan<int32_t>(tokens.data() + from, static_cast<size_t>(to - from));
      s.start_position = from;
      s.page_ids = pages;
      return s;
    };

    // Prefix chunks but the last, which rides with the first query rows.
    int64_t pos = 0;
    batch.probe_heads.clear();
    for (; qs - pos > options.prefill_chunk_tokens; pos += options.prefill_chunk_tokens) {
      batch.sequences.assign(
          1, sequence(pq.token_ids, pos, pos + options.prefill_chunk_tokens, pages_q));
      DYSCO_RETURN_IF_ERROR(runner->Forward(batch, &out));
    }

    // Each query row is a one-token sequence (the model returns probabilities for the last new
    // token of each sequence only) over the pages of its prompt. Rows of one step see each other's
    // K/V, and the prefix tail's, because every layer writes all new tokens' K/V before any
    // attention (docs/model-interface.md), so a step of k rows computes exactly what k single-row
    // steps would; a test checks this against rows_per_step = 1.
    std::vector<double> sum_q(static_cast<size_t>(total_heads) * qs, 0.0);
    std::vector<double> sum_n(sum_q.size(), 0.0);
    const int64_t rows_q = len_q - qs, rows_n = len_n - qs;
    int64_t per_step = options.rows_per_step;
    if (per_step <= 0) {
      const int64_t row_bytes = int64_t{total_heads} * std::max(len_q, len_n) * 4;
      per_step = std::max<int64_t>(1, options.probs_budget_bytes / (2 * row_bytes));
    }
    batch.probe_heads = all_heads;
    for (int64_t r0 = 0; r0 < std::max(rows_q, rows_n); r0 += per_step) {
      batch.sequences.clear();
      std::vector<std::vector<double>*> sums;  // per sequence of the batch; null: not a row
      if (r0 == 0) {
        batch.sequences.push_back(sequence(pq.token_ids, pos, qs, pages_q));
        sums.push_back(nullptr);
        if (aligned < qs) {
          batch.sequences.push_back(sequence(pn.token_ids, aligned, qs, pages_n));
          sums.push_back(nullptr);
        }
      }
      for (int64_t r = r0; r < std::min(r0 + per_step, rows_q); ++r) {
        batch.sequences.push_back(sequence(pq.token_ids, qs + r, qs + r + 1, pages_q));
        sums.push_back(&sum_q);
      }
      for (int64_t r = r0; r < std::min(r0 + per_step, rows_n); ++r) {
        batch.sequences.push_back(sequence(pn.token_ids, qs + r, qs + r + 1, pages_n));
        sums.push_back(&sum_n);
      }
      DYSCO_RETURN_IF_ERROR(runner->Forward(batch, &out));
      if (out.num_probe_heads != total_heads || out.probs_len < qs) {
        return InternalError(where + "the model returned probabilities of the wrong shape");
      }
      for (size_t b = 0; b < sums.size(); ++b) {
        if (sums[b] == nullptr) continue;
        double* acc = sums[b]->data();
        for (int h = 0; h < total_heads; ++h) {
          const float* row = out.probs_row(static_cast<int64_t>(b), h);
          double* a = acc + static_cast<size_t>(h) * qs;
          for (int64_t j = 0; j < qs; ++j) a[j] += row[j];
        }
      }
    }

    // C = S_q - S_null on each gold paragraph, per head.
    std::vector<double> c;
    for (int h = 0; h < total_heads; ++h) {
      const double* aq = sum_q.data() + static_cast<size_t>(h) * qs;
      const double* an = sum_n.data() + static_cast<size_t>(h) * qs;
      double example_score = 0.0;
      for (const int d : ex.gold_ids) {
        const TokenSpan& span = pq.paragraph_spans[d];
        c.resize(static_cast<size_t>(span.size()));
        for (int64_t j = span.begin; j < span.end; ++j) {
          c[j - span.begin] =
              aq[j] / static_cast<double>(rows_q) - an[j] / static_cast<double>(rows_n);
        }
        example_score += ParagraphScore(c.data(), c.size());
      }
      totals[h] += example_score;
    }
    result.num_prompt_tokens += len_q;
    result.inexact_spans += pq.inexact_spans;
    if (options.on_example)
      options.on_example(static_cast<int64_t>(e), static_cast<int64_t>(examples.size()), pq);
  }

  result.num_examples = static_cast<int64_t>(examples.size());
  for (int i = 0; i < total_heads; ++i) {
    result.ranked.push_back({all_heads[i].first, all_heads[i].second,
                             totals[i] / static_cast<double>(result.num_examples)});
  }
  // all_heads is in (layer, head) order, so a stable sort breaks ties by lower layer, then head.
  std::stable_sort(result.ranked.begin(), result.ranked.end(),
                   [](const HeadScore& a, const HeadScore& b) { return a.score > b.score; });
  return result;
}

Status WriteSelectedHeads(const std::string& package_dir,
                          const std::vector<std::pair<int, int>>& heads,
                          const std::string& data_name, int64_t num_examples) {
  const std::string path = package_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return NotFoundError(path + ": cannot open");
  std::stringstream text;
  text << in.rdbuf();
  in.close();
  ordered_json config;
  try {
    config = ordered_json::parse(text.str());
  } catch (const ordered_json::exception& e) {
    return InvalidArgumentError(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!config.is_object()) return InvalidArgumentError(path + ": not a JSON object");
  ordered_json& dysco = config["dysco"];
  if (dysco.is_null()) dysco = ordered_json::object();
  if (!dysco.is_object()) return InvalidArgumentError(path + ": dysco must be an object");
  ordered_json pairs = ordered_json::array();
  for (const auto& [layer, head] : heads) pairs.push_back({layer, head});
  dysco["selected_heads"] = pairs;
  dysco["heads_source"] = {{"method", "qrhead"}, {"data", data_name}, {"examples", num_examples}};

  const std::string body = CompactNumberLists(config.dump(2)) + "\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return InternalError(tmp + ": cannot create");
    f << body;
    f.flush();
    if (!f) {
      f.close();
      std::remove(tmp.c_str());
      return InternalError(tmp + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return InternalError(path + ": cannot replace with " + tmp);
  }
  return OkStatus();
}

}  // namespace dysco
