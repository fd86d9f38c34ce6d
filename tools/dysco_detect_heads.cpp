// dysco-detect-heads: finds a model's retrieval heads (QRHead, core/dysco/head_detection.h) from a
// JSONL file of detection examples and prints the best ones:
//   rank layer head score      (the --num-heads best)
//   median_head_score=M best_over_median=R examples=N prompt_tokens=T seconds=S
// --scores-out writes every head's score as JSON; --write-config stores the selected heads in the
// package's config.json ("dysco.selected_heads", "dysco.heads_source").
// Bad flags or a bad data line: a message on stderr and exit code 2. Other failures: the Status on
// stderr and exit code 1.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dysco/head_detection.h"
#include "core/engine/engine.h"
#include "core/model/kv_page_pool.h"
#include "tools/cli_args.h"

namespace {

const char kUsage[] =
    "usage: dysco-detect-heads --model DIR --data FILE.jsonl [--num-heads 16] [--max-examples N]\n"
    "         [--write-config] [--scores-out FILE.json] [--threads N] [--rows-per-step N]\n";

const dysco::cli::CommandLine kCli("dysco-detect-heads", kUsage);

struct Flags {
  std::string model;
  std::string data;
  int num_heads = 16;
  int64_t max_examples = 0;  // 0 = all
  bool write_config = false;
  std::string scores_out;
  int threads = 0;
  int64_t rows_per_step = 0;  // 0 = automatic (HeadDetectionOptions)
};

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    kCli.ExitIfHelp(flag);
    if (flag == "--write-config") {
      f.write_config = true;
      continue;
    }
    const std::string value = kCli.TakeValue(argc, argv, &i);
    if (flag == "--model") {
      f.model = value;
    } else if (flag == "--data") {
      f.data = value;
    } else if (flag == "--num-heads") {
      f.num_heads = static_cast<int>(kCli.ParseInt(flag, value, 1, 1 << 20));
    } else if (flag == "--max-examples") {
      f.max_examples = kCli.ParseInt(flag, value, 1, 1LL << 40);
    } else if (flag == "--scores-out") {
      f.scores_out = value;
    } else if (flag == "--threads") {
      f.threads = static_cast<int>(kCli.ParseInt(flag, value, 1, 1024));
    } else if (flag == "--rows-per-step") {
      f.rows_per_step = kCli.ParseInt(flag, value, 0, 1 << 20);
    } else {
      kCli.Die("unknown flag " + flag);
    }
  }
  if (f.model.empty()) kCli.Die("--model is required");
  if (f.data.empty()) kCli.Die("--data is required");
  return f;
}

int Fail(const dysco::Status& s) {
  std::cerr << "dysco-detect-heads: " << s.ToString() << "\n";
  return 1;
}

