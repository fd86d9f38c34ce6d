// Tests of the DySCO CPU ops (docs/dysco.md "Ops"), called through the dispatcher as TorchScript
// calls them. Each op is compared with a plain reference written with std containers and float64
// arithmetic (selection: std::stable_sort by relevance descending, so ties keep the lower position
// first; the nucleus sums in float64 in that order, as the op's contract says), on random batches
// whose rows have different n_b < S, with garbage (large values, NaN) past n_b that must not be
// read, and outputs poisoned (NaN / true) so that every element must be written. Then the edge
// cases of docs/dysco-reference-algorithm.md "Selection" and "Bias vector" one by one, and bad
// inputs.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/dysco_constants.h"
#include "kernels/op_calls.h"
#include "kernels/op_checks.h"
#include "kernels/ops.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The ops are called through the dispatcher (kernels/op_calls.h), exactly as a scripted model
// calls them.
namespace ops = dysco::ops;

// ---- plain references

std::vector<float> ToFloats(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::vector<bool> ToBools(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kBool).contiguous();
  return std::vector<bool>(c.data_ptr<bool>(), c.data_ptr<bool>() + c.numel());
}

// r_t of one row (n keys) from r_{t-1} (n - 1 entries used) and probs [H][>= n], in float64.
std::vector<double> ReferenceRelevance(const std::vector<float>& previous,
                                       const std::vector<std::vector<float>>& probs, int64_t n,
                                       double decay) {
  std::vector<double> a(n, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    for (const auto& head : probs) a[j] += head[j];
    a[j] /= static_cast<double>(probs.size());
    if (j < n - 1) a[j] += decay * previous[j];
  }
  const double sum = std::accumulate(a.begin(), a.end(), 0.0);
  for (double& v : a) v /= sum;
  return a;
}

// Positions 0..n-1 sorted by value descending, equal values in position order.
std::vector<int64_t> DescendingOrder(const std::vector<float>& values) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  return order;
}

// The selected set of one row (values = relevance[0, n)), docs/dysco-reference-algorithm.md
// "Selection".
std::vector<bool> ReferenceSelect(const std::vector<float>& values, float top_p, int64_t top_k) {
  const int64_t n = static_cast<int64_t>(values.size());
  const std::vector<int64_t> order = DescendingOrder(values);
  int64_t nucleus = n;
  if (top_p > 0.0f) {
    double cum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      cum += values[order[i]];
      if (cum > static_cast<double>(top_p)) {
        nucleus = std::max<int64_t>(i, 1);
        break;
      }
    }
  }
  int64_t count = 0;
  if (top_p > 0.0f && top_k > 0) {
    count = nucleus > top_k ? top_k : nucleus;
  } else if (top_p > 0.0f) {
    count = nucleus;
  } else {
    count = std::min(top_k, n);
  }
  std::vector<bool> selected(n, false);
  for (int64_t i = 0; i < count; ++i) selected[order[i]] = true;
  return selected;
}

// The reference below spells the threshold out; the kernels use the shared constant.
static_assert(dysco::kHardMaskStrength == 99.0,
              "docs/dysco.md fixes the hard-mask threshold at strength 99");

// The bias row [0, width) of docs/dysco-reference-algorithm.md "Bias vector".
std::vector<float> ReferenceBias(const std::vector<bool>& selected, const std::vector<bool>& tmpl,
                                 int64_t n, int64_t width, float strength) {
  std::vector<float> bias(width, 0.0f);
  const bool hard = strength >= 99.0f;
  const float boost = static_cast<float>(std::log(static_cast<double>(strength)));
  for (int64_t j = 0; j < n; ++j) {
    const bool current = j == n - 1;
    if (hard) {
      bias[j] = selected[j] || current ? 0.0f : -kInf;
    } else {
      bias[j] = (selected[j] && !tmpl[j]) || current ? boost : 0.0f;
    }
  }
  return bias;
}

// Every start position and every sequence, marking each occurrence's positions.
std::vector<bool> ReferenceTemplateMask(const std::vector<int64_t>& tokens,
                                        const std::vector<std::vector<int64_t>>& sequences) {
  std::vector<bool> mask(tokens.size(), false);
  for (const auto& seq : sequences) {
    if (seq.empty()) continue;
    for (size_t start = 0; start + seq.size() <= tokens.size(); ++start) {
      bool match = true;
      for (size_t i = 0; i < seq.size(); ++i) match = match && tokens[start + i] == seq[i];
      if (!match) continue;
      for (size_t i = 0; i < seq.size(); ++i) mask[start + i] = true;
    }
  }
  return mask;
}

// ---- comparison

// Floats equal within atol + rtol * |expected|; infinities must match exactly; NaN never passes.
::testing::AssertionResult FloatsClose(const std::vector<float>& actual,
                                       const std::vector<double>& expected, double atol,
                                       double rtol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != expected " << expected.size();
  }
  int64_t bad = 0;
  int64_t first = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i];
    const double e = expected[i];
    const bool ok =
        std::isinf(e) ? a == e : std::isfinite(a) && std::abs(a - e) <= atol + rtol * std::abs(e);
    if (!ok) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << actual.size() << " elements differ; first at flat index " << first
         << ": got " << actual[first] << ", expected " << expected[first];
}

::testing::AssertionResult FloatsClose(const std::vector<float>& actual,
                                       const std::vector<float>& expected, double atol,
                                       double rtol) {
  return FloatsClose(actual, std::vector<double>(expected.begin(), expected.end()), atol, rtol);
}

std::string Positions(const std::vector<bool>& flags) {
  std::ostringstream s;
  s << "{";
  for (size_t j = 0; j < flags.size(); ++j) {
    if (flags[j]) s << j << " ";
  }
  s << "}";
  return s.str();
}

::testing::AssertionResult BoolsEqual(const std::vector<bool>& actual,
                                      const std::vector<bool>& expected) {
  if (actual == expected) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << Positions(actual) << " (of " << actual.size() << "), expected "
         << Positions(expected) << " (of " << expected.size() << ")";
}

// ---- one call of dysco_select_bias on a batch, checked row by row against the references

