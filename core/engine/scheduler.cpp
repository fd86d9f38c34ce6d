#include "core/engine/scheduler.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <exception>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "core/base/thread_annotations.h"
#include "core/engine/batch_stepper.h"
#include "core/engine/step_plan.h"

namespace dysco {

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

SelectionEvent ToSelectionEvent(const DyscoTraceRecord& r) {
  SelectionEvent e;
  e.position = r.position;
  e.phase = r.phase;
  e.num_selected = r.num_selected;
  e.nucleus_mass = r.nucleus_mass;
  e.ranges = r.selected;
  return e;
}

// One generation session. Built (its request validated, its prompt encoded) on the submitting
// thread; from the moment it is queued only the engine thread touches it.
struct Session {
  SessionId id = 0;
  std::string request_id;
  bool return_selection = false;
  std::optional<Clock::time_point> deadline;
  SessionCallback callback;
  std::unique_ptr<Sequence> seq;
  bool dysco = false;
  int64_t prompt_tokens = 0;

  Clock::time_point submitted, admitted, first_token, last_token;
  bool has_token = false;
  int64_t generated = 0;
  std::vector<double> inter_token_seconds;
};

using EndedSessions = std::vector<std::pair<std::unique_ptr<Session>, FinishReason>>;

}  // namespace

class Scheduler::Impl {
 public:
  Impl(ModelRunner* runner, KvPagePool* pool, const SequenceFactory* factory,
       SchedulerOptions options, SchedulerObserver observer)
      : pool_(pool),
        factory_(factory),
        options_(options),
        observer_(std::move(observer)),
        stepper_(runner, pool) {}

  Status Start();
  void Stop() EXCLUDES(mu_);
  StatusOr<SessionId> Submit(SessionRequest request, SessionCallback callback) EXCLUDES(mu_);
  void Cancel(SessionId id, FinishReason reason) EXCLUDES(mu_);
  void CancelAll() EXCLUDES(mu_);
  void BeginDrain() EXCLUDES(mu_);
  void Drain() EXCLUDES(mu_);
  SchedulerStats stats() const EXCLUDES(mu_);

 private:
  Status CheckQueueLocked() const REQUIRES(mu_);
  void EngineLoop() EXCLUDES(mu_);
  // Waits for work, then ends cancelled / expired sessions and admits waiting ones. Returns false
  // when the engine must stop.
  bool Prepare() EXCLUDES(mu_);
  // Running sessions that were cancelled or expired leave with their pages freed, so that the
  // admission after it can use them.
  void EndRunningLocked(EndedSessions* ended, Clock::time_point now) REQUIRES(mu_);
  // Waiting sessions that were cancelled or expired leave the queue; then the queue's head is
  // admitted (FIFO) as long as its pages can be reserved.
  void AdmitLocked(EndedSessions* ended, Clock::time_point now) REQUIRES(mu_);

  // One step: plan -> execute -> apply.
  // What one running session got from a step.
  struct RowResult {
    bool stepped = false;                 // in the plan
    const RowOutcome* outcome = nullptr;  // its outcome; null when it failed
    Status error;                         // why it failed
  };
  void RunStep() EXCLUDES(mu_);
  Status ExecuteGuarded(const StepPlan& plan, StepOutcome* outcome);
  void Isolate(const StepPlan& plan, const Status& status, std::vector<StepOutcome>* solo,
               std::vector<RowResult>* results);
  // Turns each running session's result into its events; ends the finished and the failed ones.
  void Apply(const std::vector<RowResult>& results) EXCLUDES(mu_);
  SessionEvent TakeEvent(Session& s, const RowOutcome& row, Clock::time_point now);
  StepObservation Observe(const StepPlan& plan, const StepOutcome& outcome) const;
  void Publish(StepObservation obs) EXCLUDES(mu_);

  // Delivers the final event of `s` (pages and DySCO state freed first), on the engine thread.
  void Finish(std::unique_ptr<Session> s, FinishReason finish, const Status& error,
              SessionEvent event, bool was_running) EXCLUDES(mu_);
  // Calls `fn`, counting (not propagating) an exception: a throwing callback or observer must not
  // take the engine down with it.
  template <typename Fn>
  void CallUser(Fn&& fn);

