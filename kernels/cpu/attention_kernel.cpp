// The instances of the attention loops of attention_kernel.h, per cache dtype and ISA, and the
// choice between them.
#include "kernels/cpu/attention_kernel.h"

#include <array>

#include <atomic>

#ifdef DYSCO_CPU_X86_64_V4
// GCC 12's AVX-512 intrinsics that take _mm512_undefined_ps() trip -W(maybe-)uninitialized (the
// undefined value is self-initialised on purpose; GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace dysco::kernels::cpu {
namespace {

CpuIsa DetectCpuIsa() {
#if defined(DYSCO_CPU_X86_64_V3)
  if (!CpuRunsX86_64_V3()) return CpuIsa::kBaseline;
#if defined(DYSCO_CPU_X86_64_V4)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kX86_64_V4;
  }
#endif
  return CpuIsa::kX86_64_V3;
#elif defined(DYSCO_CPU_BASELINE_ONLY)
  return CpuIsa::kBaseline;
#else
  // Elsewhere (e.g. aarch64, 32 vector registers) the vector-extension kernels always run.
  return CpuIsa::kX86_64_V3;
#endif
}

// The test cap (SetCpuIsaCapForTesting); the widest ISA by default.
std::atomic<int> isa_cap{static_cast<int>(CpuIsa::kX86_64_V4)};

CpuIsa ActiveCpuIsa() {
  static const CpuIsa supported = DetectCpuIsa();
  return static_cast<CpuIsa>(
      std::min(static_cast<int>(supported), isa_cap.load(std::memory_order_relaxed)));
}

// Whether the vector kernels (x86-64-v3 or wider) run.
bool UseVectorKernels() { return ActiveCpuIsa() != CpuIsa::kBaseline; }

// head_dim 64 and 128 (nearly every model) get the vector kernels; other sizes the plain loops.
template <typename T>
DYSCO_TARGET_V3 void AttendKeysVector(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,
                                      int64_t key_begin, int64_t key_end, const float* bias,
                                      AttentionScratch& scratch) {
  switch (head_dim) {
    case 64:
      return AttendKeysImpl<T, 64>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
    case 128:
      return AttendKeysImpl<T, 128>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
    default:
      return AttendKeysImpl<T, 0>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
  }
}

template <typename T>
DYSCO_TARGET_V3 void ProbsRowVector(const PagedSequence<T>& seq, const float* q, int64_t head_dim,
                                    int64_t len, const float* bias, float* key_buffer,
                                    float* probs) {
  switch (head_dim) {
    case 64:
      return ProbsRowImpl<T, 64>(seq, q, head_dim, len, bias, key_buffer, probs);
    case 128:
      return ProbsRowImpl<T, 128>(seq, q, head_dim, len, bias, key_buffer, probs);
    default:
      return ProbsRowImpl<T, 0>(seq, q, head_dim, len, bias, key_buffer, probs);
  }
}

#ifdef DYSCO_CPU_X86_64_V4
// ---- AVX-512 (x86-64-v4) blocked prefill: AttendKeysBlockedImpl's loops with 16-lane vectors and
// 32 registers. Q K^T runs 6 rows by the whole 64-key tile (24 accumulators: each loaded key
// vector feeds 6 FMAs, each broadcast query element 4), P V 6 rows by 64 head columns, and the
// online softmax of a row block works on its scores while they are still in registers, with lane
// masks for the causal diagonal, the tile's end and the bias (so no masked lane is read or
// exponentiated into the weights). Every function carries the target attribute itself: AVX-512
// intrinsics cannot be inlined into a function compiled for less.
#define DYSCO_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define DYSCO_INLINE_V4 DYSCO_TARGET_V4 DYSCO_ALWAYS_INLINE

constexpr int kRowBlock512 = 6;

