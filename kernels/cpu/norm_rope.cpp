// CPU rms_norm and rotary_embedding (kernels/ops.h): the model's two element-wise chains
// (tools/dysco_export/model.py rms_norm and apply_rope) as one pass each, bit for bit equal to the
// ATen expressions they replace, so that the model can call them on the CPU too without moving a
// token (a decode step spent ~6 ms of ~30 in its ~750 TorchScript op calls, issue 11).
// Also add_rms_norm (ATen's add, then the rms_norm rows on the rounded sum) and silu_mul (ATen's
// silu and mul on the two halves): bit for bit their ATen expressions by construction; their
// CUDA versions are the fused kernels. And qk_norm_rope_kv_write: an attention block's q/k norms,
// rope and K/V store in one op, out of the same row code (so bit for bit those ops in sequence).
// rope_tables is the model's ATen composite itself (kernels/rope_tables.h); its CUDA version is one
// kernel.
//
// Bit for bit needs the same roundings in the same order:
// - rotary: each product and the sum rounded separately, as ATen's mul, mul and add kernels do.
//   This file is compiled with -ffp-contract=off (kernels/CMakeLists.txt): GCC would otherwise fuse
//   `a * b + c * d` into an FMA in the AVX2 build, which rounds once instead of twice.
// - rms_norm: ATen's mean is sum / D, and its CPU sum adds the squares in a fixed order of 8-float
//   vectors (a cascade of partial sums, see SumOfSquares). Reproducing that order keeps every sum,
//   and so every output, equal. It is the order of libtorch's default and AVX2 builds (8 floats
//   per vector); with ATEN_CPU_CAPABILITY=avx512 ATen adds 16-float vectors and the two differ by
//   rounding (the output stays within ~1e-6 relative). A single row of >= 32768 elements is summed
//   by ATen in two threads (another order); no model has such rows.
//
// Rows are spread over threads only when a call has enough of them (prefill): a decode row of a
// few hundred floats takes well under a microsecond, less than opening a parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_checks.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/op_checks.h"
#include "kernels/ops.h"
#include "kernels/rope_tables.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dysco::kernels {
namespace {

// Elements per parallel work unit: below this a call runs on the calling thread.
constexpr int64_t kParallelElements = 16384;

// Eight floats: the width of ATen's Vectorized<float> in its default and AVX2 builds, which fixes
// the order of its sums. Lane-wise adds and products round exactly like scalar ones, so the
// baseline build (no AVX) gets the same results as the AVX2 one.
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

template <typename T>
DYSCO_ALWAYS_INLINE float ToFloat(T x) {
  return static_cast<float>(x);
}
template <typename T>
DYSCO_ALWAYS_INLINE T Round(float x) {
  return static_cast<T>(x);
}

template <typename T>
DYSCO_ALWAYS_INLINE Vec8 Load8(const T* p) {
  Vec8 v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int i = 0; i < kLanes; ++i) v[i] = ToFloat(p[i]);
  }
  return v;
}

template <typename T>
DYSCO_ALWAYS_INLINE void Store8(T* p, Vec8 v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int i = 0; i < kLanes; ++i) p[i] = Round<T>(v[i]);
  }
}

// ceil(log2(x)), 1 for x <= 2 (as ATen's cpu utils define it).
DYSCO_ALWAYS_INLINE int64_t CeilLog2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<unsigned long long>(x - 1));
}

// acc += the square of element i of x: x[i] for a float accumulator, the 8 floats x[8 i, 8 i + 8)
// for a vector one (each square rounded before the sum, as ATen's pow(2) then sum).
template <typename T>
DYSCO_ALWAYS_INLINE void AddSquare(float& acc, const T* x, int64_t i) {
  const float v = ToFloat(x[i]);
  acc += v * v;
}
template <typename T>
DYSCO_ALWAYS_INLINE void AddSquare(Vec8& acc, const T* x, int64_t i) {
  const Vec8 v = Load8(x + i * kLanes);
  acc += v * v;
}

