// The inner loops of the CPU paged attention ops: a blockwise online softmax over the keys of one
// sequence for a few query rows that share one KV head. Internal to kernels/cpu.
//
// Why this shape: the keys of one KV head are D-element rows scattered over pages, so every loop
// works on whole rows (contiguous dot products and axpys the compiler vectorises) and each key
// block is read once for all query rows of the KV head (the GQA group, and in prefill several
// tokens). Thread-safety: functions of their arguments; each thread passes its own
// AttentionScratch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

// Vector-extension values in always-inlined helpers trip GCC's ABI note in the baseline build; no
// such value crosses a real call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// Hot loops are compiled in the clones of kernels/cpu/cpu_isa.h: x86-64-v3 (AVX2 + FMA) with the
// fixed-head_dim vector kernels, and the baseline the library is built for, with plain loops the
// compiler vectorises (the vector kernels spill on 16 SSE registers); the blocked prefill also for
// x86-64-v4 (AVX-512, attention_kernel.cpp). attention_kernel.cpp picks one per call from the CPU's
// features; helpers are always inlined so that they are compiled for their caller's ISA. Tests run
// every clone the machine has through SetCpuIsaCapForTesting.
#include "kernels/cpu/cpu_isa.h"

namespace dysco::kernels::cpu {

constexpr int64_t kKeyBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (softmax weights), about 2 ulp, 0 below -87; plain arithmetic so that loops
// over it vectorise (std::exp does not without -ffast-math).
DYSCO_ALWAYS_INLINE float ExpNonPositive(float x) {
  const float clamped = std::max(x, -87.0f);
  // Round x / ln2 to nearest with the 1.5 * 2^23 trick (exact for |t| < 2^22).
  const float t = clamped * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

DYSCO_ALWAYS_INLINE float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += a * x
DYSCO_ALWAYS_INLINE void Axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// 8 and 4 float lanes with GCC vector extensions: AVX registers in the x86-64-v3 clone, pairs of
// SSE registers in the baseline one.
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Index8 __attribute__((vector_size(32)));

DYSCO_ALWAYS_INLINE Vec8 LoadVec8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

DYSCO_ALWAYS_INLINE void StoreVec8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// {sum(a), sum(b), sum(c), sum(d)} with in-lane shuffles (unpcklps / unpckhps / shufps on AVX).
DYSCO_ALWAYS_INLINE Vec4 Sum4(Vec8 a, Vec8 b, Vec8 c, Vec8 d) {
  const Index8 lo = {0, 8, 1, 9, 4, 12, 5, 13};
  const Index8 hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Vec8 ab = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
  const Vec8 cd = __builtin_shuffle(c, d, lo) + __builtin_shuffle(c, d, hi);
  const Index8 pair_lo = {0, 1, 8, 9, 4, 5, 12, 13};
  const Index8 pair_hi = {2, 3, 10, 11, 6, 7, 14, 15};
  const Vec8 abcd = __builtin_shuffle(ab, cd, pair_lo) + __builtin_shuffle(ab, cd, pair_hi);
  return __builtin_shufflevector(abcd, abcd, 0, 1, 2, 3) +
         __builtin_shufflevector(abcd, abcd, 4, 5, 6, 7);
}

DYSCO_ALWAYS_INLINE float Sum(Vec8 a) {
  const Vec4 half =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (half[0] + half[2]) + (half[1] + half[3]);
}

typedef int32_t Int8 __attribute__((vector_size(32)));

// ExpNonPositive on 8 lanes (the same arithmetic).
DYSCO_ALWAYS_INLINE Vec8 ExpNonPositive8(Vec8 x) {
  const Vec8 low = Vec8{} - 87.0f;
  const Vec8 clamped = x > low ? x : low;
  const Vec8 t = clamped * 1.44269504088896341f;
  const Vec8 n = (t + 12582912.0f) - 12582912.0f;
  Vec8 r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec8 p = Vec8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Int8 bits = (__builtin_convertvector(n, Int8) + 127) << 23;
  Vec8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const Vec8 result = p * scale;
  return x < low ? Vec8{} : result;
}

// kVector: use 8-lane vectors (AVX builds); else plain loops, which SSE handles better than 8-lane
// vectors.
template <bool kVector>
DYSCO_ALWAYS_INLINE float MaxOf(const float* s, int64_t n) {
  float max = kNegInf;
  int64_t i = 0;
  if (kVector && n >= 8) {
    Vec8 m = LoadVec8(s);
    for (i = 8; i + 8 <= n; i += 8) {
      const Vec8 v = LoadVec8(s + i);
      m = v > m ? v : m;
    }
    for (int k = 0; k < 8; ++k) max = std::max(max, m[k]);
  }
  for (; i < n; ++i) max = std::max(max, s[i]);
  return max;
}

// s[i] <- exp(s[i] - shift) for i < n (every s[i] <= shift); returns their sum.
template <bool kVector>
DYSCO_ALWAYS_INLINE float ExpShiftedAndSum(float* s, int64_t n, float shift) {
  Vec8 acc = Vec8{};
  int64_t i = 0;
  for (; kVector && i + 8 <= n; i += 8) {
    const Vec8 e = ExpNonPositive8(LoadVec8(s + i) - shift);
    StoreVec8(s + i, e);
    acc += e;
  }
  float sum = 0.0f;
  for (; i < n; ++i) {
    s[i] = ExpNonPositive(s[i] - shift);
    sum += s[i];
  }
  return sum + Sum(acc);
}

// s[i] = q . keys[i] for i < count; kD (a multiple of 8) is the head dimension. Four keys at a
// time, so that four independent accumulators hide the FMA latency and share one reduction.
template <int64_t kD>
DYSCO_ALWAYS_INLINE void ScoreKeysFixed(const float* __restrict q, const float* const* keys,
                                        int64_t count, float* __restrict s) {
  static_assert(kD % 8 == 0, "kD must be a multiple of 8");
  Vec8 qv[kD / 8];
  for (int64_t c = 0; c < kD / 8; ++c) qv[c] = LoadVec8(q + 8 * c);
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float* k0 = keys[i];
    const float* k1 = keys[i + 1];
    const float* k2 = keys[i + 2];
    const float* k3 = keys[i + 3];
    Vec8 a0 = qv[0] * LoadVec8(k0);
    Vec8 a1 = qv[0] * LoadVec8(k1);
    Vec8 a2 = qv[0] * LoadVec8(k2);
    Vec8 a3 = qv[0] * LoadVec8(k3);
    for (int64_t c = 1; c < kD / 8; ++c) {
      a0 += qv[c] * LoadVec8(k0 + 8 * c);
      a1 += qv[c] * LoadVec8(k1 + 8 * c);
      a2 += qv[c] * LoadVec8(k2 + 8 * c);
      a3 += qv[c] * LoadVec8(k3 + 8 * c);
    }
    const Vec4 sums = Sum4(a0, a1, a2, a3);
    std::memcpy(s + i, &sums, sizeof(sums));
  }
  for (; i < count; ++i) {
    Vec8 a = qv[0] * LoadVec8(keys[i]);
    for (int64_t c = 1; c < kD / 8; ++c) a += qv[c] * LoadVec8(keys[i] + 8 * c);
    s[i] = Sum(a);
  }
}

// acc += sum_i p[i] * values[i], the kD accumulators held in registers across the keys.
// Columns go in slices of 32 so that the accumulators fit the 16 registers of SSE as well as AVX.
template <int64_t kD>
DYSCO_ALWAYS_INLINE void AccumulateValuesFixed(float* __restrict acc, const float* __restrict p,
                                               const float* const* values, int64_t count) {
  static_assert(kD % 32 == 0, "kD must be a multiple of 32");
  for (int64_t slice = 0; slice < kD; slice += 32) {
    Vec8 o[4];
    for (int64_t c = 0; c < 4; ++c) o[c] = LoadVec8(acc + slice + 8 * c);
    for (int64_t i = 0; i < count; ++i) {
      const Vec8 w = Vec8{} + p[i];
      const float* v = values[i] + slice;
      for (int64_t c = 0; c < 4; ++c) o[c] += w * LoadVec8(v + 8 * c);
    }
    for (int64_t c = 0; c < 4; ++c) StoreVec8(acc + slice + 8 * c, o[c]);
  }
}

template <typename T>
DYSCO_ALWAYS_INLINE void ToFloat(float* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The keys and values of one KV head of one sequence in the paged cache.
template <typename T>
struct PagedSequence {
  const T* k = nullptr;            // K half of the cache, offset to the KV head
  const T* v = nullptr;            // V half of the cache, offset to the KV head
  const int32_t* pages = nullptr;  // the sequence's block table row
  int64_t page_size = 0;
  int64_t token_stride = 0;  // Hkv * D
  int64_t page_stride = 0;   // page_size * Hkv * D
};

// Walks a sequence's keys in order over its pages, without a division per key: Next() is the cache
// offset (into PagedSequence::k and ::v) of the current key, and moves on to the next one.
struct KeyCursor {
  int64_t page_index = 0;
  int64_t in_page = 0;

  KeyCursor() = default;
  template <typename T>
  KeyCursor(const PagedSequence<T>& seq, int64_t key)
      : page_index(key / seq.page_size), in_page(key % seq.page_size) {}

  template <typename T>
  DYSCO_ALWAYS_INLINE int64_t Next(const PagedSequence<T>& seq) {
    const int64_t offset = seq.pages[page_index] * seq.page_stride + in_page * seq.token_stride;
    if (++in_page == seq.page_size) {
      in_page = 0;
      ++page_index;
    }
    return offset;
  }
};

// Per-thread buffers, sized once per work chunk (never per key).
struct AttentionScratch {
  std::vector<float> scores;     // [rows, kKeyBlock]
  std::vector<float> keys;       // [kKeyBlock, D], only for non-float caches
  std::vector<float> values;     // [kKeyBlock, D], only for non-float caches
  std::vector<float> query;      // [rows, D], scaled
  std::vector<float> max;        // [rows]
  std::vector<float> sum;        // [rows]
  std::vector<float> acc;        // [rows, D]
  std::vector<int64_t> row_end;  // [rows]

  void Reserve(int64_t rows, int64_t head_dim) {
    scores.resize(rows * kKeyBlock);
    keys.resize(kKeyBlock * head_dim);
    values.resize(kKeyBlock * head_dim);
    query.resize(rows * head_dim);
    max.resize(rows);
    sum.resize(rows);
    acc.resize(rows * head_dim);
    row_end.resize(rows);
  }
  void ResetState(int64_t rows, int64_t head_dim) {
    std::fill(max.begin(), max.begin() + rows, kNegInf);
    std::fill(sum.begin(), sum.begin() + rows, 0.0f);
    std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.0f);
  }
};

// Online softmax of scratch.query rows (already scaled) over keys [key_begin, key_end) of seq; row
// r only sees keys < scratch.row_end[r]. Updates scratch.max / sum / acc (running max, sum of
// weights, weighted sum of values). bias: the sequence's key_bias row or nullptr. kD: the head
// dimension when known at compile time (a multiple of 8), else 0.
template <typename T, int64_t kD>
DYSCO_ALWAYS_INLINE void AttendKeysImpl(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,
                                        int64_t key_begin, int64_t key_end, const float* bias,
                                        AttentionScratch& scratch) {
  const float* key_rows[kKeyBlock];
  const float* value_rows[kKeyBlock];
  KeyCursor cursor(seq, key_begin);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, key_end - j0);
    for (int64_t i = 0; i < block; ++i) {
      const int64_t offset = cursor.Next(seq);
      if constexpr (std::is_same_v<T, float>) {
        key_rows[i] = seq.k + offset;
        value_rows[i] = seq.v + offset;
      } else {
        float* k = scratch.keys.data() + i * head_dim;
        float* v = scratch.values.data() + i * head_dim;
        ToFloat(k, seq.k + offset, head_dim);
        ToFloat(v, seq.v + offset, head_dim);
        key_rows[i] = k;
        value_rows[i] = v;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t count = std::min(scratch.row_end[r], j0 + block) - j0;
      if (count <= 0) continue;
      const float* q = scratch.query.data() + r * head_dim;
      float* s = scratch.scores.data() + r * kKeyBlock;
      if constexpr (kD > 0) {
        ScoreKeysFixed<kD>(q, key_rows, count, s);
      } else {
        for (int64_t i = 0; i < count; ++i) s[i] = Dot(q, key_rows[i], head_dim);
      }
      if (bias != nullptr) {
        for (int64_t i = 0; i < count; ++i) s[i] += bias[j0 + i];
      }
      const float block_max = MaxOf<(kD > 0)>(s, count);
      const float old_max = scratch.max[r];
      const float new_max = std::max(old_max, block_max);
      if (new_max == kNegInf) continue;  // every key so far is masked: nothing to add
      const float block_sum = ExpShiftedAndSum<(kD > 0)>(s, count, new_max);
      float* acc = scratch.acc.data() + r * head_dim;
      if (old_max != new_max) {
        const float correction = old_max == kNegInf ? 0.0f : std::exp(old_max - new_max);
        scratch.sum[r] *= correction;
        for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;
      }
      scratch.sum[r] += block_sum;
      scratch.max[r] = new_max;
      if constexpr (kD > 0) {
        AccumulateValuesFixed<kD>(acc, s, value_rows, count);
      } else {
        for (int64_t i = 0; i < count; ++i) Axpy(acc, s[i], value_rows[i], head_dim);
      }
    }
  }
}