  KvPagePool* const pool_;
  const SequenceFactory* const factory_;
  const SchedulerOptions options_;
  const SchedulerObserver observer_;

  mutable Mutex mu_;
  CondVar work_cv_;  // engine: something to do (submit, cancel, stop)
  CondVar done_cv_;  // Drain: a session ended
  std::deque<std::unique_ptr<Session>> waiting_ GUARDED_BY(mu_);
  std::unordered_set<SessionId> live_ GUARDED_BY(mu_);  // submitted, final event not delivered
  // Requested ends, not handled yet: kCancelled, or kDeadlineExceeded when the caller saw the
  // deadline pass first (a gRPC deadline reaches the server as a cancellation).
  std::unordered_map<SessionId, FinishReason> cancels_ GUARDED_BY(mu_);
  int64_t running_count_ GUARDED_BY(mu_) = 0;
  SessionId next_id_ GUARDED_BY(mu_) = 1;
  bool draining_ GUARDED_BY(mu_) = false;
  bool stop_ GUARDED_BY(mu_) = false;
  std::atomic<int64_t> callback_errors_{0};

  // Engine thread only.
  std::vector<std::unique_ptr<Session>> running_;
  BatchStepper stepper_;
  std::thread engine_;
};

template <typename Fn>
void Scheduler::Impl::CallUser(Fn&& fn) {
  try {
    fn();
  } catch (...) {
    callback_errors_.fetch_add(1, std::memory_order_relaxed);
  }
}

Status Scheduler::Impl::Start() {
  try {
    engine_ = std::thread([this] { EngineLoop(); });
  } catch (const std::exception& e) {
    return InternalError(std::string("cannot start the engine thread: ") + e.what());
  }
  return OkStatus();
}

void Scheduler::Impl::Stop() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
    draining_ = true;
  }
  work_cv_.NotifyAll();
  if (engine_.joinable()) engine_.join();
}

void Scheduler::Impl::EndRunningLocked(EndedSessions* ended, Clock::time_point now) {
  std::vector<std::unique_ptr<Session>> keep;
  for (auto& s : running_) {
    FinishReason finish = FinishReason::kNone;
    const auto cancel = cancels_.find(s->id);
    if (stop_) {
      finish = FinishReason::kCancelled;
    } else if (cancel != cancels_.end()) {
      finish = cancel->second;
    } else if (s->deadline && now >= *s->deadline) {
      finish = FinishReason::kDeadlineExceeded;
    }
    if (finish == FinishReason::kNone) {
      keep.push_back(std::move(s));
    } else {
      s->seq->ReleasePages();  // the final event is delivered later, outside the lock
      ended->emplace_back(std::move(s), finish);
    }
  }
  running_ = std::move(keep);
}

void Scheduler::Impl::AdmitLocked(EndedSessions* ended, Clock::time_point now) {
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    Session& s = **it;
    FinishReason finish = FinishReason::kNone;
    const auto cancel = cancels_.find(s.id);
    if (stop_) {
      finish = FinishReason::kCancelled;
    } else if (cancel != cancels_.end()) {
      finish = cancel->second;
      cancels_.erase(cancel);
    } else if (s.deadline && now >= *s.deadline) {
      finish = FinishReason::kDeadlineExceeded;
    }
    if (finish == FinishReason::kNone) {
      ++it;
      continue;
    }
    ended->emplace_back(std::move(*it), finish);
    it = waiting_.erase(it);
  }
  // FIFO: the head waits for its pages rather than being overtaken by smaller requests, which
  // would starve a large one.
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_batch_size) {
    Session& s = *waiting_.front();
    if (!s.seq->ReservePages(s.seq->max_cached_tokens()).ok()) break;
    s.admitted = now;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    ++running_count_;
  }
}

