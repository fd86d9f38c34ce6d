// Tests of the `dysco` CPU ops (kernels/): each op, called through the dispatcher as TorchScript
// calls it, is compared element by element with a plain libtorch reference (gather the sequence's
// K/V from its pages, repeat KV heads for GQA, matmul, masked softmax, matmul, in float64) on
// random inputs. Outputs are poisoned with NaN first so that every element must be written.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kernels/cpu/attention_kernel.h"
#include "kernels/cpu/cpu_parallel.h"
#include "kernels/host_lengths.h"
#include "kernels/op_calls.h"
#include "kernels/op_checks.h"
#include "kernels/ops.h"
#include "tests/cpp/rope_reference.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

using Bias = c10::optional<at::Tensor>;

// The ops are called through the dispatcher (kernels/op_calls.h), exactly as a scripted model
// calls them.
namespace ops = dysco::ops;

// Every element of actual is finite-or-equal and within atol + rtol * |expected| of expected.
::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected,
                                    double atol, double rtol) {
  if (actual.sizes() != expected.sizes()) {
    std::ostringstream msg;
    msg << "shape " << actual.sizes() << " != expected " << expected.sizes();
    return ::testing::AssertionFailure() << msg.str();
  }
  const at::Tensor a = actual.to(at::kDouble).contiguous().reshape({-1});
  const at::Tensor e = expected.to(at::kDouble).contiguous().reshape({-1});
  const double* ap = a.data_ptr<double>();
  const double* ep = e.data_ptr<double>();
  int64_t bad = 0;
  int64_t first = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const bool ok =
        std::isfinite(ap[i]) && std::abs(ap[i] - ep[i]) <= atol + rtol * std::abs(ep[i]);
    if (!ok) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << a.numel() << " elements differ; first at flat index " << first
         << ": got " << ap[first] << ", expected " << ep[first];
}

struct Layout {
  int64_t kv_heads;
  int64_t group;  // query heads per KV head
  int64_t head_dim;
  int64_t page_size;
  int64_t query_heads() const { return kv_heads * group; }
};

std::string Describe(const Layout& layout, at::ScalarType dtype, const char* bias_kind) {
  std::ostringstream s;
  s << "Hkv=" << layout.kv_heads << " G=" << layout.group << " D=" << layout.head_dim
    << " page_size=" << layout.page_size << " dtype=" << dtype << " bias=" << bias_kind;
  return s.str();
}

// A paged cache holding a batch of sequences on shuffled, non-contiguous pages.
struct PagedBatch {
  Layout layout;
  at::Tensor kv;            // [2, NP, PS, Hkv, D]
  at::Tensor block_tables;  // int32 [B, P]; unused entries hold garbage page ids
  at::Tensor seq_lens;      // int64 [B]
};

PagedBatch MakeBatch(const Layout& layout, const std::vector<int64_t>& lens, at::ScalarType dtype,
                     at::Generator& gen) {
  PagedBatch batch;
  batch.layout = layout;
  const int64_t ps = layout.page_size;
  int64_t total_pages = 3;  // spare pages that nobody owns
  int64_t max_pages = 1;
  for (int64_t len : lens) {
    total_pages += (len + ps - 1) / ps;
    max_pages = std::max(max_pages, (len + ps - 1) / ps + 2);
  }
  batch.kv = at::randn({2, total_pages, ps, layout.kv_heads, layout.head_dim}, gen).to(dtype);
  const at::Tensor perm = at::randperm(total_pages, gen, at::kLong);
  batch.block_tables = at::full({static_cast<int64_t>(lens.size()), max_pages}, -5, at::kInt);
  int64_t next = 0;
  for (size_t b = 0; b < lens.size(); ++b) {
    const int64_t pages = (lens[b] + ps - 1) / ps;
    for (int64_t p = 0; p < pages; ++p) {
      batch.block_tables[b][p] = perm[next++].item<int64_t>();
    }
    if (pages < max_pages) batch.block_tables[b][pages] = static_cast<int32_t>(total_pages + 100);
  }
  batch.seq_lens = at::tensor(lens, at::kLong);
  return batch;
}

// K or V (which = 0 or 1) of sequence b's first n keys, one row per query head: [n, Hq, D] in
// float64.
at::Tensor GatherHeads(const PagedBatch& batch, int64_t which, int64_t b, int64_t n) {
  const Layout& l = batch.layout;
  const at::Tensor pos = at::arange(n, at::kLong);
  const at::Tensor pages =
      batch.block_tables[b].to(at::kLong).index_select(0, pos.div(l.page_size, "floor"));
  const at::Tensor slots = pages * l.page_size + pos.remainder(l.page_size);
  const at::Tensor rows =
      batch.kv[which].reshape({-1, l.kv_heads, l.head_dim}).index_select(0, slots);
  return rows.to(at::kDouble).repeat_interleave(l.group, 1);
}

// Attention probabilities [Hq, Q, n] and outputs [Q, Hq, D] (float64) of queries q [Q, Hq, D] of
// sequence b at the given positions (query i sees keys 0..positions[i]) over the sequence's n =
// seq_lens[b] keys.
std::pair<at::Tensor, at::Tensor> Reference(const PagedBatch& batch, int64_t b, const at::Tensor& q,
                                            const at::Tensor& positions, double scale,
                                            const Bias& bias) {
  const int64_t n = batch.seq_lens[b].item<int64_t>();
  const at::Tensor keys = GatherHeads(batch, 0, b, n);             // [n, Hq, D]
  const at::Tensor values = GatherHeads(batch, 1, b, n);           // [n, Hq, D]
  const at::Tensor qh = q.to(at::kDouble).transpose(0, 1);         // [Hq, Q, D]
  at::Tensor scores = qh.matmul(keys.permute({1, 2, 0})) * scale;  // [Hq, Q, n]
  if (bias.has_value()) scores = scores + (*bias)[b].slice(0, 0, n).to(at::kDouble);
  const at::Tensor future = at::arange(n, at::kLong).unsqueeze(0) > positions.unsqueeze(1);
  scores = scores.masked_fill(future, -kInf);
  // A row whose every logit is -inf has no distribution; the ops define it as zeros.
  const at::Tensor probs = at::softmax(scores, -1).nan_to_num(0.0);
  const at::Tensor out = probs.matmul(values.permute({1, 0, 2})).transpose(0, 1);  // [Q, Hq, D]
  return {probs, out};
}

enum class BiasKind { kNone, kRandom, kWithNegInf };
const char* Name(BiasKind kind) {
  switch (kind) {
    case BiasKind::kNone:
      return "none";
    case BiasKind::kRandom:
      return "random";
    case BiasKind::kWithNegInf:
      return "random_with_-inf";
  }
  return "?";
}

// fp32 [B, S] with S > max(seq_lens). -inf entries never hit the last key of a sequence (DySCO
// always allows the current token), so no decode row is fully masked.
Bias MakeBias(BiasKind kind, const PagedBatch& batch, at::Generator& gen) {
  if (kind == BiasKind::kNone) return c10::nullopt;
  const int64_t num_seqs = batch.seq_lens.size(0);
  const int64_t width = batch.seq_lens.max().item<int64_t>() + 5;
  at::Tensor bias = at::randn({num_seqs, width}, gen) * 2.0;
  if (kind == BiasKind::kWithNegInf) {
    const at::Tensor masked = at::rand({num_seqs, width}, gen) < 0.3;
    bias.masked_fill_(masked, -kInf);
    for (int64_t b = 0; b < num_seqs; ++b) {
      bias[b][batch.seq_lens[b].item<int64_t>() - 1] = 0.5;
    }
  }
  return bias;
}

double Tolerance(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-5 : 1e-2; }

const std::vector<Layout> kLayouts = {
    {3, 3, 64, 16},                   // SmolLM2-135M
    {2, 1, 40, 3},                    // MHA, odd page size
    {1, 4, 80, 1},                    // page size 1
    {2, 8, 64, 16},                   // GQA 8
    {3, 3, 36, 3},                    // head_dim not a multiple of 8
    {1, 3, 80, 16}, {2, 2, 128, 16},  // head_dim 128 (Qwen3, Llama): its own specialised loop
};

// ---- registration
// ----------------------------------------------------------------------------------------

TEST(DyscoOps, AllTwentyOpsAreRegisteredWithCpuKernels) {
  const std::vector<std::string>& names = ops::AllOpNames();
  EXPECT_EQ(names.size(), 20u);
  for (const char* name :
       {"dysco::paged_kv_write", "dysco::paged_attention_decode", "dysco::paged_attention_prefill",
        "dysco::attention_probs", "dysco::linear", "dysco::rms_norm", "dysco::rotary_embedding",
        "dysco::add_rms_norm", "dysco::silu_mul", "dysco::add_rms_norm_linear",
        "dysco::add_rms_norm_swiglu", "dysco::o_proj_mlp", "dysco::qk_norm_rope_kv_write",
        "dysco::qk_norm_rope_attention_decode", "dysco::rope_tables"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
  }
  EXPECT_EQ(ops::MissingOps(), std::vector<std::string>{});
  EXPECT_EQ(ops::MissingKernels(c10::DispatchKey::CPU), std::vector<std::string>{});
  // The startup check does see an op that is not there.
  EXPECT_EQ(ops::MissingOps({"dysco::paged_kv_write", "dysco::no_such_op"}),
            std::vector<std::string>{"dysco::no_such_op"});
}

// ---- linear
// ------------------------------------------------------------------------------------------

// out [M, N] vs a float64 matmul, for row counts on both sides of the GEMV / GEMM switch (8), row
// counts that are not multiples of the 3-row register block, N not a multiple of 4 (the one-row
// tail) and K not a multiple of 8 (the scalar tail), on one and on two threads.
TEST(Linear, MatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const int saved_threads = at::get_num_threads();
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (int64_t m : {1, 2, 3, 4, 5, 7, 8, 9, 33}) {
      for (auto [n, k] : {std::pair<int64_t, int64_t>{192, 576}, {67, 13}, {5, 8}, {1, 1536}}) {
        SCOPED_TRACE("threads=" + std::to_string(threads) + " M=" + std::to_string(m) +
                     " N=" + std::to_string(n) + " K=" + std::to_string(k));
        const at::Tensor x = at::randn({m, k}, gen);
        const at::Tensor w = at::randn({n, k}, gen);
        const at::Tensor out = at::full({m, n}, kNaN);
        ops::linear(out, x, w);
        const at::Tensor expected = x.to(at::kDouble).matmul(w.to(at::kDouble).t());
        EXPECT_TRUE(AllClose(out, expected, 1e-4, 1e-5));
      }
    }
  }
  at::set_num_threads(saved_threads);
}

TEST(Linear, ReducedPrecisionAndEmptyShapes) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(22);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (int64_t m : {1, 20}) {
      const at::Tensor x = at::randn({m, 64}, gen).to(dtype);
      const at::Tensor w = (at::randn({48, 64}, gen) * 0.1).to(dtype);
      const at::Tensor out = at::full({m, 48}, kNaN).to(dtype);
      ops::linear(out, x, w);
      const at::Tensor expected = x.to(at::kDouble).matmul(w.to(at::kDouble).t());
      EXPECT_TRUE(AllClose(out, expected, 3e-2, 2e-2)) << dtype << " M=" << m;
    }
  }
  const at::Tensor out = at::full({3, 4}, kNaN);
  ops::linear(out, at::empty({3, 0}), at::empty({4, 0}));  // K = 0: zeros
  EXPECT_TRUE(at::all(out == 0).item<bool>());
  EXPECT_NO_THROW(ops::linear(at::empty({0, 4}), at::empty({0, 5}), at::empty({4, 5})));
}