struct SelectCase {
  std::vector<std::vector<float>> rows;  // relevance[0, n_b) of each row
  std::vector<std::vector<bool>> tmpl;   // template mask [0, n_b) of each row (empty: none)
  std::vector<float> top_p;
  std::vector<int64_t> top_k;
  std::vector<float> strength;
  int64_t width = 0;  // S; 0: max n_b + 3
};

struct SelectResult {
  std::vector<std::vector<bool>> selected;  // [0, n_b) of each row
  std::vector<std::vector<float>> bias;     // [0, S) of each row
};

// Runs the op on poisoned outputs with garbage past n_b and checks every element of every output.
SelectResult RunSelectAndCheck(const SelectCase& c) {
  const int64_t batch = static_cast<int64_t>(c.rows.size());
  int64_t width = c.width;
  for (const auto& row : c.rows) {
    width = std::max<int64_t>(width, row.size() + (c.width > 0 ? 0 : 3));
  }
  // Past n_b: values that would win any selection, and template flags; neither may be read.
  std::vector<float> relevance_data(batch * width, 1e3f);
  std::vector<uint8_t> tmpl_data(batch * width, 1);
  std::vector<int64_t> lens;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = static_cast<int64_t>(c.rows[b].size());
    lens.push_back(n);
    for (int64_t j = 0; j < n; ++j) {
      relevance_data[b * width + j] = c.rows[b][j];
      tmpl_data[b * width + j] = !c.tmpl.empty() && !c.tmpl[b].empty() && c.tmpl[b][j];
    }
  }
  const at::Tensor relevance = at::tensor(relevance_data).reshape({batch, width});
  const at::Tensor tmpl = at::tensor(tmpl_data).to(at::kBool).reshape({batch, width});
  const at::Tensor bias = at::full({batch, width}, kNaN);
  const at::Tensor selected = at::ones({batch, width}, at::kBool);
  const at::Tensor stats = at::full({batch, 2}, kNaN);
  ops::dysco_select_bias(bias, selected, stats, relevance, at::tensor(lens, at::kLong), tmpl,
                         at::tensor(c.top_p, at::kFloat), at::tensor(c.top_k, at::kLong),
                         at::tensor(c.strength, at::kFloat));

  SelectResult result;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lens[b];
    SCOPED_TRACE(::testing::Message() << "row " << b << " n=" << n << " top_p=" << c.top_p[b]
                                      << " top_k=" << c.top_k[b] << " strength=" << c.strength[b]);
    const std::vector<bool> expected = ReferenceSelect(c.rows[b], c.top_p[b], c.top_k[b]);
    const std::vector<bool> actual_row = ToBools(selected[b]);
    EXPECT_TRUE(
        BoolsEqual(std::vector<bool>(actual_row.begin(), actual_row.begin() + n), expected));
    EXPECT_TRUE(BoolsEqual(std::vector<bool>(actual_row.begin() + n, actual_row.end()),
                           std::vector<bool>(width - n, false)))
        << "selected past n_b";
    double mass = 0.0;
    int64_t count = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (expected[j]) {
        mass += c.rows[b][j];
        ++count;
      }
    }
    EXPECT_TRUE(
        FloatsClose(ToFloats(stats[b]), std::vector<double>{double(count), mass}, 1e-6, 1e-6))
        << "stats";
    const std::vector<bool> tmpl_row = ToBools(tmpl[b]);
    const std::vector<float> expected_bias =
        ReferenceBias(expected, tmpl_row, n, width, c.strength[b]);
    const std::vector<float> actual_bias = ToFloats(bias[b]);
    EXPECT_TRUE(FloatsClose(actual_bias, expected_bias, 1e-6, 1e-6)) << "bias";
    result.selected.push_back(std::vector<bool>(actual_row.begin(), actual_row.begin() + n));
    result.bias.push_back(actual_bias);
  }
  return result;
}

// Random relevance rows: a peaked, normalised distribution; some rows quantised to 1/64 so that
// many entries tie.
std::vector<float> RandomRelevance(int64_t n, bool ties, at::Generator& gen) {
  at::Tensor r = at::rand({n}, gen).pow(6.0);
  if (ties) r = (r * 64.0).floor() / 64.0 + 1.0 / 64.0;
  r = r / r.sum();
  return ToFloats(r);
}

// ---- registration

TEST(DyscoOps, AllFiveDyscoOpsAreRegisteredWithCpuKernels) {
  const std::vector<std::string>& names = ops::AllOpNames();
  for (const char* name : {"dysco::dysco_relevance_update", "dysco::dysco_select_bias",
                           "dysco::dysco_bias_from_selection", "dysco::dysco_template_mask",
                           "dysco::dysco_probe_mean"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
  }
  EXPECT_EQ(ops::MissingOps(), std::vector<std::string>{});
  EXPECT_EQ(ops::MissingKernels(c10::DispatchKey::CPU), std::vector<std::string>{});
}

// ---- dysco_relevance_update

struct RelevanceBatch {
  at::Tensor relevance;  // [B, S], r_{t-1} in [0, n_b - 1), NaN after
  at::Tensor probs;      // [B, H, S'], NaN past n_b
  at::Tensor num_keys;   // int64 [B]
  at::Tensor decay;      // fp32 [B]
};

RelevanceBatch MakeRelevanceBatch(const std::vector<int64_t>& lens, int64_t heads, int64_t width,
                                  int64_t probs_width, at::Generator& gen) {
  const int64_t batch = static_cast<int64_t>(lens.size());
  RelevanceBatch r;
  r.relevance = at::rand({batch, width}, gen);
  r.probs = at::rand({batch, heads, probs_width}, gen);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lens[b];
    r.relevance[b].slice(0, std::max<int64_t>(n - 1, 0)).fill_(kNaN);
    r.probs[b].slice(1, n).fill_(kNaN);
    if (n > 0) r.probs[b].slice(1, 0, n).div_(r.probs[b].slice(1, 0, n).sum(1, true));
  }
  r.num_keys = at::tensor(lens, at::kLong);
  r.decay = at::rand({batch}, gen) * 0.99;
  return r;
}

