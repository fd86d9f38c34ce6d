// Tests of the CUDA `dysco` ops (kernels/cuda): every op, called through the dispatcher on CUDA
// tensors, must equal the CPU op (itself tested against a libtorch reference in test_kernels.cpp)
// on the same random inputs: fp32 within 1e-5, bf16 / fp16 within 1e-2 relative, selection sets,
// biases, caches and masks exactly. Outputs are poisoned (NaN, or true for masks) before each call
// so that every element must be written. Shapes cover page and split boundaries, odd head counts
// and GQA ratios, idle rows, -inf bias, and up to 128K keys. One test captures the ops in a CUDA
// graph: an op that synchronised with the host would fail the capture.
// Built only with -DDYSCO_CUDA=ON; every test skips when no GPU is present.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/host_lengths.h"
#include "kernels/op_calls.h"
#include "tests/cpp/rope_reference.h"
#include "tests/cpp/scoped_env.h"

namespace {

namespace ops = dysco::ops;
using dysco::ScopedEnv;
using Bias = c10::optional<at::Tensor>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

#define SKIP_WITHOUT_GPU()                                                \
  do {                                                                    \
    if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

at::Tensor Cuda(const at::Tensor& t) { return t.to(at::kCUDA); }

// The CUDA result (copied back) is within atol + rtol * |cpu| of the CPU result, element by
// element, and finite wherever the CPU result is finite (poison left behind is NaN); non-finite
// CPU values (the -inf of a hard-mask bias) must be matched exactly.
::testing::AssertionResult Close(const at::Tensor& gpu, const at::Tensor& cpu, double atol,
                                 double rtol, const std::string& what) {
  const at::Tensor a = gpu.cpu().to(at::kDouble).contiguous().reshape({-1});
  const at::Tensor e = cpu.to(at::kDouble).contiguous().reshape({-1});
  if (a.numel() != e.numel()) return ::testing::AssertionFailure() << what << ": sizes differ";
  const double* ap = a.data_ptr<double>();
  const double* ep = e.data_ptr<double>();
  int64_t bad = 0;
  int64_t first = -1;
  double max_abs = 0.0;
  double max_rel = 0.0;  // over elements with |cpu| >= 1e-3, where a relative error means something
  for (int64_t i = 0; i < a.numel(); ++i) {
    bool ok;
    if (!std::isfinite(ep[i])) {
      ok = ap[i] == ep[i];
    } else {
      const double err = std::abs(ap[i] - ep[i]);
      ok = std::isfinite(ap[i]) && err <= atol + rtol * std::abs(ep[i]);
      if (std::isfinite(ap[i])) {
        max_abs = std::max(max_abs, err);
        if (std::abs(ep[i]) >= 1e-3) max_rel = std::max(max_rel, err / std::abs(ep[i]));
      }
    }
    if (!ok) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  // Collected by scripts/gpu-check.sh into the summary (worst error per dtype).
  std::printf("[maxerr] %s: abs %.3g rel %.3g\n", what.c_str(), max_abs, max_rel);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << a.numel() << " elements differ; first at flat index "
         << first << ": cuda " << ap[first] << ", cpu " << ep[first];
}

::testing::AssertionResult Same(const at::Tensor& gpu, const at::Tensor& cpu,
                                const std::string& what) {
  const at::Tensor a = gpu.cpu();
  if (at::equal(a, cpu)) return ::testing::AssertionSuccess();
  const at::Tensor diff = a.ne(cpu).reshape({-1}).nonzero();
  return ::testing::AssertionFailure()
         << what << ": " << diff.size(0) << " of " << cpu.numel()
         << " elements differ, first at flat index " << diff[0].item<int64_t>();
}

double Tolerance(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-5 : 1e-2; }

// ---- paged batches

struct Layout {
  int64_t kv_heads;
  int64_t group;
  int64_t head_dim;
  int64_t page_size;
};

std::string Describe(const Layout& l, at::ScalarType dtype, const std::string& extra) {
  std::ostringstream s;
  s << "Hkv=" << l.kv_heads << " G=" << l.group << " D=" << l.head_dim << " PS=" << l.page_size
    << " " << dtype << " " << extra;
  return s.str();
}

// A cache holding sequences of the given lengths on shuffled pages, with spare pages and block
// table entries past each sequence holding out-of-sequence page ids.
struct PagedBatch {
  at::Tensor kv;            // [2, NP, PS, Hkv, D]
  at::Tensor block_tables;  // int32 [B, P]
  at::Tensor seq_lens;      // int64 [B]
  int64_t max_len = 0;
};

PagedBatch MakeBatch(const Layout& l, const std::vector<int64_t>& lens, at::ScalarType dtype,
                     std::mt19937& rng) {
  PagedBatch batch;
  const int64_t batch_size = static_cast<int64_t>(lens.size());
  batch.max_len = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  const int64_t max_pages = std::max<int64_t>(1, (batch.max_len + l.page_size - 1) / l.page_size);
  int64_t used = 0;
  for (int64_t len : lens) used += (len + l.page_size - 1) / l.page_size;
  const int64_t num_pages = used + 3;
  batch.kv = at::randn({2, num_pages, l.page_size, l.kv_heads, l.head_dim}).to(dtype);
  std::vector<int32_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  batch.block_tables = at::empty({batch_size, max_pages}, at::kInt);
  int32_t* table = batch.block_tables.data_ptr<int32_t>();
  int64_t next = 0;
  for (int64_t b = 0; b < batch_size; ++b) {
    const int64_t n = (lens[b] + l.page_size - 1) / l.page_size;
    for (int64_t p = 0; p < max_pages; ++p) {
      table[b * max_pages + p] = p < n ? pages[next++] : pages[num_pages - 1 - p % 3];
    }
  }
  batch.seq_lens = at::tensor(lens, at::kLong);
  return batch;
}

enum class BiasKind { kNone, kRandom, kWithNegInf, kRowAllNegInf };

const char* Name(BiasKind kind) {
  switch (kind) {
    case BiasKind::kNone:
      return "no-bias";
    case BiasKind::kRandom:
      return "bias";
    case BiasKind::kWithNegInf:
      return "bias-with-inf";
    case BiasKind::kRowAllNegInf:
      return "bias-row-all-inf";
  }
  return "";
}

Bias MakeBias(BiasKind kind, int64_t batch, int64_t width) {
  if (kind == BiasKind::kNone) return c10::nullopt;
  at::Tensor bias = at::randn({batch, width}) * 2.0;
  if (kind != BiasKind::kRandom) {
    bias.masked_fill_(at::rand({batch, width}) < 0.3, -kInf);
  }
  if (kind == BiasKind::kRowAllNegInf && batch > 0) bias[0].fill_(-kInf);
  return bias;
}

Bias CudaBias(const Bias& bias) {
  return bias.has_value() ? Bias(Cuda(*bias)) : Bias(c10::nullopt);
}

// ---- registration

TEST(CudaOps, EveryOpHasACudaKernel) {
  for (const std::string& name : ops::AllOpNames()) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    ASSERT_TRUE(op.has_value()) << name;
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
  }
}

// ---- paged_kv_write

TEST(CudaPagedKvWrite, EqualsCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const at::Tensor cache = at::randn({2, 9, 5, 3, 40}).to(dtype);
    const at::Tensor key = at::randn({17, 3, 40}).to(dtype);
    const at::Tensor value = at::randn({17, 3, 40}).to(dtype);
    const at::Tensor slots = at::randperm(45, at::kLong).slice(0, 0, 17);
    slots[3] = -1;
    slots[11] = -1;
    const at::Tensor gpu_cache = Cuda(cache);
    ops::paged_kv_write(cache, key, value, slots);
    ops::paged_kv_write(gpu_cache, Cuda(key), Cuda(value), Cuda(slots));
    EXPECT_TRUE(Same(gpu_cache, cache, std::string("cache ") + c10::toString(dtype)));
  }
}

// ---- decode

void CheckDecode(const Layout& l, const std::vector<int64_t>& lens, at::ScalarType dtype,
                 BiasKind bias_kind, std::mt19937& rng) {
  const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
  const int64_t b = static_cast<int64_t>(lens.size());
  const int64_t hq = l.kv_heads * l.group;
  const at::Tensor query = at::randn({b, hq, l.head_dim}).to(dtype);
  const Bias bias = MakeBias(bias_kind, b, batch.max_len + 5);
  const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
  at::Tensor cpu_out = at::full({b, hq, l.head_dim}, kNaN).to(dtype);
  at::Tensor gpu_out = Cuda(cpu_out);
  ops::paged_attention_decode(cpu_out, query, batch.kv, batch.block_tables, batch.seq_lens, scale,
                              bias);
  ops::paged_attention_decode(gpu_out, Cuda(query), Cuda(batch.kv), Cuda(batch.block_tables),
                              Cuda(batch.seq_lens), scale, CudaBias(bias));
  const double tol = Tolerance(dtype);
  EXPECT_TRUE(Close(gpu_out, cpu_out, tol, tol, Describe(l, dtype, Name(bias_kind))));
}

// The tensor-core kernel's pipelines (kernels/cuda/split_attention_mma.cu): "swap" (the default
// for query groups of at most 8: DYSCO_CUDA_MMA_PREFETCH unset), "rows" (=0: the query rows as the
// mma's M, the default for larger groups), "registers" (=1: the next tile's loads before the
// current tile's arithmetic) and "swap-prefetch".
const char* MmaPrefetchValue(const char* pipeline) {
  if (std::strcmp(pipeline, "rows") == 0) return "0";
  if (std::strcmp(pipeline, "registers") == 0) return "1";
  if (std::strcmp(pipeline, "swap-prefetch") == 0) return "swap-prefetch";
  return nullptr;
}

const std::vector<Layout>& Layouts() {
  static const std::vector<Layout> layouts = {
      {2, 4, 128, 16},  // GQA 4 (Qwen3-8B / Llama-3 ratio), page-aligned
      {3, 1, 64, 7},    // MHA, odd head count, odd page size
      {1, 7, 80, 32},   // odd group, head_dim not a multiple of 32
      {5, 3, 256, 16},  // largest head_dim, odd group
      {1, 9, 32, 1},    // one token per page; group of 9 spans three row chunks
  };
  return layouts;
}

TEST(CudaPagedAttentionDecode, EqualsCpuOverLayoutsDtypesAndBiases) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  at::manual_seed(1);
  // Every split kernel: tensor cores (16-bit caches, head_dim 64 and 128), vectorised (head_dim of
  // 4..32 lanes of 16 bytes: 128, 64, 32, and 256 in 16-bit types), scalar (every layout).
  for (const char* kernel : {"mma", "vector", "scalar"}) {
    ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", kernel);
    for (const Layout& l : Layouts()) {
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
        for (BiasKind kind :
             {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf, BiasKind::kRowAllNegInf}) {
          // Lengths around page and split (256) boundaries.
          CheckDecode(l, {1, l.page_size, l.page_size + 1, 255, 256, 257, 1000}, dtype, kind, rng);
        }
      }
    }
  }
}

TEST(CudaPagedAttentionDecode, EveryMmaPipelineEqualsCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  at::manual_seed(11);
  ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", "mma");
  // "swap": the swapped operands for groups of at most 8 (the third layout's 9 takes "rows").
  for (const char* pipeline : {"rows", "registers", "swap", "swap-prefetch"}) {
    ScopedEnv scoped("DYSCO_CUDA_MMA_PREFETCH", MmaPrefetchValue(pipeline));
    for (const Layout& l : {Layout{2, 4, 128, 16}, Layout{3, 1, 64, 7}, Layout{1, 9, 128, 1},
                            Layout{1, 8, 128, 16}}) {
      for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
        for (BiasKind kind : {BiasKind::kNone, BiasKind::kRandom, BiasKind::kWithNegInf}) {
          SCOPED_TRACE(std::string("pipeline ") + pipeline);
          // Tiles, splits and pages ending anywhere; 5000 keys give each warp several tiles.
          CheckDecode(l, {1, 17, 255, 256, 257, 1000, 5000}, dtype, kind, rng);
        }
      }
    }
  }
}

// The tensor-core kernel's own split merge (its last split block of each head chunk merges, with
// per-stream counters that every call leaves at zero) against the separate merge kernel
// (DYSCO_CUDA_SPLIT_MERGE=kernel): the same function on the same partials, so the same bits. Calls
// in a row with different split counts and batches check that the counters are left at zero (a
// stale count would leave rows unmerged: NaN, the poison). Also equal to the CPU (CheckDecode).
TEST(CudaPagedAttentionDecode, SplitMergeInTheKernelEqualsTheMergeKernel) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  at::manual_seed(12);
  ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", "mma");
  int64_t compared = 0;
  for (const Layout& l : {Layout{2, 4, 128, 16}, Layout{3, 1, 64, 7}, Layout{1, 20, 128, 16}}) {
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      for (const std::vector<int64_t>& lens :
           {std::vector<int64_t>{1}, std::vector<int64_t>{300, 5000, 17},
            std::vector<int64_t>{40000}, std::vector<int64_t>{2, 70000, 900, 1, 33333}}) {
        const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
        const int64_t b = static_cast<int64_t>(lens.size());
        const int64_t hq = l.kv_heads * l.group;
        const at::Tensor query = Cuda(at::randn({b, hq, l.head_dim}).to(dtype));
        const Bias bias = CudaBias(MakeBias(BiasKind::kWithNegInf, b, batch.max_len + 5));
        const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
        const at::Tensor kv = Cuda(batch.kv), tables = Cuda(batch.block_tables),
                         seq_lens = Cuda(batch.seq_lens);
        const std::string what = Describe(l, dtype, "key bias") + " B=" + std::to_string(b);
        for (const Bias* with : {static_cast<const Bias*>(nullptr), &bias}) {
          const Bias none;
          at::Tensor merged[2];
          for (int fused = 0; fused < 2; ++fused) {
            const ScopedEnv merge("DYSCO_CUDA_SPLIT_MERGE", fused ? nullptr : "kernel");
            for (int repeat = 0; repeat < 2; ++repeat) {
              at::Tensor out = at::full({b, hq, l.head_dim}, kNaN, query.options());
              ops::paged_attention_decode(out, query, kv, tables, seq_lens, scale,
                                          with ? *with : none);
              if (repeat == 0) {
                merged[fused] = out;
              } else {
                EXPECT_TRUE(at::equal(out, merged[fused])) << what << ", call again";
              }
            }
          }
          ASSERT_FALSE(at::isnan(merged[1]).any().item<bool>()) << what;
          EXPECT_TRUE(at::equal(merged[0], merged[1])) << what;
          ++compared;
        }
        CheckDecode(l, lens, dtype, BiasKind::kRandom, rng);
      }
    }
  }
  EXPECT_EQ(compared, 48);
}

// A CUDA graph pads the block table to a power of two of pages, and the launcher sizes the splits
// from that width; each row's splits are cut from its own length (split_attention.cuh SplitKeys).
// So rows in a padded table give the bits of the same rows in a table of their own width wherever
// both widths get the same number of splits (the occupancy cap: more than ~12.5K keys at 8 KV
// heads on the H200; here 8 KV heads and >= 40000 keys, capped below 156 splits on any GPU of
// fewer than ~416 multiprocessors), and the CPU's result in every kernel and with the splits cut
// from the width (DYSCO_CUDA_SPLIT_FROM_WIDTH=1, the former way: other bits).
TEST(CudaPagedAttentionDecode, SplitsFollowTheRowsOwnLength) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(14);
  at::manual_seed(14);
  const Layout l{8, 4, 128, 16};
  for (at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    for (const std::vector<int64_t>& lens :
         {std::vector<int64_t>{40000}, std::vector<int64_t>{40000, 13000, 39999, 1, 300}}) {
      const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
      const int64_t b = static_cast<int64_t>(lens.size());
      const int64_t hq = l.kv_heads * l.group;
      const at::Tensor query = at::randn({b, hq, l.head_dim}).to(dtype);
      const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
      const int64_t pages = batch.block_tables.size(1);
      // Padded to 4096 pages (65536 keys) with page 0, as the model runner pads a graph's table.
      const at::Tensor padded =
          at::cat({batch.block_tables, at::zeros({b, 4096 - pages}, at::kInt)}, 1);
      at::Tensor cpu_out = at::full({b, hq, l.head_dim}, kNaN).to(dtype);
      ops::paged_attention_decode(cpu_out, query, batch.kv, batch.block_tables, batch.seq_lens,
                                  scale, c10::nullopt);
      const at::Tensor kv = Cuda(batch.kv), lens_gpu = Cuda(batch.seq_lens), q = Cuda(query);
      const std::string what = Describe(l, dtype, "") + " B=" + std::to_string(b);
      at::Tensor outs[3];
      const at::Tensor tables[3] = {Cuda(batch.block_tables), Cuda(padded), Cuda(padded)};
      for (int i = 0; i < 3; ++i) {
        const ScopedEnv from_width("DYSCO_CUDA_SPLIT_FROM_WIDTH", i == 2 ? "1" : nullptr);
        outs[i] = at::full({b, hq, l.head_dim}, kNaN, q.options());
        ops::paged_attention_decode(outs[i], q, kv, tables[i], lens_gpu, scale, c10::nullopt);
        const double tol = Tolerance(dtype);
        EXPECT_TRUE(Close(outs[i], cpu_out, tol, tol, what + " table " + std::to_string(i)));
      }
      EXPECT_TRUE(at::equal(outs[1], outs[0])) << what << ": padded table against its own width";
    }
  }
}

TEST(CudaPagedAttentionDecode, EqualsCpuAt128KKeys) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2);
  at::manual_seed(2);
  const Layout l{8, 4, 128, 16};
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    CheckDecode(l, {131072}, dtype, BiasKind::kWithNegInf, rng);
    CheckDecode(l, {131072, 70001, 1}, dtype, BiasKind::kNone, rng);
  }
}

// ---- prefill

// Which path paged_attention_prefill takes on CUDA (kernels/cuda/cuda_ops.h): flash attention over
// gathered pages (bf16/fp16, no key bias, head_dim % 8 == 0) or the split-KV kernel.
enum class PrefillPath { kAny, kFlash, kSplit };

void CheckPrefill(const Layout& l, const std::vector<int64_t>& lens,
                  const std::vector<int64_t>& q_lens, at::ScalarType dtype, BiasKind bias_kind,
                  std::mt19937& rng, PrefillPath path = PrefillPath::kAny) {
  const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
  std::vector<int64_t> starts = {0};
  for (int64_t q : q_lens) starts.push_back(starts.back() + q);
  const int64_t tokens = starts.back();
  const int64_t hq = l.kv_heads * l.group;
  const at::Tensor query = at::randn({tokens, hq, l.head_dim}).to(dtype);
  const at::Tensor query_start_loc = at::tensor(starts, at::kLong);
  const Bias bias = MakeBias(bias_kind, static_cast<int64_t>(lens.size()), batch.max_len + 3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
  at::Tensor cpu_out = at::full({tokens, hq, l.head_dim}, kNaN).to(dtype);
  at::Tensor gpu_out = Cuda(cpu_out);
  ops::paged_attention_prefill(cpu_out, query, batch.kv, batch.block_tables, batch.seq_lens,
                               query_start_loc, scale, bias);
  const at::Tensor gpu_query = Cuda(query);
  const at::Tensor gpu_kv = Cuda(batch.kv);
  const at::Tensor gpu_tables = Cuda(batch.block_tables);
  const Bias gpu_bias = CudaBias(bias);
  const bool flash = dysco::kernels::paged_attention_prefill_cuda_uses_flash(gpu_query, gpu_kv,
                                                                             gpu_tables, gpu_bias);
  if (path != PrefillPath::kAny) {
    EXPECT_EQ(flash, path == PrefillPath::kFlash) << Describe(l, dtype, Name(bias_kind));
  }
  ops::paged_attention_prefill(gpu_out, gpu_query, gpu_kv, gpu_tables, Cuda(batch.seq_lens),
                               Cuda(query_start_loc), scale, gpu_bias);
  const double tol = Tolerance(dtype);
  std::ostringstream what;
  what << "prefill " << (flash ? "flash" : "split") << " B=" << lens.size()
       << " max_len=" << batch.max_len << " T=" << tokens;
  EXPECT_TRUE(
      Close(gpu_out, cpu_out, tol, tol, Describe(l, dtype, Name(bias_kind)) + " " + what.str()));
}

TEST(CudaPagedAttentionPrefill, MixedChunksEqualCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  at::manual_seed(3);
  for (const Layout& l : Layouts()) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      for (BiasKind kind : {BiasKind::kNone, BiasKind::kWithNegInf, BiasKind::kRowAllNegInf}) {
        // A whole prompt, an idle sequence (no new token), a chunk after a cached prefix, decode.
        CheckPrefill(l, {37, 20, 300, 9}, {37, 0, 45, 1}, dtype, kind, rng);
      }
    }
  }
}