// bf16 weights and inputs through the few-row GEMV (rows 1..8) and the GEMM (9): fp32 sums of the
// exact bf16 values, each output rounded once to bf16, so within one bf16 rounding (2^-8 relative)
// of a float64 product of the same bf16 values; K and N with tails (K % 8, N % 4), every output
// written (NaN first).
TEST(Linear, Bf16WeightsMatchReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(23);
  for (int64_t m : {1, 2, 3, 8, 9}) {
    for (auto [n, k] : {std::pair<int64_t, int64_t>{192, 576}, {67, 13}, {5, 8}, {1, 1536}}) {
      SCOPED_TRACE("M=" + std::to_string(m) + " N=" + std::to_string(n) +
                   " K=" + std::to_string(k));
      const at::Tensor x = at::randn({m, k}, gen).to(at::kBFloat16);
      const at::Tensor w = (at::randn({n, k}, gen) * 0.1).to(at::kBFloat16);
      const at::Tensor out = at::full({m, n}, kNaN).to(at::kBFloat16);
      ops::linear(out, x, w);
      const at::Tensor expected = x.to(at::kDouble).matmul(w.to(at::kDouble).t());
      const at::Tensor got = out.to(at::kDouble);
      ASSERT_FALSE(at::any(at::isnan(got)).item<bool>());
      const double scale = expected.abs().max().item<double>();
      EXPECT_TRUE(AllClose(got, expected, 1e-2 * scale, 8e-3));
    }
  }
}

TEST(Linear, RejectsBadInputs) {
  const at::Tensor x = at::randn({2, 8});
  const at::Tensor w = at::randn({4, 8});
  const at::Tensor out = at::empty({2, 4});
  auto rejects = [](const at::Tensor& o, const at::Tensor& i, const at::Tensor& wt,
                    const char* text) {
    try {
      ops::linear(o, i, wt);
      ADD_FAILURE() << "accepted; expected an error containing " << text;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  rejects(out, at::randn({2, 7}), w, "dysco::linear: input must be [M, K = 8]");
  rejects(at::empty({2, 5}), x, w, "dysco::linear: out must be [M = 2, N = 4]");
  rejects(out, x.to(at::kDouble), w, "dysco::linear: input");
  rejects(out, x, w.to(at::kInt), "dysco::linear: weight must be float32, bfloat16 or float16");
  rejects(out, at::randn({8, 2}).t(), w, "dysco::linear: input");  // not contiguous
  rejects(out.to(at::kHalf), x, w, "dysco::linear: out");
}

// call() raises c10::Error whose message contains `text` (what a Rejects test expects of each bad
// argument: the op and argument named).
template <typename Call>
void ExpectRejected(Call&& call, const char* text) {
  try {
    call();
    ADD_FAILURE() << "accepted; expected an error containing " << text;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

// ---- rms_norm and rotary_embedding
// ----------------------------------------------------------------------

// The ATen expressions the two ops replace in the model (tools/dysco_export/model.py rms_norm and
// apply_rope; the model's CPU path until issue 11's fusion), the obviously-correct references.
at::Tensor ModelRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  xf = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return w * xf.to(x.scalar_type());
}

at::Tensor ModelRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

// True where libtorch sums fp32 in 8-float vectors (its default and AVX2 builds), the order the
// CPU rms_norm reproduces; ATEN_CPU_CAPABILITY=avx512 makes ATen sum 16-float vectors.
bool AtenSumsEightFloatVectors() {
  const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
  return capability == nullptr || std::string(capability) != "avx512";
}

// Rows of the model's widths (hidden 576 and 4096, head_dim 64 and 128), odd ones (a tail after
// the vectors, rows shorter than a vector) and long ones (the second and third levels of the
// sum's cascade); every output element poisoned first. Equal to the ATen chain bit for bit (the
// same sum order and roundings), so that the model's tokens did not move when the CPU took the op.
TEST(RmsNorm, EqualsTheModelsExpression) {
  if (!AtenSumsEightFloatVectors()) GTEST_SKIP() << "ATen sums in another order here";
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(31);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, d] : {std::pair<int64_t, int64_t>{1, 576},
                        {7, 4096},
                        {33, 128},
                        {5, 64},
                        {3, 13},
                        {4, 7},
                        {2, 1},
                        {64, 576},
                        {3, 8 * 4 * 16 * 16 + 8 * 5 + 3},
                        {2, 8 * 4 * 16 * 16 * 16 + 8 * 17 + 1}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " D=" + std::to_string(d));
      const at::Tensor x = (at::randn({m, d}, gen) * 3).to(dtype);
      const at::Tensor w = (at::rand({d}, gen) + 0.5).to(dtype);
      const at::Tensor out = at::full({m, d}, kNaN).to(dtype);
      ops::rms_norm(out, x, w, 1e-6);
      EXPECT_TRUE(at::equal(out, ModelRmsNorm(x, w, 1e-6)));
    }
  }
  EXPECT_NO_THROW(ops::rms_norm(at::empty({0, 8}), at::empty({0, 8}), at::ones({8}), 1e-6));
}

// RMSNorm in float64 by a plain loop: x [M, D] (float64), weight [D] of any dtype; eps as the ops.
at::Tensor RmsNormReference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xd = x.contiguous(), wd = weight.to(at::kDouble).contiguous();
  const int64_t m = xd.size(0), d = xd.size(1);
  const at::Tensor expected = at::empty({m, d}, at::kDouble);
  const double* xp = xd.data_ptr<double>();
  const double* wp = wd.data_ptr<double>();
  double* ep = expected.data_ptr<double>();
  for (int64_t r = 0; r < m; ++r) {
    double squares = 0.0;
    for (int64_t j = 0; j < d; ++j) squares += xp[r * d + j] * xp[r * d + j];
    const double inv = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
    for (int64_t j = 0; j < d; ++j) ep[r * d + j] = wp[j] * xp[r * d + j] * inv;
  }
  return expected;
}

// Against a plain double-precision loop: the op is a correct RMSNorm, whatever ATen does (fp32
// within 1e-5; bf16/fp16 within a rounding of the dtype).
TEST(RmsNorm, MatchesAPlainLoop) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(33);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, d] : {std::pair<int64_t, int64_t>{1, 576}, {9, 4096}, {33, 64}, {3, 13}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " D=" + std::to_string(d));
      const at::Tensor x = (at::randn({m, d}, gen) * 3).to(dtype);
      const at::Tensor w = (at::rand({d}, gen) + 0.5).to(dtype);
      const at::Tensor out = at::full({m, d}, kNaN).to(dtype);
      ops::rms_norm(out, x, w, 1e-6);
      const at::Tensor expected = RmsNormReference(x.to(at::kDouble), w, 1e-6);
      const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
      EXPECT_TRUE(AllClose(out.to(at::kDouble), expected, tol, tol));
    }
  }
}

// Exactly the ATen chain: the same products and sum, each rounded to the dtype.
TEST(RotaryEmbedding, EqualsTheModelsExpression) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(32);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [t, h, d] : {std::tuple<int64_t, int64_t, int64_t>{1, 32, 128},
                           {9, 8, 128},
                           {5, 3, 64},
                           {2, 1, 6},
                           {3, 2, 20},
                           {1, 9, 64},
                           {256, 9, 64}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " T=" + std::to_string(t) +
                   " H=" + std::to_string(h) + " D=" + std::to_string(d));
      const at::Tensor x = at::randn({t, h, d}, gen).to(dtype);
      const at::Tensor angle = at::rand({t, d}, gen) * 6.3;
      const at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
      const at::Tensor out = at::full({t, h, d}, kNaN).to(dtype);
      ops::rotary_embedding(out, x, cos, sin);
      EXPECT_TRUE(at::equal(out, ModelRope(x, cos, sin)));
    }
  }
}

TEST(RmsNormAndRotary, RejectBadInputs) {
  const at::Tensor x = at::randn({2, 8}), w = at::ones({8});
  ExpectRejected(
      [&] {
        ops::rms_norm(at::empty({2, 8}), at::randn({2, 7}), w, 1e-6);
      },
      "dysco::rms_norm: input");
  ExpectRejected([&] { ops::rms_norm(at::empty({2, 4}), x, w, 1e-6); }, "dysco::rms_norm: out");
  ExpectRejected([&] { ops::rms_norm(at::empty({2, 8}), x, w, 0.0); }, "eps must be > 0");
  ExpectRejected(
      [&] {
        ops::rms_norm(at::empty({2, 8}), x.to(at::kHalf), w, 1e-6);
      },
      "dysco::rms_norm: input");
  const at::Tensor q = at::randn({3, 2, 8}), cs = at::randn({3, 8});
  ExpectRejected(
      [&] {
        ops::rotary_embedding(at::empty({3, 2, 7}), at::randn({3, 2, 7}), cs, cs);
      },
      "must be even");
  ExpectRejected(
      [&] {
        ops::rotary_embedding(at::empty({3, 2, 8}), q, at::randn({2, 8}), cs);
      },
      "dysco::rotary_embedding: cos");
  ExpectRejected(
      [&] {
        ops::rotary_embedding(at::empty({3, 2, 8}), q, cs, cs.to(at::kHalf));
      },
      "dysco::rotary_embedding: sin");
}

// ---- rope_tables
// ------------------------------------------------------------------------------------

// T positions, random in [0, 131072) (the models' default context), the first two 0 and 131071.
at::Tensor RopePositions(int64_t t, at::Generator& gen) {
  at::Tensor positions = at::randint(0, 131072, {t}, gen, at::kLong);
  if (t > 0) positions[0] = 0;
  if (t > 1) positions[1] = 131071;
  return positions;
}

// Bit for bit the model's ATen lines (the CPU op is them: the CPU model keeps its bits), every
// element written (NaN first), and within the dtype's rounding of a float64 loop over the same
// fp32 angles, which pins the layout (both halves, i % (D/2)) and the scaling.
TEST(RopeTables, EqualsTheModelsExpression) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(47);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t d : {64, 128, 36}) {
      const at::Tensor inv_freq = dysco::RopeInvFreq(d, d == 36 ? 10000.0 : 500000.0);
      for (int64_t t : {0, 1, 7, 300}) {
        for (double scaling : {1.0, 1.2}) {
          SCOPED_TRACE(std::string(c10::toString(dtype)) + " D=" + std::to_string(d) +
                       " T=" + std::to_string(t) + " scaling=" + std::to_string(scaling));
          const at::Tensor positions = RopePositions(t, gen);
          const at::Tensor cos = at::full({t, d}, kNaN).to(dtype);
          const at::Tensor sin = at::full({t, d}, kNaN).to(dtype);
          ops::rope_tables(cos, sin, positions, inv_freq, scaling);
          const auto [model_cos, model_sin] =
              dysco::ModelRopeTables(positions, inv_freq, scaling, dtype);
          EXPECT_TRUE(at::equal(cos, model_cos));
          EXPECT_TRUE(at::equal(sin, model_sin));

          const at::Tensor expected_cos = at::empty({t, d}, at::kDouble);
          const at::Tensor expected_sin = at::empty({t, d}, at::kDouble);
          const int64_t* pos = positions.data_ptr<int64_t>();
          const float* freq = inv_freq.data_ptr<float>();
          double* ec = expected_cos.data_ptr<double>();
          double* es = expected_sin.data_ptr<double>();
          for (int64_t r = 0; r < t; ++r) {
            for (int64_t j = 0; j < d; ++j) {
              const float angle = static_cast<float>(pos[r]) * freq[j % (d / 2)];
              ec[r * d + j] = std::cos(static_cast<double>(angle)) * scaling;
              es[r * d + j] = std::sin(static_cast<double>(angle)) * scaling;
            }
          }
          const double tol = dtype == at::kFloat ? 1e-5 : 1e-2;
          EXPECT_TRUE(AllClose(cos, expected_cos, tol, tol));
          EXPECT_TRUE(AllClose(sin, expected_sin, tol, tol));
        }
      }
    }
  }
}

