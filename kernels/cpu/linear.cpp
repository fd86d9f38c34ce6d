// CPU linear: out [M, N] <- input [M, K] @ weight [N, K]^T. Few rows (decode) go through a GEMV
// kernel that streams each weight row once for all input rows; more rows (prefill) through BLAS
// GEMM (at::mm_out), which is at its matmul rate there.
//
// Why a kernel of our own: libtorch's one-row at::linear is a BLAS GEMM with M = 1, about twice the
// time of reading the weights (and at::mv handles one row only). A decode step is nearly all
// weight reads, so the step time follows the GEMV rate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/cpu_checks.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/op_steps.h"
#include "kernels/ops.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dysco::kernels {
namespace {

// Inputs of at most this many rows take the GEMV kernel (decode batches). Past it, BLAS GEMM reuses
// each weight tile from cache for many rows and wins.
constexpr int64_t kGemvMaxRows = 8;
// bf16 weights: the GEMV only up to 2 rows, where it is bound by the bytes (1 row 13 ms against 27
// ms for BLAS over the default model's weights, idle, 2 threads). Past that BLAS's bf16 GEMM
// (OpenBLAS sbgemm, AVX512-BF16 on this CPU) wins: 8 rows 30 ms against 60 ms for the widening
// GEMV.
constexpr int64_t kGemvMaxRowsBf16 = 2;
// Inputs of at most this many rows take the row-at-a-time GEMV (GemvRowsImpl), more rows the
// four-row one, which reuses each input vector for four weight rows: at 8 rows 30 ms against 34
// ms, at 1 and 2 rows 1.10x and 1.19x a plain read of the weights against 1.23-1.39x (idle, 2
// threads, the default model). The two sum in different orders, so a row's outputs are equal
// across batches of 1-2 rows and across batches of 3-8, not between the two (nor with BLAS past 8).
constexpr int64_t kGemvRowKernelMaxRows = 2;
// Output features per parallel work unit: a few weight rows of K elements, enough to amortise the
// scheduling, small enough to split the 192-output projections over threads.
constexpr int64_t kGemvGrain = 32;

typedef float Vec8 __attribute__((vector_size(32)));

DYSCO_ALWAYS_INLINE Vec8 Load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Eight bf16 weights widened to floats (exactly: a bf16 is a float's high half). Why bf16 weights
// at all: decode streams every weight once per step, so half the bytes is up to half the step
// (docs/performance.md "bf16 weights").
typedef uint16_t Bits8 __attribute__((vector_size(16)));
typedef uint32_t Words8 __attribute__((vector_size(32)));
DYSCO_ALWAYS_INLINE Vec8 Load8(const at::BFloat16* p) {
  Bits8 bits;
  std::memcpy(&bits, p, sizeof(bits));
  const Words8 words = __builtin_convertvector(bits, Words8) << 16;
  Vec8 v;
  std::memcpy(&v, &words, sizeof(v));
  return v;
}

DYSCO_ALWAYS_INLINE float ToFloat(float x) { return x; }
DYSCO_ALWAYS_INLINE float ToFloat(at::BFloat16 x) { return static_cast<float>(x); }

DYSCO_ALWAYS_INLINE float Sum8(Vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// out[r][n] for r < MR, n in [n0, n0 + 4): four weight rows against MR input rows, 4 * MR vector
// accumulators; with the four weight vectors and one input vector that is 13 of the 16 AVX
// registers for MR = 2 (MR = 3 spills). x: MR rows of stride ldx.
// W: the weight type (float or bf16, widened to float as it is loaded); Out: the output type (the
// sums are fp32 either way, rounded once when stored).
template <int MR, typename W, typename Out, bool kPrefetch = true>
DYSCO_ALWAYS_INLINE void Gemv4(const float* __restrict x, int64_t ldx, const W* __restrict w,
                               int64_t k_size, Out* __restrict out, int64_t ldo) {
  Vec8 acc[MR][4];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = Vec8{};
  const W* w0 = w;
  const W* w1 = w + k_size;
  const W* w2 = w + 2 * k_size;
  const W* w3 = w + 3 * k_size;
  // The next four weight rows follow these in memory: prefetch them as fast as these are read
  // (4 rows x 8 weights a step: two cache lines of floats, one of bf16), so that rows of a few KiB
  // (too short for the hardware prefetcher to ramp up) stream at full rate.
  const char* next = reinterpret_cast<const char*>(w + 4 * k_size);
  constexpr int64_t kStepBytes = 4 * static_cast<int64_t>(sizeof(W));  // per k
  int64_t k = 0;
  for (; k + 8 <= k_size; k += 8) {
    if (kPrefetch) {
      __builtin_prefetch(next + kStepBytes * k);
      if (kStepBytes * 8 > 64) __builtin_prefetch(next + kStepBytes * k + 64);
    }
    const Vec8 a = Load8(w0 + k);
    const Vec8 b = Load8(w1 + k);
    const Vec8 c = Load8(w2 + k);
    const Vec8 d = Load8(w3 + k);
    for (int r = 0; r < MR; ++r) {
      const Vec8 xv = Load8(x + r * ldx + k);
      acc[r][0] += a * xv;
      acc[r][1] += b * xv;
      acc[r][2] += c * xv;
      acc[r][3] += d * xv;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float s[4] = {Sum8(acc[r][0]), Sum8(acc[r][1]), Sum8(acc[r][2]), Sum8(acc[r][3])};
    for (int64_t kk = k; kk < k_size; ++kk) {
      const float xv = x[r * ldx + kk];
      s[0] += ToFloat(w0[kk]) * xv;
      s[1] += ToFloat(w1[kk]) * xv;
      s[2] += ToFloat(w2[kk]) * xv;
      s[3] += ToFloat(w3[kk]) * xv;
    }
    for (int j = 0; j < 4; ++j) out[r * ldo + j] = static_cast<Out>(s[j]);
  }
}

// One weight row against MR input rows (the n % 4 tail).
template <int MR, typename W, typename Out>
DYSCO_ALWAYS_INLINE void Gemv1(const float* __restrict x, int64_t ldx, const W* __restrict w,
                               int64_t k_size, Out* __restrict out, int64_t ldo) {
  for (int r = 0; r < MR; ++r) {
    Vec8 acc = Vec8{};
    int64_t k = 0;
    for (; k + 8 <= k_size; k += 8) acc += Load8(w + k) * Load8(x + r * ldx + k);
    float s = Sum8(acc);
    for (; k < k_size; ++k) s += ToFloat(w[k]) * x[r * ldx + k];
    out[r * ldo] = static_cast<Out>(s);
  }
}

// One weight row against MR input rows (x: stride ldx; out: stride ldo), four accumulators per
// input row (k mod 32 in four 8-float lanes groups: independent FMA chains), then the K % 32 tail
// in 8-float steps into the first, then the scalar tail. The sums of an output depend only on its
// input row and weight row, never on MR or M: a sequence's logits are the same in any batch.
template <int MR, typename W, typename Out>
DYSCO_ALWAYS_INLINE void GemvRow(const float* __restrict x, int64_t ldx, const W* __restrict w,
                                 int64_t k_size, Out* __restrict out, int64_t ldo) {
  Vec8 acc[MR][4];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = Vec8{};
  int64_t k = 0;
  for (; k + 32 <= k_size; k += 32) {
    const Vec8 w0 = Load8(w + k), w1 = Load8(w + k + 8);
    const Vec8 w2 = Load8(w + k + 16), w3 = Load8(w + k + 24);
    for (int r = 0; r < MR; ++r) {
      const float* xr = x + r * ldx + k;
      acc[r][0] += w0 * Load8(xr);
      acc[r][1] += w1 * Load8(xr + 8);
      acc[r][2] += w2 * Load8(xr + 16);
      acc[r][3] += w3 * Load8(xr + 24);
    }
  }
  for (; k + 8 <= k_size; k += 8) {
    const Vec8 wv = Load8(w + k);
    for (int r = 0; r < MR; ++r) acc[r][0] += wv * Load8(x + r * ldx + k);
  }
  for (int r = 0; r < MR; ++r) {
    float s = Sum8((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
    for (int64_t kk = k; kk < k_size; ++kk) s += ToFloat(w[kk]) * x[r * ldx + kk];
    out[r * ldo] = static_cast<Out>(s);
  }
}

// out[:, n_begin:n_end] for all M (<= kGemvMaxRows) rows of x, out of stride n_size: weight rows
// one after another, so a thread's range of the weight is ONE sequential stream, as a plain memory
// read is, which the hardware prefetcher follows at full rate. Each row is read from memory by the
// first pair of input rows and from L1 by the others (a row of K floats: at most 6 KiB here). For
// one input row the four-row kernel below (four interleaved streams of a few KiB, software prefetch
// of the next four rows) took 1.23-1.44x a plain read of the default model's weights, this one
// 1.07-1.10x (docs/performance.md "Decode against its floor").
template <typename W, typename Out>
DYSCO_ALWAYS_INLINE void GemvRowsImpl(const float* x, int64_t m_size, const W* w, int64_t k_size,
                                      int64_t n_size, int64_t n_begin, int64_t n_end, Out* out) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* wn = w + n * k_size;
    int64_t r = 0;
    for (; r + 2 <= m_size; r += 2) {
      GemvRow<2>(x + r * k_size, k_size, wn, k_size, out + r * n_size + n, n_size);
    }
    if (r < m_size) GemvRow<1>(x + r * k_size, k_size, wn, k_size, out + r * n_size + n, n_size);
  }
}

// out[:, n_begin:n_end] for all M (<= kGemvMaxRows) rows of x, out of stride n_size: 1-2 rows in
// GemvRowsImpl; more four weight rows at a time, outermost: each group is read from memory once,
// by the first group of input rows, and from L1 by the others (4 rows of K floats: 24 KiB at K =
// 1536).
template <typename W, typename Out>
DYSCO_ALWAYS_INLINE void GemvRangeImpl(const float* x, int64_t m_size, const W* w, int64_t k_size,
                                       int64_t n_size, int64_t n_begin, int64_t n_end, Out* out) {
  if (m_size <= kGemvRowKernelMaxRows) {
    GemvRowsImpl(x, m_size, w, k_size, n_size, n_begin, n_end, out);
    return;
  }
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    const W* wn = w + n * k_size;
    int64_t r = 0;
    for (; r + 2 <= m_size; r += 2) {
      Gemv4<2>(x + r * k_size, k_size, wn, k_size, out + r * n_size + n, n_size);
    }
    if (r < m_size) Gemv4<1>(x + r * k_size, k_size, wn, k_size, out + r * n_size + n, n_size);
  }
  for (; n < n_end; ++n) {
    for (int64_t r = 0; r < m_size; ++r) {
      Gemv1<1>(x + r * k_size, k_size, w + n * k_size, k_size, out + r * n_size + n, n_size);
    }
  }
}

// Compiled for x86-64-v3 (AVX2 + FMA: 8-lane FMAs) and for the baseline; Gemv picks one per call.
template <typename W, typename Out>
DYSCO_TARGET_V3 void GemvRangeVector(const float* x, int64_t m_size, const W* w, int64_t k_size,
                                     int64_t n_size, int64_t n_begin, int64_t n_end, Out* out) {
  GemvRangeImpl(x, m_size, w, k_size, n_size, n_begin, n_end, out);
}

template <typename W, typename Out>
void GemvRangeBaseline(const float* x, int64_t m_size, const W* w, int64_t k_size, int64_t n_size,
                       int64_t n_begin, int64_t n_end, Out* out) {
  GemvRangeImpl(x, m_size, w, k_size, n_size, n_begin, n_end, out);
}

// fp32 and bf16 (T) weights, inputs and outputs. bf16 inputs are widened to fp32 once (a few rows:
// kGemvMaxRowsBf16), the sums are fp32 and each output is rounded once.
template <typename T>
void Gemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  const int64_t m_size = input.size(0);
  const int64_t k_size = input.size(1);
  const int64_t n_size = weight.size(0);
  const at::Tensor x_float = input.scalar_type() == at::kFloat ? input : input.to(at::kFloat);
  const float* x = x_float.data_ptr<float>();
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, n_size, kGemvGrain, [&](int64_t begin, int64_t end) {
    if (cpu::CpuRunsX86_64_V3()) {
      GemvRangeVector(x, m_size, w, k_size, n_size, begin, end, o);
    } else {
      GemvRangeBaseline(x, m_size, w, k_size, n_size, begin, end, o);
    }
  });
}

// OpenBLAS's own thread count, or 0 when the BLAS is not OpenBLAS (looked up at run time, as
// core/model/model_runner.cpp does to set it).
int BlasThreads() {
  using GetThreads = int (*)();
  static const auto fn =
      reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return fn == nullptr ? 0 : fn();
}

// Rows per thread below which a GEMM is not split (a split BLAS call has a fixed cost).
constexpr int64_t kMinGemmRowsPerThread = 16;

// out <- input @ weight^T through BLAS. With a single-threaded OpenBLAS (what ModelRunner sets: see
// there) the rows are split over the ATen threads, so that one thread pool runs everything: an
// OpenBLAS pool next to OpenMP's on the same cores makes each wait for the other's spinning
// threads (prefill was 4x its GEMM floor that way). A multi-threaded BLAS gets the whole call.
void Gemm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  const int64_t m_size = input.size(0);
  const at::Tensor weight_t = weight.t();
  const int64_t threads = at::get_num_threads();
  if (BlasThreads() != 1 || threads == 1 || m_size < 2 * kMinGemmRowsPerThread ||
      at::in_parallel_region()) {
    at::Tensor result = out;  // shares out's storage; mm_out wants a mutable reference
    at::mm_out(result, input, weight_t);
    return;
  }
  const int64_t pieces = std::min(threads, m_size / kMinGemmRowsPerThread);
  const int64_t rows = (m_size + pieces - 1) / pieces;
  // The caller's thread-local state (InferenceMode above all: the model runs under it, and an
  // in-place mm_out into an inference tensor is refused outside it) for the worker threads, which
  // run ATen ops here.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = p * rows;
      const int64_t r1 = std::min(m_size, r0 + rows);
      if (r0 >= r1) continue;
      at::Tensor part = out.narrow(0, r0, r1 - r0);
      at::mm_out(part, input.narrow(0, r0, r1 - r0), weight_t);
    }
  });
}

}  // namespace

