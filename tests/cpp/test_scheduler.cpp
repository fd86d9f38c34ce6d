// Tests of the continuous-batching Scheduler on the default model package: batched sessions give
// exactly the tokens each gives alone through Generator (plain and DySCO), chunked prefill of a
// long prompt does not stall decoding sessions, queue / pool limits, waiting for pages, cancel,
// deadline, drain, request validation (through the SequenceFactory), shutdown with sessions open
// (pages and callbacks freed), CancelAll, and callbacks or observers that throw.
//
// Some tests block the engine thread inside a session callback on purpose (the contract says a
// callback must not block): it freezes the scheduler at a known point so that queue states are
// deterministic rather than timing-dependent.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "core/engine/batch_stepper.h"
#include "core/engine/engine.h"
#include "core/engine/scheduler.h"
#include "tests/cpp/model_fixture.h"

namespace dysco {
namespace {

// Records every session's events, and a global log of events and steps in the order they happened.
class Recorder {
 public:
  struct Stream {
    std::vector<int32_t> tokens;
    std::string text;
    std::vector<SelectionEvent> selection;
    int64_t token_events = 0;
    bool done = false;
    SessionEvent final_event;
  };
  struct LogEntry {
    int session = -1;  // -1: a step ended
    int64_t tokens = 0;
    bool final = false;
    std::chrono::steady_clock::time_point at;
  };

  SessionCallback Callback(int session, std::function<void(const SessionEvent&)> hook = nullptr) {
    return [this, session, hook](const SessionEvent& e) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        Stream& s = streams_[session];
        EXPECT_FALSE(s.done) << "event after the final event of session " << session;
        s.tokens.insert(s.tokens.end(), e.token_ids.begin(), e.token_ids.end());
        s.text += e.text;
        s.selection.insert(s.selection.end(), e.selection.begin(), e.selection.end());
        if (!e.token_ids.empty()) ++s.token_events;
        if (e.final) {
          s.done = true;
          s.final_event = e;
        }
        log_.push_back({session, static_cast<int64_t>(e.token_ids.size()), e.final,
                        std::chrono::steady_clock::now()});
        // Under the lock: a waiter that sees the final event may end the test and destroy this
        // Recorder as soon as the lock is free (TSan found the notify racing that destruction).
        cv_.notify_all();
      }
      if (hook) hook(e);
    };
  }
  void OnStep() {
    std::lock_guard<std::mutex> lock(mu_);
    log_.push_back({-1, 0, false, std::chrono::steady_clock::now()});
  }

  // Waits until `session` has its final event (or `tokens` tokens, when > 0).
  void Wait(int session, int64_t tokens = 0) {
    std::unique_lock<std::mutex> lock(mu_);
    const bool ok = cv_.wait_for(lock, std::chrono::seconds(120), [&] {
      const Stream& s = streams_[session];
      return s.done || (tokens > 0 && static_cast<int64_t>(s.tokens.size()) >= tokens);
    });
    EXPECT_TRUE(ok) << "timed out waiting for session " << session;
  }
  Stream Get(int session) {
    std::lock_guard<std::mutex> lock(mu_);
    return streams_[session];
  }
  std::vector<LogEntry> Log() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, Stream> streams_;
  std::vector<LogEntry> log_;
};

// A one-shot gate: the engine thread waits in a callback until the test opens it.
class Gate {
 public:
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void Pass() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

class SchedulerTest : public DefaultModelTest {
 protected:
  void SetUp() override {
    DefaultModelTest::SetUp();
    if (ModelMissing()) return;
    pool_ = MakePool(128);
  }

  // A scheduler over pool_ with the default model's factory, or with `factory` (which must
  // outlive it).
  std::unique_ptr<Scheduler> MakeScheduler(SchedulerOptions o, SchedulerObserver obs = {},
                                           const SequenceFactory* factory = nullptr) {
    auto s = Scheduler::Create(runner_, pool_.get(), factory != nullptr ? factory : factory_, o,
                               std::move(obs));
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(s).value() : nullptr;
  }

  // A factory with other request limits; owned by the test fixture (outlives its schedulers).
  const SequenceFactory* MakeFactory(const RequestLimits& limits) {
    auto f = SequenceFactory::Create(runner_->config(), *tokenizer_, limits);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    if (!f.ok()) return nullptr;
    factories_.push_back(std::make_unique<SequenceFactory>(std::move(f).value()));
    return factories_.back().get();
  }

  static GenerateRequest Chat(const std::string& prompt, int64_t max_new_tokens) {
    GenerateRequest r;
    r.prompt = prompt;
    r.chat = true;
    r.max_new_tokens = max_new_tokens;
    return r;
  }
  // Plain-text continuation: the model rarely ends it early, so it runs to max_new_tokens.
  static GenerateRequest Story(const std::string& prompt, int64_t max_new_tokens) {
    GenerateRequest r;
    r.prompt = prompt;
    r.max_new_tokens = max_new_tokens;
    return r;
  }
  static SessionRequest Session(GenerateRequest g) {
    SessionRequest r;
    r.generate = std::move(g);
    return r;
  }

