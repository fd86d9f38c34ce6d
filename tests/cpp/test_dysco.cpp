// Tests of DySCO in the engine (core/dysco/params.h, core/dysco/controller.h,
// core/engine/batch_stepper.h): parameter validation and resolution, the phase schedule against the
// rule written out by hand, then on the tiny random model package (tests/cpp/model_fixture.h:
// exported by ctest's export_tiny_model fixture, named by DYSCO_TINY_MODEL_DIR) end-to-end
// properties: strength 1 (zero bias) gives the plain greedy tokens, batches mixing DySCO and plain
// sequences equal each sequence alone, relevance is a distribution, the selection is
// docs/dysco-reference-algorithm.md's nucleus / top-k / hybrid of the traced relevance, the bias is
// log(strength) exactly where it must be, the static variant runs no speculative pass, pages are
// freed. Last, the default model answers the France question with DySCO on.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/dysco/batch_ops.h"
#include "core/dysco/controller.h"
#include "core/dysco/params.h"
#include "core/dysco/trace.h"
#include "core/engine/batch_stepper.h"
#include "core/engine/generator.h"
#include "core/engine/step_plan.h"
#include "tests/cpp/model_fixture.h"

namespace dysco {
namespace {

// ---------------------------------------------------------------------------------------------
// Parameters

ModelConfig SmallConfig() {
  ModelConfig c;
  c.num_layers = 30;
  c.num_attention_heads = 9;
  c.vocab_size = 49152;
  c.dysco.selected_heads = {{12, 3}, {14, 0}};
  c.dysco.template_sequences = {{1, 9690, 198}};
  return c;
}

struct BadCase {
  const char* what;
  DyscoOverrides o;
  int64_t prompt_len;
  std::string message;  // exact
};

TEST(DyscoParamsTest, ValidationNamesTheField) {
  std::vector<BadCase> cases;
  auto add = [&](const char* what, auto set, int64_t len, std::string msg) {
    DyscoOverrides o;
    set(o);
    cases.push_back({what, o, len, std::move(msg)});
  };
  add(
      "top_p high", [](DyscoOverrides& o) { o.top_p = 1.5; }, 100,
      "dysco.top_p must be in (0, 1], got 1.5");
  add(
      "top_p negative", [](DyscoOverrides& o) { o.top_p = -0.25; }, 100,
      "dysco.top_p must be in (0, 1], got -0.25");
  add(
      "top_p NaN", [](DyscoOverrides& o) { o.top_p = std::nan(""); }, 100,
      "dysco.top_p must be in (0, 1], got nan");
  add(
      "top_k negative", [](DyscoOverrides& o) { o.top_k = -3; }, 100,
      "dysco.top_k must be >= 1, got -3");
  add(
      "both unset",
      [](DyscoOverrides& o) {
        o.top_p = 0.0;
        o.top_k = 0;
      },
      100, "dysco.top_p and dysco.top_k are both unset: set at least one");
  add(
      "strength 0", [](DyscoOverrides& o) { o.strength = 0.0; }, 100,
      "dysco.strength must be > 0, got 0");
  add(
      "decay 1", [](DyscoOverrides& o) { o.decay_factor = 1.0; }, 100,
      "dysco.decay_factor must be in [0, 1), got 1");
  add(
      "decay negative", [](DyscoOverrides& o) { o.decay_factor = -0.5; }, 100,
      "dysco.decay_factor must be in [0, 1), got -0.5");
  add(
      "context warmup negative", [](DyscoOverrides& o) { o.context_warmup_steps = -1; }, 100,
      "dysco.context_warmup_steps must be >= 0, got -1");
  add(
      "intervention warmup -2", [](DyscoOverrides& o) { o.intervention_warmup = -2; }, 100,
      "dysco.intervention_warmup must be >= 0 or -1 (auto), got -2");
  add(
      "layer out of range",
      [](DyscoOverrides& o) {
        o.selected_heads = {{1, 0}, {2, 0}, {3, 0}, {40, 1}};
      },
      100, "dysco.selected_heads[3]: layer 40 out of range [0, 30)");
  add(
      "head out of range",
      [](DyscoOverrides& o) {
        o.selected_heads = {{1, 9}};
      },
      100, "dysco.selected_heads[0]: query head 9 out of range [0, 9)");
  add(
      "negative layer",
      [](DyscoOverrides& o) {
        o.selected_heads = {{-1, 0}};
      },
      100, "dysco.selected_heads[0]: layer -1 out of range [0, 30)");
  add(
      "duplicate head",
      [](DyscoOverrides& o) {
        o.selected_heads = {{5, 1}, {6, 2}, {5, 1}};
      },
      100, "dysco.selected_heads[2]: (5, 1) is listed twice");
  add(
      "no heads", [](DyscoOverrides& o) { o.selected_heads = std::vector<std::pair<int, int>>(); },
      100, "dysco.selected_heads is empty");
  add(
      "empty template",
      [](DyscoOverrides& o) {
        o.template_sequences = {{1, 2}, {}};
      },
      100, "dysco.template_sequences[1] is empty");
  add(
      "template id",
      [](DyscoOverrides& o) {
        o.template_sequences = {{1, 49152}};
      },
      100, "dysco.template_sequences[0][1] = 49152 is outside the vocabulary [0, 49152)");
  add(
      "no warm-up",
      [](DyscoOverrides& o) {
        o.context_warmup_steps = 0;
        o.intervention_warmup = 0;
      },
      100, "dysco.context_warmup_steps + dysco.intervention_warmup (0 + 0) must be >= 1");
  add(
      "warm-up as long as the prompt",
      [](DyscoOverrides& o) {
        o.context_warmup_steps = 8;
        o.intervention_warmup = 2;
      },
      10,
      "dysco.context_warmup_steps + dysco.intervention_warmup (8 + 2) must be less than the "
      "prompt length 10: the warm-up is fed from the prompt and the prefill keeps at least one "
      "token");
  add(
      "static without context warm-up",
      [](DyscoOverrides& o) {
        o.dynamic_rescale = false;
        o.context_warmup_steps = 1;
      },
      100,
      "dysco.context_warmup_steps must be >= 2 when dysco.dynamic_rescale is false (the static "
      "set is chosen after the context warm-up, which runs context_warmup_steps - 1 steps), got 1");

  const ModelConfig config = SmallConfig();
  for (const BadCase& c : cases) {
    auto p = ResolveDyscoParams(config, c.o, /*chat_formatted=*/false, c.prompt_len, -1);
    ASSERT_FALSE(p.ok()) << c.what;
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_EQ(p.status().message(), c.message) << c.what;
  }

  // A package without retrieval heads says so.
  ModelConfig no_heads = SmallConfig();
  no_heads.dysco.selected_heads.clear();
  auto p = ResolveDyscoParams(no_heads, {}, false, 100, -1);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().message(),
            "dysco.selected_heads is empty: the model package has no retrieval heads, pass "
            "dysco.selected_heads");
}

TEST(DyscoParamsTest, ResolvesDefaultsOverridesAndAuto) {
  const ModelConfig config = SmallConfig();
  auto p = ResolveDyscoParams(config, {}, /*chat_formatted=*/false, 100, 4);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->selected_heads, config.dysco.selected_heads);
  EXPECT_EQ(p->top_p, std::optional<double>(0.975));
  EXPECT_EQ(p->top_k, std::optional<int64_t>(4096));
  EXPECT_EQ(p->strength, 2.0);
  EXPECT_EQ(p->decay_factor, 0.75);
  EXPECT_EQ(p->context_warmup_steps, 8);
  EXPECT_EQ(p->intervention_warmup, 2);  // auto without a chat template
  EXPECT_TRUE(p->dynamic_rescale);
  EXPECT_EQ(p->template_sequences, config.dysco.template_sequences);
  EXPECT_EQ(p->prefill_len(), 90);
  EXPECT_EQ(p->max_head_layer(), 14);