TEST(RopeTables, RejectsBadInputs) {
  const at::Tensor inv_freq = dysco::RopeInvFreq(8, 10000.0);
  const at::Tensor positions = at::arange(3, at::kLong);
  const at::Tensor cos = at::empty({3, 8}), sin = at::empty({3, 8});
  EXPECT_NO_THROW(ops::rope_tables(cos, sin, positions, inv_freq, 1.0));
  ExpectRejected([&] { ops::rope_tables(cos, sin, positions.to(at::kInt), inv_freq, 1.0); },
                 "dysco::rope_tables: positions must have dtype Long");
  ExpectRejected([&] { ops::rope_tables(cos, sin, at::arange(4, at::kLong), inv_freq, 1.0); },
                 "dysco::rope_tables: positions must have shape [3]");
  ExpectRejected(
      [&] { ops::rope_tables(cos, sin, positions, dysco::RopeInvFreq(6, 10000.0), 1.0); },
      "dysco::rope_tables: inv_freq must have shape [4]");
  ExpectRejected([&] { ops::rope_tables(cos, sin, positions, inv_freq.to(at::kDouble), 1.0); },
                 "dysco::rope_tables: inv_freq must have dtype Float");
  ExpectRejected(
      [&] {
        ops::rope_tables(at::empty({3, 7}), at::empty({3, 7}), positions, inv_freq, 1.0);
      },
      "dysco::rope_tables: cos must be [T, D] with D even");
  ExpectRejected(
      [&] {
        ops::rope_tables(cos, at::empty({2, 8}), positions, inv_freq, 1.0);
      },
      "dysco::rope_tables: sin must have shape [3, 8]");
  ExpectRejected(
      [&] {
        ops::rope_tables(cos, at::empty({3, 8}, at::kBFloat16), positions, inv_freq, 1.0);
      },
      "dysco::rope_tables: sin must have dtype Float");
  ExpectRejected(
      [&] {
        ops::rope_tables(at::empty({3, 8}, at::kDouble), sin, positions, inv_freq, 1.0);
      },
      "dysco::rope_tables: cos must be float32, bfloat16 or float16");
  ExpectRejected(
      [&] {
        ops::rope_tables(at::empty({8, 3}).t(), sin, positions, inv_freq, 1.0);
      },
      "dysco::rope_tables: cos must be contiguous");
  ExpectRejected([&] { ops::rope_tables(cos, cos, positions, inv_freq, 1.0); },
                 "dysco::rope_tables: cos must not overlap sin");
}

// ---- add_rms_norm and silu_mul
// --------------------------------------------------------------------------

// Widths of the models (576, 1536, 4096), odd ones (1, 7, 13, 1500: tails after the vectors, rows
// shorter than a vector) and one long enough for the second level of the norm's cascade sum.
const std::vector<std::pair<int64_t, int64_t>>& FusedOpShapes() {
  static const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1},    {3, 7},    {2, 13},
      {1, 576},  {64, 576}, {5, 1536},
      {7, 4096}, {4, 1500}, {3, 8 * 4 * 16 * 16 + 8 * 5 + 3}};
  return shapes;
}

// add_rms_norm over random inputs of one dtype and shape (residual 4x the input's scale, weights in
// [0.5, 1.5)), both outputs NaN first; the cases of the two tests below.
struct AddRmsNormRun {
  at::Tensor x, residual, w, out, sum;
  AddRmsNormRun(at::Generator& gen, at::ScalarType dtype, int64_t m, int64_t d)
      : x(at::randn({m, d}, gen).to(dtype)),
        residual((at::randn({m, d}, gen) * 4).to(dtype)),
        w((at::rand({d}, gen) + 0.5).to(dtype)),
        out(at::full({m, d}, kNaN).to(dtype)),
        sum(at::full({m, d}, kNaN).to(dtype)) {
    ops::add_rms_norm(out, sum, x, residual, w, 1e-6);
  }
};

// sum equals ATen's `input + residual` and out equals the existing rms_norm op on that rounded
// sum, bit for bit (so also the model's ATen expression of the norm, where ATen sums in 8-float
// vectors); every element of both outputs written (NaN first).
TEST(AddRmsNorm, EqualsAddThenRmsNorm) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(41);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, d] : FusedOpShapes()) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " D=" + std::to_string(d));
      const AddRmsNormRun run(gen, dtype, m, d);
      const at::Tensor expected_sum = run.x + run.residual;
      EXPECT_TRUE(at::equal(run.sum, expected_sum));
      const at::Tensor expected = at::full({m, d}, kNaN).to(dtype);
      ops::rms_norm(expected, expected_sum, run.w, 1e-6);
      EXPECT_TRUE(at::equal(run.out, expected));
      if (AtenSumsEightFloatVectors()) {
        EXPECT_TRUE(at::equal(run.out, ModelRmsNorm(expected_sum, run.w, 1e-6)));
      }
    }
  }
  EXPECT_NO_THROW(ops::add_rms_norm(at::empty({0, 8}), at::empty({0, 8}), at::empty({0, 8}),
                                    at::empty({0, 8}), at::ones({8}), 1e-6));
}

// Against a plain double-precision loop on the exact sum: sum within one rounding of the dtype,
// out within 1e-5 (fp32) or a few roundings of the dtype (the sum's rounding included).
TEST(AddRmsNorm, MatchesAPlainLoop) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(42);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, d] : FusedOpShapes()) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " D=" + std::to_string(d));
      const AddRmsNormRun run(gen, dtype, m, d);
      const at::Tensor& x = run.x;
      const at::Tensor& residual = run.residual;
      const at::Tensor& w = run.w;
      const at::Tensor& out = run.out;
      const at::Tensor& sum = run.sum;
      const at::Tensor sd = x.to(at::kDouble) + residual.to(at::kDouble);
      const at::Tensor expected = RmsNormReference(sd, w, 1e-6);
      const double sum_tol = dtype == at::kFloat ? 1e-6 : 1e-2;
      EXPECT_TRUE(AllClose(sum.to(at::kDouble), sd, sum_tol, sum_tol));
      const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
      EXPECT_TRUE(AllClose(out.to(at::kDouble), expected, tol, tol));
    }
  }
}

// The ATen expression silu_mul replaces: F.silu(g) * u over the two halves of input [M, 2N]. For
// fp16 where ATen's CPU silu does not take it (libtorch 1.13: the expression raises), the same two
// roundings through fp32 tensors (an fp16 product is exact in fp32).
at::Tensor ModelSiluMul(const at::Tensor& input) {
  const std::vector<at::Tensor> halves = input.chunk(2, -1);
  try {
    return at::silu(halves[0]) * halves[1];
  } catch (const c10::Error&) {
    if (input.scalar_type() != at::kHalf) throw;
  }
  const at::Tensor silu = at::silu(halves[0].to(at::kFloat)).to(at::kHalf);
  return (silu.to(at::kFloat) * halves[1].to(at::kFloat)).to(at::kHalf);
}

// silu_mul over random inputs [M, 2N] of one dtype (3x the unit scale), the output NaN first; the
// cases of the two tests below.
struct SiluMulRun {
  at::Tensor x, out;
  SiluMulRun(at::Generator& gen, at::ScalarType dtype, int64_t m, int64_t n)
      : x((at::randn({m, 2 * n}, gen) * 3).to(dtype)), out(at::full({m, n}, kNaN).to(dtype)) {
    ops::silu_mul(out, x);
  }
};

// Bit for bit the ATen expression (odd N: the halves' rows start off the vector grid); every
// element written (NaN first).
TEST(SiluMul, EqualsTheAtenExpression) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(43);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, n] : FusedOpShapes()) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " N=" + std::to_string(n));
      const SiluMulRun run(gen, dtype, m, n);
      EXPECT_TRUE(at::equal(run.out, ModelSiluMul(run.x)));
    }
  }
  EXPECT_NO_THROW(ops::silu_mul(at::empty({0, 4}), at::empty({0, 8})));
}

// Against a float64 loop: g / (1 + exp(-g)) * u, within 1e-5 (fp32) or two roundings of the dtype.
TEST(SiluMul, MatchesAPlainLoop) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(44);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [m, n] : FusedOpShapes()) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                   " N=" + std::to_string(n));
      const SiluMulRun run(gen, dtype, m, n);
      const at::Tensor& out = run.out;
      const at::Tensor xd = run.x.to(at::kDouble).contiguous();
      const at::Tensor expected = at::empty({m, n}, at::kDouble);
      const double* xp = xd.data_ptr<double>();
      double* ep = expected.data_ptr<double>();
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          const double g = xp[r * 2 * n + j], u = xp[r * 2 * n + n + j];
          ep[r * n + j] = g / (1.0 + std::exp(-g)) * u;
        }
      }
      const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
      EXPECT_TRUE(AllClose(out.to(at::kDouble), expected, tol, tol));
    }
  }
}

// add_rms_norm_linear is add_rms_norm then linear on the CPU, bit for bit (so a model that calls
// it computes what it computed with the two ops: the golden tokens, the native decode step): the
// GEMV row counts (1, 2, 8) and the GEMM ones (9, 33), every dtype, widths of the models and odd
// ones, an empty N; both outputs NaN first.
TEST(AddRmsNormLinear, EqualsAddRmsNormThenLinear) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(43);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t m : {1, 2, 8, 9, 33}) {
      for (auto [d, n] : {std::pair<int64_t, int64_t>{576, 1536},
                          {576, 192},
                          {64, 7},
                          {13, 5},
                          {1000, 333},
                          {8, 0}}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                     " D=" + std::to_string(d) + " N=" + std::to_string(n));
        const at::Tensor x = at::randn({m, d}, gen).to(dtype);
        const at::Tensor residual = (at::randn({m, d}, gen) * 4).to(dtype);
        const at::Tensor g = (at::rand({d}, gen) + 0.5).to(dtype);
        const at::Tensor w = (at::randn({n, d}, gen) / 8).to(dtype);
        const at::Tensor out = at::full({m, n}, kNaN).to(dtype);
        const at::Tensor sum = at::full({m, d}, kNaN).to(dtype);
        ops::add_rms_norm_linear(out, sum, x, residual, g, 1e-6, w);
        const at::Tensor normed = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor expected_sum = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor expected = at::full({m, n}, kNaN).to(dtype);
        ops::add_rms_norm(normed, expected_sum, x, residual, g, 1e-6);
        ops::linear(expected, normed, w);
        EXPECT_TRUE(at::equal(sum, expected_sum));
        EXPECT_TRUE(at::equal(out, expected));
        EXPECT_FALSE(out.isnan().any().item<bool>());
      }
    }
  }
  EXPECT_NO_THROW(ops::add_rms_norm_linear(at::empty({0, 4}), at::empty({0, 8}), at::empty({0, 8}),
                                           at::empty({0, 8}), at::ones({8}), 1e-6,
                                           at::ones({4, 8})));
}

// add_rms_norm_swiglu is add_rms_norm_linear then silu_mul on the CPU, bit for bit: GEMV and GEMM
// row counts, every dtype, SmolLM2's gate/up width and odd ones, N = 0; both outputs NaN first.
TEST(AddRmsNormSwiglu, EqualsAddRmsNormLinearThenSiluMul) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(44);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t m : {1, 2, 9}) {
      for (auto [d, n] : {std::pair<int64_t, int64_t>{576, 1536}, {64, 7}, {13, 5}, {8, 0}}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) +
                     " D=" + std::to_string(d) + " N=" + std::to_string(n));
        const at::Tensor x = at::randn({m, d}, gen).to(dtype);
        const at::Tensor residual = (at::randn({m, d}, gen) * 4).to(dtype);
        const at::Tensor g = (at::rand({d}, gen) + 0.5).to(dtype);
        const at::Tensor w = (at::randn({2 * n, d}, gen) / 8).to(dtype);
        const at::Tensor out = at::full({m, n}, kNaN).to(dtype);
        const at::Tensor sum = at::full({m, d}, kNaN).to(dtype);
        ops::add_rms_norm_swiglu(out, sum, x, residual, g, 1e-6, w);
        const at::Tensor gate_up = at::full({m, 2 * n}, kNaN).to(dtype);
        const at::Tensor expected_sum = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor expected = at::full({m, n}, kNaN).to(dtype);
        ops::add_rms_norm_linear(gate_up, expected_sum, x, residual, g, 1e-6, w);
        ops::silu_mul(expected, gate_up);
        EXPECT_TRUE(at::equal(sum, expected_sum));
        EXPECT_TRUE(at::equal(out, expected));
        EXPECT_FALSE(out.isnan().any().item<bool>());
      }
    }
  }
}

