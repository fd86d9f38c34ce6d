// dysco-generate: generates one completion for a prompt with a model package, streaming the text to
// stdout as it is produced, then one summary line:
//   prompt_tokens=N generated_tokens=M tokens_per_second=X.X finish_reason=stop|length|stop_string
// tokens_per_second is the decode rate: tokens after the first over the time after the first.
// With --dysco the decoding is DySCO (docs/dysco.md); --trace FILE writes its trace, one JSON line
// per DySCO step.
//
// --batch-file FILE.jsonl runs every line together, as one batch through the BatchStepper, and
// prints one JSON line per sequence: {"index": i, "generated_ids": [...], "finish_reason": "..."}.
// A line: {"prompt_ids": [...], "max_new_tokens": N, "dysco": {"enabled": true, "top_p": 0.9,
// "selected_heads": [[1, 0]], ...any DySCO parameter of docs/dysco.md...}, "trace": "path",
// "trace_full": false}; everything but prompt_ids is optional (max_new_tokens defaults to
// --max-new-tokens, else 16).
// Bad flags: a message on stderr and exit code 2. Other failures: the Status on stderr and exit
// code 1.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dysco/params.h"
#include "core/engine/batch_stepper.h"
#include "core/engine/engine.h"
#include "core/engine/step_plan.h"
#include "tools/cli_args.h"