  p = ResolveDyscoParams(config, {}, /*chat_formatted=*/true, 100, 7);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->intervention_warmup, 7);  // auto = the generation prompt's tokens

  DyscoOverrides o;
  o.top_p = 0.0;  // unset: top-k alone
  o.top_k = 12;
  o.strength = 100.0;
  o.intervention_warmup = 0;
  o.context_warmup_steps = 3;
  o.selected_heads = {{29, 8}};
  o.dynamic_rescale = false;
  o.template_sequences = std::vector<std::vector<int32_t>>();
  p = ResolveDyscoParams(config, o, true, 4, 7);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_FALSE(p->top_p.has_value());
  EXPECT_EQ(p->top_k, std::optional<int64_t>(12));
  EXPECT_TRUE(p->hard_mask());
  EXPECT_EQ(p->intervention_warmup, 0);
  EXPECT_EQ(p->prefill_len(), 1);
  EXPECT_EQ(p->max_head_layer(), 29);
  EXPECT_FALSE(p->dynamic_rescale);
  EXPECT_TRUE(p->template_sequences.empty());

  o = DyscoOverrides();
  o.top_k = 0;  // unset: nucleus alone
  p = ResolveDyscoParams(config, o, false, 100, -1);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->top_p, std::optional<double>(0.975));
  EXPECT_FALSE(p->top_k.has_value());
}

// ---------------------------------------------------------------------------------------------
// Phase schedule

using Phases = std::vector<DyscoPhase>;
constexpr DyscoPhase kP = DyscoPhase::kPrefill, kC = DyscoPhase::kContextWarmup,
                     kI = DyscoPhase::kInterventionWarmup, kG = DyscoPhase::kGenerate;

DyscoParams Schedule(int64_t P, int64_t cw, int64_t iw, bool dynamic = true) {
  DyscoParams p;
  p.selected_heads = {{0, 0}};
  p.prompt_len = P;
  p.context_warmup_steps = cw;
  p.intervention_warmup = iw;
  p.dynamic_rescale = dynamic;
  return p;
}

Phases PhasesOf(const DyscoParams& p, int64_t upto) {
  Phases out;
  for (int64_t i = 0; i < upto; ++i) out.push_back(DyscoPhaseAt(p, i));
  return out;
}

