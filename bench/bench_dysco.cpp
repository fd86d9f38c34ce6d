// bench-dysco: per-token decode time with DySCO against plain decoding, same model, same prompt,
// same run (batch 1, through the BatchStepper as the server runs it). A DySCO generation step is
// broken down into its speculative pass (layers 0..deepest head layer), select (relevance update,
// selection, bias), real pass and sampling; the last column is the overhead ratio dysco / plain.
//
// usage: bench-dysco --model DIR [--prompt-tokens 512,2048] [--decode-tokens N] [--threads N]
//                    [--dysco-heads L:H,L:H] [--rounds R]
//   Heads: the package's, else four from the middle layers. Prompts are random token ids (fixed
//   seed). Each round measures plain then DySCO; the medians over all measured tokens are printed.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dysco/params.h"
#include "core/engine/batch_stepper.h"
#include "core/engine/engine.h"
#include "core/engine/step_plan.h"

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Usage(const std::string& message) {
  std::cerr << "bench-dysco: " << message
            << "\nusage: bench-dysco --model DIR [--prompt-tokens 512,2048] [--decode-tokens N] "
               "[--threads N] [--dysco-heads L:H,L:H] [--rounds R]\n";
  std::exit(2);
}

int64_t ParsePositive(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  const long long x = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || x <= 0 || x > 10000000) {
    Usage(flag + " needs a positive integer, got \"" + value + "\"");
  }
  return x;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p - start));
    if (p == std::string::npos) return out;
    start = p + 1;
  }
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct TokenTimes {
  std::vector<double> total, spec, select, real, sample;
};

// Generates decode_tokens + 1 tokens; records the steps that fed a generated token.
dysco::Status Measure(dysco::Engine& engine, const std::vector<int32_t>& prompt,
                      int64_t decode_tokens, const dysco::DyscoOverrides* dysco, TokenTimes* out) {
  dysco::GenerateRequest request;
  request.prompt_token_ids = prompt;
  request.max_new_tokens = decode_tokens + 1;
  request.ignore_eos = true;  // fixed length
  request.dysco = dysco != nullptr;
  if (dysco != nullptr) request.dysco_overrides = *dysco;
  DYSCO_ASSIGN_OR_RETURN(std::unique_ptr<dysco::Sequence> owned,
                         engine.factory().Create(request, &engine.pool()));
  dysco::Sequence& seq = *owned;
  DYSCO_RETURN_IF_ERROR(seq.ReservePages(seq.max_cached_tokens()));
  dysco::BatchStepper stepper(&engine.runner(), &engine.pool());
  const dysco::StepBudget budget{512, 512};
  dysco::StepOutcome outcome;
  while (!seq.finished()) {
    const bool generated_token = seq.num_cached() >= static_cast<int64_t>(prompt.size());
    const auto t0 = Clock::now();
    DYSCO_RETURN_IF_ERROR(stepper.Execute(dysco::PlanStep({&seq}, budget), &outcome));
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!generated_token) continue;
    const dysco::DyscoStepTimings& t = outcome.timings;
    out->total.push_back(dt);
    out->spec.push_back(t.speculative_seconds);
    out->select.push_back(t.select_seconds);
    out->real.push_back(t.real_seconds);
    out->sample.push_back(t.sample_seconds);
  }
  return dysco::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  std::vector<int64_t> lengths{512, 2048};
  int64_t decode_tokens = 24;
  int threads = 0;
  int64_t rounds = 2;
  std::vector<std::pair<int, int>> heads;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) Usage("missing value for " + flag);
    const std::string value = argv[++i];
    if (flag == "--model") {
      model = value;
    } else if (flag == "--prompt-tokens") {
      lengths.clear();
      for (const auto& p : Split(value, ',')) lengths.push_back(ParsePositive(flag, p));
    } else if (flag == "--decode-tokens") {
      decode_tokens = ParsePositive(flag, value);
    } else if (flag == "--threads") {
      threads = static_cast<int>(ParsePositive(flag, value));
    } else if (flag == "--rounds") {
      rounds = ParsePositive(flag, value);
    } else if (flag == "--dysco-heads") {
      for (const auto& p : Split(value, ',')) {
        const auto lh = Split(p, ':');
        if (lh.size() != 2) Usage("--dysco-heads needs L:H pairs");
        heads.emplace_back(static_cast<int>(std::strtol(lh[0].c_str(), nullptr, 10)),
                           static_cast<int>(std::strtol(lh[1].c_str(), nullptr, 10)));
      }
    } else {
      Usage("unknown flag " + flag);
    }
  }
  if (model.empty()) Usage("--model is required");

  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  dysco::EngineOptions eo;
  eo.runner.num_threads = threads;
  eo.kv_pages = (longest + decode_tokens + 2 + eo.page_size - 1) / eo.page_size;
  eo.start_scheduler = false;
  auto loaded = dysco::Engine::Load(model, eo);
  if (!loaded.ok()) {
    std::cerr << "bench-dysco: " << loaded.status().ToString() << "\n";
    return 1;
  }
  dysco::Engine& engine = **loaded;
  const dysco::ModelConfig& config = engine.config();
  dysco::DyscoOverrides overrides;
  if (!heads.empty()) {
    overrides.selected_heads = heads;
  } else if (config.dysco.selected_heads.empty()) {
    const int mid = config.num_layers / 2;
    overrides.selected_heads = {{mid - 3, 0}, {mid - 1, 1}, {mid, 2}, {mid + 1, 3}};
  }
  const auto& used =
      overrides.selected_heads ? *overrides.selected_heads : config.dysco.selected_heads;
  int max_layer = 0;
  for (const auto& h : used) max_layer = std::max(max_layer, h.first);

  std::printf("model %s, %zu heads (deepest layer %d of %d), %lld decode tokens x %lld rounds\n",
              config.model_name.c_str(), used.size(), max_layer, config.num_layers,
              static_cast<long long>(decode_tokens), static_cast<long long>(rounds));
  std::printf("%8s %10s %10s %10s %10s %10s %10s %8s\n", "prompt", "plain_ms", "dysco_ms",
              "spec_ms", "select_ms", "real_ms", "sample_ms", "ratio");
  std::mt19937 rng(1234);
  for (int64_t len : lengths) {
    if (len + decode_tokens + 1 > config.max_position_embeddings) {
      std::printf("%8lld  (longer than the model's context)\n", static_cast<long long>(len));
      continue;
    }
    std::uniform_int_distribution<int32_t> id(3, static_cast<int32_t>(config.vocab_size) - 1);
    std::vector<int32_t> prompt(len);
    for (auto& t : prompt) t = id(rng);
    TokenTimes plain, with;
    for (int64_t r = 0; r < rounds; ++r) {
      dysco::Status s = Measure(engine, prompt, decode_tokens, nullptr, &plain);
      if (s.ok()) {
        s = Measure(engine, prompt, decode_tokens, &overrides, &with);
      }
      if (!s.ok()) {
        std::cerr << "bench-dysco: " << s.ToString() << "\n";
        return 1;
      }
    }
    const double p = Median(plain.total) * 1e3, d = Median(with.total) * 1e3;
    std::printf("%8lld %10.2f %10.2f %10.2f %10.3f %10.2f %10.3f %8.2f\n",
                static_cast<long long>(len), p, d, Median(with.spec) * 1e3,
                Median(with.select) * 1e3, Median(with.real) * 1e3, Median(with.sample) * 1e3,
                p > 0 ? d / p : 0.0);
  }
  return 0;
}
