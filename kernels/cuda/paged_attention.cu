// CUDA paged attention: paged_kv_write, decode and prefill (one split-KV kernel for both) and
// attention_probs. Semantics: kernels/ops.h, the same as kernels/cpu/paged_attention.cpp.
//
// Decode and prefill share one kernel: a block takes one query token and up to kRows query heads of
// one KV head (GQA: the group shares every K/V row the block reads) over one split of the keys.
// Its warps take tiles of 32 keys in turn: QK^T with one lane per key (the query rows in shared
// memory, 16-byte K loads), one online-softmax rescale per tile, PV with lanes over head_dim (each
// value row one coalesced read, the weights broadcast by shuffles). The warps are combined in
// shared memory, the split's partial (max, sum, acc) goes to a workspace, and a second kernel
// merges the splits by log-sum-exp (the tensor-core kernel's last split block of each head chunk
// merges them itself: SplitMergeCounters). The number of splits depends on metadata only
// (block_tables width, batch, heads, the device's multiprocessors), never on seq_lens values, so no
// host synchronisation.
//
// Prefill of bf16/fp16 caches without key bias goes to flash attention over gathered pages
// (paged_prefill_flash.cu); this kernel serves the rest of prefill (fp32, a key bias), where it
// reads the keys once per query token (fine for chunks and DySCO's biased steps, slow for a long
// prompt). Speed work left: docs/gpu.md.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/paged_prefill_flash.h"
#include "kernels/cuda/split_attention.cuh"
#include "kernels/cuda/stream_counters.h"
#include "kernels/op_checks.h"

namespace dysco::kernels {
namespace {

using cuda::Clamp;
using cuda::Convert;
using cuda::kWarpSize;

// A split never covers fewer keys than this (below it the merge costs more than it saves).
// DYSCO_CUDA_MIN_KEYS_PER_SPLIT (16 .. 65536, a multiple of 16) overrides it for A/B timing
// (CudaTiming.DecodeAttentionAtShortContexts: at 8K keys the splits are this short).
constexpr int64_t kMinKeysPerSplit = 256;
int64_t MinKeysPerSplit() {
  return cuda::EnvInt("DYSCO_CUDA_MIN_KEYS_PER_SPLIT", 16, 65536, 16).value_or(kMinKeysPerSplit);
}
// Splits are chosen for about this many blocks per multiprocessor: decode reads one row per key and
// warp, so it needs many warps in flight to cover memory latency.
constexpr int64_t kBlocksPerMultiprocessor = 8;
// Bound on the split workspace, in floats (256 MiB), so that a long prefill falls back to fewer
// splits (it has parallelism enough over its tokens).
constexpr int64_t kMaxWorkspaceFloats = 64LL << 20;
// head_dim is split over the 32 lanes, at most kMaxDPerLane elements each.
constexpr int kMaxDPerLane = 8;
constexpr int64_t kMaxHeadDim = kWarpSize * kMaxDPerLane;

// DYSCO_CUDA_LOG_LAUNCH=1: each distinct launch configuration of the split attention, once, to
// stderr (a diagnostic: which splits, table width, kernel and early start a model's calls get;
// docs/gpu.md "What remains of issue 9", item 2, where a DySCO step's attention calls were ~5%
// slower than a plain step's on the same inputs).
bool LaunchLogEnabled() {
  static const bool enabled = cuda::EnvIs("DYSCO_CUDA_LOG_LAUNCH", "1");
  return enabled;
}
bool IsCapturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
         status == cudaStreamCaptureStatusActive;
}
void LogLaunchOnce(const std::string& line) {
  static std::mutex mu;
  static std::set<std::string> seen;
  const std::lock_guard<std::mutex> lock(mu);
  if (seen.insert(line).second) std::fprintf(stderr, "[attention_launch] %s\n", line.c_str());
}

// Grid: x = query token, y = split, z = KV head * row_chunks + chunk. Block: kAttentionThreads.
template <typename T, int kRows, int kDPerLane>
__global__ void __launch_bounds__(kAttentionThreads)
    SplitAttentionKernel(const AttentionParams<T> p) {
  const int64_t token = blockIdx.x;
  const int split = blockIdx.y;
  const int kv_head = blockIdx.z / p.row_chunks;
  const int head0 = kv_head * p.group + (blockIdx.z % p.row_chunks) * kRows;
  const int rows = min(kRows, kv_head * p.group + p.group - head0);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int head_dim = p.head_dim;
  const int kv_heads = p.num_heads / p.group;
  const int64_t token_stride = static_cast<int64_t>(kv_heads) * head_dim;
  const int64_t page_stride = p.page_size * token_stride;

  int64_t b = 0;
  int64_t limit = 0;
  TokenSequence(p, token, &b, &limit);
  int64_t key_begin = 0;
  int64_t key_end = 0;
  SplitKeys(p, limit, split, &key_begin, &key_end);

  // The block's query rows, scaled, in shared memory: every lane reads all of head_dim for QK^T.
  __shared__ float s_q[kRows][kMaxHeadDim];
  for (int i = threadIdx.x; i < kRows * head_dim; i += blockDim.x) {
    const int r = i / head_dim;
    const int d = i % head_dim;
    s_q[r][d] =
        r < rows ? Convert<T>::ToFloat(p.query[(token * p.num_heads + head0 + r) * head_dim + d]) *
                       p.scale
                 : 0.0f;
  }
  __syncthreads();

  float m[kRows];  // running max, uniform over the warp
  float l[kRows];  // running sum of weights, this lane's keys only (added up at the end)
  float acc[kRows][kDPerLane];  // weighted sum of values, lanes over head_dim
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDPerLane; ++i) acc[r][i] = 0.0f;
  }

  const int32_t* pages = p.tables + b * p.max_pages;
  const float* bias = p.bias == nullptr ? nullptr : p.bias + b * p.bias_width;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * head_dim;
  // Warps take tiles of 32 keys in turn. QK^T with lanes over keys (each lane reads its key's row,
  // 16-byte loads where aligned), one softmax rescale per tile, then PV with lanes over head_dim
  // (each value row one coalesced read, the weights broadcast by shuffles).
  for (int64_t tile = key_begin + warp * kWarpSize; tile < key_end;
       tile += kAttentionWarps * kWarpSize) {
    const int64_t j = tile + lane;
    const int tile_len = static_cast<int>(min(static_cast<int64_t>(kWarpSize), key_end - tile));
    int64_t offset = 0;
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.0f;
    if (lane < tile_len) {
      const int64_t page = Clamp(pages[j / p.page_size], 0, p.num_pages - 1);
      offset = page * page_stride + (j % p.page_size) * token_stride + head_offset;
      const T* key = p.k_cache + offset;
      if (p.vector_loads) {
        for (int d0 = 0; d0 < head_dim; d0 += 8) {
          float k[8];
          cuda::LoadEight(key + d0, k);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int e = 0; e < 8; ++e) s[r] += s_q[r][d0 + e] * k[e];
          }
        }
      } else {
        for (int d = 0; d < head_dim; ++d) {
          const float k = Convert<T>::ToFloat(key[d]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) s[r] += s_q[r][d] * k;
        }
      }
      const float key_bias = bias == nullptr ? 0.0f : bias[j];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] += key_bias;
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = -INFINITY;
    }
    // s becomes this lane's key weight, rescaled to the new running max.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float tile_max = cuda::WarpMax(s[r]);
      if (r >= rows || tile_max == -INFINITY) {  // uniform over the warp
        s[r] = 0.0f;
        continue;
      }
      const float m_new = fmaxf(m[r], tile_max);
      const float correction = expf(m[r] - m_new);  // 0 while m is -inf
      s[r] = expf(s[r] - m_new);                    // 0 for a masked key
      l[r] = l[r] * correction + s[r];
      m[r] = m_new;