TEST(DyscoScheduleTest, PhasesFollowTheReferenceRule) {
  // P = 12, cw = 4, iw = 2: T = 6, prefill 0..5; i + 1 < 10 for i = 6, 7, 8 (cw - 1 = 3 context
  // steps); 9, 10, 11 intervention (iw + 1 = 3); 12.. generate.
  EXPECT_EQ(PhasesOf(Schedule(12, 4, 2), 14),
            (Phases{kP, kP, kP, kP, kP, kP, kC, kC, kC, kI, kI, kI, kG, kG}));
  EXPECT_EQ(Schedule(12, 4, 2).prefill_len(), 6);
  // cw = 1: no context step at all; the whole warm-up (iw + 1 = 3 tokens) intervenes.
  EXPECT_EQ(PhasesOf(Schedule(6, 1, 2), 7), (Phases{kP, kP, kP, kI, kI, kI, kG}));
  // cw = 0: T = iw tokens, all intervention.
  EXPECT_EQ(PhasesOf(Schedule(6, 0, 3), 7), (Phases{kP, kP, kP, kI, kI, kI, kG}));
  // iw = 0: the last prompt token still intervenes (cw - 1 context steps, then 1).
  EXPECT_EQ(PhasesOf(Schedule(6, 3, 0), 7), (Phases{kP, kP, kP, kC, kC, kI, kG}));
  // Reference defaults with Qwen3's 7-token generation prompt: P = 20.
  EXPECT_EQ(PhasesOf(Schedule(20, 8, 7), 21), (Phases{kP, kP, kP, kP, kP, kC, kC, kC, kC, kC, kC,
                                                      kC, kI, kI, kI, kI, kI, kI, kI, kI, kG}));
  // Prefill of a single token.
  EXPECT_EQ(PhasesOf(Schedule(3, 2, 0), 4), (Phases{kP, kC, kI, kG}));

  // The counts for many settings: cw - 1 context steps (0 when cw = 0), the rest of T intervenes.
  for (int64_t P : {4, 9, 33}) {
    for (int64_t cw = 0; cw <= 5; ++cw) {
      for (int64_t iw = 0; iw <= 4; ++iw) {
        if (cw + iw < 1 || cw + iw >= P) continue;
        const DyscoParams p = Schedule(P, cw, iw);
        const Phases ph = PhasesOf(p, P + 2);
        const auto count = [&](DyscoPhase x) { return std::count(ph.begin(), ph.end(), x); };
        EXPECT_EQ(count(kP), P - cw - iw);
        EXPECT_EQ(count(kC), std::max<int64_t>(cw - 1, 0)) << P << " " << cw << " " << iw;
        EXPECT_EQ(count(kI), cw + iw - std::max<int64_t>(cw - 1, 0));
        EXPECT_EQ(count(kG), 2);
        EXPECT_TRUE(std::is_sorted(ph.begin(), ph.end(), [](DyscoPhase a, DyscoPhase b) {
          return static_cast<int>(a) < static_cast<int>(b);
        }));
      }
    }
  }
}

TEST(DyscoScheduleTest, StepKinds) {
  const DyscoParams dyn = Schedule(12, 4, 2);
  EXPECT_EQ(DyscoStepKindAt(dyn, 5), DyscoStepKind::kPrefill);
  EXPECT_EQ(DyscoStepKindAt(dyn, 6), DyscoStepKind::kContextWarmup);
  EXPECT_EQ(DyscoStepKindAt(dyn, 9), DyscoStepKind::kDynamic);
  EXPECT_EQ(DyscoStepKindAt(dyn, 30), DyscoStepKind::kDynamic);
  const DyscoParams fixed = Schedule(12, 4, 2, /*dynamic=*/false);
  EXPECT_EQ(DyscoStepKindAt(fixed, 8), DyscoStepKind::kContextWarmup);
  EXPECT_EQ(DyscoStepKindAt(fixed, 9), DyscoStepKind::kStatic);
  EXPECT_EQ(DyscoStepKindAt(fixed, 12), DyscoStepKind::kStatic);
}

// DyscoBatchOps::UpdateRelevanceAndSelect (a dynamic step's DySCO stage: the relevance updated in
// place in the selection's staging buffer, the head means read where the forward left them) gives
// the bits of UpdateRelevance then Select: rows of different lengths, parameters (top-p, top-k,
// both; soft and hard strength) and decays, templates in the prompts, a head-mean row wider than
// the rows, and one DyscoBatchOps called twice with wider rows the second time (its buffer grows).
TEST(DyscoBatchOpsTest, UpdateRelevanceAndSelectEqualsTheTwoCalls) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  DyscoBatchOps fused;
  int64_t partial_selections = 0;
  for (int64_t base : {40, 300}) {
    std::vector<std::unique_ptr<DyscoController>> owned;
    std::vector<const DyscoController*> rows;
    std::vector<int64_t> num_keys;
    for (int r = 0; r < 3; ++r) {
      DyscoParams p;
      p.selected_heads = {{0, 1}, {1, 0}};
      if (r != 1) p.top_p = 0.4 + 0.25 * r;
      if (r != 0) p.top_k = 5 + 7 * r;
      p.strength = r == 2 ? 100.0 : 2.0 + r;
      p.decay_factor = 0.5 + 0.1 * r;
      p.context_warmup_steps = 4;
      p.intervention_warmup = 2;
      p.template_sequences = {{7, 8}};
      p.prompt_len = base + 10 * r;
      std::vector<int32_t> prompt(p.prompt_len);
      for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 12);
      auto c = DyscoController::Create(p, prompt, DyscoTraceMode::kOff);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      // A previous relevance that is not all zeros: one update's worth applied by hand.
      std::vector<float> previous((*c)->relevance().size() + 1);
      for (float& v : previous) v = uniform(rng) / static_cast<float>(previous.size());
      ASSERT_TRUE((*c)->ApplyRelevance(previous).ok());
      num_keys.push_back(static_cast<int64_t>((*c)->relevance().size()) + 1);
      rows.push_back(c->get());
      owned.push_back(std::move(*c));
    }
    ForwardOutput out;
    out.batch_size = 3;
    out.probs_len = *std::max_element(num_keys.begin(), num_keys.end()) + 5;
    out.probe_mean.resize(3 * out.probs_len);
    for (float& v : out.probe_mean) v = uniform(rng);

    DyscoBatchOps two_calls;
    std::vector<std::vector<float>> relevance;
    ASSERT_TRUE(two_calls.UpdateRelevance(rows, num_keys, out, {0, 1, 2}, &relevance).ok());
    std::vector<const std::vector<float>*> views;
    for (const auto& r : relevance) views.push_back(&r);
    std::vector<DyscoSelection> selections;
    ASSERT_TRUE(two_calls.Select(rows, views, num_keys, &selections).ok());

    std::vector<std::vector<float>> fused_relevance;
    std::vector<DyscoSelection> fused_selections;
    ASSERT_TRUE(
        fused.UpdateRelevanceAndSelect(rows, num_keys, out, &fused_relevance, &fused_selections)
            .ok());
    ASSERT_EQ(fused_relevance.size(), 3u);
    ASSERT_EQ(fused_selections.size(), 3u);
    for (size_t d = 0; d < 3; ++d) {
      SCOPED_TRACE("row " + std::to_string(d) + ", base " + std::to_string(base));
      EXPECT_EQ(fused_relevance[d], relevance[d]);  // exact: the same op on the same values
      EXPECT_EQ(fused_selections[d].selected, selections[d].selected);
      EXPECT_EQ(fused_selections[d].bias, selections[d].bias);
      EXPECT_EQ(fused_selections[d].num_selected, selections[d].num_selected);
      EXPECT_EQ(fused_selections[d].selected_mass, selections[d].selected_mass);
      EXPECT_EQ(static_cast<int64_t>(fused_relevance[d].size()), num_keys[d]);
      if (selections[d].num_selected > 0 && selections[d].num_selected < num_keys[d]) {
        ++partial_selections;
      }
    }
  }
  EXPECT_GE(partial_selections, 4);  // the sets are neither empty nor everything
  // Its stage timers counted both calls, each phase with some time (the clock is monotonic).
  const DyscoBatchOps::StageSeconds& t = fused.stage_seconds();
  EXPECT_EQ(t.calls, 2);
  for (double phase : {t.pack, t.update, t.relevance_out, t.select, t.results_out}) {
    EXPECT_GE(phase, 0.0);
  }
  EXPECT_GT(t.pack + t.update + t.relevance_out + t.select + t.results_out, 0.0);
}

