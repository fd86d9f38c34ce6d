// Scheduler: continuous batching of many concurrent generation sessions over one ModelRunner and
// one KvPagePool. Each session is a Sequence (its own pages, sampler, detokenizer, stop matcher
// and, with DySCO, its own DyscoController) built by the SequenceFactory; one engine thread repeats
// plan -> execute -> apply (docs/architecture.md): admit waiting sessions whose pages can be
// reserved, PlanStep over the running ones (chunked prefill so running sessions keep decoding),
// BatchStepper::Execute, then apply the outcome (events, finished sessions, metrics), freeing each
// session's pages and DySCO state on every exit path (finish, error, cancel, deadline, shutdown).
// A failed step is retried row by row, so that only the sessions that fail alone end with kError.
//
// Thread-safety: Submit, Cancel, CancelAll, Drain and stats() may be called from any thread.
// SessionEvents are delivered on the engine thread: the callback must not block and must not call
// back into the Scheduler except Cancel/CancelAll. Lock order: `mu_` is taken alone, never around a
// callback, the runner or the pool (docs/architecture.md "Threads").
// Ownership: the Scheduler references (does not own) runner, pool and factory, which must outlive
// it. Submit copies the request; the callback is owned by the session and destroyed after its final
// event. On a failed Submit nothing is kept and the callback is never called.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/params.h"
#include "core/dysco/trace.h"
#include "core/engine/finish_reason.h"
#include "core/engine/request.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"

namespace dysco {

struct SchedulerOptions {
  int64_t max_batch_size = 16;  // running sessions stepped together
  int64_t max_queued = 64;      // waiting sessions; beyond it Submit returns RESOURCE_EXHAUSTED
  int64_t prefill_chunk_tokens = 256;  // prompt tokens one session may prefill per step
  // New tokens of all sessions in one step. A cancel or deadline takes effect between steps, so this
  // bounds their latency: at one prefill chunk by default (prefill runs at the same rate per token
  // in one big step or several small ones on CPU).
  int64_t max_step_tokens = 256;
};

// One selection of a DySCO step, for return_selection.
struct SelectionEvent {
  int64_t position = 0;
  DyscoPhase phase = DyscoPhase::kContextWarmup;
  int64_t num_selected = 0;
  double nucleus_mass = 0.0;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // half-open
};

struct SessionUsage {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double queue_seconds = 0.0;
  double time_to_first_token_seconds = 0.0;
  double total_seconds = 0.0;
  double dysco_overhead_seconds = 0.0;
};

// Delivered on the engine thread, in order. The last event of a session has `final` set.
struct SessionEvent {
  std::string text;                       // delta
  std::vector<int32_t> token_ids;         // delta
  std::vector<SelectionEvent> selection;  // only with return_selection
  bool final = false;
  FinishReason finish = FinishReason::kNone;  // set on the final event
  Status error;                               // non-OK only when finish == kError
  SessionUsage usage;                         // set on the final event
};

struct SessionRequest {
  std::string request_id;
  GenerateRequest generate;  // prompt source, max_new_tokens (0 = default), sampling, stops, dysco
  bool return_selection = false;
  // Absolute deadline; the session ends with kDeadlineExceeded within one step after it passes.
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

using SessionId = uint64_t;
using SessionCallback = std::function<void(const SessionEvent&)>;

// Per-step observations for metrics (server/ turns them into Prometheus series); called on the
// engine thread after each step. Must not block.
struct StepObservation {
  int64_t running = 0;
  int64_t waiting = 0;
  double kv_usage_ratio = 0.0;
  int64_t batch_rows = 0;
  int64_t dysco_rows = 0;
  int64_t speculative_rows = 0;
  DyscoStepTimings timings;              // this step's passes
  std::vector<int64_t> selected_tokens;  // num_selected of each DySCO intervention row this step
};

struct SessionObservation {  // on a session's final event
  FinishReason finish = FinishReason::kNone;
  bool dysco = false;
  SessionUsage usage;
  std::vector<double> inter_token_seconds;
};

struct SchedulerObserver {
  std::function<void(const StepObservation&)> on_step;
  std::function<void(const SessionObservation&)> on_session_end;
};

struct SchedulerStats {
  int64_t running = 0;
  int64_t waiting = 0;
  double kv_usage_ratio = 0.0;
  bool draining = false;
  // Exceptions thrown by session callbacks or observers (caught so the engine survives them).
  int64_t callback_errors = 0;
};

class Scheduler {
 public:
  // INVALID_ARGUMENT for bad options or missing dependencies; INTERNAL when the engine thread
  // cannot start.
  static StatusOr<std::unique_ptr<Scheduler>> Create(ModelRunner* runner, KvPagePool* pool,
                                                     const SequenceFactory* factory,
                                                     SchedulerOptions options,
                                                     SchedulerObserver observer = {});
  ~Scheduler();  // stops the engine thread; open sessions end with kCancelled
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Validates and builds the session's Sequence (SequenceFactory::Create, on the caller's thread),
  // then queues it. RESOURCE_EXHAUSTED when the queue is full or the request can never fit the KV
  // pool; UNAVAILABLE while draining.
  StatusOr<SessionId> Submit(SessionRequest request, SessionCallback callback);
  // Ends the session within one step with final event `reason`: kCancelled (the default), or
  // kDeadlineExceeded when the caller's deadline passed (any other reason counts as kCancelled).
  // Unknown/finished ids are ignored; the first request for a session wins.
  void Cancel(SessionId id, FinishReason reason = FinishReason::kCancelled);
  // Cancels every session submitted so far.
  void CancelAll();
  // Refuses new sessions from now on; returns when every session has finished.
  void Drain();
  // Refuses new sessions from now on; returns at once.
  void BeginDrain();
  SchedulerStats stats() const;

  class Impl;

 private:
  explicit Scheduler(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dysco