TEST(CudaPagedAttentionPrefill, LongChunkOverLongContextEqualsCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(4);
  at::manual_seed(4);
  CheckPrefill({8, 4, 128, 16}, {20000}, {512}, at::kBFloat16, BiasKind::kRandom, rng);
  CheckPrefill({2, 2, 64, 16}, {3000, 700}, {1024, 700}, at::kFloat, BiasKind::kNone, rng);
}

// Chunked prefill as the scheduler runs it: several sequences in one call, each a chunk of new
// tokens after a prefix already in the cache (start positions > 0), chunk lengths 1 (a decode row),
// 7, 64 and 300, an idle sequence (no new token) and a whole prompt; chunks and prefixes that
// start, end or sit one token off page boundaries.
struct ChunkedBatch {
  std::vector<int64_t> lens;    // seq_lens: prefix + chunk
  std::vector<int64_t> q_lens;  // chunk lengths
};

std::vector<ChunkedBatch> ChunkedBatches(int64_t page_size) {
  const int64_t ps = page_size;
  return {
      // prefix 100 + 1, 45 + 7, 16 + 64 (chunk on a page boundary), 211 + 300, idle, prompt of 64
      {{101, 52, 16 + 64, 511, 33, 64}, {1, 7, 64, 300, 0, 64}},
      // chunks ending exactly on, one before and one after a page boundary; prefixes of one page
      {{2 * ps, 2 * ps - 1, 2 * ps + 1, ps + 7, 3 * ps}, {ps, 7, 1, 7, 2 * ps}},
  };
}

const std::vector<Layout>& FlashLayouts() {
  static const std::vector<Layout> layouts = {
      {4, 1, 64, 16},   // MHA (GQA ratio 1), head_dim 64
      {2, 4, 128, 16},  // GQA 4 (Qwen3-8B / Llama-3 ratio), head_dim 128
      {1, 8, 64, 16},   // GQA 8, head_dim 64
      {2, 8, 128, 7},   // GQA 8, head_dim 128, odd page size
  };
  return layouts;
}

TEST(CudaPagedAttentionPrefill, FlashChunkedPrefillEqualsCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  at::manual_seed(21);
  for (const Layout& l : FlashLayouts()) {
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      for (const ChunkedBatch& c : ChunkedBatches(l.page_size)) {
        CheckPrefill(l, c.lens, c.q_lens, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      }
    }
  }
}

TEST(CudaPagedAttentionPrefill, FlashChunksOver32KKeysEqualCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  at::manual_seed(22);
  // A 300-token chunk at the end of a 32K context, with a decode row and a short chunk beside it.
  CheckPrefill({2, 4, 128, 16}, {32768, 5000, 1000}, {300, 1, 7}, at::kBFloat16, BiasKind::kNone,
               rng, PrefillPath::kFlash);
  CheckPrefill({1, 8, 64, 16}, {32768, 20001}, {64, 300}, at::kHalf, BiasKind::kNone, rng,
               PrefillPath::kFlash);
}

TEST(CudaPagedAttentionPrefill, FallbackCasesStillEqualCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  at::manual_seed(23);
  for (const Layout& l : FlashLayouts()) {
    for (const ChunkedBatch& c : ChunkedBatches(l.page_size)) {
      // fp32 caches, and a key bias (DySCO) on a 16-bit cache: the split-KV kernel.
      CheckPrefill(l, c.lens, c.q_lens, at::kFloat, BiasKind::kNone, rng, PrefillPath::kSplit);
      CheckPrefill(l, c.lens, c.q_lens, at::kBFloat16, BiasKind::kWithNegInf, rng,
                   PrefillPath::kSplit);
      CheckPrefill(l, c.lens, c.q_lens, at::kHalf, BiasKind::kRandom, rng, PrefillPath::kSplit);
    }
  }
  // head_dim not a multiple of 8: flash would need padding; the split-KV kernel takes it.
  for (const ChunkedBatch& c : ChunkedBatches(16)) {
    CheckPrefill({2, 4, 36, 16}, c.lens, c.q_lens, at::kBFloat16, BiasKind::kNone, rng,
                 PrefillPath::kSplit);
  }
}

// Chunks of >= 1024 new tokens take cuDNN attention (kernels/cuda/paged_prefill_flash.cu), two
// calls merged by log-sum-exp: a whole prompt (the causal call alone), a chunk after a prefix that
// ends off a page boundary and is not a multiple of the 1024-token bucket (padded), two long
// chunks in one call. Beside a long chunk, a decode row, a short chunk and an idle sequence take
// flash attention with the long chunk's keys cut to none. Only short chunks, or
// DYSCO_CUDA_PREFILL=flash2, keep the whole call on flash attention.
TEST(CudaPagedAttentionPrefill, CudnnLongChunksEqualCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(25);
  at::manual_seed(25);
  auto cudnn_sequences = [] {
    return dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences();
  };
  for (const Layout& l : {Layout{2, 4, 128, 16}, Layout{1, 8, 64, 7}}) {
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      const std::string what = Describe(l, dtype, "cuDNN sequences");
      int64_t before = cudnn_sequences();
      CheckPrefill(l, {1100}, {1100}, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      CheckPrefill(l, {3001 + 1500}, {1500}, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      CheckPrefill(l, {2048 + 1024, 1024}, {1024, 1024}, dtype, BiasKind::kNone, rng,
                   PrefillPath::kFlash);
      EXPECT_EQ(cudnn_sequences() - before, 4) << what;
      // Mixed: the long chunk through cuDNN, the rest through flash.
      before = cudnn_sequences();
      CheckPrefill(l, {5000, 300}, {1500, 1}, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      CheckPrefill(l, {40, 2000, 3000, 700}, {1, 1024, 1000, 0}, dtype, BiasKind::kNone, rng,
                   PrefillPath::kFlash);
      EXPECT_EQ(cudnn_sequences() - before, 2) << what;
      // The tiny models' head size (16).
      CheckPrefill({2, 2, 16, 16}, {2400}, {1200}, dtype, BiasKind::kNone, rng,
                   PrefillPath::kFlash);
      EXPECT_EQ(cudnn_sequences() - before, 3) << what;
      // No long chunk (T >= 1024 all the same), or the knob: flash alone.
      before = cudnn_sequences();
      CheckPrefill(l, {3000, 2500}, {600, 600}, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      {
        const ScopedEnv flash2("DYSCO_CUDA_PREFILL", "flash2");
        CheckPrefill(l, {3001 + 1500}, {1500}, dtype, BiasKind::kNone, rng, PrefillPath::kFlash);
      }
      EXPECT_EQ(cudnn_sequences(), before) << Describe(l, dtype, "flash attention expected");
    }
  }
}

// The cuDNN path's merge of its two halves with 16-byte vectors (MergeHalvesVecKernel) gives the
// same bits as the scalar kernel (DYSCO_CUDA_PREFILL_MERGE=scalar): head sizes 16, 64 and 128 (2, 8
// and 16 lanes a (row, head)), with and without a prefix, a long chunk next to a short one, every
// output element written (NaN first).
TEST(CudaPagedAttentionPrefill, CudnnMergeVectorisedGivesTheSameBits) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(26);
  at::manual_seed(26);
  const int64_t before = dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences();
  int64_t calls = 0;
  for (const Layout& l : {Layout{2, 4, 128, 16}, Layout{1, 8, 64, 7}, Layout{2, 2, 16, 16}}) {
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      for (const auto& [lens, q_lens] :
           std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>{
               {{1100}, {1100}}, {{3001 + 1500}, {1500}}, {{5000, 300}, {1500, 1}}}) {
        const std::string what = Describe(l, dtype, "merge, " + std::to_string(lens[0]) + " keys");
        const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
        std::vector<int64_t> starts = {0};
        for (int64_t q : q_lens) starts.push_back(starts.back() + q);
        const int64_t hq = l.kv_heads * l.group;
        const at::Tensor query = Cuda(at::randn({starts.back(), hq, l.head_dim}).to(dtype));
        const at::Tensor kv = Cuda(batch.kv);
        const at::Tensor tables = Cuda(batch.block_tables);
        const at::Tensor seq_lens = Cuda(batch.seq_lens);
        const at::Tensor qsl = Cuda(at::tensor(starts, at::kLong));
        const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
        at::Tensor outs[2];
        for (int scalar = 0; scalar < 2; ++scalar) {
          const ScopedEnv knob("DYSCO_CUDA_PREFILL_MERGE", scalar ? "scalar" : nullptr);
          outs[scalar] = Cuda(at::full({starts.back(), hq, l.head_dim}, kNaN).to(dtype));
          ops::paged_attention_prefill(outs[scalar], query, kv, tables, seq_lens, qsl, scale,
                                       c10::nullopt);
          ++calls;
        }
        ASSERT_FALSE(at::isnan(outs[0].to(at::kFloat)).any().item<bool>()) << what;
        EXPECT_TRUE(at::equal(outs[0], outs[1])) << what;
      }
    }
  }
  EXPECT_EQ(dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences() - before, calls);
}

// The cuDNN path planned from host lengths the caller published (kernels/host_lengths.h, as the
// model runner does around a forward) gives the bits of the read-back plan and reads nothing back;
// lengths published for other tensors (a copy of query_start_loc) are not used. Whole prompts,
// chunks after a prefix and mixed calls (a long chunk beside short ones and a decode row), every
// output element written (NaN first).
TEST(CudaPagedAttentionPrefill, CudnnPlansFromPublishedHostLengths) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(27);
  at::manual_seed(27);
  auto read_backs = [] { return dysco::kernels::paged_attention_prefill_cuda_offset_read_backs(); };
  const int64_t cudnn_before = dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences();
  int64_t long_chunks = 0;
  for (const Layout& l : {Layout{2, 4, 128, 16}, Layout{1, 8, 64, 7}}) {
    for (const auto& [lens, q_lens] :
         std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>{
             {{1100}, {1100}},
             {{3001 + 1500}, {1500}},
             {{5000, 300}, {1500, 1}},
             {{40, 2000, 3000, 700}, {1, 1024, 1000, 0}}}) {
      const std::string what =
          Describe(l, at::kBFloat16, "host lengths, " + std::to_string(lens[0]) + " keys");
      const PagedBatch batch = MakeBatch(l, lens, at::kBFloat16, rng);
      std::vector<int64_t> starts = {0};
      for (int64_t q : q_lens) starts.push_back(starts.back() + q);
      const int64_t hq = l.kv_heads * l.group;
      const at::Tensor query = Cuda(at::randn({starts.back(), hq, l.head_dim}).to(at::kBFloat16));
      const at::Tensor kv = Cuda(batch.kv);
      const at::Tensor tables = Cuda(batch.block_tables);
      const at::Tensor seq_lens = Cuda(batch.seq_lens);
      const at::Tensor qsl = Cuda(at::tensor(starts, at::kLong));
      const std::vector<int64_t>& host_lens = lens;  // batch.seq_lens on the host
      const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
      auto run = [&] {
        at::Tensor out = Cuda(at::full({starts.back(), hq, l.head_dim}, kNaN).to(at::kBFloat16));
        ops::paged_attention_prefill(out, query, kv, tables, seq_lens, qsl, scale, c10::nullopt);
        return out;
      };
      int64_t before = read_backs();
      const at::Tensor read_back_out = run();
      EXPECT_EQ(read_backs() - before, 1) << what;
      at::Tensor published_out;
      before = read_backs();
      {
        const dysco::kernels::ScopedHostLengths published(qsl, seq_lens, starts, host_lens);
        published_out = run();
      }
      EXPECT_EQ(read_backs(), before) << what << ": read back despite the published lengths";
      ASSERT_FALSE(at::isnan(published_out.to(at::kFloat)).any().item<bool>()) << what;
      EXPECT_TRUE(at::equal(published_out, read_back_out)) << what;
      before = read_backs();
      {
        const at::Tensor other_qsl = qsl.clone();
        const dysco::kernels::ScopedHostLengths other(other_qsl, seq_lens, starts, host_lens);
        EXPECT_TRUE(at::equal(run(), read_back_out)) << what << ", lengths of other tensors";
      }
      EXPECT_EQ(read_backs() - before, 1) << what << ": lengths of other tensors used";
      for (size_t b = 0; b < lens.size(); ++b) long_chunks += 3 * (q_lens[b] >= 1024);
    }
  }
  EXPECT_EQ(dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences() - cudnn_before,
            long_chunks);
}

// The flash path synchronises with the host nowhere (offsets computed on the device, buffers
// sized from shapes): a chunked prefill call captures in a CUDA graph, and its replay equals the
// CPU.
TEST(CudaPagedAttentionPrefill, FlashPathCapturesInACudaGraph) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(24);
  at::manual_seed(24);
  const Layout l{2, 4, 128, 16};
  const std::vector<int64_t> lens = {1000, 300, 377};
  const std::vector<int64_t> starts = {0, 64, 65, 365};  // chunks of 64, 1 and 300 tokens
  const PagedBatch batch = MakeBatch(l, lens, at::kBFloat16, rng);
  const at::Tensor query = at::randn({365, 8, 128}).to(at::kBFloat16);
  const at::Tensor query_start_loc = at::tensor(starts, at::kLong);
  const double scale = 1.0 / std::sqrt(128.0);
  at::Tensor cpu_out = at::full({365, 8, 128}, kNaN).to(at::kBFloat16);
  ops::paged_attention_prefill(cpu_out, query, batch.kv, batch.block_tables, batch.seq_lens,
                               query_start_loc, scale, c10::nullopt);
  const at::Tensor q = Cuda(query);
  const at::Tensor kv = Cuda(batch.kv);
  const at::Tensor tables = Cuda(batch.block_tables);
  const at::Tensor seq_lens = Cuda(batch.seq_lens);
  const at::Tensor qsl = Cuda(query_start_loc);
  at::Tensor out = Cuda(cpu_out);
  ASSERT_TRUE(dysco::kernels::paged_attention_prefill_cuda_uses_flash(q, kv, tables, c10::nullopt));
  ops::paged_attention_prefill(out, q, kv, tables, seq_lens, qsl, scale, c10::nullopt);  // warm-up
  at::cuda::CUDAGraph graph;
  {
    const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    ops::paged_attention_prefill(out, q, kv, tables, seq_lens, qsl, scale, c10::nullopt);
    graph.capture_end();
  }
  out.fill_(kNaN);
  graph.replay();
  c10::cuda::device_synchronize();
  EXPECT_TRUE(Close(out, cpu_out, 1e-2, 1e-2, "graph prefill flash BFloat16"));
}

// ---- attention_probs

void CheckProbs(const Layout& l, const std::vector<int64_t>& lens, std::vector<int64_t> heads,
                at::ScalarType dtype, BiasKind bias_kind, std::mt19937& rng) {
  const PagedBatch batch = MakeBatch(l, lens, dtype, rng);
  const int64_t b = static_cast<int64_t>(lens.size());
  const int64_t hq = l.kv_heads * l.group;
  const at::Tensor query = at::randn({b, hq, l.head_dim}).to(dtype);
  const at::Tensor head_ids = at::tensor(heads, at::kLong);
  const Bias bias = MakeBias(bias_kind, b, batch.max_len + 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(l.head_dim));
  const int64_t width = batch.max_len + 11;
  at::Tensor cpu_out = at::full({b, static_cast<int64_t>(heads.size()), width}, kNaN);
  at::Tensor gpu_out = Cuda(cpu_out);
  ops::attention_probs(cpu_out, query, batch.kv, batch.block_tables, batch.seq_lens, head_ids,
                       scale, bias);
  ops::attention_probs(gpu_out, Cuda(query), Cuda(batch.kv), Cuda(batch.block_tables),
                       Cuda(batch.seq_lens), Cuda(head_ids), scale, CudaBias(bias));
  // Probabilities are fp32 whatever the cache dtype: the logits see the same rounded inputs.
  EXPECT_TRUE(Close(gpu_out, cpu_out, 1e-6, 1e-5, Describe(l, dtype, Name(bias_kind))));
}

TEST(CudaAttentionProbs, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(5);
  at::manual_seed(5);
  for (const char* kernel : {"vector", "scalar"}) {  // the logits pass's two kernels
    ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", kernel);
    for (const Layout& l : Layouts()) {
      const int64_t hq = l.kv_heads * l.group;
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
        for (BiasKind kind : {BiasKind::kNone, BiasKind::kWithNegInf, BiasKind::kRowAllNegInf}) {
          CheckProbs(l, {1, 255, 256, 257, 999}, {0, hq - 1, hq / 2}, dtype, kind, rng);
        }
      }
    }
    // Many probed heads on one KV head, a head probed twice, and heads of other KV heads between.
    std::vector<int64_t> many;
    for (int64_t h = 19; h >= 0; --h) many.push_back(h);
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      CheckProbs({1, 20, 128, 16}, {300, 1000}, many, dtype, BiasKind::kWithNegInf, rng);
      CheckProbs({3, 8, 64, 16}, {700}, {9, 0, 9, 23, 12, 1, 15, 8}, dtype, BiasKind::kNone, rng);
    }
  }
}

TEST(CudaAttentionProbs, EqualsCpuAt128KKeys) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(6);
  at::manual_seed(6);
  CheckProbs({8, 4, 128, 16}, {131072, 4097}, {3, 17, 30}, at::kBFloat16, BiasKind::kWithNegInf,
             rng);
  // Qwen3-8B's reference heads of layer 21: six heads on three KV heads.
  CheckProbs({8, 4, 128, 16}, {131072}, {31, 18, 11, 17, 10, 8}, at::kBFloat16, BiasKind::kNone,
             rng);
}

// ---- DySCO ops

// Relevance-like rows: positive, normalised over [0, n_b), zeros after (as the op leaves them).
at::Tensor RelevanceRows(const std::vector<int64_t>& n, int64_t width, bool ties) {
  const int64_t batch = static_cast<int64_t>(n.size());
  at::Tensor r =
      ties ? at::randint(1, 6, {batch, width}).to(at::kFloat) : at::rand({batch, width}).pow(4.0);
  for (int64_t b = 0; b < batch; ++b) {
    r[b].slice(0, n[b]).zero_();
    if (n[b] > 0) r[b] /= r[b].sum();
  }
  return r;
}

// dysco_probe_mean on the GPU: bit for bit the CPU op (fp32 adds in the heads' order, one
// multiply), for the reference's 16 heads, a head twice and one head, over probs wider and taller
// than the mean, at 128K keys too; every element written (NaN first).
TEST(CudaDyscoProbeMean, EqualsCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(71);
  struct Case {
    int64_t batch, rows, width, probs_batch, probs_width;
  };
  for (const Case& c :
       {Case{2, 20, 1000, 3, 1003}, Case{1, 16, 131072, 1, 131072}, Case{5, 7, 4097, 8, 8192}}) {
    const at::Tensor probs = at::rand({c.probs_batch, c.rows, c.probs_width});
    for (const std::vector<int64_t>& all :
         {std::vector<int64_t>{3, 0, 19, 7, 12, 1, 5, 16, 2, 9, 11, 18, 4, 14, 6, 10},
          std::vector<int64_t>{5, 2, 5}, std::vector<int64_t>{6}}) {
      std::vector<int64_t> heads;
      for (const int64_t h : all) heads.push_back(h % c.rows);
      at::Tensor cpu = at::full({c.batch, c.width}, std::nanf(""));
      ops::dysco_probe_mean(cpu, probs, heads);
      at::Tensor gpu = Cuda(at::full({c.batch, c.width}, std::nanf("")));
      ops::dysco_probe_mean(gpu, Cuda(probs), heads);
      EXPECT_TRUE(at::equal(gpu.cpu(), cpu))
          << heads.size() << " heads, " << c.batch << " x " << c.width;
    }
  }
}

TEST(CudaDyscoRelevanceUpdate, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(7);
  struct Case {
    std::vector<int64_t> n;
    int64_t width;
    int64_t probs_width;
    int64_t heads;
  };
  for (const Case& c :
       {Case{{0, 1, 2, 517, 1000}, 1000, 1003, 3}, Case{{4096, 4097, 8193, 1}, 9000, 9000, 1},
        Case{{131072}, 131072, 131072, 5}}) {
    const int64_t batch = static_cast<int64_t>(c.n.size());
    std::vector<int64_t> prev(c.n);
    for (int64_t& v : prev) v = std::max<int64_t>(0, v - 1);
    const at::Tensor relevance = RelevanceRows(prev, c.width, false);
    const at::Tensor probs = at::rand({batch, c.heads, c.probs_width});
    const at::Tensor num_keys = at::tensor(c.n, at::kLong);
    const at::Tensor decay = at::rand({batch});
    decay[0] = 0.0f;
    at::Tensor cpu_rel = relevance.clone();
    at::Tensor gpu_rel = Cuda(relevance);
    ops::dysco_relevance_update(cpu_rel, probs, num_keys, decay);
    ops::dysco_relevance_update(gpu_rel, Cuda(probs), Cuda(num_keys), Cuda(decay));
    EXPECT_TRUE(Close(gpu_rel, cpu_rel, 1e-9, 1e-5, "relevance width " + std::to_string(c.width)));
  }
}