TEST(AddRmsNormSwiglu, RejectsBadInputs) {
  const at::Tensor x = at::randn({2, 8}), r = at::randn({2, 8}), g = at::ones({8});
  const at::Tensor sum = at::empty({2, 8});
  ExpectRejected(
      [&] {
        ops::add_rms_norm_swiglu(at::empty({2, 2}), sum, x, r, g, 1e-6, at::randn({5, 8}));
      },
      "dysco::add_rms_norm_swiglu: weight must be [2N, D] (the gate rows, then the up rows), got "
      "[5, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_swiglu(at::empty({2, 6}), sum, x, r, g, 1e-6, at::randn({6, 8}));
      },
      "dysco::add_rms_norm_swiglu: out must have shape [2, 3]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_swiglu(at::empty({2, 3}), x, x, r, g, 1e-6, at::randn({6, 8}));
      },
      "dysco::add_rms_norm_swiglu: sum must not overlap input");
}

// o_proj_mlp is linear, add_rms_norm_swiglu and linear on the CPU, bit for bit: GEMV and GEMM row
// counts, every dtype, SmolLM2's widths and odd ones; both outputs NaN first.
TEST(OProjMlp, EqualsLinearAddRmsNormSwigluLinear) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(45);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t m : {1, 2, 9}) {
      for (auto [a, d, inter] :
           {std::tuple<int64_t, int64_t, int64_t>{576, 576, 1536}, {64, 48, 40}, {13, 7, 5}}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " M=" + std::to_string(m) + " A=" +
                     std::to_string(a) + " D=" + std::to_string(d) + " I=" + std::to_string(inter));
        const at::Tensor attn = at::randn({m, a}, gen).to(dtype);
        const at::Tensor residual = (at::randn({m, d}, gen) * 4).to(dtype);
        const at::Tensor w_o = (at::randn({d, a}, gen) / 8).to(dtype);
        const at::Tensor g = (at::rand({d}, gen) + 0.5).to(dtype);
        const at::Tensor w_gate_up = (at::randn({2 * inter, d}, gen) / 8).to(dtype);
        const at::Tensor w_down = (at::randn({d, inter}, gen) / 8).to(dtype);
        const at::Tensor out = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor sum = at::full({m, d}, kNaN).to(dtype);
        ops::o_proj_mlp(out, sum, attn, residual, w_o, g, 1e-6, w_gate_up, w_down);
        const at::Tensor o = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor act = at::full({m, inter}, kNaN).to(dtype);
        const at::Tensor expected_sum = at::full({m, d}, kNaN).to(dtype);
        const at::Tensor expected = at::full({m, d}, kNaN).to(dtype);
        ops::linear(o, attn, w_o);
        ops::add_rms_norm_swiglu(act, expected_sum, o, residual, g, 1e-6, w_gate_up);
        ops::linear(expected, act, w_down);
        EXPECT_TRUE(at::equal(sum, expected_sum));
        EXPECT_TRUE(at::equal(out, expected));
        EXPECT_FALSE(out.isnan().any().item<bool>());
      }
    }
  }
}

TEST(OProjMlp, RejectsBadInputs) {
  const at::Tensor attn = at::randn({2, 6}), r = at::randn({2, 8}), g = at::ones({8});
  const at::Tensor w_o = at::randn({8, 6}), w_gu = at::randn({10, 8}), w_d = at::randn({8, 5});
  const at::Tensor out = at::empty({2, 8}), sum = at::empty({2, 8});
  ExpectRejected(
      [&] {
        ops::o_proj_mlp(out, sum, attn, r, at::randn({8, 7}), g, 1e-6, w_gu, w_d);
      },
      "dysco::o_proj_mlp: o_weight must have shape [8, 6]");
  ExpectRejected(
      [&] {
        ops::o_proj_mlp(out, sum, attn, r, w_o, g, 1e-6, at::randn({9, 8}), w_d);
      },
      "dysco::o_proj_mlp: gate_up_weight must be [2I, D = 8] (the gate rows, then the up rows), "
      "got [9, 8]");
  ExpectRejected(
      [&] {
        ops::o_proj_mlp(out, sum, attn, r, w_o, g, 1e-6, w_gu, at::randn({8, 4}));
      },
      "dysco::o_proj_mlp: down_weight must have shape [8, 5]");
  ExpectRejected([&] { ops::o_proj_mlp(out, sum, attn, r, w_o, g, 0.0, w_gu, w_d); },
                 "dysco::o_proj_mlp: eps must be > 0");
  ExpectRejected([&] { ops::o_proj_mlp(out, r, attn, r, w_o, g, 1e-6, w_gu, w_d); },
                 "dysco::o_proj_mlp: sum must not overlap residual");
  ExpectRejected([&] { ops::o_proj_mlp(out, out, attn, r, w_o, g, 1e-6, w_gu, w_d); },
                 "dysco::o_proj_mlp: out must not overlap sum");
}

TEST(AddRmsNormLinear, RejectsBadInputs) {
  const at::Tensor x = at::randn({2, 8}), r = at::randn({2, 8}), g = at::ones({8});
  const at::Tensor w = at::randn({5, 8});
  const at::Tensor out = at::empty({2, 5}), sum = at::empty({2, 8});
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(out, sum, x, r, g, 1e-6, at::randn({5, 7}));
      },
      "dysco::add_rms_norm_linear: weight must be [N, D = 8], got [5, 7]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(at::empty({2, 4}), sum, x, r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: out must have shape [2, 5]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(out, sum, at::randn({2, 7}), r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: input must have shape [2, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(out, sum, x, at::randn({3, 8}), g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: residual must have shape [2, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(out, at::empty({2, 4}), x, r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: sum must have shape [2, 8]");
  ExpectRejected([&] { ops::add_rms_norm_linear(out, sum, x, r, g, 1e-6, w.to(at::kHalf)); },
                 "dysco::add_rms_norm_linear: weight must have dtype Float");
  ExpectRejected([&] { ops::add_rms_norm_linear(out, sum, x, r, g.to(at::kInt), 1e-6, w); },
                 "dysco::add_rms_norm_linear: norm_weight must be float32, bfloat16 or float16");
  ExpectRejected([&] { ops::add_rms_norm_linear(out, sum, x, r, g, 0.0, w); },
                 "dysco::add_rms_norm_linear: eps must be > 0");
  ExpectRejected([&] { ops::add_rms_norm_linear(out, sum, x, r, g, 1e-6, w.t().contiguous().t()); },
                 "dysco::add_rms_norm_linear: weight must be contiguous");
  ExpectRejected([&] { ops::add_rms_norm_linear(out, r, x, r, g, 1e-6, w); },
                 "dysco::add_rms_norm_linear: sum must not overlap residual");
  // Partial overlaps: views of one buffer.
  const at::Tensor buffer = at::randn({26});
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(buffer.narrow(0, 0, 10).view({2, 5}),
                                 buffer.narrow(0, 6, 16).view({2, 8}), x, r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: out must not overlap sum");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(w.view({-1}).narrow(0, 0, 10).view({2, 5}), sum, x, r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: out must not overlap weight");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(x.view({-1}).narrow(0, 3, 10).view({2, 5}), sum, x, r, g, 1e-6, w);
      },
      "dysco::add_rms_norm_linear: out must not overlap input");
  ExpectRejected(
      [&] {
        ops::add_rms_norm_linear(out, buffer.narrow(0, 0, 16).view({2, 8}), x, r,
                                 buffer.narrow(0, 12, 8), 1e-6, w);
      },
      "dysco::add_rms_norm_linear: sum must not overlap norm_weight");
}

TEST(AddRmsNormAndSiluMul, RejectBadInputs) {
  const at::Tensor x = at::randn({2, 8}), r = at::randn({2, 8}), w = at::ones({8});
  const at::Tensor out = at::empty({2, 8}), sum = at::empty({2, 8});
  ExpectRejected(
      [&] {
        ops::add_rms_norm(out, sum, at::randn({2, 7}), r, w, 1e-6);
      },
      "dysco::add_rms_norm: input must have shape [2, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm(out, sum, x, at::randn({3, 8}), w, 1e-6);
      },
      "dysco::add_rms_norm: residual must have shape [2, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm(out, at::empty({2, 4}), x, r, w, 1e-6);
      },
      "dysco::add_rms_norm: sum must have shape [2, 8]");
  ExpectRejected(
      [&] {
        ops::add_rms_norm(at::empty({1, 8}), sum, x, r, w, 1e-6);
      },
      "dysco::add_rms_norm: out must have shape [2, 8]");
  ExpectRejected([&] { ops::add_rms_norm(out, sum, x, r.to(at::kHalf), w, 1e-6); },
                 "dysco::add_rms_norm: residual must have dtype Float");
  ExpectRejected([&] { ops::add_rms_norm(out, sum, x, r, w.to(at::kDouble), 1e-6); },
                 "dysco::add_rms_norm: weight must be float32, bfloat16 or float16");
  ExpectRejected(
      [&] {
        ops::add_rms_norm(out, sum, at::randn({8, 2}).t(), r, w, 1e-6);
      },
      "dysco::add_rms_norm: input must be contiguous");
  ExpectRejected([&] { ops::add_rms_norm(out, sum, x, r, w, 0.0); },
                 "dysco::add_rms_norm: eps must be > 0");
  ExpectRejected([&] { ops::add_rms_norm(out, out, x, r, w, 1e-6); },
                 "dysco::add_rms_norm: out must not overlap sum");
  ExpectRejected([&] { ops::add_rms_norm(out, r, x, r, w, 1e-6); },
                 "dysco::add_rms_norm: sum must not overlap residual");
  ExpectRejected([&] { ops::add_rms_norm(x, sum, x, r, w, 1e-6); },
                 "dysco::add_rms_norm: out must not overlap input");
  // Rows 0-1 and 1-2 of one buffer: a partial overlap.
  const at::Tensor buffer = at::randn({3, 8});
  ExpectRejected(
      [&] { ops::add_rms_norm(out, buffer.narrow(0, 1, 2), buffer.narrow(0, 0, 2), r, w, 1e-6); },
      "dysco::add_rms_norm: sum must not overlap input");
  ExpectRejected([&] { ops::add_rms_norm(out, sum, x, r, sum.narrow(0, 1, 1).reshape({8}), 1e-6); },
                 "dysco::add_rms_norm: sum must not overlap weight");

  const at::Tensor gu = at::randn({3, 8});
  ExpectRejected([&] { ops::silu_mul(at::empty({3, 3}), at::randn({3, 7})); }, "must be even");
  ExpectRejected(
      [&] {
        ops::silu_mul(at::empty({3, 8}), gu);
      },
      "dysco::silu_mul: out must have shape [3, 4]");
  ExpectRejected(
      [&] {
        ops::silu_mul(at::empty({3, 4}, at::kHalf), gu);
      },
      "dysco::silu_mul: out must have dtype Float");
  ExpectRejected(
      [&] {
        ops::silu_mul(at::empty({3, 4}), at::randn({8, 3}).t());
      },
      "dysco::silu_mul: input must be contiguous");
  ExpectRejected(
      [&] {
        ops::silu_mul(at::empty({3, 4}), at::randn({3, 8}).to(at::kInt));
      },
      "dysco::silu_mul: input must be float32, bfloat16 or float16");
  ExpectRejected(
      [&] {
        ops::silu_mul(gu.view({-1}).narrow(0, 4, 12).view({3, 4}), gu);
      },
      "dysco::silu_mul: out must not overlap input");
}

// ---- paged_kv_write
// --------------------------------------------------------------------------------------