// DyscoSelectStaging::RunWithRelevanceUpdate (the GPU's DySCO stage: the relevance update and the
// selection in one run over the staged buffer) on the host gives the bits of dysco_relevance_update
// then Run(): two rows of different lengths, r_{t-1} and head means staged by hand, then Run()
// alone again on the same staging (the parts that only the update reads left as they are).
TEST(DyscoSelectStagingTest, RunWithRelevanceUpdateEqualsTheUpdateThenRun) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const int64_t batch = 2, width = 700;
  const std::vector<int64_t> num_keys = {700, 451};
  const std::vector<float> decay = {0.5f, 0.8f};
  std::vector<float> previous(batch * width, 0.0f), probs(batch * width, 0.0f);
  std::vector<uint8_t> templ(batch * width, 0);
  for (int64_t d = 0; d < batch; ++d) {
    for (int64_t j = 0; j < num_keys[d]; ++j) {
      probs[d * width + j] = uniform(rng) / 300.0f;
      if (j < num_keys[d] - 1) previous[d * width + j] = uniform(rng) / 300.0f;
      templ[d * width + j] = j % 17 == 3;
    }
  }
  auto stage = [&](DyscoSelectStaging& s) {
    ASSERT_TRUE(s.Resize(batch, width).ok());
    std::copy(previous.begin(), previous.end(), s.relevance());
    std::copy(probs.begin(), probs.end(), s.probs());
    std::copy(templ.begin(), templ.end(), s.template_mask());
    for (int64_t d = 0; d < batch; ++d) {
      s.num_keys()[d] = num_keys[d];
      s.decay()[d] = decay[d];
      s.top_p()[d] = d == 0 ? 0.6f : 0.0f;
      s.top_k()[d] = d == 0 ? 0 : 40;
      s.strength()[d] = 3.0f;
    }
  };
  DyscoSelectStaging fused, apart;
  EXPECT_FALSE(fused.on_device());
  stage(fused);
  stage(apart);
  ASSERT_TRUE(fused.RunWithRelevanceUpdate().ok());
  ASSERT_TRUE(DyscoRelevanceUpdate(apart.relevance(), batch, width, probs.data(), 1, width,
                                   num_keys.data(), decay.data())
                  .ok());
  ASSERT_TRUE(apart.Run().ok());
  const int64_t n = batch * width;
  EXPECT_EQ(std::vector<float>(fused.relevance(), fused.relevance() + n),
            std::vector<float>(apart.relevance(), apart.relevance() + n));
  EXPECT_NE(std::vector<float>(fused.relevance(), fused.relevance() + n), previous);
  EXPECT_EQ(std::vector<float>(fused.bias(), fused.bias() + n),
            std::vector<float>(apart.bias(), apart.bias() + n));
  EXPECT_EQ(std::vector<uint8_t>(fused.selected(), fused.selected() + n),
            std::vector<uint8_t>(apart.selected(), apart.selected() + n));
  EXPECT_EQ(std::vector<float>(fused.stats(), fused.stats() + 2 * batch),
            std::vector<float>(apart.stats(), apart.stats() + 2 * batch));
  EXPECT_EQ(fused.stats()[2], 40.0f);  // row 1: top-k 40
  EXPECT_GT(fused.stats()[0], 0.0f);
  EXPECT_LT(fused.stats()[0], 700.0f);
  // Run() alone selects over the relevance as staged (r_t now) without updating it again.
  const std::vector<float> r_t(fused.relevance(), fused.relevance() + n);
  ASSERT_TRUE(fused.Run().ok());
  EXPECT_EQ(std::vector<float>(fused.relevance(), fused.relevance() + n), r_t);
  EXPECT_EQ(std::vector<float>(fused.bias(), fused.bias() + n),
            std::vector<float>(apart.bias(), apart.bias() + n));
}