// ExpNonPositive on 16 lanes (the same polynomial and range reduction, the same results).
DYSCO_INLINE_V4 __m512 ExpNonPositive16(__m512 x) {
  const __m512 low = _mm512_set1_ps(-87.0f);
  const __m512 clamped = _mm512_max_ps(x, low);
  const __m512 t = _mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  // p * 2^n in one instruction (vscalefps) instead of building 2^n's exponent bits and
  // multiplying (four): the same value for every input, since n is an integer in [-126, 0] after
  // the clamp, so 2^n is a normal float and both give the exactly rounded product (also checked
  // on every float in [-90, -0] when this was written).
  const __m512 result = _mm512_scalef_ps(p, n);
  // Lanes below -87 (and -inf, masked keys) are 0.
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, low, _CMP_NLT_UQ), result);
}

// The lanes of 16-key vector c that a row seeing `count` keys of the tile sees.
DYSCO_INLINE_V4 __mmask16 VisibleLanes(int64_t count, int c) {
  const int64_t n = std::clamp<int64_t>(count - 16 * c, 0, 16);
  return static_cast<__mmask16>((1u << n) - 1u);
}

// For the MR rows of one row block and one key tile: scores q . keys_t (NC 16-key vectors), bias,
// then the online-softmax update of the rows' max / sum / acc (acc only rescaled), and the
// weights into s (rows of kKeyBlock, zero beyond each row's visible keys up to 16 * NC). counts[r]:
// keys of the tile row r sees. Returns whether any row has a weight to add.
template <int MR, int NC, int64_t kD>
DYSCO_TARGET_V4 bool ScoreSoftmaxTile512(const float* __restrict q, const float* __restrict keys_t,
                                         const float* bias, const int64_t* counts,
                                         float* __restrict s, float* max, float* sum,
                                         float* __restrict acc) {
  __m512 a[MR][NC];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NC; ++c) a[r][c] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < kD; ++d) {
    __m512 k[NC];
    for (int c = 0; c < NC; ++c) k[c] = _mm512_loadu_ps(keys_t + d * kKeyBlock + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * kD + d]);
      for (int c = 0; c < NC; ++c) a[r][c] = _mm512_fmadd_ps(qb, k[c], a[r][c]);
    }
  }
  bool any = false;
  for (int r = 0; r < MR; ++r) {
    float* sr = s + r * kKeyBlock;
    __mmask16 lanes[NC];
    __m512 m = _mm512_set1_ps(kNegInf);
    for (int c = 0; c < NC; ++c) {
      lanes[c] = VisibleLanes(counts[r], c);
      if (bias != nullptr) {
        a[r][c] = _mm512_add_ps(a[r][c], _mm512_maskz_loadu_ps(lanes[c], bias + 16 * c));
      }
      m = _mm512_mask_max_ps(m, lanes[c], m, a[r][c]);
    }
    const float old_max = max[r];
    const float new_max = std::max(old_max, _mm512_reduce_max_ps(m));
    if (new_max == kNegInf) {  // no visible key, or every key so far masked: nothing to add
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(sr + 16 * c, _mm512_setzero_ps());
      continue;
    }
    const __m512 shift = _mm512_set1_ps(new_max);
    __m512 total = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      const __m512 e =
          _mm512_maskz_mov_ps(lanes[c], ExpNonPositive16(_mm512_sub_ps(a[r][c], shift)));
      _mm512_storeu_ps(sr + 16 * c, e);
      total = _mm512_add_ps(total, e);
    }
    if (old_max != new_max) {
      const float correction = old_max == kNegInf ? 0.0f : std::exp(old_max - new_max);
      sum[r] *= correction;
      const __m512 cv = _mm512_set1_ps(correction);
      for (int64_t d = 0; d < kD; d += 16) {
        _mm512_storeu_ps(acc + r * kD + d, _mm512_mul_ps(cv, _mm512_loadu_ps(acc + r * kD + d)));
      }
    }
    sum[r] += _mm512_reduce_add_ps(total);
    max[r] = new_max;
    any = true;
  }
  return any;
}

