// Tests of step planning and execution (core/engine/step_plan.h, core/engine/batch_stepper.h) on
// the tiny random model package (tests/cpp/model_fixture.h: exported by ctest's
// export_tiny_model fixture, named by DYSCO_TINY_MODEL_DIR). PlanStep's rules: decoders always feed
// one token, prefills are chunked within max_step_tokens in list order, the first prefill gets a
// token even without budget, a prefill without budget is left out, a DySCO sequence stops its
// prefill at its prefill_len and then feeds one token at a time. BatchStepper::Execute on mixed
// plans (plain, DySCO dynamic and DySCO static sequences, prefilling and decoding together): each
// sequence gets the tokens (and DySCO trace) it gets alone through the Generator, and each row's
// outcome (kind, sampled, fed tokens) follows the schedule. A failing step (a later row's
// PrepareFeed out of pages, or a forward that is refused) leaves every sequence exactly as it was
// (the RAII rollback), and after a page-exhaustion failure a retry with enough pages gives the solo
// tokens.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/dysco/controller.h"
#include "core/dysco/params.h"
#include "core/engine/batch_stepper.h"
#include "core/engine/generator.h"
#include "core/engine/request.h"
#include "core/engine/scheduler.h"
#include "core/engine/sequence.h"
#include "core/engine/step_plan.h"
#include "tests/cpp/model_fixture.h"

namespace dysco {
namespace {

class BatchStepperTest : public TinyModelTest {
 protected:
  void SetUp() override {
    TinyModelTest::SetUp();
    if (ModelMissing()) return;
    pool_ = MakePool(/*page_size=*/8, 256);  // small pages: sequences cross page boundaries
    ASSERT_NE(pool_, nullptr);
  }

  static GenerateRequest Request(int64_t prompt_len, uint32_t seed, int64_t max_new_tokens,
                                 bool dysco = false) {
    GenerateRequest r;
    r.prompt_token_ids = TemplatedPrompt(prompt_len, seed);
    r.max_new_tokens = max_new_tokens;
    r.ignore_eos = true;  // exact lengths: the random model may produce its eos id
    r.dysco = dysco;
    r.dysco_trace = DyscoTraceMode::kSteps;
    return r;
  }

  std::unique_ptr<Sequence> Make(const GenerateRequest& r, KvPagePool* pool = nullptr) {
    auto s = factory_->Create(r, pool != nullptr ? pool : pool_.get());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(s).value() : nullptr;
  }

  // Marks `n` more prompt tokens of `s` as cached without running them: enough for planning.
  static void PretendFed(Sequence* s, int64_t n) {
    ForwardRow row;
    ASSERT_TRUE(s->PrepareFeed(n, &row).ok());
    ASSERT_EQ(static_cast<int64_t>(row.token_ids.size), n);
    s->CommitFeed();
  }
  // A plain sequence with its whole prompt but one token cached: it feeds one token, like a
  // decoder.
  std::unique_ptr<Sequence> Decoder(uint32_t seed) {
    auto s = Make(Request(9, seed, 4));
    if (s != nullptr) PretendFed(s.get(), 8);
    return s;
  }

  // What a planned row fed: (source, num_tokens) pairs.
  static std::vector<std::pair<size_t, int64_t>> Rows(const StepPlan& plan) {
    std::vector<std::pair<size_t, int64_t>> out;
    for (const PlannedRow& r : plan.rows) out.emplace_back(r.source, r.num_tokens);
    return out;
  }
  using RowList = std::vector<std::pair<size_t, int64_t>>;

  // The request run alone through the Generator (its own pool, the default prefill chunk).
  GenerateResult Alone(const GenerateRequest& r) {
    auto pool = MakePool(8, 256);
    Generator g(runner_, pool.get(), factory_);
    auto res = g.Generate(r);
    EXPECT_TRUE(res.ok()) << res.status().ToString();
    EXPECT_EQ(pool->num_free(), pool->num_total());
    return res.ok() ? std::move(res).value() : GenerateResult();
  }

