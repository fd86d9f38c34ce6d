// dysco-client generate: one streaming Generate call.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "dysco/v1/generation.grpc.pb.h"
#include "flags.h"
#include "rpc_support.h"

namespace dysco::client {
namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void OnInterrupt(int) { g_interrupted.store(true); }

void DeclareGenerateFlags(FlagSet* flags) {
  DeclareConnectionFlags(flags);
  flags->String("prompt", "plain-text prompt (one user message when --chat)");
  flags->String("messages-json",
                "file with a JSON array of {\"role\",\"content\"} messages (chat-formatted)");
  flags->String("token-ids", "prompt as comma-separated token ids, used as is");
  flags->Bool("chat", "apply the model's chat format to --prompt");
  flags->Int("max-new-tokens", "most tokens to generate; 0 = server default", 0);
  flags->OptionalDouble("temperature", "sampling temperature, 0 = greedy (unset = greedy)");
  flags->OptionalInt("top-k", "top-k sampling, 0 = off");
  flags->OptionalDouble("top-p", "nucleus sampling mass in (0, 1]");
  flags->OptionalInt("seed", "sampling seed");
  flags->OptionalDouble("repetition-penalty", "repetition penalty > 0, 1 = off");
  flags->List("stop", "stop string; the text ends before it");
  flags->List("stop-token-id", "extra token id that ends generation");
  flags->Bool("dysco", "enable DySCO decoding");
  flags->String("dysco-heads", "DySCO heads as LAYER:QHEAD,... (unset = model default)");
  flags->OptionalDouble("dysco-top-p", "DySCO nucleus mass in (0, 1]");
  flags->OptionalInt("dysco-top-k", "DySCO top-k >= 1");
  flags->OptionalDouble("dysco-strength", "DySCO strength > 0; >= 99 = hard mask");
  flags->OptionalDouble("dysco-decay-factor", "DySCO relevance decay in [0, 1)");
  flags->OptionalInt("dysco-context-warmup-steps", "DySCO context warmup steps");
  flags->OptionalInt("dysco-intervention-warmup", "DySCO intervention warmup, -1 = auto");
  flags->String("dysco-dynamic-rescale", "true or false (unset = model default)");
  flags->Bool("dysco-no-template-exclusion",
              "do not exclude the chat template tokens from selection");
  flags->Bool("return-selection", "stream DySCO's per-step selected ranges (printed on stderr)");
  flags->Int("timeout-ms", "deadline of the call; 0 = none", 0);
  flags->String("request-id",
                "request id echoed in responses and logs (server generates one when empty)");
  flags->Bool("json", "print each stream message as one JSON line instead of the text");
  flags->Int("read-delay-ms",
             "a slow reader (tests): sleep this long after each message, over a channel with a "
             "small HTTP/2 window so that the server's writes wait for the reads; 0 = off",
             0);
}

// Fills *request from the flags; returns "" or a usage error.
std::string BuildRequest(const FlagSet& flags, dysco::v1::GenerateRequest* request) {
  int inputs = flags.Has("prompt") + flags.Has("messages-json") + flags.Has("token-ids");
  if (inputs != 1) return "give exactly one of --prompt, --messages-json, --token-ids";
  if (flags.Has("prompt")) {
    request->set_prompt(flags.GetString("prompt"));
  } else if (flags.Has("messages-json")) {
    std::string text;
    std::string error = ReadFile(flags.GetString("messages-json"), &text);
    if (error.empty())
      error =
          ParseMessagesJson(text, flags.GetString("messages-json"), request->mutable_messages());
    if (!error.empty()) return "--messages-json: " + error;
  } else {
    std::vector<int32_t> ids;
    std::string error = ParseTokenIds(flags.GetString("token-ids"), &ids);
    if (!error.empty()) return error;
    request->mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  request->set_chat(flags.GetBool("chat"));
  if (flags.GetInt("max-new-tokens") < 0) return "--max-new-tokens must be >= 0";
  request->set_max_new_tokens(static_cast<uint32_t>(flags.GetInt("max-new-tokens")));

  dysco::v1::SamplingParams* sampling = request->mutable_sampling();
  if (flags.Has("temperature"))
    sampling->set_temperature(static_cast<float>(flags.GetDouble("temperature")));
  if (flags.Has("top-k")) sampling->set_top_k(static_cast<int32_t>(flags.GetInt("top-k")));
  if (flags.Has("top-p")) sampling->set_top_p(static_cast<float>(flags.GetDouble("top-p")));
  if (flags.Has("seed")) {
    if (flags.GetInt("seed") < 0) return "--seed must be >= 0";
    sampling->set_seed(static_cast<uint64_t>(flags.GetInt("seed")));
  }
  if (flags.Has("repetition-penalty")) {
    sampling->set_repetition_penalty(static_cast<float>(flags.GetDouble("repetition-penalty")));
  }
  for (const std::string& stop : flags.GetList("stop")) request->add_stop(stop);
  for (const std::string& text : flags.GetList("stop-token-id")) {
    int64_t id;
    if (!ParseInt64(text, &id)) return "--stop-token-id must be an integer, got '" + text + "'";
    request->add_stop_token_ids(static_cast<int32_t>(id));
  }

  dysco::v1::DyscoParams* dysco = request->mutable_dysco();
  dysco->set_enabled(flags.GetBool("dysco"));
  if (flags.Has("dysco-heads")) {
    std::string heads = flags.GetString("dysco-heads");
    size_t start = 0;
    while (start <= heads.size()) {
      size_t comma = heads.find(',', start);
      std::string item =
          heads.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      size_t colon = item.find(':');
      int64_t layer, head;
      if (colon == std::string::npos || !ParseInt64(item.substr(0, colon), &layer) ||
          !ParseInt64(item.substr(colon + 1), &head)) {
        return "--dysco-heads: '" + item + "' is not LAYER:QHEAD";
      }
      dysco::v1::DyscoHead* entry = dysco->add_selected_heads();
      entry->set_layer(static_cast<int32_t>(layer));
      entry->set_head(static_cast<int32_t>(head));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  if (flags.Has("dysco-top-p"))
    dysco->set_top_p(static_cast<float>(flags.GetDouble("dysco-top-p")));
  if (flags.Has("dysco-top-k")) dysco->set_top_k(static_cast<int32_t>(flags.GetInt("dysco-top-k")));
  if (flags.Has("dysco-strength"))
    dysco->set_strength(static_cast<float>(flags.GetDouble("dysco-strength")));
  if (flags.Has("dysco-decay-factor")) {
    dysco->set_decay_factor(static_cast<float>(flags.GetDouble("dysco-decay-factor")));
  }
  if (flags.Has("dysco-context-warmup-steps")) {
    dysco->set_context_warmup_steps(
        static_cast<int32_t>(flags.GetInt("dysco-context-warmup-steps")));
  }
  if (flags.Has("dysco-intervention-warmup")) {
    dysco->set_intervention_warmup(static_cast<int32_t>(flags.GetInt("dysco-intervention-warmup")));
  }
  if (flags.Has("dysco-dynamic-rescale")) {
    const std::string& value = flags.GetString("dysco-dynamic-rescale");
    if (value != "true" && value != "false") return "--dysco-dynamic-rescale takes true or false";
    dysco->set_dynamic_rescale(value == "true");
  }
  dysco->set_clear_template_sequences(flags.GetBool("dysco-no-template-exclusion"));
  request->set_return_selection(flags.GetBool("return-selection"));
  request->set_request_id(flags.GetString("request-id"));
  return "";
}

void PrintSelection(const dysco::v1::StepSelection& step) {
  std::fprintf(stderr, "[selection] position=%lld phase=%s selected=%lld mass=%.4f ranges=",
               static_cast<long long>(step.position()), step.phase().c_str(),
               static_cast<long long>(step.num_selected()), step.nucleus_mass());
  constexpr int kMaxRangesShown = 8;
  for (int i = 0; i < step.ranges_size() && i < kMaxRangesShown; ++i) {
    std::fprintf(stderr, "%s[%lld,%lld)", i ? " " : "",
                 static_cast<long long>(step.ranges(i).start()),
                 static_cast<long long>(step.ranges(i).end()));
  }
  if (step.ranges_size() > kMaxRangesShown)
    std::fprintf(stderr, " ... (%d ranges)", step.ranges_size());
  std::fprintf(stderr, "\n");
}

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
  FlagSet flags(
      "generate",
      "Streams one completion: text to stdout as it arrives, usage and timings to stderr.");
  DeclareGenerateFlags(&flags);
  std::string error = flags.Parse(args);
  if (flags.help_requested()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return kExitOk;
  }
  dysco::v1::GenerateRequest request;
  if (error.empty()) error = BuildRequest(flags, &request);
  if (!error.empty()) {
    std::fprintf(stderr, "dysco-client generate: %s\n", error.c_str());
    return kExitUsage;
  }
  const bool json = flags.GetBool("json");
  const int64_t read_delay_ms = flags.GetInt("read-delay-ms");
  if (read_delay_ms < 0 || read_delay_ms > 60000) {
    std::fprintf(stderr, "dysco-client generate: --read-delay-ms must be in [0, 60000]\n");
    return kExitUsage;
  }

  Connection connection;
  ConnectOptions connect;
  connect.slow_reader = read_delay_ms > 0;
  if (std::string error = Connect(flags, connect, &connection); !error.empty()) {
    std::fprintf(stderr, "dysco-client generate: %s\n", error.c_str());
    return kExitUsage;
  }
  auto stub = dysco::v1::Generation::NewStub(connection.channel);
  grpc::ClientContext context;
  connection.Prepare(&context);
  if (flags.GetInt("timeout-ms") > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(flags.GetInt("timeout-ms")));
  }

  // Ctrl-C cancels the call, so the server frees the sequence instead of generating for nobody. A
  // signal handler may not call into gRPC, hence the watcher thread.
  g_interrupted.store(false);
  std::signal(SIGINT, OnInterrupt);
  std::atomic<bool> call_done{false};
  std::thread watcher([&] {
    while (!call_done.load()) {
      if (g_interrupted.load()) {
        context.TryCancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });

  const double start = NowSeconds();
  double first_token_time = 0;
  uint32_t tokens_received = 0;
  std::string request_id;
  dysco::v1::GenerateResponse last;
  bool printed_text = false;
  auto reader = stub->Generate(&context, request);
  dysco::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (first_token_time == 0 && response.token_ids_size() > 0) first_token_time = NowSeconds();
    tokens_received += static_cast<uint32_t>(response.token_ids_size());
    if (!response.request_id().empty()) request_id = response.request_id();
    if (json) {
      std::printf("%s\n", ToJson(response).c_str());
      std::fflush(stdout);
    } else {
      if (!response.text().empty()) {
        std::fwrite(response.text().data(), 1, response.text().size(), stdout);
        std::fflush(stdout);
        printed_text = true;
      }
      for (const auto& step : response.selection()) PrintSelection(step);
    }
    if (response.finish_reason() != dysco::v1::FINISH_REASON_UNSPECIFIED || response.has_usage())
      last = response;
    if (read_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(read_delay_ms));
  }
  grpc::Status status = reader->Finish();
  const double end = NowSeconds();
  call_done.store(true);
  watcher.join();
  std::signal(SIGINT, SIG_DFL);
  if (printed_text) std::printf("\n");
  std::fflush(stdout);

  if (!status.ok()) {
    if (g_interrupted.load()) {
      std::fprintf(stderr, "interrupted: cancelled after %u tokens\n", tokens_received);
      return kExitInterrupted;
    }
    PrintRpcError("Generate", status);
    return kExitRpcError;
  }
  const dysco::v1::Usage& usage = last.usage();
  const double client_ttft = first_token_time > 0 ? first_token_time - start : 0;
  // Decode rate excludes the first token, whose latency is the prefill's.
  const double decode_seconds = usage.total_seconds() - usage.time_to_first_token_seconds();
  const double decode_rate = usage.generated_tokens() > 1 && decode_seconds > 0
                                 ? (usage.generated_tokens() - 1) / decode_seconds
                                 : 0;
  std::fprintf(stderr,
               "[usage] request_id=%s finish_reason=%s prompt_tokens=%u generated_tokens=%u\n",
               request_id.c_str(), dysco::v1::FinishReason_Name(last.finish_reason()).c_str(),
               usage.prompt_tokens(), usage.generated_tokens());
  std::fprintf(stderr,
               "[timing] ttft_ms=%.1f (server %.1f, queued %.1f) decode_tokens_per_s=%.1f "
               "total_s=%.3f (client %.3f) dysco_overhead_s=%.3f\n",
               client_ttft * 1e3, usage.time_to_first_token_seconds() * 1e3,
               usage.queue_seconds() * 1e3, decode_rate, usage.total_seconds(), end - start,
               usage.dysco_overhead_seconds());
  return kExitOk;
}

}  // namespace dysco::client