#pragma unroll
      for (int i = 0; i < kDPerLane; ++i) acc[r][i] *= correction;
    }
    constexpr int kAhead = 4;  // value rows loaded before their weights are applied
    int kk = 0;
    for (; kk + kAhead <= tile_len; kk += kAhead) {
      float v[kAhead][kDPerLane];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const T* value = p.v_cache + __shfl_sync(0xffffffffu, offset, kk + u);
#pragma unroll
        for (int i = 0; i < kDPerLane; ++i) {
          const int d = i * kWarpSize + lane;
          v[u][i] = d < head_dim ? Convert<T>::ToFloat(value[d]) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float weight = __shfl_sync(0xffffffffu, s[r], kk + u);
#pragma unroll
          for (int i = 0; i < kDPerLane; ++i) acc[r][i] += weight * v[u][i];
        }
      }
    }
    for (; kk < tile_len; ++kk) {
      const T* value = p.v_cache + __shfl_sync(0xffffffffu, offset, kk);
      float v[kDPerLane];
#pragma unroll
      for (int i = 0; i < kDPerLane; ++i) {
        const int d = i * kWarpSize + lane;
        v[i] = d < head_dim ? Convert<T>::ToFloat(value[d]) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float weight = __shfl_sync(0xffffffffu, s[r], kk);
#pragma unroll
        for (int i = 0; i < kDPerLane; ++i) acc[r][i] += weight * v[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) l[r] = cuda::WarpSum(l[r]);

  // Combine the warps: each writes its state, then warp w combines row w (and w + warps, ...).
  __shared__ float s_m[kAttentionWarps][kRows];
  __shared__ float s_l[kAttentionWarps][kRows];
  __shared__ float s_acc[kAttentionWarps][kRows][kDPerLane * kWarpSize];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
#pragma unroll
    for (int i = 0; i < kDPerLane; ++i) s_acc[warp][r][i * kWarpSize + lane] = acc[r][i];
  }
  __syncthreads();
  WriteSplitPartials(p, token, split, head0, rows, kRows, kDPerLane * kWarpSize, &s_m[0][0],
                     &s_l[0][0], &s_acc[0][0][0]);
}

// out[token, head] <- the splits' partials merged by log-sum-exp (WarpMergeSplits: a warp per
// row, kMergeWarps rows a block); zeros when no key was seen. The tensor-core kernel merges its own
// splits instead (SplitMergeCounters below), with the same function, so both give the same bits.
// History: a block per row with three passes over the splits took 7.6 us a call at 33 splits, one
// pass with the weights in shared memory 3.5 us (docs/gpu.md).
constexpr int kMergeWarps = 4;
// Weights kept in shared memory per warp; more splits recompute theirs.
constexpr int kMergeMaxSplits = 1024;

template <typename T>
__global__ void __launch_bounds__(kMergeWarps* kWarpSize)
    MergeSplitsKernel(T* out, const float* partial, int64_t rows, int num_splits, int head_dim) {
  cuda::AllowDependentLaunch();  // the o_proj GEMV after it may start (linear.cu)
  __shared__ float s_weight[kMergeWarps][kMergeMaxSplits];
  const int warp = threadIdx.x / kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (row >= rows) return;  // whole warps
  WarpMergeSplits(out, partial, row, num_splits, head_dim, s_weight[warp], kMergeMaxSplits);
}