struct SelectCase {
  float top_p;    // <= 0: unset
  int64_t top_k;  // <= 0: unset
  float strength;
};

void CheckSelect(const std::vector<int64_t>& n, int64_t width, bool ties,
                 const std::vector<SelectCase>& cases) {
  const int64_t batch = static_cast<int64_t>(n.size());
  const at::Tensor relevance = RelevanceRows(n, width, ties);
  const at::Tensor num_keys = at::tensor(n, at::kLong);
  const at::Tensor template_mask = at::rand({batch, width}) < 0.2;
  for (const SelectCase& c : cases) {
    const at::Tensor top_p = at::full({batch}, c.top_p);
    const at::Tensor top_k = at::full({batch}, c.top_k, at::kLong);
    const at::Tensor strength = at::full({batch}, c.strength);
    at::Tensor bias = at::full({batch, width}, kNaN);
    at::Tensor selected = at::ones({batch, width}, at::kBool);
    at::Tensor stats = at::full({batch, 2}, kNaN);
    at::Tensor gpu_bias = Cuda(bias);
    at::Tensor gpu_selected = Cuda(selected);
    at::Tensor gpu_stats = Cuda(stats);
    ops::dysco_select_bias(bias, selected, stats, relevance, num_keys, template_mask, top_p, top_k,
                           strength);
    ops::dysco_select_bias(gpu_bias, gpu_selected, gpu_stats, Cuda(relevance), Cuda(num_keys),
                           Cuda(template_mask), Cuda(top_p), Cuda(top_k), Cuda(strength));
    std::ostringstream what;
    what << "width=" << width << (ties ? " ties" : "") << " top_p=" << c.top_p
         << " top_k=" << c.top_k << " strength=" << c.strength;
    EXPECT_TRUE(Same(gpu_selected, selected, "selected " + what.str()));
    EXPECT_TRUE(Same(gpu_bias, bias, "bias " + what.str()));
    EXPECT_TRUE(Close(gpu_stats, stats, 0.0, 1e-5, "stats " + what.str()));
  }
}

const std::vector<SelectCase>& SelectCases() {
  static const std::vector<SelectCase> cases = {
      {0.9f, 0, 2.0f},    {0.5f, 0, 100.0f},     {0.0f, 1, 2.0f},     {0.0f, 7, 1e30f},
      {0.0f, 4096, 0.5f}, {0.95f, 64, 2.0f},     {0.3f, 4096, 99.0f}, {1.0f, 0, 2.0f},
      {1e-6f, 0, 2.0f},   {0.0f, 1000000, 2.0f},
  };
  return cases;
}

TEST(CudaDyscoSelectBias, SameSetsBiasAndStatsAsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(8);
  // Idle row, one key, a few keys, around the 4096 default top_k, a full row.
  CheckSelect({0, 1, 2, 77, 4095, 4097, 6000}, 6000, false, SelectCases());
}

TEST(CudaDyscoSelectBias, TiesAreBrokenByPositionAsOnCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(9);
  CheckSelect({0, 3, 500, 3000}, 3000, true, SelectCases());
}

// The many-blocks selection on the short rows of the two tests above: rows shorter than a key
// block, rows across several, ties, every case; a launch per pass (DYSCO_CUDA_SELECT=multi), fused
// into one launch (=fused), and fused with one block a row taking every key block
// (DYSCO_CUDA_SELECT_BLOCKS=1).
TEST(CudaDyscoSelectBias, ManyBlocksGiveTheCpuSetsOnShortRows) {
  SKIP_WITHOUT_GPU();
  for (const char* blocks : {static_cast<const char*>(nullptr), "1"}) {
    for (const char* mode : {"multi", "fused"}) {
      SCOPED_TRACE(std::string(mode) + (blocks != nullptr ? " blocks 1" : ""));
      ScopedEnv multi("DYSCO_CUDA_SELECT", mode);
      ScopedEnv cap("DYSCO_CUDA_SELECT_BLOCKS", blocks);
      at::manual_seed(8);
      CheckSelect({0, 1, 2, 77, 4095, 4097, 6000}, 6000, false, SelectCases());
      at::manual_seed(9);
      CheckSelect({0, 3, 500, 3000}, 3000, true, SelectCases());
    }
  }
}

// Long rows on the GPU for the selection's mode tests: relevance (RelevanceRows) of rows of n[b]
// keys in `width`, their lengths and a random template mask (drawn in that order).
struct CudaSelectRows {
  at::Tensor relevance, num_keys, template_mask;
};
CudaSelectRows MakeCudaSelectRows(const std::vector<int64_t>& n, int64_t width) {
  const int64_t batch = static_cast<int64_t>(n.size());
  CudaSelectRows rows;
  rows.relevance = Cuda(RelevanceRows(n, width, false));
  rows.num_keys = Cuda(at::tensor(n, at::kLong));
  rows.template_mask = Cuda(at::rand({batch, width}) < 0.2);
  return rows;
}

// dysco_select_bias on the GPU over `rows` with one setting for every row, its outputs written
// over poison (bias and stats NaN, every key selected) and returned on the host: bias, selected,
// stats. The caller sets the environment knobs of the mode it runs.
std::vector<at::Tensor> CudaSelectOutputs(const CudaSelectRows& rows, const SelectCase& c) {
  const auto cuda = rows.relevance.options();
  const int64_t batch = rows.relevance.size(0), width = rows.relevance.size(1);
  at::Tensor bias = at::full({batch, width}, kNaN, cuda);
  at::Tensor selected = at::ones({batch, width}, cuda.dtype(at::kBool));
  at::Tensor stats = at::full({batch, 2}, kNaN, cuda);
  ops::dysco_select_bias(bias, selected, stats, rows.relevance, rows.num_keys, rows.template_mask,
                         at::full({batch}, c.top_p, cuda),
                         at::full({batch}, c.top_k, cuda.dtype(at::kLong)),
                         at::full({batch}, c.strength, cuda));
  return {bias.cpu(), selected.cpu(), stats.cpu()};
}

// The fused selection (DYSCO_CUDA_SELECT=fused: one cooperative launch, the row's blocks meeting
// after each pass) against a launch per pass (=multi) on long rows: the same sets, biases and stats
// bit for bit (the same buckets, the same write, its masses added in key-block order), with a
// block a key block and with 3 blocks a row taking several key blocks each, at 2048 and 512 keys a
// key block.
TEST(CudaDyscoSelectBias, FusedSelectionEqualsALaunchPerPass) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(12);
  const CudaSelectRows rows = MakeCudaSelectRows({131072, 100000, 70001, 0, 32768}, 131072);
  for (const SelectCase& c : SelectCases()) {
    auto run = [&](const char* mode, const char* blocks, const char* keys) {
      const ScopedEnv select("DYSCO_CUDA_SELECT", mode);
      const ScopedEnv cap("DYSCO_CUDA_SELECT_BLOCKS", blocks);
      const ScopedEnv per_block("DYSCO_CUDA_SELECT_KEYS_PER_BLOCK", keys);
      return CudaSelectOutputs(rows, c);
    };
    for (const char* keys : {static_cast<const char*>(nullptr), "512"}) {
      const std::vector<at::Tensor> passes = run("multi", nullptr, keys);
      for (const char* blocks : {static_cast<const char*>(nullptr), "3"}) {
        const std::vector<at::Tensor> fused = run("fused", blocks, keys);
        std::ostringstream what;
        what << "top_p=" << c.top_p << " top_k=" << c.top_k << " strength=" << c.strength
             << (blocks != nullptr ? ", 3 blocks a row" : "")
             << (keys != nullptr ? ", keys 512" : "");
        EXPECT_TRUE(Same(fused[0], passes[0], "bias " + what.str()));
        EXPECT_TRUE(Same(fused[1], passes[1], "selected " + what.str()));
        EXPECT_TRUE(Same(fused[2], passes[2], "stats " + what.str()));
      }
    }
  }
}

// The fused selection's grid too large to be co-resident (DYSCO_CUDA_SELECT_RESIDENT_SCALE: the
// occupancy count assumed 8x too high, as an MPS share with fewer multiprocessors would make it):
// the runtime refuses the cooperative launch, which is counted, and the call takes a launch a pass
// with the same outputs bit for bit as =multi; the next call without the knob launches fused again.
TEST(CudaDyscoSelectBias, RefusedCooperativeLaunchTakesALaunchAPass) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(16);
  const CudaSelectRows rows = MakeCudaSelectRows({131072, 131072, 100000, 70001, 131072}, 131072);
  auto run = [&](const char* mode, const char* scale) {
    const ScopedEnv select("DYSCO_CUDA_SELECT", mode);
    const ScopedEnv resident("DYSCO_CUDA_SELECT_RESIDENT_SCALE", scale);
    return CudaSelectOutputs(rows, SelectCase{0.9f, 4096, 2.0f});
  };
  const std::vector<at::Tensor> passes = run("multi", nullptr);
  const int64_t refused_before = dysco::kernels::dysco_select_bias_cuda_refused_launches();
  const std::vector<at::Tensor> refused = run(nullptr, "8");
  EXPECT_EQ(dysco::kernels::dysco_select_bias_cuda_refused_launches() - refused_before, 1);
  EXPECT_TRUE(Same(refused[0], passes[0], "bias"));
  EXPECT_TRUE(Same(refused[1], passes[1], "selected"));
  EXPECT_TRUE(Same(refused[2], passes[2], "stats"));
  const std::vector<at::Tensor> fused = run(nullptr, nullptr);
  EXPECT_EQ(dysco::kernels::dysco_select_bias_cuda_refused_launches() - refused_before, 1);
  EXPECT_TRUE(Same(fused[1], passes[1], "selected, fused again"));
}

// A DySCO step's widths (8K: one block by default; 32K and past 48K: many blocks), ties, every
// case: the default, one block forced (DYSCO_CUDA_SELECT=single), a launch a pass (=multi) and one
// cooperative launch (=fused), each also with 512 keys a block (DYSCO_CUDA_SELECT_KEYS_PER_BLOCK);
// outputs poisoned first (CheckSelect).
TEST(CudaDyscoSelectBias, SameSetsAsCpuAtDecodeWidthsInEveryMode) {
  SKIP_WITHOUT_GPU();
  for (const char* keys : {static_cast<const char*>(nullptr), "512"}) {
    for (const char* mode : {static_cast<const char*>(nullptr), "single", "multi", "fused"}) {
      SCOPED_TRACE(std::string(mode != nullptr ? mode : "default") +
                   (keys != nullptr ? " keys 512" : ""));
      ScopedEnv select("DYSCO_CUDA_SELECT", mode);
      ScopedEnv per_block("DYSCO_CUDA_SELECT_KEYS_PER_BLOCK", keys);
      at::manual_seed(14);
      CheckSelect({8192, 8000, 1}, 8192, false, SelectCases());
      CheckSelect({32768, 30001, 0}, 32768, false, SelectCases());
      CheckSelect({49153, 4097}, 49153, false, {{0.9f, 4096, 2.0f}, {0.5f, 0, 100.0f}});
      CheckSelect({32768, 20000}, 32768, true, {{0.9f, 4096, 2.0f}, {0.0f, 4096, 100.0f}});
    }
  }
}

// 128K-key rows take the many-blocks selection by default; the one-block kernel is compared too.
TEST(CudaDyscoSelectBias, SameSetsAt128KKeys) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(10);
  CheckSelect({131072, 100000}, 131072, false, SelectCases());
  CheckSelect({131072}, 131072, true, {{0.9f, 4096, 2.0f}, {0.0f, 4096, 100.0f}});
  ScopedEnv single("DYSCO_CUDA_SELECT", "single");
  CheckSelect({131072, 100000}, 131072, false, {{0.9f, 4096, 2.0f}, {0.5f, 0, 100.0f}});
}

// ---- linear

// Around the CPU op's few-row switch (8 rows), the CUDA GEMV's (1-2 rows of bf16/fp16 with K a
// multiple of 8; K = 1001 goes to cuBLAS) and odd sizes (N odd: the last warp's second row); the
// GEMV with one and two warps a row pair (DYSCO_CUDA_GEMV_SPLITS; by default two for small N, one
// for N = 20001); every output element written (NaN first).
TEST(CudaLinear, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(17);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const bool fp32 = dtype == at::kFloat;
    for (const int64_t m : {1, 2, 3, 4, 5, 8, 9, 65}) {
      for (const auto& [k, n] : {std::pair<int64_t, int64_t>{576, 1536},
                                 {64, 7},
                                 {1000, 333},
                                 {1001, 77},
                                 {4096, 1031},
                                 {12288, 35},
                                 {8, 1},
                                 {64, 20001}}) {
        const at::Tensor input = at::randn({m, k}).to(dtype);
        const at::Tensor weight = (at::randn({n, k}) / 8).to(dtype);
        at::Tensor out = at::full({m, n}, kNaN).to(dtype);
        ops::linear(out, input, weight);
        // The GEMV (1-2 16-bit rows) with the warps a row pair it picks for N, then each forced.
        const bool gemv = !fp32 && m <= 2 && k % 8 == 0;
        for (const char* splits : {static_cast<const char*>(nullptr), "1", "2"}) {
          if (splits != nullptr && !gemv) continue;
          const ScopedEnv knob("DYSCO_CUDA_GEMV_SPLITS", splits);
          at::Tensor gpu_out = Cuda(at::full({m, n}, kNaN).to(dtype));
          ops::linear(gpu_out, Cuda(input), Cuda(weight));
          const std::string what = std::string(c10::toString(dtype)) + " m=" + std::to_string(m) +
                                   " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                                   " splits " + (splits != nullptr ? splits : "auto");
          EXPECT_TRUE(Close(gpu_out, out, fp32 ? 1e-4 : 5e-2, fp32 ? 1e-5 : 1e-2, what));
        }
      }
    }
  }
}

// The GEMV path against cuBLAS on the 8B models' shapes (one bf16 rounding apart), and through a
// weight that is a row slice of a bigger one (the data pointer then moves by rows of K elements);
// with the warps a row pair it picks (one for q/k/v, two for down_proj) and with each forced.
TEST(CudaLinear, GemvEqualsCublas) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(18);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  for (const int64_t m : {1, 2}) {
    for (const auto& [k, n] : {std::pair<int64_t, int64_t>{4096, 6144}, {12288, 4096}}) {
      const at::Tensor input = at::randn({m, k}, bf16);
      const at::Tensor weight = at::randn({n + 3, k}, bf16).narrow(0, 3, n) / 16;
      at::Tensor cublas = at::full({m, n}, kNaN, bf16);
      {
        ScopedEnv force_cublas("DYSCO_CUDA_LINEAR", "cublas");
        ops::linear(cublas, input, weight.contiguous());
      }
      for (const char* splits : {static_cast<const char*>(nullptr), "1", "2"}) {
        const ScopedEnv knob("DYSCO_CUDA_GEMV_SPLITS", splits);
        at::Tensor gemv = at::full({m, n}, kNaN, bf16);
        ops::linear(gemv, input, weight.contiguous());
        EXPECT_TRUE(Close(gemv.cpu(), cublas.cpu(), 5e-2, 1e-2,
                          "m=" + std::to_string(m) + " k=" + std::to_string(k) + " splits " +
                              (splits != nullptr ? splits : "auto")));
      }
    }
  }
}

// The GEMVs with their weights staged by asynchronous copies (DYSCO_CUDA_GEMV_ASYNC=1, one input
// row), plain and with the norm in front, give the bits of the register GEMVs with one and with
// two warps a row pair (the same words summed in the same order; the fused GEMV has rings for one
// warp a pair only, so with two both sides run its register kernel), bf16 and fp16, on the 8B
// shapes (o_proj 4096 x 4096, down_proj 4096 x 12288 take two warps a pair), odd N (the last
// warp's second row), K of fewer words than a warp has lanes (64: 8 words; 8: one), of a ring that
// wraps several times (12288) and of a partial last round (1000, 4104), and N of more blocks than
// the GPU holds at once; every output element written (NaN first: NaN != NaN).
TEST(CudaLinear, AsyncCopyGemvGivesTheSameBits) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(21);
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    for (const auto& [k, n] : {std::pair<int64_t, int64_t>{4096, 6144},
                               {12288, 4096},
                               {4096, 4096},
                               {4096, 1031},
                               {64, 7},
                               {8, 3},
                               {1000, 333},
                               {4104, 20001}}) {
      const at::Tensor input = at::randn({1, k}, options);
      const at::Tensor residual = at::randn({1, k}, options);
      const at::Tensor g = at::rand({k}, options) + 0.5;
      const at::Tensor weight = at::randn({n, k}, options) / 16;
      // One and two warps a row pair (the fused GEMV has rings for one only).
      for (const char* warps : {"1", "2"}) {
        // [0]: the register kernels, [1]: the asynchronous-copy ones.
        std::vector<at::Tensor> outs, normed_outs, sums;
        for (const char* async : {"0", "1"}) {
          const ScopedEnv splits("DYSCO_CUDA_GEMV_SPLITS", warps);
          const ScopedEnv knob("DYSCO_CUDA_GEMV_ASYNC", async);
          outs.push_back(at::full({1, n}, kNaN, options));
          ops::linear(outs.back(), input, weight);
          normed_outs.push_back(at::full({1, n}, kNaN, options));
          sums.push_back(at::full({1, k}, kNaN, options));
          ops::add_rms_norm_linear(normed_outs.back(), sums.back(), input, residual, g, 1e-6,
                                   weight);
        }
        const std::string what = std::string(c10::toString(dtype)) + " k=" + std::to_string(k) +
                                 " n=" + std::to_string(n) + " warps a pair " + warps;
        EXPECT_TRUE(Same(outs[1], outs[0].cpu(), "linear " + what));
        EXPECT_TRUE(Same(normed_outs[1], normed_outs[0].cpu(), "add_rms_norm_linear " + what));
        EXPECT_TRUE(Same(sums[1], sums[0].cpu(), "add_rms_norm_linear sum " + what));
      }
    }
  }
}

// ---- rms_norm and rotary_embedding

// Rows of the 8B models' widths and odd ones, every output element written (NaN first): the norm
// within 1e-5 (fp32; its sum runs in another order) or one rounding of the dtype, the rope bit for
// bit (each product and the sum rounded as on the CPU).
TEST(CudaRmsNormAndRotary, EqualCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(23);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [m, d] : {std::pair<int64_t, int64_t>{1, 4096},
                               {32, 128},
                               {8192, 128},
                               {3, 13},
                               {5, 576},
                               {2, 1536},
                               {9, 1025}}) {
      const at::Tensor x = (at::randn({m, d}) * 3).to(dtype);
      const at::Tensor w = (at::rand({d}) + 0.5).to(dtype);
      at::Tensor out = at::full({m, d}, kNaN).to(dtype);
      at::Tensor gpu_out = Cuda(out);
      ops::rms_norm(out, x, w, 1e-6);
      ops::rms_norm(gpu_out, Cuda(x), Cuda(w), 1e-6);
      const std::string what = std::string("rms_norm ") + c10::toString(dtype) +
                               " m=" + std::to_string(m) + " d=" + std::to_string(d);
      EXPECT_TRUE(Close(gpu_out, out, Tolerance(dtype), Tolerance(dtype), what));
    }
    for (const auto& [t, h, d] : {std::tuple<int64_t, int64_t, int64_t>{1, 32, 128},
                                  {300, 8, 128},
                                  {7, 3, 64},
                                  {2, 1, 6}}) {
      const at::Tensor x = at::randn({t, h, d}).to(dtype);
      const at::Tensor angle = at::rand({t, d}) * 6.3;
      const at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
      at::Tensor out = at::full({t, h, d}, kNaN).to(dtype);
      at::Tensor gpu_out = Cuda(out);
      ops::rotary_embedding(out, x, cos, sin);
      ops::rotary_embedding(gpu_out, Cuda(x), Cuda(cos), Cuda(sin));
      EXPECT_TRUE(Same(gpu_out, out,
                       std::string("rotary_embedding ") + c10::toString(dtype) +
                           " t=" + std::to_string(t) + " h=" + std::to_string(h)));
    }
  }
}

// ---- qk_norm_rope_kv_write

// The CPU inputs of a qk_norm_rope_kv_write call of t tokens: qkv, the tokens' cos and sin rows,
// the per-head norm weights, a cache of t / 16 + 2 pages of 16 slots (random: unwritten slots keep
// their values) and a shuffled slot per token, every third from the second -1 (skipped).
struct QkWriteInputs {
  at::Tensor qkv, cos, sin, q_w, k_w, kv, slots;
  std::string what;  // the case, for failure messages
};