  GenerateResult Alone(const GenerateRequest& r, int64_t chunk = 512) {
    auto pool = MakePool(128);
    GeneratorOptions o;
    o.prefill_chunk_tokens = chunk;
    Generator g(runner_, pool.get(), factory_, o);
    auto res = g.Generate(r);
    EXPECT_TRUE(res.ok()) << res.status().ToString();
    return res.ok() ? std::move(res).value() : GenerateResult();
  }

  void ExpectIdle(Scheduler& s) {
    const SchedulerStats st = s.stats();
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.waiting, 0);
    EXPECT_DOUBLE_EQ(st.kv_usage_ratio, 0.0);
    EXPECT_EQ(pool_->num_free(), pool_->num_total());
  }

  std::vector<std::unique_ptr<SequenceFactory>> factories_;
  std::unique_ptr<KvPagePool> pool_;
};

const std::vector<std::string> kQuestions = {
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Explain briefly.",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "List two programming languages.",
    "Translate 'good morning' into Spanish.",
};

// (1) Eight concurrent greedy sessions: each gets exactly the tokens it gets alone.
TEST_F(SchedulerTest, ConcurrentGreedySessionsEqualGeneratorAlone) {
  Recorder rec;
  int64_t max_rows = 0;
  SchedulerObserver obs;
  obs.on_step = [&](const StepObservation& o) { max_rows = std::max(max_rows, o.batch_rows); };
  std::vector<SessionId> ids;
  {
    SchedulerOptions o;
    o.max_batch_size = 8;
    auto sched = MakeScheduler(o, obs);
    ASSERT_NE(sched, nullptr);
    for (size_t i = 0; i < kQuestions.size(); ++i) {
      auto id = sched->Submit(Session(Chat(kQuestions[i], 8)), rec.Callback(static_cast<int>(i)));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      ids.push_back(*id);
    }
    for (size_t i = 0; i < kQuestions.size(); ++i) rec.Wait(static_cast<int>(i));
    ExpectIdle(*sched);
  }
  EXPECT_GT(max_rows, 1) << "the sessions were never batched";
  for (size_t i = 0; i < kQuestions.size(); ++i) {
    const GenerateResult alone = Alone(Chat(kQuestions[i], 8));
    const Recorder::Stream s = rec.Get(static_cast<int>(i));
    EXPECT_EQ(s.tokens, alone.token_ids) << kQuestions[i];
    EXPECT_EQ(s.text, alone.text) << kQuestions[i];
    EXPECT_EQ(s.final_event.finish, alone.finish_reason)
        << FinishReasonName(s.final_event.finish) << " vs "
        << FinishReasonName(alone.finish_reason);
    EXPECT_EQ(s.final_event.usage.prompt_tokens, alone.prompt_tokens);
    EXPECT_EQ(s.final_event.usage.generated_tokens, alone.generated_tokens);
    EXPECT_GE(s.final_event.usage.total_seconds, s.final_event.usage.time_to_first_token_seconds);
    EXPECT_TRUE(s.final_event.error.ok());
  }
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

// (2) DySCO and plain sessions mixed in one batch; DySCO ones equal Generator with DySCO, and the
// streamed selection equals the Generator's trace.
TEST_F(SchedulerTest, MixedDyscoAndPlainEqualGeneratorAlone) {
  const std::vector<std::pair<int, int>> heads = {{12, 3}, {14, 0}, {15, 2}, {16, 5}};
  std::vector<GenerateRequest> reqs;
  reqs.push_back(Chat(kQuestions[0], 10));
  reqs.back().dysco = true;
  reqs.back().dysco_overrides.selected_heads = heads;
  reqs.push_back(Chat(kQuestions[3], 10));  // plain
  reqs.push_back(Story("The old lighthouse keeper climbed the stairs every night, and", 10));
  reqs.back().dysco = true;  // static variant, other heads, stronger
  reqs.back().dysco_overrides.selected_heads = std::vector<std::pair<int, int>>{{20, 1}, {9, 4}};
  reqs.back().dysco_overrides.dynamic_rescale = false;
  reqs.back().dysco_overrides.strength = 4.0;
  reqs.back().dysco_overrides.top_k = 8;
  reqs.push_back(Story("In the beginning of the twentieth century, the city", 10));  // plain
  const std::vector<bool> selection = {true, false, false, false};

  Recorder rec;
  int64_t max_dysco_rows = 0, max_rows = 0, selected_rows = 0;
  SchedulerObserver obs;
  obs.on_step = [&](const StepObservation& o) {
    max_dysco_rows = std::max(max_dysco_rows, o.dysco_rows);
    max_rows = std::max(max_rows, o.batch_rows);
    selected_rows += static_cast<int64_t>(o.selected_tokens.size());
  };
  int dysco_ends = 0;
  obs.on_session_end = [&](const SessionObservation& o) { dysco_ends += o.dysco; };
  {
    auto sched = MakeScheduler(SchedulerOptions(), obs);
    ASSERT_NE(sched, nullptr);
    for (size_t i = 0; i < reqs.size(); ++i) {
      SessionRequest r = Session(reqs[i]);
      r.return_selection = selection[i];
      auto id = sched->Submit(r, rec.Callback(static_cast<int>(i)));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
    }
    for (size_t i = 0; i < reqs.size(); ++i) rec.Wait(static_cast<int>(i));
    ExpectIdle(*sched);
  }
  EXPECT_EQ(max_dysco_rows, 2);
  EXPECT_GE(max_rows, 3);
  EXPECT_GT(selected_rows, 0);
  EXPECT_EQ(dysco_ends, 2);
  for (size_t i = 0; i < reqs.size(); ++i) {
    GenerateRequest r = reqs[i];
    r.dysco_trace = DyscoTraceMode::kSteps;
    const GenerateResult alone = Alone(r);
    const Recorder::Stream s = rec.Get(static_cast<int>(i));
    EXPECT_EQ(s.tokens, alone.token_ids) << "session " << i;
    EXPECT_EQ(s.text, alone.text) << "session " << i;
    if (reqs[i].dysco) {
      EXPECT_GT(s.final_event.usage.dysco_overhead_seconds, 0.0);
    } else {
      EXPECT_EQ(s.final_event.usage.dysco_overhead_seconds, 0.0);
    }
    if (!selection[i]) {
      EXPECT_TRUE(s.selection.empty());
      continue;
    }
    ASSERT_EQ(s.selection.size(), alone.dysco_trace.size());
    for (size_t k = 0; k < s.selection.size(); ++k) {
      EXPECT_EQ(s.selection[k].position, alone.dysco_trace[k].position);
      EXPECT_EQ(s.selection[k].phase, alone.dysco_trace[k].phase);
      EXPECT_EQ(s.selection[k].num_selected, alone.dysco_trace[k].num_selected);
      EXPECT_EQ(s.selection[k].ranges, alone.dysco_trace[k].selected);
    }
  }
  // DySCO changed something (it is not a no-op here), so the equality above means something.
  GenerateRequest plain = reqs[2];
  plain.dysco = false;
  EXPECT_NE(Alone(plain).token_ids, rec.Get(2).tokens) << "DySCO made no difference";
}

// (3) A long prompt prefilled in chunks while two sessions decode: they keep getting tokens.
TEST_F(SchedulerTest, LongPromptPrefillDoesNotStallDecoders) {
  std::string text;
  for (int i = 0; text.size() < 12000; ++i) {
    text += "Paragraph " + std::to_string(i) +
            ": the committee reviewed the harbour accounts, the grain stores and the roads. ";
  }
  std::vector<int32_t> ids = tokenizer_->Encode(text, false);
  ASSERT_GE(ids.size(), 1500u);
  ids.resize(1500);
  GenerateRequest long_req;
  long_req.prompt_token_ids = ids;
  long_req.max_new_tokens = 4;

  Recorder rec;
  SchedulerObserver obs;
  obs.on_step = [&](const StepObservation&) { rec.OnStep(); };
  SchedulerOptions o;
  o.prefill_chunk_tokens = 128;
  o.max_step_tokens = 256;
  auto sched = MakeScheduler(o, obs);
  ASSERT_NE(sched, nullptr);
  const GenerateRequest d0 = Story("Once upon a time, in a small village by the mountains,", 24);
  const GenerateRequest d1 = Story("The history of the printing press begins", 24);
  ASSERT_TRUE(sched->Submit(Session(d0), rec.Callback(0)).ok());
  ASSERT_TRUE(sched->Submit(Session(d1), rec.Callback(1)).ok());
  rec.Wait(0, 2);
  rec.Wait(1, 2);
  ASSERT_TRUE(sched->Submit(Session(long_req), rec.Callback(2)).ok());
  for (int i = 0; i < 3; ++i) rec.Wait(i);

  // Between the long session's submission (after both decoders had 2 tokens) and its first token,
  // each decoder received a token in (nearly) every step of the 12-chunk prefill.
  const auto log = rec.Log();
  int64_t tokens_before_long[2] = {0, 0};
  int64_t decoder_tokens_at[2] = {0, 0};
  bool long_started = false;
  for (const auto& e : log) {
    if (e.session == 2 && e.tokens > 0) {
      long_started = true;
      break;
    }
    if (e.session == 0 || e.session == 1) decoder_tokens_at[e.session] += e.tokens;
  }
  ASSERT_TRUE(long_started);
  for (int d = 0; d < 2; ++d) {
    tokens_before_long[d] = decoder_tokens_at[d];
    EXPECT_GE(tokens_before_long[d], 2 + 10) << "decoder " << d << " stalled during the prefill";
    EXPECT_EQ(rec.Get(d).final_event.finish, FinishReason::kLength);
  }
  // Chunked prefill next to decoders is still exact.
  EXPECT_EQ(rec.Get(2).tokens, Alone(long_req, 128).token_ids);
  ExpectIdle(*sched);
}

// (4a) The waiting queue is bounded; a request that can never fit the pool is refused at once.
TEST_F(SchedulerTest, QueueLimitAndPoolTooSmall) {
  Gate gate;
  Recorder rec;
  SchedulerOptions o;
  o.max_batch_size = 1;
  o.max_queued = 2;
  auto sched = MakeScheduler(o);
  ASSERT_NE(sched, nullptr);
  std::atomic<bool> first{true};
  auto hold = [&](const SessionEvent&) {
    if (first.exchange(false)) gate.Pass();  // the engine stays inside this step's delivery
  };
  ASSERT_TRUE(sched->Submit(Session(Story("Once upon a time", 6)), rec.Callback(0, hold)).ok());
  rec.Wait(0, 1);  // running, engine held
  ASSERT_TRUE(sched->Submit(Session(Story("The river", 3)), rec.Callback(1)).ok());
  ASSERT_TRUE(sched->Submit(Session(Story("A dog", 3)), rec.Callback(2)).ok());
  auto full = sched->Submit(Session(Story("A cat", 3)), rec.Callback(3));
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(full.status().message(), "queue full (2 waiting)");
  // A wrong request is INVALID_ARGUMENT, full queue or not: the client must fix it, not retry it.
  GenerateRequest wrong = Story("A cat", 3);
  wrong.sampling.top_p = 1.5;
  auto invalid = sched->Submit(Session(wrong), rec.Callback(3));
  EXPECT_EQ(invalid.status().code(), StatusCode::kInvalidArgument) << invalid.status().ToString();
  EXPECT_EQ(sched->stats().waiting, 2);
  EXPECT_EQ(sched->stats().running, 1);
  gate.Open();
  for (int i = 0; i < 3; ++i) rec.Wait(i);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(rec.Get(i).tokens.empty());
  EXPECT_FALSE(rec.Get(3).done);  // a refused request's callback is never called
  ExpectIdle(*sched);

  // 8 pages of 16 tokens cannot hold the chat prompt (~40 tokens) + 100 new tokens.
  sched.reset();
  pool_ = MakePool(8);
  sched = MakeScheduler(SchedulerOptions());
  auto big = sched->Submit(Session(Chat(kQuestions[0], 100)), rec.Callback(4));
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted) << big.status().ToString();
  EXPECT_NE(big.status().message().find("KV pages"), std::string::npos) << big.status().message();
  ExpectIdle(*sched);
}

