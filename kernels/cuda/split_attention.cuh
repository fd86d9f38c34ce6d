// The split-KV attention kernels' shared parts (kernels/cuda/paged_attention.cu, the scalar kernel,
// and kernels/cuda/split_attention_vec.cu, the vectorised one): the parameter block, the mapping of
// a query token to its sequence and causal limit, and the vectorised kernel's launcher. Internal to
// kernels/cuda.
//
// Thread-safety: stateless. Ownership: AttentionParams points into the caller's tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"

namespace dysco::kernels {

constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = kAttentionWarps * cuda::kWarpSize;

// Everything the attention kernel reads, by value.
template <typename T>
struct AttentionParams {
  const T* query;                  // [tokens, Hq, D]
  const T* k_cache;                // [NP, PS, Hkv, D]
  const T* v_cache;                // [NP, PS, Hkv, D]
  const int32_t* tables;           // [B, P]
  const int64_t* seq_lens;         // [B]
  const int64_t* query_start_loc;  // [B + 1] for prefill, nullptr for decode (token b = sequence b)
  const float* bias;               // [B, bias_width] or nullptr
  float* partial;                  // [tokens, Hq, splits, D + 2]: max, sum, acc[D]
  // The merge in the split kernel itself (tensor-core kernel only): one counter per (token, KV
  // head, row chunk), zero before the launch and left zero after it; the last of a chunk's split
  // blocks to finish merges the chunk's rows into `out` (SplitMergeCounters, paged_attention.cu).
  // Null: MergeSplitsKernel merges after the split kernel.
  unsigned* merge_counters;
  T* out;  // [tokens, Hq, D], with merge_counters
  int64_t batch;
  int64_t max_pages;
  int64_t page_size;
  int64_t num_pages;
  int64_t bias_width;
  int64_t split_len;
  // > 0: each token's splits are cut from its own key count instead (SplitKeys), none shorter than
  // this many keys nor longer than split_len; 0: every split is split_len keys (the table width's).
  int64_t min_split_len;
  int num_splits;
  int num_heads;
  int group;
  int head_dim;
  int row_chunks;     // ceil(group / kRows)
  bool vector_loads;  // head_dim % 8 == 0 and a 16-byte aligned cache: K rows read 8 elements at a
                      // time
  // The tensor-core kernel, decode calls only: launched to start while the kernel ahead finishes
  // (cuda_common.cuh), each warp loads its first tile of keys before it waits for that kernel when
  // the tile lies wholly before the row's newest key, which the kernel ahead (the model's
  // qk_norm_rope_kv_write) may still be writing, with the query. Before the wait it reads only
  // older keys, the block tables, seq_lens and the bias (docs/gpu.md "The decode attention starts
  // early").
  bool early_keys;
  // With early_keys: whether the warps load their first tile before the wait (else the kernel only
  // starts early and reads everything after it; DYSCO_CUDA_ATTENTION_EARLY_TILE=0, an A/B knob for
  // the long tables, docs/gpu.md "What remains of issue 9").
  bool early_tile;
  float scale;
  // The tensor-core kernel, decode calls with one row chunk a KV head only (the fused
  // qk_norm_rope_attention_decode; null otherwise): the query rows are made from the fused q/k/v
  // projection qkv [tokens, (Hq + 2 Hkv) D] after the wait, as qk_norm_rope_kv_write makes them
  // (norm_rope.cuh WarpNormRopeHead: the same bits), and written to `query` by split 0; the split
  // holding a token's newest key first writes that key (normed, rotated) and its value to the
  // cache at slots[token] (skipped where the slot is outside [0, num_slots)), before any of its
  // tiles reads it; no other block reads that key (docs/gpu.md "The q/k norms, rope and KV write
  // in the decode attention").
  const T* qkv;
  const T* rope_cos;     // [tokens, D]
  const T* rope_sin;     // [tokens, D]
  const T* q_norm;       // [D], or nullptr (no per-head norms)
  const T* k_norm;       // [D], with q_norm
  const int64_t* slots;  // [tokens]
  T* query_out;          // [tokens, Hq, D]: the query rows made from qkv
  int64_t num_slots;
  float eps;
  // The tensor-core kernel, decode calls with probes (qk_norm_rope_attention_decode's probs; null
  // otherwise): the selected heads' attention probabilities in the same pass. Each block stores the
  // logits (scaled scores + bias, as its softmax takes them) of its probed rows' keys into
  // probe_logits at the row's first slot in probe_heads, and the merge stores each probed row's
  // final max and sum into probe_stats; a normalise kernel then writes the probabilities
  // (docs/gpu.md "The selected heads' probabilities in the same pass").
  float* probe_logits;         // [B, num_probe, probe_len]
  float2* probe_stats;         // [B, num_probe]
  const int64_t* probe_heads;  // [num_probe], clamped to [0, Hq) as attention_probs clamps them
  int num_probe;
  int64_t probe_len;
};

// The first of heads[0, count) that names query head `head` (each clamped to [0, num_heads), as
// attention_probs clamps them), or -1. A head probed twice has its logits and stats at its first
// slot: the tensor-core kernel stores them there and ProbsFromLogitsKernel reads them from there,
// both through this function.
__device__ __forceinline__ int FirstProbeSlot(const int64_t* heads, int count, int num_heads,
                                              int64_t head) {
  for (int i = 0; i < count; ++i) {
    if (cuda::Clamp(heads[i], int64_t{0}, int64_t{num_heads - 1}) == head) return i;
  }
  return -1;
}

// The sequence of a query token and the number of keys it sees (0: none; its output is zeros).
template <typename T>
__device__ void TokenSequence(const AttentionParams<T>& p, int64_t token, int64_t* seq,
                              int64_t* limit) {
  const int64_t max_keys = p.max_pages * p.page_size;
  int64_t b = token;
  int64_t q_len = 1;
  int64_t index = 0;  // of the token among its sequence's new tokens
  if (p.query_start_loc != nullptr) {
    // The last sequence whose start is <= token (starts are non-decreasing in a valid call).
    int64_t lo = 0;
    int64_t hi = p.batch;  // answer in [lo, hi)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.query_start_loc[mid] <= token) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    b = lo;
    const int64_t start = p.query_start_loc[b];
    const int64_t end = p.query_start_loc[b + 1];
    if (token < start || token >= end) {
      *seq = b;
      *limit = 0;
      return;
    }
    q_len = end - start;
    index = token - start;
  }
  int64_t len = cuda::Clamp(p.seq_lens[b], 0, max_keys);
  if (p.bias != nullptr) len = min(len, p.bias_width);
  *seq = b;
  *limit = cuda::Clamp(len - q_len + index + 1, 0, len);
}

// The keys [*begin, *end) that split `split` of a token seeing `limit` keys takes. With
// p.min_split_len, the token's num_splits splits share its own keys (a multiple of 16 each, at
// least min_split_len, at most split_len): the launcher sizes split_len from the block table's
// width, which a CUDA graph pads to a power of two, so that cut from the width a row of 8200 keys
// in a 16384-key bucket had 25 of 49 splits (200 blocks for 396 places at 8 KV heads on the H200)
// and 131088 keys in a 256K bucket the same half grid (docs/gpu.md "Splits from the row's own
// length"). A row as wide as the table gets split_len (the same splits, the same bits).
template <typename T>
__device__ __forceinline__ void SplitKeys(const AttentionParams<T>& p, int64_t limit, int split,
                                          int64_t* begin, int64_t* end) {
  int64_t len = p.split_len;
  if (p.min_split_len > 0) {
    // Rounded up to 16 as the launcher rounds split_len.
    const int64_t even = cuda::CeilDiv(cuda::CeilDiv(limit, p.num_splits), 16) * 16;
    len = min(p.split_len, max(p.min_split_len, even));
  }
  *begin = min(limit, split * len);
  *end = min(limit, *begin + len);
}

// The weight exp(m - max) of a partial softmax state (a split's, or a warp's within a split) with
// maximum m in a merge whose maximum is max; 0 for one that saw no key (m -inf, sum 0), with no
// NaN from -inf - -inf.
__device__ __forceinline__ float SplitWeight(float m, float max) {
  return m == -INFINITY ? 0.0f : expf(m - max);
}

// The end of every split kernel: combines the block's warps' softmax states and writes each query
// row's split partial (max, sum, acc[head_dim]) for split `split` of `token`; warp w takes rows w,
// w + kAttentionWarps, ... The states are in shared memory, written by every warp before a
// __syncthreads(): s_m[w * row_stride + r], s_l[same], s_acc[(w * row_stride + r) * acc_stride +
// d].
template <typename T>
__device__ void WriteSplitPartials(const AttentionParams<T>& p, int64_t token, int split, int head0,
                                   int rows, int row_stride, int acc_stride, const float* s_m,
                                   const float* s_l, const float* s_acc) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int warp = threadIdx.x / cuda::kWarpSize;
  for (int r = warp; r < rows; r += kAttentionWarps) {
    float max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) max = fmaxf(max, s_m[w * row_stride + r]);
    float weights[kAttentionWarps];
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) {
      const float m = s_m[w * row_stride + r];
      weights[w] = SplitWeight(m, max);
      sum += s_l[w * row_stride + r] * weights[w];
    }
    float* out =
        p.partial + ((token * p.num_heads + head0 + r) * p.num_splits + split) * (p.head_dim + 2);
    if (lane == 0) {
      out[0] = max;
      out[1] = sum;
    }
    for (int d = lane; d < p.head_dim; d += cuda::kWarpSize) {
      float a = 0.0f;
#pragma unroll
      for (int w = 0; w < kAttentionWarps; ++w) {
        a += s_acc[(w * row_stride + r) * acc_stride + d] * weights[w];
      }
      out[2 + d] = a;
    }
  }
}