QkWriteInputs MakeQkWriteInputs(at::ScalarType dtype, int64_t t, int64_t h, int64_t hkv, int64_t d,
                                bool norms) {
  QkWriteInputs in;
  in.qkv = (at::randn({t, (h + 2 * hkv) * d}) * 3).to(dtype);
  const at::Tensor angle = at::rand({t, d}) * 6.3;
  in.cos = angle.cos().to(dtype);
  in.sin = angle.sin().to(dtype);
  in.q_w = (at::rand({d}) + 0.5).to(dtype);
  in.k_w = (at::rand({d}) + 0.5).to(dtype);
  const int64_t pages = t / 16 + 2;
  in.kv = at::randn({2, pages, 16, hkv, d}).to(dtype);
  in.slots = at::randperm(pages * 16, at::kLong).slice(0, 0, t).clone();
  for (int64_t i = 1; i < t; i += 3) in.slots[i] = -1;
  in.what = std::string(c10::toString(dtype)) + " t=" + std::to_string(t) +
            " h=" + std::to_string(h) + " hkv=" + std::to_string(hkv) + " d=" + std::to_string(d) +
            (norms ? " norms" : "");
  return in;
}

// Qwen3-8B and SmolLM2 decode rows, prefill chunks (300 tokens: many blocks), odd head dims and
// counts, with and without the per-head norms, every third slot -1: query (NaN first) and the whole
// cache (random first: unwritten slots keep their values) against the CPU op; without norms bit
// for bit (the rope rounds as the CPU's), with them within the norm's tolerance (its sum order).
TEST(CudaQkNormRopeKvWrite, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(37);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [t, h, hkv, d] :
         {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 32, 8, 128},
          {1, 9, 3, 64},
          {300, 32, 8, 128},
          {5, 3, 3, 36},
          {4, 1, 1, 6},
          {2, 4, 2, 256}}) {
      for (const bool norms : {false, true}) {
        const QkWriteInputs in = MakeQkWriteInputs(dtype, t, h, hkv, d, norms);
        const at::Tensor &qkv = in.qkv, &cos = in.cos, &sin = in.sin, &q_w = in.q_w, &k_w = in.k_w,
                         &kv = in.kv, &slots = in.slots;
        const std::string& what = in.what;
        const at::Tensor query = at::full({t, h, d}, kNaN).to(dtype);
        const at::Tensor gpu_query = Cuda(query);
        const at::Tensor gpu_kv = Cuda(kv);
        ops::qk_norm_rope_kv_write(query, kv, qkv, cos, sin, slots, norms ? Bias(q_w) : Bias(),
                                   norms ? Bias(k_w) : Bias(), 1e-6);
        ops::qk_norm_rope_kv_write(gpu_query, gpu_kv, Cuda(qkv), Cuda(cos), Cuda(sin), Cuda(slots),
                                   norms ? Bias(Cuda(q_w)) : Bias(),
                                   norms ? Bias(Cuda(k_w)) : Bias(), 1e-6);
        if (norms) {
          // The two norms' sums differ in their last fp32 bits, which now and then flips the
          // rounding of a normed bf16 element (up to ~4 here: one bf16 step is 2^-6); the rope
          // then passes that step on even where its sum cancels to a small output.
          const double atol = dtype == at::kFloat ? 1e-5 : 4e-2;
          const double rtol = Tolerance(dtype);
          EXPECT_TRUE(Close(gpu_query, query, atol, rtol, "query " + what));
          EXPECT_TRUE(Close(gpu_kv, kv, atol, rtol, "cache " + what));
        } else {
          EXPECT_TRUE(Same(gpu_query, query, "query " + what));
          EXPECT_TRUE(Same(gpu_kv, kv, "cache " + what));
        }
      }
    }
  }
}

// qk_norm_rope_kv_write with each lane's loads first (the default for head sizes 64, 128 and 256;
// others take the warp's chain of loads) gives the chain's bits (DYSCO_CUDA_QK_WRITE=chain): query
// (NaN first) and cache, with and without the q/k norms, prefill-sized calls with skipped slots.
TEST(CudaQkNormRopeKvWrite, LoadsFirstGiveTheSameBits) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(38);
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const auto& [t, h, hkv, d] :
         {std::tuple<int64_t, int64_t, int64_t, int64_t>{2049, 32, 8, 128},
          {300, 16, 2, 64},
          {77, 8, 8, 256},
          {1, 32, 8, 128},
          {5, 3, 3, 36}}) {
      for (const bool norms : {false, true}) {
        const auto opt = at::TensorOptions().dtype(dtype).device(at::kCUDA);
        const QkWriteInputs in = MakeQkWriteInputs(dtype, t, h, hkv, d, norms);
        const at::Tensor qkv = Cuda(in.qkv), cos = Cuda(in.cos), sin = Cuda(in.sin);
        const at::Tensor q_w = Cuda(in.q_w), k_w = Cuda(in.k_w), kv0 = Cuda(in.kv);
        const at::Tensor slots = Cuda(in.slots);
        const std::string& what = in.what;
        at::Tensor query[2], kv[2];
        for (int registers = 0; registers < 2; ++registers) {
          const ScopedEnv knob("DYSCO_CUDA_QK_WRITE", registers ? nullptr : "chain");
          query[registers] = at::full({t, h, d}, kNaN, opt);
          kv[registers] = kv0.clone();
          ops::qk_norm_rope_kv_write(query[registers], kv[registers], qkv, cos, sin, slots,
                                     norms ? Bias(q_w) : Bias(), norms ? Bias(k_w) : Bias(), 1e-6);
        }
        ASSERT_FALSE(at::isnan(query[1].to(at::kFloat)).any().item<bool>()) << what;
        EXPECT_TRUE(at::equal(query[1], query[0])) << "query " << what;
        EXPECT_TRUE(at::equal(kv[1], kv[0])) << "cache " << what;
      }
    }
  }
}

// Decode rows of the given lengths on the GPU, each on its own pages (a permutation of a pool of
// rows x max_pages pages), with the slot of each row's newest key (at lens[r] - 1).
struct DecodeRows {
  at::Tensor tables;    // int32 [rows, max_pages]
  at::Tensor slots;     // int64 [rows]
  at::Tensor seq_lens;  // int64 [rows]
  int64_t rows = 0, max_pages = 0;
};

DecodeRows MakeDecodeRows(const std::vector<int64_t>& lens, int64_t page_size) {
  DecodeRows d;
  d.rows = static_cast<int64_t>(lens.size());
  d.max_pages = *std::max_element(lens.begin(), lens.end()) / page_size + 1;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCUDA);
  d.tables = at::randperm(d.rows * d.max_pages, i64).to(at::kInt).reshape({d.rows, d.max_pages});
  const at::Tensor tables = d.tables.cpu();
  std::vector<int64_t> slot_values;
  for (int64_t r = 0; r < d.rows; ++r) {
    const int64_t pos = lens[r] - 1;
    slot_values.push_back(tables[r][pos / page_size].item<int64_t>() * page_size + pos % page_size);
  }
  d.slots = at::tensor(slot_values, at::kLong).to(at::kCUDA);
  d.seq_lens = at::tensor(lens, at::kLong).to(at::kCUDA);
  return d;
}

// `step` captured into `graph` on a side stream, after one warm-up run there.
void CaptureAfterWarmUp(at::cuda::CUDAGraph& graph, const std::function<void()>& step) {
  // The capture stream does not wait for the default one: what ran there must be done before the
  // warm-up overwrites the same buffers.
  c10::cuda::device_synchronize();
  const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
  step();  // warm-up on the capture stream
  graph.capture_begin();
  step();
  graph.capture_end();
  c10::cuda::device_synchronize();  // the warm-up, before the default stream touches its buffers
}

// A decode step's new inputs, in place: the q/k/v projection and the rope angles.
void NewDecodeInputs(at::Tensor& qkv, at::Tensor& angle, at::Tensor& cos, at::Tensor& sin) {
  qkv.copy_(at::randn(qkv.sizes(), qkv.options()) * 3);
  angle.copy_(at::rand(angle.sizes(), angle.options()) * 6.3);
  cos.copy_(angle.cos());
  sin.copy_(angle.sin());
}

// The decode attention after qk_norm_rope_kv_write, the model's pair, with the tensor-core kernel
// started early (AttentionParams::early_keys: its first tiles of older keys loaded while the write
// runs) against plain launches: the same bits in the output and the cache, eagerly and replayed in
// a CUDA graph, for rows whose newest key sits at every place in a tile and page (first, last, one
// past), rows of one key, and a row with a key bias; every iteration writes a new newest key, so a
// tile read before the write would show.
TEST(CudaPagedAttentionDecode, StartsEarlyAfterTheKvWrite) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(41);
  const int64_t h = 32, hkv = 8, d = 128, page_size = 16;
  const DecodeRows decode_rows =
      MakeDecodeRows({1, 2, 15, 16, 17, 31, 32, 33, 255, 1000, 8191, 8192, 8193}, page_size);
  const int64_t rows = decode_rows.rows, max_pages = decode_rows.max_pages;
  const at::Tensor &tables = decode_rows.tables, &slots = decode_rows.slots;
  const at::Tensor& seq_lens = decode_rows.seq_lens;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const at::Tensor q_w = at::rand({d}, bf16) + 0.5, k_w = at::rand({d}, bf16) + 0.5;
  const at::Tensor bias = at::randn({rows, 8193}, bf16.dtype(at::kFloat));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (const auto& [biased, qk_early] :
       {std::pair<bool, const char*>{false, nullptr}, {true, nullptr}, {false, "1"}}) {
    // qk_early: the write kernel itself launched to start early (DYSCO_CUDA_QK_PDL=1).
    const ScopedEnv qk_pdl("DYSCO_CUDA_QK_PDL", qk_early);
    const at::Tensor kv0 = at::randn({2, rows * max_pages, page_size, hkv, d}, bf16);
    at::Tensor kv_early = kv0.clone(), kv_plain = kv0.clone(), kv_graph = kv0.clone();
    at::Tensor qkv = at::empty({rows, (h + 2 * hkv) * d}, bf16);
    at::Tensor angle = at::empty({rows, d}, bf16), cos = at::empty_like(angle);
    at::Tensor sin = at::empty_like(angle);
    at::Tensor query = at::empty({rows, h, d}, bf16), out = at::empty({rows, h, d}, bf16);
    auto step = [&](at::Tensor& kv) {
      ops::qk_norm_rope_kv_write(query, kv, qkv, cos, sin, slots, Bias(q_w), Bias(k_w), 1e-6);
      ops::paged_attention_decode(out, query, kv, tables, seq_lens, scale,
                                  biased ? Bias(bias) : Bias());
    };
    at::cuda::CUDAGraph graph;
    CaptureAfterWarmUp(graph, [&] { step(kv_graph); });
    kv_graph.copy_(kv0);
    kv_early.copy_(kv0);
    for (int iteration = 0; iteration < 6; ++iteration) {
      NewDecodeInputs(qkv, angle, cos, sin);
      const std::string what = std::string(biased ? "biased" : "unbiased") +
                               (qk_early != nullptr ? ", write started early" : "") +
                               " iteration " + std::to_string(iteration);
      at::Tensor plain_out;
      {
        const ScopedEnv plain("DYSCO_CUDA_ATTENTION_PDL", "0");
        step(kv_plain);
        plain_out = out.clone();
      }
      out.fill_(kNaN);
      step(kv_early);
      EXPECT_TRUE(at::equal(out, plain_out)) << "early " << what;
      EXPECT_TRUE(at::equal(kv_early, kv_plain)) << "early cache " << what;
      out.fill_(kNaN);
      graph.replay();
      c10::cuda::device_synchronize();
      EXPECT_TRUE(at::equal(out, plain_out)) << "graph " << what;
      EXPECT_TRUE(at::equal(kv_graph, kv_plain)) << "graph cache " << what;
    }
  }
}

// The head shapes of qk_norm_rope_attention_decode's tests: query and KV heads, head_dim, the cache
// type, and whether the q/k norms apply (Qwen3) or not (Llama).
struct FusedDecodeShape {
  int64_t h, hkv, d;
  at::ScalarType dtype;
  bool norms;
};

// qk_norm_rope_attention_decode against its two ops (qk_norm_rope_kv_write, then
// paged_attention_decode) on copies of one cache: the output, the query and the cache bit for bit,
// eagerly (started early and launched plainly) and replayed in a CUDA graph, over three steps that
// each write new newest keys (a tile read before the write would show). Shapes: Qwen3-8B's heads
// with their norms (bf16), Llama's without (fp16), GQA 8 and MHA with head_dim 64 (the tensor-core
// kernel makes the rows itself), fp32 and a group of 32 (the two kernels in a row); rows whose
// newest key sits at every place of a tile, page and split, one of one key, a biased variant, and
// DYSCO_CUDA_QKV_ATTENTION=0 (the two kernels) giving the same bits.
TEST(CudaQkNormRopeAttentionDecode, EqualsTheTwoOpsBitForBit) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(43);
  const int64_t page_size = 16;
  const DecodeRows decode_rows =
      MakeDecodeRows({1, 2, 15, 16, 17, 31, 32, 33, 255, 1000, 4095, 4096, 4097}, page_size);
  const int64_t rows = decode_rows.rows, max_pages = decode_rows.max_pages;
  const at::Tensor &tables = decode_rows.tables, &slots = decode_rows.slots;
  const at::Tensor& seq_lens = decode_rows.seq_lens;
  const at::Tensor bias = at::randn({rows, 4097 + 5}, at::TensorOptions().device(at::kCUDA));
  for (const FusedDecodeShape& shape :
       {FusedDecodeShape{32, 8, 128, at::kBFloat16, true},
        FusedDecodeShape{32, 8, 128, at::kHalf, false},
        FusedDecodeShape{16, 2, 64, at::kBFloat16, true},
        FusedDecodeShape{4, 4, 64, at::kHalf, true}, FusedDecodeShape{32, 8, 128, at::kFloat, true},
        FusedDecodeShape{32, 1, 64, at::kBFloat16, true}}) {
    const auto opt = at::TensorOptions().dtype(shape.dtype).device(at::kCUDA);
    const int64_t h = shape.h, hkv = shape.hkv, d = shape.d;
    const at::Tensor q_w = at::rand({d}, opt) + 0.5, k_w = at::rand({d}, opt) + 0.5;
    const Bias q_norm = shape.norms ? Bias(q_w) : Bias(), k_norm = shape.norms ? Bias(k_w) : Bias();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    // The default pipeline (the swapped operands for groups of at most 8), the query rows as M
    // ("0") and the swapped operands with the prefetch, each against the two ops under the same
    // pipeline.
    for (const char* pipeline : {static_cast<const char*>(nullptr), "0", "swap-prefetch"}) {
      const ScopedEnv mma_pipeline("DYSCO_CUDA_MMA_PREFETCH", pipeline);
      for (const bool biased : {false, true}) {
        const std::string shape_text =
            std::string(c10::toString(shape.dtype)) + " H=" + std::to_string(h) +
            " Hkv=" + std::to_string(hkv) + " D=" + std::to_string(d) +
            (shape.norms ? " norms" : "") + (biased ? " biased" : "") +
            (pipeline != nullptr ? std::string(", pipeline ") + pipeline : std::string());
        const at::Tensor kv0 = at::randn({2, rows * max_pages, page_size, hkv, d}, opt);
        at::Tensor kv_two = kv0.clone(), kv_fused = kv0.clone(), kv_graph = kv0.clone();
        at::Tensor qkv = at::empty({rows, (h + 2 * hkv) * d}, opt);
        at::Tensor angle = at::empty({rows, d}, opt), cos = at::empty_like(angle);
        at::Tensor sin = at::empty_like(angle);
        at::Tensor query = at::empty({rows, h, d}, opt), out = at::empty({rows, h, d}, opt);
        at::Tensor query_two = at::empty_like(query), out_two = at::empty_like(out);
        auto fused = [&](at::Tensor& kv) {
          ops::qk_norm_rope_attention_decode(out, query, kv, qkv, cos, sin, slots, q_norm, k_norm,
                                             1e-6, tables, seq_lens, scale,
                                             biased ? Bias(bias) : Bias());
        };
        at::cuda::CUDAGraph graph;
        CaptureAfterWarmUp(graph, [&] { fused(kv_graph); });
        kv_graph.copy_(kv0);
        for (int step = 0; step < 3; ++step) {
          NewDecodeInputs(qkv, angle, cos, sin);
          const std::string what = shape_text + ", step " + std::to_string(step);
          query_two.fill_(kNaN);
          out_two.fill_(kNaN);
          ops::qk_norm_rope_kv_write(query_two, kv_two, qkv, cos, sin, slots, q_norm, k_norm, 1e-6);
          ops::paged_attention_decode(out_two, query_two, kv_two, tables, seq_lens, scale,
                                      biased ? Bias(bias) : Bias());
          ASSERT_FALSE(at::isnan(out_two.to(at::kFloat)).any().item<bool>()) << what;
          for (const char* mode : {"early", "early, no tile", "plain", "two kernels", "graph"}) {
            const std::string m = std::string(mode);
            at::Tensor kv = m == "graph" ? kv_graph : kv_fused.clone();
            query.fill_(kNaN);
            out.fill_(kNaN);
            if (m == "graph") {
              graph.replay();
              c10::cuda::device_synchronize();
            } else {
              const ScopedEnv pdl("DYSCO_CUDA_PDL", m == "plain" ? "0" : nullptr);
              // The fused kernel starts early only when asked (paged_attention.cu).
              const ScopedEnv early("DYSCO_CUDA_ATTENTION_PDL",
                                    m.rfind("early", 0) == 0 ? "1" : nullptr);
              const ScopedEnv two("DYSCO_CUDA_QKV_ATTENTION", m == "two kernels" ? "0" : nullptr);
              const ScopedEnv no_tile("DYSCO_CUDA_ATTENTION_EARLY_TILE",
                                      m == "early, no tile" ? "0" : nullptr);
              fused(kv);
            }
            EXPECT_TRUE(at::equal(out, out_two)) << mode << ": out, " << what;
            EXPECT_TRUE(at::equal(query, query_two)) << mode << ": query, " << what;
            EXPECT_TRUE(at::equal(kv, kv_two)) << mode << ": cache, " << what;
          }
          kv_fused.copy_(kv_two);
        }
      }
    }
  }
}