// Expected r_t [B, S] (float64 values, 0 past n_b).
std::vector<std::vector<double>> ExpectedRelevance(const RelevanceBatch& in, int64_t width) {
  std::vector<std::vector<double>> expected;
  for (int64_t b = 0; b < in.relevance.size(0); ++b) {
    const int64_t n = in.num_keys[b].item<int64_t>();
    std::vector<double> row(width, 0.0);
    if (n > 0) {
      std::vector<std::vector<float>> probs;
      for (int64_t h = 0; h < in.probs.size(1); ++h) probs.push_back(ToFloats(in.probs[b][h]));
      const std::vector<double> r = ReferenceRelevance(
          ToFloats(in.relevance[b]), probs, n, static_cast<double>(in.decay[b].item<float>()));
      std::copy(r.begin(), r.end(), row.begin());
    }
    expected.push_back(row);
  }
  return expected;
}

TEST(DyscoRelevanceUpdate, MatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  // Rows of different lengths, S > n_b, one row longer than a work chunk (8192 keys), one idle.
  const std::vector<int64_t> lens = {1, 2, 37, 20000, 0, 500};
  for (int64_t heads : {1, 3, 16}) {
    SCOPED_TRACE(::testing::Message() << "heads=" << heads);
    const RelevanceBatch in = MakeRelevanceBatch(lens, heads, 20011, 20005, gen);
    const std::vector<std::vector<double>> expected = ExpectedRelevance(in, 20011);
    const at::Tensor relevance = in.relevance.clone();
    ops::dysco_relevance_update(relevance, in.probs, in.num_keys, in.decay);
    for (size_t b = 0; b < lens.size(); ++b) {
      SCOPED_TRACE(::testing::Message() << "row " << b << " n=" << lens[b]);
      EXPECT_TRUE(FloatsClose(ToFloats(relevance[b]), expected[b], 1e-7, 1e-5));
      if (lens[b] > 0) {
        EXPECT_NEAR(relevance[b].to(at::kDouble).sum().item<double>(), 1.0, 1e-5);
      }
    }
  }
}

TEST(DyscoRelevanceUpdate, ZeroDecayIsTheHeadMeanAndOneKeyIsOne) {
  const at::Tensor probs = at::tensor({0.5f, 0.5f, 0.0f, 0.25f, 0.75f, 0.0f}).reshape({1, 2, 3});
  const at::Tensor relevance = at::tensor({0.9f, kNaN, kNaN}).reshape({1, 3});
  ops::dysco_relevance_update(relevance, probs, at::tensor({int64_t{2}}), at::zeros({1}));
  EXPECT_TRUE(FloatsClose(ToFloats(relevance), std::vector<float>{0.375f, 0.625f, 0.0f}, 0, 0));
  const at::Tensor one = at::full({1, 3}, kNaN);
  ops::dysco_relevance_update(one, probs, at::tensor({int64_t{1}}), at::full({1}, 0.5f));
  EXPECT_TRUE(FloatsClose(ToFloats(one), std::vector<float>{1.0f, 0.0f, 0.0f}, 0, 0));
}

TEST(DyscoRelevanceUpdate, ResultDoesNotDependOnThreadCount) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(12);
  const RelevanceBatch in = MakeRelevanceBatch({70000, 9000}, 4, 70000, 70000, gen);
  const int threads = at::get_num_threads();
  const at::Tensor single = in.relevance.clone();
  at::set_num_threads(1);
  ops::dysco_relevance_update(single, in.probs, in.num_keys, in.decay);
  at::set_num_threads(std::max(threads, 4));
  const at::Tensor many = in.relevance.clone();
  ops::dysco_relevance_update(many, in.probs, in.num_keys, in.decay);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(single, many));
}

TEST(DyscoRelevanceUpdate, RejectsBadInputs) {
  const at::Tensor rel = at::zeros({2, 8});
  const at::Tensor probs = at::zeros({2, 3, 8});
  const at::Tensor keys = at::tensor({int64_t{4}, int64_t{8}});
  const at::Tensor decay = at::zeros({2});
  EXPECT_NO_THROW(ops::dysco_relevance_update(rel, probs, keys, decay));
  EXPECT_THROW(ops::dysco_relevance_update(rel.to(at::kDouble), probs, keys, decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(at::zeros({8, 2}).t(), probs, keys, decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(at::zeros({2, 8, 1}), probs, keys, decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs.to(at::kHalf), keys, decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, at::zeros({3, 3, 8}), keys, decay),
               c10::Error);  // B
  EXPECT_THROW(ops::dysco_relevance_update(rel, at::zeros({2, 0, 8}), keys, decay),
               c10::Error);  // H = 0
  EXPECT_THROW(ops::dysco_relevance_update(rel, at::zeros({2, 3, 7}), keys, decay),
               c10::Error);  // S' < n
  EXPECT_THROW(ops::dysco_relevance_update(rel, at::zeros({2, 8}), keys, decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs, keys.to(at::kInt), decay), c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs, at::tensor({int64_t{4}}), decay),
               c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs, at::tensor({int64_t{4}, int64_t{9}}), decay),
               c10::Error);
  EXPECT_THROW(
      ops::dysco_relevance_update(rel, probs, at::tensor({int64_t{-1}, int64_t{2}}), decay),
      c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs, keys, at::zeros({2}, at::kDouble)),
               c10::Error);
  EXPECT_THROW(ops::dysco_relevance_update(rel, probs, keys, at::zeros({3})), c10::Error);
}

// ---- dysco_probe_mean

// The ATen sequence the runner ran before the op (clone, add_ per further head, mul_ by the double
// 1.0f / H), on the rows' first S keys.
at::Tensor AtenProbeMean(const at::Tensor& probs, int64_t batch, int64_t width,
                         const std::vector<int64_t>& heads) {
  const at::Tensor p = probs.narrow(0, 0, batch).narrow(2, 0, width);
  at::Tensor acc = p.select(1, heads[0]).clone();
  for (size_t k = 1; k < heads.size(); ++k) acc.add_(p.select(1, heads[k]));
  acc.mul_(static_cast<double>(1.0f / static_cast<float>(heads.size())));
  return acc;
}