// The log-sum-exp statistics of one row's splits (part: its split 0's partial, `stride` floats a
// split), run by one whole warp: returns (max, sum) of the row, max over the splits' maxima and sum
// of each split's sum times its weight exp(max_s - max), and stores split s's weight in s_weight[s]
// for s < capacity. Each lane reads the max and sum of its first kStatsPerLane splits once and
// keeps them in registers (one L2 round trip instead of two for up to 128 splits); every lane adds
// its splits in the order s = lane, lane + 32, ..., so the bits do not depend on kStatsPerLane.
__device__ __forceinline__ float2 WarpSplitStats(const float* part, int64_t stride, int num_splits,
                                                 float* s_weight, int capacity) {
  constexpr int kStatsPerLane = 4;  // splits 0..127 keep their max and sum in registers
  const int lane = threadIdx.x % cuda::kWarpSize;
  float split_max[kStatsPerLane];
  float split_sum[kStatsPerLane];
#pragma unroll
  for (int i = 0; i < kStatsPerLane; ++i) {
    const int s = lane + cuda::kWarpSize * i;
    split_max[i] = -INFINITY;
    split_sum[i] = 0.0f;
    if (s < num_splits) {
      split_max[i] = __ldcg(part + s * stride);
      split_sum[i] = __ldcg(part + s * stride + 1);
    }
  }
  float max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kStatsPerLane; ++i) max = fmaxf(max, split_max[i]);
  for (int s = lane + cuda::kWarpSize * kStatsPerLane; s < num_splits; s += cuda::kWarpSize)
    max = fmaxf(max, __ldcg(part + s * stride));
  max = cuda::WarpMax(max);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kStatsPerLane; ++i) {
    const int s = lane + cuda::kWarpSize * i;
    if (s < num_splits) {
      const float w = SplitWeight(split_max[i], max);
      if (s < capacity) s_weight[s] = w;
      sum += split_sum[i] * w;
    }
  }
  for (int s = lane + cuda::kWarpSize * kStatsPerLane; s < num_splits; s += cuda::kWarpSize) {
    const float w = SplitWeight(__ldcg(part + s * stride), max);
    if (s < capacity) s_weight[s] = w;
    sum += __ldcg(part + s * stride + 1) * w;
  }
  return make_float2(max, cuda::WarpSum(sum));
}