TEST(PagedKvWrite, WritesEverySlotExactlyAndSkipsNegativeSlots) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t page_size : {1, 3, 16}) {
      SCOPED_TRACE(Describe({3, 1, 40, page_size}, dtype, "-"));
      const int64_t num_pages = 7, kv_heads = 3, head_dim = 40, tokens = 13;
      const at::Tensor kv = at::randn({2, num_pages, page_size, kv_heads, head_dim}, gen).to(dtype);
      const at::Tensor key = at::randn({tokens, kv_heads, head_dim}, gen).to(dtype);
      const at::Tensor value = at::randn({tokens, kv_heads, head_dim}, gen).to(dtype);
      // Distinct random slots, every third token skipped.
      at::Tensor slots =
          at::randperm(num_pages * page_size, gen, at::kLong).slice(0, 0, tokens).clone();
      if (slots.size(0) < tokens) {
        slots = at::cat({slots, at::full({tokens - slots.size(0)}, -1, at::kLong)});
      }
      for (int64_t t = 0; t < tokens; t += 3) slots[t] = -1;

      at::Tensor expected = kv.clone();
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t slot = slots[t].item<int64_t>();
        if (slot < 0) continue;
        expected[0].view({-1, kv_heads, head_dim})[slot].copy_(key[t]);
        expected[1].view({-1, kv_heads, head_dim})[slot].copy_(value[t]);
      }
      ops::paged_kv_write(kv, key, value, slots);
      EXPECT_TRUE(at::equal(kv, expected));
    }
  }
}

TEST(PagedKvWrite, RejectsBadInputs) {
  const at::Tensor kv = at::zeros({2, 4, 16, 3, 64});
  const at::Tensor key = at::zeros({5, 3, 64});
  const at::Tensor slots = at::arange(5, at::kLong);
  EXPECT_NO_THROW(ops::paged_kv_write(kv, key, key, slots));
  EXPECT_THROW(ops::paged_kv_write(kv, key.to(at::kDouble), key, slots), c10::Error);    // dtype
  EXPECT_THROW(ops::paged_kv_write(kv, key, key.to(at::kBFloat16), slots), c10::Error);  // dtype
  EXPECT_THROW(ops::paged_kv_write(kv, key, key, slots.to(at::kInt)), c10::Error);  // slot dtype
  EXPECT_THROW(ops::paged_kv_write(kv, at::zeros({5, 64, 3}).transpose(1, 2), key, slots),
               c10::Error);
  EXPECT_THROW(ops::paged_kv_write(kv, at::zeros({5, 2, 64}), key, slots), c10::Error);   // Hkv
  EXPECT_THROW(ops::paged_kv_write(kv, key, at::zeros({4, 3, 64}), slots), c10::Error);   // T
  EXPECT_THROW(ops::paged_kv_write(kv, key, key, at::arange(4, at::kLong)), c10::Error);  // T
  EXPECT_THROW(ops::paged_kv_write(kv, key, key, at::full({5}, 64, at::kLong)),
               c10::Error);  // past the cache
  EXPECT_THROW(ops::paged_kv_write(at::zeros({3, 4, 16, 3, 64}), key, key, slots), c10::Error);
  EXPECT_THROW(ops::paged_kv_write(at::zeros({2, 4, 16, 3, 64}, at::kInt), key.to(at::kInt),
                                   key.to(at::kInt), slots),
               c10::Error);
}

// ---- qk_norm_rope_kv_write
// ---------------------------------------------------------------------------------

// The op's inputs: T tokens' fused projection [T, (H + 2 Hkv) D], their cos and sin, per-head norm
// weights, a cache with random contents (slots not written must keep them) and distinct random
// slots, every third token's -1 (no K/V written).
struct QkvRun {
  at::Tensor qkv, cos, sin, q_w, k_w, kv, slots;
  int64_t t, h, hkv, d;
  QkvRun(at::Generator& gen, at::ScalarType dtype, int64_t t_, int64_t h_, int64_t hkv_, int64_t d_)
      : t(t_), h(h_), hkv(hkv_), d(d_) {
    qkv = (at::randn({t, (h + 2 * hkv) * d}, gen) * 3).to(dtype);
    const at::Tensor angle = at::rand({t, d}, gen) * 6.3;
    cos = angle.cos().to(dtype);
    sin = angle.sin().to(dtype);
    q_w = (at::rand({d}, gen) + 0.5).to(dtype);
    k_w = (at::rand({d}, gen) + 0.5).to(dtype);
    const int64_t pages = t / 16 + 2;
    kv = at::randn({2, pages, 16, hkv, d}, gen).to(dtype);
    slots = at::randperm(pages * 16, gen, at::kLong).slice(0, 0, t).clone();
    for (int64_t i = 1; i < t; i += 3) slots[i] = -1;
  }
  // Column block [begin, begin + heads) of heads of qkv as [T, heads, D] (a copy).
  at::Tensor Heads(int64_t begin, int64_t heads) const {
    return qkv.narrow(1, begin * d, heads * d).reshape({t, heads, d}).contiguous();
  }
};

// The obviously-correct reference: the model's ATen expressions (ModelRmsNorm per head row, then
// ModelRope) on qkv's column blocks, and the cache written row by row; the fused op equals them
// bit for bit (where ATen sums the norm's squares in the order the CPU rms_norm reproduces; else
// within the norm's tolerance). Shapes: SmolLM2 and Qwen3-8B decode rows, a prefill chunk split
// over threads, odd head dims and head counts.
TEST(QkNormRopeKvWrite, EqualsTheModelsExpressions) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(35);
  const bool exact = AtenSumsEightFloatVectors();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [t, h, hkv, d] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 9, 3, 64},
                                {1, 32, 8, 128},
                                {37, 4, 2, 128},
                                {5, 3, 3, 36},
                                {4, 1, 1, 6}}) {
      for (bool norms : {false, true}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " T=" + std::to_string(t) +
                     " H=" + std::to_string(h) + " Hkv=" + std::to_string(hkv) +
                     " D=" + std::to_string(d) + (norms ? " norms" : ""));
        const QkvRun run(gen, dtype, t, h, hkv, d);
        auto norm_rope = [&](const at::Tensor& x, const at::Tensor& w) {
          const at::Tensor normed =
              norms ? ModelRmsNorm(x.reshape({-1, d}), w, 1e-6).reshape(x.sizes()) : x;
          return ModelRope(normed, run.cos, run.sin);
        };
        const at::Tensor expected_q = norm_rope(run.Heads(0, h), run.q_w);
        const at::Tensor expected_k = norm_rope(run.Heads(h, hkv), run.k_w);
        const at::Tensor v = run.Heads(h + hkv, hkv);
        at::Tensor expected_kv = run.kv.clone();
        for (int64_t i = 0; i < t; ++i) {
          const int64_t slot = run.slots[i].item<int64_t>();
          if (slot < 0) continue;
          expected_kv[0].view({-1, hkv, d})[slot].copy_(expected_k[i]);
          expected_kv[1].view({-1, hkv, d})[slot].copy_(v[i]);
        }
        const at::Tensor query = at::full({t, h, d}, kNaN).to(dtype);
        const at::Tensor kv = run.kv.clone();
        ops::qk_norm_rope_kv_write(query, kv, run.qkv, run.cos, run.sin, run.slots,
                                   norms ? Bias(run.q_w) : Bias(), norms ? Bias(run.k_w) : Bias(),
                                   1e-6);
        if (exact || !norms) {
          EXPECT_TRUE(at::equal(query, expected_q));
          EXPECT_TRUE(at::equal(kv, expected_kv));
        } else {
          const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
          EXPECT_TRUE(AllClose(query, expected_q, tol, tol));
          EXPECT_TRUE(AllClose(kv, expected_kv, tol, tol));
        }
      }
    }
  }
}

// qk_norm_rope_attention_decode equals its two ops (qk_norm_rope_kv_write, then
// paged_attention_decode) bit for bit: the output, the query and the cache; decode rows of several
// lengths on shuffled pages (the newest key's slot where the table puts it), with and without the
// norms and a key bias, fp32 / bf16 / fp16, GQA and MHA.
TEST(QkNormRopeAttentionDecode, EqualsTheTwoOps) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(44);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto [h, hkv, d] : {std::tuple<int64_t, int64_t, int64_t>{8, 2, 64}, {3, 3, 16}}) {
      for (bool norms : {false, true}) {
        for (bool biased : {false, true}) {
          SCOPED_TRACE(std::string(c10::toString(dtype)) + " H=" + std::to_string(h) +
                       " Hkv=" + std::to_string(hkv) + " D=" + std::to_string(d) +
                       (norms ? " norms" : "") + (biased ? " biased" : ""));
          const std::vector<int64_t> lens = {1, 16, 17, 40};
          const int64_t b = 4, page_size = 16, max_pages = 3;
          const at::Tensor tables = at::randperm(b * max_pages + 2, gen, at::kLong)
                                        .slice(0, 0, b * max_pages)
                                        .to(at::kInt)
                                        .reshape({b, max_pages});
          std::vector<int64_t> slot_values;
          for (int64_t r = 0; r < b; ++r) {
            const int64_t pos = lens[r] - 1;
            slot_values.push_back(tables[r][pos / page_size].item<int64_t>() * page_size +
                                  pos % page_size);
          }
          const at::Tensor slots = at::tensor(slot_values, at::kLong);
          const at::Tensor seq_lens = at::tensor(lens, at::kLong);
          const at::Tensor qkv = (at::randn({b, (h + 2 * hkv) * d}, gen) * 3).to(dtype);
          const at::Tensor angle = at::rand({b, d}, gen) * 6.3;
          const at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
          const Bias q_w = norms ? Bias((at::rand({d}, gen) + 0.5).to(dtype)) : Bias();
          const Bias k_w = norms ? Bias((at::rand({d}, gen) + 0.5).to(dtype)) : Bias();
          const Bias bias = biased ? Bias(at::randn({b, 45}, gen)) : Bias();
          const at::Tensor kv0 =
              at::randn({2, b * max_pages + 2, page_size, hkv, d}, gen).to(dtype);
          const double scale = 1.0 / std::sqrt(static_cast<double>(d));
          at::Tensor kv_two = kv0.clone(), kv_fused = kv0.clone();
          at::Tensor query_two = at::full({b, h, d}, kNaN).to(dtype);
          at::Tensor out_two = at::full({b, h, d}, kNaN).to(dtype);
          at::Tensor query = query_two.clone(), out = out_two.clone();
          ops::qk_norm_rope_kv_write(query_two, kv_two, qkv, cos, sin, slots, q_w, k_w, 1e-6);
          ops::paged_attention_decode(out_two, query_two, kv_two, tables, seq_lens, scale, bias);
          ops::qk_norm_rope_attention_decode(out, query, kv_fused, qkv, cos, sin, slots, q_w, k_w,
                                             1e-6, tables, seq_lens, scale, bias);
          EXPECT_FALSE(at::isnan(out.to(at::kFloat)).any().item<bool>());
          EXPECT_TRUE(at::equal(out, out_two));
          EXPECT_TRUE(at::equal(query, query_two));
          EXPECT_TRUE(at::equal(kv_fused, kv_two));
          // With probes (a head twice, the last head, head 0): the same, and probs equal to
          // attention_probs after the two ops, every element written (NaN first; S' 48 past every
          // row's length).
          const at::Tensor heads = at::tensor(std::vector<int64_t>{1, h - 1, 1, 0}, at::kLong);
          at::Tensor probs_two = at::full({b, 4, 48}, kNaN);
          ops::attention_probs(probs_two, query_two, kv_two, tables, seq_lens, heads, scale, bias);
          at::Tensor kv_probes = kv0.clone(), probs = at::full({b, 4, 48}, kNaN);
          out.fill_(kNaN);
          query.fill_(kNaN);
          ops::qk_norm_rope_attention_decode(out, query, kv_probes, qkv, cos, sin, slots, q_w, k_w,
                                             1e-6, tables, seq_lens, scale, bias, probs, heads);
          EXPECT_TRUE(at::equal(out, out_two));
          EXPECT_TRUE(at::equal(query, query_two));
          EXPECT_TRUE(at::equal(kv_probes, kv_two));
          EXPECT_FALSE(at::isnan(probs).any().item<bool>());
          EXPECT_TRUE(at::equal(probs, probs_two));
        }
      }
    }
  }
}