// qk_norm_rope_attention_decode with probes (the selected heads' probabilities in the same pass,
// docs/gpu.md): out, query and cache bit for bit the op's without probes; probs, every element
// written (NaN first), equal to attention_probs after the op within fp32 rounding where the
// tensor-core kernel computes them (it sums q.k in another order) and bit for bit where it does not
// (fp32; DYSCO_CUDA_PROBS_IN_ATTENTION=0; probs narrower than the table); a CUDA graph's replay
// equal to the eager call bit for bit. Heads: one probed twice, the first and last of a KV head;
// rows of 1 to 4097 keys, biased and not.
TEST(CudaQkNormRopeAttentionDecode, ProbesInTheSamePass) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(47);
  const int64_t page_size = 16;
  const DecodeRows decode_rows =
      MakeDecodeRows({1, 2, 15, 16, 17, 255, 1000, 4095, 4097}, page_size);
  const int64_t rows = decode_rows.rows, max_pages = decode_rows.max_pages;
  const at::Tensor &tables = decode_rows.tables, &slots = decode_rows.slots;
  const at::Tensor& seq_lens = decode_rows.seq_lens;
  const int64_t width = max_pages * page_size;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const at::Tensor bias = at::randn({rows, width}, f32);
  for (const FusedDecodeShape& shape : {FusedDecodeShape{32, 8, 128, at::kBFloat16, true},
                                        FusedDecodeShape{32, 8, 128, at::kHalf, false},
                                        FusedDecodeShape{16, 2, 64, at::kBFloat16, true},
                                        FusedDecodeShape{32, 8, 128, at::kFloat, true}}) {
    const auto opt = at::TensorOptions().dtype(shape.dtype).device(at::kCUDA);
    const int64_t h = shape.h, hkv = shape.hkv, d = shape.d;
    const at::Tensor q_w = at::rand({d}, opt) + 0.5, k_w = at::rand({d}, opt) + 0.5;
    const Bias q_norm = shape.norms ? Bias(q_w) : Bias(), k_norm = shape.norms ? Bias(k_w) : Bias();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const at::Tensor heads =
        at::tensor(std::vector<int64_t>{1, h - 1, 1, 0, h / 2}, at::kLong).to(at::kCUDA);
    const int64_t hp = heads.size(0);
    // The default pipeline (the swapped operands, the probed calls' instance swapped too), the
    // query rows as M ("0") and the swapped operands with the prefetch.
    for (const char* pipeline : {static_cast<const char*>(nullptr), "0", "swap-prefetch"}) {
      const ScopedEnv mma_pipeline("DYSCO_CUDA_MMA_PREFETCH", pipeline);
      for (const bool biased : {false, true}) {
        const std::string what =
            std::string(c10::toString(shape.dtype)) + " H=" + std::to_string(h) +
            " D=" + std::to_string(d) + (biased ? " biased" : "") +
            (pipeline != nullptr ? std::string(", pipeline ") + pipeline : std::string());
        const Bias key_bias = biased ? Bias(bias) : Bias();
        const at::Tensor kv0 = at::randn({2, rows * max_pages, page_size, hkv, d}, opt);
        at::Tensor qkv = at::empty({rows, (h + 2 * hkv) * d}, opt);
        at::Tensor angle = at::empty({rows, d}, opt), cos = at::empty_like(angle);
        at::Tensor sin = at::empty_like(angle);
        NewDecodeInputs(qkv, angle, cos, sin);
        // The reference: the op without probes, then attention_probs.
        at::Tensor kv_ref = kv0.clone();
        at::Tensor query_ref = at::empty({rows, h, d}, opt), out_ref = at::empty({rows, h, d}, opt);
        at::Tensor probs_ref = at::full({rows, hp, width}, kNaN, f32);
        ops::qk_norm_rope_attention_decode(out_ref, query_ref, kv_ref, qkv, cos, sin, slots, q_norm,
                                           k_norm, 1e-6, tables, seq_lens, scale, key_bias);
        ops::attention_probs(probs_ref, query_ref, kv_ref, tables, seq_lens, heads, scale,
                             key_bias);
        ASSERT_FALSE(at::isnan(probs_ref).any().item<bool>()) << what;
        at::Tensor query = at::empty_like(query_ref), out = at::empty_like(out_ref);
        at::Tensor probs = at::empty_like(probs_ref);
        auto call = [&](at::Tensor& kv, at::Tensor& p, const at::Tensor& h_probed) {
          ops::qk_norm_rope_attention_decode(out, query, kv, qkv, cos, sin, slots, q_norm, k_norm,
                                             1e-6, tables, seq_lens, scale, key_bias, p, h_probed);
        };
        const bool tensor_cores = shape.dtype != at::kFloat;
        at::Tensor eager_probs;
        for (const char* mode : {"same pass", "knob off", "narrow probs"}) {
          const std::string m = mode;
          const ScopedEnv off("DYSCO_CUDA_PROBS_IN_ATTENTION", m == "knob off" ? "0" : nullptr);
          at::Tensor kv = kv0.clone();
          out.fill_(kNaN);
          query.fill_(kNaN);
          // Narrower than the table: attention_probs' own pass (rows past S' are not the op's).
          at::Tensor p =
              m == "narrow probs" ? at::full({rows, hp, width - 16}, kNaN, f32) : probs.fill_(kNaN);
          call(kv, p, heads);
          c10::cuda::device_synchronize();
          EXPECT_TRUE(at::equal(out, out_ref)) << mode << ": out, " << what;
          EXPECT_TRUE(at::equal(query, query_ref)) << mode << ": query, " << what;
          EXPECT_TRUE(at::equal(kv, kv_ref)) << mode << ": cache, " << what;
          EXPECT_FALSE(at::isnan(p).any().item<bool>()) << mode << ": probs, " << what;
          if (m == "narrow probs") {
            at::Tensor narrow_ref = at::full({rows, hp, width - 16}, kNaN, f32);
            ops::attention_probs(narrow_ref, query_ref, kv_ref, tables, seq_lens, heads, scale,
                                 key_bias);
            EXPECT_TRUE(at::equal(p, narrow_ref)) << mode << ": probs, " << what;
          } else if (m == "same pass" && tensor_cores) {
            EXPECT_TRUE(at::allclose(p, probs_ref, /*rtol=*/1e-3, /*atol=*/1e-7))
                << mode << ": probs, " << what << ", max abs error "
                << (p - probs_ref).abs().max().item<float>();
            // Each row still sums to one over its keys (zeros past them).
            EXPECT_TRUE(at::allclose(p.sum(2), probs_ref.sum(2), 1e-4, 1e-5)) << what;
            eager_probs = p.clone();
          } else {
            EXPECT_TRUE(at::equal(p, probs_ref)) << mode << ": probs, " << what;
            if (m == "same pass") eager_probs = p.clone();
          }
        }
        // A graph of the call replays the eager call's bits.
        at::Tensor kv_graph = kv0.clone();
        at::cuda::CUDAGraph graph;
        CaptureAfterWarmUp(graph, [&] { call(kv_graph, probs, heads); });
        kv_graph.copy_(kv0);
        probs.fill_(kNaN);
        out.fill_(kNaN);
        graph.replay();
        c10::cuda::device_synchronize();
        EXPECT_TRUE(at::equal(probs, eager_probs)) << "graph: probs, " << what;
        EXPECT_TRUE(at::equal(out, out_ref)) << "graph: out, " << what;
        EXPECT_TRUE(at::equal(kv_graph, kv_ref)) << "graph: cache, " << what;
      }
    }
  }
}

// ---- rope_tables

// T positions (CPU), random in [0, 131072), the first two 0 and 131071.
at::Tensor RopePositions(int64_t t) {
  at::Tensor positions = at::randint(0, 131072, {t}, at::kLong);
  if (t > 0) positions[0] = 0;
  if (t > 1) positions[1] = 131071;
  return positions;
}

// Every output element written (NaN first), bit for bit ATen's composite on CUDA (the same fp32
// products, the precise cosf / sinf of ATen's CUDA cos and sin, the same rounding to the dtype),
// and so under DYSCO_CUDA_ROPE_TABLES=aten (which runs that composite); within 1e-5 / one
// rounding of the dtype of the CPU op (ATen's CPU cos and sin are Sleef's, which round
// differently). Head sizes of the models and one not a multiple of 8; decode and prefill rows.
TEST(CudaRopeTables, EqualsAtenBitForBit) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(53);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t d : {64, 128, 36}) {
      const at::Tensor inv_freq = dysco::RopeInvFreq(d, d == 36 ? 10000.0 : 500000.0);
      const at::Tensor gpu_inv_freq = Cuda(inv_freq);
      for (const int64_t t : {0, 1, 7, 300}) {
        for (const double scaling : {1.0, 1.2}) {
          const std::string what = std::string("rope_tables ") + c10::toString(dtype) +
                                   " d=" + std::to_string(d) + " t=" + std::to_string(t) +
                                   " scaling=" + std::to_string(scaling);
          const at::Tensor positions = RopePositions(t);
          const at::Tensor gpu_positions = Cuda(positions);
          at::Tensor cos = at::full({t, d}, kNaN).to(dtype);
          at::Tensor sin = at::full({t, d}, kNaN).to(dtype);
          at::Tensor gpu_cos = Cuda(cos), gpu_sin = Cuda(sin);
          ops::rope_tables(cos, sin, positions, inv_freq, scaling);
          ops::rope_tables(gpu_cos, gpu_sin, gpu_positions, gpu_inv_freq, scaling);
          const auto [aten_cos, aten_sin] =
              dysco::ModelRopeTables(gpu_positions, gpu_inv_freq, scaling, dtype);
          EXPECT_TRUE(Same(gpu_cos, aten_cos.cpu(), what + " cos vs ATen CUDA"));
          EXPECT_TRUE(Same(gpu_sin, aten_sin.cpu(), what + " sin vs ATen CUDA"));
          EXPECT_TRUE(Close(gpu_cos, cos, Tolerance(dtype), Tolerance(dtype), what + " cos"));
          EXPECT_TRUE(Close(gpu_sin, sin, Tolerance(dtype), Tolerance(dtype), what + " sin"));

          const ScopedEnv knob("DYSCO_CUDA_ROPE_TABLES", "aten");
          at::Tensor knob_cos = at::full({t, d}, kNaN, gpu_cos.options());
          at::Tensor knob_sin = at::full({t, d}, kNaN, gpu_sin.options());
          ops::rope_tables(knob_cos, knob_sin, gpu_positions, gpu_inv_freq, scaling);
          EXPECT_TRUE(Same(knob_cos, gpu_cos.cpu(), what + " cos, DYSCO_CUDA_ROPE_TABLES=aten"));
          EXPECT_TRUE(Same(knob_sin, gpu_sin.cpu(), what + " sin, DYSCO_CUDA_ROPE_TABLES=aten"));
        }
      }
    }
  }
}

// No host synchronisation or allocation: the op captures in a CUDA graph, and each replay (new
// positions copied into the captured buffer, the tables poisoned) equals an eager call.
TEST(CudaRopeTables, GraphReplayEqualsEagerCall) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(54);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [t, d] : {std::pair<int64_t, int64_t>{64, 128}, {300, 36}}) {
      const std::string what = std::string("rope_tables graph ") + c10::toString(dtype) +
                               " t=" + std::to_string(t) + " d=" + std::to_string(d);
      const at::Tensor inv_freq = Cuda(dysco::RopeInvFreq(d, 500000.0));
      at::Tensor positions = Cuda(RopePositions(t));
      at::Tensor cos = at::full({t, d}, kNaN, at::TensorOptions().dtype(dtype).device(at::kCUDA));
      at::Tensor sin = at::full({t, d}, kNaN, cos.options());
      at::cuda::CUDAGraph graph;
      CaptureAfterWarmUp(graph, [&] { ops::rope_tables(cos, sin, positions, inv_freq, 1.2); });
      for (int step = 0; step < 3; ++step) {
        positions.copy_(Cuda(RopePositions(t)));
        cos.fill_(kNaN);
        sin.fill_(kNaN);
        graph.replay();
        at::Tensor eager_cos = at::full({t, d}, kNaN, cos.options());
        at::Tensor eager_sin = at::full({t, d}, kNaN, cos.options());
        ops::rope_tables(eager_cos, eager_sin, positions, inv_freq, 1.2);
        c10::cuda::device_synchronize();
        EXPECT_TRUE(Same(cos, eager_cos.cpu(), what + " cos step " + std::to_string(step)));
        EXPECT_TRUE(Same(sin, eager_sin.cpu(), what + " sin step " + std::to_string(step)));
      }
    }
  }
}

// ---- add_rms_norm and silu_mul

// A contiguous [rows, cols] tensor of `source`'s values whose data starts one element past a
// 16-byte boundary: the kernels' scalar path for widths that would take the vector one.
at::Tensor Misaligned(const at::Tensor& source) {
  const at::Tensor flat = at::empty({source.numel() + 1}, source.options());
  at::Tensor view = flat.narrow(0, 1, source.numel()).view(source.sizes());
  view.copy_(source);
  return view;
}

// Widths 1..5000 (odd ones, the warp/block switch at 1024, the 8B hidden size 4096), rows 1..64,
// every output element written (NaN first): the sum bit for bit (both round the fp32 sum of the
// same two values), out within the rms_norm tolerance (its squares summed in another order).
// Aligned (vector path where the width allows) and misaligned (scalar path) tensors.
TEST(CudaAddRmsNorm, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(29);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [m, d] : {std::pair<int64_t, int64_t>{1, 4096},
                               {64, 4096},
                               {1, 1},
                               {3, 7},
                               {5, 576},
                               {32, 128},
                               {4, 1023},
                               {2, 1024},
                               {9, 1025},
                               {2, 1536},
                               {33, 1500},
                               {3, 5000}}) {
      for (const bool misaligned : {false, true}) {
        const at::Tensor x = at::randn({m, d}).to(dtype);
        const at::Tensor residual = (at::randn({m, d}) * 4).to(dtype);
        const at::Tensor w = (at::rand({d}) + 0.5).to(dtype);
        at::Tensor out = at::full({m, d}, kNaN).to(dtype);
        at::Tensor sum = at::full({m, d}, kNaN).to(dtype);
        at::Tensor gpu_out = Cuda(out);
        at::Tensor gpu_sum = Cuda(sum);
        at::Tensor gpu_x = Cuda(x);
        if (misaligned) {
          gpu_out = Misaligned(gpu_out);
          gpu_sum = Misaligned(gpu_sum);
          gpu_x = Misaligned(gpu_x);
        }
        ops::add_rms_norm(out, sum, x, residual, w, 1e-6);
        ops::add_rms_norm(gpu_out, gpu_sum, gpu_x, Cuda(residual), Cuda(w), 1e-6);
        const std::string what = std::string("add_rms_norm ") + c10::toString(dtype) +
                                 " m=" + std::to_string(m) + " d=" + std::to_string(d) +
                                 (misaligned ? " misaligned" : "");
        EXPECT_TRUE(Same(gpu_sum, sum, what + " sum"));
        EXPECT_TRUE(Close(gpu_out, out, Tolerance(dtype), Tolerance(dtype), what));
      }
    }
  }
}

// add_rms_norm_linear against the CPU op (add_rms_norm then linear) and against a float64
// reference of the formula from the same inputs. The GEMV path (one or two bf16 / fp16 rows, K a
// multiple of 8, aligned) forms the norm in fp32 without rounding the normed row, so it is compared
// within the dtype's tolerance; every other case (fp32, three rows or more, K = 1001, a misaligned
// residual, DYSCO_CUDA_NORM_LINEAR=separate) runs the two CUDA ops. The sum is the CPU op's bit for
// bit everywhere, every output element written (NaN first). Shapes: the 8B hidden size with an
// odd N, q/k/v's 6144 x 4096 (decode rows only, aligned), SmolLM2's gate/up, odd and tiny ones,
// N of more blocks than the GPU holds at once (20001 rows: 1251 blocks of 16 rows, against 4
// blocks on each of the H200's 132 SMs), and rows near and past the kernel's shared memory (K
// 11776: one row is 46 KB, fused, two rows the two ops; K 12288: one row is 48 KB, the two ops).
// The fused GEMV runs with the warps a row pair it picks for N (GemvSplits: two for small N) and
// with one and two forced (DYSCO_CUDA_GEMV_SPLITS).
TEST(CudaAddRmsNormLinear, EqualsCpuAndTheFormula) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(31);
  struct Shape {
    int64_t k, n;
  };
  const std::vector<Shape> shapes = {{4096, 1031}, {4096, 6144}, {576, 1536}, {64, 7},
                                     {1000, 333},  {1001, 77},   {8, 1},      {64, 20001},
                                     {576, 9001},  {11776, 24},  {12288, 24}};
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const bool fp32 = dtype == at::kFloat;
    for (const int64_t m : {1, 2, 3, 5}) {
      for (const Shape& s : shapes) {
        std::map<std::string, at::Tensor> outs;  // GPU outputs by variant
        for (const std::string variant : {"aligned", "misaligned residual", "separate",
                                          "one warp a row pair", "two warps a row pair"}) {
          if (s.n == 6144 && (m > 2 || variant != "aligned")) continue;  // CPU time
          const at::Tensor x = at::randn({m, s.k}).to(dtype);
          const at::Tensor residual = (at::randn({m, s.k}) * 4).to(dtype);
          const at::Tensor g = (at::rand({s.k}) + 0.5).to(dtype);
          const at::Tensor w = (at::randn({s.n, s.k}) / 16).to(dtype);
          at::Tensor out = at::full({m, s.n}, kNaN).to(dtype);
          at::Tensor sum = at::full({m, s.k}, kNaN).to(dtype);
          at::Tensor gpu_out = Cuda(out);
          at::Tensor gpu_sum = Cuda(sum);
          at::Tensor gpu_residual = Cuda(residual);
          if (variant == "misaligned residual") gpu_residual = Misaligned(gpu_residual);
          ops::add_rms_norm_linear(out, sum, x, residual, g, 1e-6, w);
          {
            const ScopedEnv knob("DYSCO_CUDA_NORM_LINEAR",
                                 variant == "separate" ? "separate" : nullptr);
            const ScopedEnv splits("DYSCO_CUDA_GEMV_SPLITS", variant == "one warp a row pair" ? "1"
                                                             : variant == "two warps a row pair"
                                                                 ? "2"
                                                                 : nullptr);
            ops::add_rms_norm_linear(gpu_out, gpu_sum, Cuda(x), gpu_residual, Cuda(g), 1e-6,
                                     Cuda(w));
          }
          const std::string what = std::string("add_rms_norm_linear ") + c10::toString(dtype) +
                                   " m=" + std::to_string(m) + " k=" + std::to_string(s.k) +
                                   " n=" + std::to_string(s.n) + " " + variant;
          EXPECT_TRUE(Same(gpu_sum, sum, what + " sum"));
          EXPECT_TRUE(Close(gpu_out, out, fp32 ? 1e-4 : 5e-2, fp32 ? 1e-5 : 1e-2, what));
          // The formula in float64 from the rounded sum: rms_norm(sum) @ w^T.
          const at::Tensor s64 = sum.to(at::kDouble);
          const at::Tensor normed =
              s64 * at::rsqrt(s64.pow(2).mean(-1, /*keepdim=*/true) + 1e-6) * g.to(at::kDouble);
          const at::Tensor formula = at::matmul(normed, w.to(at::kDouble).t());
          EXPECT_TRUE(Close(gpu_out, formula, fp32 ? 1e-4 : 5e-2, fp32 ? 1e-5 : 1e-2,
                            what + " vs formula"));
          outs[variant] = gpu_out.cpu();
        }
        if (outs.count("separate") != 0 && !fp32 && m <= 2 && s.k % 8 == 0 && s.n > 64) {
          // The fused GEMV did run: its normed row is not rounded to the dtype, so some of its
          // outputs differ from the two ops' (a misaligned residual takes the two ops: its
          // 16-byte loads would fault).
          EXPECT_FALSE(at::equal(outs["aligned"], outs["separate"]))
              << c10::toString(dtype) << " m=" << m << " k=" << s.k << " n=" << s.n;
        }
      }
    }
  }
}

// For bf16 / fp16: `gpu_out` against the CPU's silu(g) * u, within the error that the gate and
// up sums may carry. The fused GEMV does not round the normed row and the GEMVs sum in another
// order, so g and u may differ from the CPU's by add_rms_norm_linear's tolerance (5e-2 + 1e-2
// |x|, checked on gate_up itself), and silu(g) * u magnifies that by |silu'(g)| |u| and |silu(g)|
// (a gate of -2.2 with an up of 30 turns one bf16 step of the gate into several of the output).
// The bound is that propagation plus the second-order terms (|silu''| <= 0.5) plus one rounding
// of the output on each side; it is per element, so a wrong or unwritten (NaN) element fails.
::testing::AssertionResult SwigluClose(const at::Tensor& gpu_out, const at::Tensor& cpu_out,
                                       const at::Tensor& cpu_gate_up, const std::string& what) {
  const int64_t n = cpu_out.size(-1);
  const at::Tensor g = cpu_gate_up.narrow(-1, 0, n).to(at::kDouble);
  const at::Tensor u = cpu_gate_up.narrow(-1, n, n).to(at::kDouble);
  const at::Tensor dg = 5e-2 + 1e-2 * g.abs();
  const at::Tensor du = 5e-2 + 1e-2 * u.abs();
  const at::Tensor sig = at::sigmoid(g);
  const at::Tensor dsilu = sig * (1 + g * (1 - sig));
  const at::Tensor expected = cpu_out.to(at::kDouble);
  const at::Tensor bound = dsilu.abs() * dg * u.abs() + (g * sig).abs() * du +
                           0.5 * dg * dg * u.abs() + 1.1 * dg * du + 1e-2 * expected.abs() + 1e-3;
  const at::Tensor err = (gpu_out.cpu().to(at::kDouble) - expected).abs();
  const at::Tensor bad = err.le(bound).logical_not().reshape({-1});  // NaN fails
  const int64_t nbad = bad.sum().item<int64_t>();
  // The [maxerr] format of Close (scripts/gpu-check.sh takes its last fields).
  const at::Tensor relative = (err / expected.abs()).masked_fill(expected.abs() < 1e-3, 0.0);
  std::printf("[maxerr] %s (worst share of its bound %.3g): abs %.3g rel %.3g\n", what.c_str(),
              (err / bound).max().item<double>(), err.max().item<double>(),
              relative.max().item<double>());
  if (nbad == 0) return ::testing::AssertionSuccess();
  const int64_t first = bad.nonzero()[0].item<int64_t>();
  return ::testing::AssertionFailure()
         << what << ": " << nbad << " of " << bad.numel() << " elements past the bound; first at "
         << first << ": cuda " << gpu_out.cpu().reshape({-1})[first].item<double>() << ", cpu "
         << expected.reshape({-1})[first].item<double>() << ", bound "
         << bound.reshape({-1})[first].item<double>();
}