// One query row's merge once its splits' statistics are known (both WarpMergeSplits paths): its
// partials (split 0's, `stride` floats a split), the row's max, 1 / its sum (0 when no split saw a
// key), and the weight of a split past s_weight's capacity, recomputed.
struct SplitMergeRow {
  const float* part;
  int64_t stride;
  float max;
  float inv;
  __device__ __forceinline__ float Weight(int s) const {
    return SplitWeight(__ldcg(part + s * stride), max);
  }
};

// The start of a merge, run by one whole warp: the row's WarpSplitStats, stored to `stats` by lane
// 0 when given, and s_weight made visible to the whole warp.
__device__ __forceinline__ SplitMergeRow StartSplitMerge(const float* partial, int64_t row,
                                                         int num_splits, int head_dim,
                                                         float* s_weight, int capacity,
                                                         float2* stats) {
  const int64_t stride = head_dim + 2;
  const float* part = partial + row * num_splits * stride;
  const float2 row_stats = WarpSplitStats(part, stride, num_splits, s_weight, capacity);
  if (stats != nullptr && threadIdx.x % cuda::kWarpSize == 0) *stats = row_stats;
  __syncwarp();  // s_weight written by the other lanes
  return SplitMergeRow{part, stride, row_stats.x, row_stats.y > 0.0f ? 1.0f / row_stats.y : 0.0f};
}