// Each of its arguments checked before anything is written; the messages name the stage's op.
TEST(QkNormRopeAttentionDecode, RejectsBadInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(45);
  const QkvRun run(gen, at::kFloat, 3, 4, 2, 8);
  const at::Tensor tables = at::zeros({3, 2}, at::kInt);
  const at::Tensor seq_lens = at::ones({3}, at::kLong);
  const at::Tensor slots = at::zeros({3}, at::kLong);
  const at::Tensor q = at::empty({3, 4, 8}), out = at::empty({3, 4, 8});
  const Bias none;
  EXPECT_NO_THROW(ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin,
                                                     slots, run.q_w, run.k_w, 1e-6, tables,
                                                     seq_lens, 0.3, none));
  const at::Tensor before = run.kv.clone();
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots,
                                           run.q_w, run.k_w, 1e-6, tables, at::ones({2}, at::kLong),
                                           0.3, none);
      },
      "dysco::paged_attention_decode: seq_lens");
  EXPECT_TRUE(at::equal(run.kv, before));  // nothing written
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots,
                                           run.q_w, none, 1e-6, tables, seq_lens, 0.3, none);
      },
      "must be given together");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(run.qkv.view({-1}).narrow(0, 0, 96).view({3, 4, 8}), q,
                                           run.kv, run.qkv, run.cos, run.sin, slots, none, none,
                                           1e-6, tables, seq_lens, 0.3, none);
      },
      "dysco::qk_norm_rope_attention_decode: out must not overlap qkv");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots, none,
                                           none, 1e-6, tables, seq_lens, 0.3,
                                           Bias(at::zeros({2, 4})));
      },
      "dysco::paged_attention_decode: key_bias");
  // probs and probe_heads: both or neither, checked as attention_probs checks them, before
  // anything is written.
  const at::Tensor heads = at::tensor(std::vector<int64_t>{0, 3}, at::kLong);
  EXPECT_NO_THROW(ops::qk_norm_rope_attention_decode(
      out, q, run.kv, run.qkv, run.cos, run.sin, slots, run.q_w, run.k_w, 1e-6, tables, seq_lens,
      0.3, none, at::empty({3, 2, 32}), heads));
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots,
                                           run.q_w, run.k_w, 1e-6, tables, seq_lens, 0.3, none,
                                           at::empty({3, 2, 32}), c10::nullopt);
      },
      "probs and probe_heads come together");
  const at::Tensor kv_before = run.kv.clone();
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots,
                                           run.q_w, run.k_w, 1e-6, tables, seq_lens, 0.3, none,
                                           at::empty({3, 3, 32}), heads);
      },
      "dysco::attention_probs: out must be [B = 3, H = 2");
  EXPECT_TRUE(at::equal(run.kv, kv_before));  // nothing written
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_attention_decode(out, q, run.kv, run.qkv, run.cos, run.sin, slots,
                                           run.q_w, run.k_w, 1e-6, tables, seq_lens, 0.3, none,
                                           at::empty({3, 2, 32}, at::kDouble), heads);
      },
      "dysco::attention_probs: out");
}

TEST(QkNormRopeKvWrite, RejectsBadInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(36);
  const QkvRun run(gen, at::kFloat, 3, 4, 2, 8);
  const at::Tensor q = at::empty({3, 4, 8});
  const Bias none;
  EXPECT_NO_THROW(ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos, run.sin, run.slots,
                                             run.q_w, run.k_w, 1e-6));
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos, run.sin, run.slots, run.q_w, none,
                                   1e-6);
      },
      "must be given together");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos, run.sin, run.slots, run.q_w,
                                   run.k_w, 0.0);
      },
      "eps must be > 0");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv.narrow(1, 0, 60).contiguous(), run.cos,
                                   run.sin, run.slots, none, none, 1e-6);
      },
      "dysco::qk_norm_rope_kv_write: qkv must have shape [3, 64]");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(at::empty({3, 4, 6}), run.kv, run.qkv, run.cos, run.sin,
                                   run.slots, none, none, 1e-6);
      },
      "does not match the cache's head_dim");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos.narrow(0, 0, 2), run.sin, run.slots,
                                   none, none, 1e-6);
      },
      "dysco::qk_norm_rope_kv_write: cos");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos, run.sin,
                                   at::full({3}, 48, at::kLong), none, none, 1e-6);
      },
      "is past the cache");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(run.qkv.view({-1}).narrow(0, 0, 96).view({3, 4, 8}), run.kv,
                                   run.qkv, run.cos, run.sin, run.slots, none, none, 1e-6);
      },
      "query must not overlap qkv");
  ExpectRejected(
      [&] {
        ops::qk_norm_rope_kv_write(q, run.kv, run.qkv, run.cos, run.sin, run.slots,
                                   run.q_w.to(at::kHalf), run.k_w, 1e-6);
      },
      "dysco::qk_norm_rope_kv_write: q_norm_weight");
  ExpectRejected(
      [&] {
        const at::Tensor odd = at::zeros({2, 3, 16, 2, 7});
        ops::qk_norm_rope_kv_write(at::empty({3, 4, 7}), odd, at::zeros({3, 56}), at::zeros({3, 7}),
                                   at::zeros({3, 7}), run.slots, none, none, 1e-6);
      },
      "must be even");
}

// ---- the attention kernels' instruction sets
// -----------------------------------------------------------------------------------

// Calls check() once per instruction set of the CPU attention kernels this machine runs (baseline,
// x86-64-v3, x86-64-v4: attention_kernel.h), capped to it, so that every path is compared with the
// reference, not only the widest.
template <typename F>
void ForEachCpuIsa(F&& check) {
  namespace cpu = dysco::kernels::cpu;
  const int widest = static_cast<int>(cpu::SupportedCpuIsa());
  for (int isa = widest; isa >= 0; --isa) {
    SCOPED_TRACE("cpu isa " + std::to_string(isa));
    const cpu::CpuIsa previous = cpu::SetCpuIsaCapForTesting(static_cast<cpu::CpuIsa>(isa));
    check();
    cpu::SetCpuIsaCapForTesting(previous);
  }
}

// ---- paged_attention_decode
// ------------------------------------------------------------------------------

void CheckDecode(const Layout& layout, const std::vector<int64_t>& lens, at::ScalarType dtype,
                 BiasKind bias_kind, at::Generator& gen) {
  SCOPED_TRACE(Describe(layout, dtype, Name(bias_kind)));
  const PagedBatch batch = MakeBatch(layout, lens, dtype, gen);
  const Bias bias = MakeBias(bias_kind, batch, gen);
  const int64_t num_seqs = static_cast<int64_t>(lens.size());
  const at::Tensor query =
      at::randn({num_seqs, layout.query_heads(), layout.head_dim}, gen).to(dtype);
  const double scale = 1.0 / std::sqrt(static_cast<double>(layout.head_dim));
  at::Tensor expected = at::empty({num_seqs, layout.query_heads(), layout.head_dim}, at::kDouble);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const at::Tensor position = at::full({1}, lens[b] - 1, at::kLong);
    expected[b].copy_(Reference(batch, b, query[b].unsqueeze(0), position, scale, bias).second[0]);
  }
  const double tol = Tolerance(dtype);
  ForEachCpuIsa([&] {
    const at::Tensor out = at::full_like(query, kNaN);
    ops::paged_attention_decode(out, query, batch.kv, batch.block_tables, batch.seq_lens, scale,
                                bias);
    EXPECT_TRUE(AllClose(out, expected, tol, tol));
  });
}

TEST(PagedAttentionDecode, MatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(2);
  for (const Layout& layout : kLayouts) {
    const int64_t ps = layout.page_size;
    // Lengths: one key, exactly one page, crossing a page boundary, and long.
    const std::vector<int64_t> lens = {1, ps, ps + 1, 3 * ps + 2, 157};
    for (BiasKind bias : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
      CheckDecode(layout, lens, at::kFloat, bias, gen);
    }
  }
}

TEST(PagedAttentionDecode, MatchesReferenceInReducedPrecision) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    CheckDecode({3, 3, 64, 16}, {1, 17, 200}, dtype, BiasKind::kWithNegInf, gen);
    CheckDecode({1, 4, 40, 3}, {2, 50}, dtype, BiasKind::kRandom, gen);
  }
}

// With more threads than (sequence, KV head) pairs a long sequence is split over threads and the
// partial softmaxes are merged; check that path with every bias kind.
TEST(PagedAttentionDecode, SplitOverThreadsMatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const int previous_threads = at::get_num_threads();
  at::set_num_threads(6);
  for (BiasKind bias : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
    CheckDecode({1, 3, 64, 16}, {1500}, at::kFloat, bias, gen);
    CheckDecode({3, 3, 64, 16}, {700, 5}, at::kFloat, bias, gen);
  }
  CheckDecode({1, 4, 64, 3}, {1100}, at::kBFloat16, BiasKind::kRandom, gen);
  at::set_num_threads(previous_threads);
}

TEST(PagedAttentionDecode, FullyMaskedRowIsZeroNotNaN) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const int previous_threads = at::get_num_threads();
  for (int threads : {1, 4}) {
    at::set_num_threads(threads);
    const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {40, 1200}, at::kFloat, gen);
    at::Tensor bias = at::randn({2, 1200}, gen);
    bias[1].fill_(-kInf);  // sequence 1 sees nothing
    const at::Tensor query = at::randn({2, 9, 64}, gen);
    const at::Tensor out = at::full_like(query, kNaN);
    ops::paged_attention_decode(out, query, batch.kv, batch.block_tables, batch.seq_lens, 0.125,
                                bias);
    at::Tensor expected = at::zeros({2, 9, 64}, at::kDouble);
    expected[0].copy_(
        Reference(batch, 0, query[0].unsqueeze(0), at::full({1}, 39, at::kLong), 0.125, bias)
            .second[0]);
    EXPECT_TRUE(AllClose(out, expected, 1e-5, 1e-5)) << "threads=" << threads;
  }
  at::set_num_threads(previous_threads);
}