// Four running sums of the squares of elements 4 i + k, k = 0..3, i < groups, in the order of
// ATen's cascade: a first-level sum of each block of 2^p groups (p = max(4, ceil(log2(groups)) /
// 4)) is added into a second level, whose every 2^p blocks go into a third, and so on over four
// levels (keeps the added numbers of similar size). E is float or Vec8.
template <typename E, typename T>
DYSCO_ALWAYS_INLINE void CascadeSum4(const T* x, int64_t groups, E out[4]) {
  constexpr int kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, CeilLog2(groups) / kLevels);
  const int64_t level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  E acc[kLevels][4];
  for (auto& level : acc) level[0] = level[1] = level[2] = level[3] = E{};
  int64_t i = 0;
  while (i + level_step <= groups) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int k = 0; k < 4; ++k) AddSquare(acc[0][k], x, 4 * i + k);
    }
    for (int level = 1; level < kLevels; ++level) {
      for (int k = 0; k < 4; ++k) {
        acc[level][k] += acc[level - 1][k];
        acc[level - 1][k] = E{};
      }
      if ((i & (level_mask << (level * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i) {
    for (int k = 0; k < 4; ++k) AddSquare(acc[0][k], x, 4 * i + k);
  }
  for (int level = 1; level < kLevels; ++level) {
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[level][k];
  }
  for (int k = 0; k < 4; ++k) out[k] = acc[0][k];
}

// The sum of the squares of n elements as ATen's row sum takes it: four interleaved cascades,
// then the n % 4 tail into the first, then the four added in order. Written to `sum`.
template <typename E, typename T>
DYSCO_ALWAYS_INLINE void RowSumOfSquares(const T* x, int64_t n, E& sum) {
  E part[4];
  CascadeSum4<E>(x, n / 4, part);
  for (int64_t i = n / 4 * 4; i < n; ++i) AddSquare(part[0], x, i);
  sum = ((part[0] + part[1]) + part[2]) + part[3];
}

// sum(x[j]^2) of one row in ATen's order for `xf.pow(2).sum(-1)`: rows of at least 8 elements as
// a row sum of 8-float vectors, then the d % 8 tail elements, then the 8 lanes one by one; shorter
// rows as a row sum of floats.
template <typename T>
DYSCO_ALWAYS_INLINE float SumOfSquares(const T* x, int64_t d) {
  float sum = 0.0f;
  if (d < kLanes) {
    RowSumOfSquares(x, d, sum);
    return sum;
  }
  const int64_t vectors = d / kLanes;
  Vec8 lanes;
  RowSumOfSquares(x, vectors, lanes);
  for (int64_t j = vectors * kLanes; j < d; ++j) AddSquare(sum, x, j);
  for (int i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
}

// Rows [begin, end) of out = weight * to_dtype(x * inv_rms).
template <typename T>
DYSCO_ALWAYS_INLINE void RmsNormRowsImpl(const T* x, const T* w, T* y, int64_t d, float eps,
                                         int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    // ATen: mean = sum / D, + eps, rsqrt = 1 / sqrt (each rounded to fp32).
    const float inv = 1.0f / std::sqrt(SumOfSquares(xr, d) / static_cast<float>(d) + eps);
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
      const Vec8 inv8 = Vec8{} + inv;
      for (; j + kLanes <= d; j += kLanes) Store8(yr + j, Load8(w + j) * (Load8(xr + j) * inv8));
    }
    for (; j < d; ++j) yr[j] = Round<T>(ToFloat(w[j]) * ToFloat(Round<T>(ToFloat(xr[j]) * inv)));
  }
}

// Rows [begin, end) of the [rows = T * H, D] rotation; cos and sin rows t = row / heads.
template <typename T>
DYSCO_ALWAYS_INLINE void RotaryRowsImpl(const T* x, const T* c, const T* s, T* y, int64_t heads,
                                        int64_t d, int64_t begin, int64_t end) {
  const int64_t half = d / 2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = row / heads;
    const T* xr = x + row * d;
    const T* ct = c + t * d;
    const T* st = s + t * d;
    T* yr = y + row * d;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
      // Both halves in vectors when they are whole vectors (head_dim 64, 128, ...).
      if (half % kLanes == 0) {
        for (; j < half; j += kLanes) {
          const Vec8 lo = Load8(xr + j), hi = Load8(xr + j + half);
          Store8(yr + j, lo * Load8(ct + j) + (-hi) * Load8(st + j));
          Store8(yr + j + half, hi * Load8(ct + j + half) + lo * Load8(st + j + half));
        }
        j = d;
      }
    }
    for (; j < d; ++j) {
      const float rotated = j < half ? -ToFloat(xr[j + half]) : ToFloat(xr[j - half]);
      const T a = Round<T>(ToFloat(xr[j]) * ToFloat(ct[j]));
      const T b = Round<T>(rotated * ToFloat(st[j]));
      yr[j] = Round<T>(ToFloat(a) + ToFloat(b));
    }
  }
}