bool Scheduler::Impl::Prepare() {
  EndedSessions ended;
  size_t ended_running = 0;
  bool stopping = false;
  bool stalled = false;  // sessions wait for pages that nothing of ours will free
  {
    MutexLock lock(&mu_);
    while (!stop_ && waiting_.empty() && running_.empty()) work_cv_.Wait(&mu_);
    stopping = stop_;
    const auto now = Clock::now();
    EndRunningLocked(&ended, now);
    ended_running = ended.size();
    AdmitLocked(&ended, now);
    stalled = running_.empty() && !waiting_.empty();
  }
  for (size_t i = 0; i < ended.size(); ++i) {
    Finish(std::move(ended[i].first), ended[i].second, OkStatus(), SessionEvent(),
           i < ended_running);
  }
  if (stopping) {
    MutexLock lock(&mu_);
    return !(waiting_.empty() && running_.empty());
  }
  if (stalled) {
    // Another user of the pool holds the pages: poll, so deadlines and cancels still apply.
    MutexLock lock(&mu_);
    work_cv_.WaitFor(&mu_, std::chrono::milliseconds(10));
  }
  return true;
}

void Scheduler::Impl::EngineLoop() {
  while (Prepare()) {
    if (!running_.empty()) RunStep();
  }
}

// ---- One step: plan -> execute -> apply.

void Scheduler::Impl::RunStep() {
  std::vector<Sequence*> sequences;
  for (const auto& s : running_) sequences.push_back(s->seq.get());
  const StepPlan plan =
      PlanStep(sequences, StepBudget{options_.prefill_chunk_tokens, options_.max_step_tokens});
  StepOutcome outcome;
  const Status status = ExecuteGuarded(plan, &outcome);
  StepObservation obs = Observe(plan, outcome);  // before Apply frees finished sequences
  std::vector<RowResult> results(running_.size());
  std::vector<StepOutcome> solo;  // the isolated re-runs' outcomes, which `results` points into
  if (status.ok()) {
    for (size_t k = 0; k < plan.rows.size(); ++k) {
      results[plan.rows[k].source] = {true, &outcome.rows[k], OkStatus()};
    }
  } else {
    Isolate(plan, status, &solo, &results);
  }
  Apply(results);
  Publish(std::move(obs));
}

void Scheduler::Impl::Isolate(const StepPlan& plan, const Status& status,
                              std::vector<StepOutcome>* solo, std::vector<RowResult>* results) {
  if (plan.rows.size() == 1) {
    (*results)[plan.rows[0].source] = {true, nullptr, status};
    return;
  }
  // The failed step changed no sequence (BatchStepper::Execute is a transaction up to its commit):
  // each of its rows runs again alone, so that only the rows that fail by themselves end with an
  // error and their batch-mates go on.
  solo->resize(plan.rows.size());
  for (size_t k = 0; k < plan.rows.size(); ++k) {
    StepPlan one;
    one.rows.push_back(plan.rows[k]);
    StepOutcome& o = (*solo)[k];
    const Status s = ExecuteGuarded(one, &o);
    (*results)[plan.rows[k].source] =
        s.ok() ? RowResult{true, &o.rows[0], OkStatus()} : RowResult{true, nullptr, s};
  }
}

Status Scheduler::Impl::ExecuteGuarded(const StepPlan& plan, StepOutcome* outcome) {
  try {
    return stepper_.Execute(plan, outcome);
  } catch (const std::exception& e) {
    return InternalError(std::string("engine step failed: ") + e.what());
  } catch (...) {
    return InternalError("engine step failed with an unknown exception");
  }
}

StepObservation Scheduler::Impl::Observe(const StepPlan& plan, const StepOutcome& outcome) const {
  StepObservation obs;
  obs.batch_rows = static_cast<int64_t>(plan.rows.size());
  obs.speculative_rows = outcome.speculative_rows;
  obs.timings = outcome.timings;
  for (size_t k = 0; k < plan.rows.size(); ++k) {
    const DyscoController* c = plan.rows[k].sequence->dysco();
    if (c == nullptr) continue;
    ++obs.dysco_rows;
    if (k < outcome.rows.size() && (outcome.rows[k].kind == DyscoStepKind::kDynamic ||
                                    outcome.rows[k].kind == DyscoStepKind::kStatic)) {
      obs.selected_tokens.push_back(c->num_selected());
    }
  }
  return obs;
}