// The tensor-core kernel's merge counters (AttentionParams::merge_counters) for `count` (token, KV
// head, row chunk) groups on the current stream, or null when there are none to give (then
// MergeSplitsKernel merges): one zeroed buffer of kMergeCounterCapacity per (device, stream)
// (stream_counters.h); every kernel leaves its counters at zero. DYSCO_CUDA_SPLIT_MERGE=kernel
// (read per call) always gives null, for A/B timing.
constexpr int64_t kMergeCounterCapacity = 1 << 16;

unsigned* SplitMergeCounters(int64_t count) {
  if (cuda::EnvIs("DYSCO_CUDA_SPLIT_MERGE", "kernel")) return nullptr;
  if (count > kMergeCounterCapacity) return nullptr;
  return cuda::StreamCounters(cuda::CounterUser::kSplitMerge, kMergeCounterCapacity);
}

template <typename T, int kRows, int kDPerLane>
void LaunchSplitAttention(const AttentionParams<T>& p, int64_t tokens, int kv_heads,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(kv_heads * p.row_chunks));
  SplitAttentionKernel<T, kRows, kDPerLane><<<grid, kAttentionThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kRows>
void LaunchForHeadDim(const AttentionParams<T>& p, int64_t tokens, int kv_heads,
                      cudaStream_t stream) {
  if (p.head_dim <= 2 * kWarpSize) {
    LaunchSplitAttention<T, kRows, 2>(p, tokens, kv_heads, stream);
  } else if (p.head_dim <= 4 * kWarpSize) {
    LaunchSplitAttention<T, kRows, 4>(p, tokens, kv_heads, stream);
  } else {
    LaunchSplitAttention<T, kRows, kMaxDPerLane>(p, tokens, kv_heads, stream);
  }
}

// The attention block's input stage of qk_norm_rope_attention_decode, for SplitAttention: run by
// the tensor-core kernel itself where it applies (AttentionParams::qkv), else by
// qk_norm_rope_kv_write_cuda ahead of the attention (`write_separately`).
struct QkvStage {
  const at::Tensor* qkv;
  const at::Tensor* cos;
  const at::Tensor* sin;
  const at::Tensor* slot_mapping;
  const c10::optional<at::Tensor>* q_norm_weight;
  const c10::optional<at::Tensor>* k_norm_weight;
  double eps;
  std::function<void()> write_separately;
};

// qk_norm_rope_attention_decode's probes: the selected heads' probabilities, asked of the split
// attention (AttentionParams::probe_logits). SplitAttention says whether its kernel stored the
// logits and the rows' stats (then the caller normalises them: ProbsFromLogitsKernel) or not (then
// the caller runs attention_probs), and keeps their buffers alive until then.
struct ProbeStage {
  const at::Tensor* probs = nullptr;  // [B, Hp, S']
  const at::Tensor* heads = nullptr;  // [Hp]
  bool in_kernel = false;
  at::Tensor logits;  // [B, Hp, S'] float
  at::Tensor stats;   // [B, Hp, 2] float: max, sum
};