namespace {

const char kUsage[] =
    "usage: dysco-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N\n"
    "         [--chat] [--system TEXT]\n"
    "         [--temperature T] [--top-k K] [--top-p P] [--seed S] [--repetition-penalty R]\n"
    "         [--stop STR]... [--threads N] [--kv-pages N | --kv-cache-fraction F] [--page-size "
    "N]\n"
    "         [--prefill-chunk N] [--device cpu|cuda:0] [--no-cuda-graphs]\n"
    "         [--dysco [--dysco-heads L:H,L:H] [--dysco-top-p P] [--dysco-top-k K]\n"
    "          [--dysco-strength S] [--dysco-decay D] [--dysco-context-warmup N]\n"
    "          [--dysco-intervention-warmup N|auto] [--dysco-static] [--trace FILE "
    "[--trace-full]]]\n"
    "       dysco-generate --model DIR --batch-file FILE.jsonl [--max-new-tokens N] [--threads N]\n"
    "         [--kv-pages N | --kv-cache-fraction F] [--page-size N] [--prefill-chunk N]\n"
    "         [--device cpu|cuda:0] [--no-cuda-graphs]\n"
    "  --dysco-top-p 0 / --dysco-top-k 0 unset that limit.\n"
    "  The KV pool holds just the pages the run needs, unless --kv-pages N (exactly N) or, on a\n"
    "  CUDA device, --kv-cache-fraction F (F in (0, 0.95] of the memory free after the model "
    "loads).\n"
    "  --prefill-chunk defaults to 512 on cpu, 8192 on cuda.\n";

const dysco::cli::CommandLine kCli("dysco-generate", kUsage);

struct Flags {
  std::string model;
  std::string prompt;
  bool has_prompt = false;
  bool chat = false;
  std::string system;
  bool has_system = false;
  int64_t max_new_tokens = -1;
  dysco::SamplingParams sampling;
  std::vector<std::string> stops;
  int threads = 0;
  std::string device = "cpu";      // the model's and the KV cache's torch device
  bool cuda_graphs = true;         // decode steps on CUDA replay CUDA graphs (--no-cuda-graphs: eager)
  int64_t kv_pages = 0;            // 0: enough for prompt + max_new_tokens
  double kv_cache_fraction = 0.0;  // > 0 (cuda): this fraction of the free device memory
  int page_size = 16;
  int64_t prefill_chunk = 0;  // 0: 512 on cpu, 8192 on cuda (a GPU step costs about the same)
  std::vector<int32_t> prompt_ids;
  bool dysco = false;
  dysco::DyscoOverrides dysco_overrides;
  std::string trace;
  bool trace_full = false;
  std::string batch_file;
};

std::vector<std::string> SplitCommas(const std::string& value) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t comma = value.find(',', start);
    parts.push_back(value.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return parts;
}

std::vector<int32_t> ParseIds(const std::string& flag, const std::string& value) {
  std::vector<int32_t> ids;
  for (const std::string& part : SplitCommas(value)) {
    ids.push_back(
        static_cast<int32_t>(kCli.ParseInt(flag, part, 0, std::numeric_limits<int32_t>::max())));
  }
  return ids;
}

// "12:3,14:0" -> (layer, query head) pairs.
std::vector<std::pair<int, int>> ParseHeads(const std::string& flag, const std::string& value) {
  std::vector<std::pair<int, int>> heads;
  for (const std::string& part : SplitCommas(value)) {
    const size_t colon = part.find(':');
    if (colon == std::string::npos)
      kCli.Die(flag + " needs LAYER:HEAD pairs, got \"" + part + "\"");
    heads.emplace_back(static_cast<int>(kCli.ParseInt(flag, part.substr(0, colon), 0, 1 << 20)),
                       static_cast<int>(kCli.ParseInt(flag, part.substr(colon + 1), 0, 1 << 20)));
  }
  return heads;
}

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    kCli.ExitIfHelp(flag);
    if (flag == "--chat") {
      f.chat = true;
      continue;
    }
    if (flag == "--dysco") {
      f.dysco = true;
      continue;
    }
    if (flag == "--dysco-static") {
      f.dysco_overrides.dynamic_rescale = false;
      continue;
    }
    if (flag == "--trace-full") {
      f.trace_full = true;
      continue;
    }
    if (flag == "--no-cuda-graphs") {
      f.cuda_graphs = false;
      continue;
    }
    const std::string value = kCli.TakeValue(argc, argv, &i);
    if (flag == "--model") {
      f.model = value;
    } else if (flag == "--prompt") {
      f.prompt = value;
      f.has_prompt = true;
    } else if (flag == "--system") {
      f.system = value;
      f.has_system = true;
    } else if (flag == "--max-new-tokens") {
      f.max_new_tokens = kCli.ParseInt(flag, value, 1, kIntMax);
    } else if (flag == "--temperature") {
      f.sampling.temperature = kCli.ParseDouble(flag, value);
    } else if (flag == "--top-k") {
      f.sampling.top_k = static_cast<int>(kCli.ParseInt(flag, value, 0, kIntMax));
    } else if (flag == "--top-p") {
      f.sampling.top_p = kCli.ParseDouble(flag, value);
    } else if (flag == "--seed") {
      f.sampling.seed = kCli.ParseUint(flag, value);
    } else if (flag == "--repetition-penalty") {
      f.sampling.repetition_penalty = kCli.ParseDouble(flag, value);
    } else if (flag == "--stop") {
      if (value.empty()) kCli.Die("--stop needs a non-empty string");
      f.stops.push_back(value);
    } else if (flag == "--threads") {
      f.threads = static_cast<int>(kCli.ParseInt(flag, value, 1, 1024));
    } else if (flag == "--device") {
      if (value.empty()) kCli.Die("--device needs a torch device (cpu, cuda:0)");
      f.device = value;
    } else if (flag == "--kv-pages") {
      f.kv_pages = kCli.ParseInt(flag, value, 1, kIntMax - 1);
    } else if (flag == "--kv-cache-fraction") {
      f.kv_cache_fraction = kCli.ParseDouble(flag, value);
      if (!(f.kv_cache_fraction > 0.0 && f.kv_cache_fraction <= 0.95)) {
        kCli.Die(flag + " needs a fraction in (0, 0.95], got " + value);
      }
    } else if (flag == "--page-size") {
      f.page_size = static_cast<int>(kCli.ParseInt(flag, value, 1, 4096));
    } else if (flag == "--prefill-chunk") {
      f.prefill_chunk = kCli.ParseInt(flag, value, 1, kIntMax);
    } else if (flag == "--prompt-ids") {
      f.prompt_ids = ParseIds(flag, value);
    } else if (flag == "--batch-file") {
      f.batch_file = value;
    } else if (flag == "--trace") {
      f.trace = value;
    } else if (flag == "--dysco-heads") {
      f.dysco_overrides.selected_heads = ParseHeads(flag, value);
    } else if (flag == "--dysco-top-p") {
      f.dysco_overrides.top_p = kCli.ParseDouble(flag, value);
    } else if (flag == "--dysco-top-k") {
      f.dysco_overrides.top_k = kCli.ParseInt(flag, value, 0, kIntMax);
    } else if (flag == "--dysco-strength") {
      f.dysco_overrides.strength = kCli.ParseDouble(flag, value);
    } else if (flag == "--dysco-decay") {
      f.dysco_overrides.decay_factor = kCli.ParseDouble(flag, value);
    } else if (flag == "--dysco-context-warmup") {
      f.dysco_overrides.context_warmup_steps =
          static_cast<int>(kCli.ParseInt(flag, value, 0, kIntMax));
    } else if (flag == "--dysco-intervention-warmup") {
      f.dysco_overrides.intervention_warmup =
          value == "auto" ? -1 : static_cast<int>(kCli.ParseInt(flag, value, 0, kIntMax));
    } else {
      kCli.Die("unknown flag " + flag);
    }
  }
  if (f.model.empty()) kCli.Die("--model is required");
  const bool cuda = f.device.rfind("cuda", 0) == 0;
  if (f.kv_cache_fraction > 0.0 && f.kv_pages > 0) {
    kCli.Die("--kv-pages and --kv-cache-fraction are alternatives: give one");
  }
  if (f.kv_cache_fraction > 0.0 && !cuda) {
    kCli.Die(
        "--kv-cache-fraction sizes the KV pool from a CUDA device's free memory; --device is " +
        f.device + " (use --kv-pages)");
  }
  if (f.prefill_chunk == 0) f.prefill_chunk = cuda ? 8192 : 512;
  if (!f.batch_file.empty()) {
    if (f.has_prompt || !f.prompt_ids.empty() || f.dysco || !f.trace.empty() || f.chat) {
      kCli.Die("--batch-file takes its prompts, DySCO settings and traces from the file");
    }
    return f;
  }
  if (f.has_prompt == !f.prompt_ids.empty())
    kCli.Die("exactly one of --prompt and --prompt-ids is required");
  if (!f.prompt_ids.empty() && f.chat) kCli.Die("--prompt-ids is used as is: no --chat");
  if (f.max_new_tokens < 0) kCli.Die("--max-new-tokens is required");
  if (!f.trace.empty() && !f.dysco) kCli.Die("--trace needs --dysco");
  if (f.trace_full && f.trace.empty()) kCli.Die("--trace-full needs --trace");
  if (f.has_system && !f.chat) kCli.Die("--system needs --chat");
  const dysco::Status s = f.sampling.Validate();
  if (!s.ok()) kCli.Die(s.message());
  return f;
}