TEST(PagedAttentionDecode, RejectsBadInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(6);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {10, 40}, at::kFloat, gen);
  const at::Tensor& kv = batch.kv;
  const at::Tensor& tables = batch.block_tables;
  const at::Tensor& lens = batch.seq_lens;
  const at::Tensor query = at::randn({2, 9, 64}, gen);
  const at::Tensor out = at::empty_like(query);
  const Bias none;
  EXPECT_NO_THROW(ops::paged_attention_decode(out, query, kv, tables, lens, 0.125, none));
  EXPECT_NO_THROW(
      ops::paged_attention_decode(out, query, kv, tables, lens, 0.125, at::zeros({2, 40})));
  // dtypes
  EXPECT_THROW(
      ops::paged_attention_decode(out, query.to(at::kDouble), kv, tables, lens, 0.125, none),
      c10::Error);
  EXPECT_THROW(
      ops::paged_attention_decode(out.to(at::kBFloat16), query, kv, tables, lens, 0.125, none),
      c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables.to(at::kLong), lens, 0.125, none),
               c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables, lens.to(at::kInt), 0.125, none),
               c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables, lens, 0.125,
                                           at::zeros({2, 40}, at::kDouble)),
               c10::Error);
  // non-contiguous
  const at::Tensor strided_query = at::randn({2, 64, 9}, gen).transpose(1, 2);
  EXPECT_THROW(ops::paged_attention_decode(out, strided_query, kv, tables, lens, 0.125, none),
               c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(at::empty({9, 2, 64}).transpose(0, 1), query, kv, tables,
                                           lens, 0.125, none),
               c10::Error);
  EXPECT_THROW(
      ops::paged_attention_decode(out, query, kv.transpose(3, 4).contiguous().transpose(3, 4),
                                  tables, lens, 0.125, none),
      c10::Error);
  EXPECT_THROW(
      ops::paged_attention_decode(out, query, kv, tables, lens, 0.125, at::zeros({40, 2}).t()),
      c10::Error);
  // shapes
  EXPECT_THROW(
      ops::paged_attention_decode(at::empty({2, 9, 32}), query, kv, tables, lens, 0.125, none),
      c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(at::empty({2, 8, 64}), at::randn({2, 8, 64}), kv, tables,
                                           lens, 0.125, none),
               c10::Error);  // 8 query heads on 3 KV heads
  EXPECT_THROW(ops::paged_attention_decode(at::empty({2, 9, 32}), at::randn({2, 9, 32}), kv, tables,
                                           lens, 0.125, none),
               c10::Error);  // head_dim
  EXPECT_THROW(
      ops::paged_attention_decode(out, query, kv, tables.slice(0, 0, 1), lens, 0.125, none),
      c10::Error);
  EXPECT_THROW(
      ops::paged_attention_decode(out, query, kv, tables, lens.slice(0, 0, 1), 0.125, none),
      c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables, lens, 0.125, at::zeros({2, 39})),
               c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables, lens, 0.125, at::zeros({1, 40})),
               c10::Error);
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv.select(0, 0), tables, lens, 0.125, none),
               c10::Error);
  // values
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, tables, at::tensor({10, 0}, at::kLong),
                                           0.125, none),
               c10::Error);  // empty context
  const int64_t too_long = tables.size(1) * 16 + 1;
  EXPECT_THROW(ops::paged_attention_decode(
                   out, query, kv, tables,
                   at::tensor(std::vector<int64_t>{10, too_long}, at::kLong), 0.125, none),
               c10::Error);
  at::Tensor bad_tables = tables.clone();
  bad_tables[1][1] = static_cast<int32_t>(kv.size(1));  // a page that does not exist
  EXPECT_THROW(ops::paged_attention_decode(out, query, kv, bad_tables, lens, 0.125, none),
               c10::Error);
}

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

// The device-neutral checks (kernels/op_checks.h) want every tensor on the device of out and read
// no values; the CPU kernel adds the CPU requirement and the value checks.
TEST(PagedAttentionDecode, SharedChecksWantOneDeviceAndReadNoValues) {
  using dysco::kernels::CheckPagedAttentionDecodeArgs;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {10, 40}, at::kFloat, gen);
  const at::Tensor& kv = batch.kv;
  const at::Tensor& tables = batch.block_tables;
  const at::Tensor query = at::randn({2, 9, 64}, gen);
  const at::Tensor out = at::empty_like(query);
  const at::Tensor bias = at::zeros({2, 40});
  const at::Tensor long_lens = at::tensor({10, 1000}, at::kLong);  // past the block table
  EXPECT_NO_THROW(CheckPagedAttentionDecodeArgs(out, query, kv, tables, long_lens, bias));
  EXPECT_NO_THROW(CheckPagedAttentionDecodeArgs(OnMeta(out), OnMeta(query), OnMeta(kv),
                                                OnMeta(tables), OnMeta(long_lens), OnMeta(bias)));
  ExpectErrorContaining(
      [&] { CheckPagedAttentionDecodeArgs(out, query, kv, tables, long_lens, OnMeta(bias)); },
      "dysco::paged_attention_decode: key_bias is on meta but out is on cpu");
  ExpectErrorContaining(
      [&] { CheckPagedAttentionDecodeArgs(out, query, OnMeta(kv), tables, long_lens, bias); },
      "dysco::paged_attention_decode: kv_cache_layer is on meta but out is on cpu");
  ExpectErrorContaining(
      [&] { ops::paged_attention_decode(out, query, kv, tables, long_lens, 0.125, bias); },
      "seq_lens[1] = 1000 must be in [1, ");
  ExpectErrorContaining(
      [&] {
        dysco::kernels::paged_attention_decode_cpu(OnMeta(out), OnMeta(query), OnMeta(kv),
                                                   OnMeta(tables), OnMeta(long_lens), 0.125,
                                                   OnMeta(bias));
      },
      "dysco::paged_attention_decode: out must be a CPU tensor, got meta");
}

// ---- paged_attention_prefill
// -----------------------------------------------------------------------------

// One sequence of a prefill call: its context length after the call and its number of new tokens.
struct Chunk {
  int64_t seq_len;
  int64_t new_tokens;
};

void CheckPrefill(const Layout& layout, const std::vector<Chunk>& chunks, at::ScalarType dtype,
                  BiasKind bias_kind, at::Generator& gen) {
  SCOPED_TRACE(Describe(layout, dtype, Name(bias_kind)));
  std::vector<int64_t> lens;
  std::vector<int64_t> starts = {0};
  for (const Chunk& c : chunks) {
    lens.push_back(c.seq_len);
    starts.push_back(starts.back() + c.new_tokens);
  }
  const PagedBatch batch = MakeBatch(layout, lens, dtype, gen);
  const Bias bias = MakeBias(bias_kind, batch, gen);
  const int64_t tokens = starts.back();
  const at::Tensor query_start_loc = at::tensor(starts, at::kLong);
  const at::Tensor query =
      at::randn({tokens, layout.query_heads(), layout.head_dim}, gen).to(dtype);
  const double scale = 0.7 / std::sqrt(static_cast<double>(layout.head_dim));
  at::Tensor expected = at::empty({tokens, layout.query_heads(), layout.head_dim}, at::kDouble);
  for (size_t b = 0; b < chunks.size(); ++b) {
    const int64_t q_len = chunks[b].new_tokens;
    if (q_len == 0) continue;
    const at::Tensor positions =
        at::arange(chunks[b].seq_len - q_len, chunks[b].seq_len, at::kLong);
    expected.slice(0, starts[b], starts[b + 1])
        .copy_(Reference(batch, static_cast<int64_t>(b), query.slice(0, starts[b], starts[b + 1]),
                         positions, scale, bias)
                   .second);
  }
  const double tol = Tolerance(dtype);
  ForEachCpuIsa([&] {
    const at::Tensor out = at::full_like(query, kNaN);
    ops::paged_attention_prefill(out, query, batch.kv, batch.block_tables, batch.seq_lens,
                                 query_start_loc, scale, bias);
    EXPECT_TRUE(AllClose(out, expected, tol, tol));
  });
}

TEST(PagedAttentionPrefill, MixedChunksMatchReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (const Layout& layout : kLayouts) {
    const int64_t ps = layout.page_size;
    const std::vector<Chunk> chunks = {
        {37, 37},               // whole prompt in one chunk (more tokens than one work tile)
        {90, 1},                // decode token
        {2 * ps + 45, 45 - 1},  // chunk that starts mid-page after earlier pages were filled
        {0, 0},                 // a sequence with nothing new
        {1, 1},                 // first token of a prompt
        {ps + 20, 20},          // chunk that starts exactly on a page boundary
        {64, 1},
    };
    for (BiasKind bias : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
      CheckPrefill(layout, chunks, at::kFloat, bias, gen);
    }
  }
}

TEST(PagedAttentionPrefill, MatchesReferenceInReducedPrecision) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(8);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    CheckPrefill({3, 3, 64, 16}, {{40, 23}, {30, 1}}, dtype, BiasKind::kWithNegInf, gen);
  }
}

// The blocked prefill path (head_dim 64 and 128: 128-token work items, 64-key tiles, register
// blocks of 5 rows on AVX2 and 6 on AVX-512) at its boundaries: chunks longer than one item and
// ending one past / one short of it, tiles ending exactly on and one past 64 keys, chunks starting
// mid-sequence (the causal diagonal inside a tile, whole tiles before it), GQA groups whose row
// counts are not multiples of 6, page sizes that do and do not divide a tile, several sequences in
// one call.
TEST(PagedAttentionPrefill, BlockedPathAtTileBoundariesMatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const std::vector<Layout> layouts = {
      {3, 3, 64, 16}, {1, 1, 64, 5}, {2, 4, 64, 7}, {1, 5, 128, 16}, {2, 2, 128, 64},
  };
  for (const Layout& layout : layouts) {
    const std::vector<Chunk> chunks = {
        {64, 64},    // one tile exactly
        {65, 65},    // one key past a tile
        {200, 63},   // mid-sequence, a tile less one token
        {300, 130},  // mid-sequence, an item plus two tokens, diagonal across tiles
        {128, 1},    // a decode token in a prefill call
        {97, 97},    // a whole prompt within one item
        {400, 129},  // mid-sequence, one token past a 128-token item
        {255, 255},  // a whole prompt, one short of two items
    };
    for (BiasKind bias : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
      CheckPrefill(layout, chunks, at::kFloat, bias, gen);
    }
  }
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    CheckPrefill({3, 3, 64, 16}, {{150, 70}, {33, 33}}, dtype, BiasKind::kWithNegInf, gen);
  }
}

// Whole tiles masked by -inf bias (the running max stays -inf across tiles, then a later tile
// brings the first unmasked key), on the blocked path.
TEST(PagedAttentionPrefill, BlockedPathWithWholeTilesMaskedMatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(18);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {200, 150}, at::kFloat, gen);
  at::Tensor bias = at::randn({2, 205}, gen);
  bias[0].slice(0, 0, 130).fill_(-kInf);   // first two tiles and a bit of the third
  bias[1].slice(0, 64, 128).fill_(-kInf);  // the second tile only
  const at::Tensor query = at::randn({150 + 100, 9, 64}, gen);
  at::Tensor expected = at::empty({250, 9, 64}, at::kDouble);
  expected.slice(0, 0, 150).copy_(
      Reference(batch, 0, query.slice(0, 0, 150), at::arange(50, 200, at::kLong), 0.125, bias)
          .second);
  expected.slice(0, 150, 250)
      .copy_(
          Reference(batch, 1, query.slice(0, 150, 250), at::arange(50, 150, at::kLong), 0.125, bias)
              .second);
  EXPECT_TRUE(at::all(expected.slice(0, 0, 80) == 0).item<bool>());  // positions 50..129
  ForEachCpuIsa([&] {
    const at::Tensor out = at::full_like(query, kNaN);
    ops::paged_attention_prefill(out, query, batch.kv, batch.block_tables, batch.seq_lens,
                                 at::tensor({0, 150, 250}, at::kLong), 0.125, bias);
    EXPECT_TRUE(AllClose(out, expected, 1e-5, 1e-5));
  });
}

TEST(PagedAttentionPrefill, RowsWithEveryKeyMaskedAreZero) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const PagedBatch batch = MakeBatch({3, 3, 64, 3}, {20}, at::kFloat, gen);
  at::Tensor bias = at::randn({1, 20}, gen);
  bias.slice(1, 0, 12).fill_(-kInf);  // tokens at positions < 12 see only masked keys
  const at::Tensor query = at::randn({20, 9, 64}, gen);
  const at::Tensor expected =
      Reference(batch, 0, query, at::arange(20, at::kLong), 0.125, bias).second;
  EXPECT_TRUE(at::all(expected.slice(0, 0, 12) == 0).item<bool>());
  ForEachCpuIsa([&] {
    const at::Tensor out = at::full_like(query, kNaN);
    ops::paged_attention_prefill(out, query, batch.kv, batch.block_tables, batch.seq_lens,
                                 at::tensor({0, 20}, at::kLong), 0.125, bias);
    EXPECT_TRUE(AllClose(out, expected, 1e-5, 1e-5));
  });
}

