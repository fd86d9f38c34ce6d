// paged_attention_prefill on CUDA through flash attention: the sequences' keys and values are
// gathered from their pages into packed contiguous [total_keys, Hkv, D] tensors, then ATen's flash
// attention (FlashAttention-2, varlen, causal) runs over them. The split-KV kernel of
// paged_attention.cu reads every key once per query token, so a long prefill costs
// O(query tokens x keys) memory traffic on CUDA cores; flash tiles query tokens over tensor cores
// and reads each key once per tile of 64-128 query tokens.
//
// Why the causal mask is right: flash-attention 2's causal mask with seqlen_q != seqlen_k is
// aligned bottom-right (query i of Lq sees keys 0 .. i + Lk - Lq), which is the op's contract: a
// chunk of q_len new tokens at the end of a sequence of seq_len keys, its j-th token at position
// seq_len - q_len + j (torch's own CausalVariant.LOWER_RIGHT relies on the same flash semantics).
//
// Long chunks through cuDNN (docs/gpu.md "Prefill through cuDNN"): a sequence that brings at least
// kCudnnMinTokens new tokens runs through ATen's cuDNN attention (Hopper's fused flash kernels:
// 603-626 TFLOP/s on an H200 for a 128K prompt in 8192-token chunks against FlashAttention-2's
// 349, bench/prefill_attention_backends.py) instead; the other sequences of the call (decode rows,
// short chunks) take flash attention with the long chunks' keys cut to none (seqused_k), so a long
// chunk is never attended twice. cuDNN's causal mask is aligned top-left, so a chunk of q new
// tokens after P cached keys runs as two calls: the q x q square of its own keys with the causal
// mask, and the P earlier keys without one; a kernel merges the two halves by their log-sum-exps.
// That path plans on the host from the offsets: from the host lengths the model runner publishes
// for its forward (kernels/host_lengths.h), else read back from the device (one synchronisation
// per layer of a prefill step, with the GPU idle while the host then prepares the cuDNN calls:
// ~0.28 ms a layer on the H200; it is never taken while a CUDA graph is being captured), and pads
// each chunk to a multiple of kCudnnTokenBucket tokens (zero queries and zero keys after the real
// ones; under the top-left causal mask no real query sees a padded key), so that cuDNN builds one
// execution plan per bucket and prefix length (~50 ms each, cached by ATen) rather than one per
// prompt length.
//
// No host synchronisation on the flash path: the packed offsets (cu_seqlens) are computed on the
// device from query_start_loc and seq_lens; the gather buffers are sized for the upper bound known
// from shapes (B x block_table_width x page_size keys); max_seqlen_q / max_seqlen_k passed to flash
// are the host-known bounds T and block_table_width x page_size (flash takes each sequence's real
// lengths from cu_seqlens and uses the maxima only for its grid). Values are clamped as in the
// other CUDA ops: a bad call stays in bounds, its result unspecified.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_scaled_dot_product_cudnn_attention.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/paged_prefill_flash.h"
#include "kernels/host_lengths.h"