// Bit for bit the ATen sequence, for the head lists the runner passes (the reference's 16 heads, a
// head twice, one head) over probs wider and taller than the mean (the model's probs span the
// block tables' capacity and the padded batch), on several threads and one; every element written
// (NaN first).
TEST(DyscoProbeMean, EqualsTheAtenSequenceBitForBit) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(71);
  const at::Tensor probs = at::rand({3, 20, 20000}, gen);
  const int threads_before = at::get_num_threads();
  for (const std::vector<int64_t>& heads :
       {std::vector<int64_t>{3, 0, 19, 7, 12, 1, 5, 16, 2, 9, 11, 18, 4, 14, 6, 10},
        std::vector<int64_t>{5, 2, 5}, std::vector<int64_t>{8}}) {
    for (const int threads : {1, 4}) {
      at::set_num_threads(threads);
      at::Tensor mean = at::full({2, 17000}, std::nanf(""));
      ops::dysco_probe_mean(mean, probs, heads);
      EXPECT_TRUE(at::equal(mean, AtenProbeMean(probs, 2, 17000, heads)))
          << heads.size() << " heads, " << threads << " threads";
    }
  }
  at::set_num_threads(threads_before);
}

// Each argument checked, the message naming it, nothing written.
TEST(DyscoProbeMean, RejectsBadInputs) {
  const at::Tensor probs = at::rand({2, 4, 8});
  at::Tensor mean = at::full({2, 8}, 7.0f);
  const std::vector<int64_t> heads = {0, 3};
  EXPECT_NO_THROW(ops::dysco_probe_mean(at::empty({2, 8}), probs, heads));
  auto rejected = [&](const at::Tensor& m, const at::Tensor& p, const std::vector<int64_t>& h,
                      const std::string& text) {
    try {
      ops::dysco_probe_mean(m, p, h);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  rejected(mean, probs, {}, "heads must have 1 to 64 entries");
  rejected(mean, probs, std::vector<int64_t>(65, 0), "heads must have 1 to 64 entries");
  rejected(mean, probs, {0, 4}, "heads[1] = 4 is not a row of probs (P = 4)");
  rejected(mean, probs, {-1}, "heads[0] = -1 is not a row of probs");
  rejected(mean, probs.to(at::kDouble), heads, "probs must have dtype Float");
  rejected(mean, at::rand({2, 4, 7}), heads, "probs must be [B' >= B = 2, P, S' >= S = 8]");
  rejected(mean, at::rand({1, 4, 8}), heads, "probs must be [B' >= B = 2, P, S' >= S = 8]");
  rejected(mean, at::rand({2, 8, 4}).transpose(1, 2), heads, "probs must be contiguous");
  rejected(at::empty({2, 8, 1}), probs, heads, "mean must have 2 dimensions");
  EXPECT_TRUE(at::equal(mean, at::full({2, 8}, 7.0f)));  // nothing written
}

// ---- dysco_select_bias on random batches

TEST(DyscoSelectBias, RandomBatchesMatchReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  // (top_p, top_k): nucleus, top-k, hybrid with either winning, unset encoded as 0 or negative.
  const std::vector<std::pair<float, int64_t>> modes = {
      {0.9f, 0},   {0.975f, -1}, {1.0f, 0},   {0.05f, 0},   {-1.0f, 7},  {0.0f, 1},
      {0.0f, 400}, {0.5f, 20},   {0.975f, 3}, {0.3f, 4096}, {0.99f, 64}, {1e-7f, 5}};
  const std::vector<int64_t> lens = {1, 2, 9, 64, 300, 1000, 4100};
  for (float strength : {2.0f, 0.5f, 99.0f, 1000.0f}) {
    for (const auto& [p, k] : modes) {
      SelectCase c;
      for (size_t b = 0; b < lens.size(); ++b) {
        c.rows.push_back(RandomRelevance(lens[b], b % 2 == 1, gen));
        c.tmpl.push_back(ToBools(at::rand({lens[b]}, gen) < 0.2));
        c.top_p.push_back(p);
        c.top_k.push_back(k);
        c.strength.push_back(strength);
      }
      c.width = 4200;
      RunSelectAndCheck(c);
    }
  }
}

TEST(DyscoSelectBias, LongRowsMatchReference) {
  // 128K keys: the nucleus sorts several growing chunks; hybrid and top-k stop early.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(22);
  SelectCase c;
  const int64_t n = 131072;
  for (auto [p, k] : std::vector<std::pair<float, int64_t>>{
           {0.975f, 0}, {0.975f, 4096}, {0.0f, 4096}, {0.5f, 100000}}) {
    at::Tensor r = at::rand({n}, gen) + 0.05;
    r = r / r.sum();
    c.rows.push_back(ToFloats(r));
    c.top_p.push_back(p);
    c.top_k.push_back(k);
    c.strength.push_back(2.0f);
  }
  RunSelectAndCheck(c);
}

TEST(DyscoSelectBias, RowsAreIndependentOfEachOther) {
  // Mixed modes and strengths in one batch give each row what it gets alone.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(23);
  SelectCase c;
  c.rows = {RandomRelevance(50, false, gen), RandomRelevance(7, true, gen),
            RandomRelevance(300, false, gen)};
  c.top_p = {0.9f, 0.0f, 0.6f};
  c.top_k = {0, 3, 10};
  c.strength = {2.0f, 200.0f, 3.0f};
  const SelectResult together = RunSelectAndCheck(c);
  for (size_t b = 0; b < c.rows.size(); ++b) {
    SelectCase alone;
    alone.rows = {c.rows[b]};
    alone.top_p = {c.top_p[b]};
    alone.top_k = {c.top_k[b]};
    alone.strength = {c.strength[b]};
    EXPECT_EQ(RunSelectAndCheck(alone).selected[0], together.selected[b]) << "row " << b;
  }
}

// ---- selection edge cases (one row each)

std::vector<bool> SelectOne(const std::vector<float>& row, float top_p, int64_t top_k) {
  SelectCase c;
  c.rows = {row};
  c.top_p = {top_p};
  c.top_k = {top_k};
  c.strength = {2.0f};
  return RunSelectAndCheck(c).selected[0];
}

std::vector<bool> Flags(int64_t n, const std::set<int64_t>& on) {
  std::vector<bool> flags(n, false);
  for (int64_t j : on) flags[j] = true;
  return flags;
}

TEST(DyscoSelectBias, TiesGoToTheLowerPosition) {
  const std::vector<float> flat = {0.25f, 0.25f, 0.25f, 0.25f};
  EXPECT_EQ(SelectOne(flat, 0.0f, 2), Flags(4, {0, 1}));
  EXPECT_EQ(SelectOne(flat, 0.5f, 0), Flags(4, {0, 1}));  // 0.25, 0.5 <= 0.5; 0.75 crosses
  EXPECT_EQ(SelectOne(flat, 0.6f, 1), Flags(4, {0}));     // nucleus {0, 1} > top_k 1
  const std::vector<float> mixed = {0.1f, 0.3f, 0.1f, 0.3f, 0.2f};
  EXPECT_EQ(SelectOne(mixed, 0.0f, 3), Flags(5, {1, 3, 4}));
  EXPECT_EQ(SelectOne(mixed, 0.0f, 4), Flags(5, {0, 1, 3, 4}));
  EXPECT_EQ(SelectOne(mixed, 0.0f, 1), Flags(5, {1}));
  // -0 and +0 tie.
  EXPECT_EQ(SelectOne({0.0f, -0.0f, 0.0f, 1.0f}, 0.0f, 2), Flags(4, {0, 3}));
  EXPECT_EQ(SelectOne({-0.0f, 0.0f, -0.0f, 1.0f}, 0.0f, 3), Flags(4, {0, 1, 3}));
}

TEST(DyscoSelectBias, AllMassOnOneKey) {
  const std::vector<float> spike = {0.0f, 0.0f, 1.0f, 0.0f, 0.0f};
  EXPECT_EQ(SelectOne(spike, 0.975f, 0), Flags(5, {2}));            // crosses at once: first kept
  EXPECT_EQ(SelectOne(spike, 1.0f, 0), Flags(5, {0, 1, 2, 3, 4}));  // 1.0 <= 1.0, zeros add 0
  EXPECT_EQ(SelectOne(spike, 0.975f, 3), Flags(5, {2}));
  EXPECT_EQ(SelectOne(spike, 0.0f, 3), Flags(5, {0, 1, 2}));  // zeros tie: lower positions
}

TEST(DyscoSelectBias, TopKLargerThanNSelectsAll) {
  EXPECT_EQ(SelectOne({0.1f, 0.7f, 0.2f}, 0.0f, 100), Flags(3, {0, 1, 2}));
  EXPECT_EQ(SelectOne({0.1f, 0.7f, 0.2f}, 0.0f, 3), Flags(3, {0, 1, 2}));
  EXPECT_EQ(SelectOne({1.0f}, 0.0f, 4096), Flags(1, {0}));
  EXPECT_EQ(SelectOne({0.1f, 0.7f, 0.2f}, 1.0f, std::numeric_limits<int64_t>::max()),
            Flags(3, {0, 1, 2}));
}

TEST(DyscoSelectBias, TopPOfOne) {
  // Exact binary fractions summing to exactly 1: every entry is kept.
  EXPECT_EQ(SelectOne({0.125f, 0.5f, 0.0625f, 0.25f, 0.0625f}, 1.0f, 0), Flags(5, {0, 1, 2, 3, 4}));
  // 10 x 0.1f sums to 1.0000000149 in float64: the last entry crosses 1.0 and is dropped.
  const std::vector<float> tenths(10, 0.1f);
  ASSERT_GT(10.0 * static_cast<double>(0.1f), 1.0);
  EXPECT_EQ(SelectOne(tenths, 1.0f, 0), Flags(10, {0, 1, 2, 3, 4, 5, 6, 7, 8}));
  // Random normalised rows: the reference sums the same way (float64, descending order).
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(31);
  SelectCase c;
  for (int64_t n : {3, 100, 1000, 5000}) {
    c.rows.push_back(RandomRelevance(n, false, gen));
    c.top_p.push_back(1.0f);
    c.top_k.push_back(0);
    c.strength.push_back(2.0f);
  }
  RunSelectAndCheck(c);
}

TEST(DyscoSelectBias, TinyTopPKeepsTheFirstEntry) {
  EXPECT_EQ(SelectOne({0.2f, 0.5f, 0.3f}, 1e-6f, 0), Flags(3, {1}));
  EXPECT_EQ(SelectOne({0.2f, 0.5f, 0.3f}, 1e-6f, 2), Flags(3, {1}));
  EXPECT_EQ(SelectOne({0.5f, 0.5f}, 1e-6f, 0), Flags(2, {0}));
}

TEST(DyscoSelectBias, CrossingEntryIsExcludedExactlyAtTheBoundary) {
  // Sorted: 0.5 (1), 0.25 (3), 0.125 (0), 0.125 (2); running sums 0.5, 0.75, 0.875, 1.0.
  const std::vector<float> row = {0.125f, 0.5f, 0.125f, 0.25f};
  EXPECT_EQ(SelectOne(row, 0.75f, 0), Flags(4, {1, 3}));  // 0.75 <= 0.75 kept; 0.875 crosses
  EXPECT_EQ(SelectOne(row, std::nextafter(0.75f, 0.0f), 0), Flags(4, {1}));  // 0.75 crosses
  EXPECT_EQ(SelectOne(row, std::nextafter(0.75f, 1.0f), 0), Flags(4, {1, 3}));
  EXPECT_EQ(SelectOne(row, 0.875f, 0), Flags(4, {0, 1, 3}));  // tie 0.125: position 0 first
  EXPECT_EQ(SelectOne(row, 0.5f, 0), Flags(4, {1}));
}

TEST(DyscoSelectBias, HybridTakesTopKWhenTheNucleusIsBigger) {
  // Uniform 0.1: the nucleus at 0.95 has 9 entries (10 x 0.1f crosses).
  const std::vector<float> tenths(10, 0.1f);
  EXPECT_EQ(SelectOne(tenths, 0.95f, 0), Flags(10, {0, 1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(SelectOne(tenths, 0.95f, 4), Flags(10, {0, 1, 2, 3}));                 // top_k wins
  EXPECT_EQ(SelectOne(tenths, 0.95f, 9), Flags(10, {0, 1, 2, 3, 4, 5, 6, 7, 8}));  // equal
  EXPECT_EQ(SelectOne(tenths, 0.95f, 50), Flags(10, {0, 1, 2, 3, 4, 5, 6, 7, 8}));
  // Peaked, exact binary fractions: sorted 0.625 (3), 0.25 (0), 0.0625 (1), 0.0625 (2).
  const std::vector<float> peaked = {0.25f, 0.0625f, 0.0625f, 0.625f};
  EXPECT_EQ(SelectOne(peaked, 0.9f, 3), Flags(4, {0, 3}));   // nucleus {3, 0} < top_k 3
  EXPECT_EQ(SelectOne(peaked, 0.95f, 2), Flags(4, {0, 3}));  // nucleus {3, 0, 1} > top_k 2
  EXPECT_EQ(SelectOne(peaked, 0.95f, 3), Flags(4, {0, 1, 3}));
  // A nucleus that needs more than the first sorted chunk (4096 entries) in hybrid mode.
  std::vector<float> long_flat(10000, 1.0f / 10000.0f);
  std::vector<bool> first_5000(10000, false);
  std::fill(first_5000.begin(), first_5000.begin() + 5000, true);
  EXPECT_EQ(SelectOne(long_flat, 0.9f, 5000), first_5000);
}

// ---- bias

TEST(DyscoSelectBias, HardMaskIgnoresTemplatesAndKeepsTheCurrentPosition) {
  SelectCase c;
  c.rows = {{0.4f, 0.1f, 0.3f, 0.05f, 0.15f}};
  c.tmpl = {{true, false, true, true, true}};
  c.top_p = {0.0f};
  c.top_k = {2};  // {0, 2}, both template positions
  c.strength = {99.0f};
  c.width = 7;
  const SelectResult r = RunSelectAndCheck(c);
  EXPECT_EQ(r.bias[0], (std::vector<float>{0.0f, -kInf, 0.0f, -kInf, 0.0f, 0.0f, 0.0f}));
}

TEST(DyscoSelectBias, SoftModeExcludesTemplatesButNotTheCurrentPosition) {
  SelectCase c;
  c.rows = {{0.4f, 0.15f, 0.3f, 0.05f, 0.1f}, {0.4f, 0.15f, 0.3f, 0.05f, 0.1f}};
  // Row 0: selected {0, 1, 2}; 0 and the current position 4 are template positions and 4 is
  // not selected. Row 1: no template.
  c.tmpl = {{true, false, false, false, true}, {}};
  c.top_p = {0.0f, 0.0f};
  c.top_k = {3, 3};
  c.strength = {2.0f, 4.0f};
  c.width = 6;
  const SelectResult r = RunSelectAndCheck(c);
  EXPECT_EQ(r.selected[0], Flags(5, {0, 1, 2}));
  const float l2 = static_cast<float>(std::log(2.0));
  const float l4 = static_cast<float>(std::log(4.0));
  EXPECT_EQ(r.bias[0], (std::vector<float>{0.0f, l2, l2, 0.0f, l2, 0.0f}));
  EXPECT_EQ(r.bias[1], (std::vector<float>{l4, l4, l4, 0.0f, l4, 0.0f}));
}

TEST(DyscoBiasFromSelection, MatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(41);
  const std::vector<int64_t> lens = {0, 1, 5, 100, 1000};
  const std::vector<float> strengths = {2.0f, 99.0f, 0.25f, 1e4f, 1.0f};
  const int64_t width = 1010;
  const int64_t batch = static_cast<int64_t>(lens.size());
  const at::Tensor selected = at::rand({batch, width}, gen) < 0.3;  // true past n_b too
  const at::Tensor tmpl = at::rand({batch, width}, gen) < 0.3;
  const at::Tensor bias = at::full({batch, width}, kNaN);
  ops::dysco_bias_from_selection(bias, selected, at::tensor(lens, at::kLong), tmpl,
                                 at::tensor(strengths, at::kFloat));
  for (int64_t b = 0; b < batch; ++b) {
    SCOPED_TRACE(::testing::Message() << "row " << b);
    const std::vector<float> expected =
        ReferenceBias(ToBools(selected[b]), ToBools(tmpl[b]), lens[b], width, strengths[b]);
    EXPECT_TRUE(FloatsClose(ToFloats(bias[b]), expected, 1e-6, 1e-6));
  }
}

TEST(DyscoBiasFromSelection, CurrentPositionIsBoostedWhenUnselectedAndTemplate) {
  const at::Tensor bias = at::full({1, 4}, kNaN);
  ops::dysco_bias_from_selection(
      bias, at::tensor({1, 0, 0, 0}).to(at::kBool).reshape({1, 4}), at::tensor({int64_t{3}}),
      at::tensor({0, 1, 1, 1}).to(at::kBool).reshape({1, 4}), at::full({1}, 3.0f));
  const float l3 = static_cast<float>(std::log(3.0));
  EXPECT_EQ(ToFloats(bias), (std::vector<float>{l3, 0.0f, l3, 0.0f}));
  ops::dysco_bias_from_selection(bias, at::zeros({1, 4}, at::kBool), at::tensor({int64_t{3}}),
                                 at::ones({1, 4}, at::kBool), at::full({1}, 100.0f));
  EXPECT_EQ(ToFloats(bias), (std::vector<float>{-kInf, -kInf, 0.0f, 0.0f}));
}

TEST(DyscoSelectBias, RejectsBadInputs) {
  const int64_t B = 2;
  const int64_t S = 6;
  const at::Tensor bias = at::zeros({B, S});
  const at::Tensor sel = at::zeros({B, S}, at::kBool);
  const at::Tensor stats = at::zeros({B, 2});
  const at::Tensor rel = at::full({B, S}, 1.0f / S);
  const at::Tensor keys = at::tensor({int64_t{3}, int64_t{6}});
  const at::Tensor tmpl = at::zeros({B, S}, at::kBool);
  const at::Tensor p = at::full({B}, 0.9f);
  const at::Tensor k = at::full({B}, 2, at::kLong);
  const at::Tensor s = at::full({B}, 2.0f);
  EXPECT_NO_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p, k, s));
  EXPECT_THROW(ops::dysco_select_bias(bias.to(at::kDouble), sel, stats, rel, keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(at::zeros({B, S + 1}), sel, stats, rel, keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel.to(at::kFloat), stats, rel, keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, at::zeros({B, 3}), rel, keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel.to(at::kHalf), keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, at::zeros({S, B}).t(), keys, tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys.to(at::kInt), tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, at::tensor({int64_t{3}, int64_t{7}}),
                                      tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, at::tensor({int64_t{-1}, int64_t{3}}),
                                      tmpl, p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl.to(at::kLong), p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, at::zeros({B, S - 1}, at::kBool),
                                      p, k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p.to(at::kDouble), k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, at::full({B}, 1.5f), k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, at::full({B}, kNaN), k, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p, k.to(at::kInt), s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p,
                                      at::full({B + 1}, 2, at::kLong), s),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, at::tensor({0.9f, 0.0f}),
                                      at::tensor({int64_t{2}, int64_t{0}}), s),
               c10::Error);  // row 1 sets neither
  EXPECT_THROW(
      ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p, k, at::tensor({2.0f, 0.0f})),
      c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p, k, at::full({B}, kNaN)),
               c10::Error);
  EXPECT_THROW(ops::dysco_select_bias(bias, sel, stats, rel, keys, tmpl, p, k,
                                      at::full({B}, 2.0, at::kDouble)),
               c10::Error);
  // Nothing was written by a rejected call.
  const at::Tensor poisoned = at::full({B, S}, kNaN);
  EXPECT_THROW(ops::dysco_select_bias(poisoned, sel, stats, rel, keys, tmpl, p, k,
                                      at::tensor({2.0f, -1.0f})),
               c10::Error);
  EXPECT_TRUE(poisoned.isnan().all().item<bool>());
}

TEST(DyscoBiasFromSelection, RejectsBadInputs) {
  const at::Tensor bias = at::zeros({2, 4});
  const at::Tensor sel = at::zeros({2, 4}, at::kBool);
  const at::Tensor keys = at::tensor({int64_t{1}, int64_t{4}});
  const at::Tensor s = at::full({2}, 2.0f);
  EXPECT_NO_THROW(ops::dysco_bias_from_selection(bias, sel, keys, sel, s));
  EXPECT_THROW(ops::dysco_bias_from_selection(bias.to(at::kHalf), sel, keys, sel, s), c10::Error);
  EXPECT_THROW(ops::dysco_bias_from_selection(at::zeros({4, 2}).t(), sel, keys, sel, s),
               c10::Error);
  EXPECT_THROW(ops::dysco_bias_from_selection(bias, sel.to(at::kFloat), keys, sel, s), c10::Error);
  EXPECT_THROW(ops::dysco_bias_from_selection(bias, sel, keys, at::zeros({2, 5}, at::kBool), s),
               c10::Error);
  EXPECT_THROW(
      ops::dysco_bias_from_selection(bias, sel, at::tensor({int64_t{1}, int64_t{5}}), sel, s),
      c10::Error);
  EXPECT_THROW(ops::dysco_bias_from_selection(bias, sel, keys, sel, at::full({2}, -2.0f)),
               c10::Error);
  EXPECT_THROW(ops::dysco_bias_from_selection(bias, sel, keys, sel, at::full({1}, 2.0f)),
               c10::Error);
}

// ---- the device-neutral checks (kernels/op_checks.h) and the CPU-only ones (kernels/cpu)

// fn raises a c10::Error whose message contains text.
template <typename Fn>
void ExpectErrorContaining(Fn&& fn, const std::string& text) {
  try {
    fn();
    ADD_FAILURE() << "no c10::Error; expected one containing \"" << text << "\"";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT_NE(message.find(text), std::string::npos) << message;
  }
}

// A tensor of the same dtype and shape on the meta device (metadata, no storage to read).
at::Tensor OnMeta(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().device(at::kMeta));
}