// Merges the splits of query row `row` (token * Hq + head) by log-sum-exp into out[row]; zeros when
// no split saw a key. Run by one whole warp. s_weight: this warp's shared scratch of `capacity`
// floats (each split's weight exp(max_s - max); splits past it recompute theirs). The partials are
// read through L2 (ld.cg): in the split kernel's own merge they were written by other blocks of
// the running grid, and L1 is not coherent across multiprocessors. The same arithmetic in the same
// order in MergeSplitsKernel and in the split kernel's merge, so both give the same bits.
// stats (optional): the row's final max and sum of exp(score - max), stored by lane 0.
// Why a warp per row and this shape: the merge is latency-bound (the partials sit in L2, ~0.3 us a
// round trip) and, in the split kernel's own merge, on the critical path of every decode attention
// call (docs/gpu.md "The merge in fewer round trips"). So each lane reads its splits' max and sum
// in one pass and keeps them in registers (WarpSplitStats), and reads the accumulators of all its
// dims (kChunks runs of 64) for kUnroll splits at once: 3 round trips for a 32-split row of
// head_dim 128 where the first version took ~10. Every dim still sums its splits in order 0, 1,
// ..., so the bits do not depend on kUnroll or kChunks.
template <typename T, int kChunks>
__device__ void WarpMergeSplitsChunks(T* out, const float* partial, int64_t row, int num_splits,
                                      int head_dim, float* s_weight, int capacity, float2* stats) {
  constexpr int kUnroll = 32 / kChunks;  // ~64 floats of accumulator loads in flight a lane
  const int lane = threadIdx.x % cuda::kWarpSize;
  const SplitMergeRow m =
      StartSplitMerge(partial, row, num_splits, head_dim, s_weight, capacity, stats);
  const float* part = m.part;
  const int64_t stride = m.stride;
  // Lane l takes dims 2 l, 2 l + 1 of each run of 64 (8-byte loads: a row's accumulators start 8
  // bytes into its split's D + 2 floats; D even).
  float a[kChunks][2];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) a[c][0] = a[c][1] = 0.0f;
  auto dim = [&](int c) { return 64 * c + 2 * lane; };
  int s = 0;
  for (; s + kUnroll <= num_splits && s + kUnroll <= capacity; s += kUnroll) {
    float2 values[kUnroll][kChunks];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        values[u][c] =
            dim(c) < head_dim
                ? __ldcg(reinterpret_cast<const float2*>(part + (s + u) * stride + 2 + dim(c)))
                : make_float2(0.0f, 0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float w = s_weight[s + u];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        a[c][0] += values[u][c].x * w;
        a[c][1] += values[u][c].y * w;
      }
    }
  }
  for (; s < num_splits; ++s) {
    const float w = s < capacity ? s_weight[s] : m.Weight(s);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (dim(c) < head_dim) {
        const float2 v = __ldcg(reinterpret_cast<const float2*>(part + s * stride + 2 + dim(c)));
        a[c][0] += v.x * w;
        a[c][1] += v.y * w;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (dim(c) < head_dim) {
      out[row * head_dim + dim(c)] = cuda::Convert<T>::FromFloat(a[c][0] * m.inv);
      out[row * head_dim + dim(c) + 1] = cuda::Convert<T>::FromFloat(a[c][1] * m.inv);
    }
  }
}

// WarpMergeSplitsChunks for any head_dim: even ones of up to 256 by runs of 64 dims a lane pair;
// the scalar kernel's odd head_dims (and any wider) a lane per dim with 4-byte loads.
template <typename T>
__device__ void WarpMergeSplits(T* out, const float* partial, int64_t row, int num_splits,
                                int head_dim, float* s_weight, int capacity,
                                float2* stats = nullptr) {
  if (head_dim % 2 == 0 && head_dim <= 64) {
    WarpMergeSplitsChunks<T, 1>(out, partial, row, num_splits, head_dim, s_weight, capacity, stats);
    return;
  }
  if (head_dim % 2 == 0 && head_dim <= 128) {
    WarpMergeSplitsChunks<T, 2>(out, partial, row, num_splits, head_dim, s_weight, capacity, stats);
    return;
  }
  if (head_dim % 2 == 0 && head_dim <= 256) {
    WarpMergeSplitsChunks<T, 4>(out, partial, row, num_splits, head_dim, s_weight, capacity, stats);
    return;
  }
  const SplitMergeRow m =
      StartSplitMerge(partial, row, num_splits, head_dim, s_weight, capacity, stats);
  for (int d = threadIdx.x % cuda::kWarpSize; d < head_dim; d += cuda::kWarpSize) {
    float acc = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      acc += __ldcg(m.part + s * m.stride + 2 + d) * (s < capacity ? s_weight[s] : m.Weight(s));
    }
    out[row * head_dim + d] = cuda::Convert<T>::FromFloat(acc * m.inv);
  }
}