// Softmax probabilities of query q (scaled, [D]) over keys [0, len) of seq, after bias (or
// nullptr), into probs[0, len); zeros when every logit is -inf. key_buffer: [kKeyBlock, D] floats
// for non-float caches.
template <typename T, int64_t kD>
DYSCO_ALWAYS_INLINE void ProbsRowImpl(const PagedSequence<T>& seq, const float* q, int64_t head_dim,
                                      int64_t len, const float* bias, float* key_buffer,
                                      float* probs) {
  const float* key_rows[kKeyBlock];
  KeyCursor cursor;
  for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, len - j0);
    for (int64_t i = 0; i < block; ++i) {
      const T* key = seq.k + cursor.Next(seq);
      if constexpr (std::is_same_v<T, float>) {
        key_rows[i] = key;
      } else {
        ToFloat(key_buffer + i * head_dim, key, head_dim);
        key_rows[i] = key_buffer + i * head_dim;
      }
    }
    if constexpr (kD > 0) {
      ScoreKeysFixed<kD>(q, key_rows, block, probs + j0);
    } else {
      for (int64_t i = 0; i < block; ++i) probs[j0 + i] = Dot(q, key_rows[i], head_dim);
    }
  }
  if (bias != nullptr) {
    for (int64_t j = 0; j < len; ++j) probs[j] += bias[j];
  }
  const float max = MaxOf<(kD > 0)>(probs, len);
  if (max == kNegInf) {
    std::fill(probs, probs + len, 0.0f);
    return;
  }
  const float sum = ExpShiftedAndSum<(kD > 0)>(probs, len, max);
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < len; ++j) probs[j] *= inv;
}