// (4b) Requests that fit the pool only one at a time wait for pages and run when others finish.
TEST_F(SchedulerTest, RequestsWaitForPagesThenRun) {
  pool_ = MakePool(5);  // 80 tokens: one chat prompt (~40) + 16 new tokens (4 pages) at a time
  Recorder rec;
  std::atomic<int64_t> max_running{0}, max_waiting{0};  // written by the engine thread only
  SchedulerObserver obs;
  obs.on_step = [&](const StepObservation& o) {
    max_running = std::max<int64_t>(max_running, o.running);
    max_waiting = std::max<int64_t>(max_waiting, o.waiting);
    rec.OnStep();
  };
  auto sched = MakeScheduler(SchedulerOptions(), obs);
  ASSERT_NE(sched, nullptr);
  std::vector<GenerateRequest> reqs = {Chat(kQuestions[2], 16), Chat(kQuestions[3], 16),
                                       Chat(kQuestions[6], 16)};
  Gate gate;  // holds the engine in session 0's first token until all three are queued
  std::atomic<bool> first{true};
  std::function<void(const SessionEvent&)> hold = [&](const SessionEvent&) {
    if (first.exchange(false)) gate.Pass();
  };
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(
        sched->Submit(Session(reqs[i]), rec.Callback(static_cast<int>(i), i == 0 ? hold : nullptr))
            .ok());
  }
  gate.Open();
  for (int i = 0; i < 3; ++i) rec.Wait(i);
  EXPECT_EQ(max_running, 1);
  EXPECT_GE(max_waiting, 1);
  // Each one starts only after the one before it ended (FIFO, one at a time).
  const auto log = rec.Log();
  std::vector<size_t> first_event(3, log.size()), final_event(3, 0);
  for (size_t k = 0; k < log.size(); ++k) {
    const int s = log[k].session;
    if (s < 0) continue;
    first_event[s] = std::min(first_event[s], k);
    if (log[k].final) final_event[s] = k;
  }
  EXPECT_LT(final_event[0], first_event[1]);
  EXPECT_LT(final_event[1], first_event[2]);
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_FALSE(rec.Get(static_cast<int>(i)).tokens.empty());
  EXPECT_GT(rec.Get(2).final_event.usage.queue_seconds, 0.0);
  ExpectIdle(*sched);
}