int Fail(const dysco::Status& s) {
  std::cerr << "dysco-generate: " << s.ToString() << "\n";
  return 1;
}

dysco::Status WriteTrace(const std::string& path,
                         const std::vector<dysco::DyscoTraceRecord>& records) {
  std::ofstream out(path);
  if (!out) return dysco::InvalidArgumentError(path + ": cannot open for writing");
  for (const auto& r : records) out << dysco::DyscoTraceRecordToJson(r) << "\n";
  out.close();
  if (!out) return dysco::InternalError(path + ": write failed");
  return dysco::OkStatus();
}

// The "dysco" object of a batch-file line: {"enabled": bool, <parameter>: value, ...}.
dysco::Status ParseDyscoObject(const nlohmann::json& j, const std::string& where, bool* enabled,
                               dysco::DyscoOverrides* o) {
  using dysco::InvalidArgumentError;
  if (!j.is_object()) return InvalidArgumentError(where + ": dysco must be an object");
  try {
    *enabled = j.value("enabled", true);
    for (const auto& [key, v] : j.items()) {
      if (key == "enabled") {
      } else if (key == "selected_heads") {
        o->selected_heads = v.get<std::vector<std::pair<int, int>>>();
      } else if (key == "top_p") {
        o->top_p = v.is_null() ? 0.0 : v.get<double>();
      } else if (key == "top_k") {
        o->top_k = v.is_null() ? 0 : v.get<int64_t>();
      } else if (key == "strength") {
        o->strength = v.get<double>();
      } else if (key == "decay_factor") {
        o->decay_factor = v.get<double>();
      } else if (key == "context_warmup_steps") {
        o->context_warmup_steps = v.get<int>();
      } else if (key == "intervention_warmup") {
        o->intervention_warmup =
            v.is_string() && v.get<std::string>() == "auto" ? -1 : v.get<int>();
      } else if (key == "dynamic_rescale") {
        o->dynamic_rescale = v.get<bool>();
      } else if (key == "template_sequences") {
        o->template_sequences = v.get<std::vector<std::vector<int32_t>>>();
      } else {
        return InvalidArgumentError(where + ": unknown dysco field \"" + key + "\"");
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgumentError(where + ": dysco: " + e.what());
  }
  return dysco::OkStatus();
}

struct BatchLine {
  std::vector<int32_t> prompt_ids;
  int64_t max_new_tokens = 16;
  bool dysco = false;
  dysco::DyscoOverrides overrides;
  std::string trace;
  bool trace_full = false;
};

dysco::StatusOr<std::vector<BatchLine>> ReadBatchFile(const std::string& path,
                                                      int64_t default_max_new_tokens) {
  using dysco::InvalidArgumentError;
  std::ifstream in(path);
  if (!in) return dysco::NotFoundError(path + ": cannot open");
  std::vector<BatchLine> lines;
  std::string text;
  for (int number = 1; std::getline(in, text); ++number) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(number);
    BatchLine line;
    line.max_new_tokens = default_max_new_tokens > 0 ? default_max_new_tokens : 16;
    try {
      const nlohmann::json j = nlohmann::json::parse(text);
      line.prompt_ids = j.at("prompt_ids").get<std::vector<int32_t>>();
      if (j.contains("max_new_tokens")) line.max_new_tokens = j["max_new_tokens"].get<int64_t>();
      if (j.contains("trace")) line.trace = j["trace"].get<std::string>();
      if (j.contains("trace_full")) line.trace_full = j["trace_full"].get<bool>();
      if (j.contains("dysco") && !j["dysco"].is_null()) {
        DYSCO_RETURN_IF_ERROR(ParseDyscoObject(j["dysco"], where, &line.dysco, &line.overrides));
      }
    } catch (const nlohmann::json::exception& e) {
      return InvalidArgumentError(where + ": " + e.what());
    }
    if (line.prompt_ids.empty()) return InvalidArgumentError(where + ": prompt_ids is empty");
    if (line.max_new_tokens < 1)
      return InvalidArgumentError(where + ": max_new_tokens must be >= 1");
    if (!line.trace.empty() && !line.dysco) {
      return InvalidArgumentError(where + ": a trace needs dysco enabled");
    }
    lines.push_back(std::move(line));
  }
  if (lines.empty()) return InvalidArgumentError(path + ": no sequences");
  return lines;
}

// The engine of the tools: runner, tokenizer and factory, no scheduler thread. Its own pool is a
// single page: each run sizes a pool for what it generates (RequestPool), since sizing the cache
// for the whole context would allocate (and zero) memory the run never touches.
dysco::StatusOr<std::unique_ptr<dysco::Engine>> LoadEngine(const Flags& flags) {
  dysco::EngineOptions options;
  options.runner.num_threads = flags.threads;
  options.runner.device = flags.device;
  options.runner.cuda_graphs = flags.cuda_graphs;
  options.page_size = flags.page_size;
  options.kv_pages = 1;
  options.start_scheduler = false;
  options.limits.max_new_tokens_default = 16;
  options.limits.max_new_tokens_limit = std::numeric_limits<int32_t>::max();
  return dysco::Engine::Load(flags.model, options);
}

// A pool of --kv-pages pages, or of just enough pages for `tokens` tokens of each sequence.
dysco::StatusOr<std::unique_ptr<dysco::KvPagePool>> RequestPool(
    const Flags& flags, const dysco::ModelConfig& config, const std::vector<int64_t>& tokens) {
  dysco::KvPagePoolOptions options;
  options.page_size = flags.page_size;
  options.device = flags.device;  // the runner's: ModelRunner::Forward refuses a pool elsewhere
  options.num_pages = flags.kv_pages;
  options.memory_fraction = flags.kv_cache_fraction;
  if (options.num_pages == 0 && options.memory_fraction == 0.0) {
    for (int64_t n : tokens) {
      n = std::min<int64_t>(n, config.max_position_embeddings);
      options.num_pages += (n + flags.page_size - 1) / flags.page_size;
    }
  }
  return dysco::KvPagePool::Create(config, options);
}

// Runs every line of the batch file together (PlanStep -> BatchStepper::Execute) until all are
// finished.
int RunBatch(const Flags& flags, dysco::Engine& engine) {
  auto lines = ReadBatchFile(flags.batch_file, flags.max_new_tokens);
  if (!lines.ok()) return Fail(lines.status());
  std::vector<int64_t> tokens;
  for (const BatchLine& l : *lines) {
    tokens.push_back(static_cast<int64_t>(l.prompt_ids.size()) + l.max_new_tokens);
  }
  auto pool = RequestPool(flags, engine.config(), tokens);
  if (!pool.ok()) return Fail(pool.status());

  std::vector<std::unique_ptr<dysco::Sequence>> seqs;
  for (size_t i = 0; i < lines->size(); ++i) {
    const BatchLine& l = (*lines)[i];
    dysco::GenerateRequest request;
    request.prompt_token_ids = l.prompt_ids;
    request.max_new_tokens = l.max_new_tokens;
    request.sampling = flags.sampling;
    request.dysco = l.dysco;
    request.dysco_overrides = l.overrides;
    if (!l.trace.empty()) {
      request.dysco_trace =
          l.trace_full ? dysco::DyscoTraceMode::kFull : dysco::DyscoTraceMode::kSteps;
    }
    auto seq = engine.factory().Create(request, pool->get());
    if (!seq.ok()) {
      return Fail(dysco::Status(seq.status().code(),
                                "line " + std::to_string(i) + ": " + seq.status().message()));
    }
    seqs.push_back(std::move(seq).value());
  }

  dysco::BatchStepper stepper(&engine.runner(), pool->get());
  // Every sequence prefills up to --prefill-chunk tokens a step, with no budget across them.
  const dysco::StepBudget budget{flags.prefill_chunk, std::numeric_limits<int64_t>::max() / 2};
  dysco::StepOutcome outcome;
  while (true) {
    std::vector<dysco::Sequence*> running;
    for (auto& s : seqs) {
      if (!s->finished()) running.push_back(s.get());
    }
    if (running.empty()) break;
    const dysco::Status st = stepper.Execute(dysco::PlanStep(running, budget), &outcome);
    if (!st.ok()) return Fail(st);
    for (dysco::Sequence* s : running) {
      if (s->finished()) s->ReleasePages();
    }
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const BatchLine& l = (*lines)[i];
    if (!l.trace.empty()) {
      const dysco::Status st = WriteTrace(l.trace, seqs[i]->dysco()->trace());
      if (!st.ok()) return Fail(st);
    }
    nlohmann::ordered_json out;
    out["index"] = i;
    out["generated_ids"] = seqs[i]->generated_ids();
    out["finish_reason"] = dysco::FinishReasonName(seqs[i]->finish_reason());
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  auto engine = LoadEngine(flags);
  if (!engine.ok()) return Fail(engine.status());
  if (!flags.batch_file.empty()) return RunBatch(flags, **engine);

  dysco::GenerateRequest request;
  if (!flags.prompt_ids.empty()) {
    request.prompt_token_ids = flags.prompt_ids;
  } else if (flags.chat) {
    if (flags.has_system) request.messages.push_back({"system", flags.system});
    request.messages.push_back({"user", flags.prompt});
  } else {
    request.prompt = flags.prompt;
  }
  request.max_new_tokens = flags.max_new_tokens;
  request.sampling = flags.sampling;
  request.stop_strings = flags.stops;
  request.dysco = flags.dysco;
  request.dysco_overrides = flags.dysco_overrides;
  if (!flags.trace.empty()) {
    request.dysco_trace =
        flags.trace_full ? dysco::DyscoTraceMode::kFull : dysco::DyscoTraceMode::kSteps;
  }
  const dysco::SequenceFactory& factory = (*engine)->factory();
  std::vector<int64_t> tokens;
  if (flags.kv_pages == 0 && flags.kv_cache_fraction == 0.0) {
    auto prompt = factory.BuildPrompt(request);
    if (!prompt.ok()) return Fail(prompt.status());
    tokens.push_back(static_cast<int64_t>(prompt->size()) + flags.max_new_tokens);
  }
  auto pool = RequestPool(flags, (*engine)->config(), tokens);
  if (!pool.ok()) return Fail(pool.status());

  dysco::GeneratorOptions generator_options;
  generator_options.prefill_chunk_tokens = flags.prefill_chunk;
  dysco::Generator generator(&(*engine)->runner(), pool->get(), &factory, generator_options);
  auto result = generator.Generate(request, [](const dysco::TokenDelta& delta) {
    if (!delta.text.empty()) {
      std::fwrite(delta.text.data(), 1, delta.text.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (!result.ok()) {
    std::fputc('\n', stdout);
    return Fail(result.status());
  }
  if (!flags.trace.empty()) {
    const dysco::Status st = WriteTrace(flags.trace, result->dysco_trace);
    if (!st.ok()) return Fail(st);
  }
  const double rate = result->generated_tokens > 1 && result->decode_seconds > 0
                          ? (result->generated_tokens - 1) / result->decode_seconds
                          : 0.0;
  std::printf(
      "\nprompt_tokens=%lld generated_tokens=%lld tokens_per_second=%.1f finish_reason=%s\n",
      static_cast<long long>(result->prompt_tokens),
      static_cast<long long>(result->generated_tokens), rate,
      dysco::FinishReasonName(result->finish_reason));
  return 0;
}
