// bench-batching: aggregate generation throughput of N concurrent sessions through the Scheduler
// (continuous batching), N = 1, 4, 8, plain and with DySCO, each against the 1-session run of the
// same mode measured in the same process (ratio = tokens/s at N / tokens/s at 1).
//
// usage: bench-batching [--model DIR] [--prompt-tokens N] [--new-tokens N] [--sessions 1,4,8]
//                       [--threads N] [--no-dysco]
//   Every session gets its own plain-text prompt (prompt_tokens tokens) and greedy decoding;
//   throughput = generated tokens of all sessions / wall time from the first Submit to the last
//   final event (prefill included). DySCO runs with the package's heads, or four middle-layer heads
//   when the package has none.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "core/engine/engine.h"

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Usage(const std::string& message) {
  std::cerr << "bench-batching: " << message
            << "\nusage: bench-batching [--model DIR] [--prompt-tokens N] [--new-tokens N] "
               "[--sessions 1,4,8] [--threads N] [--no-dysco]\n";
  std::exit(2);
}

int ParsePositive(const std::string& flag, const char* value) {
  char* end = nullptr;
  const long x = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || x <= 0 || x > 1000000) {
    Usage(flag + " needs a positive integer");
  }
  return static_cast<int>(x);
}

template <typename T>
T OrDie(dysco::StatusOr<T> v) {
  if (!v.ok()) {
    std::cerr << "bench-batching: " << v.status().ToString() << "\n";
    std::exit(1);
  }
  return std::move(v).value();
}

struct RunResult {
  int64_t tokens = 0;
  double seconds = 0.0;
  double mean_ttft = 0.0;
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0.0; }
};

// `sessions` sessions submitted at once; waits for all of them.
RunResult Run(dysco::Scheduler& scheduler, const std::vector<std::vector<int32_t>>& prompts,
              int sessions, int new_tokens, bool use_dysco,
              const std::vector<std::pair<int, int>>& heads) {
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  RunResult result;
  const auto t0 = Clock::now();
  for (int i = 0; i < sessions; ++i) {
    dysco::SessionRequest r;
    r.request_id = "bench-" + std::to_string(i);
    r.generate.prompt_token_ids = prompts[i % prompts.size()];
    r.generate.max_new_tokens = new_tokens;
    r.generate.dysco = use_dysco;
    if (use_dysco && !heads.empty()) r.generate.dysco_overrides.selected_heads = heads;
    auto id = scheduler.Submit(r, [&](const dysco::SessionEvent& e) {
      if (!e.final) return;
      std::lock_guard<std::mutex> lock(mu);
      if (!e.error.ok()) std::cerr << "bench-batching: " << e.error.ToString() << "\n";
      result.tokens += e.usage.generated_tokens;
      result.mean_ttft += e.usage.time_to_first_token_seconds;
      ++done;
      cv.notify_all();
    });
    OrDie(std::move(id));
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done == sessions; });
  result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  result.mean_ttft /= sessions;
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "models/smollm2-135m-instruct";
  int prompt_tokens = 128, new_tokens = 64, threads = 0;
  std::vector<int> session_counts = {1, 4, 8};
  bool with_dysco = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) Usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") {
      model = next();
    } else if (a == "--prompt-tokens") {
      prompt_tokens = ParsePositive(a, next());
    } else if (a == "--new-tokens") {
      new_tokens = ParsePositive(a, next());
    } else if (a == "--threads") {
      threads = ParsePositive(a, next());
    } else if (a == "--sessions") {
      session_counts.clear();
      std::stringstream ss(next());
      std::string item;
      while (std::getline(ss, item, ',')) session_counts.push_back(ParsePositive(a, item.c_str()));
      if (session_counts.empty()) Usage("--sessions needs a list like 1,4,8");
    } else if (a == "--no-dysco") {
      with_dysco = false;
    } else {
      Usage("unknown argument " + a);
    }
  }
  if (std::find(session_counts.begin(), session_counts.end(), 1) == session_counts.end()) {
    session_counts.insert(session_counts.begin(), 1);  // the ratio's base
  }
  const int max_sessions = *std::max_element(session_counts.begin(), session_counts.end());

  dysco::EngineOptions eo;
  eo.runner.num_threads = threads;
  eo.kv_pages = static_cast<int64_t>(max_sessions) *
                ((prompt_tokens + new_tokens + eo.page_size - 1) / eo.page_size + 1);
  eo.scheduler.max_batch_size = max_sessions;
  eo.scheduler.max_queued = max_sessions;
  eo.scheduler.prefill_chunk_tokens = 256;
  eo.scheduler.max_step_tokens = 2048;
  auto engine = OrDie(dysco::Engine::Load(model, eo));
  const dysco::ModelConfig& config = engine->config();
  const dysco::Tokenizer* tokenizer = &engine->tokenizer();
  dysco::Scheduler* scheduler = engine->scheduler();

  std::vector<std::pair<int, int>> heads;
  if (config.dysco.selected_heads.empty()) heads = {{12, 3}, {14, 0}, {15, 2}, {16, 5}};

  // Distinct prompts: one long text, each session starting at a different sentence.
  std::string text;
  for (int i = 0; text.size() < 40000; ++i) {
    text += "Entry " + std::to_string(i) +
            ": the archive lists the ships that left the northern harbour, their cargo of wool, "
            "timber and salt, and the names of their captains. ";
  }
  const std::vector<int32_t> all = tokenizer->Encode(text, false);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < max_sessions; ++i) {
    const size_t start = static_cast<size_t>(i) * 37;
    if (start + prompt_tokens > all.size()) Usage("--prompt-tokens too large");
    prompts.emplace_back(all.begin() + start, all.begin() + start + prompt_tokens);
  }

  std::printf("model %s, prompt %d tokens, %d new tokens per session, greedy\n", model.c_str(),
              prompt_tokens, new_tokens);
  std::printf("%-6s %-9s %10s %10s %12s %10s %9s\n", "dysco", "sessions", "tokens", "seconds",
              "tokens/s", "ratio", "ttft_s");
  // Warm-up: the first steps of a fresh process are slower (allocations, TorchScript).
  Run(*scheduler, prompts, 1, 8, false, heads);
  for (bool use_dysco : {false, true}) {
    if (use_dysco && !with_dysco) continue;
    double base = 0.0;
    for (int n : session_counts) {
      const RunResult r = Run(*scheduler, prompts, n, new_tokens, use_dysco, heads);
      if (n == 1) base = r.tokens_per_second();
      std::printf("%-6s %-9d %10lld %10.2f %12.1f %9.2fx %9.3f\n", use_dysco ? "on" : "off", n,
                  static_cast<long long>(r.tokens), r.seconds, r.tokens_per_second(),
                  base > 0 ? r.tokens_per_second() / base : 0.0, r.mean_ttft);
      std::fflush(stdout);
    }
  }
  return 0;
}
