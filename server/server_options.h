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
  // KV cache size, one of three (alternatives: giving two on the command line, or two in the
  // config file, is an error; one on the command line replaces the file's):
  int64_t kv_pages = 0;            // > 0: exactly this many KV pages
  double kv_cache_fraction = 0.0;  // > 0 (CUDA only): this fraction of the device memory free
                                   // after the model is loaded, in (0, 0.95]
  int64_t kv_cache_mb = 1024;      // otherwise: as many pages as fit in this many MiB
  int page_size = 16;
  int64_t max_batch = 16;
  int64_t max_queued = 64;
  int64_t max_context = 0;  // 0 = the model's context length
  // Chunked prefill: prompt tokens one session prefills per step, and tokens of all sessions per
  // step (SchedulerOptions; bounds cancel/deadline latency). Defaults by device when not given:
  // cpu 256 / 256; cuda kCudaPrefillChunk / kCudaPrefillChunk + max_batch (a full chunk beside a
  // decode token of every session), since a GPU step costs about the same for 256 tokens as for
  // thousands (a 128K prompt in 256-token chunks would take 512 steps).
  int64_t prefill_chunk = 256;
  int64_t max_step_tokens = 256;
  int threads = 0;  // 0 = AvailableCpus() (core/model/model_runner.h)
  int64_t max_new_tokens_default = 256;
  int64_t max_new_tokens_limit = 4096;
  double drain_timeout_seconds = 30.0;
  std::string log_level = "info";  // trace | debug | info | warn | error | off
  std::string config_file;         // the --config file that was read, if any
};

// The default --prefill-chunk on a CUDA device (see ServerOptions::prefill_chunk).
inline constexpr int64_t kCudaPrefillChunk = 8192;
// The largest --kv-cache-fraction: the rest of the free memory is for activations, the gathered
// K/V of a flash prefill, cuBLAS workspaces (docs/operations.md).
inline constexpr double kMaxKvCacheFraction = 0.95;

// The usage text of dysco-server.
const char* ServerUsage();

// Parses argv (argv[0] skipped). Sets *help and returns defaults when --help / -h is given.
StatusOr<ServerOptions> ParseServerFlags(const std::vector<std::string>& args, bool* help);

}  // namespace dysco::server