// Decode (query_start_loc undefined: token b is sequence b's one new token) or prefill. With
// `stage` (decode only), the query and the newest keys are first made from its qkv; with `probes`
// (decode only), the probed heads' logits and stats where the tensor-core kernel applies.
template <typename T>
void SplitAttention(const at::Tensor& out, const at::Tensor& query,
                    const at::Tensor& kv_cache_layer, const PagedCacheShape& cache,
                    const at::Tensor& block_tables, const at::Tensor& seq_lens,
                    const at::Tensor* query_start_loc, double scale,
                    const c10::optional<at::Tensor>& key_bias, const QkvStage* stage = nullptr,
                    ProbeStage* probes = nullptr) {
  const int64_t tokens = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t group = num_heads / cache.num_kv_heads;
  const bool has_bias = key_bias.has_value() && key_bias->defined();
  // GQA groups of 1 (MHA) take the one-row kernel; larger groups go in chunks of 4 heads.
  const int rows = group == 1 ? 1 : 4;

  AttentionParams<T> p{};
  const T* kv = kv_cache_layer.data_ptr<T>();
  const int64_t half = cache.num_pages * cache.page_size * cache.num_kv_heads * cache.head_dim;
  p.query = query.data_ptr<T>();
  p.k_cache = kv;
  p.v_cache = kv + half;
  p.tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.query_start_loc = query_start_loc == nullptr ? nullptr : query_start_loc->data_ptr<int64_t>();
  p.bias = has_bias ? key_bias->data_ptr<float>() : nullptr;
  p.bias_width = has_bias ? key_bias->size(1) : 0;
  p.batch = seq_lens.size(0);
  p.max_pages = block_tables.size(1);
  p.page_size = cache.page_size;
  p.num_pages = cache.num_pages;
  p.num_heads = static_cast<int>(num_heads);
  p.group = static_cast<int>(group);
  p.head_dim = static_cast<int>(cache.head_dim);
  p.row_chunks = static_cast<int>(cuda::CeilDiv(group, rows));
  p.scale = static_cast<float>(scale);
  p.vector_loads = cache.head_dim % 8 == 0 && cuda::Aligned16(kv);

  const bool aligned = cuda::Aligned16(p.query) && cuda::Aligned16(kv);
  // The kernel: tensor cores (16-bit caches, head_dim 64 / 128), else the vectorised one, else the
  // scalar one (AttentionKernelChoice() can rule the first two out), and the resident blocks per
  // multiprocessor of the first two (0: the scalar kernel).
  const AttentionKernel choice = aligned ? AttentionKernelChoice() : AttentionKernel::kScalar;
  int vector_blocks_per_sm = 0;
  bool use_mma = false;
  if (choice == AttentionKernel::kMma) {
    vector_blocks_per_sm = MmaSplitAttentionOccupancy<T>(p);
    use_mma = vector_blocks_per_sm > 0;
    if (use_mma) p.row_chunks = static_cast<int>(cuda::CeilDiv(group, 16));
  }
  if (!use_mma && choice != AttentionKernel::kScalar) {
    vector_blocks_per_sm = VectorSplitAttentionOccupancy<T>(p, rows);
  }

  // Splits from metadata only (never seq_lens: no host synchronisation): the vectorised kernel gets
  // a whole number of full waves of resident blocks (SplitWaves(), default one: every block then
  // starts at once and the splits are equal, so no wave runs part-empty); the scalar kernel about
  // kBlocksPerMultiprocessor blocks per multiprocessor. No split shorter than kMinKeysPerSplit, a
  // bounded workspace. The count comes from the table's width; each row's kernel blocks then share
  // that row's own keys among the splits on the device (SplitKeys).
  const int64_t max_keys = std::max<int64_t>(1, p.max_pages * p.page_size);
  const int64_t blocks = tokens * cache.num_kv_heads * p.row_chunks;
  int64_t splits =
      vector_blocks_per_sm > 0
          ? std::max<int64_t>(
                1, SplitWaves() * vector_blocks_per_sm * cuda::MultiprocessorCount() / blocks)
          : cuda::CeilDiv(kBlocksPerMultiprocessor * cuda::MultiprocessorCount(), blocks);
  splits = std::min(splits, cuda::CeilDiv(max_keys, MinKeysPerSplit()));
  splits = std::min(splits, kMaxWorkspaceFloats / (tokens * num_heads * (cache.head_dim + 2)));
  splits = std::min<int64_t>(std::max<int64_t>(splits, 1), 65535);
  // Splits start at multiples of 16 keys: the tensor-core kernel's tiles then start at even keys,
  // so that it reads a pair of bias entries with one 8-byte load.
  p.split_len = cuda::CeilDiv(cuda::CeilDiv(max_keys, splits), 16) * 16;
  p.num_splits = static_cast<int>(cuda::CeilDiv(max_keys, p.split_len));
  // Each row's splits from its own length (SplitKeys); DYSCO_CUDA_SPLIT_FROM_WIDTH=1 cuts them from
  // the table's width as before (A/B timing; read per call).
  p.min_split_len = cuda::EnvIs("DYSCO_CUDA_SPLIT_FROM_WIDTH", "1") ? 0 : MinKeysPerSplit();

  at::Tensor partial = at::empty({tokens, num_heads, p.num_splits, cache.head_dim + 2},
                                 query.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  p.out = out.data_ptr<T>();
  p.merge_counters =
      use_mma ? SplitMergeCounters(tokens * cache.num_kv_heads * p.row_chunks) : nullptr;
  // The tensor-core kernel makes the rows itself when one block holds all of a KV head's query
  // rows (one row chunk: the newest key is then written by one block and read by no other);
  // DYSCO_CUDA_QKV_ATTENTION=0 keeps the two kernels (A/B timing; the same bits).
  const bool in_kernel = stage != nullptr && use_mma && query_start_loc == nullptr &&
                         p.row_chunks == 1 && !cuda::EnvIs("DYSCO_CUDA_QKV_ATTENTION", "0");
  // The tensor-core kernel of a decode call starts while the kernel ahead finishes
  // (AttentionParams::early_keys) when that kernel is qk_norm_rope_kv_write. When it makes its
  // rows from the qkv GEMV's output it is launched plainly: started early behind the GEMV it lost
  // 0.1 ms a token at 32K and 0.35 ms at 128K (seventeenth increment), and since the swapped
  // operands (twentieth) it loses at 8K too, 0.06-0.10 ms a token in alternated runs (docs/gpu.md
  // "The fused attention launched plainly"). DYSCO_CUDA_ATTENTION_PDL=0 (or DYSCO_CUDA_PDL=0)
  // launches every decode call plainly, =1 starts the fused one early too (A/B timing; the same
  // bits either way).
  const bool early_forced = cuda::EnvIs("DYSCO_CUDA_ATTENTION_PDL", "1");
  p.early_keys = use_mma && query_start_loc == nullptr &&
                 cuda::EarlyStartLevel() != cuda::EarlyStart::kNone &&
                 !cuda::EnvIs("DYSCO_CUDA_ATTENTION_PDL", "0") && (!in_kernel || early_forced);
  p.early_tile = p.early_keys && !cuda::EnvIs("DYSCO_CUDA_ATTENTION_EARLY_TILE", "0");
  if (probes != nullptr) {
    // In the same pass where the tensor-core kernel merges its own splits (its merge has each row's
    // final max and sum) and every key the probabilities cover is one the kernel scores: probs and
    // the bias at least as wide as the table (the model's are exactly that wide).
    // DYSCO_CUDA_PROBS_IN_ATTENTION=0 leaves them to attention_probs (A/B timing and tests).
    const int64_t out_len = probes->probs->size(2);
    probes->in_kernel = use_mma && query_start_loc == nullptr && p.merge_counters != nullptr &&
                        out_len >= max_keys && (!has_bias || key_bias->size(1) >= max_keys) &&
                        !cuda::EnvIs("DYSCO_CUDA_PROBS_IN_ATTENTION", "0");
    if (probes->in_kernel) {
      const int64_t num_probe = probes->heads->size(0);
      const auto f32 = query.options().dtype(at::kFloat);
      probes->logits = at::empty({tokens, num_probe, out_len}, f32);
      probes->stats = at::empty({tokens, num_probe, 2}, f32);
      p.probe_logits = probes->logits.data_ptr<float>();
      p.probe_stats = reinterpret_cast<float2*>(probes->stats.data_ptr<float>());
      p.probe_heads = probes->heads->data_ptr<int64_t>();
      p.num_probe = static_cast<int>(num_probe);
      p.probe_len = out_len;
    }
  }
  if (stage != nullptr) {
    if (in_kernel) {
      const bool norms = stage->q_norm_weight->has_value() && (*stage->q_norm_weight)->defined();
      p.qkv = stage->qkv->data_ptr<T>();
      p.rope_cos = stage->cos->data_ptr<T>();
      p.rope_sin = stage->sin->data_ptr<T>();
      p.q_norm = norms ? (*stage->q_norm_weight)->data_ptr<T>() : nullptr;
      p.k_norm = norms ? (*stage->k_norm_weight)->data_ptr<T>() : nullptr;
      p.slots = stage->slot_mapping->data_ptr<int64_t>();
      p.query_out = query.data_ptr<T>();
      p.num_slots = cache.num_pages * cache.page_size;
      p.eps = static_cast<float>(stage->eps);
    } else {
      stage->write_separately();
    }
  }
  const cudaStream_t stream = cuda::CurrentStream();
  const int kv_heads = static_cast<int>(cache.num_kv_heads);
  if (LaunchLogEnabled()) {
    LogLaunchOnce(std::string(query_start_loc == nullptr ? "decode" : "prefill") + " kernel=" +
                  (use_mma                    ? "mma"
                   : vector_blocks_per_sm > 0 ? "vector"
                                              : "scalar") +
                  " tokens=" + std::to_string(tokens) + " heads=" + std::to_string(num_heads) +
                  " max_pages=" + std::to_string(p.max_pages) + " blocks_per_sm=" +
                  std::to_string(vector_blocks_per_sm) + " splits=" + std::to_string(p.num_splits) +
                  " split_len=" + std::to_string(p.split_len) +
                  " bias=" + std::to_string(has_bias) +
                  (has_bias ? " bias_width=" + std::to_string(p.bias_width) : std::string()) +
                  " qkv_in_kernel=" + std::to_string(p.qkv != nullptr) +
                  " early=" + std::to_string(p.early_keys) +
                  " probes_in_kernel=" + std::to_string(p.probe_logits != nullptr) +
                  " table_stride=" + std::to_string(block_tables.stride(0)) +
                  " cache_pages=" + std::to_string(cache.num_pages) +
                  " capturing=" + std::to_string(IsCapturing(stream)));
  }
  if (use_mma) {
    LaunchMmaSplitAttention(p, tokens, kv_heads, stream);
  } else if (vector_blocks_per_sm > 0) {
    LaunchVectorSplitAttention(p, tokens, kv_heads, rows, stream);
  } else if (rows == 1) {
    LaunchForHeadDim<T, 1>(p, tokens, kv_heads, stream);
  } else {
    LaunchForHeadDim<T, 4>(p, tokens, kv_heads, stream);
  }
  if (p.merge_counters != nullptr) return;  // the split kernel merged
  const int64_t query_rows = tokens * num_heads;
  MergeSplitsKernel<T>
      <<<static_cast<unsigned>(cuda::CeilDiv(query_rows, kMergeWarps)), kMergeWarps * kWarpSize, 0,
         stream>>>(out.data_ptr<T>(), p.partial, query_rows, p.num_splits, p.head_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void CheckCudaAttention(const char* op, const at::Tensor& out, const PagedCacheShape& cache,
                        int64_t tokens) {
  TORCH_CHECK(out.is_cuda(), op, ": the CUDA implementation got tensors on ", out.device());
  TORCH_CHECK(cache.head_dim <= kMaxHeadDim, op,
              ": the CUDA kernels take head_dim <= ", kMaxHeadDim, ", got ", cache.head_dim);
  TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max(), op, ": too many query tokens ",
              tokens);
}

// ---- paged_kv_write: one block per token; a token's K (or V) for all heads is one contiguous
// row in both tensors, copied as Word units (2 or 4 bytes: the element size).
template <typename Word>
__global__ void KvWriteKernel(Word* k_cache, Word* v_cache, const Word* key, const Word* value,
                              const int64_t* slots, int64_t num_slots, int64_t row_words) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;  // negative: skipped by contract; too large: clamped
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    k_cache[slot * row_words + i] = key[t * row_words + i];
    v_cache[slot * row_words + i] = value[t * row_words + i];
  }
}