// ---- Blocked prefill: many query rows (a chunk's tokens times the GQA group) against tiles of
// kKeyBlock keys gathered from the pages into contiguous fp32 buffers, so that the two products
// S = Q K^T and acc += P V run as small register-blocked matrix products (kRowBlock rows by 16
// columns, 12 vector accumulators) instead of one dot product per (row, key): each loaded key or
// value vector then feeds kRowBlock FMAs instead of one, which is what brings long prefills to
// matmul speed. Online softmax per row between the two products, as AttendKeysImpl.

constexpr int kRowBlock = 5;

// x in every lane: one vbroadcastss (Vec8{} + x would add 0.0f first: -0.0f + 0.0f is +0.0f).
DYSCO_ALWAYS_INLINE Vec8 Splat8(float x) { return Vec8{x, x, x, x, x, x, x, x}; }

// s[r][j] = q[r] . keys_t[:, j] for r < MR, j < cols (a multiple of 16). q: MR rows of kD floats;
// keys_t: [kD, kKeyBlock] (the tile transposed); s: rows of kKeyBlock floats.
template <int MR, int64_t kD>
DYSCO_ALWAYS_INLINE void ScoreTile(const float* __restrict q, const float* __restrict keys_t,
                                   int64_t cols, float* __restrict s) {
  for (int64_t j = 0; j < cols; j += 16) {
    Vec8 a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = Vec8{};
    for (int64_t d = 0; d < kD; ++d) {
      const Vec8 k0 = LoadVec8(keys_t + d * kKeyBlock + j);
      const Vec8 k1 = LoadVec8(keys_t + d * kKeyBlock + j + 8);
      for (int r = 0; r < MR; ++r) {
        const Vec8 qb = Splat8(q[r * kD + d]);
        a[r][0] += qb * k0;
        a[r][1] += qb * k1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      StoreVec8(s + r * kKeyBlock + j, a[r][0]);
      StoreVec8(s + r * kKeyBlock + j + 8, a[r][1]);
    }
  }
}

// acc[r] += sum_{j < count} p[r][j] * value_rows[j] for r < MR. acc: MR rows of kD floats; p: rows
// of kKeyBlock floats; value_rows: kKeyBlock pointers to kD floats (GatherKeyTile). kD a multiple
// of 16.
template <int MR, int64_t kD>
DYSCO_ALWAYS_INLINE void AccumulateTile(float* __restrict acc, const float* __restrict p,
                                        const float* const* value_rows, int64_t count) {
  for (int64_t c = 0; c < kD; c += 16) {
    Vec8 o[MR][2];
    for (int r = 0; r < MR; ++r) {
      o[r][0] = LoadVec8(acc + r * kD + c);
      o[r][1] = LoadVec8(acc + r * kD + c + 8);
    }
    for (int64_t j = 0; j < count; ++j) {
      const Vec8 v0 = LoadVec8(value_rows[j] + c);
      const Vec8 v1 = LoadVec8(value_rows[j] + c + 8);
      for (int r = 0; r < MR; ++r) {
        const Vec8 pb = Splat8(p[r * kKeyBlock + j]);
        o[r][0] += pb * v0;
        o[r][1] += pb * v1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      StoreVec8(acc + r * kD + c, o[r][0]);
      StoreVec8(acc + r * kD + c + 8, o[r][1]);
    }
  }
}

// Calls f(std::integral_constant<int, rows>()) for rows in 1..6 (the tiles' row counts; anything
// else is taken as 1), so that the tile kernels get their row count at compile time.
template <typename F>
DYSCO_ALWAYS_INLINE void WithTileRows(int rows, F&& f) {
  switch (rows) {
    case 6:
      return f(std::integral_constant<int, 6>());
    case 5:
      return f(std::integral_constant<int, 5>());
    case 4:
      return f(std::integral_constant<int, 4>());
    case 3:
      return f(std::integral_constant<int, 3>());
    case 2:
      return f(std::integral_constant<int, 2>());
    default:
      return f(std::integral_constant<int, 1>());
  }
}

template <int64_t kD>
DYSCO_ALWAYS_INLINE void ScoreTileRows(int rows, const float* q, const float* keys_t, int64_t cols,
                                       float* s) {
  WithTileRows(rows, [&](auto r) { ScoreTile<decltype(r)::value, kD>(q, keys_t, cols, s); });
}

template <int64_t kD>
DYSCO_ALWAYS_INLINE void AccumulateTileRows(int rows, float* acc, const float* p,
                                            const float* const* value_rows, int64_t count) {
  WithTileRows(rows,
               [&](auto r) { AccumulateTile<decltype(r)::value, kD>(acc, p, value_rows, count); });
}

// Whether the blocked kernels prefetch the next key tile: yes unless DYSCO_CPU_PREFETCH_TILE=0
// (read once; for A/B timing in separate processes).
inline bool PrefetchNextKeyTile() {
  static const bool enabled = [] {
    const char* v = std::getenv("DYSCO_CPU_PREFETCH_TILE");
    return v == nullptr || std::string_view(v) != "0";
  }();
  return enabled;
}

// Asks for the K and V rows of the next `block` keys at `cursor` (a copy: the caller's does not
// move) to be brought into L2. A tile's rows lie one token stride apart within a page and pages
// anywhere, which the hardware prefetchers do not follow: the gather's loads of K missed and
// stalled (5.7% of a 7K prefill's samples, most of them on the first load of each row;
// docs/performance.md "Prefetching the next key tile"). L2, not L1: the current tile (K transposed
// and V, 32 KB for D 64) fills L1.
template <typename T, int64_t kD>
DYSCO_ALWAYS_INLINE void PrefetchKeyTile(const PagedSequence<T>& seq, int64_t block,
                                         KeyCursor cursor) {
  constexpr int64_t kLine = 64;
  constexpr int64_t kRowBytes = kD * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < block; ++i) {
    const int64_t offset = cursor.Next(seq);
    const char* k = reinterpret_cast<const char*>(seq.k + offset);
    const char* v = reinterpret_cast<const char*>(seq.v + offset);
    for (int64_t b = 0; b < kRowBytes; b += kLine) {
      __builtin_prefetch(k + b, 0, 2);
      __builtin_prefetch(v + b, 0, 2);
    }
  }
}

// The next `block` keys of `seq` at `*cursor` (advanced past them) as fp32 tiles: K transposed into
// keys_t [kD, kKeyBlock], zero-padded to a multiple of 16 keys (padding lanes score 0 and are
// masked: they only need to be finite); value_rows[i] -> key i's V as kD floats: the cache's own
// row for a float cache (read in place: copying the rows was 4% of a 7K prefill's samples; in
// place, the 7K TTFT moved by -1.6% on average over 7 alternated pairs, within their spread,
// docs/performance.md), else its conversion in values [kKeyBlock, kD]. Then the `next_block` keys
// after them are prefetched while the caller computes this tile (PrefetchKeyTile; unless
// PrefetchNextKeyTile says not). Shared by the blocked kernels of every instruction set.
template <typename T, int64_t kD>
DYSCO_ALWAYS_INLINE void GatherKeyTile(const PagedSequence<T>& seq, int64_t block,
                                       int64_t next_block, KeyCursor* cursor, float* keys_t,
                                       float* values, const float** value_rows) {
  for (int64_t i = 0; i < block; ++i) {
    const int64_t offset = cursor->Next(seq);
    const T* k = seq.k + offset;
    for (int64_t d = 0; d < kD; ++d) keys_t[d * kKeyBlock + i] = static_cast<float>(k[d]);
    if constexpr (std::is_same_v<T, float>) {
      value_rows[i] = seq.v + offset;
    } else {
      ToFloat(values + i * kD, seq.v + offset, kD);
      value_rows[i] = values + i * kD;
    }
  }
  const int64_t padded = (block + 15) / 16 * 16;
  for (int64_t d = 0; d < kD; ++d) {
    std::fill(keys_t + d * kKeyBlock + block, keys_t + d * kKeyBlock + padded, 0.0f);
  }
  if (next_block > 0 && PrefetchNextKeyTile()) PrefetchKeyTile<T, kD>(seq, next_block, *cursor);
}

// As AttendKeysImpl (same arguments, same scratch state), blocked: kD, the head dimension, is a
// multiple of 16. scratch.keys holds the tile transposed [kD, kKeyBlock], scratch.values the tile
// [kKeyBlock, kD]. Rows whose keys in a tile are all masked (causal or -inf bias) get zero weights.
template <typename T, int64_t kD>
DYSCO_ALWAYS_INLINE void AttendKeysBlockedImpl(const PagedSequence<T>& seq, int64_t rows,
                                               int64_t key_begin, int64_t key_end,
                                               const float* bias, AttentionScratch& scratch) {
  static_assert(kD % 16 == 0, "kD must be a multiple of 16");
  float* keys_t = scratch.keys.data();
  float* values = scratch.values.data();
  const float* value_rows[kKeyBlock];
  KeyCursor cursor(seq, key_begin);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, key_end - j0);
    const int64_t next_block = std::min(kKeyBlock, key_end - j0 - block);
    GatherKeyTile<T, kD>(seq, block, next_block, &cursor, keys_t, values, value_rows);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int block_rows = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
      // Keys of this tile that some row of the block sees (rows see key prefixes).
      int64_t block_count = 0;
      for (int r = 0; r < block_rows; ++r) {
        block_count = std::max(block_count, std::min(scratch.row_end[r0 + r], j0 + block) - j0);
      }
      if (block_count <= 0) continue;
      float* s = scratch.scores.data() + r0 * kKeyBlock;
      ScoreTileRows<kD>(block_rows, scratch.query.data() + r0 * kD, keys_t,
                        (block_count + 15) / 16 * 16, s);
      bool any = false;
      for (int r = 0; r < block_rows; ++r) {
        const int64_t row = r0 + r;
        float* sr = s + r * kKeyBlock;
        const int64_t count = std::min(scratch.row_end[row], j0 + block) - j0;
        if (count <= 0) {
          std::fill(sr, sr + block_count, 0.0f);
          continue;
        }
        if (bias != nullptr) {
          for (int64_t i = 0; i < count; ++i) sr[i] += bias[j0 + i];
        }
        std::fill(sr + count, sr + block_count, 0.0f);
        const float block_max = MaxOf<true>(sr, count);
        const float old_max = scratch.max[row];
        const float new_max = std::max(old_max, block_max);
        if (new_max == kNegInf) {  // every key so far is masked: nothing to add
          std::fill(sr, sr + count, 0.0f);
          continue;
        }
        const float block_sum = ExpShiftedAndSum<true>(sr, count, new_max);
        if (old_max != new_max) {
          const float correction = old_max == kNegInf ? 0.0f : std::exp(old_max - new_max);
          scratch.sum[row] *= correction;
          float* acc = scratch.acc.data() + row * kD;
          for (int64_t d = 0; d < kD; ++d) acc[d] *= correction;
        }
        scratch.sum[row] += block_sum;
        scratch.max[row] = new_max;
        any = true;
      }
      if (any) {
        AccumulateTileRows<kD>(block_rows, scratch.acc.data() + r0 * kD, s, value_rows,
                               block_count);
      }
    }
  }
}