std::string Basename(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  const auto t0 = std::chrono::steady_clock::now();

  auto examples = dysco::LoadDetectionExamples(flags.data, flags.max_examples);
  if (!examples.ok()) {
    // A bad line is a usage error (exit 2), like a bad flag; a missing file too.
    std::cerr << "dysco-detect-heads: " << examples.status().message() << "\n";
    return 2;
  }

  // The engine's own pool is a single page: the detection sizes one for its largest example.
  dysco::EngineOptions engine_options;
  engine_options.runner.num_threads = flags.threads;
  engine_options.kv_pages = 1;
  engine_options.start_scheduler = false;
  auto engine = dysco::Engine::Load(flags.model, engine_options);
  if (!engine.ok()) return Fail(engine.status());
  const dysco::ModelConfig& config = (*engine)->config();
  const dysco::Tokenizer* tokenizer = &(*engine)->tokenizer();
  const int total_heads = config.num_layers * config.num_attention_heads;
  if (flags.num_heads > total_heads) {
    kCli.Die("--num-heads " + std::to_string(flags.num_heads) + " is more than the model's " +
             std::to_string(total_heads) + " heads");
  }

  // A pool just big enough for the largest example (its two sequences), so no memory is zeroed for
  // the whole context.
  dysco::KvPagePoolOptions pool_options;
  int64_t pages = 1;
  for (size_t e = 0; e < examples->size(); ++e) {
    const auto& ex = (*examples)[e];
    auto pq = dysco::BuildDetectionPrompt(config, *tokenizer, ex.question, ex.paragraphs);
    auto pn = dysco::BuildDetectionPrompt(config, *tokenizer, "N/A", ex.paragraphs);
    if (!pq.ok() || !pn.ok()) {
      return Fail(dysco::InvalidArgumentError(flags.data + ": example " + std::to_string(e) + ": " +
                                              (pq.ok() ? pn.status() : pq.status()).message()));
    }
    pages =
        std::max(pages, dysco::DetectionPagesNeeded(*pq, static_cast<int64_t>(pn->token_ids.size()),
                                                    pool_options.page_size));
  }
  pool_options.num_pages = pages;
  auto pool = dysco::KvPagePool::Create(config, pool_options);
  if (!pool.ok()) return Fail(pool.status());

  dysco::HeadDetectionOptions options;
  options.rows_per_step = flags.rows_per_step;
  options.on_example = [&](int64_t i, int64_t n, const dysco::DetectionPrompt& p) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "example %lld/%lld: %zu tokens (query %lld), %.1f s\n",
                 static_cast<long long>(i + 1), static_cast<long long>(n), p.token_ids.size(),
                 static_cast<long long>(p.query_span.size()), s);
  };
  auto result = dysco::DetectRetrievalHeads(&(*engine)->runner(), pool->get(), *tokenizer,
                                            *examples, options);
  if (!result.ok()) return Fail(result.status());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const double median = dysco::MedianHeadScore(result->ranked);
  std::vector<std::pair<int, int>> selected;
  double selected_mean = 0.0;
  std::printf("%4s %5s %4s %10s\n", "rank", "layer", "head", "score");
  for (int i = 0; i < flags.num_heads; ++i) {
    const dysco::HeadScore& h = result->ranked[i];
    selected.emplace_back(h.layer, h.head);
    selected_mean += h.score / flags.num_heads;
    std::printf("%4d %5d %4d %10.5f\n", i + 1, h.layer, h.head, h.score);
  }
  const double best = result->ranked.front().score;
  char ratio[32] = "n/a";  // a ratio to a median <= 0 means nothing
  if (median > 0) std::snprintf(ratio, sizeof(ratio), "%.2f", best / median);
  std::printf(
      "median_head_score=%.5f best_over_median=%s selected_mean=%.5f examples=%lld "
      "prompt_tokens=%lld seconds=%.1f\n",
      median, ratio, selected_mean, static_cast<long long>(result->num_examples),
      static_cast<long long>(result->num_prompt_tokens), seconds);
  if (result->inexact_spans > 0) {
    std::fprintf(stderr, "note: %d paragraph spans did not fall on token boundaries (widened)\n",
                 result->inexact_spans);
  }

  if (!flags.scores_out.empty()) {
    nlohmann::ordered_json j;
    j["model"] = config.model_name;
    j["data"] = Basename(flags.data);
    j["examples"] = result->num_examples;
    j["median"] = median;
    nlohmann::ordered_json ranked = nlohmann::ordered_json::array();
    for (const dysco::HeadScore& h : result->ranked) {
      ranked.push_back({{"layer", h.layer}, {"head", h.head}, {"score", h.score}});
    }
    j["heads"] = ranked;
    std::ofstream f(flags.scores_out);
    f << j.dump(1) << "\n";
    if (!f) return Fail(dysco::InternalError(flags.scores_out + ": write failed"));
  }
  if (flags.write_config) {
    const dysco::Status s = dysco::WriteSelectedHeads(flags.model, selected, Basename(flags.data),
                                                      result->num_examples);
    if (!s.ok()) return Fail(s);
    std::fprintf(stderr, "wrote %zu heads to %s/config.json\n", selected.size(),
                 flags.model.c_str());
  }
  return 0;
}
