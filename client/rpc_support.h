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
#include "proto/support/grpc_code_names.h"

namespace dysco::client {

inline constexpr char kDefaultTarget[] = "localhost:50051";

// slow_reader: no BDP probing and a one-byte stream lookahead, so the HTTP/2 window the server
// writes into stays small and a client that reads slowly holds the server's writes back (the
// server then coalesces what it generated meanwhile); for `generate --read-delay-ms`.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool slow_reader = false);

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