TEST(DyscoOpChecks, SharedChecksWantOneDeviceAndReadNoValues) {
  const at::Tensor bias = at::zeros({2, 4});
  const at::Tensor sel = at::zeros({2, 4}, at::kBool);
  const at::Tensor keys = at::tensor({int64_t{1}, int64_t{9}});  // 9 > S: a value check's job
  const at::Tensor s = at::full({2}, -2.0f);                     // <= 0: a value check's job
  EXPECT_NO_THROW(dysco::kernels::CheckDyscoBiasFromSelectionArgs(bias, sel, keys, sel, s));
  EXPECT_NO_THROW(dysco::kernels::CheckDyscoBiasFromSelectionArgs(
      OnMeta(bias), OnMeta(sel), OnMeta(keys), OnMeta(sel), OnMeta(s)));
  ExpectErrorContaining(
      [&] { dysco::kernels::CheckDyscoBiasFromSelectionArgs(bias, OnMeta(sel), keys, sel, s); },
      "dysco::dysco_bias_from_selection: selected is on meta but bias is on cpu");
  ExpectErrorContaining(
      [&] {
        dysco::kernels::CheckDyscoSelectBiasArgs(bias, sel, at::zeros({2, 2}), bias, keys, sel,
                                                 at::full({2}, 0.5f), OnMeta(keys), s);
      },
      "dysco::dysco_select_bias: top_k is on meta but bias is on cpu");
  ExpectErrorContaining(
      [&] {
        dysco::kernels::CheckDyscoTemplateMaskArgs(
            at::zeros({4}, at::kBool), at::zeros({4}, at::kLong), OnMeta(at::zeros({3}, at::kLong)),
            at::zeros({2}, at::kLong));
      },
      "dysco::dysco_template_mask: sequences is on meta but mask is on cpu");
  // The value checks come with the CPU kernels, which require the CPU.
  ExpectErrorContaining([&] { ops::dysco_bias_from_selection(bias, sel, keys, sel, s); },
                        "num_keys[1] = 9 must be in [0, 4]");
  ExpectErrorContaining(
      [&] {
        dysco::kernels::dysco_bias_from_selection_cpu(OnMeta(bias), OnMeta(sel), OnMeta(keys),
                                                      OnMeta(sel), OnMeta(s));
      },
      "dysco::dysco_bias_from_selection: bias must be a CPU tensor, got meta");
  ExpectErrorContaining(
      [&] {
        dysco::kernels::dysco_relevance_update_cpu(OnMeta(bias), OnMeta(at::zeros({2, 1, 4})),
                                                   OnMeta(keys), OnMeta(s));
      },
      "dysco::dysco_relevance_update: relevance must be a CPU tensor, got meta");
}

