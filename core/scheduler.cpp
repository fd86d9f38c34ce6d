#include "core/scheduler.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_set>
#include <utility>

#include "core/batch_stepper.h"

namespace dysco {

const char* SessionFinishName(SessionFinish finish) {
  switch (finish) {
    case SessionFinish::kNone:
      return "none";
    case SessionFinish::kStop:
      return "stop";
    case SessionFinish::kLength:
      return "length";
    case SessionFinish::kStopString:
      return "stop_string";
    case SessionFinish::kCancelled:
      return "cancelled";
    case SessionFinish::kDeadlineExceeded:
      return "deadline_exceeded";
    case SessionFinish::kError:
      return "error";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

SessionFinish FromFinishReason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return SessionFinish::kStop;
    case FinishReason::kLength:
      return SessionFinish::kLength;
    case FinishReason::kStopString:
      return SessionFinish::kStopString;
    case FinishReason::kNone:
      break;
  }
  return SessionFinish::kNone;
}

StepSelectionEvent ToSelectionEvent(const DyscoTraceRecord& r) {
  StepSelectionEvent e;
  e.position = r.position;
  e.phase = r.phase;
  e.num_selected = r.num_selected;
  e.nucleus_mass = r.nucleus_mass;
  e.ranges = r.selected;
  return e;
}

// One generation session. Built (and its request validated, its prompt encoded) on the submitting
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
  int64_t reserve_tokens =
      0;  // KV slots reserved at admission: prompt + max_new_tokens - 1, capped

  Clock::time_point submitted, admitted, first_token, last_token;
  bool has_token = false;
  int64_t generated = 0;
  std::vector<double> inter_token_seconds;
};

}  // namespace

struct Scheduler::Impl {
  ModelRunner* runner = nullptr;
  KvPagePool* pool = nullptr;
  const Tokenizer* tokenizer = nullptr;
  SchedulerOptions options;
  SchedulerObserver observer;
  int64_t max_context = 0;
  int64_t generation_prompt_tokens = 0;

  // Guarded by mu.
  mutable std::mutex mu;
  std::condition_variable work_cv;  // engine: something to do (submit, cancel, stop)
  std::condition_variable done_cv;  // Drain: a session ended
  std::deque<std::unique_ptr<Session>> waiting;
  std::unordered_set<SessionId> live;     // submitted, final event not delivered yet
  std::unordered_set<SessionId> cancels;  // requested, not handled yet
  int64_t running_count = 0;
  SessionId next_id = 1;
  bool draining = false;
  bool stop = false;

  // Engine thread only.
  std::vector<std::unique_ptr<Session>> running;
  std::unique_ptr<BatchStepper> stepper;
  std::thread engine;

  StatusOr<std::unique_ptr<Session>> BuildSession(SessionRequest& request) const;
  void EngineLoop();
  // Admits waiting sessions (FIFO) whose pages can be reserved; collects ended waiting sessions.
  // Called with mu held.
  void AdmitLocked(std::vector<std::pair<std::unique_ptr<Session>, SessionFinish>>* ended,
                   Clock::time_point now);
  // Delivers the final event of `s` (pages and DySCO state freed first), on the engine thread.
  void Finish(std::unique_ptr<Session> s, SessionFinish finish, const Status& error,
              SessionEvent event, bool was_running);
  void RunStep();
};

