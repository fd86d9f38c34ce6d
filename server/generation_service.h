// GenerationService: the dysco.v1.Generation gRPC service (callback API) over one loaded Engine.
// Generate streams one Scheduler session per RPC through a ServerWriteReactor (at most one write in
// flight; deltas that arrive while a write is in flight are coalesced into the next message, so a
// slow reader never blocks the engine thread and its backlog stays one message); GetModelInfo and
// Tokenize answer from the engine's config and tokenizer. Request-sized work (parsing, validation,
// tokenization, Submit, Tokenize) runs on RequestWorkers, never on a gRPC callback thread.
//
// Thread-safety: gRPC calls the handlers from its own threads; SetEngine and BeginDrain may be
// called from any thread. Sessions are tracked by the Scheduler only (Scheduler::CancelAll).
// Ownership: the service references (does not own) the Engine (core/engine/engine.h) given to
// SetEngine, which must
// outlive the gRPC server the service is registered with. Each Generate reactor owns itself: it
// deletes itself in OnDone, which gRPC calls only after Finish, which the reactor calls only after
// its session's final event (or when the request is refused before a session exists).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include <cstddef>
#include <vector>

#include "core/engine/engine.h"
#include "dysco/v1/generation.grpc.pb.h"
#include "server/bearer_tokens.h"
#include "server/metrics.h"
#include "server/request_workers.h"

namespace dysco::server {

// The three methods are registered raw (bytes in, bytes out): a request that does not parse gets
// INVALID_ARGUMENT with a message instead of gRPC's bare UNIMPLEMENTED.
using GenerationServiceBase = v1::Generation::WithRawCallbackMethod_Generate<
    v1::Generation::WithRawCallbackMethod_GetModelInfo<
        v1::Generation::WithRawCallbackMethod_Tokenize<v1::Generation::Service>>>;

class GenerationService final : public GenerationServiceBase {
 public:
  // `metrics` (not owned, may be null) counts refused requests; it must outlive the service.
  explicit GenerationService(ServerMetrics* metrics, int request_workers = 2,
                             size_t max_waiting_requests = 256)
      : metrics_(metrics), workers_(request_workers, max_waiting_requests) {}

  // From now on every RPC of the service needs one of these bearer tokens (UNAUTHENTICATED
  // otherwise, checked before anything else). Call before the gRPC server starts; `tokens` (not
  // owned) must outlive the service. Health and reflection are other services: never checked.
  void SetTokens(const BearerTokens* tokens) { tokens_ = tokens; }
  // Makes the service answer; before it every RPC gets UNAVAILABLE "the model is loading".
  void SetEngine(Engine* engine) { engine_.store(engine, std::memory_order_release); }
  // From now on new Generate RPCs get UNAVAILABLE; running ones continue.
  void BeginDrain() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;

 private:
  friend class GenerateReactor;

  std::string NewRequestId();
  Status Authenticate(const grpc::CallbackServerContext& context) const;
  void CountRefused(grpc::StatusCode code) {
    if (metrics_ != nullptr) metrics_->OnRefused(code);
  }
  // Logs, counts and finishes a unary RPC that is refused.
  void Refused(const Status& status, grpc::ServerUnaryReactor* reactor);
  static void FillModelInfo(Engine& engine, v1::ModelInfo* info);
  static StatusOr<std::vector<int32_t>> TokenizeRequestIds(Engine& engine,
                                                           const v1::TokenizeRequest& request);
  void RunTokenize(Engine& engine, const grpc::ByteBuffer& raw, grpc::ByteBuffer* response,
                   grpc::ServerUnaryReactor* reactor);

  ServerMetrics* const metrics_;
  const BearerTokens* tokens_ = nullptr;  // set before serving, then only read
  std::atomic<Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_request_{1};
  // Last member: destroyed (its threads joined, its queue run) before the rest.
  RequestWorkers workers_;
};

}  // namespace dysco::server
