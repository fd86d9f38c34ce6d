// What every dysco-client subcommand shares: the channel to the server, gRPC status formatting,
// protobuf to JSON, and parsing of the prompt inputs (--messages-json files, --token-ids lists).
//
// Free functions with no state. Parse* functions return "" on success (filling *out) or an error
// message naming the flag or file at fault; *out is unspecified on failure. Thread-safety: all
// functions are safe to call from any thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "dysco/v1/generation.pb.h"
#include "grpc/health/v1/health.pb.h"
#include "proto/support/grpc_code_names.h"

namespace dysco::client {

class FlagSet;

inline constexpr char kDefaultTarget[] = "localhost:50051";

// The flags of every subcommand that say how to reach the server: --target (HOST:PORT, or any gRPC
// target such as dns:///dysco-headless.ns.svc:50051 or ipv4:10.0.0.1:50051,10.0.0.2:50051),
// --lb (round_robin spreads calls over every address the target resolves to), --tls-ca,
// --tls-cert/--tls-key (mutual TLS), --tls-server-name, --token-file.
void DeclareConnectionFlags(FlagSet* flags);

// A channel and what every call on it must carry.
struct Connection {
  std::shared_ptr<grpc::Channel> channel;
  std::string authorization;  // "Bearer <token>", or "" without --token-file
  // Adds the bearer token to a call's metadata.
  void Prepare(grpc::ClientContext* context) const;
};

struct ConnectOptions {
  // No BDP probing and a one-byte stream lookahead, so the HTTP/2 window the server writes into
  // stays small and a client that reads slowly holds the server's writes back (the server then
  // coalesces what it generated meanwhile); for `generate --read-delay-ms`.
  bool slow_reader = false;
  // With --lb round_robin, send calls only to addresses whose grpc.health.v1 status of
  // dysco.v1.Generation is SERVING (gRPC's client-side health checking, a Watch stream per
  // address): a replica that starts draining or is still loading stops getting new calls. Off for
  // `health`, which must reach a server that is not ready to report it.
  bool health_checked = true;
};

// Builds the channel from the connection flags. Calls of dysco.v1.Generation that the server
// refuses with UNAVAILABLE before answering (a replica that began draining just after it was
// picked) are retried, up to 4 attempts with backoff. Returns "" or an error naming the flag.
std::string Connect(const FlagSet& flags, const ConnectOptions& options, Connection* out);

// grpc.health.v1 Check of `service` (each call with a deadline of call_timeout_ms, 0 = none),
// repeated every 100 ms until SERVING or until wait_s seconds have passed (0: asked once). Returns
// the last call's status; *response holds its answer when that status is OK.
grpc::Status CheckHealthUntilServing(const Connection& connection, const std::string& service,
                                     int64_t call_timeout_ms, double wait_s,
                                     grpc::health::v1::HealthCheckResponse* response);

// "error: INVALID_ARGUMENT: sampling.top_p must be in (0, 1]" on stderr.
void PrintRpcError(const char* rpc, const grpc::Status& status);

// Compact one-line JSON with the .proto field names (snake_case), defaults included.
std::string ToJson(const google::protobuf::Message& message);

std::string ReadFile(const std::string& path, std::string* contents);

// A JSON array of {"role", "content"} objects, or an object {"messages": [...]} (the OpenAI shape).
std::string ParseMessagesJson(const std::string& text, const std::string& source,
                              dysco::v1::ChatMessages* out);

// "1,2,3" (spaces allowed around entries).
std::string ParseTokenIds(const std::string& text, std::vector<int32_t>* out);

// Seconds on a monotonic clock, for latency measurements.
double NowSeconds();

}  // namespace dysco::client