StatusOr<std::unique_ptr<Session>> Scheduler::Impl::BuildSession(SessionRequest& request) const {
  const ModelConfig& config = runner->config();
  GenerateRequest& g = request.generate;
  if (g.prompt.empty() && g.messages.empty() && g.prompt_token_ids.empty()) {
    return InvalidArgumentError("prompt is empty (set prompt, messages or prompt_token_ids)");
  }
  if (g.max_new_tokens < 0) {
    return InvalidArgumentError("max_new_tokens must be >= 0 (0 = the default), got " +
                                std::to_string(g.max_new_tokens));
  }
  if (g.max_new_tokens > options.max_new_tokens_limit) {
    return InvalidArgumentError(
        "max_new_tokens must be <= " + std::to_string(options.max_new_tokens_limit) + ", got " +
        std::to_string(g.max_new_tokens));
  }
  const int64_t max_new = g.max_new_tokens == 0 ? options.max_new_tokens_default : g.max_new_tokens;
  DYSCO_RETURN_IF_ERROR(g.sampling.Validate());
  for (size_t i = 0; i < g.stop_strings.size(); ++i) {
    if (g.stop_strings[i].empty()) {
      return InvalidArgumentError("stop_strings[" + std::to_string(i) + "] is empty");
    }
  }
  for (size_t i = 0; i < g.stop_token_ids.size(); ++i) {
    if (g.stop_token_ids[i] < 0 || g.stop_token_ids[i] >= config.vocab_size) {
      return InvalidArgumentError(
          "stop_token_ids[" + std::to_string(i) + "] = " + std::to_string(g.stop_token_ids[i]) +
          " is outside the vocabulary [0, " + std::to_string(config.vocab_size) + ")");
    }
  }
  DYSCO_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, BuildPromptTokens(config, *tokenizer, g));
  const int64_t num_prompt = static_cast<int64_t>(prompt.size());
  if (num_prompt > max_context) {
    return InvalidArgumentError("prompt has " + std::to_string(num_prompt) +
                                " tokens, more than the context of " + std::to_string(max_context));
  }

  // The same sequence parameters as Generator::Generate, so both produce the same tokens.
  SequenceParams params;
  params.max_new_tokens = max_new;
  params.sampling = g.sampling;
  params.stop_strings = g.stop_strings;
  if (g.chat || !g.messages.empty()) {
    params.stop_strings.insert(params.stop_strings.end(), config.chat.stop_strings.begin(),
                               config.chat.stop_strings.end());
  }
  params.stop_token_ids = config.special_tokens.eos_token_ids;
  params.stop_token_ids.insert(params.stop_token_ids.end(), g.stop_token_ids.begin(),
                               g.stop_token_ids.end());
  params.max_context = max_context;

  auto s = std::make_unique<Session>();
  s->request_id = std::move(request.request_id);
  s->return_selection = request.return_selection;
  s->deadline = request.deadline;
  s->prompt_tokens = num_prompt;
  // The last sampled token is never fed back: the cache holds at most prompt + max_new - 1 tokens.
  s->reserve_tokens = std::min(num_prompt + max_new - 1, max_context);
  if (pool->pages_for_tokens(s->reserve_tokens) > pool->num_total()) {
    return ResourceExhaustedError(
        "request needs " + std::to_string(pool->pages_for_tokens(s->reserve_tokens)) +
        " KV pages (prompt " + std::to_string(num_prompt) + " + max_new_tokens " +
        std::to_string(max_new) + " tokens) but the KV pool has only " +
        std::to_string(pool->num_total()));
  }
  s->seq = std::make_unique<Sequence>(std::move(prompt), std::move(params), *tokenizer, pool);
  if (g.dysco) {
    const bool chat_formatted = IsChatFormatted(g);
    DYSCO_ASSIGN_OR_RETURN(DyscoParams dysco_params,
                           ResolveDyscoParams(config, g.dysco_overrides, chat_formatted, num_prompt,
                                              chat_formatted ? generation_prompt_tokens : -1));
    // The trace is taken every step: kept only when the client streams the selection.
    DYSCO_ASSIGN_OR_RETURN(
        std::unique_ptr<DyscoController> controller,
        DyscoController::Create(
            std::move(dysco_params), s->seq->tokens(),
            request.return_selection ? DyscoTraceMode::kSteps : DyscoTraceMode::kOff));
    s->seq->AttachDysco(std::move(controller));
    s->dysco = true;
  }
  return s;
}

void Scheduler::Impl::AdmitLocked(
    std::vector<std::pair<std::unique_ptr<Session>, SessionFinish>>* ended, Clock::time_point now) {
  // Cancelled or expired waiting sessions leave the queue first, wherever they are in it.
  for (auto it = waiting.begin(); it != waiting.end();) {
    Session& s = **it;
    SessionFinish finish = SessionFinish::kNone;
    if (stop || cancels.erase(s.id) > 0) {
      finish = SessionFinish::kCancelled;
    } else if (s.deadline && now >= *s.deadline) {
      finish = SessionFinish::kDeadlineExceeded;
    }
    if (finish == SessionFinish::kNone) {
      ++it;
      continue;
    }
    ended->emplace_back(std::move(*it), finish);
    it = waiting.erase(it);
  }
  // FIFO: the head waits for its pages rather than being overtaken by smaller requests, which
  // would starve a large one.
  while (!waiting.empty() && static_cast<int64_t>(running.size()) < options.max_batch_size) {
    Session& s = *waiting.front();
    if (!s.seq->ReservePages(s.reserve_tokens).ok()) break;
    s.admitted = now;
    running.push_back(std::move(waiting.front()));
    waiting.pop_front();
    ++running_count;
  }
}