SessionEvent Scheduler::Impl::TakeEvent(Session& s, const RowOutcome& row, Clock::time_point now) {
  SessionEvent event;
  if (s.return_selection) {
    if (DyscoController* c = s.seq->dysco()) {
      for (const DyscoTraceRecord& rec : c->TakeTrace()) {
        event.selection.push_back(ToSelectionEvent(rec));
      }
    }
  }
  if (!row.sampled) return event;
  event.text = row.delta.text;
  event.token_ids.push_back(row.delta.token_id);
  if (s.has_token) {
    s.inter_token_seconds.push_back(Seconds(s.last_token, now));
  } else {
    s.first_token = now;
    s.has_token = true;
  }
  s.last_token = now;
  ++s.generated;
  return event;
}

void Scheduler::Impl::Apply(const std::vector<RowResult>& results) {
  const auto now = Clock::now();
  std::vector<std::unique_ptr<Session>> keep;
  for (size_t i = 0; i < running_.size(); ++i) {
    const RowResult& r = results[i];
    if (!r.stepped) {  // left out of this step by the prefill budget
      keep.push_back(std::move(running_[i]));
      continue;
    }
    if (r.outcome == nullptr) {
      Finish(std::move(running_[i]), FinishReason::kError, r.error, SessionEvent(), true);
      continue;
    }
    Session& s = *running_[i];
    SessionEvent event = TakeEvent(s, *r.outcome, now);
    if (s.seq->finished()) {
      const FinishReason finish = s.seq->finish_reason();
      Finish(std::move(running_[i]), finish, OkStatus(), std::move(event), true);
      continue;
    }
    if (r.outcome->sampled || !event.selection.empty()) CallUser([&] { s.callback(event); });
    keep.push_back(std::move(running_[i]));
  }
  running_ = std::move(keep);
}

void Scheduler::Impl::Publish(StepObservation obs) {
  if (!observer_.on_step) return;
  {
    MutexLock lock(&mu_);
    obs.running = running_count_;
    obs.waiting = static_cast<int64_t>(waiting_.size());
  }
  obs.kv_usage_ratio = pool_->usage_ratio();
  CallUser([&] { observer_.on_step(obs); });
}

void Scheduler::Impl::Finish(std::unique_ptr<Session> s, FinishReason finish, const Status& error,
                             SessionEvent event, bool was_running) {
  const auto now = Clock::now();
  event.final = true;
  event.finish = finish;
  event.error = error;
  SessionUsage& u = event.usage;
  u.prompt_tokens = s->prompt_tokens;
  u.generated_tokens = s->generated;
  u.queue_seconds = Seconds(s->submitted, was_running ? s->admitted : now);
  u.time_to_first_token_seconds = s->has_token ? Seconds(s->submitted, s->first_token) : 0.0;
  u.total_seconds = Seconds(s->submitted, now);
  if (const DyscoController* c = s->seq->dysco()) {
    u.dysco_overhead_seconds =
        c->totals().seconds.speculative_seconds + c->totals().seconds.select_seconds;
  }
  s->seq.reset();  // pages and DySCO state go back right now, before anyone hears of the end
  if (was_running) {
    MutexLock lock(&mu_);
    --running_count_;
  }
  if (observer_.on_session_end) {
    SessionObservation o{finish, s->dysco, u, std::move(s->inter_token_seconds)};
    CallUser([&] { observer_.on_session_end(o); });
  }
  CallUser([&] { s->callback(event); });
  s->callback = nullptr;  // destroyed after its final event, outside the lock
  {
    MutexLock lock(&mu_);
    live_.erase(s->id);
    cancels_.erase(s->id);
  }
  done_cv_.NotifyAll();
}

// ---- The public side.

Status Scheduler::Impl::CheckQueueLocked() const {
  if (draining_) return UnavailableError("server is draining");
  const int64_t n = static_cast<int64_t>(waiting_.size());
  if (n >= options_.max_queued) {
    return ResourceExhaustedError("queue full (" + std::to_string(n) + " waiting)");
  }
  return OkStatus();
}

