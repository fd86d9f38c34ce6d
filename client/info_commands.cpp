// dysco-client info, health and tokenize: the unary RPCs.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.h"
#include "dysco/v1/generation.grpc.pb.h"
#include "flags.h"
#include "rpc_support.h"

namespace dysco::client {
namespace {

template <typename Ids>
std::string JoinIds(const Ids& ids) {
  std::string out;
  for (int i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids.Get(i));
  return out;
}

std::string JoinHeads(const google::protobuf::RepeatedPtrField<dysco::v1::DyscoHead>& heads) {
  std::string out;
  for (int i = 0; i < heads.size(); ++i) {
    out += (i ? "," : "") + std::to_string(heads.Get(i).layer()) + ":" +
           std::to_string(heads.Get(i).head());
  }
  return out;
}

// Returns kExitOk when help was printed, -1 to go on, or kExitUsage after printing the error.
int ParseOrExit(FlagSet* flags, const std::vector<std::string>& args) {
  std::string error = flags->Parse(args);
  if (flags->help_requested()) {
    std::fputs(flags->Usage().c_str(), stdout);
    return kExitOk;
  }
  if (!error.empty()) {
    std::fprintf(stderr, "dysco-client: %s\n", error.c_str());
    return kExitUsage;
  }
  return -1;
}

void SetTimeout(grpc::ClientContext* context, int64_t timeout_ms) {
  if (timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  }
}

void PrintModelInfo(const dysco::v1::ModelInfo& info) {
  std::printf("model_name:          %s\n", info.model_name().c_str());
  std::printf("architecture:        %s\n", info.architecture().c_str());
  std::printf("dtype:               %s\n", info.dtype().c_str());
  std::printf("device:              %s\n", info.device().c_str());
  std::printf("context_length:      %u\n", info.context_length());
  std::printf("vocab_size:          %u\n", info.vocab_size());
  std::printf("layers:              %u\n", info.num_layers());
  std::printf("attention_heads:     %u (kv heads %u)\n", info.num_attention_heads(),
              info.num_kv_heads());
  std::printf("chat_format:         %s\n", info.chat_format().c_str());
  std::printf("eos_token_ids:       %s\n", JoinIds(info.eos_token_ids()).c_str());
  const dysco::v1::DyscoDefaults& d = info.dysco_defaults();
  std::printf("dysco defaults:      heads=%s top_p=%g top_k=%d strength=%g decay_factor=%g\n",
              JoinHeads(d.selected_heads()).c_str(), d.top_p(), d.top_k(), d.strength(),
              d.decay_factor());
  std::printf(
      "                     context_warmup_steps=%d intervention_warmup=%d dynamic_rescale=%s "
      "template_sequences=%d\n",
      d.context_warmup_steps(), d.intervention_warmup(), d.dynamic_rescale() ? "true" : "false",
      d.template_sequences_size());
  const dysco::v1::Limits& l = info.limits();
  std::printf(
      "limits:              max_context_tokens=%u max_new_tokens=%u max_batch_size=%u "
      "max_queued_requests=%u\n",
      l.max_context_tokens(), l.max_new_tokens(), l.max_batch_size(), l.max_queued_requests());
  std::printf("kv cache:            %u pages of %u tokens\n", l.kv_cache_pages(), l.kv_page_size());
}

}  // namespace

int RunInfo(const std::vector<std::string>& args) {
  FlagSet flags(
      "info", "Prints the served model's configuration, DySCO defaults and limits (GetModelInfo).");
  DeclareConnectionFlags(&flags);
  flags.Int("timeout-ms", "deadline of the call; 0 = none", 10000);
  flags.Bool("json", "print the ModelInfo message as JSON");
  if (int code = ParseOrExit(&flags, args); code >= 0) return code;

  Connection connection;
  if (std::string error = Connect(flags, {}, &connection); !error.empty()) {
    std::fprintf(stderr, "dysco-client %s: %s\n", "info", error.c_str());
    return kExitUsage;
  }
  auto stub = dysco::v1::Generation::NewStub(connection.channel);
  grpc::ClientContext context;
  connection.Prepare(&context);
  SetTimeout(&context, flags.GetInt("timeout-ms"));
  dysco::v1::ModelInfo info;
  grpc::Status status = stub->GetModelInfo(&context, dysco::v1::GetModelInfoRequest(), &info);
  if (!status.ok()) {
    PrintRpcError("GetModelInfo", status);
    return kExitRpcError;
  }
  if (flags.GetBool("json")) {
    std::printf("%s\n", ToJson(info).c_str());
  } else {
    PrintModelInfo(info);
  }
  return kExitOk;
}

int RunHealth(const std::vector<std::string>& args) {
  FlagSet flags("health",
                "grpc.health.v1 Check. Prints the serving status; exit 0 only when SERVING.");
  DeclareConnectionFlags(&flags);
  flags.String("service", "service name to check; empty = the whole server", "");
  flags.Int("timeout-ms", "deadline of each Check call", 2000);
  flags.Double("wait-s", "retry until SERVING for up to this many seconds (0 = ask once)", 0);
  if (int code = ParseOrExit(&flags, args); code >= 0) return code;

  Connection connection;
  if (std::string error =
          Connect(flags, {/*slow_reader=*/false, /*health_checked=*/false}, &connection);
      !error.empty()) {
    std::fprintf(stderr, "dysco-client %s: %s\n", "health", error.c_str());
    return kExitUsage;
  }
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status =
      CheckHealthUntilServing(connection, flags.GetString("service"), flags.GetInt("timeout-ms"),
                              flags.GetDouble("wait-s"), &response);
  if (!status.ok()) {
    PrintRpcError("Health.Check", status);
    return kExitRpcError;
  }
  std::printf("%s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk
                                                                             : kExitRpcError;
}

int RunTokenize(const std::vector<std::string>& args) {
  FlagSet flags(
      "tokenize",
      "Prints the token ids of a text as a comma-separated line (usable as --token-ids).");
  DeclareConnectionFlags(&flags);
  flags.String("text", "text to tokenize");
  flags.String("messages-json",
               "file with a JSON array of {\"role\",\"content\"} messages (chat-formatted)");
  flags.Bool("chat", "apply the model's chat format to --text");
  flags.Bool("parse-special", "recognise special tokens such as <|im_start|> written in the text");
  flags.Bool("show-tokens", "also print one 'id<TAB>token' line per token");
  flags.Bool("json", "print the TokenizeResponse as JSON");
  flags.Int("timeout-ms", "deadline of the call; 0 = none", 10000);
  if (int code = ParseOrExit(&flags, args); code >= 0) return code;

  dysco::v1::TokenizeRequest request;
  if (flags.Has("text") == flags.Has("messages-json")) {
    std::fprintf(stderr, "dysco-client tokenize: give exactly one of --text, --messages-json\n");
    return kExitUsage;
  }
  if (flags.Has("text")) {
    request.set_text(flags.GetString("text"));
  } else {
    std::string text;
    std::string error = ReadFile(flags.GetString("messages-json"), &text);
    if (error.empty())
      error = ParseMessagesJson(text, flags.GetString("messages-json"), request.mutable_messages());
    if (!error.empty()) {
      std::fprintf(stderr, "dysco-client tokenize: --messages-json: %s\n", error.c_str());
      return kExitUsage;
    }
  }
  request.set_chat(flags.GetBool("chat"));
  request.set_parse_special(flags.GetBool("parse-special"));

  Connection connection;
  if (std::string error = Connect(flags, {}, &connection); !error.empty()) {
    std::fprintf(stderr, "dysco-client %s: %s\n", "tokenize", error.c_str());
    return kExitUsage;
  }
  auto stub = dysco::v1::Generation::NewStub(connection.channel);
  grpc::ClientContext context;
  connection.Prepare(&context);
  SetTimeout(&context, flags.GetInt("timeout-ms"));
  dysco::v1::TokenizeResponse response;
  grpc::Status status = stub->Tokenize(&context, request, &response);
  if (!status.ok()) {
    PrintRpcError("Tokenize", status);
    return kExitRpcError;
  }
  if (flags.GetBool("json")) {
    std::printf("%s\n", ToJson(response).c_str());
    return kExitOk;
  }
  std::printf("%s\n", JoinIds(response.token_ids()).c_str());
  if (flags.GetBool("show-tokens")) {
    for (int i = 0; i < response.token_ids_size(); ++i) {
      // JSON-quoted so that spaces, newlines and byte-level markers stay visible.
      std::string token = i < response.tokens_size() ? response.tokens(i) : "";
      std::printf("%d\t%s\n", response.token_ids(i),
                  nlohmann::json(token)
                      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                      .c_str());
    }
  }
  std::fprintf(stderr, "[tokenize] %d tokens\n", response.token_ids_size());
  return kExitOk;
}

}  // namespace dysco::client
