// DyscoServer: the whole dysco-server process minus flag parsing and signals: the gRPC server
// (dysco.v1.Generation, grpc.health.v1, reflection), the Prometheus /metrics endpoint and the
// engine (model, KV pool, tokenizer, scheduler). Used by server/main.cpp and, in-process, by the
// tests.
//
// Lifecycle: Start binds the ports and serves at once: health "" (liveness) is SERVING, readiness
// ("dysco.v1.Generation") NOT_SERVING and every Generation RPC UNAVAILABLE until LoadModel
// succeeds. Drain flips readiness to NOT_SERVING and refuses new Generate calls (UNAVAILABLE),
// waits for the running sessions up to a timeout, then cancels the rest. Shutdown stops gRPC
// (giving in-flight RPCs a grace period), the metrics endpoint, then the engine.
//
// Thread-safety: Start/LoadModel/Drain/Shutdown are called by one controlling thread; the accessors
// may be called from any thread.
// Ownership: a DyscoServer owns everything it starts; the destructor shuts down. On a failed Start
// nothing is left running; on a failed LoadModel the server keeps serving health (not ready).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>

#include "core/base/status.h"
#include "server/bearer_tokens.h"
#include "server/generation_service.h"
#include "server/metrics.h"
#include "server/server_options.h"

namespace grpc {
class Server;
}

namespace dysco::server {

inline constexpr char kReadinessService[] = "dysco.v1.Generation";

class DyscoServer {
 public:
  // UNAVAILABLE when a port cannot be bound; NOT_FOUND / INVALID_ARGUMENT naming the flag for an
  // unreadable or empty TLS or token file.
  static StatusOr<std::unique_ptr<DyscoServer>> Start(const ServerOptions& options);
  ~DyscoServer();
  DyscoServer(const DyscoServer&) = delete;
  DyscoServer& operator=(const DyscoServer&) = delete;

  // Loads the model package, sizes the KV pool and starts the scheduler; readiness SERVING.
  // FAILED_PRECONDITION when called twice; otherwise the loaders' statuses.
  Status LoadModel();
  // Returns once no session is running: at most `timeout` plus the time cancelled sessions need
  // to end (one engine step).
  void Drain(std::chrono::duration<double> timeout);
  void Shutdown();  // idempotent
  // Re-reads --auth-token-file (SIGHUP); on failure keeps the tokens it had and logs why.
  void ReloadTokens();

  int port() const { return port_; }  // the bound gRPC port
  int metrics_port() const;           // -1 when /metrics is disabled
  const ServerOptions& options() const { return options_; }
  GenerationService& service() { return service_; }
  ServerMetrics& metrics() { return metrics_; }
  std::string RenderMetrics();  // what GET /metrics returns

 private:
  explicit DyscoServer(const ServerOptions& options);

  ServerOptions options_;
  ServerMetrics metrics_;
  std::unique_ptr<BearerTokens> tokens_;  // before service_, which references it
  GenerationService service_{&metrics_};
  std::unique_ptr<Engine> engine_;
  std::atomic<Engine*> loaded_engine_{nullptr};
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace dysco::server