  static void ExpectSameTrace(const std::vector<DyscoTraceRecord>& a,
                              const std::vector<DyscoTraceRecord>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t s = 0; s < a.size(); ++s) {
      const std::string at = what + " step " + std::to_string(s);
      EXPECT_EQ(a[s].phase, b[s].phase) << at;
      EXPECT_EQ(a[s].position, b[s].position) << at;
      EXPECT_EQ(a[s].token, b[s].token) << at;
      EXPECT_EQ(a[s].num_selected, b[s].num_selected) << at;
      EXPECT_EQ(a[s].selected, b[s].selected) << at;
      EXPECT_EQ(a[s].next_token, b[s].next_token) << at;
      EXPECT_NEAR(a[s].nucleus_mass, b[s].nucleus_mass, 1e-4) << at;
    }
  }

  std::unique_ptr<KvPagePool> pool_;
};

// ---------------------------------------------------------------------------------------------
// PlanStep

TEST_F(BatchStepperTest, PlanDecodersAlwaysFeedOneToken) {
  auto a = Decoder(1), b = Decoder(2), c = Decoder(3);
  ASSERT_TRUE(a && b && c);
  ASSERT_EQ(a->MaxTokensToFeed(), 1);
  // Even a budget smaller than the number of decoders leaves none of them out.
  for (int64_t step_tokens : {1000, 3, 1, 0}) {
    const StepPlan plan = PlanStep({a.get(), b.get(), c.get()}, StepBudget{16, step_tokens});
    EXPECT_EQ(Rows(plan), (RowList{{0, 1}, {1, 1}, {2, 1}})) << step_tokens;
    ASSERT_EQ(plan.rows.size(), 3u);
    EXPECT_EQ(plan.rows[1].sequence, b.get());
  }
}

TEST_F(BatchStepperTest, PlanChunksPrefillsInOrderWithinTheStepBudget) {
  auto p50 = Make(Request(50, 1, 4)), p30 = Make(Request(30, 2, 4)), p20 = Make(Request(20, 3, 4));
  auto d = Decoder(4);
  ASSERT_TRUE(p50 && p30 && p20 && d);
  const std::vector<Sequence*> list = {p50.get(), d.get(), p30.get(), p20.get()};
  // 40 tokens: the decoder's 1 first, then chunks of at most 16 in list order: 16, 16, 7.
  EXPECT_EQ(Rows(PlanStep(list, StepBudget{16, 40})), (RowList{{0, 16}, {1, 1}, {2, 16}, {3, 7}}));
  // A large budget: every prefill gets min(its tokens, the chunk).
  EXPECT_EQ(Rows(PlanStep(list, StepBudget{64, 1000})),
            (RowList{{0, 50}, {1, 1}, {2, 30}, {3, 20}}));
  EXPECT_EQ(Rows(PlanStep(list, StepBudget{25, 1000})),
            (RowList{{0, 25}, {1, 1}, {2, 25}, {3, 20}}));
  // After the first chunk is fed, the next plan continues from it.
  PretendFed(p50.get(), 16);
  EXPECT_EQ(Rows(PlanStep(list, StepBudget{16, 40})), (RowList{{0, 16}, {1, 1}, {2, 16}, {3, 7}}));
  PretendFed(p50.get(), 30);
  EXPECT_EQ(Rows(PlanStep(list, StepBudget{16, 40})), (RowList{{0, 4}, {1, 1}, {2, 16}, {3, 16}}));
}

TEST_F(BatchStepperTest, PlanFirstPrefillGetsATokenEvenWithoutBudget) {
  auto d1 = Decoder(1), d2 = Decoder(2);
  auto p50 = Make(Request(50, 3, 4)), p30 = Make(Request(30, 4, 4));
  ASSERT_TRUE(d1 && d2 && p50 && p30);
  const std::vector<Sequence*> list = {d1.get(), d2.get(), p50.get(), p30.get()};
  // The decoders use the whole budget (or more): the first prefill still gets one token so that
  // prefill never starves; the second is left out.
  for (int64_t step_tokens : {2, 1, 0}) {
    EXPECT_EQ(Rows(PlanStep(list, StepBudget{16, step_tokens})), (RowList{{0, 1}, {1, 1}, {2, 1}}))
        << step_tokens;
  }
  // Prefills alone with no budget at all.
  EXPECT_EQ(Rows(PlanStep({p50.get(), p30.get()}, StepBudget{16, 0})), (RowList{{0, 1}}));
}

TEST_F(BatchStepperTest, PlanLeavesOutAPrefillWithoutBudget) {
  auto p50 = Make(Request(50, 1, 4)), p30 = Make(Request(30, 2, 4)), p20 = Make(Request(20, 3, 4));
  auto d = Decoder(4);
  ASSERT_TRUE(p50 && p30 && p20 && d);
  // 20 tokens: 16 + 4, then nothing is left for the third prefill.
  EXPECT_EQ(Rows(PlanStep({p50.get(), p30.get(), p20.get()}, StepBudget{16, 20})),
            (RowList{{0, 16}, {1, 4}}));
  // A prefill left out does not take a decoder after it out with it.
  EXPECT_EQ(Rows(PlanStep({p50.get(), p30.get(), d.get()}, StepBudget{16, 17})),
            (RowList{{0, 16}, {2, 1}}));
  const StepPlan plan = PlanStep({p50.get(), p30.get(), d.get()}, StepBudget{16, 17});
  ASSERT_EQ(plan.rows.size(), 2u);
  EXPECT_EQ(plan.rows[1].sequence, d.get());
}

// The scheduler's default budget: the prefill tokens of one step are at most one prefill chunk, so
// a cancel or a deadline (handled between steps) waits for at most one chunk's prefill, however
// many long prompts are prefilling at once.
TEST_F(BatchStepperTest, DefaultStepBudgetHoldsAtMostOnePrefillChunk) {
  const SchedulerOptions defaults;
  const StepBudget budget{defaults.prefill_chunk_tokens, defaults.max_step_tokens};
  std::vector<std::unique_ptr<Sequence>> owned;
  std::vector<Sequence*> list;
  for (int i = 0; i < 4; ++i) {
    owned.push_back(Make(Request(300 + 10 * i, i + 1, 4)));  // longer than one chunk each
    ASSERT_TRUE(owned.back());
    list.push_back(owned.back().get());
  }
  owned.push_back(Decoder(9));
  ASSERT_TRUE(owned.back());
  list.push_back(owned.back().get());
  const StepPlan plan = PlanStep(list, budget);
  int64_t prefill = 0;
  for (const PlannedRow& row : plan.rows) {
    if (row.sequence->MaxTokensToFeed() > 1) prefill += row.num_tokens;
  }
  EXPECT_LE(prefill, defaults.prefill_chunk_tokens);
  EXPECT_GT(prefill, 0);
  EXPECT_EQ(plan.rows.back().sequence, list.back());  // the decoder still gets its token
}

TEST_F(BatchStepperTest, PlanDyscoPrefillStopsAtItsPrefillLenThenFeedsOne) {
  auto dysco = Make(Request(40, 1, 4, /*dysco=*/true));
  auto plain = Make(Request(50, 2, 4));
  ASSERT_TRUE(dysco && plain);
  ASSERT_NE(dysco->dysco(), nullptr);
  const int64_t prefill_len = dysco->dysco()->params().prefill_len();
  ASSERT_EQ(prefill_len, 40 - 8 - 2);  // the package's warm-up: 8 + 2 (not chat-formatted)
  EXPECT_EQ(dysco->MaxTokensToFeed(), prefill_len);
  EXPECT_EQ(plain->MaxTokensToFeed(), 50);

  // Chunks of 8: 8, 8, 8, then the 6 left up to prefill_len (not a full chunk past it).
  for (int64_t want : {8, 8, 8, 6}) {
    const StepPlan plan = PlanStep({dysco.get()}, StepBudget{8, 1000});
    ASSERT_EQ(Rows(plan), (RowList{{0, want}}));
    PretendFed(dysco.get(), want);
  }
  ASSERT_EQ(dysco->num_cached(), prefill_len);
  // From here on, every prompt token is fed alone, and counts as a decoder in the budget.
  for (int64_t i = prefill_len; i < 40; ++i) {
    EXPECT_EQ(dysco->MaxTokensToFeed(), 1);
    EXPECT_EQ(Rows(PlanStep({dysco.get(), plain.get()}, StepBudget{64, 10})),
              (RowList{{0, 1}, {1, 9}}))
        << "position " << i;
    PretendFed(dysco.get(), 1);
  }
  EXPECT_EQ(dysco->num_uncached(), 0);
}

// ---------------------------------------------------------------------------------------------
// BatchStepper::Execute

TEST_F(BatchStepperTest, MixedPlanEqualsEachSequenceAlone) {
  std::vector<GenerateRequest> reqs;
  reqs.push_back(Request(37, 11, 8));                  // plain
  reqs.push_back(Request(30, 12, 8, /*dysco=*/true));  // dynamic, package defaults
  reqs.push_back(Request(25, 13, 8, /*dysco=*/true));  // static, top-k only
  reqs.back().dysco_overrides.dynamic_rescale = false;
  reqs.back().dysco_overrides.context_warmup_steps = 4;
  reqs.back().dysco_overrides.intervention_warmup = 2;
  reqs.back().dysco_overrides.top_p = 0.0;
  reqs.back().dysco_overrides.top_k = 6;
  reqs.push_back(Request(45, 14, 8, /*dysco=*/true));  // dynamic, other heads, stronger
  reqs.back().dysco_overrides.selected_heads = std::vector<std::pair<int, int>>{{3, 1}, {0, 2}};
  reqs.back().dysco_overrides.strength = 4.0;
  reqs.push_back(Request(12, 15, 8));  // plain, short
  // Rows that need their logits on the host, and finish early: some steps copy the logits, the
  // later ones only read back the greedy tokens (ForwardBatch::logits_to_host).
  reqs.push_back(Request(14, 16, 4));  // sampled
  reqs.back().sampling.temperature = 0.8;
  reqs.back().sampling.top_p = 0.9;
  reqs.back().sampling.seed = 3;
  reqs.push_back(Request(10, 17, 3));  // greedy with a repetition penalty
  reqs.back().sampling.repetition_penalty = 1.3;

  std::vector<std::unique_ptr<Sequence>> seqs;
  for (const auto& r : reqs) {
    seqs.push_back(Make(r));
    ASSERT_NE(seqs.back(), nullptr);
  }
  // A small budget: prefills are chunked and left out while the others decode.
  const StepBudget budget{16, 40};
  BatchStepper stepper(runner_, pool_.get());
  StepOutcome outcome;
  int64_t kind_rows[4] = {0, 0, 0, 0};
  int64_t mixed_steps = 0, left_out = 0, host_logit_steps = 0, device_pick_steps = 0;
  for (int guard = 0; guard < 1000; ++guard) {
    std::vector<Sequence*> open;
    std::vector<size_t> index;  // into seqs
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i]->finished()) continue;
      open.push_back(seqs[i].get());
      index.push_back(i);
    }
    if (open.empty()) break;
    const StepPlan plan = PlanStep(open, budget);
    ASSERT_FALSE(plan.empty());
    left_out += static_cast<int64_t>(open.size() - plan.rows.size());
    std::vector<int64_t> cached_before, tokens_before;
    for (const PlannedRow& row : plan.rows) {
      cached_before.push_back(row.sequence->num_cached());
      tokens_before.push_back(row.sequence->num_tokens());
    }
    const Status st = stepper.Execute(plan, &outcome);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_EQ(outcome.rows.size(), plan.rows.size());
    EXPECT_EQ(outcome.real_rows, static_cast<int64_t>(plan.rows.size()));
    int64_t dynamic_rows = 0;
    bool has_plain = false, has_dynamic = false, has_static = false;
    for (size_t k = 0; k < plan.rows.size(); ++k) {
      const PlannedRow& row = plan.rows[k];
      const RowOutcome& got = outcome.rows[k];
      Sequence* s = row.sequence;
      ASSERT_EQ(s, seqs[index[row.source]].get());
      const std::string what = "sequence " + std::to_string(index[row.source]) + " at " +
                               std::to_string(cached_before[k]);
      // Fed exactly the planned tokens; sampled exactly when they were its last uncached ones.
      EXPECT_EQ(s->num_cached(), cached_before[k] + row.num_tokens) << what;
      const bool ends_uncached = cached_before[k] + row.num_tokens == tokens_before[k];
      EXPECT_EQ(got.sampled, ends_uncached) << what;
      EXPECT_EQ(s->num_tokens(), tokens_before[k] + (got.sampled ? 1 : 0)) << what;
      if (got.sampled) {
        EXPECT_EQ(got.delta.token_id, s->tokens().back()) << what;
      }
      // The kind the schedule gives the first fed position.
      const DyscoController* c = s->dysco();
      const DyscoStepKind want =
          c == nullptr ? DyscoStepKind::kPrefill : c->StepKindAt(cached_before[k]);
      EXPECT_EQ(static_cast<int>(got.kind), static_cast<int>(want)) << what;
      ++kind_rows[static_cast<int>(got.kind)];
      if (c != nullptr && cached_before[k] < c->params().prefill_len()) {
        EXPECT_LE(cached_before[k] + row.num_tokens, c->params().prefill_len()) << what;
      }
      if (got.kind != DyscoStepKind::kPrefill) {
        EXPECT_EQ(row.num_tokens, 1) << what;
      }
      dynamic_rows += got.kind == DyscoStepKind::kDynamic;
      has_plain |= c == nullptr;
      has_dynamic |= got.kind == DyscoStepKind::kDynamic;
      has_static |= got.kind == DyscoStepKind::kStatic;
    }
    EXPECT_EQ(outcome.speculative_rows, dynamic_rows);
    mixed_steps += has_plain && has_dynamic && has_static;
    // The logits cross to the host exactly when a row that sampled needs them.
    bool needs_logits = false;
    for (size_t k = 0; k < plan.rows.size(); ++k) {
      const size_t i = index[plan.rows[k].source];
      needs_logits |= outcome.rows[k].sampled && !reqs[i].sampling.plain_greedy();
    }
    EXPECT_EQ(outcome.logits_to_host, needs_logits);
    host_logit_steps += outcome.logits_to_host;
    device_pick_steps += !outcome.logits_to_host;
  }
  for (const auto& s : seqs) EXPECT_TRUE(s->finished());
  EXPECT_GT(kind_rows[static_cast<int>(DyscoStepKind::kPrefill)], 0);
  EXPECT_GT(kind_rows[static_cast<int>(DyscoStepKind::kContextWarmup)], 0);
  EXPECT_GT(kind_rows[static_cast<int>(DyscoStepKind::kDynamic)], 0);
  EXPECT_GT(kind_rows[static_cast<int>(DyscoStepKind::kStatic)], 0);
  EXPECT_GT(mixed_steps, 0) << "no step ran plain, dynamic and static rows together";
  EXPECT_GT(left_out, 0) << "the budget never left a prefill out";
  EXPECT_GT(host_logit_steps, 0);
  EXPECT_GT(device_pick_steps, 0);

  for (size_t i = 0; i < reqs.size(); ++i) {
    const GenerateResult alone = Alone(reqs[i]);
    const std::string what = "sequence " + std::to_string(i);
    EXPECT_EQ(seqs[i]->generated_ids(), alone.token_ids) << what;
    EXPECT_EQ(seqs[i]->text(), alone.text) << what;
    EXPECT_EQ(seqs[i]->finish_reason(), alone.finish_reason) << what;
    if (const DyscoController* c = seqs[i]->dysco()) {
      ExpectSameTrace(c->trace(), alone.dysco_trace, what);
      EXPECT_EQ(c->totals().dynamic_steps, alone.dysco_totals.dynamic_steps) << what;
      EXPECT_EQ(c->totals().static_steps, alone.dysco_totals.static_steps) << what;
      EXPECT_EQ(c->totals().context_warmup_steps, alone.dysco_totals.context_warmup_steps) << what;
    }
  }
  seqs.clear();
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