// ---- dysco_template_mask

std::vector<bool> RunTemplateMask(const std::vector<int64_t>& tokens,
                                  const std::vector<std::vector<int64_t>>& sequences) {
  std::vector<int64_t> flat;
  std::vector<int64_t> offsets = {0};
  for (const auto& seq : sequences) {
    flat.insert(flat.end(), seq.begin(), seq.end());
    offsets.push_back(static_cast<int64_t>(flat.size()));
  }
  const int64_t length = static_cast<int64_t>(tokens.size());
  const at::Tensor mask = at::ones({length}, at::kBool);  // poisoned: true
  ops::dysco_template_mask(mask, at::tensor(tokens, at::kLong), at::tensor(flat, at::kLong),
                           at::tensor(offsets, at::kLong));
  const std::vector<bool> actual = ToBools(mask);
  EXPECT_TRUE(BoolsEqual(actual, ReferenceTemplateMask(tokens, sequences)));
  return actual;
}

TEST(DyscoTemplateMask, OverlappingAdjacentAndSingleTokenSequences) {
  // Overlapping occurrences of [7, 7] in a run of three 7s, then [1, 2] twice back to back.
  EXPECT_EQ(RunTemplateMask({5, 7, 7, 7, 5, 1, 2, 1, 2, 3}, {{7, 7}, {1, 2}}),
            Flags(10, {1, 2, 3, 5, 6, 7, 8}));
  // Overlapping different sequences: [1, 2, 3] and [3, 4] share position 2.
  EXPECT_EQ(RunTemplateMask({1, 2, 3, 4, 9}, {{1, 2, 3}, {3, 4}}), Flags(5, {0, 1, 2, 3}));
  // Sequences of length 1 (including at the ends), and one that is a prefix of another.
  EXPECT_EQ(RunTemplateMask({4, 0, 4, 6, 8, 6}, {{4}, {6}, {6, 8, 6, 9}}), Flags(6, {0, 2, 3, 5}));
  // A longer occurrence listed before a shorter one at the same start keeps its full length.
  EXPECT_EQ(RunTemplateMask({6, 8, 6, 1}, {{6, 8, 6}, {6}}), Flags(4, {0, 1, 2}));
  // A partial occurrence at the end does not count; a sequence longer than the prompt neither.
  EXPECT_EQ(RunTemplateMask({9, 1, 2}, {{1, 2, 3}, {9, 1, 2, 3}}), Flags(3, {}));
  // No sequences, and an empty sequence: nothing marked.
  EXPECT_EQ(RunTemplateMask({1, 2, 3}, {}), Flags(3, {}));
  EXPECT_EQ(RunTemplateMask({1, 2, 3}, {{}, {2}}), Flags(3, {1}));
  // The same sequence listed twice; the whole prompt one occurrence.
  EXPECT_EQ(RunTemplateMask({1, 9690, 198}, {{1, 9690, 198}, {1, 9690, 198}}), Flags(3, {0, 1, 2}));
  EXPECT_EQ(RunTemplateMask({}, {{1}}), Flags(0, {}));
}