TEST(DyscoTraceTest, JsonLineFollowsDocs) {
  DyscoTraceRecord r;
  r.step = 3;
  r.phase = DyscoPhase::kGenerate;
  r.position = 37;
  r.token = 4093;
  r.num_keys = 38;
  r.num_selected = 12;
  r.nucleus_mass = 0.5;
  r.selected = {{0, 3}, {17, 25}};
  r.top_relevance = {{21, 0.25f}, {22, 0.125f}};
  r.next_token = 330;
  EXPECT_EQ(DyscoTraceRecordToJson(r),
            "{\"step\":3,\"phase\":\"generate\",\"position\":37,\"token\":4093,\"num_keys\":38,"
            "\"num_selected\":12,\"nucleus_mass\":0.5,\"selected\":[[0,3],[17,25]],"
            "\"top_relevance\":[[21,0.25],[22,0.125]],\"next_token\":330}");
  r.next_token.reset();
  r.relevance = {0.5f, 0.25f};
  const auto j = nlohmann::json::parse(DyscoTraceRecordToJson(r));
  EXPECT_TRUE(j.at("next_token").is_null());
  EXPECT_EQ(j.at("relevance"), nlohmann::json::parse("[0.5, 0.25]"));
}

// ---------------------------------------------------------------------------------------------
// Tiny model

class DyscoTinyTest : public TinyModelTest {
 protected:
  void SetUp() override {
    TinyModelTest::SetUp();
    if (ModelMissing()) return;
    pool_ = MakePool(/*page_size=*/8, 256);  // small pages: sequences cross page boundaries
    ASSERT_NE(pool_, nullptr);
  }

  struct Spec {
    std::vector<int32_t> prompt;
    int64_t max_new_tokens = 8;
    bool dysco = false;
    DyscoOverrides overrides;
    int64_t first_chunk = 64;  // prefill budget of every step
  };
  struct Run {
    std::vector<int32_t> generated;
    std::vector<DyscoTraceRecord> trace;
    DyscoTotals totals;
  };

  static int64_t Prefill(const Spec& s) {
    auto p = ResolveDyscoParams(runner_->config(), s.overrides, false,
                                static_cast<int64_t>(s.prompt.size()), -1);
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    return p.ok() ? p->prefill_len() : -1;
  }

  std::unique_ptr<Sequence> MakeSequence(const Spec& s, DyscoTraceMode mode) {
    SequenceParams params;
    params.max_new_tokens = s.max_new_tokens;
    params.max_context = runner_->config().max_position_embeddings;  // no stop tokens
    auto seq = std::make_unique<Sequence>(s.prompt, params, *tokenizer_, pool_.get());
    if (s.dysco) {
      auto p = ResolveDyscoParams(runner_->config(), s.overrides, false,
                                  static_cast<int64_t>(s.prompt.size()), -1);
      EXPECT_TRUE(p.ok()) << p.status().ToString();
      if (!p.ok()) return nullptr;
      auto c = DyscoController::Create(std::move(p).value(), s.prompt, mode);
      EXPECT_TRUE(c.ok()) << c.status().ToString();
      if (!c.ok()) return nullptr;
      seq->AttachDysco(std::move(c).value());
    }
    return seq;
  }

  // Runs `specs` together through one BatchStepper, every unfinished sequence in every step, each
  // prefilling at most its own first_chunk tokens per step; `check` sees every step (row i of the
  // outcome is stepped[i]).
  std::vector<Run> RunTogether(
      const std::vector<Spec>& specs, DyscoTraceMode mode = DyscoTraceMode::kFull,
      const std::function<void(const StepOutcome&, const std::vector<Sequence*>&)>& check =
          nullptr) {
    std::vector<std::unique_ptr<Sequence>> seqs;
    for (const Spec& s : specs) {
      seqs.push_back(MakeSequence(s, mode));
      if (seqs.back() == nullptr) return {};
    }
    BatchStepper stepper(runner_, pool_.get());
    StepPlan plan;
    StepOutcome outcome;
    std::vector<Sequence*> stepped;
    for (int guard = 0; guard < 10000; ++guard) {
      plan.rows.clear();
      stepped.clear();
      for (size_t i = 0; i < seqs.size(); ++i) {
        if (seqs[i]->finished()) continue;
        const int64_t n = std::min(specs[i].first_chunk, seqs[i]->MaxTokensToFeed());
        EXPECT_GE(n, 1);
        plan.rows.push_back({seqs[i].get(), n, i});
        stepped.push_back(seqs[i].get());
      }
      if (plan.empty()) break;
      const Status st = stepper.Execute(plan, &outcome);
      EXPECT_TRUE(st.ok()) << st.ToString();
      if (!st.ok()) return {};
      EXPECT_EQ(outcome.rows.size(), plan.rows.size());
      EXPECT_EQ(outcome.real_rows, static_cast<int64_t>(plan.rows.size()));
      if (check) check(outcome, stepped);
    }
    std::vector<Run> runs;
    for (auto& s : seqs) {
      Run r;
      r.generated = s->generated_ids();
      if (s->dysco() != nullptr) {
        r.trace = s->dysco()->trace();
        r.totals = s->dysco()->totals();
      }
      runs.push_back(std::move(r));
    }
    seqs.clear();
    EXPECT_EQ(pool_->num_free(), pool_->num_total()) << "pages must be freed with the sequences";
    return runs;
  }

  std::unique_ptr<KvPagePool> pool_;
};

// Same trace up to float noise of batching (the runner's batch test bounds logits by 1e-4).
void ExpectSameTrace(const std::vector<DyscoTraceRecord>& a, const std::vector<DyscoTraceRecord>& b,
                     const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t s = 0; s < a.size(); ++s) {
    const auto& x = a[s];
    const auto& y = b[s];
    const std::string at = what + " step " + std::to_string(s);
    EXPECT_EQ(x.step, y.step) << at;
    EXPECT_EQ(x.phase, y.phase) << at;
    EXPECT_EQ(x.position, y.position) << at;
    EXPECT_EQ(x.token, y.token) << at;
    EXPECT_EQ(x.num_keys, y.num_keys) << at;
    EXPECT_EQ(x.num_selected, y.num_selected) << at;
    EXPECT_EQ(x.selected, y.selected) << at;
    EXPECT_EQ(x.next_token, y.next_token) << at;
    EXPECT_NEAR(x.nucleus_mass, y.nucleus_mass, 1e-4) << at;
    ASSERT_EQ(x.relevance.size(), y.relevance.size()) << at;
    for (size_t j = 0; j < x.relevance.size(); ++j)
      EXPECT_NEAR(x.relevance[j], y.relevance[j], 1e-4) << at << " key " << j;
  }
}

