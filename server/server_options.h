// ServerOptions: everything dysco-server is configured with, from command-line flags and an
// optional YAML file (`--config FILE.yaml`, keys are the flag names without the dashes, '-' or '_';
// flags win over the file).
//
// Thread-safety: plain value type. ParseServerFlags reads only its arguments and the config file.
// Ownership: returns a value owned by the caller; on failure nothing is returned and the Status
// names the flag or the file and key (INVALID_ARGUMENT), NOT_FOUND for a missing config file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/base/status.h"

namespace dysco::server {

struct ServerOptions {
  std::string model;  // model package directory (required)
  std::string host = "0.0.0.0";
  int port = 50051;          // 0 = any free port (tests)
  int metrics_port = 9090;   // 0 = any free port; -1 = no metrics endpoint
  std::string metrics_host;  // "" = host; e.g. 127.0.0.1 keeps /metrics off the network
  // TLS on the gRPC port (PEM files): cert and key together; client_ca adds mutual TLS (a client
  // certificate signed by it is required).
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  // Bearer tokens, one per line (server/bearer_tokens.h); reloaded on SIGHUP. "" = no auth.
  std::string auth_token_file;
  bool reflection = true;  // grpc.reflection.v1alpha (never behind the token, like health)
  int64_t max_request_bytes = 16 << 20;  // larger request messages: RESOURCE_EXHAUSTED, unread
  std::string device = "cpu";
  // Decode steps on a CUDA device replay captured CUDA graphs (docs/gpu.md "CUDA graphs"); false
  // runs every step eagerly. Ignored on the CPU.
  bool cuda_graphs = true;
  int64_t kv_pages = 0;        // > 0: exactly this many KV pages
  int64_t kv_cache_mb = 1024;  // otherwise: as many pages as fit in this many MiB
  int page_size = 16;
  int64_t max_batch = 16;
  int64_t max_queued = 64;
  int64_t max_context = 0;  // 0 = the model's context length
  int64_t prefill_chunk = 256;
  int64_t max_step_tokens = 256;  // SchedulerOptions: bounds cancel/deadline latency
  int threads = 0;                // 0 = torch's default
  int64_t max_new_tokens_default = 256;
  int64_t max_new_tokens_limit = 4096;
  double drain_timeout_seconds = 30.0;
  std::string log_level = "info";  // trace | debug | info | warn | error | off
  std::string config_file;         // the --config file that was read, if any
};

// The usage text of dysco-server.
const char* ServerUsage();

// Parses argv (argv[0] skipped). Sets *help and returns defaults when --help / -h is given.
StatusOr<ServerOptions> ParseServerFlags(const std::vector<std::string>& args, bool* help);

}  // namespace dysco::server