void linear_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  cpu::CheckLinear(out, input, weight);
  if (out.numel() == 0) return;
  if (input.size(1) == 0) {
    out.zero_();
    return;
  }
  if (input.size(0) <= kGemvMaxRows && weight.scalar_type() == at::kFloat) {
    Gemv<float>(out, input, weight);
    return;
  }
  if (input.size(0) <= kGemvMaxRowsBf16 && weight.scalar_type() == at::kBFloat16) {
    Gemv<at::BFloat16>(out, input, weight);
    return;
  }
  if (weight.scalar_type() == at::kHalf) {
    // libtorch 1.13 has no CPU fp16 GEMM (F.linear fails too): compute in fp32, round once.
    out.copy_(at::mm(input.to(at::kFloat), weight.to(at::kFloat).t()));
    return;
  }
  Gemm(out, input, weight);
}

void add_rms_norm_linear_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                             const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& weight) {
  CheckAddRmsNormLinearArgs(out, sum, input, residual, norm_weight, eps, weight);
  TORCH_CHECK(out.is_cpu(), kAddRmsNormLinearOp, ": the CPU implementation got tensors on ",
              out.device());
  // The two ops in sequence, so that a model calling this op computes what it computed with
  // add_rms_norm then linear, bit for bit. The CPU decode step is bound by its weights' bytes;
  // a fused norm would save one pass over a row of a few KiB.
  const at::Tensor normed = at::empty_like(sum);
  add_rms_norm_cpu(normed, sum, input, residual, norm_weight, eps);
  linear_cpu(out, normed, weight);
}

void add_rms_norm_swiglu_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                             const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& weight) {
  CheckAddRmsNormSwigluArgs(out, sum, input, residual, norm_weight, eps, weight);
  TORCH_CHECK(out.is_cpu(), kAddRmsNormSwigluOp, ": the CPU implementation got tensors on ",
              out.device());
  // The ops in sequence, bit for bit (as add_rms_norm_linear_cpu).
  AddRmsNormSwigluSteps(out, sum, input, residual, norm_weight, eps, weight,
                        add_rms_norm_linear_cpu, silu_mul_cpu);
}

void o_proj_mlp_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                    const at::Tensor& residual, const at::Tensor& o_weight,
                    const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                    const at::Tensor& down_weight) {
  CheckOProjMlpArgs(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight,
                    down_weight);
  TORCH_CHECK(out.is_cpu(), kOProjMlpOp, ": the CPU implementation got tensors on ", out.device());
  // The ops in sequence, bit for bit (as add_rms_norm_linear_cpu).
  OProjMlpSteps(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight, down_weight,
                linear_cpu, add_rms_norm_swiglu_cpu);
}

}  // namespace dysco::kernels
