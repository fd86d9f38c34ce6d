// GenerationService: the dysco.v1.Generation gRPC service (callback API) over one loaded Engine.
// Generate streams one Scheduler session per RPC through a ServerWriteReactor (at most one write in
// flight; deltas that arrive while a write is in flight are coalesced into the next message, so a
// slow reader never blocks the engine thread and its backlog stays one message); GetModelInfo and
// Tokenize answer from the engine's config and tokenizer.
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

#include "core/engine/engine.h"
#include "dysco/v1/generation.grpc.pb.h"

namespace dysco::server {

class GenerationService final : public v1::Generation::CallbackService {
 public:
  GenerationService() = default;

  // Makes the service answer; before it every RPC gets UNAVAILABLE "the model is loading".
  void SetEngine(Engine* engine) { engine_.store(engine, std::memory_order_release); }
  // From now on new Generate RPCs get UNAVAILABLE; running ones continue.
  void BeginDrain() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

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

  std::atomic<Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_request_{1};
};

}  // namespace dysco::server