TEST(DyscoTemplateMask, RandomPromptsMatchReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(51);
  for (int64_t length : {1, 17, 300, 20000}) {
    // A small vocabulary so that sequences occur often, overlapping and adjacent.
    const at::Tensor tokens = at::randint(0, 4, {length}, gen, at::kLong);
    std::vector<int64_t> tok(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + length);
    const std::vector<std::vector<int64_t>> sequences = {{1, 2, 1}, {3}, {0, 0, 0, 0}, {2, 2}};
    SCOPED_TRACE(::testing::Message() << "length " << length);
    RunTemplateMask(tok, sequences);
  }
}

TEST(DyscoTemplateMask, RejectsBadInputs) {
  const at::Tensor mask = at::zeros({4}, at::kBool);
  const at::Tensor tokens = at::arange(4, at::kLong);
  const at::Tensor seqs = at::tensor({int64_t{1}, int64_t{2}, int64_t{3}});
  const at::Tensor offs = at::tensor({int64_t{0}, int64_t{2}, int64_t{3}});
  EXPECT_NO_THROW(ops::dysco_template_mask(mask, tokens, seqs, offs));
  EXPECT_THROW(ops::dysco_template_mask(mask.to(at::kFloat), tokens, seqs, offs), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(at::zeros({5}, at::kBool), tokens, seqs, offs), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens.to(at::kInt), seqs, offs), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens.reshape({2, 2}), seqs, offs), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens, seqs.to(at::kInt), offs), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens, seqs, at::zeros({0}, at::kLong)), c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens, seqs, at::tensor({int64_t{1}, int64_t{3}})),
               c10::Error);
  EXPECT_THROW(ops::dysco_template_mask(mask, tokens, seqs, at::tensor({int64_t{0}, int64_t{2}})),
               c10::Error);  // does not end at M
  EXPECT_THROW(
      ops::dysco_template_mask(mask, tokens, seqs,
                               at::tensor({int64_t{0}, int64_t{3}, int64_t{1}, int64_t{3}})),
      c10::Error);  // decreasing
  EXPECT_THROW(
      ops::dysco_template_mask(mask, at::arange(8, at::kLong).slice(0, 0, 8, 2), seqs, offs),
      c10::Error);  // strided
}

}  // namespace