// add_rms_norm_swiglu: bit for bit add_rms_norm_linear then silu_mul on the GPU (what it runs);
// against the CPU op (fp32 within 1e-4 / 1e-5;
// bf16 / fp16 within SwigluClose's bound, with gate_up within add_rms_norm_linear's tolerance);
// the sum bit for bit; every output element written (NaN first). Fused-GEMV shapes, odd ones,
// K = 1001 (the two ops), more blocks than the GPU holds at once.
TEST(CudaAddRmsNormSwiglu, EqualsTheTwoOpsBitForBitAndCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(37);
  struct Shape {
    int64_t k, n;  // weight [2n, k]
  };
  const std::vector<Shape> shapes = {{4096, 1031}, {576, 1536}, {64, 7},    {1000, 333},
                                     {1001, 77},   {8, 1},      {64, 20001}};
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const bool fp32 = dtype == at::kFloat;
    for (const int64_t m : {1, 2, 3}) {
      for (const Shape& s : shapes) {
        const at::Tensor x = at::randn({m, s.k}).to(dtype);
        const at::Tensor residual = (at::randn({m, s.k}) * 4).to(dtype);
        const at::Tensor g = (at::rand({s.k}) + 0.5).to(dtype);
        const at::Tensor w = (at::randn({2 * s.n, s.k}) / 16).to(dtype);
        at::Tensor out = at::full({m, s.n}, kNaN).to(dtype);
        at::Tensor sum = at::full({m, s.k}, kNaN).to(dtype);
        ops::add_rms_norm_swiglu(out, sum, x, residual, g, 1e-6, w);
        // The two ops on the GPU.
        const at::Tensor gpu_x = Cuda(x), gpu_residual = Cuda(residual), gpu_g = Cuda(g);
        const at::Tensor gpu_w = Cuda(w);
        at::Tensor gate_up = Cuda(at::full({m, 2 * s.n}, kNaN).to(dtype));
        at::Tensor two_ops = Cuda(at::full({m, s.n}, kNaN).to(dtype));
        at::Tensor two_ops_sum = Cuda(sum);
        ops::add_rms_norm_linear(gate_up, two_ops_sum, gpu_x, gpu_residual, gpu_g, 1e-6, gpu_w);
        ops::silu_mul(two_ops, gate_up);
        at::Tensor cpu_gate_up = at::full({m, 2 * s.n}, kNaN).to(dtype);
        at::Tensor cpu_sum = at::full({m, s.k}, kNaN).to(dtype);
        ops::add_rms_norm_linear(cpu_gate_up, cpu_sum, x, residual, g, 1e-6, w);
        const std::string shape = std::string(c10::toString(dtype)) + " m=" + std::to_string(m) +
                                  " k=" + std::to_string(s.k) + " n=" + std::to_string(s.n);
        EXPECT_TRUE(Close(gate_up, cpu_gate_up, fp32 ? 1e-4 : 5e-2, fp32 ? 1e-5 : 1e-2,
                          "add_rms_norm_swiglu's gate_up " + shape));
        at::Tensor gpu_out = Cuda(at::full({m, s.n}, kNaN).to(dtype));
        at::Tensor gpu_sum = Cuda(at::full({m, s.k}, kNaN).to(dtype));
        ops::add_rms_norm_swiglu(gpu_out, gpu_sum, gpu_x, gpu_residual, gpu_g, 1e-6, gpu_w);
        const std::string what = "add_rms_norm_swiglu " + shape;
        EXPECT_TRUE(Same(gpu_sum, sum, what + " sum"));
        EXPECT_TRUE(Same(gpu_out, two_ops.cpu(), what + " vs add_rms_norm_linear, silu_mul"));
        if (fp32) {
          EXPECT_TRUE(Close(gpu_out, out, 1e-4, 1e-5, what));
        } else {
          EXPECT_TRUE(SwigluClose(gpu_out, out, cpu_gate_up, what));
        }
      }
    }
  }
}

// o_proj_mlp: bit for bit linear, add_rms_norm_swiglu and linear on the GPU, by default and with
// DYSCO_CUDA_MLP=persistent, both for one row (the persistent kernel, DecodeMlpKernel) and two (the
// three ops); fp32 within 1e-4 / 1e-5 of the CPU op. The 8B shape (its gate/up stage has more GEMV
// blocks than the grid), SmolLM2's, odd ones (fewer blocks than the grid; I not a multiple of 8:
// the three ops), each warps-a-row-pair setting (the kernel's three instantiations), three
// persistent calls in a row (the barrier counters left at zero by each); every output element
// written (NaN first).
TEST(CudaOProjMlp, EqualsTheThreeOpsBitForBit) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(39);
  struct Shape {
    int64_t a, d, inter;  // attn [m, a], o_weight [d, a], gate_up [2 inter, d], down [d, inter]
  };
  const std::vector<Shape> shapes = {
      {4096, 4096, 12288}, {576, 576, 1536}, {64, 48, 40}, {128, 64, 1003}, {2048, 1024, 4096}};
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    for (const Shape& s : shapes) {
      const at::Tensor w_o = at::randn({s.d, s.a}, options) / 32;
      const at::Tensor g = at::rand({s.d}, options) + 0.5;
      const at::Tensor w_gate_up = at::randn({2 * s.inter, s.d}, options) / 32;
      const at::Tensor w_down = at::randn({s.d, s.inter}, options) / 32;
      for (const int64_t m : {1, 2}) {
        for (const char* splits : {static_cast<const char*>(nullptr), "1", "2"}) {
          const ScopedEnv knob("DYSCO_CUDA_GEMV_SPLITS", splits);
          const at::Tensor attn = at::randn({m, s.a}, options);
          const at::Tensor residual = at::randn({m, s.d}, options) * 4;
          const at::Tensor o = at::full({m, s.d}, kNaN, options);
          const at::Tensor act = at::full({m, s.inter}, kNaN, options);
          const at::Tensor expected = at::full({m, s.d}, kNaN, options);
          const at::Tensor expected_sum = at::full({m, s.d}, kNaN, options);
          ops::linear(o, attn, w_o);
          ops::add_rms_norm_swiglu(act, expected_sum, o, residual, g, 1e-6, w_gate_up);
          ops::linear(expected, act, w_down);
          const std::string what = std::string(c10::toString(dtype)) + " m=" + std::to_string(m) +
                                   " a=" + std::to_string(s.a) + " d=" + std::to_string(s.d) +
                                   " inter=" + std::to_string(s.inter) +
                                   " splits=" + (splits != nullptr ? splits : "default");
          for (int call = 0; call < 4; ++call) {
            // Calls 1-3 persistent (when it applies), call 0 the default.
            const ScopedEnv persistent("DYSCO_CUDA_MLP", call > 0 ? "persistent" : nullptr);
            const at::Tensor out = at::full({m, s.d}, kNaN, options);
            const at::Tensor sum = at::full({m, s.d}, kNaN, options);
            ops::o_proj_mlp(out, sum, attn, residual, w_o, g, 1e-6, w_gate_up, w_down);
            EXPECT_TRUE(Same(out, expected.cpu(), "o_proj_mlp " + what));
            EXPECT_TRUE(Same(sum, expected_sum.cpu(), "o_proj_mlp sum " + what));
          }
          if (dtype == at::kFloat && splits == nullptr) {
            const at::Tensor cpu_out = at::full({m, s.d}, kNaN);
            const at::Tensor cpu_sum = at::full({m, s.d}, kNaN);
            ops::o_proj_mlp(cpu_out, cpu_sum, attn.cpu(), residual.cpu(), w_o.cpu(), g.cpu(), 1e-6,
                            w_gate_up.cpu(), w_down.cpu());
            EXPECT_TRUE(Close(expected, cpu_out, 1e-4, 1e-5, "o_proj_mlp vs cpu " + what));
            EXPECT_TRUE(Close(expected_sum, cpu_sum, 1e-4, 1e-5, "o_proj_mlp sum vs cpu " + what));
          }
        }
      }
    }
  }
}

// Against the CPU op (its silu is ATen's CPU exp: within 1e-5 / one rounding of the dtype) and
// against ATen's own CUDA expression `F.silu(g) * u`, bit for bit (the same fp32 silu, expf and
// IEEE division, and the same two roundings). N odd, on both sides of a vector, and the 8B's
// intermediate size; aligned and misaligned.
TEST(CudaSiluMul, EqualsCpuAndTheAtenCudaExpression) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(31);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [m, n] : {std::pair<int64_t, int64_t>{1, 14336},
                               {64, 1536},
                               {1, 1},
                               {3, 7},
                               {5, 576},
                               {9, 1025},
                               {64, 4096},
                               {2, 12}}) {
      for (const bool misaligned : {false, true}) {
        const at::Tensor x = (at::randn({m, 2 * n}) * 3).to(dtype);
        at::Tensor out = at::full({m, n}, kNaN).to(dtype);
        at::Tensor gpu_out = Cuda(out);
        at::Tensor gpu_x = Cuda(x);
        if (misaligned) {
          gpu_out = Misaligned(gpu_out);
          gpu_x = Misaligned(gpu_x);
        }
        ops::silu_mul(out, x);
        ops::silu_mul(gpu_out, gpu_x);
        const std::string what = std::string("silu_mul ") + c10::toString(dtype) +
                                 " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                                 (misaligned ? " misaligned" : "");
        EXPECT_TRUE(Close(gpu_out, out, Tolerance(dtype), Tolerance(dtype), what));
        const at::Tensor aten = at::silu(gpu_x.narrow(1, 0, n)) * gpu_x.narrow(1, n, n);
        EXPECT_TRUE(Same(gpu_out, aten.cpu(), what + " vs ATen CUDA"));
      }
    }
  }
}

TEST(CudaDyscoBiasFromSelection, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(11);
  const int64_t width = 5000;
  const std::vector<int64_t> n = {0, 1, 4096, 4097, 5000};
  const int64_t batch = static_cast<int64_t>(n.size());
  const at::Tensor selected = at::rand({batch, width}) < 0.3;
  const at::Tensor template_mask = at::rand({batch, width}) < 0.2;
  const at::Tensor num_keys = at::tensor(n, at::kLong);
  for (float s : {0.5f, 2.0f, 98.9f, 99.0f, std::numeric_limits<float>::infinity()}) {
    const at::Tensor strength = at::full({batch}, s);
    at::Tensor bias = at::full({batch, width}, kNaN);
    at::Tensor gpu_bias = Cuda(bias);
    ops::dysco_bias_from_selection(bias, selected, num_keys, template_mask, strength);
    ops::dysco_bias_from_selection(gpu_bias, Cuda(selected), Cuda(num_keys), Cuda(template_mask),
                                   Cuda(strength));
    EXPECT_TRUE(Same(gpu_bias, bias, "bias strength " + std::to_string(s)));
  }
}

TEST(CudaDyscoTemplateMask, EqualsCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(12);
  // A small vocabulary so that templates occur often, overlapping; an empty template; a template
  // longer than the prompt.
  const at::Tensor tokens = at::randint(0, 4, {20000}, at::kLong);
  const at::Tensor sequences =
      at::tensor(std::vector<int64_t>{1, 2, 3, 0, 0, 2, 3, 3, 1}, at::kLong);
  for (const std::vector<int64_t>& offsets :
       {std::vector<int64_t>{0}, std::vector<int64_t>{0, 3, 3, 5, 9}, std::vector<int64_t>{0, 9}}) {
    const at::Tensor seq = sequences.slice(0, 0, offsets.back());
    const at::Tensor off = at::tensor(offsets, at::kLong);
    for (int64_t length : {int64_t{0}, int64_t{5}, int64_t{20000}}) {
      const at::Tensor tok = tokens.slice(0, 0, length).contiguous();
      at::Tensor mask = at::ones({length}, at::kBool);
      at::Tensor gpu_mask = Cuda(mask);
      ops::dysco_template_mask(mask, tok, seq, off);
      ops::dysco_template_mask(gpu_mask, Cuda(tok), Cuda(seq), Cuda(off));
      EXPECT_TRUE(Same(gpu_mask, mask,
                       "mask length " + std::to_string(length) + " templates " +
                           std::to_string(offsets.size() - 1)));
    }
  }
}

// ---- no host synchronisation: a DySCO decode step's ops captured in a CUDA graph and replayed.

void CheckDecodeStepGraph() {
  std::mt19937 rng(13);
  at::manual_seed(13);
  const Layout l{2, 4, 128, 16};
  const PagedBatch batch = MakeBatch(l, {3000, 517}, at::kBFloat16, rng);
  const int64_t width = batch.max_len;
  const at::Tensor query = at::randn({2, 8, 128}).to(at::kBFloat16);
  const at::Tensor heads = at::tensor(std::vector<int64_t>{1, 6}, at::kLong);
  const at::Tensor relevance = RelevanceRows({2999, 516}, width, false);
  const at::Tensor template_mask = at::rand({2, width}) < 0.1;
  const at::Tensor top_p = at::full({2}, 0.9f);
  const at::Tensor top_k = at::full({2}, 256, at::kLong);
  const at::Tensor strength = at::full({2}, 2.0f);
  const at::Tensor decay = at::full({2}, 0.5f);
  const double scale = 1.0 / std::sqrt(128.0);

  // The step: probs of the probe heads, relevance update, selection + bias, biased attention.
  struct Step {
    at::Tensor kv, tables, lens, q, heads, rel, tmpl, p, k, s, decay;
    at::Tensor probs, bias, selected, stats, out;
    void Run(double scale) const {
      ops::attention_probs(probs, q, kv, tables, lens, heads, scale, c10::nullopt);
      ops::dysco_relevance_update(rel, probs, lens, decay);
      ops::dysco_select_bias(bias, selected, stats, rel, lens, tmpl, p, k, s);
      ops::paged_attention_decode(out, q, kv, tables, lens, scale, bias);
    }
  };
  auto make = [&](bool gpu) {
    auto d = [gpu](const at::Tensor& t) { return gpu ? Cuda(t) : t.clone(); };
    return Step{d(batch.kv),
                d(batch.block_tables),
                d(batch.seq_lens),
                d(query),
                d(heads),
                d(relevance),
                d(template_mask),
                d(top_p),
                d(top_k),
                d(strength),
                d(decay),
                d(at::full({2, 2, width}, kNaN)),
                d(at::full({2, width}, kNaN)),
                d(at::ones({2, width}, at::kBool)),
                d(at::full({2, 2}, kNaN)),
                d(at::full({2, 8, 128}, kNaN).to(at::kBFloat16))};
  };
  const Step cpu = make(false);
  cpu.Run(scale);
  const Step gpu = make(true);
  const at::Tensor initial_relevance = gpu.rel.clone();
  gpu.Run(scale);  // warm-up outside the capture
  at::cuda::CUDAGraph graph;
  {
    const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    gpu.Run(scale);
    graph.capture_end();
  }
  gpu.rel.copy_(initial_relevance);
  gpu.probs.fill_(kNaN);
  gpu.out.fill_(kNaN);
  gpu.selected.fill_(true);
  graph.replay();
  c10::cuda::device_synchronize();
  EXPECT_TRUE(Close(gpu.probs, cpu.probs, 1e-6, 1e-5, "graph probs"));
  EXPECT_TRUE(Close(gpu.rel, cpu.rel, 1e-9, 1e-5, "graph relevance"));
  EXPECT_TRUE(Same(gpu.selected, cpu.selected, "graph selected"));
  EXPECT_TRUE(Close(gpu.out, cpu.out, 1e-2, 1e-2, "graph decode BFloat16"));
}

TEST(CudaOps, DecodeStepOpsCaptureInACudaGraph) {
  SKIP_WITHOUT_GPU();
  CheckDecodeStepGraph();
}

// The same with the many-blocks selection (its scratch allocated inside the capture, its passes
// replayed from the captured state), a launch per pass and fused.
TEST(CudaOps, DecodeStepOpsWithManyBlockSelectionCaptureInACudaGraph) {
  SKIP_WITHOUT_GPU();
  for (const char* mode : {"multi", "fused"}) {
    SCOPED_TRACE(mode);
    ScopedEnv multi("DYSCO_CUDA_SELECT", mode);
    CheckDecodeStepGraph();
  }
}

// ---- timings (printed, not asserted): one layer of a Qwen3-8B-shaped decode step at 128K keys,
// bf16, batch 1, by CUDA events over repeated calls. "[timing]" lines are collected by
// scripts/gpu-check.sh. The floor is the cache bytes the op must read over the copy bandwidth
// measured here (a device-to-device copy).

template <typename Fn>
double MillisecondsPerCall(Fn&& fn, int iterations, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start;
  cudaEvent_t stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < iterations; ++i) fn();
  C10_CUDA_CHECK(cudaEventRecord(stop, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return ms / iterations;
}

// The device's copy bandwidth in bytes/s (read + write) over a 1 GiB device-to-device copy: the
// floors of the timing cases are bytes over it.
double CopyBandwidth() {
  const at::Tensor src =
      at::empty({1LL << 30}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  at::Tensor dst = at::empty_like(src);
  const double ms = MillisecondsPerCall([&] { dst.copy_(src); }, 10);
  return 2.0 * static_cast<double>(src.numel()) / (ms * 1e-3);
}

TEST(CudaTiming, OneLayerOfA128KDecodeStep) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(14);
  const int64_t keys = 131072;
  const int64_t page_size = 16;
  const int64_t pages = keys / page_size;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCUDA);
  const at::Tensor kv = at::randn({2, pages, page_size, 8, 128}, bf16);
  const at::Tensor tables = at::randperm(pages, i64).to(at::kInt).reshape({1, pages});
  const at::Tensor lens = at::full({1}, keys, i64);
  const at::Tensor query = at::randn({1, 32, 128}, bf16);
  at::Tensor out = at::empty({1, 32, 128}, bf16);
  const at::Tensor heads = at::tensor(std::vector<int64_t>{0, 9, 18, 27}, at::kLong).to(at::kCUDA);
  at::Tensor probs = at::empty({1, 4, keys}, f32);
  at::Tensor relevance = at::rand({1, keys}, f32);
  relevance /= relevance.sum();
  const at::Tensor decay = at::full({1}, 0.5, f32);
  at::Tensor bias = at::empty({1, keys}, f32);
  at::Tensor selected =
      at::empty({1, keys}, at::TensorOptions().dtype(at::kBool).device(at::kCUDA));
  at::Tensor stats = at::empty({1, 2}, f32);
  const at::Tensor tmpl =
      at::zeros({1, keys}, at::TensorOptions().dtype(at::kBool).device(at::kCUDA));
  const at::Tensor top_p = at::full({1}, 0.9, f32);
  const at::Tensor top_k = at::full({1}, 4096, i64);
  const at::Tensor strength = at::full({1}, 2.0, f32);
  const double scale = 1.0 / std::sqrt(128.0);

  const double bandwidth = CopyBandwidth();
  const double cache_bytes = static_cast<double>(kv.numel()) * 2.0;
  const double floor_ms = cache_bytes / bandwidth * 1e3;

  const double decode_ms = MillisecondsPerCall(
      [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); }, 20);
  double vector_ms = 0.0;
  {
    ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", "vector");
    vector_ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); },
        20);
  }
  double scalar_ms = 0.0;
  {
    ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", "scalar");
    scalar_ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); },
        20);
  }
  // Tuning evidence (printed, not asserted): the split count in waves of resident blocks, and a
  // page table in order instead of shuffled.
  for (const char* waves : {"2", "4"}) {
    const ScopedEnv split_waves("DYSCO_CUDA_SPLIT_WAVES", waves);
    const double ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); },
        20);
    std::printf("[timing] paged_attention_decode, splits of %s waves: %.3f ms (%.2fx floor)\n",
                waves, ms, ms / floor_ms);
  }
  {
    const at::Tensor in_order = at::arange(pages, i64).to(at::kInt).reshape({1, pages});
    const double ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, in_order, lens, scale, c10::nullopt); },
        20);
    std::printf("[timing] paged_attention_decode, pages in order: %.3f ms (%.2fx floor)\n", ms,
                ms / floor_ms);
  }
  {
    const ScopedEnv merge("DYSCO_CUDA_SPLIT_MERGE", "kernel");
    const double ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); },
        20);
    std::printf(
        "[timing] paged_attention_decode, splits merged by a separate kernel: %.3f ms (%.2fx "
        "floor; merged in the split kernel: %.3f ms)\n",
        ms, ms / floor_ms, decode_ms);
  }
  // The tensor-core kernel's pipelines (plain and with a bias): the query rows as M, the register
  // prefetch, the swapped operands (the default) and those with the prefetch.
  for (const char* pipeline : {"rows", "registers", "swap", "swap-prefetch"}) {
    ScopedEnv scoped("DYSCO_CUDA_MMA_PREFETCH", MmaPrefetchValue(pipeline));
    const double ms = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt); },
        20);
    const double biased = MillisecondsPerCall(
        [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, bias); }, 20);
    std::printf(
        "[timing] paged_attention_decode, mma pipeline %s: %.3f ms (%.2fx floor), with key_bias "
        "%.3f ms (%.2fx)\n",
        pipeline, ms, ms / floor_ms, biased, biased / floor_ms);
  }
  {
    // The same bytes with one KV head (Hq 4, 8x the keys): a head's K rows of a page back to back
    // instead of 2 KB apart, what a [page, head, slot, dim] layout would give.
    const int64_t keys1 = keys * 8;
    const at::Tensor kv1 = at::randn({2, keys1 / page_size, page_size, 1, 128}, bf16);
    const at::Tensor tables1 =
        at::randperm(keys1 / page_size, i64).to(at::kInt).reshape({1, keys1 / page_size});
    const at::Tensor lens1 = at::full({1}, keys1, i64);
    const at::Tensor query1 = at::randn({1, 4, 128}, bf16);
    at::Tensor out1 = at::empty({1, 4, 128}, bf16);
    const double ms = MillisecondsPerCall(
        [&] {
          ops::paged_attention_decode(out1, query1, kv1, tables1, lens1, scale, c10::nullopt);
        },
        20);
    std::printf(
        "[timing] paged_attention_decode, same bytes as one KV head of 1M keys: %.3f ms (%.2fx "
        "floor)\n",
        ms, ms / floor_ms);
  }
  const double biased_ms = MillisecondsPerCall(
      [&] { ops::paged_attention_decode(out, query, kv, tables, lens, scale, bias); }, 20);
  const double probs_ms = MillisecondsPerCall(
      [&] { ops::attention_probs(probs, query, kv, tables, lens, heads, scale, c10::nullopt); },
      20);
  double scalar_probs_ms = 0.0;
  {
    ScopedEnv force("DYSCO_CUDA_ATTENTION_KERNEL", "scalar");
    scalar_probs_ms = MillisecondsPerCall(
        [&] { ops::attention_probs(probs, query, kv, tables, lens, heads, scale, c10::nullopt); },
        20);
  }
  const double relevance_ms =
      MillisecondsPerCall([&] { ops::dysco_relevance_update(relevance, probs, lens, decay); }, 20);
  const double select_ms = MillisecondsPerCall(
      [&] {
        ops::dysco_select_bias(bias, selected, stats, relevance, lens, tmpl, top_p, top_k,
                               strength);
      },
      20);
  std::printf(
      "[timing] copy bandwidth %.0f GB/s; KV of one layer at 128K keys %.0f MiB, floor %.3f ms\n",
      bandwidth / 1e9, cache_bytes / (1 << 20), floor_ms);
  std::printf(
      "[timing] paged_attention_decode 128K bf16 Hq=32 Hkv=8 D=128: %.3f ms (%.2fx floor)\n",
      decode_ms, decode_ms / floor_ms);
  std::printf("[timing] paged_attention_decode, vectorised kernel: %.3f ms (%.2fx floor)\n",
              vector_ms, vector_ms / floor_ms);
  std::printf("[timing] paged_attention_decode, scalar kernel: %.3f ms (%.2fx floor)\n", scalar_ms,
              scalar_ms / floor_ms);
  std::printf("[timing] paged_attention_decode with key_bias: %.3f ms (%.2fx floor)\n", biased_ms,
              biased_ms / floor_ms);
  std::printf("[timing] attention_probs 4 heads 128K: %.3f ms (K half floor %.3f ms)\n", probs_ms,
              floor_ms / 2);
  std::printf("[timing] attention_probs 4 heads 128K, scalar kernel: %.3f ms\n", scalar_probs_ms);
  std::printf("[timing] dysco_relevance_update 128K: %.3f ms\n", relevance_ms);
  double single_select_ms = 0.0, fused_select_ms = 0.0;
  for (const char* mode : {"single", "fused"}) {
    ScopedEnv knob("DYSCO_CUDA_SELECT", mode);
    (std::strcmp(mode, "single") == 0 ? single_select_ms : fused_select_ms) = MillisecondsPerCall(
        [&] {
          ops::dysco_select_bias(bias, selected, stats, relevance, lens, tmpl, top_p, top_k,
                                 strength);
        },
        20);
  }
  std::printf(
      "[timing] dysco_select_bias 128K top_p=0.9 top_k=4096: %.3f ms (the passes in one launch: "
      "%.3f ms; one block per row: %.3f ms)\n",
      select_ms, fused_select_ms, single_select_ms);
  EXPECT_GT(decode_ms, 0.0);
}