// The vectorised split kernel (kernels/cuda/split_attention_vec.cu) takes head_dim of 4, 8, 16 or
// 32 lanes of 16 bytes (bf16/fp16: 32..256, fp32: 16..128) and fewer than 2^31 keys per sequence.
// Occupancy: its resident blocks per multiprocessor for this call's head_dim and `rows` (1: MHA, 4:
// GQA chunks of 4 query heads, as for the scalar kernel), or 0 when it does not take the call.
// Launch: launches it (only for a call whose occupancy is > 0). The query and the cache must be
// 16-byte aligned.
template <typename T>
int VectorSplitAttentionOccupancy(const AttentionParams<T>& p, int rows);
template <typename T>
void LaunchVectorSplitAttention(const AttentionParams<T>& p, int64_t tokens, int kv_heads, int rows,
                                cudaStream_t stream);

// Full waves of resident blocks the vectorised kernel's splits aim at: 1, or the environment
// variable DYSCO_CUDA_SPLIT_WAVES (1..64; read per call, for tuning).
int64_t SplitWaves();

// attention_probs' logits pass (kernels/cuda/paged_attention.cu): out[b, probe, j] = the biased,
// scaled logit of probed head `heads[probe]` for key j < min(seq_len, out_len, bias_width).
template <typename T>
struct ProbsLogitsParams {
  float* out;               // [B, num_probe, out_len]
  const T* query;           // [B, Hq, D]
  const T* k_cache;         // [NP, PS, Hkv, D]
  const int32_t* tables;    // [B, P]
  const int64_t* seq_lens;  // [B]
  const int64_t* heads;     // [num_probe]
  const float* bias;        // [B, bias_width] or nullptr
  int64_t out_len;
  int64_t max_pages;
  int64_t page_size;
  int64_t num_pages;
  int64_t bias_width;
  int64_t keys_per_block;  // keys of grid.x's block
  int num_probe;
  int num_heads;
  int group;
  int head_dim;
  float scale;
};

// Launches the vectorised logits kernel on `grid` (x: key blocks, y: probed heads, z: sequences)
// under the same head_dim condition as LaunchVectorSplitAttention and returns true; false when the
// head_dim does not fit (nothing launched). The query and the cache must be 16-byte aligned.
template <typename T>
bool LaunchVectorProbsLogits(const ProbsLogitsParams<T>& p, dim3 grid, cudaStream_t stream);

// The tensor-core split kernel (kernels/cuda/split_attention_mma.cu): bf16 and fp16 caches with
// head_dim 64 or 128, 16 query heads per block (p.row_chunks = ceil(group / 16)). Occupancy: its
// resident blocks per multiprocessor, or 0 when it does not take the call. Launch: launches it
// (only for a call whose occupancy is > 0). The query and the cache must be 16-byte aligned.
template <typename T>
int MmaSplitAttentionOccupancy(const AttentionParams<T>& p);
template <typename T>
void LaunchMmaSplitAttention(const AttentionParams<T>& p, int64_t tokens, int kv_heads,
                             cudaStream_t stream);

// Which split kernel takes a call that several could: the environment variable
// DYSCO_CUDA_ATTENTION_KERNEL = "mma" (default: tensor cores where they apply, else the vectorised
// kernel where it applies, else the scalar one), "vector" (no tensor cores) or "scalar" (the scalar
// kernel only). Read per call (a few hundred nanoseconds per launch) so that a benchmark can time
// the kernels in one process, e.g. test_kernels_cuda's timing case. attention_probs' logits pass
// follows it too ("scalar": its scalar kernel).
enum class AttentionKernel { kMma, kVector, kScalar };
AttentionKernel AttentionKernelChoice();
inline bool VectorSplitAttentionEnabled() {
  return AttentionKernelChoice() != AttentionKernel::kScalar;
}

}  // namespace dysco::kernels