template <typename Word>
void KvWrite(const at::Tensor& kv_cache_layer, const at::Tensor& key, const at::Tensor& value,
             const at::Tensor& slot_mapping, const PagedCacheShape& cache) {
  const int64_t num_slots = cache.num_pages * cache.page_size;
  const int64_t row_words = cache.num_kv_heads * cache.head_dim;
  Word* k_cache = static_cast<Word*>(kv_cache_layer.data_ptr());
  KvWriteKernel<Word><<<static_cast<unsigned>(key.size(0)), 128, 0, cuda::CurrentStream()>>>(
      k_cache, k_cache + num_slots * row_words, static_cast<const Word*>(key.data_ptr()),
      static_cast<const Word*>(value.data_ptr()), slot_mapping.data_ptr<int64_t>(), num_slots,
      row_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- attention_probs: logits into out (one warp per key and probed head), then one block per
// row turns them into probabilities in place and zeroes the tail.
constexpr int kProbsKeysPerBlock = 256;

template <typename T, int kDPerLane>
__global__ void __launch_bounds__(kAttentionThreads)
    ProbsLogitsKernel(float* out, int64_t out_len, const T* query, const T* k_cache,
                      const int32_t* tables, int64_t max_pages, const int64_t* seq_lens,
                      const int64_t* heads, int num_probe, const float* bias, int64_t bias_width,
                      int64_t page_size, int64_t num_pages, int num_heads, int group, int head_dim,
                      float scale) {
  const int64_t b = blockIdx.z;
  const int probe = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int head = static_cast<int>(Clamp(heads[probe], 0, num_heads - 1));
  const int kv_head = head / group;
  const int64_t token_stride = static_cast<int64_t>(num_heads / group) * head_dim;
  int64_t len = min(Clamp(seq_lens[b], 0, max_pages * page_size), out_len);
  if (bias != nullptr) len = min(len, bias_width);
  float q[kDPerLane];
#pragma unroll
  for (int i = 0; i < kDPerLane; ++i) {
    const int d = i * kWarpSize + lane;
    q[i] = d < head_dim ? Convert<T>::ToFloat(query[(b * num_heads + head) * head_dim + d]) * scale
                        : 0.0f;
  }
  const int32_t* pages = tables + b * max_pages;
  float* row = out + (b * num_probe + probe) * out_len;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kProbsKeysPerBlock;
  const int64_t end = min(len, begin + kProbsKeysPerBlock);
  for (int64_t j = begin + warp; j < end; j += kAttentionWarps) {
    const int64_t page = Clamp(pages[j / page_size], 0, num_pages - 1);
    const T* k = k_cache + page * page_size * token_stride + (j % page_size) * token_stride +
                 static_cast<int64_t>(kv_head) * head_dim;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kDPerLane; ++i) {
      const int d = i * kWarpSize + lane;
      if (d < head_dim) dot += q[i] * Convert<T>::ToFloat(k[d]);
    }
    dot = cuda::WarpSum(dot);
    if (lane == 0) row[j] = dot + (bias == nullptr ? 0.0f : bias[b * bias_width + j]);
  }
}

// The softmax over each probed row's logits in two kernels, both spread over chunks of the row
// (one block per probed head per sequence left a 128K row to 4 multiprocessors: 0.1 ms a call).
// 1. per chunk: its max m_c and sum s_c of exp(x - m_c) over the row's keys [0, len);
// 2. per chunk: M = max m_c and S = sum s_c exp(m_c - M) from the row's partials, then
//    exp(x - M) / S over the chunk's keys and zeros past len (every element of the row written).
// A row with no finite logit (len 0, or every key masked) is all zeros.
// Grid: x = chunk, y = probed head, z = sequence. Block: kSoftmaxThreads.
constexpr int kSoftmaxThreads = 256;
constexpr int64_t kSoftmaxChunk = 2048;

__device__ __forceinline__ int64_t ProbsRowLen(const int64_t* seq_lens, int64_t b, int64_t max_keys,
                                               int64_t out_len, const float* bias,
                                               int64_t bias_width) {
  int64_t len = min(Clamp(seq_lens[b], 0, max_keys), out_len);
  if (bias != nullptr) len = min(len, bias_width);
  return len;
}

__global__ void __launch_bounds__(kSoftmaxThreads)
    ProbsChunkStatsKernel(float2* partials, const float* out, int64_t out_len,
                          const int64_t* seq_lens, int num_probe, int64_t max_keys,
                          const float* bias, int64_t bias_width) {
  __shared__ float shared[kSoftmaxThreads / kWarpSize];
  const int64_t b = blockIdx.z;
  const int64_t len = ProbsRowLen(seq_lens, b, max_keys, out_len, bias, bias_width);
  const int64_t row_index = b * num_probe + blockIdx.y;
  const float* row = out + row_index * out_len;
  const int64_t begin = blockIdx.x * kSoftmaxChunk;
  const int64_t end = min(len, begin + kSoftmaxChunk);
  float max = -INFINITY;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) max = fmaxf(max, row[j]);
  max = cuda::BlockReduce(max, shared, [](float a, float c) { return fmaxf(a, c); });
  float sum = 0.0f;
  if (max != -INFINITY) {
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) sum += expf(row[j] - max);
  }
  sum = cuda::BlockReduce(sum, shared, [](float a, float c) { return a + c; });
  if (threadIdx.x == 0) partials[row_index * gridDim.x + blockIdx.x] = make_float2(max, sum);
}