// (5) Cancel (running and waiting) and deadline end a session within one step, freeing its pages.
TEST_F(SchedulerTest, CancelAndDeadlineEndWithinOneStep) {
  Recorder rec;
  SchedulerObserver obs;
  obs.on_step = [&](const StepObservation&) { rec.OnStep(); };
  SchedulerOptions o;
  o.max_batch_size = 2;
  auto sched = MakeScheduler(o, obs);
  ASSERT_NE(sched, nullptr);

  // Session 0 cancels itself from its own third token's callback (Cancel is allowed there).
  std::atomic<int64_t> tokens0{0};
  Scheduler* raw = sched.get();
  std::atomic<SessionId> id0{0};
  auto cancel_at_3 = [&](const SessionEvent& e) {
    if (!e.final && (tokens0 += static_cast<int64_t>(e.token_ids.size())) == 3) raw->Cancel(id0);
  };
  auto a = sched->Submit(Session(Story("Once upon a time", 300)), rec.Callback(0, cancel_at_3));
  ASSERT_TRUE(a.ok());
  id0 = *a;
  // Session 1 has a deadline.
  SessionRequest timed = Session(Story("The history of the printing press begins", 300));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(400);
  timed.deadline = deadline;
  ASSERT_TRUE(sched->Submit(timed, rec.Callback(1)).ok());
  // Session 2 waits (batch of 2 full) and is cancelled while waiting.
  auto c = sched->Submit(Session(Story("A dog", 300)), rec.Callback(2));
  ASSERT_TRUE(c.ok());
  sched->Cancel(*c);
  sched->Cancel(987654);  // unknown: ignored

  for (int i = 0; i < 3; ++i) rec.Wait(i);
  const auto s0 = rec.Get(0), s1 = rec.Get(1), s2 = rec.Get(2);
  EXPECT_EQ(s0.final_event.finish, FinishReason::kCancelled);
  EXPECT_EQ(s0.tokens.size(), 3u) << "a token was delivered after Cancel";
  EXPECT_EQ(s0.final_event.usage.generated_tokens, 3);
  EXPECT_EQ(s1.final_event.finish, FinishReason::kDeadlineExceeded);
  EXPECT_LT(s1.tokens.size(), 300u);
  EXPECT_EQ(s2.final_event.finish, FinishReason::kCancelled);
  EXPECT_TRUE(s2.tokens.empty());
  EXPECT_EQ(s2.final_event.usage.generated_tokens, 0);
  // At most one step (the one running when the deadline passed) ended between the deadline and the
  // final event of session 1.
  int64_t steps_after_deadline = 0;
  for (const auto& e : rec.Log()) {
    if (e.session == 1 && e.final) break;
    steps_after_deadline += e.session < 0 && e.at >= deadline;
  }
  EXPECT_LE(steps_after_deadline, 1);
  ExpectIdle(*sched);
  sched->Cancel(id0);  // finished: ignored
}