StatusOr<SessionId> Scheduler::Impl::Submit(SessionRequest request, SessionCallback callback) {
  const auto submitted = Clock::now();
  if (!callback) return InvalidArgumentError("callback is empty");
  // A request that is wrong is INVALID_ARGUMENT whatever the load (the field checks are cheap);
  // then a full queue refuses it before its prompt is encoded.
  DYSCO_RETURN_IF_ERROR(factory_->Validate(request.generate));
  {
    MutexLock lock(&mu_);
    DYSCO_RETURN_IF_ERROR(CheckQueueLocked());
  }
  // A session's only use of the DySCO trace is the selection it streams: kept per step when asked
  // for, never otherwise (nothing else would take it, and it grows every step).
  request.generate.dysco_trace =
      request.return_selection ? DyscoTraceMode::kSteps : DyscoTraceMode::kOff;
  // Validation and prompt encoding happen here, on the caller's thread, not on the engine's.
  auto s = std::make_unique<Session>();
  DYSCO_ASSIGN_OR_RETURN(s->seq, factory_->Create(request.generate, pool_));
  s->request_id = std::move(request.request_id);
  s->return_selection = request.return_selection;
  s->deadline = request.deadline;
  s->prompt_tokens = s->seq->num_prompt_tokens();
  s->dysco = s->seq->dysco() != nullptr;
  s->submitted = submitted;
  s->callback = std::move(callback);
  SessionId id = 0;
  {
    MutexLock lock(&mu_);
    DYSCO_RETURN_IF_ERROR(CheckQueueLocked());
    id = next_id_++;
    s->id = id;
    live_.insert(id);
    waiting_.push_back(std::move(s));
  }
  work_cv_.NotifyOne();
  return id;
}

void Scheduler::Impl::Cancel(SessionId id, FinishReason reason) {
  {
    MutexLock lock(&mu_);
    if (live_.count(id) == 0) return;
    cancels_.emplace(id, reason);  // the first request wins
  }
  work_cv_.NotifyOne();
}

void Scheduler::Impl::CancelAll() {
  {
    MutexLock lock(&mu_);
    for (const SessionId id : live_) cancels_.emplace(id, FinishReason::kCancelled);
  }
  work_cv_.NotifyOne();
}

void Scheduler::Impl::BeginDrain() {
  MutexLock lock(&mu_);
  draining_ = true;
}

void Scheduler::Impl::Drain() {
  MutexLock lock(&mu_);
  draining_ = true;
  while (!live_.empty()) done_cv_.Wait(&mu_);
}

SchedulerStats Scheduler::Impl::stats() const {
  SchedulerStats st;
  {
    MutexLock lock(&mu_);
    st.running = running_count_;
    st.waiting = static_cast<int64_t>(waiting_.size());
    st.draining = draining_;
  }
  st.kv_usage_ratio = pool_->usage_ratio();
  st.callback_errors = callback_errors_.load(std::memory_order_relaxed);
  return st;
}

// ---------------------------------------------------------------------------------------------------

StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(ModelRunner* runner, KvPagePool* pool,
                                                       const SequenceFactory* factory,
                                                       SchedulerOptions options,
                                                       SchedulerObserver observer) {
  if (runner == nullptr || pool == nullptr || factory == nullptr) {
    return InvalidArgumentError("Scheduler needs a runner, a KV pool and a sequence factory");
  }
  if (options.max_batch_size < 1) return InvalidArgumentError("max_batch_size must be >= 1");
  if (options.max_queued < 1) return InvalidArgumentError("max_queued must be >= 1");
  if (options.prefill_chunk_tokens < 1) {
    return InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  if (options.max_step_tokens < 1) return InvalidArgumentError("max_step_tokens must be >= 1");
  auto impl = std::make_unique<Impl>(runner, pool, factory, options, std::move(observer));
  DYSCO_RETURN_IF_ERROR(impl->Start());
  return std::unique_ptr<Scheduler>(new Scheduler(std::move(impl)));
}

Scheduler::Scheduler(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Scheduler::~Scheduler() { impl_->Stop(); }

StatusOr<SessionId> Scheduler::Submit(SessionRequest request, SessionCallback callback) {
  return impl_->Submit(std::move(request), std::move(callback));
}
void Scheduler::Cancel(SessionId id, FinishReason reason) {
  impl_->Cancel(id, reason == FinishReason::kDeadlineExceeded ? reason : FinishReason::kCancelled);
}
void Scheduler::CancelAll() { impl_->CancelAll(); }
void Scheduler::BeginDrain() { impl_->BeginDrain(); }
void Scheduler::Drain() { impl_->Drain(); }
SchedulerStats Scheduler::stats() const { return impl_->stats(); }

}  // namespace dysco