void Scheduler::Impl::Finish(std::unique_ptr<Session> s, SessionFinish finish, const Status& error,
                             SessionEvent event, bool was_running) {
  const auto now = Clock::now();
  event.final = true;
  event.finish = finish;
  event.error = error;
  SessionUsage& u = event.usage;
  u.prompt_tokens = s->prompt_tokens;
  u.generated_tokens = s->generated;
  const auto admitted = was_running ? s->admitted : now;
  u.queue_seconds = Seconds(s->submitted, admitted);
  u.time_to_first_token_seconds = s->has_token ? Seconds(s->submitted, s->first_token) : 0.0;
  u.total_seconds = Seconds(s->submitted, now);
  if (const DyscoController* c = s->seq->dysco()) {
    u.dysco_overhead_seconds =
        c->totals().seconds.speculative_seconds + c->totals().seconds.select_seconds;
  }
  // Pages and DySCO state go back right now, before anyone hears of the end.
  s->seq.reset();
  if (was_running) {
    std::lock_guard<std::mutex> lock(mu);
    --running_count;
  }
  if (observer.on_session_end) {
    SessionObservation o;
    o.finish = finish;
    o.dysco = s->dysco;
    o.usage = u;
    o.inter_token_seconds = std::move(s->inter_token_seconds);
    try {
      observer.on_session_end(o);
    } catch (...) {
    }
  }
  try {
    s->callback(event);
  } catch (...) {
    // A throwing callback (or observer) must not take the engine down with it.
  }
  s->callback = nullptr;  // destroyed after its final event, outside the lock
  {
    std::lock_guard<std::mutex> lock(mu);
    live.erase(s->id);
    cancels.erase(s->id);
  }
  done_cv.notify_all();
}

void Scheduler::Impl::RunStep() {
  // Prompt tokens each session feeds this step: decoders (and DySCO sessions past their prefill)
  // always their one token; prefilling sessions a chunk each, in admission order, within
  // max_step_tokens, the first always at least one token so prefill never starves.
  std::vector<BatchStepEntry> entries;
  std::vector<size_t> index;  // running index of each entry
  int64_t single = 0;
  std::vector<int64_t> want(running.size(), 1);
  for (size_t i = 0; i < running.size(); ++i) {
    const Sequence& seq = *running[i]->seq;
    int64_t n = seq.num_uncached();
    if (const DyscoController* c = seq.dysco()) {
      const int64_t prefill_end = c->prefill_length();
      n = seq.num_cached() < prefill_end ? prefill_end - seq.num_cached() : 1;
    }
    want[i] = std::max<int64_t>(n, 1);
    if (want[i] == 1) ++single;
  }
  int64_t budget = options.max_step_tokens - single;
  bool first_prefill = true;
  for (size_t i = 0; i < running.size(); ++i) {
    int64_t n = 1;
    if (want[i] > 1) {
      n = std::min({want[i], options.prefill_chunk_tokens, budget});
      if (first_prefill) n = std::max<int64_t>(n, 1);
      first_prefill = false;
      if (n <= 0) continue;
      budget -= n;
    }
    entries.push_back({running[i]->seq.get(), n});
    index.push_back(i);
  }

  std::vector<BatchStepResult> results;
  Status status;
  try {
    status = stepper->Step(entries, &results);
  } catch (const std::exception& e) {
    status = InternalError(std::string("engine step failed: ") + e.what());
  } catch (...) {
    status = InternalError("engine step failed");
  }
  const auto now = Clock::now();
  const BatchStepStats& stats = stepper->last_stats();

  StepObservation obs;
  obs.batch_rows = static_cast<int64_t>(entries.size());
  obs.speculative_rows = stats.speculative_rows;
  obs.timings = stats.timings;
  for (const BatchStepEntry& e : entries) {
    if (e.sequence->dysco() != nullptr) ++obs.dysco_rows;
  }

  std::vector<std::unique_ptr<Session>> keep;
  std::vector<bool> stepped(running.size(), false);
  for (size_t i : index) stepped[i] = true;
  if (!status.ok()) {
    // The step's sequences may hold part of the failed step: every one of them is dropped.
    for (size_t i = 0; i < running.size(); ++i) {
      if (stepped[i]) {
        Finish(std::move(running[i]), SessionFinish::kError, status, SessionEvent(), true);
      } else {
        keep.push_back(std::move(running[i]));
      }
    }
  } else {
    for (size_t k = 0; k < entries.size(); ++k) {
      Session& s = *running[index[k]];
      const BatchStepResult& r = results[k];
      if (s.seq->dysco() != nullptr &&
          (r.kind == DyscoStepKind::kDynamic || r.kind == DyscoStepKind::kStatic)) {
        obs.selected_tokens.push_back(s.seq->dysco()->state().num_selected);
      }
    }
    for (size_t i = 0; i < running.size(); ++i) {
      if (!stepped[i]) {
        keep.push_back(std::move(running[i]));
        continue;
      }
      Session& s = *running[i];
      const size_t k =
          static_cast<size_t>(std::find(index.begin(), index.end(), i) - index.begin());
      const BatchStepResult& r = results[k];
      SessionEvent event;
      if (s.return_selection) {
        if (DyscoController* c = s.seq->dysco()) {
          std::vector<DyscoTraceRecord> records = c->TakeTrace();
          for (const DyscoTraceRecord& rec : records)
            event.selection.push_back(ToSelectionEvent(rec));
        }
      }
      if (r.sampled) {
        event.text = r.delta.text;
        event.token_ids.push_back(r.delta.token_id);
        if (s.has_token) {
          s.inter_token_seconds.push_back(Seconds(s.last_token, now));
        } else {
          s.first_token = now;
          s.has_token = true;
        }
        s.last_token = now;
        ++s.generated;
      }
      if (s.seq->finished()) {
        Finish(std::move(running[i]), FromFinishReason(s.seq->finish_reason()), OkStatus(),
               std::move(event), true);
        continue;
      }
      if (r.sampled || !event.selection.empty()) {
        try {
          s.callback(event);
        } catch (...) {
        }
      }
      keep.push_back(std::move(running[i]));
    }
  }
  running = std::move(keep);

  if (observer.on_step) {
    {
      std::lock_guard<std::mutex> lock(mu);
      obs.running = running_count;
      obs.waiting = static_cast<int64_t>(waiting.size());
    }
    obs.kv_usage_ratio = pool->usage_ratio();
    try {
      observer.on_step(obs);
    } catch (...) {
    }
  }
}