__global__ void __launch_bounds__(kSoftmaxThreads)
    ProbsNormaliseKernel(float* out, const float2* partials, int64_t out_len,
                         const int64_t* seq_lens, int num_probe, int64_t max_keys,
                         const float* bias, int64_t bias_width) {
  __shared__ float shared[kSoftmaxThreads / kWarpSize];
  const int64_t b = blockIdx.z;
  const int64_t len = ProbsRowLen(seq_lens, b, max_keys, out_len, bias, bias_width);
  const int64_t row_index = b * num_probe + blockIdx.y;
  const float2* part = partials + row_index * gridDim.x;
  float max = -INFINITY;
  for (unsigned c = threadIdx.x; c < gridDim.x; c += blockDim.x) max = fmaxf(max, part[c].x);
  max = cuda::BlockReduce(max, shared, [](float a, float c) { return fmaxf(a, c); });
  float sum = 0.0f;
  if (max != -INFINITY) {
    for (unsigned c = threadIdx.x; c < gridDim.x; c += blockDim.x) {
      if (part[c].x != -INFINITY) sum += part[c].y * expf(part[c].x - max);
    }
  }
  sum = cuda::BlockReduce(sum, shared, [](float a, float c) { return a + c; });
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  float* row = out + row_index * out_len;
  const int64_t begin = blockIdx.x * kSoftmaxChunk;
  const int64_t end = min(out_len, begin + kSoftmaxChunk);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    row[j] = j < len && max != -INFINITY ? expf(row[j] - max) * inv : 0.0f;
  }
}