namespace dysco::kernels {
namespace {

using cuda::Clamp;

// The gather buffers may take at most this many bytes (K and V together); a larger upper bound
// (a batch of many long sequences) takes the split-KV kernel instead of risking the allocation.
constexpr int64_t kMaxGatherBytes = 8LL << 30;
// Keys per gather block (one page of the usual page size).
constexpr int kGatherRows = 16;
constexpr int kGatherThreads = 256;
// A sequence takes cuDNN when it brings at least this many new tokens (below it the attention is a
// small part of the step, and a plan per bucket is not worth building).
constexpr int64_t kCudnnMinTokens = 1024;
// Chunks are padded up to a multiple of this many tokens for cuDNN (one plan per bucket).
constexpr int64_t kCudnnTokenBucket = 1024;

// Set when a cuDNN call threw (no cuDNN, a shape it rejects): flash attention from then on.
std::atomic<bool> g_cudnn_failed{false};
// Sequences prefilled through cuDNN, for tests (paged_attention_prefill_cuda_cudnn_sequences).
std::atomic<int64_t> g_cudnn_sequences{0};
// Calls of the cuDNN path that read the offsets back from the device (no published host lengths).
std::atomic<int64_t> g_offset_read_backs{0};

// The environment variable DYSCO_CUDA_PREFILL = "flash2" keeps every chunk on flash attention
// (A/B timing in one process: read per call, as DYSCO_CUDA_PDL).
bool CudnnWanted() {
  return !cuda::EnvIs("DYSCO_CUDA_PREFILL", "flash2") &&
         !g_cudnn_failed.load(std::memory_order_relaxed);
}

// cu_q int32 [B + 1] <- query_start_loc clamped into [0, T] and made non-decreasing; cu_k int32
// [B + 1] <- the running sum of seq_lens clamped into [0, max_keys]. On the device (one thread: B
// is a batch size) or on the host from published host lengths (HostPackedOffsets).
__host__ __device__ void PackOffsets(int32_t* cu_q, int32_t* cu_k, const int64_t* query_start_loc,
                                     const int64_t* seq_lens, int64_t batch, int64_t tokens,
                                     int64_t max_keys) {
  int64_t q = 0;
  int64_t k = 0;
  cu_k[0] = 0;
  for (int64_t b = 0; b <= batch; ++b) {
    q = Clamp(query_start_loc[b], q, tokens);
    cu_q[b] = static_cast<int32_t>(q);
    if (b < batch) {
      k += Clamp(seq_lens[b], 0, max_keys);
      cu_k[b + 1] = static_cast<int32_t>(k);
    }
  }
}

__global__ void PackedOffsetsKernel(int32_t* cu_q, int32_t* cu_k, const int64_t* query_start_loc,
                                    const int64_t* seq_lens, int64_t batch, int64_t tokens,
                                    int64_t max_keys) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  PackOffsets(cu_q, cu_k, query_start_loc, seq_lens, batch, tokens, max_keys);
}

// PackedOffsetsKernel's cu_q and cu_k ([2, B + 1] int32), on the host from the published host
// lengths.
std::vector<int32_t> HostPackedOffsets(const HostLengths& lengths, int64_t tokens,
                                       int64_t max_keys) {
  std::vector<int32_t> offsets(static_cast<size_t>(2 * (lengths.batch + 1)));
  PackOffsets(offsets.data(), offsets.data() + lengths.batch + 1, lengths.query_start_loc,
              lengths.seq_lens, lengths.batch, tokens, max_keys);
  return offsets;
}

// Key j of sequence b (j < its length cu_k[b + 1] - cu_k[b]) from its page into row cu_k[b] + j of
// k_out / v_out, both halves of the cache at once. A row (Hkv x D elements) is row_words Words.
// Grid: x = tiles of kGatherRows keys, y = sequence. Block: kGatherThreads over the tile's words.
// Offsets within a tile are 32-bit: FlashPrefillApplies bounds a row (Hkv x D) to 2^20 elements.
template <typename Word>
__global__ void __launch_bounds__(kGatherThreads)
    GatherPagesKernel(Word* k_out, Word* v_out, const Word* k_cache, const Word* v_cache,
                      const int32_t* tables, const int32_t* cu_k, int64_t max_pages,
                      int64_t page_size, int64_t num_pages, int row_words) {
  const int64_t b = blockIdx.y;
  const int64_t begin = cu_k[b];
  const int64_t len = cu_k[b + 1] - begin;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGatherRows;
  if (first >= len) return;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kGatherRows), len - first));
  const int32_t* pages = tables + b * max_pages;
  for (int i = threadIdx.x; i < rows * row_words; i += kGatherThreads) {
    const int64_t j = first + i / row_words;
    const int w = i % row_words;
    const int64_t page = Clamp(pages[j / page_size], 0, num_pages - 1);
    const int64_t src = (page * page_size + j % page_size) * row_words + w;
    const int64_t dst = (begin + j) * row_words + w;
    k_out[dst] = k_cache[src];
    v_out[dst] = v_cache[src];
  }
}

