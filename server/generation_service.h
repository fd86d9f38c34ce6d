// GenerationService: the dysco.v1.Generation gRPC service (callback API) over one loaded Engine.
// Generate streams one Scheduler session per RPC through a ServerWriteReactor (at most one write in
// flight; deltas that arrive while a write is in flight are coalesced into the next message, so a
// slow reader never blocks the engine thread and its backlog stays one message); GetModelInfo and
// Tokenize answer from the engine's config and tokenizer.
//
// Thread-safety: gRPC calls the handlers from its own threads; SetEngine, BeginDrain and
// CancelAllSessions may be called from any thread.
// Ownership: the service references (does not own) the Engine given to SetEngine, which must
// outlive the gRPC server the service is registered with. Each Generate reactor owns itself: it
// deletes itself in OnDone, which gRPC calls only after Finish, which the reactor calls only after
// its session's final event (or when the request is refused before a session exists).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>

#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"
#include "core/engine/scheduler.h"
#include "core/text/tokenizer.h"
#include "dysco/v1/generation.grpc.pb.h"
#include "server/request_validation.h"

namespace dysco::server {

// A loaded model and the engine that runs it. Members are destroyed in reverse order: the scheduler
// (which stops the engine thread) before what it references.
struct Engine {
  std::unique_ptr<ModelRunner> runner;
  std::unique_ptr<KvPagePool> pool;
  std::unique_ptr<Tokenizer> tokenizer;
  SchedulerOptions scheduler_options;
  std::unique_ptr<Scheduler> scheduler;
  RequestLimits limits;
};

class GenerationService final : public v1::Generation::CallbackService {
 public:
  GenerationService() = default;

  // Makes the service answer; before it every RPC gets UNAVAILABLE "the model is loading".
  void SetEngine(Engine* engine) { engine_.store(engine, std::memory_order_release); }
  // From now on new Generate RPCs get UNAVAILABLE; running ones continue.
  void BeginDrain() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  // Cancels every open session (each ends with its final event, then its RPC finishes).
  void CancelAllSessions();
  int64_t open_sessions() const;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;

 private:
  friend class GenerateReactor;

  std::string NewRequestId();
  void AddSession(SessionId id);
  void RemoveSession(SessionId id);

  std::atomic<Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_request_{1};
  mutable std::mutex sessions_mu_;
  std::unordered_set<SessionId> sessions_;  // submitted, RPC not done yet
};

}  // namespace dysco::server