// The instruction sets the kernels come in: baseline (plain loops), x86-64-v3 (AVX2 + FMA; on other
// architectures the vector-extension kernels) and x86-64-v4 (AVX-512, the blocked prefill only).
enum class CpuIsa : int { kBaseline = 0, kX86_64_V3 = 1, kX86_64_V4 = 2 };

// The widest of those this build and this CPU run.
CpuIsa SupportedCpuIsa();

// Caps the instruction set the kernels pick (tests run every path the machine has); returns the
// previous cap. Not while kernels run.
CpuIsa SetCpuIsaCapForTesting(CpuIsa cap);

// The multiversioned entry points (attention_kernel.cpp), one per cache dtype.
#define DYSCO_DECLARE_ATTENTION_KERNELS(T)                                                        \
  void AttendKeys(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim, int64_t key_begin, \
                  int64_t key_end, const float* bias, AttentionScratch& scratch);                 \
  void ProbsRow(const PagedSequence<T>& seq, const float* q, int64_t head_dim, int64_t len,       \
                const float* bias, float* key_buffer, float* probs);                              \
  bool AttendKeysBlocked(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,             \
                         int64_t key_begin, int64_t key_end, const float* bias,                   \
                         AttentionScratch& scratch);
DYSCO_DECLARE_ATTENTION_KERNELS(float)
DYSCO_DECLARE_ATTENTION_KERNELS(c10::BFloat16)
DYSCO_DECLARE_ATTENTION_KERNELS(c10::Half)
#undef DYSCO_DECLARE_ATTENTION_KERNELS

// out row r <- acc[r] / sum[r], zeros when the row saw no unmasked key.
template <typename T>
void WriteNormalised(const AttentionScratch& scratch, int64_t r, int64_t head_dim, T* out) {
  const float sum = scratch.sum[r];
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const float* acc = scratch.acc.data() + r * head_dim;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

}  // namespace dysco::kernels::cpu