template <typename Word>
void LaunchGather(const at::Tensor& k_out, const at::Tensor& v_out,
                  const at::Tensor& kv_cache_layer, const PagedCacheShape& cache,
                  const at::Tensor& block_tables, const at::Tensor& cu_k, cudaStream_t stream) {
  const int64_t row_bytes = cache.num_kv_heads * cache.head_dim * kv_cache_layer.element_size();
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const Word* k_cache = static_cast<const Word*>(kv_cache_layer.data_ptr());
  const Word* v_cache = k_cache + cache.num_pages * cache.page_size * row_words;
  const int64_t max_pages = block_tables.size(1);
  const int64_t tiles = cuda::CeilDiv(max_pages * cache.page_size, kGatherRows);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(block_tables.size(0)));
  GatherPagesKernel<Word><<<grid, kGatherThreads, 0, stream>>>(
      static_cast<Word*>(k_out.data_ptr()), static_cast<Word*>(v_out.data_ptr()), k_cache, v_cache,
      block_tables.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), max_pages, cache.page_size,
      cache.num_pages, static_cast<int>(row_words));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The weights of the two halves of a merge (MergeHalvesKernel, MergeHalvesVecKernel) from their
// log-sum-exps: softmax over the two, so that both kernels weigh a (row, head) with the same bits.
__device__ __forceinline__ void HalfWeights(float tail_lse, float prefix_lse, float* w_tail,
                                            float* w_prefix) {
  const float m = fmaxf(tail_lse, prefix_lse);
  *w_tail = expf(tail_lse - m);
  *w_prefix = expf(prefix_lse - m);
  const float inv = 1.0f / (*w_tail + *w_prefix);
  *w_tail *= inv;
  *w_prefix *= inv;
}

// out row t, head h <- the softmax-weighted merge of two attention results over disjoint key sets:
// tail (the chunk's own keys, causal) and prefix (the keys before the chunk; null when there are
// none), each with its log-sum-exp of the scaled scores (natural log, as flash attention's).
// Grid: x = rows, y = query heads. Block: threads over head_dim.
template <typename scalar_t>
__global__ void MergeHalvesKernel(scalar_t* out, int64_t out_t, int64_t out_h, const scalar_t* tail,
                                  int64_t tail_h, int64_t tail_t, const float* tail_lse,
                                  int64_t tail_lse_h, int64_t tail_lse_t, const scalar_t* prefix,
                                  int64_t prefix_h, int64_t prefix_t, const float* prefix_lse,
                                  int64_t prefix_lse_h, int64_t prefix_lse_t, int head_dim) {
  using Cv = cuda::Convert<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  float w_tail = 1.0f;
  float w_prefix = 0.0f;
  if (prefix != nullptr) {
    HalfWeights(tail_lse[h * tail_lse_h + t * tail_lse_t],
                prefix_lse[h * prefix_lse_h + t * prefix_lse_t], &w_tail, &w_prefix);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = w_tail * Cv::ToFloat(tail[h * tail_h + t * tail_t + d]);
    if (prefix != nullptr) acc += w_prefix * Cv::ToFloat(prefix[h * prefix_h + t * prefix_t + d]);
    out[t * out_t + h * out_h + d] = Cv::FromFloat(acc);
  }
}

// MergeHalvesKernel with 16-byte loads and stores: a (row, head) of head_dim elements is
// kLanes lanes of 8 elements each, kMergeThreads / kLanes of them a block. The same weights and
// the same per-element expression as MergeHalvesKernel, so the same bits. Why: one 128-thread block
// per (row, head) with 2-byte accesses took 0.2 ms a layer for an 8192-token chunk on the H200, ~4x
// its bytes (docs/performance.md, the 128K TTFT profile).
// Grid: x = blocks of (row, head) pairs, pair = row * heads + head. Block: kMergeThreads.
constexpr int kMergeThreads = 256;