// Everything about a sequence that a failed step must leave as it was.
struct Snapshot {
  std::vector<int32_t> tokens;
  int64_t num_cached = 0;
  std::string text;
  bool finished = false;
  std::vector<float> relevance;
  std::vector<uint8_t> selection;
  std::vector<float> bias;
  size_t trace_size = 0;
  int64_t dynamic_steps = 0, static_steps = 0, context_warmup_steps = 0;

  static Snapshot Of(const Sequence& s) {
    Snapshot x;
    x.tokens = s.tokens();
    x.num_cached = s.num_cached();
    x.text = s.text();
    x.finished = s.finished();
    if (const DyscoController* c = s.dysco()) {
      x.relevance = c->relevance();
      x.selection = c->selection();
      x.bias = c->bias();
      x.trace_size = c->trace().size();
      x.dynamic_steps = c->totals().dynamic_steps;
      x.static_steps = c->totals().static_steps;
      x.context_warmup_steps = c->totals().context_warmup_steps;
    }
    return x;
  }
  void ExpectEq(const Snapshot& o, const std::string& what) const {
    EXPECT_EQ(tokens, o.tokens) << what;
    EXPECT_EQ(num_cached, o.num_cached) << what;
    EXPECT_EQ(text, o.text) << what;
    EXPECT_EQ(finished, o.finished) << what;
    EXPECT_EQ(relevance, o.relevance) << what;
    EXPECT_EQ(selection, o.selection) << what;
    EXPECT_EQ(bias, o.bias) << what;
    EXPECT_EQ(trace_size, o.trace_size) << what;
    EXPECT_EQ(dynamic_steps, o.dynamic_steps) << what;
    EXPECT_EQ(static_steps, o.static_steps) << what;
    EXPECT_EQ(context_warmup_steps, o.context_warmup_steps) << what;
  }
};