// acc[r] += sum_{j < count} p[r][j] * value_rows[j] for r < MR; kD a multiple of 64.
template <int MR, int64_t kD>
DYSCO_TARGET_V4 void AccumulateTile512(float* __restrict acc, const float* __restrict p,
                                       const float* const* value_rows, int64_t count) {
  static_assert(kD % 64 == 0, "kD must be a multiple of 64");
  for (int64_t c0 = 0; c0 < kD; c0 += 64) {
    __m512 o[MR][4];
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < 4; ++c) o[r][c] = _mm512_loadu_ps(acc + r * kD + c0 + 16 * c);
    }
    for (int64_t j = 0; j < count; ++j) {
      __m512 v[4];
      for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_ps(value_rows[j] + c0 + 16 * c);
      for (int r = 0; r < MR; ++r) {
        const __m512 pb = _mm512_set1_ps(p[r * kKeyBlock + j]);
        for (int c = 0; c < 4; ++c) o[r][c] = _mm512_fmadd_ps(pb, v[c], o[r][c]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * kD + c0 + 16 * c, o[r][c]);
    }
  }
}

// The tile kernels by row count (1..6) and 16-key vector count (1..4), so that both are known at
// compile time (the accumulators then live in registers).
template <int64_t kD>
struct Tiles512 {
  using Score = bool (*)(const float*, const float*, const float*, const int64_t*, float*, float*,
                         float*, float*);
  using Accumulate = void (*)(float*, const float*, const float* const*, int64_t);
  template <int MR>
  static constexpr std::array<Score, 4> ScoreRow() {
    return {&ScoreSoftmaxTile512<MR, 1, kD>, &ScoreSoftmaxTile512<MR, 2, kD>,
            &ScoreSoftmaxTile512<MR, 3, kD>, &ScoreSoftmaxTile512<MR, 4, kD>};
  }
  static constexpr std::array<std::array<Score, 4>, kRowBlock512> kScore = {
      ScoreRow<1>(), ScoreRow<2>(), ScoreRow<3>(), ScoreRow<4>(), ScoreRow<5>(), ScoreRow<6>()};
  static constexpr std::array<Accumulate, kRowBlock512> kAccumulate = {
      &AccumulateTile512<1, kD>, &AccumulateTile512<2, kD>, &AccumulateTile512<3, kD>,
      &AccumulateTile512<4, kD>, &AccumulateTile512<5, kD>, &AccumulateTile512<6, kD>};
};

// As AttendKeysBlockedImpl, with the AVX-512 tiles; kD 64 or 128.
template <typename T, int64_t kD>
DYSCO_TARGET_V4 void AttendKeysBlocked512(const PagedSequence<T>& seq, int64_t rows,
                                          int64_t key_begin, int64_t key_end, const float* bias,
                                          AttentionScratch& scratch) {
  float* keys_t = scratch.keys.data();
  float* values = scratch.values.data();
  const float* value_rows[kKeyBlock];
  KeyCursor cursor(seq, key_begin);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, key_end - j0);
    const int64_t next_block = std::min(kKeyBlock, key_end - j0 - block);
    GatherKeyTile<T, kD>(seq, block, next_block, &cursor, keys_t, values, value_rows);
    const float* tile_bias = bias == nullptr ? nullptr : bias + j0;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock512) {
      const int block_rows = static_cast<int>(std::min<int64_t>(kRowBlock512, rows - r0));
      int64_t counts[kRowBlock512];
      int64_t block_count = 0;
      for (int r = 0; r < block_rows; ++r) {
        counts[r] = std::min(scratch.row_end[r0 + r], j0 + block) - j0;
        block_count = std::max(block_count, counts[r]);
      }
      if (block_count <= 0) continue;  // rows see key prefixes: no key of this tile
      const int vectors = static_cast<int>((block_count + 15) / 16);
      float* s = scratch.scores.data() + r0 * kKeyBlock;
      float* acc = scratch.acc.data() + r0 * kD;
      const bool any = Tiles512<kD>::kScore[block_rows - 1][vectors - 1](
          scratch.query.data() + r0 * kD, keys_t, tile_bias, counts, s, scratch.max.data() + r0,
          scratch.sum.data() + r0, acc);
      if (any) Tiles512<kD>::kAccumulate[block_rows - 1](acc, s, value_rows, block_count);
    }
  }
}
#endif  // DYSCO_CPU_X86_64_V4