template <typename scalar_t, int kLanes>
__global__ void __launch_bounds__(kMergeThreads)
    MergeHalvesVecKernel(scalar_t* out, int64_t out_t, int64_t out_h, const scalar_t* tail,
                         int64_t tail_h, int64_t tail_t, const float* tail_lse, int64_t tail_lse_h,
                         int64_t tail_lse_t, const scalar_t* prefix, int64_t prefix_h,
                         int64_t prefix_t, const float* prefix_lse, int64_t prefix_lse_h,
                         int64_t prefix_lse_t, int64_t rows, int64_t heads) {
  using Cv = cuda::Convert<scalar_t>;
  constexpr int kVec = 8;  // 16 bytes of bf16 / fp16
  const int64_t pair =
      blockIdx.x * static_cast<int64_t>(kMergeThreads / kLanes) + threadIdx.x / kLanes;
  if (pair >= rows * heads) return;
  const int64_t t = pair / heads;
  const int64_t h = pair % heads;
  const int d0 = (threadIdx.x % kLanes) * kVec;
  float w_tail = 1.0f;
  float w_prefix = 0.0f;
  if (prefix != nullptr) {
    HalfWeights(tail_lse[h * tail_lse_h + t * tail_lse_t],
                prefix_lse[h * prefix_lse_h + t * prefix_lse_t], &w_tail, &w_prefix);
  }
  scalar_t a[kVec], b[kVec], y[kVec];
  const uint4 a_raw = *reinterpret_cast<const uint4*>(tail + h * tail_h + t * tail_t + d0);
  memcpy(a, &a_raw, sizeof(a_raw));
  if (prefix != nullptr) {
    const uint4 b_raw = *reinterpret_cast<const uint4*>(prefix + h * prefix_h + t * prefix_t + d0);
    memcpy(b, &b_raw, sizeof(b_raw));
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float acc = w_tail * Cv::ToFloat(a[e]);
    if (prefix != nullptr) acc += w_prefix * Cv::ToFloat(b[e]);
    y[e] = Cv::FromFloat(acc);
  }
  uint4 y_raw;
  memcpy(&y_raw, y, sizeof(y_raw));
  *reinterpret_cast<uint4*>(out + t * out_t + h * out_h + d0) = y_raw;
}

// Whether MergeHalvesVecKernel applies: head_dim a power of two of 8-element vectors, at most a
// warp's worth, every row 16-byte aligned. DYSCO_CUDA_PREFILL_MERGE=scalar: MergeHalvesKernel
// (A/B and tests).
bool MergeVectorised(const at::Tensor& rows, const at::Tensor& tail, const at::Tensor& prefix) {
  if (cuda::EnvIs("DYSCO_CUDA_PREFILL_MERGE", "scalar")) return false;
  const int64_t d = rows.size(2);
  const int64_t lanes = d / 8;
  if (rows.element_size() != 2 || d % 8 != 0 || lanes > 32 || (lanes & (lanes - 1)) != 0) {
    return false;
  }
  auto aligned = [](const at::Tensor& x, int64_t s1, int64_t s2) {
    return cuda::Aligned16(x.data_ptr()) && s1 % 8 == 0 && s2 % 8 == 0;
  };
  return rows.stride(2) == 1 && tail.stride(3) == 1 &&
         aligned(rows, rows.stride(0), rows.stride(1)) &&
         aligned(tail, tail.stride(1), tail.stride(2)) &&
         (!prefix.defined() ||
          (prefix.stride(3) == 1 && aligned(prefix, prefix.stride(1), prefix.stride(2))));
}