// The probabilities of qk_norm_rope_attention_decode's probes from the logits and row stats the
// tensor-core kernel stored (AttentionParams::probe_logits): row (b, slot) <- exp(logit - max) /
// sum over the keys below the row's length, zeros past it, as ProbsNormaliseKernel writes them. A
// head probed twice reads the logits of its first slot (the one the kernel stored).
// Grid: x = chunk, y = probe slot, z = sequence. Block: kSoftmaxThreads.
__global__ void __launch_bounds__(kSoftmaxThreads)
    ProbsFromLogitsKernel(float* probs, const float* logits, const float2* stats,
                          const int64_t* heads, int num_probe, int num_heads, int64_t out_len,
                          const int64_t* seq_lens, int64_t max_keys) {
  const int64_t b = blockIdx.z;
  const int slot = static_cast<int>(blockIdx.y);
  // Slot `slot` names its head itself, so the search ends there at the latest.
  const int first =
      FirstProbeSlot(heads, slot + 1, num_heads, Clamp(heads[slot], 0, num_heads - 1));
  const int64_t len = ProbsRowLen(seq_lens, b, max_keys, out_len, nullptr, 0);
  const float2 st = stats[b * num_probe + first];
  const float inv = st.y > 0.0f ? 1.0f / st.y : 0.0f;
  const float* in = logits + (b * num_probe + first) * out_len;
  float* row = probs + (b * num_probe + slot) * out_len;
  const int64_t begin = blockIdx.x * kSoftmaxChunk;
  const int64_t end = min(out_len, begin + kSoftmaxChunk);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    row[j] = j < len && st.x != -INFINITY ? expf(in[j] - st.x) * inv : 0.0f;
  }
}