void Scheduler::Impl::EngineLoop() {
  for (;;) {
    std::vector<std::pair<std::unique_ptr<Session>, SessionFinish>> ended;
    std::unordered_set<SessionId> cancelled;
    bool stopping = false;
    bool stalled = false;  // sessions wait for pages that nothing of ours will free
    {
      std::unique_lock<std::mutex> lock(mu);
      work_cv.wait(lock, [&] { return stop || !waiting.empty() || !running.empty(); });
      stopping = stop;
      const auto now = Clock::now();
      // Running sessions first, so that their pages are free for the admission below.
      for (auto& s : running) {
        if (stop || cancels.count(s->id) > 0) cancelled.insert(s->id);
      }
      std::vector<std::unique_ptr<Session>> keep;
      for (auto& s : running) {
        SessionFinish finish = SessionFinish::kNone;
        if (cancelled.count(s->id) > 0) {
          finish = SessionFinish::kCancelled;
        } else if (s->deadline && now >= *s->deadline) {
          finish = SessionFinish::kDeadlineExceeded;
        }
        if (finish == SessionFinish::kNone) {
          keep.push_back(std::move(s));
        } else {
          // Pages back before admission (the final event is delivered below, outside the lock).
          s->seq->ReleasePages();
          ended.emplace_back(std::move(s), finish);
        }
      }
      running = std::move(keep);
      const size_t ended_running = ended.size();
      AdmitLocked(&ended, now);
      stalled = running.empty() && !waiting.empty();
      lock.unlock();
      for (size_t i = 0; i < ended.size(); ++i) {
        Finish(std::move(ended[i].first), ended[i].second, OkStatus(), SessionEvent(),
               i < ended_running);
      }
    }
    if (stopping) {
      std::lock_guard<std::mutex> lock(mu);
      if (waiting.empty() && running.empty()) return;
      continue;
    }
    if (!running.empty()) {
      RunStep();
    } else if (stalled) {
      // Another user of the pool holds the pages: poll, so deadlines and cancels still apply.
      std::unique_lock<std::mutex> lock(mu);
      work_cv.wait_for(lock, std::chrono::milliseconds(10));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------

StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(ModelRunner* runner, KvPagePool* pool,
                                                       const Tokenizer* tokenizer,
                                                       SchedulerOptions options,
                                                       SchedulerObserver observer) {
  if (runner == nullptr || pool == nullptr || tokenizer == nullptr) {
    return InvalidArgumentError("Scheduler needs a runner, a KV pool and a tokenizer");
  }
  const ModelConfig& config = runner->config();
  if (options.max_batch_size < 1) return InvalidArgumentError("max_batch_size must be >= 1");
  if (options.max_queued < 1) return InvalidArgumentError("max_queued must be >= 1");
  if (options.prefill_chunk_tokens < 1) {
    return InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  if (options.max_step_tokens < 1) return InvalidArgumentError("max_step_tokens must be >= 1");
  if (options.max_new_tokens_limit < 1) {
    return InvalidArgumentError("max_new_tokens_limit must be >= 1");
  }
  if (options.max_new_tokens_default < 1 ||
      options.max_new_tokens_default > options.max_new_tokens_limit) {
    return InvalidArgumentError("max_new_tokens_default must be in [1, max_new_tokens_limit]");
  }
  if (options.max_context_tokens < 0 ||
      options.max_context_tokens > config.max_position_embeddings) {
    return InvalidArgumentError("max_context_tokens must be in [0, " +
                                std::to_string(config.max_position_embeddings) + "]");
  }
  auto impl = std::make_unique<Impl>();
  impl->runner = runner;
  impl->pool = pool;
  impl->tokenizer = tokenizer;
  impl->options = options;
  impl->observer = std::move(observer);
  impl->max_context =
      options.max_context_tokens > 0 ? options.max_context_tokens : config.max_position_embeddings;
  impl->generation_prompt_tokens = CountGenerationPromptTokens(config, *tokenizer);
  impl->stepper = std::make_unique<BatchStepper>(runner, pool);
  Impl* raw = impl.get();
  try {
    impl->engine = std::thread([raw] { raw->EngineLoop(); });
  } catch (const std::exception& e) {
    return InternalError(std::string("cannot start the engine thread: ") + e.what());
  }
  return std::unique_ptr<Scheduler>(new Scheduler(std::move(impl)));
}

Scheduler::Scheduler(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
    impl_->draining = true;
  }
  impl_->work_cv.notify_all();
  if (impl_->engine.joinable()) impl_->engine.join();
}

StatusOr<SessionId> Scheduler::Submit(SessionRequest request, SessionCallback callback) {
  const auto submitted = Clock::now();
  if (!callback) return InvalidArgumentError("callback is empty");
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->draining) return UnavailableError("server is draining");
    const int64_t n = static_cast<int64_t>(impl_->waiting.size());
    if (n >= impl_->options.max_queued) {
      return ResourceExhaustedError("queue full (" + std::to_string(n) + " waiting)");
    }
  }
  // Validation and prompt encoding happen here, on the caller's thread, not on the engine's.
  DYSCO_ASSIGN_OR_RETURN(std::unique_ptr<Session> s, impl_->BuildSession(request));
  s->submitted = submitted;
  s->callback = std::move(callback);
  SessionId id = 0;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->draining) return UnavailableError("server is draining");
    const int64_t n = static_cast<int64_t>(impl_->waiting.size());
    if (n >= impl_->options.max_queued) {
      return ResourceExhaustedError("queue full (" + std::to_string(n) + " waiting)");
    }
    id = impl_->next_id++;
    s->id = id;
    impl_->live.insert(id);
    impl_->waiting.push_back(std::move(s));
  }
  impl_->work_cv.notify_one();
  return id;
}

void Scheduler::Cancel(SessionId id) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->live.count(id) == 0) return;
    impl_->cancels.insert(id);
  }
  impl_->work_cv.notify_one();
}

void Scheduler::Drain() {
  std::unique_lock<std::mutex> lock(impl_->mu);
  impl_->draining = true;
  impl_->done_cv.wait(lock, [&] { return impl_->live.empty(); });
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    st.running = impl_->running_count;
    st.waiting = static_cast<int64_t>(impl_->waiting.size());
    st.draining = impl_->draining;
  }
  st.kv_usage_ratio = impl_->pool->usage_ratio();
  return st;
}

}  // namespace dysco