// Compiled for x86-64-v3 (AVX2) and for the baseline; the same roundings either way.
template <typename T>
DYSCO_TARGET_V3 void RmsNormRowsVector(const T* x, const T* w, T* y, int64_t d, float eps,
                                       int64_t begin, int64_t end) {
  RmsNormRowsImpl(x, w, y, d, eps, begin, end);
}
template <typename T>
void RmsNormRowsBaseline(const T* x, const T* w, T* y, int64_t d, float eps, int64_t begin,
                         int64_t end) {
  RmsNormRowsImpl(x, w, y, d, eps, begin, end);
}
template <typename T>
DYSCO_TARGET_V3 void RotaryRowsVector(const T* x, const T* c, const T* s, T* y, int64_t heads,
                                      int64_t d, int64_t begin, int64_t end) {
  RotaryRowsImpl(x, c, s, y, heads, d, begin, end);
}
template <typename T>
void RotaryRowsBaseline(const T* x, const T* c, const T* s, T* y, int64_t heads, int64_t d,
                        int64_t begin, int64_t end) {
  RotaryRowsImpl(x, c, s, y, heads, d, begin, end);
}

// The row functions in the widest clone this CPU runs (every caller picks the same one).
template <typename T>
void RmsNormRows(const T* x, const T* w, T* y, int64_t d, float eps, int64_t begin, int64_t end) {
  if (cpu::CpuRunsX86_64_V3()) {
    RmsNormRowsVector(x, w, y, d, eps, begin, end);
  } else {
    RmsNormRowsBaseline(x, w, y, d, eps, begin, end);
  }
}
template <typename T>
void RotaryRows(const T* x, const T* c, const T* s, T* y, int64_t heads, int64_t d, int64_t begin,
                int64_t end) {
  if (cpu::CpuRunsX86_64_V3()) {
    RotaryRowsVector(x, c, s, y, heads, d, begin, end);
  } else {
    RotaryRowsBaseline(x, c, s, y, heads, d, begin, end);
  }
}

// Rows per work unit: enough elements that a unit outweighs the cost of the parallel region, so
// that decode-sized calls (one row, or a few heads) never open one.
int64_t RowGrain(int64_t d) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(d, 1));
}

template <typename T>
void RmsNorm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  const int64_t rows = input.size(0);
  const int64_t d = input.size(1);
  const T* x = input.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* y = out.data_ptr<T>();
  // ATen adds the Python float eps to an fp32 tensor: eps rounded to fp32 first.
  const float eps_f = static_cast<float>(eps);
  at::parallel_for(0, rows, RowGrain(d),
                   [&](int64_t begin, int64_t end) { RmsNormRows(x, w, y, d, eps_f, begin, end); });
}

template <typename T>
void Rotary(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
            const at::Tensor& sin) {
  const int64_t tokens = input.size(0), heads = input.size(1), d = input.size(2);
  const T* x = input.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, tokens * heads, RowGrain(d), [&](int64_t begin, int64_t end) {
    RotaryRows(x, c, s, y, heads, d, begin, end);
  });
}