TEST_F(BatchStepperTest, PageExhaustionInALaterRowRollsTheStepBack) {
  // 10 pages of 8 tokens; 4 of them held by someone else.
  pool_ = MakePool(8, 10);
  ASSERT_NE(pool_, nullptr);
  PageList hog(pool_.get());
  ASSERT_TRUE(hog.EnsureCapacity(32).ok());
  ASSERT_EQ(pool_->num_free(), 6);

  // A: DySCO, 20 prompt tokens (prefill 10, warm-up 10), run alone up to 24 cached tokens (3
  // pages), so that its next step is a dynamic one that needs a 4th page.
  GenerateRequest ra = Request(20, 21, 10, /*dysco=*/true);
  GenerateRequest rb = Request(40, 22, 3);  // B: plain, 40 prompt tokens = 5 pages
  auto a = Make(ra), b = Make(rb);
  ASSERT_TRUE(a && b);
  BatchStepper stepper(runner_, pool_.get());
  StepOutcome outcome;
  const StepBudget budget{64, 128};
  while (a->num_cached() < 24) {
    ASSERT_FALSE(a->finished());
    ASSERT_TRUE(stepper.Execute(PlanStep({a.get()}, budget), &outcome).ok());
  }
  ASSERT_EQ(a->num_cached(), 24);
  ASSERT_EQ(a->pages().ids().size(), 3u);
  ASSERT_EQ(pool_->num_free(), 3);
  ASSERT_EQ(a->dysco()->StepKindAt(24), DyscoStepKind::kDynamic);

  const StepPlan plan = PlanStep({a.get(), b.get()}, budget);
  ASSERT_EQ(Rows(plan), (RowList{{0, 1}, {1, 40}}));
  const Snapshot sa = Snapshot::Of(*a), sb = Snapshot::Of(*b);
  // Row 0 takes a page, row 1 needs 5 of the 2 left.
  const Status st = stepper.Execute(plan, &outcome);
  ASSERT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_TRUE(outcome.rows.empty());
  EXPECT_EQ(outcome.speculative_rows, 0);
  EXPECT_EQ(outcome.real_rows, 0);
  Snapshot::Of(*a).ExpectEq(sa, "A after the failed step");
  Snapshot::Of(*b).ExpectEq(sb, "B after the failed step");
  EXPECT_TRUE(b->pages().ids().empty()) << "B's failed allocation took nothing";
  EXPECT_EQ(a->pages().ids().size(), 4u) << "A keeps the page it took (documented)";
  EXPECT_EQ(pool_->num_free(), 2);

  // With the pages back, the same plan runs, and both continue to their solo tokens.
  hog.Release();
  ASSERT_TRUE(stepper.Execute(plan, &outcome).ok());
  ASSERT_EQ(outcome.rows.size(), 2u);
  EXPECT_EQ(outcome.rows[0].kind, DyscoStepKind::kDynamic);
  EXPECT_TRUE(outcome.rows[0].sampled);
  EXPECT_EQ(outcome.rows[1].kind, DyscoStepKind::kPrefill);
  EXPECT_TRUE(outcome.rows[1].sampled);
  EXPECT_EQ(outcome.speculative_rows, 1);
  EXPECT_EQ(a->num_cached(), 25);
  EXPECT_EQ(b->num_cached(), 40);
  while (!a->finished() || !b->finished()) {
    std::vector<Sequence*> open;
    if (!a->finished()) open.push_back(a.get());
    if (!b->finished()) open.push_back(b.get());
    ASSERT_TRUE(stepper.Execute(PlanStep(open, budget), &outcome).ok());
  }
  const GenerateResult alone_a = Alone(ra), alone_b = Alone(rb);
  EXPECT_EQ(a->generated_ids(), alone_a.token_ids);
  EXPECT_EQ(b->generated_ids(), alone_b.token_ids);
  ExpectSameTrace(a->dysco()->trace(), alone_a.dysco_trace, "A");
  a.reset();
  b.reset();
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

TEST_F(BatchStepperTest, RefusedForwardHandsEveryFedTokenBack) {
  // A stepper whose pool is shaped for another model: the runner refuses its forwards (nothing is
  // written), after every row was fed from the sequences' own pool.
  ModelConfig other = runner_->config();
  other.head_dim /= 2;
  KvPagePoolOptions o;
  o.page_size = 8;
  o.num_pages = 64;
  auto wrong = KvPagePool::Create(other, o);
  ASSERT_TRUE(wrong.ok()) << wrong.status().ToString();
  BatchStepper bad(runner_, wrong->get());

  GenerateRequest rd = Request(30, 31, 4, /*dysco=*/true);
  auto d = Make(rd), p = Make(Request(20, 32, 4));
  ASSERT_TRUE(d && p);
  const StepBudget budget{64, 128};
  StepOutcome outcome;
  // Prefill: both rows fed, the real forward refused.
  StepPlan plan = PlanStep({d.get(), p.get()}, budget);
  ASSERT_EQ(Rows(plan), (RowList{{0, 20}, {1, 20}}));
  Snapshot sd = Snapshot::Of(*d), sp = Snapshot::Of(*p);
  Status st = bad.Execute(plan, &outcome);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("kv_pool"), std::string::npos) << st.message();
  EXPECT_TRUE(outcome.rows.empty());
  Snapshot::Of(*d).ExpectEq(sd, "DySCO sequence after a refused prefill");
  Snapshot::Of(*p).ExpectEq(sp, "plain sequence after a refused prefill");

  // A dynamic step: the speculative forward is the one refused; no DySCO state changes.
  BatchStepper good(runner_, pool_.get());
  while (d->num_cached() < d->dysco()->params().prompt_len - 1) {
    ASSERT_TRUE(good.Execute(PlanStep({d.get()}, budget), &outcome).ok());
  }
  ASSERT_EQ(d->dysco()->StepKindAt(d->num_cached()), DyscoStepKind::kDynamic);
  plan = PlanStep({d.get()}, budget);
  sd = Snapshot::Of(*d);
  st = bad.Execute(plan, &outcome);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(outcome.rows.empty());
  Snapshot::Of(*d).ExpectEq(sd, "DySCO sequence after a refused speculative pass");
  d.reset();
  p.reset();
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

TEST_F(BatchStepperTest, BadPlansAreRefused) {
  BatchStepper stepper(runner_, pool_.get());
  StepOutcome outcome;
  EXPECT_EQ(stepper.Execute(StepPlan(), &outcome).code(), StatusCode::kInvalidArgument);
  StepPlan null_row;
  null_row.rows.push_back({nullptr, 1, 0});
  EXPECT_EQ(stepper.Execute(null_row, &outcome).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

}  // namespace
}  // namespace dysco
