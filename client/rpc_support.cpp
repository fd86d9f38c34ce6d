#include "rpc_support.h"

#include <google/protobuf/util/json_util.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "flags.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace dysco::client {

void DeclareConnectionFlags(FlagSet* flags) {
  flags->String("target", "server address HOST:PORT or a gRPC target (dns:///NAME:PORT)",
                kDefaultTarget);
  flags->String("lb", "load balancing over the target's addresses: round_robin | pick_first",
                "round_robin");
  flags->String("tls-ca", "PEM of the CA that signed the server's certificate (enables TLS)");
  flags->String("tls-cert", "client certificate PEM for mutual TLS (with --tls-key)");
  flags->String("tls-key", "client private key PEM for mutual TLS (with --tls-cert)");
  flags->String("tls-server-name", "name to verify in the server's certificate (default: target)");
  flags->String("token-file", "file whose first line is the bearer token to send");
}

void Connection::Prepare(grpc::ClientContext* context) const {
  if (!authorization.empty()) context->AddMetadata("authorization", authorization);
}

std::string Connect(const FlagSet& flags, const ConnectOptions& options, Connection* out) {
  const std::string lb = flags.GetString("lb");
  if (lb != "round_robin" && lb != "pick_first") {
    return "--lb must be round_robin or pick_first, got \"" + lb + "\"";
  }
  grpc::ChannelArguments args;
  // Model info and long selections can exceed the 4 MiB default.
  args.SetMaxReceiveMessageSize(64 << 20);
  if (options.slow_reader) {
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1);
    // gRPC's retry layer reads a stream's messages ahead of the application (to know when the call
    // commits), which keeps the HTTP/2 window open however slowly we read: a slow reader must not
    // have it.
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  }
  const std::string health_check =
      options.health_checked ? R"("healthCheckConfig": {"serviceName": "dysco.v1.Generation"}, )"
                             : "";
  const std::string retry =
      options.slow_reader ? ""
                          : R"(, "methodConfig": [{"name": [{"service": "dysco.v1.Generation"}],
               "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                               "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}])";
  args.SetServiceConfigJSON("{" + health_check + R"("loadBalancingConfig": [{")" + lb +
                            R"(": {}}])" + retry + "}");

  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  const bool tls = flags.Has("tls-ca") || flags.Has("tls-cert") || flags.Has("tls-key");
  if (tls) {
    if (flags.Has("tls-cert") != flags.Has("tls-key")) {
      return "--tls-cert and --tls-key must be given together";
    }
    grpc::SslCredentialsOptions ssl;
    for (const auto& [flag, field] :
         {std::pair<const char*, std::string*>{"tls-ca", &ssl.pem_root_certs},
          {"tls-cert", &ssl.pem_cert_chain},
          {"tls-key", &ssl.pem_private_key}}) {
      if (!flags.Has(flag)) continue;
      if (std::string error = ReadFile(flags.GetString(flag), field); !error.empty()) {
        return std::string("--") + flag + ": " + error;
      }
    }
    credentials = grpc::SslCredentials(ssl);
    if (flags.Has("tls-server-name")) {
      args.SetSslTargetNameOverride(flags.GetString("tls-server-name"));
    }
  }
  out->authorization.clear();
  if (flags.Has("token-file")) {
    std::string text;
    if (std::string error = ReadFile(flags.GetString("token-file"), &text); !error.empty()) {
      return "--token-file: " + error;
    }
    const std::string token = text.substr(0, text.find('\n'));
    const size_t begin = token.find_first_not_of(" \t\r");
    const size_t end = token.find_last_not_of(" \t\r");
    if (begin == std::string::npos) return "--token-file: the first line holds no token";
    out->authorization = "Bearer " + token.substr(begin, end - begin + 1);
  }
  out->channel = grpc::CreateCustomChannel(flags.GetString("target"), credentials, args);
  return "";
}

grpc::Status CheckHealthUntilServing(const Connection& connection, const std::string& service,
                                     int64_t call_timeout_ms, double wait_s,
                                     grpc::health::v1::HealthCheckResponse* response) {
  auto stub = grpc::health::v1::Health::NewStub(connection.channel);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  const double give_up = NowSeconds() + wait_s;
  while (true) {
    grpc::ClientContext context;
    connection.Prepare(&context);
    if (call_timeout_ms > 0) {
      context.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(call_timeout_ms));
    }
    const grpc::Status status = stub->Check(&context, request, response);
    if (status.ok() && response->status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return status;
    }
    if (NowSeconds() >= give_up) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void PrintRpcError(const char* rpc, const grpc::Status& status) {
  std::fprintf(stderr, "error: %s: %s: %s\n", rpc, GrpcCodeName(status.error_code()),
               status.error_message().c_str());
}

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!status.ok()) return "{\"error\": \"cannot print message as JSON\"}";
  return out;
}

std::string ReadFile(const std::string& path, std::string* contents) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "cannot open " + path;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return "cannot read " + path;
  *contents = buffer.str();
  return "";
}

std::string ParseMessagesJson(const std::string& text, const std::string& source,
                              dysco::v1::ChatMessages* out) {
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return source + ": not valid JSON";
  if (doc.is_object() && doc.contains("messages")) doc = doc["messages"];
  if (!doc.is_array()) return source + ": expected an array of {\"role\", \"content\"} objects";
  out->Clear();
  for (size_t i = 0; i < doc.size(); ++i) {
    const nlohmann::json& entry = doc[i];
    std::string where = source + ": messages[" + std::to_string(i) + "]";
    if (!entry.is_object()) return where + " is not an object";
    if (!entry.contains("role") || !entry["role"].is_string())
      return where + ".role must be a string";
    if (!entry.contains("content") || !entry["content"].is_string()) {
      return where + ".content must be a string";
    }
    dysco::v1::ChatMessage* message = out->add_messages();
    message->set_role(entry["role"].get<std::string>());
    message->set_content(entry["content"].get<std::string>());
  }
  if (out->messages_size() == 0) return source + ": no messages";
  return "";
}

std::string ParseTokenIds(const std::string& text, std::vector<int32_t>* out) {
  out->clear();
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t begin = item.find_first_not_of(" \t");
    size_t end = item.find_last_not_of(" \t");
    std::string trimmed = begin == std::string::npos ? "" : item.substr(begin, end - begin + 1);
    int64_t id;
    if (!ParseInt64(trimmed, &id) || id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return "--token-ids: '" + trimmed + "' is not a token id (want e.g. 1,2,3)";
    }
    out->push_back(static_cast<int32_t>(id));
  }
  if (out->empty()) return "--token-ids: no ids given";
  return "";
}

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace dysco::client