template <typename scalar_t>
void LaunchMerge(const at::Tensor& rows, const at::Tensor& tail, const at::Tensor& tail_lse,
                 const at::Tensor& prefix, const at::Tensor& prefix_lse, dim3 grid, int threads,
                 cudaStream_t stream) {
  // Strides of the [1, H, L(, 1)] log-sum-exps along heads and rows.
  const bool has_prefix = prefix.defined();
  if (MergeVectorised(rows, tail, prefix)) {
    const int64_t num_rows = rows.size(0);
    const int64_t heads = rows.size(1);
    const int lanes = static_cast<int>(rows.size(2) / 8);
    auto launch = [&](auto kl) {
      constexpr int kLanes = decltype(kl)::value;
      const int64_t pairs_per_block = kMergeThreads / kLanes;
      const auto blocks = static_cast<unsigned>(cuda::CeilDiv(num_rows * heads, pairs_per_block));
      MergeHalvesVecKernel<scalar_t, kLanes><<<blocks, kMergeThreads, 0, stream>>>(
          static_cast<scalar_t*>(rows.data_ptr()), rows.stride(0), rows.stride(1),
          static_cast<const scalar_t*>(tail.data_ptr()), tail.stride(1), tail.stride(2),
          tail_lse.data_ptr<float>(), tail_lse.stride(1), tail_lse.stride(2),
          has_prefix ? static_cast<const scalar_t*>(prefix.data_ptr()) : nullptr,
          has_prefix ? prefix.stride(1) : 0, has_prefix ? prefix.stride(2) : 0,
          has_prefix ? prefix_lse.data_ptr<float>() : nullptr,
          has_prefix ? prefix_lse.stride(1) : 0, has_prefix ? prefix_lse.stride(2) : 0, num_rows,
          heads);
    };
    switch (lanes) {
      case 1:
        launch(std::integral_constant<int, 1>());
        break;
      case 2:
        launch(std::integral_constant<int, 2>());
        break;
      case 4:
        launch(std::integral_constant<int, 4>());
        break;
      case 8:
        launch(std::integral_constant<int, 8>());
        break;
      case 16:
        launch(std::integral_constant<int, 16>());
        break;
      default:
        launch(std::integral_constant<int, 32>());
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  MergeHalvesKernel<scalar_t><<<grid, threads, 0, stream>>>(
      static_cast<scalar_t*>(rows.data_ptr()), rows.stride(0), rows.stride(1),
      static_cast<const scalar_t*>(tail.data_ptr()), tail.stride(1), tail.stride(2),
      tail_lse.data_ptr<float>(), tail_lse.stride(1), tail_lse.stride(2),
      has_prefix ? static_cast<const scalar_t*>(prefix.data_ptr()) : nullptr,
      has_prefix ? prefix.stride(1) : 0, has_prefix ? prefix.stride(2) : 0,
      has_prefix ? prefix_lse.data_ptr<float>() : nullptr, has_prefix ? prefix_lse.stride(1) : 0,
      has_prefix ? prefix_lse.stride(2) : 0, static_cast<int>(rows.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [L, H, D] -> the [1, H, L, D] view cuDNN attention takes (no copy).
at::Tensor HeadsFirst(const at::Tensor& x) { return x.transpose(0, 1).unsqueeze(0); }

// x's first `rows` rows followed by zero rows up to `padded` (x itself when rows == padded).
at::Tensor PadRows(const at::Tensor& x, int64_t padded) {
  if (x.size(0) == padded) return x;
  at::Tensor y = at::zeros({padded, x.size(1), x.size(2)}, x.options());
  y.slice(0, 0, x.size(0)).copy_(x);
  return y;
}

// Attention output [1, H, L, D] (last dim contiguous) and log-sum-exp [1, H, L(, 1)] fp32.
std::pair<at::Tensor, at::Tensor> CudnnAttention(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, bool causal, double scale) {
  const auto r = at::_scaled_dot_product_cudnn_attention(
      HeadsFirst(q), HeadsFirst(k), HeadsFirst(v), /*attn_bias=*/c10::nullopt,
      /*compute_log_sumexp=*/true, /*dropout_p=*/0.0, causal, /*return_debug_mask=*/false, scale);
  at::Tensor o = std::get<0>(r);
  if (o.stride(3) != 1) o = o.contiguous();
  at::Tensor lse = std::get<1>(r);
  if (lse.scalar_type() != at::kFloat) lse = lse.to(at::kFloat);
  return {o, lse};
}

// Whether a sequence's chunk of q_len new tokens over `keys` keys goes to cuDNN (file comment).
bool CudnnTakes(int64_t q_len, int64_t keys) { return q_len >= kCudnnMinTokens && q_len <= keys; }

// The flash attention call of the flash path: every sequence, or with seqused_k (int32 [B] on the
// device) each sequence's keys cut to that many (none for the chunks cuDNN takes), into out.
using FlashCall = std::function<void(const c10::optional<at::Tensor>& seqused_k)>;

// The cuDNN path (file comment): out <- attention of every sequence's new tokens, the sequences
// that bring at least kCudnnMinTokens (and no more than their keys) through cuDNN, the others
// through `flash` with the cuDNN sequences' keys cut to none; false (out unspecified) when no
// sequence qualifies or a cuDNN call threw. k / v: the packed keys, offsets: int32 [2, B + 1]
// (cu_q, cu_k) on the device; host_offsets: the same values on the host when the caller published
// its lengths (HostPackedOffsets), else empty, and the device's are read back (a synchronisation).
bool CudnnPrefill(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& offsets,
                  const std::vector<int32_t>& host_offsets, double scale, const FlashCall& flash) {
  const int64_t batch = offsets.size(1) - 1;
  at::Tensor read_back;
  const int32_t* cu_q = host_offsets.data();
  if (host_offsets.empty()) {
    read_back = offsets.to(at::kCPU);
    cu_q = read_back.data_ptr<int32_t>();
    g_offset_read_backs.fetch_add(1, std::memory_order_relaxed);
  }
  const int32_t* cu_k = cu_q + batch + 1;
  std::vector<int32_t> flash_keys(static_cast<size_t>(batch));
  bool any_long = false;
  bool any_short = false;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = cu_q[b + 1] - cu_q[b];
    const int64_t keys = cu_k[b + 1] - cu_k[b];
    const bool long_chunk = CudnnTakes(q_len, keys);
    flash_keys[b] = long_chunk ? 0 : static_cast<int32_t>(keys);
    any_long = any_long || long_chunk;
    any_short = any_short || (q_len > 0 && !long_chunk);
  }
  if (!any_long) return false;
  // The short chunks and decode rows first; the long chunks' rows of its output (no keys: zeros)
  // are overwritten below.
  if (any_short) flash(at::tensor(flash_keys, at::kInt).to(query.device()));
  const int64_t heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const cudaStream_t stream = cuda::CurrentStream();
  try {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t q_len = cu_q[b + 1] - cu_q[b];
      const int64_t keys = cu_k[b + 1] - cu_k[b];
      if (!CudnnTakes(q_len, keys)) continue;  // done by flash above
      const int64_t prefix_len = keys - q_len;
      const int64_t padded = cuda::CeilDiv(q_len, kCudnnTokenBucket) * kCudnnTokenBucket;
      const int64_t k0 = cu_k[b];
      const at::Tensor q = PadRows(query.slice(0, cu_q[b], cu_q[b + 1]), padded);
      at::Tensor tail;
      at::Tensor tail_lse;
      std::tie(tail, tail_lse) =
          CudnnAttention(q, PadRows(k.slice(0, k0 + prefix_len, k0 + keys), padded),
                         PadRows(v.slice(0, k0 + prefix_len, k0 + keys), padded), true, scale);
      at::Tensor prefix;
      at::Tensor prefix_lse;
      if (prefix_len > 0) {
        std::tie(prefix, prefix_lse) = CudnnAttention(
            q, k.slice(0, k0, k0 + prefix_len), v.slice(0, k0, k0 + prefix_len), false, scale);
      }
      const at::Tensor rows = out.slice(0, cu_q[b], cu_q[b + 1]);
      const dim3 grid(static_cast<unsigned>(q_len), static_cast<unsigned>(heads));
      const int threads = static_cast<int>(std::min<int64_t>(head_dim, 128));
      AT_DISPATCH_REDUCED_FLOATING_TYPES(
          query.scalar_type(), "paged_attention_prefill (cuDNN merge)", [&] {
            LaunchMerge<scalar_t>(rows, tail, tail_lse, prefix, prefix_lse, grid, threads, stream);
          });
      g_cudnn_sequences.fetch_add(1, std::memory_order_relaxed);
    }
  } catch (const c10::Error& e) {
    g_cudnn_failed.store(true, std::memory_order_relaxed);
    TORCH_WARN("dysco: cuDNN attention failed, prefill falls back to flash attention: ",
               e.what_without_backtrace());
    return false;
  }
  return true;
}

}  // namespace

bool FlashPrefillApplies(const at::Tensor& query, const PagedCacheShape& cache,
                         const at::Tensor& block_tables,
                         const c10::optional<at::Tensor>& key_bias) {
  const at::ScalarType dtype = query.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;  // flash: 16-bit only
  if (key_bias.has_value() && key_bias->defined()) return false;   // no per-key additive bias
  // Head sizes flash-attention 2 takes without padding: multiples of 8 up to 256.
  if (cache.head_dim % 8 != 0 || cache.head_dim > 256) return false;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(query.device().index());
  if (props->major < 8) return false;  // flash needs sm80 or newer
  // A row of Hkv x D elements: tile offsets in the gather kernel are 32-bit; its grid's y is the
  // sequence.
  if (cache.num_kv_heads * cache.head_dim > (1 << 20)) return false;
  if (block_tables.size(0) > 65535) return false;
  const int64_t capacity = block_tables.size(0) * block_tables.size(1) * cache.page_size;
  if (capacity > std::numeric_limits<int32_t>::max()) return false;  // int32 cu_seqlens
  const int64_t gather_bytes =
      2 * capacity * cache.num_kv_heads * cache.head_dim * query.element_size();
  return gather_bytes <= kMaxGatherBytes;
}

void FlashPrefill(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
                  const PagedCacheShape& cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale) {
  const int64_t tokens = query.size(0);
  const int64_t batch = block_tables.size(0);
  const int64_t max_keys = block_tables.size(1) * cache.page_size;
  if (max_keys == 0) {  // no keys at all: every row sees none (zeros, as the split kernel writes)
    out.zero_();
    return;
  }
  const cudaStream_t stream = cuda::CurrentStream();
  const auto int_options = query.options().dtype(at::kInt);
  at::Tensor offsets = at::empty({2, batch + 1}, int_options);
  at::Tensor cu_q = offsets[0];
  at::Tensor cu_k = offsets[1];
  PackedOffsetsKernel<<<1, 1, 0, stream>>>(cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(),
                                           query_start_loc.data_ptr<int64_t>(),
                                           seq_lens.data_ptr<int64_t>(), batch, tokens, max_keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t capacity = batch * max_keys;
  at::Tensor packed = at::empty({2, capacity, cache.num_kv_heads, cache.head_dim}, query.options());
  at::Tensor k = packed[0];
  at::Tensor v = packed[1];
  // Rows are whole multiples of 16 bytes (head_dim % 8 == 0, 2-byte elements): 16-byte words when
  // the cache and the buffer are aligned to them, else element by element.
  const bool aligned =
      cuda::Aligned16(kv_cache_layer.data_ptr()) && cuda::Aligned16(packed.data_ptr());
  if (aligned) {
    LaunchGather<uint4>(k, v, kv_cache_layer, cache, block_tables, cu_k, stream);
  } else {
    LaunchGather<uint16_t>(k, v, kv_cache_layer, cache, block_tables, cu_k, stream);
  }

  // max_seqlen_q: T, but at least 2. With max_seqlen_q == 1 and GQA, flash reshapes q as one token
  // per sequence ([B, Hkv, group, D]), which fails when some sequences have no new token (T = 1 <
  // B); a bound of 2 keeps the general path, and causal with one query token sees all its keys.
  const int64_t max_q = std::max<int64_t>(tokens, 2);
  const FlashCall flash = [&](const c10::optional<at::Tensor>& seqused_k) {
    const auto result = at::_flash_attention_forward(
        query, k, v, cu_q, cu_k, max_q, max_keys, /*dropout_p=*/0.0, /*is_causal=*/true,
        /*return_debug_mask=*/false, scale, /*window_size_left=*/c10::nullopt,
        /*window_size_right=*/c10::nullopt, seqused_k);
    // Rows owned by no sequence (only in an invalid call) are left as flash leaves them.
    out.copy_(std::get<0>(result));
  };
  if (tokens >= kCudnnMinTokens && CudnnWanted() && out.stride(2) == 1 &&
      at::cuda::currentStreamCaptureStatusMayInitCtx() == at::cuda::CaptureStatus::None) {
    const HostLengths* lengths = PublishedHostLengths(query_start_loc, seq_lens);
    // (PublishedHostLengths matched seq_lens' size, which the op's checks tie to batch.)
    const std::vector<int32_t> host_offsets =
        lengths != nullptr && !cuda::EnvIs("DYSCO_CUDA_PREFILL_HOST_LENGTHS", "0")
            ? HostPackedOffsets(*lengths, tokens, max_keys)
            : std::vector<int32_t>();
    if (CudnnPrefill(out, query, k, v, offsets, host_offsets, scale, flash)) return;
  }
  flash(c10::nullopt);
}

int64_t paged_attention_prefill_cuda_cudnn_sequences() {
  return g_cudnn_sequences.load(std::memory_order_relaxed);
}

int64_t paged_attention_prefill_cuda_offset_read_backs() {
  return g_offset_read_backs.load(std::memory_order_relaxed);
}

bool paged_attention_prefill_cuda_uses_flash(const at::Tensor& query,
                                             const at::Tensor& kv_cache_layer,
                                             const at::Tensor& block_tables,
                                             const c10::optional<at::Tensor>& key_bias) {
  const PagedCacheShape cache = CheckKvCache(kPagedAttentionPrefillOp, kv_cache_layer);
  return query.is_cuda() && FlashPrefillApplies(query, cache, block_tables, key_bias);
}

}  // namespace dysco::kernels