TEST_F(DyscoTinyTest, StrengthOneGivesPlainGreedyTokens) {
  // log(1) = 0: the bias changes nothing, and the speculative pass's K/V is overwritten by the
  // real pass, so DySCO must reproduce plain greedy decoding with the same feeding schedule
  // exactly (and, token for token, the ordinary chunked prefill).
  for (int64_t len : {23, 64}) {
    Spec d;
    d.prompt = TemplatedPrompt(len, 1);
    d.max_new_tokens = 12;
    d.dysco = true;
    d.overrides.strength = 1.0;
    const std::vector<Run> with = RunTogether({d});
    ASSERT_EQ(with.size(), 1u);
    EXPECT_EQ(with[0].generated.size(), 12u);
    for (const auto& r : with[0].trace) {
      if (r.phase != DyscoPhase::kContextWarmup) {
        EXPECT_GT(r.num_selected, 0);
      }
    }

    Spec plain = d;
    plain.dysco = false;
    const std::vector<Run> without = RunTogether({plain});
    ASSERT_EQ(without.size(), 1u);
    EXPECT_EQ(with[0].generated, without[0].generated) << "prompt length " << len;

    // The generator with DySCO (strength 1) agrees too, and frees everything.
    GenerateRequest req;
    req.prompt_token_ids = d.prompt;
    req.max_new_tokens = 12;
    req.stop_token_ids = {};
    req.dysco = true;
    req.dysco_overrides.strength = 1.0;
    req.dysco_trace = DyscoTraceMode::kSteps;
    Generator g(runner_, pool_.get(), factory_);
    auto res = g.Generate(req);
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    const size_t n = std::min(res->token_ids.size(), without[0].generated.size());
    EXPECT_EQ(std::vector<int32_t>(res->token_ids.begin(), res->token_ids.begin() + n),
              std::vector<int32_t>(without[0].generated.begin(), without[0].generated.begin() + n));
    EXPECT_EQ(res->dysco_trace.size(), with[0].trace.size() - (12 - res->token_ids.size()));
    EXPECT_EQ(pool_->num_free(), pool_->num_total());
  }
}

TEST_F(DyscoTinyTest, MixedBatchEqualsEachAlone) {
  std::vector<Spec> specs(6);
  specs[0].prompt = TemplatedPrompt(40, 2);  // defaults: heads (1, 0), (2, 3), hybrid
  specs[0].dysco = true;
  specs[1].prompt = TemplatedPrompt(29, 3);  // plain, prefilled in chunks of 5 while others decode
  specs[1].first_chunk = 5;
  specs[2].prompt = TemplatedPrompt(51, 4);  // other heads (deeper), nucleus only, stronger
  specs[2].dysco = true;
  specs[2].overrides.selected_heads = {{3, 1}, {0, 2}, {2, 3}};
  specs[2].overrides.top_k = 0;
  specs[2].overrides.top_p = 0.8;
  specs[2].overrides.strength = 4.0;
  specs[2].overrides.decay_factor = 0.5;
  specs[2].first_chunk = 16;
  specs[3].prompt = TemplatedPrompt(33, 5);  // static, top-k only
  specs[3].dysco = true;
  specs[3].overrides.dynamic_rescale = false;
  specs[3].overrides.top_p = 0.0;
  specs[3].overrides.top_k = 6;
  specs[3].overrides.context_warmup_steps = 5;
  specs[4].prompt = TemplatedPrompt(20, 6);  // hard mask, a single shallow head
  specs[4].dysco = true;
  specs[4].overrides.strength = 100.0;
  specs[4].overrides.selected_heads = {{0, 1}};
  specs[4].overrides.intervention_warmup = 0;
  specs[5].prompt = TemplatedPrompt(12, 7);  // plain, short
  for (auto& s : specs) s.max_new_tokens = 10;

  const std::vector<Run> together = RunTogether(specs);
  ASSERT_EQ(together.size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::vector<Run> alone = RunTogether({specs[i]});
    ASSERT_EQ(alone.size(), 1u);
    EXPECT_EQ(together[i].generated, alone[0].generated) << "sequence " << i;
    EXPECT_EQ(together[i].generated.size(), 10u);
    ExpectSameTrace(together[i].trace, alone[0].trace, "sequence " + std::to_string(i));
    if (specs[i].dysco) {
      EXPECT_EQ(together[i].trace.size(), specs[i].prompt.size() - Prefill(specs[i]) + 10 - 1);
    } else {
      EXPECT_TRUE(together[i].trace.empty());
    }
  }
  // Each setting made a difference somewhere: DySCO is not a no-op on this model.
  Spec plain0 = specs[0];
  plain0.dysco = false;
  Spec plain2 = specs[2];
  plain2.dysco = false;
  const auto p0 = RunTogether({plain0}), p2 = RunTogether({plain2});
  ASSERT_EQ(p0.size(), 1u);
  ASSERT_EQ(p2.size(), 1u);
  EXPECT_TRUE(p0[0].generated != together[0].generated || p2[0].generated != together[2].generated)
      << "strength 2 and 4 changed no token at all";
}