// qk_norm_rope_kv_write for tokens [begin, end): per token, the query heads (normed into `normed`
// first when q_w is given) rotated into query, then, unless its slot is negative, the key heads
// likewise into the cache's K rows and the value heads copied into its V rows. The same row
// functions as rms_norm and rotary_embedding, called on the same rows: bit for bit those ops.
template <typename T>
void QkNormRopeKvWriteTokens(T* query, T* k_cache, T* v_cache, const T* qkv, const T* c, const T* s,
                             const int64_t* slots, const T* q_w, const T* k_w, int64_t heads,
                             int64_t kv_heads, int64_t d, float eps, int64_t begin, int64_t end) {
  const int64_t width = (heads + 2 * kv_heads) * d;
  std::vector<T> normed(q_w != nullptr ? static_cast<size_t>(std::max(heads, kv_heads) * d) : 0);
  // rows [0, n) of x: normed when w is given, then rotated into y (token t's cos and sin rows).
  auto norm_rope = [&](const T* x, const T* w, T* y, int64_t n, const T* ct, const T* st) {
    if (w != nullptr) {
      RmsNormRows(x, w, normed.data(), d, eps, 0, n);
      x = normed.data();
    }
    RotaryRows(x, ct, st, y, n, d, 0, n);
  };
  const int64_t kv_row = kv_heads * d;  // one slot's K (or V) for all heads
  for (int64_t t = begin; t < end; ++t) {
    const T* row = qkv + t * width;
    norm_rope(row, q_w, query + t * heads * d, heads, c + t * d, s + t * d);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    norm_rope(row + heads * d, k_w, k_cache + slot * kv_row, kv_heads, c + t * d, s + t * d);
    std::memcpy(v_cache + slot * kv_row, row + heads * d + kv_row,
                static_cast<size_t>(kv_row) * sizeof(T));
  }
}

template <typename T>
void QkNormRopeKvWrite(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                       const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm,
                       const c10::optional<at::Tensor>& k_norm, double eps,
                       const PagedCacheShape& cache) {
  const int64_t tokens = query.size(0), heads = query.size(1), d = cache.head_dim;
  const int64_t num_slots = cache.num_pages * cache.page_size;
  const bool norms = q_norm.has_value() && q_norm->defined();
  const T* q_w = norms ? q_norm->data_ptr<T>() : nullptr;
  const T* k_w = norms ? k_norm->data_ptr<T>() : nullptr;
  T* k_cache = kv_cache_layer.data_ptr<T>();
  T* v_cache = k_cache + num_slots * cache.num_kv_heads * d;
  const float eps_f = static_cast<float>(eps);
  // Tokens per work unit as the norms' rows: a decode step's token never opens a parallel region.
  const int64_t grain = RowGrain((heads + 2 * cache.num_kv_heads) * d);
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    QkNormRopeKvWriteTokens(query.data_ptr<T>(), k_cache, v_cache, qkv.data_ptr<T>(),
                            cos.data_ptr<T>(), sin.data_ptr<T>(), slot_mapping.data_ptr<int64_t>(),
                            q_w, k_w, heads, cache.num_kv_heads, d, eps_f, begin, end);
  });
}

// Whether this libtorch's CPU silu takes fp16 (torch 2.x; not libtorch 1.13). Probed once.
bool AtenHasCpuHalfSilu() {
  static const bool has = [] {
    try {
      (void)at::silu(at::zeros({1}, at::kHalf));
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return has;
}

}  // namespace

void rms_norm_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double eps) {
  CheckRmsNormArgs(out, input, weight, eps);
  TORCH_CHECK(out.is_cpu(), kRmsNormOp, ": the CPU implementation got tensors on ", out.device());
  if (out.numel() == 0) return;
  switch (input.scalar_type()) {  // the checks admit these three
    case at::kFloat:
      return RmsNorm<float>(out, input, weight, eps);
    case at::kBFloat16:
      return RmsNorm<at::BFloat16>(out, input, weight, eps);
    default:
      return RmsNorm<at::Half>(out, input, weight, eps);
  }
}

void add_rms_norm_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                      const at::Tensor& residual, const at::Tensor& weight, double eps) {
  CheckAddRmsNormArgs(out, sum, input, residual, weight, eps);
  TORCH_CHECK(out.is_cpu(), kAddRmsNormOp, ": the CPU implementation got tensors on ",
              out.device());
  if (out.numel() == 0) return;
  // Two passes, each bit for bit its ATen expression: ATen's add kernel (`input + residual`, fp32
  // then rounded to the dtype), then the rms_norm rows on the rounded sum. The second pass reads
  // `sum` back while it is still in the cache; a decode row is a few KiB.
  at::Tensor sum_out = sum;  // add_out takes a non-const reference; same TensorImpl
  at::add_out(sum_out, input, residual);
  switch (input.scalar_type()) {  // the checks admit these three
    case at::kFloat:
      return RmsNorm<float>(out, sum, weight, eps);
    case at::kBFloat16:
      return RmsNorm<at::BFloat16>(out, sum, weight, eps);
    default:
      return RmsNorm<at::Half>(out, sum, weight, eps);
  }
}