template <typename T>
void Probs(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
           const PagedCacheShape& cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
           const at::Tensor& heads, double scale, const c10::optional<at::Tensor>& key_bias) {
  const int64_t batch = query.size(0);
  const int num_heads = static_cast<int>(query.size(1));
  const int group = static_cast<int>(num_heads / cache.num_kv_heads);
  const int num_probe = static_cast<int>(heads.size(0));
  const int64_t out_len = out.size(2);
  const int64_t max_pages = block_tables.size(1);
  const bool has_bias = key_bias.has_value() && key_bias->defined();
  const float* bias = has_bias ? key_bias->data_ptr<float>() : nullptr;
  const int64_t bias_width = has_bias ? key_bias->size(1) : 0;
  const int head_dim = static_cast<int>(cache.head_dim);
  const int64_t key_blocks = std::max<int64_t>(
      1, cuda::CeilDiv(std::min(out_len, max_pages * cache.page_size), kProbsKeysPerBlock));
  const cudaStream_t stream = cuda::CurrentStream();
  const dim3 grid(static_cast<unsigned>(key_blocks), static_cast<unsigned>(num_probe),
                  static_cast<unsigned>(batch));
  const ProbsLogitsParams<T> vp{out.data_ptr<float>(),
                                query.data_ptr<T>(),
                                kv_cache_layer.data_ptr<T>(),
                                block_tables.data_ptr<int32_t>(),
                                seq_lens.data_ptr<int64_t>(),
                                heads.data_ptr<int64_t>(),
                                bias,
                                out_len,
                                max_pages,
                                cache.page_size,
                                cache.num_pages,
                                bias_width,
                                kProbsKeysPerBlock,
                                num_probe,
                                num_heads,
                                group,
                                head_dim,
                                static_cast<float>(scale)};
  const bool aligned = reinterpret_cast<uintptr_t>(vp.query) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(vp.k_cache) % 16 == 0;
  auto launch = [&](auto d_per_lane) {
    constexpr int kD = decltype(d_per_lane)::value;
    ProbsLogitsKernel<T, kD><<<grid, kAttentionThreads, 0, stream>>>(
        out.data_ptr<float>(), out_len, query.data_ptr<T>(), kv_cache_layer.data_ptr<T>(),
        block_tables.data_ptr<int32_t>(), max_pages, seq_lens.data_ptr<int64_t>(),
        heads.data_ptr<int64_t>(), num_probe, bias, bias_width, cache.page_size, cache.num_pages,
        num_heads, group, head_dim, static_cast<float>(scale));
  };
  if (aligned && VectorSplitAttentionEnabled() && LaunchVectorProbsLogits(vp, grid, stream)) {
    // launched (the vectorised kernel's head_dim)
  } else if (head_dim <= 2 * kWarpSize) {
    launch(std::integral_constant<int, 2>());
  } else if (head_dim <= 4 * kWarpSize) {
    launch(std::integral_constant<int, 4>());
  } else {
    launch(std::integral_constant<int, kMaxDPerLane>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Partials from the caching allocator on the current stream: no host synchronisation.
  const int64_t chunks = std::max<int64_t>(1, cuda::CeilDiv(out_len, kSoftmaxChunk));
  const at::Tensor partials =
      at::empty({batch * num_probe * chunks * 2}, out.options().dtype(at::kFloat));
  auto* partial_data = reinterpret_cast<float2*>(partials.data_ptr<float>());
  const dim3 softmax_grid(static_cast<unsigned>(chunks), static_cast<unsigned>(num_probe),
                          static_cast<unsigned>(batch));
  const int64_t max_keys = max_pages * cache.page_size;
  ProbsChunkStatsKernel<<<softmax_grid, kSoftmaxThreads, 0, stream>>>(
      partial_data, out.data_ptr<float>(), out_len, seq_lens.data_ptr<int64_t>(), num_probe,
      max_keys, bias, bias_width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ProbsNormaliseKernel<<<softmax_grid, kSoftmaxThreads, 0, stream>>>(
      out.data_ptr<float>(), partial_data, out_len, seq_lens.data_ptr<int64_t>(), num_probe,
      max_keys, bias, bias_width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void paged_kv_write_cuda(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& slot_mapping) {
  const PagedCacheShape cache = CheckPagedKvWriteArgs(kv_cache_layer, key, value, slot_mapping);
  TORCH_CHECK(kv_cache_layer.is_cuda(), kPagedKvWriteOp,
              ": the CUDA implementation got tensors on ", kv_cache_layer.device());
  if (key.size(0) == 0 || key.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache_layer.device());
  if (kv_cache_layer.element_size() == 4) {
    KvWrite<uint32_t>(kv_cache_layer, key, value, slot_mapping, cache);
  } else {
    KvWrite<uint16_t>(kv_cache_layer, key, value, slot_mapping, cache);
  }
}

void paged_attention_decode_cuda(const at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, double scale,
                                 const c10::optional<at::Tensor>& key_bias) {
  const PagedCacheShape cache =
      CheckPagedAttentionDecodeArgs(out, query, kv_cache_layer, block_tables, seq_lens, key_bias);
  CheckCudaAttention(kPagedAttentionDecodeOp, out, cache, query.size(0));
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(query.scalar_type(), kPagedAttentionDecodeOp, [&] {
    SplitAttention<scalar_t>(out, query, kv_cache_layer, cache, block_tables, seq_lens, nullptr,
                             scale, key_bias);
  });
}

void qk_norm_rope_attention_decode_cuda(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, double scale, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& probe_heads) {
  const PagedCacheShape cache = CheckQkNormRopeAttentionDecodeArgs(
      out, query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps,
      block_tables, seq_lens, key_bias, probs, probe_heads);
  CheckCudaAttention(kQkNormRopeAttentionDecodeOp, out, cache, query.size(0));
  const bool has_probs = probs.has_value() && probs->defined();
  if (out.numel() == 0) {
    if (has_probs && probs->numel() > 0) probs->zero_();  // no query: every row has no key
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const QkvStage stage{&qkv, &cos, &sin, &slot_mapping, &q_norm_weight, &k_norm_weight, eps, [&] {
                         qk_norm_rope_kv_write_cuda(query, kv_cache_layer, qkv, cos, sin,
                                                    slot_mapping, q_norm_weight, k_norm_weight,
                                                    eps);
                       }};
  ProbeStage probe_stage;
  probe_stage.probs = has_probs ? &*probs : nullptr;
  probe_stage.heads = has_probs ? &*probe_heads : nullptr;
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(query.scalar_type(), kQkNormRopeAttentionDecodeOp, [&] {
    SplitAttention<scalar_t>(out, query, kv_cache_layer, cache, block_tables, seq_lens, nullptr,
                             scale, key_bias, &stage, has_probs ? &probe_stage : nullptr);
  });
  if (!has_probs) return;
  if (!probe_stage.in_kernel) {
    // attention_probs after the attention (it reads the query the op wrote).
    attention_probs_cuda(*probs, query, kv_cache_layer, block_tables, seq_lens, *probe_heads, scale,
                         key_bias);
    return;
  }
  const int64_t batch = query.size(0);
  const int64_t num_probe = probe_heads->size(0);
  const int64_t out_len = probs->size(2);
  if (probs->numel() == 0) return;
  const dim3 grid(
      static_cast<unsigned>(std::max<int64_t>(1, cuda::CeilDiv(out_len, kSoftmaxChunk))),
      static_cast<unsigned>(num_probe), static_cast<unsigned>(batch));
  ProbsFromLogitsKernel<<<grid, kSoftmaxThreads, 0, cuda::CurrentStream()>>>(
      probs->data_ptr<float>(), probe_stage.logits.data_ptr<float>(),
      reinterpret_cast<const float2*>(probe_stage.stats.data_ptr<float>()),
      probe_heads->data_ptr<int64_t>(), static_cast<int>(num_probe),
      static_cast<int>(query.size(1)), out_len, seq_lens.data_ptr<int64_t>(),
      block_tables.size(1) * cache.page_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_attention_prefill_cuda(const at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                  double scale, const c10::optional<at::Tensor>& key_bias) {
  const PagedCacheShape cache = CheckPagedAttentionPrefillArgs(
      out, query, kv_cache_layer, block_tables, seq_lens, query_start_loc, key_bias);
  CheckCudaAttention(kPagedAttentionPrefillOp, out, cache, query.size(0));
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  if (seq_lens.size(0) == 0) {
    out.zero_();  // no sequence owns a token (a valid call has T = 0 then)
    return;
  }
  if (FlashPrefillApplies(query, cache, block_tables, key_bias)) {
    FlashPrefill(out, query, kv_cache_layer, cache, block_tables, seq_lens, query_start_loc, scale);
    return;
  }
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(query.scalar_type(), kPagedAttentionPrefillOp, [&] {
    SplitAttention<scalar_t>(out, query, kv_cache_layer, cache, block_tables, seq_lens,
                             &query_start_loc, scale, key_bias);
  });
}

void attention_probs_cuda(const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                          const at::Tensor& seq_lens, const at::Tensor& heads, double scale,
                          const c10::optional<at::Tensor>& key_bias) {
  const PagedCacheShape cache =
      CheckAttentionProbsArgs(out, query, kv_cache_layer, block_tables, seq_lens, heads, key_bias);
  CheckCudaAttention(kAttentionProbsOp, out, cache, query.size(0));
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(query.scalar_type(), kAttentionProbsOp, [&] {
    Probs<scalar_t>(out, query, kv_cache_layer, cache, block_tables, seq_lens, heads, scale,
                    key_bias);
  });
}

}  // namespace dysco::kernels