// dysco_select_bias alone at a DySCO step's widths (one row; the reference's top_p 0.9 and top_k
// 4096; relevance rand^4 normalised, as the set tests'): the default, one block (DYSCO_CUDA_SELECT=
// single), many blocks a launch a pass (=multi) and in one cooperative launch (=fused), the last
// two also with 1024 and 512 keys a block (DYSCO_CUDA_SELECT_KEYS_PER_BLOCK). Printed, not asserted
// (docs/gpu.md "The DySCO selection's passes"); each mode's sets are checked against the default's.
TEST(CudaTiming, DyscoSelectionAtDecodeWidths) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(15);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (const int64_t width : {int64_t{8192}, int64_t{32768}, int64_t{49152}, int64_t{131072}}) {
    const at::Tensor relevance = Cuda(RelevanceRows({width}, width, false));
    const at::Tensor lens = Cuda(at::tensor({width}, at::kLong));
    const at::Tensor tmpl = Cuda(at::rand({1, width}) < 0.01);
    const at::Tensor top_p = at::full({1}, 0.9f, cuda);
    const at::Tensor top_k = at::full({1}, int64_t{4096}, cuda.dtype(at::kLong));
    const at::Tensor strength = at::full({1}, 2.0f, cuda);
    at::Tensor default_selected;
    std::ostringstream line;
    line << "[timing] dysco_select_bias " << width << " keys, top_p=0.9 top_k=4096:";
    for (const char* mode :
         {"default", "single", "multi", "multi/1024", "fused", "fused/1024", "fused/512"}) {
      const std::string name(mode);
      const std::string knob = name.substr(0, name.find('/'));
      const std::string keys =
          name.find('/') == std::string::npos ? std::string() : name.substr(name.find('/') + 1);
      ScopedEnv select("DYSCO_CUDA_SELECT", knob == "default" ? nullptr : knob.c_str());
      ScopedEnv per_block("DYSCO_CUDA_SELECT_KEYS_PER_BLOCK",
                          keys.empty() ? nullptr : keys.c_str());
      at::Tensor bias = at::full({1, width}, kNaN, cuda);
      at::Tensor selected = at::ones({1, width}, cuda.dtype(at::kBool));
      at::Tensor stats = at::full({1, 2}, kNaN, cuda);
      const double ms = MillisecondsPerCall(
          [&] {
            ops::dysco_select_bias(bias, selected, stats, relevance, lens, tmpl, top_p, top_k,
                                   strength);
          },
          20);
      if (default_selected.defined()) {
        EXPECT_TRUE(Same(selected.cpu(), default_selected, std::string("selected ") + mode));
      } else {
        default_selected = selected.cpu();
      }
      line << " " << mode << " " << std::fixed << std::setprecision(4) << ms << " ms;";
    }
    std::printf("%s\n", line.str().c_str());
  }
}

// Milliseconds a call of paged_attention_decode (no bias) in a CUDA graph of `calls` calls, so
// that the time per call is the kernel and the gap to the next, not the host's launches; `out`
// holds the last call's output (NaN first).
double DecodeAttentionGraphMs(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv,
                              const at::Tensor& tables, const at::Tensor& lens, double scale,
                              int calls) {
  at::cuda::CUDAGraph graph;
  out.fill_(kNaN);
  CaptureAfterWarmUp(graph, [&] {
    for (int i = 0; i < calls; ++i) {
      ops::paged_attention_decode(out, query, kv, tables, lens, scale, c10::nullopt);
    }
  });
  const double ms = MillisecondsPerCall([&] { graph.replay(); }, 20) / calls;
  c10::cuda::device_synchronize();
  return ms;
}

// One decode row of `keys` keys with Qwen3-8B's attention heads (32 query, 8 KV, head_dim 128,
// bf16) over shuffled pages of 16 keys, for the decode-attention timing tests: the cache, the
// row's own block table, its length, its query, an output and the floor of reading its KV once at
// `bandwidth` bytes a second.
struct Qwen3DecodeRow {
  static constexpr int64_t kPageSize = 16;
  at::Tensor kv, table, lens, query, out;
  double floor_ms = 0.0;
};
Qwen3DecodeRow MakeQwen3DecodeRow(int64_t keys, double bandwidth) {
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCUDA);
  const int64_t pages = keys / Qwen3DecodeRow::kPageSize;
  Qwen3DecodeRow row;
  row.kv = at::randn({2, pages, Qwen3DecodeRow::kPageSize, 8, 128}, bf16);
  row.table = at::randperm(pages, i64).to(at::kInt).reshape({1, pages});
  row.lens = at::full({1}, keys, i64);
  row.query = at::randn({1, 32, 128}, bf16);
  row.out = at::empty({1, 32, 128}, bf16);
  row.floor_ms = static_cast<double>(row.kv.numel()) * 2.0 / bandwidth * 1e3;
  return row;
}

// The decode attention alone at the short contexts, where a plain step is furthest from its floor
// (docs/gpu.md "What remains of issue 9"): Qwen3-8B's heads (32 query, 8 KV, head_dim 128, bf16),
// shuffled pages, a CUDA graph of kCalls calls (so the time per call is the kernel and the gap to
// the next, not the host's launches), against the KV bytes' floor, with the split settings that
// decide how long each block's chain of tiles is: DYSCO_CUDA_MIN_KEYS_PER_SPLIT and
// DYSCO_CUDA_SPLIT_WAVES, with and without the register prefetch (DYSCO_CUDA_MMA_PREFETCH). Tuning
// evidence, printed, not asserted; each setting's output is checked against the default's within
// bf16 rounding (a split setting changes the sums' order).
TEST(CudaTiming, DecodeAttentionAtShortContexts) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(61);
  constexpr int kCalls = 16;
  const double bandwidth = CopyBandwidth();
  const double scale = 1.0 / std::sqrt(128.0);
  for (const int64_t keys : {int64_t{8192}, int64_t{32768}}) {
    Qwen3DecodeRow row = MakeQwen3DecodeRow(keys, bandwidth);
    at::Tensor& out = row.out;
    const double floor_ms = row.floor_ms;
    at::Tensor expected;
    struct Setting {
      const char* label;
      const char* min_keys;  // DYSCO_CUDA_MIN_KEYS_PER_SPLIT, nullptr: unset
      const char* waves;     // DYSCO_CUDA_SPLIT_WAVES, nullptr: unset
      const char* prefetch;  // DYSCO_CUDA_MMA_PREFETCH, nullptr: unset
    };
    // One wave of resident blocks caps the splits first at these contexts (8 KV heads: ~49 splits
    // of ~170 keys at 8K with the swapped operands' three blocks a multiprocessor, ~33 of ~256
    // with the query rows as M), so a shorter split needs more waves too. The register prefetch
    // keeps two tiles of a warp in flight, which a short chain of tiles may need more than a long
    // one.
    for (const Setting& s :
         {Setting{"default (swapped operands)", nullptr, nullptr, nullptr},
          Setting{"swapped operands, register prefetch", nullptr, nullptr, "swap-prefetch"},
          Setting{"min keys 128", "128", nullptr, nullptr},
          Setting{"2 waves, min keys 128", "128", "2", nullptr},
          Setting{"4 waves, min keys 64", "64", "4", nullptr},
          Setting{"min keys 512", "512", nullptr, nullptr},
          Setting{"query rows as M", nullptr, nullptr, "0"},
          Setting{"query rows as M, register prefetch", nullptr, nullptr, "1"},
          Setting{"query rows as M, 2 waves, min keys 128", "128", "2", "0"},
          Setting{"query rows as M, min keys 512", "512", nullptr, "0"}}) {
      const ScopedEnv min_keys("DYSCO_CUDA_MIN_KEYS_PER_SPLIT", s.min_keys);
      const ScopedEnv waves("DYSCO_CUDA_SPLIT_WAVES", s.waves);
      const ScopedEnv prefetch("DYSCO_CUDA_MMA_PREFETCH", s.prefetch);
      const double ms =
          DecodeAttentionGraphMs(out, row.query, row.kv, row.table, row.lens, scale, kCalls);
      if (expected.defined()) {
        // Outputs are means of ~N(0, 1) values over thousands of keys (~1e-2): a bf16 step or
        // two apart where only the split order differs; a wrong split would be ~1e-2 off.
        EXPECT_TRUE(at::allclose(out.to(at::kFloat), expected, /*rtol=*/1e-2, /*atol=*/1e-3))
            << keys << " keys, " << s.label;
      } else {
        expected = out.to(at::kFloat);
        ASSERT_FALSE(at::isnan(expected).any().item<bool>()) << keys << " keys";
      }
      std::printf(
          "[timing] decode attention at %lldK keys (Hq=32 Hkv=8 D=128 bf16, a graph of %d "
          "calls), %s: %.4f ms a call (%.2fx floor %.4f ms)\n",
          static_cast<long long>(keys / 1024), kCalls, s.label, ms, ms / floor_ms, floor_ms);
    }
  }
}

// Decode attention of one row of 16 keys past a power of two (8K + 16, 32K + 16, 128K + 16) in a
// table padded to the next power of two of pages, as a CUDA graph's bucket pads it (Qwen3-8B's
// heads, bf16, a graph of calls): the splits cut from the row's own length (the default) against
// cut from the table's width (DYSCO_CUDA_SPLIT_FROM_WIDTH=1, which left half the splits empty),
// and the same row in a table of its own width, each against the KV bytes' floor. Printed, not
// asserted (docs/gpu.md "Splits from the row's own length").
TEST(CudaTiming, DecodeAttentionInAPaddedTable) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(62);
  constexpr int kCalls = 16;
  const double bandwidth = CopyBandwidth();
  const double scale = 1.0 / std::sqrt(128.0);
  for (const int64_t power : {int64_t{8192}, int64_t{32768}, int64_t{131072}}) {
    const int64_t keys = power + 16;
    Qwen3DecodeRow row = MakeQwen3DecodeRow(keys, bandwidth);
    const at::Tensor& own = row.table;
    const int64_t pages = own.size(1);
    const at::Tensor padded = at::cat(
        {own, at::zeros({1, 2 * power / Qwen3DecodeRow::kPageSize - pages}, own.options())}, 1);
    const double floor_ms = row.floor_ms;
    double ms[3];
    at::Tensor results[3];
    for (int i = 0; i < 3; ++i) {
      const ScopedEnv from_width("DYSCO_CUDA_SPLIT_FROM_WIDTH", i == 1 ? "1" : nullptr);
      const at::Tensor& tables = i == 2 ? own : padded;
      ms[i] = DecodeAttentionGraphMs(row.out, row.query, row.kv, tables, row.lens, scale, kCalls);
      results[i] = row.out.to(at::kFloat);
      ASSERT_FALSE(at::isnan(results[i]).any().item<bool>()) << keys << " keys, setting " << i;
    }
    EXPECT_TRUE(at::allclose(results[1], results[0], /*rtol=*/1e-2, /*atol=*/1e-3)) << keys;
    EXPECT_TRUE(at::allclose(results[2], results[0], /*rtol=*/1e-2, /*atol=*/1e-3)) << keys;
    std::printf(
        "[timing] decode attention at %lld keys in a table of %lld (Hq=32 Hkv=8 D=128 bf16, a "
        "graph of %d calls): splits from the row's length %.4f ms (%.2fx floor %.4f ms), from the "
        "table's width %.4f ms (%.2fx), in a table of its own width %.4f ms (%.2fx)\n",
        static_cast<long long>(keys), static_cast<long long>(2 * power), kCalls, ms[0],
        ms[0] / floor_ms, floor_ms, ms[1], ms[1] / floor_ms, ms[2], ms[2] / floor_ms);
  }
}

// The weight GEMVs of a Qwen3-8B decode step (bf16; 1 and 2 rows): the GEMV kernel against cuBLAS
// (DYSCO_CUDA_LINEAR=cublas), each as bytes of the weight over the copy bandwidth measured here.
// Printed, not asserted (tuning evidence for docs/gpu.md "Linear layers").
TEST(CudaTiming, LinearLayersOfADecodeStep) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(19);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const double bandwidth = CopyBandwidth();
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  for (const Shape& shape :
       {Shape{"q", 4096, 4096}, Shape{"k", 1024, 4096}, Shape{"qkv", 6144, 4096},
        Shape{"o", 4096, 4096}, Shape{"gate_up", 24576, 4096}, Shape{"down", 4096, 12288},
        Shape{"lm_head", 151936, 4096}}) {
    // Two weights used in turn: the second call of a pair does not find the first's bytes in L2
    // (50 MB) unless the weight is smaller than it.
    const at::Tensor w0 = at::randn({shape.n, shape.k}, bf16) / 16;
    const at::Tensor w1 = at::randn({shape.n, shape.k}, bf16) / 16;
    const double floor_ms = 2.0 * shape.n * shape.k / bandwidth * 1e3;
    for (const int64_t m : {1, 2}) {
      const at::Tensor x = at::randn({m, shape.k}, bf16);
      at::Tensor out = at::empty({m, shape.n}, bf16);
      bool flip = false;
      auto call = [&] {
        ops::linear(out, x, flip ? w1 : w0);
        flip = !flip;
      };
      const double gemv_ms = MillisecondsPerCall(call, 40);
      double cublas_ms = 0.0, one_warp_ms = 0.0, two_warps_ms = 0.0;
      {
        ScopedEnv force_cublas("DYSCO_CUDA_LINEAR", "cublas");
        cublas_ms = MillisecondsPerCall(call, 40);
      }
      {
        ScopedEnv splits("DYSCO_CUDA_GEMV_SPLITS", "1");
        ScopedEnv registers("DYSCO_CUDA_GEMV_ASYNC", "0");
        one_warp_ms = MillisecondsPerCall(call, 40);
      }
      {
        ScopedEnv splits("DYSCO_CUDA_GEMV_SPLITS", "2");
        two_warps_ms = MillisecondsPerCall(call, 40);
      }
      double async_ms = 0.0;
      {
        ScopedEnv knob("DYSCO_CUDA_GEMV_ASYNC", "1");  // one row only: the others are unchanged
        async_ms = MillisecondsPerCall(call, 40);
      }

      std::printf(
          "[timing] linear %-7s N=%6lld K=%5lld M=%lld: gemv %.4f ms (%.2fx floor; one warp a row "
          "pair %.2fx, two %.2fx, async copies %.2fx), cublas %.4f ms (%.2fx floor), floor %.4f "
          "ms\n",
          shape.name, static_cast<long long>(shape.n), static_cast<long long>(shape.k),
          static_cast<long long>(m), gemv_ms, gemv_ms / floor_ms, one_warp_ms / floor_ms,
          two_warps_ms / floor_ms, async_ms / floor_ms, cublas_ms, cublas_ms / floor_ms, floor_ms);
    }
  }
}