// (6) Drain refuses new sessions and completes the running and waiting ones.
TEST_F(SchedulerTest, DrainRefusesNewAndCompletesOpen) {
  Gate gate;
  Recorder rec;
  SchedulerOptions o;
  o.max_batch_size = 2;
  auto sched = MakeScheduler(o);
  ASSERT_NE(sched, nullptr);
  std::atomic<bool> first{true};
  auto hold = [&](const SessionEvent&) {
    if (first.exchange(false)) gate.Pass();
  };
  ASSERT_TRUE(sched->Submit(Session(Story("Once upon a time", 5)), rec.Callback(0, hold)).ok());
  rec.Wait(0, 1);
  ASSERT_TRUE(sched->Submit(Session(Story("The river", 5)), rec.Callback(1)).ok());
  ASSERT_TRUE(sched->Submit(Session(Story("A dog", 5)), rec.Callback(2)).ok());
  std::thread drainer([&] { sched->Drain(); });
  while (!sched->stats().draining) std::this_thread::yield();
  auto refused = sched->Submit(Session(Story("A cat", 3)), rec.Callback(3));
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(refused.status().message(), "server is draining");
  gate.Open();
  drainer.join();
  for (int i = 0; i < 3; ++i) {
    const auto s = rec.Get(i);
    EXPECT_TRUE(s.done) << "Drain returned before session " << i << " finished";
    EXPECT_EQ(s.final_event.finish, FinishReason::kLength);
    EXPECT_EQ(s.tokens.size(), 5u);
  }
  EXPECT_FALSE(rec.Get(3).done);
  EXPECT_EQ(sched->Submit(Session(Story("A cat", 3)), rec.Callback(4)).status().code(),
            StatusCode::kUnavailable);
  ExpectIdle(*sched);
}