TEST(PagedAttentionPrefill, RejectsBadInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(10);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {10, 40}, at::kFloat, gen);
  const at::Tensor& kv = batch.kv;
  const at::Tensor& tables = batch.block_tables;
  const at::Tensor& lens = batch.seq_lens;
  const at::Tensor query = at::randn({11, 9, 64}, gen);
  const at::Tensor out = at::empty_like(query);
  const at::Tensor starts = at::tensor({0, 10, 11}, at::kLong);
  const Bias none;
  EXPECT_NO_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens, starts, 0.125, none));
  EXPECT_THROW(
      ops::paged_attention_prefill(out, query, kv, tables, lens, starts.to(at::kInt), 0.125, none),
      c10::Error);
  EXPECT_THROW(
      ops::paged_attention_prefill(out, query.to(at::kHalf), kv, tables, lens, starts, 0.125, none),
      c10::Error);
  EXPECT_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens,
                                            at::tensor({0, 11}, at::kLong), 0.125, none),
               c10::Error);  // B + 1 entries
  EXPECT_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens,
                                            at::tensor({0, 10, 12}, at::kLong), 0.125, none),
               c10::Error);  // does not end at T
  EXPECT_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens,
                                            at::tensor({1, 10, 11}, at::kLong), 0.125, none),
               c10::Error);  // does not start at 0
  EXPECT_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens,
                                            at::tensor({0, 11, 11}, at::kLong), 0.125, none),
               c10::Error);  // 11 new tokens in a sequence of 10
  EXPECT_THROW(ops::paged_attention_prefill(out, query, kv, tables, lens,
                                            at::tensor({0, 6, 11}, at::kLong).flip(0), 0.125, none),
               c10::Error);  // not contiguous
  EXPECT_THROW(ops::paged_attention_prefill(at::empty({10, 9, 64}), query, kv, tables, lens, starts,
                                            0.125, none),
               c10::Error);
  EXPECT_THROW(
      ops::paged_attention_prefill(out, query, kv, tables, lens, starts, 0.125, at::zeros({2, 20})),
      c10::Error);
}

// ---- attention_probs
// -------------------------------------------------------------------------------------

void CheckProbs(const Layout& layout, const std::vector<int64_t>& lens,
                const std::vector<int64_t>& heads, int64_t out_len, at::ScalarType dtype,
                BiasKind bias_kind, at::Generator& gen) {
  SCOPED_TRACE(Describe(layout, dtype, Name(bias_kind)));
  const PagedBatch batch = MakeBatch(layout, lens, dtype, gen);
  const Bias bias = MakeBias(bias_kind, batch, gen);
  const int64_t num_seqs = static_cast<int64_t>(lens.size());
  const int64_t num_probe = static_cast<int64_t>(heads.size());
  const at::Tensor query =
      at::randn({num_seqs, layout.query_heads(), layout.head_dim}, gen).to(dtype);
  const at::Tensor head_ids = at::tensor(heads, at::kLong);
  const double scale = 1.0 / std::sqrt(static_cast<double>(layout.head_dim));
  const at::Tensor out = at::full({num_seqs, num_probe, out_len}, kNaN, at::kFloat);
  ops::attention_probs(out, query, batch.kv, batch.block_tables, batch.seq_lens, head_ids, scale,
                       bias);

  at::Tensor expected = at::zeros({num_seqs, num_probe, out_len}, at::kDouble);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const at::Tensor probs = Reference(batch, b, query[b].unsqueeze(0),
                                       at::full({1}, lens[b] - 1, at::kLong), scale, bias)
                                 .first;  // [Hq, 1, n]
    expected[b].slice(1, 0, lens[b]).copy_(probs.index_select(0, head_ids).squeeze(1));
  }
  const double tol = Tolerance(dtype);
  EXPECT_TRUE(AllClose(out, expected, tol, tol));
}

TEST(AttentionProbs, MatchesReference) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  for (const Layout& layout : kLayouts) {
    const int64_t ps = layout.page_size;
    const int64_t hq = layout.query_heads();
    const std::vector<int64_t> heads = {hq - 1, 0, hq / 2, 0};  // any order, repeats allowed
    for (BiasKind bias : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
      CheckProbs(layout, {1, ps + 1, 130}, heads, 130, at::kFloat, bias, gen);
      CheckProbs(layout, {3 * ps + 2, 7}, heads, 3 * ps + 9, at::kFloat, bias, gen);  // S' > max
    }
  }
  CheckProbs({3, 3, 64, 16}, {33, 100}, {7, 2}, 100, at::kBFloat16, BiasKind::kRandom, gen);
  CheckProbs({3, 3, 64, 16}, {33, 100}, {7, 2}, 100, at::kHalf, BiasKind::kWithNegInf, gen);
}

TEST(AttentionProbs, FullyMaskedRowIsZeroAndNoProbeHeadsIsFine) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(12);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {20, 30}, at::kFloat, gen);
  const at::Tensor query = at::randn({2, 9, 64}, gen);
  const at::Tensor bias = at::full({2, 30}, -kInf);
  const at::Tensor out = at::full({2, 2, 30}, kNaN, at::kFloat);
  ops::attention_probs(out, query, batch.kv, batch.block_tables, batch.seq_lens,
                       at::tensor({1, 5}, at::kLong), 0.125, bias);
  EXPECT_TRUE(at::all(out == 0).item<bool>());
  const at::Tensor empty = at::empty({2, 0, 30}, at::kFloat);
  EXPECT_NO_THROW(ops::attention_probs(empty, query, batch.kv, batch.block_tables, batch.seq_lens,
                                       at::empty({0}, at::kLong), 0.125, c10::nullopt));
}

TEST(AttentionProbs, RejectsBadInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(13);
  const PagedBatch batch = MakeBatch({3, 3, 64, 16}, {10, 40}, at::kFloat, gen);
  const at::Tensor& kv = batch.kv;
  const at::Tensor& tables = batch.block_tables;
  const at::Tensor& lens = batch.seq_lens;
  const at::Tensor query = at::randn({2, 9, 64}, gen);
  const at::Tensor heads = at::tensor({0, 8}, at::kLong);
  const at::Tensor out = at::empty({2, 2, 40});
  const Bias none;
  EXPECT_NO_THROW(ops::attention_probs(out, query, kv, tables, lens, heads, 0.125, none));
  EXPECT_THROW(
      ops::attention_probs(out.to(at::kBFloat16), query, kv, tables, lens, heads, 0.125, none),
      c10::Error);
  EXPECT_THROW(ops::attention_probs(out, query, kv, tables, lens, heads.to(at::kInt), 0.125, none),
               c10::Error);
  EXPECT_THROW(ops::attention_probs(out, query, kv, tables, lens, at::tensor({0, 9}, at::kLong),
                                    0.125, none),
               c10::Error);  // not a query head
  EXPECT_THROW(ops::attention_probs(out, query, kv, tables, lens, at::tensor({-1, 0}, at::kLong),
                                    0.125, none),
               c10::Error);
  EXPECT_THROW(
      ops::attention_probs(at::empty({2, 2, 39}), query, kv, tables, lens, heads, 0.125, none),
      c10::Error);  // S' < max(seq_lens)
  EXPECT_THROW(
      ops::attention_probs(at::empty({2, 3, 40}), query, kv, tables, lens, heads, 0.125, none),
      c10::Error);  // H
  EXPECT_THROW(ops::attention_probs(at::empty({2, 40, 2}).transpose(1, 2), query, kv, tables, lens,
                                    heads, 0.125, none),
               c10::Error);
  EXPECT_THROW(
      ops::attention_probs(out, query.to(at::kBFloat16), kv, tables, lens, heads, 0.125, none),
      c10::Error);  // query dtype differs from the cache
}

// The kernels' at::parallel_for regions run on every ATen thread (kernels/cpu/cpu_parallel.h: a
// library built without -fopenmp runs them on one). Builds without OpenMP (TSan, clang, CUDA) run
// them on one thread, which is checked too.
TEST(CpuParallel, KernelRegionsUseTheAtenThreads) {
  const int previous = at::get_num_threads();
  at::set_num_threads(2);
#if defined(DYSCO_KERNELS_OPENMP)
  EXPECT_EQ(dysco::kernels::cpu::ParallelForWidth(2), 2);
  EXPECT_EQ(dysco::kernels::cpu::ParallelForWidth(5), 2);
#else
  EXPECT_EQ(dysco::kernels::cpu::ParallelForWidth(2), 1);
#endif
  EXPECT_EQ(dysco::kernels::cpu::ParallelForWidth(1), 1);
  at::set_num_threads(previous);
}

// The linear op's GEMM path splits its rows over two threads when OpenBLAS has one (as ModelRunner
// sets it); the workers run ATen's mm_out and need the caller's InferenceMode (thread-local), under
// which the model runs.
TEST(CpuParallel, LinearRowSplitUnderInferenceMode) {
  using GetThreads = int (*)();
  using SetThreads = void (*)(int);
  const auto get_blas =
      reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  const auto set_blas =
      reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (get_blas == nullptr || set_blas == nullptr) GTEST_SKIP() << "the BLAS is not OpenBLAS";
  const int previous_blas = get_blas();
  set_blas(1);
  const int previous = at::get_num_threads();
  at::set_num_threads(2);
  {
    c10::InferenceMode inference;
    at::manual_seed(21);
    const at::Tensor input = at::randn({70, 96});
    const at::Tensor weight = at::randn({40, 96});
    at::Tensor out = at::full({70, 40}, kNaN);
    ops::linear(out, input, weight);
    const at::Tensor expected =
        at::matmul(input.to(at::kDouble), weight.to(at::kDouble).t()).to(at::kFloat);
    EXPECT_TRUE(AllClose(out, expected, 1e-4, 1e-5));
  }
  at::set_num_threads(previous);
  set_blas(previous_blas);
}

}  // namespace

// A forward's host lengths (kernels/host_lengths.h) are found only for the tensors they were
// published for (same data, same sizes), only on the publishing thread, only while the scope
// lives; a nested scope replaces them and restores them when it ends; host vectors of the wrong
// size publish nothing.
TEST(HostLengths, FoundOnlyForTheirTensorsThreadAndScope) {
  using dysco::kernels::HostLengths;
  using dysco::kernels::PublishedHostLengths;
  using dysco::kernels::ScopedHostLengths;
  const std::vector<int64_t> host_qsl = {0, 3, 5};
  const std::vector<int64_t> host_lens = {10, 2};
  const at::Tensor qsl = at::tensor(host_qsl, at::kLong);
  const at::Tensor lens = at::tensor(host_lens, at::kLong);
  EXPECT_EQ(PublishedHostLengths(qsl, lens), nullptr);
  {
    const ScopedHostLengths scope(qsl, lens, host_qsl, host_lens);
    const HostLengths* found = PublishedHostLengths(qsl, lens);
    ASSERT_NE(found, nullptr);
    EXPECT_EQ(found->batch, 2);
    EXPECT_EQ(found->query_start_loc[2], 5);
    EXPECT_EQ(found->seq_lens[0], 10);
    EXPECT_EQ(PublishedHostLengths(qsl.clone(), lens), nullptr);
    EXPECT_EQ(PublishedHostLengths(qsl, lens.clone()), nullptr);
    EXPECT_EQ(PublishedHostLengths(qsl.slice(0, 0, 2), lens.slice(0, 0, 1)), nullptr);
    EXPECT_EQ(PublishedHostLengths(qsl, lens.to(at::kInt)), nullptr);
    const HostLengths* on_other_thread = found;
    std::thread([&] { on_other_thread = PublishedHostLengths(qsl, lens); }).join();
    EXPECT_EQ(on_other_thread, nullptr);
    {
      const at::Tensor qsl2 = qsl.clone();
      const at::Tensor lens2 = lens.clone();
      const ScopedHostLengths inner(qsl2, lens2, host_qsl, host_lens);
      EXPECT_NE(PublishedHostLengths(qsl2, lens2), nullptr);
      EXPECT_EQ(PublishedHostLengths(qsl, lens), nullptr);
    }
    EXPECT_EQ(PublishedHostLengths(qsl, lens), found);
    {
      const ScopedHostLengths wrong_size(qsl, lens, std::vector<int64_t>{0, 3}, host_lens);
      EXPECT_EQ(PublishedHostLengths(qsl, lens), found);
    }
    EXPECT_EQ(PublishedHostLengths(qsl, lens), found);
  }
  EXPECT_EQ(PublishedHostLengths(qsl, lens), nullptr);
}
