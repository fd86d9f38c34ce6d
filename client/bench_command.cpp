// dysco-client bench: N concurrent Generate streams (one thread each) with synthetic token-id
// prompts of an exact length; reports TTFT and inter-token latency percentiles and aggregate
// throughput.
//
// Duration mode (--duration S) measures a steady state: streams keep issuing requests until the
// phase deadline, which is also every call's gRPC deadline, so calls in flight at the end are cut
// there (counted as "cut", not as errors) and every counted token arrived inside the window.
// Requests mode (--requests N) runs exactly N calls and the window ends at the last completion.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "dysco/v1/generation.grpc.pb.h"
#include "flags.h"
#include "latency_summary.h"
#include "rpc_support.h"

namespace dysco::client {
namespace {

// Ordinary prose, so that greedy decoding keeps writing instead of hitting eos at once.
constexpr char kFillerText[] =
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps "
    "as his "
    "father had taught him. Below, the harbour filled with fishing boats returning from the "
    "northern banks, "
    "their decks heavy with cod and mackerel. Merchants argued over prices on the quay while "
    "children chased "
    "gulls between the barrels. In the village school, the teacher explained how tides follow the "
    "moon, how "
    "salt is drawn from the sea in shallow pans, and why the river that feeds the bay runs brown "
    "after the "
    "spring rains. Travellers who stayed at the inn by the bridge wrote letters about the bread, "
    "the weather, "
    "the long summer evenings and the sound of bells from the church on the hill. Farmers brought "
    "apples, "
    "barley and wool to the Saturday market, and a blacksmith repaired ploughs, hinges and the "
    "iron gate of "
    "the cemetery. Each winter the storms tested the sea wall, and each spring the villagers "
    "mended it with "
    "stone carried down from the quarry above the forest, where deer grazed in the clearings at "
    "dawn.";

struct BenchConfig {
  std::string target;
  std::string authorization;  // metadata value, "" without --token-file
  int concurrency = 1;
  double duration_s = 0;  // > 0: duration mode
  int64_t requests = 0;   // > 0: requests mode
  int prompt_tokens = 0;
  int max_new_tokens = 0;
  bool dysco = false;
  bool has_temperature = false;
  float temperature = 0;
  uint64_t seed = 0;
  int64_t timeout_ms = 0;
  bool progress = true;
};

struct PhaseResult {
  int concurrency = 0;
  double window_s = 0;
  int64_t completed = 0;
  int64_t cut = 0;
  int64_t errors = 0;
  std::map<std::string, int64_t> errors_by_code;
  std::string first_error;
  int64_t generated_tokens = 0;
  int64_t prompt_tokens = 0;
  LatencySummary ttft;
  LatencySummary itl;
  LatencySummary request_latency;  // completed requests only
  double tokens_per_s = 0;
  double requests_per_s = 0;
};

// Token-id prompts of exactly prompt_tokens ids, each request starting at a different offset of the
// filler text so that no two concurrent prompts share a prefix.
class SyntheticPrompts {
 public:
  SyntheticPrompts(std::vector<int32_t> pool, int length)
      : pool_(std::move(pool)), length_(length) {}
  void Fill(int64_t request_index, google::protobuf::RepeatedField<int32_t>* ids) const {
    ids->Clear();
    ids->Reserve(length_);
    size_t offset = static_cast<size_t>(request_index * 97) % pool_.size();
    for (int i = 0; i < length_; ++i)
      ids->Add(pool_[(offset + static_cast<size_t>(i)) % pool_.size()]);
  }