// The docs/dysco-reference-algorithm.md selection of r, written plainly: sort by relevance
// descending (ties: lower position first); nucleus keeps entries while the running sum is <= top_p
// (at least one); top-k keeps k; hybrid takes the top-k set when the nucleus is longer than k.
std::vector<uint8_t> ReferenceSelection(const std::vector<float>& r, std::optional<double> top_p,
                                        std::optional<int64_t> top_k) {
  std::vector<int64_t> order(r.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return r[a] > r[b]; });
  const int64_t n = static_cast<int64_t>(r.size());
  int64_t keep = n;
  if (top_p) {
    double sum = 0.0;
    keep = 0;
    for (int64_t i = 0; i < n; ++i) {
      sum += r[order[i]];
      if (sum > static_cast<float>(*top_p)) break;
      keep = i + 1;
    }
    keep = std::max<int64_t>(keep, 1);
    if (top_k && keep > *top_k) keep = *top_k;
  } else if (top_k) {
    keep = std::min(*top_k, n);
  }
  std::vector<uint8_t> sel(r.size(), 0);
  for (int64_t i = 0; i < keep; ++i) sel[order[i]] = 1;
  return sel;
}

std::vector<uint8_t> FromRanges(const std::vector<std::pair<int64_t, int64_t>>& ranges, size_t n) {
  std::vector<uint8_t> sel(n, 0);
  for (const auto& [a, b] : ranges) {
    for (int64_t j = a; j < b; ++j) sel[j] = 1;
  }
  return sel;
}

TEST_F(DyscoTinyTest, RelevanceSelectionAndBiasPerStep) {
  struct Mode {
    const char* name;
    std::optional<double> top_p;  // 0 = unset
    std::optional<int64_t> top_k;
    double strength;
  };
  const Mode modes[] = {{"hybrid", std::nullopt, std::nullopt, 2.0},
                        {"nucleus", 0.9, 0, 3.0},
                        {"top-k small", 0.0, 5, 2.0},
                        {"everything", 0.0, 100000, 2.0},
                        {"hybrid capped", 0.99, 4, 1.5},
                        {"hard", 0.9, std::nullopt, 99.0}};
  for (const Mode& m : modes) {
    Spec s;
    s.prompt = TemplatedPrompt(45, 11);
    s.max_new_tokens = 8;
    s.dysco = true;
    s.overrides.top_p = m.top_p;
    s.overrides.top_k = m.top_k;
    s.overrides.strength = m.strength;
    auto resolved = ResolveDyscoParams(runner_->config(), s.overrides, false, 45, -1);
    ASSERT_TRUE(resolved.ok());
    const DyscoParams params = *resolved;
    const float log_s = std::log(static_cast<float>(m.strength));
    int64_t template_selected = 0, bias_checked = 0;
    RunTogether({s}, DyscoTraceMode::kFull,
                [&](const StepOutcome& outcome, const std::vector<Sequence*>& seqs) {
                  const DyscoController* c = seqs[0]->dysco();
                  if (outcome.rows[0].kind != DyscoStepKind::kDynamic) return;
                  const int64_t n = static_cast<int64_t>(c->relevance().size());
                  EXPECT_EQ(n, seqs[0]->num_cached()) << "r covers every cached key";
                  ASSERT_EQ(static_cast<int64_t>(c->bias().size()), n);
                  ASSERT_EQ(static_cast<int64_t>(c->selection().size()), n);
                  const std::vector<uint8_t>& mask = c->template_mask();
                  for (int64_t j = 0; j < n; ++j) {
                    const bool tmpl = j < static_cast<int64_t>(mask.size()) && mask[j];
                    const bool sel = c->selection()[j];
                    template_selected += sel && tmpl;
                    float want;
                    if (params.hard_mask()) {
                      want = sel || j == n - 1 ? 0.0f : -INFINITY;
                    } else {
                      want = (sel && !tmpl) || j == n - 1 ? log_s : 0.0f;
                    }
                    ASSERT_EQ(c->bias()[j], want) << m.name << " key " << j << " of " << n;
                    ++bias_checked;
                  }
                });
    EXPECT_GT(bias_checked, 0) << m.name;
    if (!params.hard_mask() && std::string(m.name) == "everything") {
      EXPECT_GT(template_selected, 0) << "template positions were selected, yet got no bias";
    }
    // The trace of the same run: r is a distribution over n keys, the selection is the reference
    // selection of the traced r.
    const std::vector<Run> runs = RunTogether({s}, DyscoTraceMode::kFull);
    ASSERT_EQ(runs.size(), 1u);
    const auto& trace = runs[0].trace;
    ASSERT_EQ(trace.size(), 45 - params.prefill_len() + 8 - 1);
    for (const DyscoTraceRecord& r : trace) {
      ASSERT_EQ(static_cast<int64_t>(r.relevance.size()), r.num_keys);
      EXPECT_EQ(r.num_keys, r.position + 1);
      const double sum = std::accumulate(r.relevance.begin(), r.relevance.end(), 0.0);
      EXPECT_NEAR(sum, 1.0, 1e-5) << m.name << " step " << r.step;
      EXPECT_TRUE(
          std::all_of(r.relevance.begin(), r.relevance.end(), [](float v) { return v >= 0.0f; }));
      ASSERT_FALSE(r.top_relevance.empty());
      std::vector<float> sorted = r.relevance;
      std::sort(sorted.begin(), sorted.end(), std::greater<float>());
      EXPECT_EQ(r.top_relevance[0].second, sorted[0]);
      EXPECT_EQ(r.top_relevance.size(), std::min<size_t>(8, r.relevance.size()));
      if (r.phase == DyscoPhase::kContextWarmup) {
        EXPECT_EQ(r.num_selected, 0);
        EXPECT_TRUE(r.selected.empty());
        EXPECT_FALSE(r.next_token.has_value());
        continue;
      }
      const auto want = ReferenceSelection(r.relevance, params.top_p, params.top_k);
      EXPECT_EQ(FromRanges(r.selected, r.relevance.size()), want) << m.name << " step " << r.step;
      EXPECT_EQ(r.num_selected, std::count(want.begin(), want.end(), 1));
      double mass = 0.0;
      for (size_t j = 0; j < want.size(); ++j) mass += want[j] ? r.relevance[j] : 0.0;
      EXPECT_NEAR(r.nucleus_mass, mass, 1e-5);
      EXPECT_EQ(r.next_token.has_value(), r.position >= 44);
    }
  }
}