// The blocked prefill loops for head_dim 64 and 128; false (nothing done) for other sizes.
template <typename T>
DYSCO_TARGET_V3 bool AttendKeysBlockedVector(const PagedSequence<T>& seq, int64_t rows,
                                             int64_t head_dim, int64_t key_begin, int64_t key_end,
                                             const float* bias, AttentionScratch& scratch) {
  switch (head_dim) {
    case 64:
      AttendKeysBlockedImpl<T, 64>(seq, rows, key_begin, key_end, bias, scratch);
      return true;
    case 128:
      AttendKeysBlockedImpl<T, 128>(seq, rows, key_begin, key_end, bias, scratch);
      return true;
    default:
      return false;
  }
}

// The AVX-512 blocked prefill where this build and the CPU have it (and the test cap allows),
// for head_dim 64 and 128; false (nothing done) otherwise.
template <typename T>
bool AttendKeysBlockedV4(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,
                         int64_t key_begin, int64_t key_end, const float* bias,
                         AttentionScratch& scratch) {
#ifdef DYSCO_CPU_X86_64_V4
  if (ActiveCpuIsa() == CpuIsa::kX86_64_V4) {
    switch (head_dim) {
      case 64:
        AttendKeysBlocked512<T, 64>(seq, rows, key_begin, key_end, bias, scratch);
        return true;
      case 128:
        AttendKeysBlocked512<T, 128>(seq, rows, key_begin, key_end, bias, scratch);
        return true;
      default:
        break;
    }
  }
#else
  (void)seq, (void)rows, (void)head_dim, (void)key_begin, (void)key_end, (void)bias, (void)scratch;
#endif
  return false;
}

}  // namespace

CpuIsa SupportedCpuIsa() { return DetectCpuIsa(); }

CpuIsa SetCpuIsaCapForTesting(CpuIsa cap) {
  return static_cast<CpuIsa>(isa_cap.exchange(static_cast<int>(cap)));
}

#define DYSCO_DEFINE_ATTENTION_KERNELS(T)                                                         \
  void AttendKeys(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim, int64_t key_begin, \
                  int64_t key_end, const float* bias, AttentionScratch& scratch) {                \
    if (UseVectorKernels()) {                                                                     \
      AttendKeysVector(seq, rows, head_dim, key_begin, key_end, bias, scratch);                   \
    } else {                                                                                      \
      AttendKeysImpl<T, 0>(seq, rows, head_dim, key_begin, key_end, bias, scratch);               \
    }                                                                                             \
  }                                                                                               \
  void ProbsRow(const PagedSequence<T>& seq, const float* q, int64_t head_dim, int64_t len,       \
                const float* bias, float* key_buffer, float* probs) {                             \
    if (UseVectorKernels()) {                                                                     \
      ProbsRowVector(seq, q, head_dim, len, bias, key_buffer, probs);                             \
    } else {                                                                                      \
      ProbsRowImpl<T, 0>(seq, q, head_dim, len, bias, key_buffer, probs);                         \
    }                                                                                             \
  }                                                                                               \
  bool AttendKeysBlocked(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,             \
                         int64_t key_begin, int64_t key_end, const float* bias,                   \
                         AttentionScratch& scratch) {                                             \
    if (AttendKeysBlockedV4(seq, rows, head_dim, key_begin, key_end, bias, scratch)) {            \
      return true;                                                                                \
    }                                                                                             \
    /* The baseline build keeps the row-at-a-time loops: 12 accumulators spill on SSE. */         \
    return UseVectorKernels() &&                                                                  \
           AttendKeysBlockedVector(seq, rows, head_dim, key_begin, key_end, bias, scratch);       \
  }
DYSCO_DEFINE_ATTENTION_KERNELS(float)
DYSCO_DEFINE_ATTENTION_KERNELS(c10::BFloat16)
DYSCO_DEFINE_ATTENTION_KERNELS(c10::Half)
#undef DYSCO_DEFINE_ATTENTION_KERNELS

}  // namespace dysco::kernels::cpu