 private:
  std::vector<int32_t> pool_;
  int length_;
};

struct SharedCounters {
  std::atomic<int64_t> next_request{0};
  std::atomic<int64_t> tokens{0};
  std::atomic<int64_t> completed{0};
  std::atomic<int64_t> errors{0};
  std::atomic<int64_t> in_flight{0};
};

struct StreamSamples {
  std::vector<double> ttft;
  std::vector<double> itl;
  std::vector<double> request_latency;
  int64_t cut = 0;
  int64_t prompt_tokens = 0;
  std::map<std::string, int64_t> errors_by_code;
  std::string first_error;
};

void RunStream(const BenchConfig& config, const SyntheticPrompts& prompts,
               dysco::v1::Generation::Stub* stub,
               std::chrono::system_clock::time_point phase_deadline, double phase_end,
               SharedCounters* counters, StreamSamples* samples) {
  const bool duration_mode = config.duration_s > 0;
  while (true) {
    int64_t index = counters->next_request.fetch_add(1);
    if (!duration_mode && index >= config.requests) return;
    if (duration_mode && NowSeconds() >= phase_end) return;

    dysco::v1::GenerateRequest request;
    prompts.Fill(index, request.mutable_token_ids()->mutable_ids());
    request.set_max_new_tokens(static_cast<uint32_t>(config.max_new_tokens));
    request.mutable_dysco()->set_enabled(config.dysco);
    if (config.has_temperature) {
      request.mutable_sampling()->set_temperature(config.temperature);
      request.mutable_sampling()->set_seed(config.seed + static_cast<uint64_t>(index));
    }
    request.set_request_id("bench-" + std::to_string(index));

    grpc::ClientContext context;
    if (!config.authorization.empty()) context.AddMetadata("authorization", config.authorization);
    auto deadline = std::chrono::system_clock::time_point::max();
    if (config.timeout_ms > 0)
      deadline = std::chrono::system_clock::now() + std::chrono::milliseconds(config.timeout_ms);
    const bool phase_deadline_binds = duration_mode && phase_deadline <= deadline;
    if (phase_deadline_binds) deadline = phase_deadline;
    if (deadline != std::chrono::system_clock::time_point::max()) context.set_deadline(deadline);

    counters->in_flight.fetch_add(1);
    const double start = NowSeconds();
    double last_token_time = 0;
    auto reader = stub->Generate(&context, request);
    dysco::v1::GenerateResponse response;
    while (reader->Read(&response)) {
      if (response.has_usage()) samples->prompt_tokens += response.usage().prompt_tokens();
      const int n = response.token_ids_size();
      if (n == 0) continue;
      const double now = NowSeconds();
      if (last_token_time == 0) {
        samples->ttft.push_back(now - start);
      } else {
        // A message carrying several tokens spreads its gap evenly over them.
        for (int i = 0; i < n; ++i) samples->itl.push_back((now - last_token_time) / n);
      }
      last_token_time = now;
      counters->tokens.fetch_add(n);
    }
    grpc::Status status = reader->Finish();
    counters->in_flight.fetch_sub(1);
    if (status.ok()) {
      samples->request_latency.push_back(NowSeconds() - start);
      counters->completed.fetch_add(1);
    } else if (phase_deadline_binds &&
               (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
                status.error_code() == grpc::StatusCode::CANCELLED)) {
      ++samples->cut;
    } else {
      counters->errors.fetch_add(1);
      ++samples->errors_by_code[GrpcCodeName(status.error_code())];
      if (samples->first_error.empty()) {
        samples->first_error =
            std::string(GrpcCodeName(status.error_code())) + ": " + status.error_message();
      }
    }
  }
}

PhaseResult RunPhase(const BenchConfig& config, const SyntheticPrompts& prompts,
                     dysco::v1::Generation::Stub* stub, const std::string& label) {
  SharedCounters counters;
  std::vector<StreamSamples> samples(static_cast<size_t>(config.concurrency));
  const double start = NowSeconds();
  const double phase_end = start + config.duration_s;
  const auto phase_deadline =
      std::chrono::system_clock::now() +
      std::chrono::microseconds(static_cast<int64_t>(config.duration_s * 1e6));

  std::vector<std::thread> streams;
  for (int i = 0; i < config.concurrency; ++i) {
    streams.emplace_back(RunStream, std::cref(config), std::cref(prompts), stub, phase_deadline,
                         phase_end, &counters, &samples[static_cast<size_t>(i)]);
  }

  std::atomic<bool> phase_done{false};
  std::thread progress([&] {
    const bool tty = isatty(STDERR_FILENO);
    double next_report = start + 1.0;
    while (!phase_done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const double now = NowSeconds();
      if (!config.progress || now < next_report) continue;
      next_report += 1.0;
      const double elapsed = now - start;
      std::fprintf(
          stderr,
          "%s[%s] %5.1fs  done %lld  in flight %lld  tokens %lld  %.1f tok/s  errors %lld%s",
          tty ? "\r" : "", label.c_str(), elapsed,
          static_cast<long long>(counters.completed.load()),
          static_cast<long long>(counters.in_flight.load()),
          static_cast<long long>(counters.tokens.load()), counters.tokens.load() / elapsed,
          static_cast<long long>(counters.errors.load()), tty ? "   " : "\n");
      std::fflush(stderr);
    }
    if (config.progress && tty && NowSeconds() >= start + 1.0) std::fprintf(stderr, "\n");
  });
  for (std::thread& stream : streams) stream.join();
  const double end = NowSeconds();
  phase_done.store(true);
  progress.join();

  PhaseResult result;
  result.concurrency = config.concurrency;
  result.window_s = config.duration_s > 0 ? config.duration_s : end - start;
  std::vector<double> ttft, itl, request_latency;
  for (const StreamSamples& s : samples) {
    ttft.insert(ttft.end(), s.ttft.begin(), s.ttft.end());
    itl.insert(itl.end(), s.itl.begin(), s.itl.end());
    request_latency.insert(request_latency.end(), s.request_latency.begin(),
                           s.request_latency.end());
    result.cut += s.cut;
    result.prompt_tokens += s.prompt_tokens;
    for (const auto& [code, count] : s.errors_by_code) result.errors_by_code[code] += count;
    if (result.first_error.empty()) result.first_error = s.first_error;
  }
  result.completed = counters.completed.load();
  result.errors = counters.errors.load();
  result.generated_tokens = counters.tokens.load();
  result.ttft = Summarize(std::move(ttft));
  result.itl = Summarize(std::move(itl));
  result.request_latency = Summarize(std::move(request_latency));
  result.tokens_per_s = result.generated_tokens / result.window_s;
  result.requests_per_s = result.completed / result.window_s;
  return result;
}

nlohmann::json SummaryJson(const LatencySummary& s) {
  return {{"count", s.count},      {"mean_ms", s.mean * 1e3}, {"p50_ms", s.p50 * 1e3},
          {"p90_ms", s.p90 * 1e3}, {"p99_ms", s.p99 * 1e3},   {"max_ms", s.max * 1e3}};
}

nlohmann::json PhaseJson(const PhaseResult& r) {
  return {{"concurrency", r.concurrency},
          {"window_s", r.window_s},
          {"requests_completed", r.completed},
          {"requests_cut_at_deadline", r.cut},
          {"errors", r.errors},
          {"errors_by_code", r.errors_by_code},
          {"first_error", r.first_error},
          {"generated_tokens", r.generated_tokens},
          {"prompt_tokens", r.prompt_tokens},
          {"generated_tokens_per_s", r.tokens_per_s},
          {"requests_per_s", r.requests_per_s},
          {"ttft", SummaryJson(r.ttft)},
          {"inter_token_latency", SummaryJson(r.itl)},
          {"request_latency", SummaryJson(r.request_latency)}};
}

void PrintSummaryLine(const char* name, const LatencySummary& s) {
  std::printf("  %-20s p50 %8.1f  p90 %8.1f  p99 %8.1f  mean %8.1f  max %8.1f  (n=%zu)\n", name,
              s.p50 * 1e3, s.p90 * 1e3, s.p99 * 1e3, s.mean * 1e3, s.max * 1e3, s.count);
}

void PrintPhase(const PhaseResult& r) {
  std::printf("%d stream%s, %.1f s window:\n", r.concurrency, r.concurrency == 1 ? "" : "s",
              r.window_s);
  std::printf("  requests: %lld completed, %lld cut at the deadline, %lld errors\n",
              static_cast<long long>(r.completed), static_cast<long long>(r.cut),
              static_cast<long long>(r.errors));
  for (const auto& [code, count] : r.errors_by_code) {
    std::printf("    %s x%lld\n", code.c_str(), static_cast<long long>(count));
  }
  if (!r.first_error.empty()) std::printf("    first error: %s\n", r.first_error.c_str());
  std::printf("  generated tokens: %lld -> %.1f tok/s aggregate, %.2f req/s\n",
              static_cast<long long>(r.generated_tokens), r.tokens_per_s, r.requests_per_s);
  PrintSummaryLine("TTFT (ms)", r.ttft);
  PrintSummaryLine("inter-token (ms)", r.itl);
  PrintSummaryLine("request (ms)", r.request_latency);
}

// Polls grpc.health.v1 for the readiness service until SERVING, for at most wait_s seconds, so that
// a bench started next to a server that is still loading its model measures it once it is ready.
std::string WaitUntilReady(const Connection& connection, double wait_s) {
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status =
      CheckHealthUntilServing(connection, "dysco.v1.Generation", 2000, wait_s, &response);
  if (status.ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
    return "";
  }
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%.1f", wait_s);
  return std::string("the server was not ready within ") + seconds + " s (--wait-ready-s): " +
         (status.ok()
              ? grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
              : std::string(GrpcCodeName(status.error_code())) + ": " + status.error_message());
}

std::string ReadConfig(const FlagSet& flags, BenchConfig* config) {
  config->target = flags.GetString("target");
  config->concurrency = static_cast<int>(flags.GetInt("concurrency"));
  if (config->concurrency < 1 || config->concurrency > 1024)
    return "--concurrency must be in [1, 1024]";
  if (flags.Has("duration") == flags.Has("requests"))
    return "give exactly one of --duration, --requests";
  config->duration_s = flags.Has("duration") ? flags.GetDouble("duration") : 0;
  config->requests = flags.Has("requests") ? flags.GetInt("requests") : 0;
  if (flags.Has("duration") && config->duration_s <= 0) return "--duration must be > 0";
  if (flags.Has("requests") && config->requests < 1) return "--requests must be >= 1";
  config->prompt_tokens = static_cast<int>(flags.GetInt("prompt-tokens"));
  if (config->prompt_tokens < 1) return "--prompt-tokens must be >= 1";
  config->max_new_tokens = static_cast<int>(flags.GetInt("max-new-tokens"));
  if (config->max_new_tokens < 1) return "--max-new-tokens must be >= 1";
  config->dysco = flags.GetBool("dysco");
  config->has_temperature = flags.Has("temperature");
  config->temperature = static_cast<float>(flags.GetDouble("temperature"));
  if (flags.GetInt("seed") < 0) return "--seed must be >= 0";
  config->seed = static_cast<uint64_t>(flags.GetInt("seed"));
  config->timeout_ms = flags.GetInt("timeout-ms");
  config->progress = !flags.GetBool("no-progress");
  if (flags.GetInt("warmup") < 0) return "--warmup must be >= 0";
  return "";
}

}  // namespace

int RunBench(const std::vector<std::string>& args) {
  FlagSet flags(
      "bench",
      "Runs N concurrent Generate streams with synthetic prompts of an exact token length and "
      "reports\n"
      "TTFT and inter-token latency percentiles, aggregate generated tokens/s and requests/s.");
  DeclareConnectionFlags(&flags);
  flags.Int("concurrency", "concurrent streams", 1);
  flags.OptionalDouble("duration", "seconds to run; calls in flight at the end are cut");
  flags.OptionalInt("requests", "number of calls to run (instead of --duration)");
  flags.Int("prompt-tokens", "prompt length in tokens", 128);
  flags.Int("max-new-tokens", "tokens to generate per call", 64);
  flags.Bool("dysco", "enable DySCO decoding on every call");
  flags.OptionalDouble("temperature", "sampling temperature (unset = greedy)");
  flags.Int("seed", "base sampling seed (call i uses seed + i)", 0);
  flags.Int("warmup", "calls to run (and discard) before measuring", 1);
  flags.Int("timeout-ms", "deadline of each call; 0 = none", 0);
  flags.Double("wait-ready-s",
               "first wait up to this many seconds for the server to be ready (health "
               "dysco.v1.Generation SERVING, e.g. while it loads its model); 0 = do not wait",
               60);
  flags.Bool("compare-single",
             "first run 1 stream, then --concurrency streams; print the throughput ratio");
  flags.Bool("json", "print the results as one JSON object on stdout");
  flags.Bool("no-progress", "no progress line on stderr");
  std::string error = flags.Parse(args);
  if (flags.help_requested()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return kExitOk;
  }
  BenchConfig config;
  if (error.empty()) error = ReadConfig(flags, &config);
  if (!error.empty()) {
    std::fprintf(stderr, "dysco-client bench: %s\n", error.c_str());
    return kExitUsage;
  }

  Connection connection;
  if (std::string error = Connect(flags, {}, &connection); !error.empty()) {
    std::fprintf(stderr, "dysco-client bench: %s\n", error.c_str());
    return kExitUsage;
  }
  config.authorization = connection.authorization;
  if (const double wait_s = flags.GetDouble("wait-ready-s"); wait_s > 0) {
    if (std::string error = WaitUntilReady(connection, wait_s); !error.empty()) {
      std::fprintf(stderr, "dysco-client bench: %s\n", error.c_str());
      return kExitRpcError;
    }
  }
  auto stub = dysco::v1::Generation::NewStub(connection.channel);
  std::vector<int32_t> pool;
  {
    grpc::ClientContext context;
    connection.Prepare(&context);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    dysco::v1::TokenizeRequest request;
    request.set_text(kFillerText);
    dysco::v1::TokenizeResponse response;
    grpc::Status status = stub->Tokenize(&context, request, &response);
    if (!status.ok()) {
      PrintRpcError("Tokenize (building the synthetic prompts)", status);
      return kExitRpcError;
    }
    if (response.token_ids_size() == 0) {
      std::fprintf(stderr, "error: Tokenize returned no tokens for the synthetic prompt text\n");
      return kExitRpcError;
    }
    pool.assign(response.token_ids().begin(), response.token_ids().end());
  }
  SyntheticPrompts prompts(std::move(pool), config.prompt_tokens);

  if (flags.GetInt("warmup") > 0) {
    BenchConfig warmup = config;
    warmup.duration_s = 0;
    warmup.requests = flags.GetInt("warmup");
    warmup.concurrency = static_cast<int>(std::min<int64_t>(warmup.requests, config.concurrency));
    PhaseResult result = RunPhase(warmup, prompts, stub.get(), "warmup");
    if (result.errors > 0) {
      std::fprintf(stderr, "error: warmup failed: %s\n", result.first_error.c_str());
      return kExitRpcError;
    }
  }

  std::vector<PhaseResult> phases;
  if (flags.GetBool("compare-single")) {
    BenchConfig single = config;
    single.concurrency = 1;
    // Same work per stream as the concurrent phase.
    if (single.requests > 0)
      single.requests = std::max<int64_t>(1, config.requests / config.concurrency);
    phases.push_back(RunPhase(single, prompts, stub.get(), "1 stream"));
  }
  phases.push_back(
      RunPhase(config, prompts, stub.get(), std::to_string(config.concurrency) + " streams"));

  const bool compared = phases.size() == 2;
  const double ratio =
      compared && phases[0].tokens_per_s > 0 ? phases[1].tokens_per_s / phases[0].tokens_per_s : 0;
  int64_t errors = 0;
  for (const PhaseResult& phase : phases) errors += phase.errors;

  if (flags.GetBool("json")) {
    nlohmann::json out;
    out["config"] = {{"target", config.target},
                     {"concurrency", config.concurrency},
                     {"duration_s", config.duration_s},
                     {"requests", config.requests},
                     {"prompt_tokens", config.prompt_tokens},
                     {"max_new_tokens", config.max_new_tokens},
                     {"dysco", config.dysco},
                     {"warmup", flags.GetInt("warmup")}};
    out["phases"] = nlohmann::json::array();
    for (const PhaseResult& phase : phases) out["phases"].push_back(PhaseJson(phase));
    if (compared) out["throughput_ratio"] = ratio;
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("bench: prompt %d tokens, up to %d new tokens, DySCO %s\n", config.prompt_tokens,
                config.max_new_tokens, config.dysco ? "on" : "off");
    for (const PhaseResult& phase : phases) PrintPhase(phase);
    if (compared) {
      std::printf("throughput ratio (%d streams / 1 stream): %.2fx generated tok/s\n",
                  config.concurrency, ratio);
    }
  }
  return errors > 0 ? kExitRpcError : kExitOk;
}

}  // namespace dysco::client