// (7) Every bad request is INVALID_ARGUMENT naming its field; nothing is queued.
TEST_F(SchedulerTest, ValidationNamesTheField) {
  auto sched = MakeScheduler(SchedulerOptions());
  ASSERT_NE(sched, nullptr);
  const std::vector<std::pair<int, int>> heads = {{12, 3}, {14, 0}};
  struct Case {
    std::string name;
    std::function<void(SessionRequest&)> edit;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"empty prompt", [](SessionRequest& r) { r.generate.prompt.clear(); }, "prompt is empty"},
      {"two prompt sources",
       [](SessionRequest& r) {
         r.generate.prompt_token_ids = {1, 2};
       },
       "prompt_token_ids"},
      {"token out of vocabulary",
       [](SessionRequest& r) {
         r.generate.prompt.clear();
         r.generate.prompt_token_ids = {1, 49152};
       },
       "prompt_token_ids[1]"},
      {"max_new_tokens too large", [](SessionRequest& r) { r.generate.max_new_tokens = 5000; },
       "max_new_tokens must be <= 4096"},
      {"max_new_tokens negative", [](SessionRequest& r) { r.generate.max_new_tokens = -1; },
       "max_new_tokens"},
      {"negative temperature", [](SessionRequest& r) { r.generate.sampling.temperature = -0.5; },
       "sampling.temperature must be >= 0"},
      {"top_p above 1", [](SessionRequest& r) { r.generate.sampling.top_p = 1.5; },
       "sampling.top_p"},
      {"negative top_k", [](SessionRequest& r) { r.generate.sampling.top_k = -3; },
       "sampling.top_k"},
      {"zero repetition penalty",
       [](SessionRequest& r) { r.generate.sampling.repetition_penalty = 0.0; },
       "sampling.repetition_penalty"},
      {"empty stop string",
       [](SessionRequest& r) {
         r.generate.stop_strings = {"ok", ""};
       },
       "stop_strings[1]"},
      {"stop token out of vocabulary", [](SessionRequest& r) { r.generate.stop_token_ids = {-4}; },
       "stop_token_ids[0]"},
      {"bad chat role",
       [](SessionRequest& r) {
         r.generate.prompt.clear();
         r.generate.messages = {{"narrator", "hi"}};
       },
       "messages[0].role"},
      {"dysco top_p",
       [&](SessionRequest& r) {
         r.generate.dysco = true;
         r.generate.dysco_overrides.selected_heads = heads;
         r.generate.dysco_overrides.top_p = 1.5;
       },
       "dysco.top_p"},
      {"dysco head out of range",
       [&](SessionRequest& r) {
         r.generate.dysco = true;
         r.generate.dysco_overrides.selected_heads =
             std::vector<std::pair<int, int>>{{12, 3}, {40, 0}};
       },
       "dysco.selected_heads[1]"},
      {"dysco override checked without dysco",
       [&](SessionRequest& r) {
         r.generate.dysco = false;
         r.generate.dysco_overrides.top_p = 1.5;
       },
       "dysco.top_p"},
      {"dysco strength",
       [&](SessionRequest& r) {
         r.generate.dysco = true;
         r.generate.dysco_overrides.selected_heads = heads;
         r.generate.dysco_overrides.strength = 0.0;
       },
       "dysco.strength"},
      {"prompt longer than the context",
       [&](SessionRequest& r) {
         r.generate.prompt.clear();
         r.generate.prompt_token_ids.assign(runner_->config().max_position_embeddings + 1, 1);
       },
       "prompt"},
  };
  for (const Case& c : cases) {
    SessionRequest r = Session(Chat(kQuestions[0], 4));
    c.edit(r);
    bool called = false;
    auto id = sched->Submit(r, [&](const SessionEvent&) { called = true; });
    ASSERT_FALSE(id.ok()) << c.name;
    EXPECT_EQ(id.status().code(), StatusCode::kInvalidArgument)
        << c.name << ": " << id.status().ToString();
    EXPECT_NE(id.status().message().find(c.field), std::string::npos)
        << c.name << ": " << id.status().message();
    EXPECT_FALSE(called);
  }
  // A small max_context_tokens applies to the prompt too.
  RequestLimits small;
  small.max_context_tokens = 16;
  const SequenceFactory* small_factory = MakeFactory(small);
  ASSERT_NE(small_factory, nullptr);
  auto limited = MakeScheduler(SchedulerOptions(), {}, small_factory);
  ASSERT_NE(limited, nullptr);
  auto id = limited->Submit(Session(Chat(kQuestions[0], 4)), [](const SessionEvent&) {});
  EXPECT_EQ(id.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(id.status().message().rfind("prompt", 0), 0u) << id.status().message();
  ExpectIdle(*sched);
  // max_new_tokens 0 means the scheduler's default.
  RequestLimits two;
  two.max_new_tokens_default = 2;
  const SequenceFactory* two_factory = MakeFactory(two);
  ASSERT_NE(two_factory, nullptr);
  auto defaulted = MakeScheduler(SchedulerOptions(), {}, two_factory);
  ASSERT_NE(defaulted, nullptr);
  Recorder rec;
  ASSERT_TRUE(defaulted->Submit(Session(Story("Once upon a time", 0)), rec.Callback(0)).ok());
  rec.Wait(0);
  EXPECT_EQ(rec.Get(0).final_event.usage.generated_tokens, 2);
  EXPECT_EQ(rec.Get(0).final_event.finish, FinishReason::kLength);
  // Bad options are refused by Create.
  SchedulerOptions bad;
  bad.max_batch_size = 0;
  EXPECT_EQ(Scheduler::Create(runner_, pool_.get(), factory_, bad).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(Scheduler::Create(runner_, pool_.get(), nullptr, SchedulerOptions()).status().code(),
            StatusCode::kInvalidArgument);
}

// (8) Destroying the scheduler with sessions running and waiting cancels them, returns every page
// and destroys every callback.
TEST_F(SchedulerTest, DestructorCancelsOpenSessions) {
  Recorder rec;
  auto token = std::make_shared<int>(0);  // held by every callback
  {
    SchedulerOptions o;
    o.max_batch_size = 2;
    auto sched = MakeScheduler(o);
    ASSERT_NE(sched, nullptr);
    for (int i = 0; i < 4; ++i) {
      SessionRequest r =
          Session(Story(i % 2 ? "Once upon a time, in a small village by the mountains, there lived"
                              : "The river flows",
                        300));
      r.generate.dysco = i == 1;
      r.generate.dysco_overrides.selected_heads =
          std::vector<std::pair<int, int>>{{12, 3}, {14, 0}};
      auto cb = rec.Callback(i);
      ASSERT_TRUE(sched->Submit(r, [cb, token](const SessionEvent& e) { cb(e); }).ok());
    }
    rec.Wait(0, 2);
    EXPECT_GT(pool_->usage_ratio(), 0.0);
    EXPECT_EQ(token.use_count(), 5);
  }
  for (int i = 0; i < 4; ++i) {
    const auto s = rec.Get(i);
    EXPECT_TRUE(s.done);
    EXPECT_EQ(s.final_event.finish, FinishReason::kCancelled) << i;
  }
  EXPECT_EQ(token.use_count(), 1) << "a session callback was not destroyed";
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

// (9) A failing step ends that step's sessions with kError and the Status; the engine survives.
TEST_F(SchedulerTest, StepErrorFailsOnlyThatStepsSessions) {
  // A pool shaped for another model: the runner refuses every step that uses it.
  ModelConfig other = runner_->config();
  other.head_dim /= 2;
  KvPagePoolOptions po;
  po.num_pages = 64;
  auto bad_pool = KvPagePool::Create(other, po);
  ASSERT_TRUE(bad_pool.ok()) << bad_pool.status().ToString();
  Recorder rec;
  {
    auto sched = Scheduler::Create(runner_, bad_pool->get(), factory_, SchedulerOptions());
    ASSERT_TRUE(sched.ok());
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE((*sched)->Submit(Session(Chat(kQuestions[i], 4)), rec.Callback(i)).ok());
    }
    for (int i = 0; i < 2; ++i) rec.Wait(i);
    for (int i = 0; i < 2; ++i) {
      const auto s = rec.Get(i);
      EXPECT_EQ(s.final_event.finish, FinishReason::kError);
      EXPECT_FALSE(s.final_event.error.ok());
      EXPECT_NE(s.final_event.error.message().find("kv_pool"), std::string::npos)
          << s.final_event.error.ToString();
      EXPECT_TRUE(s.tokens.empty());
    }
    // Still serving.
    ASSERT_TRUE((*sched)->Submit(Session(Chat(kQuestions[2], 4)), rec.Callback(2)).ok());
    rec.Wait(2);
    EXPECT_EQ(rec.Get(2).final_event.finish, FinishReason::kError);
    EXPECT_EQ((*sched)->stats().running, 0);
    EXPECT_EQ((*bad_pool)->num_free(), (*bad_pool)->num_total());
  }
}

// An op failing for one session in a batched step (the DYSCO_FAILPOINT_FORWARD_TOKEN fail point:
// every forward that feeds that token throws as an op would): only that session ends with INTERNAL;
// its batch-mates, plain and DySCO, get exactly the tokens they get alone, and the scheduler keeps
// serving. The failing session feeds the token at a context warm-up step, so the step fails in its
// real forward after a DySCO batch-mate's dynamic selection was computed: that selection must not
// have reached its controller (the step is a transaction) for the batch-mate's re-run to be right.
TEST_F(SchedulerTest, OpFailureEndsOnlyTheFailingSession) {
  const GenerateRequest plain = Story("Once upon a time", 40);
  GenerateRequest with_dysco = Chat(kQuestions[1], 10);
  with_dysco.dysco = true;
  const GenerateResult plain_alone = Alone(plain);
  const GenerateResult dysco_alone = Alone(with_dysco);
  // A token the other prompts and their continuations never feed: the last id of the vocabulary.
  const int32_t fault = static_cast<int32_t>(runner_->config().vocab_size - 1);
  for (const GenerateResult* r : {&plain_alone, &dysco_alone}) {
    ASSERT_EQ(std::count(r->token_ids.begin(), r->token_ids.end(), fault), 0);
  }
  // A DySCO prompt (token ids: context warm-up 8 + intervention warm-up 2) whose first context
  // warm-up token is the fault.
  auto ids = factory_->BuildPrompt(
      Story("The river flows past the old mill, under the stone bridge and on to the sea.", 1));
  ASSERT_TRUE(ids.ok());
  ASSERT_GT(ids->size(), 12u);
  GenerateRequest faulty;
  faulty.prompt_token_ids = *ids;
  faulty.prompt_token_ids[ids->size() - 10] = fault;
  faulty.max_new_tokens = 4;
  faulty.dysco = true;

  ::setenv("DYSCO_FAILPOINT_FORWARD_TOKEN", std::to_string(fault).c_str(), 1);
  EngineOptions eo;
  eo.kv_pages = 128;
  auto engine = Engine::Load(kModelDir, eo);
  ::unsetenv("DYSCO_FAILPOINT_FORWARD_TOKEN");
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  Scheduler* sched = (*engine)->scheduler();
  Recorder rec;
  Gate gate;
  bool held = false;
  // Holds the engine at the DySCO session's first generated token (from then on each of its steps
  // is a dynamic intervention) until the failing session is queued.
  auto hold = [&](const SessionEvent& e) {
    if (!e.token_ids.empty() && !held) {
      held = true;
      gate.Pass();
    }
  };
  auto plain_id = sched->Submit(Session(plain), rec.Callback(0));
  ASSERT_TRUE(plain_id.ok()) << plain_id.status().ToString();
  auto dysco_id = sched->Submit(Session(with_dysco), rec.Callback(1, hold));
  ASSERT_TRUE(dysco_id.ok()) << dysco_id.status().ToString();
  rec.Wait(1, 1);
  auto faulty_id = sched->Submit(Session(faulty), rec.Callback(2));
  ASSERT_TRUE(faulty_id.ok()) << faulty_id.status().ToString();
  gate.Open();
  for (int i = 0; i < 3; ++i) rec.Wait(i);
  EXPECT_EQ(rec.Get(0).tokens, plain_alone.token_ids);
  EXPECT_EQ(rec.Get(0).final_event.finish, plain_alone.finish_reason);
  EXPECT_EQ(rec.Get(1).tokens, dysco_alone.token_ids);
  EXPECT_EQ(rec.Get(1).final_event.finish, dysco_alone.finish_reason);
  const auto failed = rec.Get(2);
  EXPECT_EQ(failed.final_event.finish, FinishReason::kError);
  EXPECT_EQ(failed.final_event.error.code(), StatusCode::kInternal);
  EXPECT_NE(failed.final_event.error.message().find("failpoint"), std::string::npos)
      << failed.final_event.error.ToString();
  EXPECT_TRUE(failed.tokens.empty());
  // Still serving, and everything freed.
  ASSERT_TRUE(sched->Submit(Session(Story("A dog", 3)), rec.Callback(3)).ok());
  rec.Wait(3);
  EXPECT_EQ(rec.Get(3).final_event.finish, FinishReason::kLength);
  const SchedulerStats st = sched->stats();
  EXPECT_EQ(st.running, 0);
  EXPECT_DOUBLE_EQ(st.kv_usage_ratio, 0.0);
}

// (10) CancelAll ends every open session, running and waiting, within one step; the scheduler
// keeps serving the sessions submitted after it.
TEST_F(SchedulerTest, CancelAllEndsEveryOpenSession) {
  Gate gate;
  Recorder rec;
  SchedulerOptions o;
  o.max_batch_size = 1;
  auto sched = MakeScheduler(o);
  ASSERT_NE(sched, nullptr);
  std::atomic<bool> first{true};
  auto hold = [&](const SessionEvent&) {
    if (first.exchange(false)) gate.Pass();  // the engine stays inside session 0's first token
  };
  ASSERT_TRUE(sched->Submit(Session(Story("Once upon a time", 300)), rec.Callback(0, hold)).ok());
  rec.Wait(0, 1);
  ASSERT_TRUE(sched->Submit(Session(Story("The river", 300)), rec.Callback(1)).ok());
  ASSERT_TRUE(sched->Submit(Session(Story("A dog", 300)), rec.Callback(2)).ok());
  EXPECT_EQ(sched->stats().running, 1);
  EXPECT_EQ(sched->stats().waiting, 2);
  sched->CancelAll();
  gate.Open();
  for (int i = 0; i < 3; ++i) rec.Wait(i);
  const auto s0 = rec.Get(0);
  EXPECT_EQ(s0.final_event.finish, FinishReason::kCancelled);
  EXPECT_EQ(s0.tokens.size(), 1u) << "a token was delivered after CancelAll";
  for (int i = 1; i < 3; ++i) {
    const auto s = rec.Get(i);
    EXPECT_EQ(s.final_event.finish, FinishReason::kCancelled) << i;
    EXPECT_TRUE(s.tokens.empty()) << i;
    EXPECT_EQ(s.final_event.usage.generated_tokens, 0) << i;
  }
  ExpectIdle(*sched);
  // Only the sessions open at the call were cancelled.
  ASSERT_TRUE(sched->Submit(Session(Story("A cat", 3)), rec.Callback(3)).ok());
  rec.Wait(3);
  EXPECT_EQ(rec.Get(3).final_event.finish, FinishReason::kLength);
  EXPECT_EQ(rec.Get(3).tokens.size(), 3u);
  ExpectIdle(*sched);
}

// (11) A session callback or an observer that throws is counted in stats().callback_errors; the
// session still ends normally and the engine keeps serving.
TEST_F(SchedulerTest, ThrowingCallbacksAreCountedNotFatal) {
  SchedulerObserver obs;
  obs.on_step = [](const StepObservation&) { throw std::runtime_error("observer"); };
  auto sched = MakeScheduler(SchedulerOptions(), obs);
  ASSERT_NE(sched, nullptr);
  EXPECT_EQ(sched->stats().callback_errors, 0);
  Recorder rec;
  auto thrower = [](const SessionEvent&) { throw std::runtime_error("callback"); };
  ASSERT_TRUE(sched->Submit(Session(Story("Once upon a time", 3)), rec.Callback(0, thrower)).ok());
  rec.Wait(0);
  EXPECT_EQ(rec.Get(0).final_event.finish, FinishReason::kLength);
  EXPECT_EQ(rec.Get(0).tokens.size(), 3u);
  ASSERT_TRUE(sched->Submit(Session(Story("The river", 2)), rec.Callback(1)).ok());
  rec.Wait(1);
  EXPECT_EQ(rec.Get(1).final_event.finish, FinishReason::kLength);
  EXPECT_EQ(rec.Get(1).tokens.size(), 2u);
  // Counted once session 1 ended (the engine thread had long left session 0's callbacks): the three
  // events of session 0 (the last one final), the observer of its three steps and of session 1's
  // first step at least (the last step's observation may come after the final event).
  EXPECT_GE(sched->stats().callback_errors, 3 + 3 + 1);
  ExpectIdle(*sched);
}

}  // namespace
}  // namespace dysco