void silu_mul_cpu(const at::Tensor& out, const at::Tensor& input) {
  CheckSiluMulArgs(out, input);
  TORCH_CHECK(out.is_cpu(), kSiluMulOp, ": the CPU implementation got tensors on ", out.device());
  if (out.numel() == 0) return;
  // ATen's own kernels on the two halves (strided views of input): bit for bit `F.silu(g) * u`,
  // whatever vector width and exp ATen uses. Not fused: the CPU model spends its time in the
  // linear layers around it, and a hand-written exp would not round as ATen's.
  const int64_t n = out.size(1);
  at::Tensor out_ref = out;
  if (input.scalar_type() != at::kHalf || AtenHasCpuHalfSilu()) {
    at::mul_out(out_ref, at::silu(input.narrow(1, 0, n)), input.narrow(1, n, n));
    return;
  }
  // fp16 where ATen has no CPU silu for it (libtorch 1.13, where `F.silu(g) * u` itself raises):
  // the same two roundings in fp32 tensors. The product of two fp16 values is exact in fp32, so the
  // second rounding equals any fp16 mul's; silu's fp32 value comes from ATen's float kernel.
  const at::Tensor wide = input.to(at::kFloat);
  const at::Tensor silu = at::silu(wide.narrow(1, 0, n)).to(at::kHalf).to(at::kFloat);
  out_ref.copy_(silu * wide.narrow(1, n, n));
}

void rotary_embedding_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                          const at::Tensor& sin) {
  CheckRotaryEmbeddingArgs(out, input, cos, sin);
  TORCH_CHECK(out.is_cpu(), kRotaryEmbeddingOp, ": the CPU implementation got tensors on ",
              out.device());
  if (out.numel() == 0) return;
  switch (input.scalar_type()) {
    case at::kFloat:
      return Rotary<float>(out, input, cos, sin);
    case at::kBFloat16:
      return Rotary<at::BFloat16>(out, input, cos, sin);
    default:
      return Rotary<at::Half>(out, input, cos, sin);
  }
}

void rope_tables_cpu(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                     const at::Tensor& inv_freq, double scaling) {
  CheckRopeTablesArgs(cos, sin, positions, inv_freq);
  TORCH_CHECK(cos.is_cpu(), kRopeTablesOp, ": the CPU implementation got tensors on ",
              cos.device());
  if (cos.numel() == 0) return;
  // The ATen composite itself, not a loop: ATen's CPU cos/sin (vectorised Sleef, not std::cos) fix
  // the bits of the CPU model, which NativeDecode::RopeOf (core/model/model_runner.cpp) reproduces
  // with the same ATen ops; a test compares the native CPU decode with the TorchScript one bit for
  // bit. The table is a few KiB a decode step; the op saves the GPU's launches, not CPU time.
  RopeTablesAten(cos, sin, positions, inv_freq, scaling);
}

void qk_norm_rope_kv_write_cpu(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                               const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& slot_mapping,
                               const c10::optional<at::Tensor>& q_norm_weight,
                               const c10::optional<at::Tensor>& k_norm_weight, double eps) {
  const PagedCacheShape cache = cpu::CheckQkNormRopeKvWrite(
      query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps);
  if (query.numel() == 0) return;
  switch (query.scalar_type()) {  // the checks admit these three
    case at::kFloat:
      return QkNormRopeKvWrite<float>(query, kv_cache_layer, qkv, cos, sin, slot_mapping,
                                      q_norm_weight, k_norm_weight, eps, cache);
    case at::kBFloat16:
      return QkNormRopeKvWrite<at::BFloat16>(query, kv_cache_layer, qkv, cos, sin, slot_mapping,
                                             q_norm_weight, k_norm_weight, eps, cache);
    default:
      return QkNormRopeKvWrite<at::Half>(query, kv_cache_layer, qkv, cos, sin, slot_mapping,
                                         q_norm_weight, k_norm_weight, eps, cache);
  }
}

}  // namespace dysco::kernels