TEST_F(DyscoTinyTest, StaticVariantRunsNoSpeculativePass) {
  Spec s;
  s.prompt = TemplatedPrompt(30, 21);
  s.max_new_tokens = 9;
  s.dysco = true;
  s.overrides.dynamic_rescale = false;
  s.overrides.context_warmup_steps = 4;
  s.overrides.intervention_warmup = 2;
  int64_t static_steps = 0;
  const std::vector<Run> runs =
      RunTogether({s}, DyscoTraceMode::kFull,
                  [&](const StepOutcome& outcome, const std::vector<Sequence*>& seqs) {
                    EXPECT_EQ(outcome.speculative_rows, 0);
                    EXPECT_EQ(outcome.timings.speculative_seconds, 0.0);
                    static_steps += outcome.rows[0].kind == DyscoStepKind::kStatic;
                    if (outcome.rows[0].kind == DyscoStepKind::kStatic) {
                      EXPECT_TRUE(seqs[0]->dysco()->static_set_frozen());
                    }
                  });
  ASSERT_EQ(runs.size(), 1u);
  const auto& trace = runs[0].trace;
  // 3 context warm-up steps, then 3 intervention warm-up steps and 8 fed generated tokens.
  ASSERT_EQ(trace.size(), 3u + 3u + 8u);
  EXPECT_EQ(static_steps, 11);
  EXPECT_EQ(runs[0].totals.static_steps, 11);
  EXPECT_EQ(runs[0].totals.dynamic_steps, 0);
  EXPECT_EQ(runs[0].totals.context_warmup_steps, 3);
  EXPECT_EQ(runs[0].totals.seconds.speculative_seconds, 0.0);
  // The set is chosen once from the relevance after the last context warm-up step and kept.
  const DyscoTraceRecord& last_warmup = trace[2];
  const auto frozen = FromRanges(trace[3].selected, last_warmup.relevance.size());
  EXPECT_EQ(frozen, ReferenceSelection(last_warmup.relevance, 0.975, 4096));
  for (size_t i = 3; i < trace.size(); ++i) {
    EXPECT_EQ(trace[i].selected, trace[3].selected) << i;
    EXPECT_EQ(trace[i].num_selected, trace[3].num_selected);
    // Relevance frozen too (padded with zeros to n keys).
    ASSERT_EQ(static_cast<int64_t>(trace[i].relevance.size()), trace[i].num_keys);
    for (size_t j = 0; j < last_warmup.relevance.size(); ++j)
      EXPECT_EQ(trace[i].relevance[j], last_warmup.relevance[j]);
  }
}

TEST_F(DyscoTinyTest, GeneratorRejectsBadDyscoAndFreesPages) {
  GenerateRequest req;
  req.prompt_token_ids = TemplatedPrompt(10, 3);
  req.max_new_tokens = 4;
  req.dysco = true;
  Generator g(runner_, pool_.get(), factory_);
  auto r = g.Generate(req);  // warm-up of 8 + 2 = 10 tokens: as long as the prompt
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("dysco.context_warmup_steps"), std::string::npos);
  req.dysco_overrides.top_p = 2.0;
  r = g.Generate(req);
  EXPECT_EQ(r.status().message(), "dysco.top_p must be in (0, 1], got 2");
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
  // And a good one, with the chat format: auto intervention warm-up = the generation prompt's
  // tokens (4 with this tokenizer: <|im_start|> ass istant \n).
  GenerateRequest chat;
  chat.prompt = "Which city is the capital of France, and why is it famous?";
  chat.chat = true;
  chat.max_new_tokens = 3;
  chat.dysco = true;
  chat.dysco_trace = DyscoTraceMode::kSteps;
  r = g.Generate(chat);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(CountGenerationPromptTokens(runner_->config(), *tokenizer_), 4);
  int64_t iw_steps = 0;
  for (const auto& rec : r->dysco_trace) iw_steps += rec.phase == DyscoPhase::kInterventionWarmup;
  EXPECT_EQ(iw_steps, 4 + 1);
  EXPECT_EQ(pool_->num_free(), pool_->num_total());
}

// ---------------------------------------------------------------------------------------------
// Default model

class DyscoDefaultModelTest : public DefaultModelTest {};

TEST_F(DyscoDefaultModelTest, FranceQuestionAnswersParis) {
  auto pool = MakePool(16);
  ASSERT_NE(pool, nullptr);
  GenerateRequest req;
  req.prompt = "What is the capital of France? Answer in one sentence.";
  req.chat = true;
  req.max_new_tokens = 24;
  req.dysco = true;
  req.dysco_trace = DyscoTraceMode::kSteps;
  if (runner_->config().dysco.selected_heads.empty()) {
    // The package has no detected heads yet: a few from the middle layers.
    req.dysco_overrides.selected_heads = {{12, 3}, {14, 0}, {15, 2}, {16, 5}};
  }
  Generator g(runner_, pool.get(), factory_);
  auto r = g.Generate(req);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_NE(r->text.find("Paris"), std::string::npos) << r->text;
  EXPECT_EQ(r->finish_reason, FinishReason::kStop);
  EXPECT_EQ(r->dysco_totals.dynamic_steps, 4 + 1 + r->generated_tokens - 1);
  EXPECT_EQ(static_cast<int64_t>(r->dysco_trace.size()), 8 - 1 + 4 + 1 + r->generated_tokens - 1);
  EXPECT_EQ(pool->num_free(), pool->num_total());
}

}  // namespace
}  // namespace dysco