// Decode layers of the Qwen3-8B shape at 8K keys as a step runs them (add_rms_norm_linear into the
// q/k/v GEMV, paged attention with its split merge, the o GEMV, add_rms_norm_swiglu over the
// gate/up weight, the down GEMV; the q/k norms, ropes and KV write left out), four layers of
// distinct weights (1.5 GB, so that L2 holds none of them), captured into a CUDA graph with the
// GEMVs launched to start early (the default: linear.cu), with the norms and SwiGLU too
// (DYSCO_CUDA_PDL=all) and with none; as before the norms moved into the GEMVs, with add_rms_norm
// then linear (DYSCO_CUDA_NORM_LINEAR=separate). Every graph's output must equal
// the eager chain's of its setting bit for bit (a kernel that read its input before the kernel
// ahead had written it would differ); each replay is timed against the floor: the weights' and the
// KV cache's bytes over the copy bandwidth of the same run.
TEST(CudaTiming, DecodeLayersWithGemvsStartingEarly) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(23);
  const int64_t hidden = 4096, inter = 12288, hq = 32, hkv = 8, d = 128, layers = 4;
  const int64_t keys = 8192, page_size = 16, pages = keys / page_size;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCUDA);
  struct Layer {
    at::Tensor norm1, qkv, o, norm2, gate_up, down, kv, q_norm, k_norm;
  };
  std::vector<Layer> w;
  for (int64_t l = 0; l < layers; ++l) {
    w.push_back(
        Layer{at::rand({hidden}, bf16) + 0.5, at::randn({(hq + 2 * hkv) * d, hidden}, bf16) / 64,
              at::randn({hidden, hq * d}, bf16) / 64, at::rand({hidden}, bf16) + 0.5,
              at::randn({2 * inter, hidden}, bf16) / 64, at::randn({hidden, inter}, bf16) / 64,
              at::randn({2, pages, page_size, hkv, d}, bf16), at::rand({d}, bf16) + 0.5,
              at::rand({d}, bf16) + 0.5});
  }
  const at::Tensor tables = at::randperm(pages, i64).to(at::kInt).reshape({1, pages});
  const at::Tensor lens = at::full({1}, keys, i64);
  const at::Tensor newest_slot =
      (tables.select(1, pages - 1).to(at::kLong) * page_size + (page_size - 1)).contiguous();
  const at::Tensor angle = at::rand({1, d}, bf16) * 6.3;
  const at::Tensor cos = angle.cos(), sin = angle.sin();
  at::Tensor query = at::empty({1, hq, d}, bf16);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor input = at::randn({1, hidden}, bf16);
  const at::Tensor residual0 = at::randn({1, hidden}, bf16);
  at::Tensor hidden_state = at::empty({1, hidden}, bf16), residual = at::empty({1, hidden}, bf16);
  at::Tensor sum = at::empty({1, hidden}, bf16);
  at::Tensor qkv = at::empty({1, (hq + 2 * hkv) * d}, bf16), attn = at::empty({1, hq, d}, bf16);
  at::Tensor o = at::empty({1, hidden}, bf16);
  auto chain = [&] {
    hidden_state.copy_(input);
    residual.copy_(residual0);
    for (const Layer& l : w) {
      ops::add_rms_norm_linear(qkv, sum, hidden_state, residual, l.norm1, 1e-6, l.qkv);
      // The q/k norms, ropes and the newest key's K/V write, then the attention, as in the model
      // (one op: the tensor-core kernel does both unless DYSCO_CUDA_QKV_ATTENTION=0).
      ops::qk_norm_rope_attention_decode(attn, query, l.kv, qkv, cos, sin, newest_slot,
                                         Bias(l.q_norm), Bias(l.k_norm), 1e-6, tables, lens, scale,
                                         c10::nullopt);
      // down_proj's output is the next layer's input, as in the model (no copy kernel between
      // them, which would keep the next q/k/v GEMV from starting early).
      ops::o_proj_mlp(hidden_state, residual, attn.reshape({1, hq * d}), sum, l.o, l.norm2, 1e-6,
                      l.gate_up, l.down);
    }
  };
  auto capture = [&](at::cuda::CUDAGraph& graph) { CaptureAfterWarmUp(graph, chain); };
  // The default (the GEMVs start early, the norms in the GEMVs, the warps a GEMV row pair picked
  // per N) first, then the other settings of DYSCO_CUDA_PDL, DYSCO_CUDA_NORM_LINEAR and
  // DYSCO_CUDA_GEMV_SPLITS (linear.cu). Each graph is compared with the eager chain of its norm and
  // split settings under plain launches.
  struct Variant {
    const char* label;
    const char* pdl;                      // DYSCO_CUDA_PDL, nullptr: unset
    const char* norm_linear;              // DYSCO_CUDA_NORM_LINEAR, nullptr: unset
    const char* splits;                   // DYSCO_CUDA_GEMV_SPLITS, nullptr: unset
    const char* async = nullptr;          // DYSCO_CUDA_GEMV_ASYNC, nullptr: unset
    const char* mlp = nullptr;            // DYSCO_CUDA_MLP, nullptr: unset
    const char* attention_pdl = nullptr;  // DYSCO_CUDA_ATTENTION_PDL, nullptr: unset
    const char* qk_pdl = nullptr;         // DYSCO_CUDA_QK_PDL, nullptr: unset
    const char* ring_splits = nullptr;    // DYSCO_CUDA_GEMV_RING_SPLITS, nullptr: unset
    const char* qkv_attention = nullptr;  // DYSCO_CUDA_QKV_ATTENTION, nullptr: unset
  };
  const std::vector<Variant> variants = {
      {"GEMVs start early, norms in the GEMVs (default)", nullptr, nullptr, nullptr},
      {"GEMVs start early, norms in the GEMVs, one warp a GEMV row pair", nullptr, nullptr, "1",
       "0"},
      {"GEMVs start early, norms in the GEMVs, two warps a GEMV row pair", nullptr, nullptr, "2",
       "0"},
      {"GEMVs start early, norms in the GEMVs, no asynchronous copies", nullptr, nullptr, nullptr,
       "0"},
      {"GEMVs start early, norms in the GEMVs, asynchronous copies for every GEMV", nullptr,
       nullptr, nullptr, "1"},
      {"GEMVs start early, norms in the GEMVs, o_proj to down_proj as one persistent kernel",
       nullptr, nullptr, nullptr, nullptr, "persistent"},
      {"GEMVs start early, norms in the GEMVs, the attention started early", nullptr, nullptr,
       nullptr, nullptr, nullptr, "1"},
      {"GEMVs start early, norms in the GEMVs, o_proj and down_proj through rings", nullptr,
       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, "1"},
      {"GEMVs start early, norms in the GEMVs, q/k norms, rope and KV write in their own kernel",
       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, "0"},
      {"GEMVs start early, norms in the GEMVs, q/k norm + rope in their own kernel, started early",
       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, "1", nullptr, "0"},
      {"GEMVs start early, add_rms_norm kernels", nullptr, "separate", nullptr},
      {"GEMVs, norms and SwiGLU start early, add_rms_norm kernels", "all", "separate", nullptr},
      {"plain launches, norms in the GEMVs", "0", nullptr, nullptr},
      {"plain launches, add_rms_norm kernels", "0", "separate", nullptr},
  };
  std::vector<std::unique_ptr<at::cuda::CUDAGraph>> graphs;
  at::Tensor expected_fused, expected_separate;  // the defaults' eager outputs
  for (const Variant& v : variants) {
    const ScopedEnv norm_linear("DYSCO_CUDA_NORM_LINEAR", v.norm_linear);
    const ScopedEnv splits("DYSCO_CUDA_GEMV_SPLITS", v.splits);
    const ScopedEnv async("DYSCO_CUDA_GEMV_ASYNC", v.async);
    const ScopedEnv mlp("DYSCO_CUDA_MLP", v.mlp);
    const ScopedEnv attention_pdl("DYSCO_CUDA_ATTENTION_PDL", v.attention_pdl);
    const ScopedEnv qk_pdl("DYSCO_CUDA_QK_PDL", v.qk_pdl);
    const ScopedEnv ring_splits("DYSCO_CUDA_GEMV_RING_SPLITS", v.ring_splits);
    const ScopedEnv qkv_attention("DYSCO_CUDA_QKV_ATTENTION", v.qkv_attention);
    at::Tensor expected;
    {
      const ScopedEnv plain("DYSCO_CUDA_PDL", "0");
      chain();
      expected = hidden_state.clone();
      c10::cuda::device_synchronize();
    }
    const bool separate = v.norm_linear != nullptr && std::string(v.norm_linear) == "separate";
    if (v.splits == nullptr && v.async == nullptr && v.mlp == nullptr &&
        v.attention_pdl == nullptr && v.qk_pdl == nullptr && v.ring_splits == nullptr &&
        v.qkv_attention == nullptr) {
      (separate ? expected_separate : expected_fused) = expected;
    }
    if (v.splits == nullptr &&
        ((v.async != nullptr && std::string(v.async) == "0") || v.mlp != nullptr ||
         v.attention_pdl != nullptr || v.qk_pdl != nullptr || v.ring_splits != nullptr ||
         v.qkv_attention != nullptr)) {
      // The asynchronous copies, the MLP kernel and the launches change no sum: the default's
      // bits.
      EXPECT_TRUE(at::equal(expected, expected_fused)) << v.label;
    }
    const ScopedEnv pdl("DYSCO_CUDA_PDL", v.pdl);
    graphs.push_back(std::make_unique<at::cuda::CUDAGraph>());
    capture(*graphs.back());
    hidden_state.fill_(kNaN);
    graphs.back()->replay();
    c10::cuda::device_synchronize();
    EXPECT_TRUE(at::equal(hidden_state, expected)) << v.label;
  }
  // How far four layers of fused norms drift from the separate ones (bf16; the ops themselves
  // are compared in CudaAddRmsNormLinear.EqualsCpuAndTheFormula).
  std::printf(
      "[timing] decode layers, norms in the GEMVs vs add_rms_norm kernels: max |diff| %.3g "
      "of max |out| %.3g\n",
      (expected_fused.to(at::kFloat) - expected_separate.to(at::kFloat)).abs().max().item<float>(),
      expected_separate.to(at::kFloat).abs().max().item<float>());
  const double bandwidth = CopyBandwidth();
  const double layer_bytes = 2.0 * (w[0].qkv.numel() + w[0].o.numel() + w[0].gate_up.numel() +
                                    w[0].down.numel() + w[0].kv.numel());
  const double floor_ms = layer_bytes / bandwidth * 1e3;
  // Twice over the variants, so that a drift of the clocks shows as a difference between rounds.
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < variants.size(); ++i) {
      const double ms = MillisecondsPerCall([&] { graphs[i]->replay(); }, 50) / layers;
      std::printf(
          "[timing] decode layer at 8K keys (Qwen3-8B weights, a graph of %lld layers), %s: %.4f "
          "ms "
          "(%.3fx floor %.4f ms)\n",
          static_cast<long long>(layers), variants[i].label, ms, ms / floor_ms, floor_ms);
    }
  }

  // What the layer's kernel boundaries cost (default settings): its four GEMVs alone, each reading
  // the output of the one before, against one GEMV over the same weight bytes (the four weights
  // as the rows of one), both in graphs of the four layers.
  std::vector<at::Tensor> whole;
  for (const Layer& l : w) {
    whole.push_back(at::cat({l.qkv, l.o, l.gate_up, l.down.reshape({inter, hidden})}, 0));
  }
  at::Tensor whole_out = at::empty({1, whole[0].size(0)}, bf16);
  at::Tensor gate_up = at::empty({1, 2 * inter}, bf16);
  auto four_gemvs = [&] {
    for (const Layer& l : w) {
      ops::linear(qkv, hidden_state, l.qkv);
      ops::linear(o, qkv.narrow(1, 0, hidden), l.o);
      ops::linear(gate_up, o, l.gate_up);
      ops::linear(hidden_state, gate_up.narrow(1, 0, inter), l.down);
    }
  };
  auto one_gemv = [&] {
    for (const at::Tensor& wl : whole) ops::linear(whole_out, hidden_state, wl);
  };
  const double weight_floor_ms = 2.0 * static_cast<double>(whole[0].numel()) / bandwidth * 1e3;
  for (const auto& [label, fn] :
       {std::pair<const char*, std::function<void()>>{"its four GEMVs alone, chained", four_gemvs},
        {"one GEMV of the same weight bytes", one_gemv}}) {
    hidden_state.copy_(input);
    c10::cuda::device_synchronize();
    at::cuda::CUDAGraph graph;
    {
      const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
      fn();
      graph.capture_begin();
      fn();
      graph.capture_end();
    }
    c10::cuda::device_synchronize();
    const double ms = MillisecondsPerCall([&] { graph.replay(); }, 50) / layers;
    std::printf(
        "[timing] decode layer's weights (Qwen3-8B, a graph of %lld layers), %s: %.4f ms (%.3fx "
        "floor %.4f ms)\n",
        static_cast<long long>(layers), label, ms, ms / weight_floor_ms, weight_floor_ms);
  }
}

// qk_norm_rope_kv_write of one 8192-token prefill chunk (Qwen3-8B heads with their norms, bf16),
// the warp's chain of loads (DYSCO_CUDA_QK_WRITE=chain) against each lane's loads first (the
// default), each against its bytes (qkv read, query and K/V written, cos/sin read) over the copy
// bandwidth: in a 128K prompt's last chunk the chain took 0.23 ms a layer, ~4.7x those bytes
// (docs/gpu.md "Loads first in qk_norm_rope_kv_write").
TEST(CudaTiming, QkNormRopeKvWriteOfAPrefillChunk) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(39);
  const int64_t t = 8192, h = 32, hkv = 8, d = 128;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const at::Tensor qkv = at::randn({t, (h + 2 * hkv) * d}, bf16);
  const at::Tensor angle = at::rand({t, d}, bf16.dtype(at::kFloat)) * 6.3;
  const at::Tensor cos = angle.cos().to(at::kBFloat16), sin = angle.sin().to(at::kBFloat16);
  const at::Tensor q_w = at::rand({d}, bf16) + 0.5, k_w = at::rand({d}, bf16) + 0.5;
  const int64_t pages = t / 16 + 1;
  at::Tensor kv = at::zeros({2, pages, 16, hkv, d}, bf16);
  const at::Tensor slots = Cuda(at::randperm(pages * 16, at::kLong).slice(0, 0, t).clone());
  at::Tensor query = at::empty({t, h, d}, bf16);
  const double bytes = 2.0 * static_cast<double>(t * (h + 2 * hkv) * d          // qkv
                                                 + t * h * d + 2 * t * hkv * d  // query, K/V
                                                 + 2 * t * d);                  // cos, sin
  const double floor_ms = bytes / CopyBandwidth() * 1e3;  // bytes read and written
  double ms[2];
  for (int registers = 0; registers < 2; ++registers) {
    const ScopedEnv knob("DYSCO_CUDA_QK_WRITE", registers ? nullptr : "chain");
    ms[registers] = MillisecondsPerCall(
        [&] {
          ops::qk_norm_rope_kv_write(query, kv, qkv, cos, sin, slots, Bias(q_w), Bias(k_w), 1e-6);
        },
        20);
  }
  std::printf(
      "[timing] qk_norm_rope_kv_write of an 8192-token chunk (Qwen3-8B heads, norms, bf16): "
      "a warp's chain (DYSCO_CUDA_QK_WRITE=chain) %.4f ms (%.2fx floor %.4f ms), loads first "
      "(default) %.4f ms (%.2fx)\n",
      ms[0], ms[0] / floor_ms, floor_ms, ms[1], ms[1] / floor_ms);
  EXPECT_GT(ms[0], 0.0);
  EXPECT_GT(ms[1], 0.0);
}

// One layer of a 128K-token prefill of the Qwen3-8B shape (Hq 32, Hkv 8, D 128, bf16, page size
// 16) in chunks of 8192 tokens, each chunk against all the keys before it, as the server's chunked
// prefill runs it. The floor is the attention's FLOPs (4 * D * Hq * the keys each query token sees:
// QK^T and PV, causal) at the bf16 matrix rate measured here with at::mm (8192^3). Measured: the op
// (flash path: gather + flash attention + copy out) over the whole prefill; flash attention alone
// over the same chunks on contiguous K/V (what the gather costs); and the last chunk (8192 tokens
// against 128K keys) on both paths, the split-KV kernel forced by an all-zero key_bias, whose
// outputs are also compared (bf16 1e-2).
TEST(CudaTiming, OneLayerOfA128KPrefillInChunks) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(16);
  const int64_t keys = 131072;
  const int64_t chunk = 8192;
  const int64_t chunks = keys / chunk;
  const int64_t page_size = 16;
  const int64_t pages = keys / page_size;
  const int64_t hq = 32;
  const int64_t hkv = 8;
  const int64_t d = 128;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCUDA);
  const at::Tensor kv = at::randn({2, pages, page_size, hkv, d}, bf16);
  const at::Tensor table = at::randperm(pages, i64).to(at::kInt).reshape({1, pages});
  const at::Tensor query = at::randn({keys, hq, d}, bf16);
  const at::Tensor out = at::empty({keys, hq, d}, bf16);
  const at::Tensor query_start_loc = at::tensor(std::vector<int64_t>{0, chunk}, at::kLong).cuda();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Chunk c: tokens [c * chunk, (c + 1) * chunk), a block table as wide as its context (as the
  // model runner builds it).
  std::vector<at::Tensor> tables;
  std::vector<at::Tensor> lens;
  double keys_seen = 0.0;  // sum over query tokens of the keys each sees
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t len = (c + 1) * chunk;
    tables.push_back(table.slice(1, 0, len / page_size).contiguous());
    lens.push_back(at::full({1}, len, i64));
    keys_seen += static_cast<double>(chunk) * static_cast<double>(c * chunk) +
                 static_cast<double>(chunk) * static_cast<double>(chunk + 1) / 2.0;
  }
  ASSERT_TRUE(dysco::kernels::paged_attention_prefill_cuda_uses_flash(query, kv, tables.back(),
                                                                      c10::nullopt));
  auto run_chunk = [&](int64_t c, const Bias& bias) {
    ops::paged_attention_prefill(out.slice(0, c * chunk, (c + 1) * chunk),
                                 query.slice(0, c * chunk, (c + 1) * chunk), kv, tables[c], lens[c],
                                 query_start_loc, scale, bias);
  };

  // The bf16 matrix rate.
  const int64_t n = 8192;
  const at::Tensor a = at::randn({n, n}, bf16);
  const at::Tensor b = at::randn({n, n}, bf16);
  at::Tensor product = at::empty({n, n}, bf16);
  const double mm_ms = MillisecondsPerCall([&] { at::mm_out(product, a, b); }, 10);
  const double mm_flops_per_s = 2.0 * n * n * n / (mm_ms * 1e-3);
  const double flops = 4.0 * d * hq * keys_seen;
  const double floor_ms = flops / mm_flops_per_s * 1e3;

  // The op over the whole prefill (flash path).
  const double prefill_ms = MillisecondsPerCall(
      [&] {
        for (int64_t c = 0; c < chunks; ++c) run_chunk(c, c10::nullopt);
      },
      2, 1);
  const int64_t cudnn_before = dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences();
  (void)MillisecondsPerCall([&] { run_chunk(chunks - 1, c10::nullopt); }, 1, 0);
  const bool cudnn = dysco::kernels::paged_attention_prefill_cuda_cudnn_sequences() > cudnn_before;
  // The same through flash attention (DYSCO_CUDA_PREFILL=flash2), outputs of the last chunk
  // compared.
  const at::Tensor cudnn_last = out.slice(0, (chunks - 1) * chunk, keys).clone();
  double flash_path_ms = 0.0;
  {
    const ScopedEnv flash2("DYSCO_CUDA_PREFILL", "flash2");
    flash_path_ms = MillisecondsPerCall(
        [&] {
          for (int64_t c = 0; c < chunks; ++c) run_chunk(c, c10::nullopt);
        },
        1, 1);
  }
  EXPECT_TRUE(Close(cudnn_last, out.slice(0, (chunks - 1) * chunk, keys).cpu(), 1e-2, 1e-2,
                    "prefill 128K last chunk cuDNN vs flash attention BFloat16"));
  // Flash attention alone over the same chunks, K/V already contiguous.
  const at::Tensor k_packed = at::randn({keys, hkv, d}, bf16);
  const at::Tensor v_packed = at::randn({keys, hkv, d}, bf16);
  std::vector<at::Tensor> cu_k;
  for (int64_t c = 0; c < chunks; ++c) {
    cu_k.push_back(
        at::tensor(std::vector<int32_t>{0, static_cast<int32_t>((c + 1) * chunk)}, at::kInt)
            .cuda());
  }
  const at::Tensor cu_q = query_start_loc.to(at::kInt);
  const double flash_ms = MillisecondsPerCall(
      [&] {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t len = (c + 1) * chunk;
          (void)at::_flash_attention_forward(query.slice(0, c * chunk, len),
                                             k_packed.slice(0, 0, len), v_packed.slice(0, 0, len),
                                             cu_q, cu_k[c], chunk, len, 0.0, true, false, scale);
        }
      },
      2, 1);

  // The last chunk on both paths; outputs compared.
  const int64_t last = chunks - 1;
  const Bias zero_bias =
      at::zeros({1, keys}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  ASSERT_FALSE(
      dysco::kernels::paged_attention_prefill_cuda_uses_flash(query, kv, tables.back(), zero_bias));
  const double last_flash_ms = MillisecondsPerCall([&] { run_chunk(last, c10::nullopt); }, 3, 1);
  const at::Tensor flash_out = out.slice(0, last * chunk, keys).clone();
  const double last_split_ms = MillisecondsPerCall([&] { run_chunk(last, zero_bias); }, 1, 0);
  const at::Tensor split_out = out.slice(0, last * chunk, keys).cpu();
  EXPECT_TRUE(Close(flash_out, split_out, 1e-2, 1e-2,
                    "prefill 128K last chunk flash vs split kernel BFloat16"));

  const double last_keys_seen = static_cast<double>(chunk) * static_cast<double>(last * chunk) +
                                static_cast<double>(chunk) * static_cast<double>(chunk + 1) / 2.0;
  const double last_floor_ms = 4.0 * d * hq * last_keys_seen / mm_flops_per_s * 1e3;
  std::printf("[timing] bf16 at::mm 8192^3: %.3f ms, %.0f TFLOP/s\n", mm_ms, mm_flops_per_s / 1e12);
  std::printf(
      "[timing] prefill 128K tokens in %lld-token chunks, one layer, Hq=32 Hkv=8 D=128 bf16: "
      "%.1f ms, FLOP floor %.1f ms (%.2e FLOP), %.2fx floor, %.0f TFLOP/s\n",
      static_cast<long long>(chunk), prefill_ms, floor_ms, flops, prefill_ms / floor_ms,
      flops / (prefill_ms * 1e-3) / 1e12);
  std::printf(
      "[timing] prefill 128K, the op through %s (the default path): %.1f ms (%.2fx floor); "
      "through flash attention (DYSCO_CUDA_PREFILL=flash2) %.1f ms (%.2fx floor), %.2fx faster\n",
      cudnn ? "cuDNN" : "flash attention", prefill_ms, prefill_ms / floor_ms, flash_path_ms,
      flash_path_ms / floor_ms, flash_path_ms / prefill_ms);
  std::printf(
      "[timing] prefill 128K: flash attention alone (contiguous K/V) %.1f ms (%.2fx floor); "
      "gather + copy-out %.1f ms\n",
      flash_ms, flash_ms / floor_ms, flash_path_ms - flash_ms);
  std::printf(
      "[timing] prefill last chunk (8192 tokens x 128K keys): flash path %.1f ms (%.2fx floor), "
      "split-KV kernel %.1f ms (%.2fx floor), %.1fx faster\n",
      last_flash_ms, last_flash_ms / last_floor_ms, last_split_ms, last_split_ms / last_floor_ms,
      last_split_ms / last_flash_ms);
  EXPECT_GT(prefill_ms, 0.0);
}

}  // namespace
