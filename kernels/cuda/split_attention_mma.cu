// The tensor-core split-KV attention kernel for bf16 and fp16 caches with head_dim 64 or 128 (the
// 8B models' decode): the same contract and output (split partials of
// kernels/cuda/split_attention.cuh, merged by paged_attention.cu's MergeSplitsKernel, or by the
// kernel's own last split block of each head chunk when given merge counters) as the CUDA-core
// kernels.
//
// Why: decode reads the cache once, so it should run at the memory bandwidth; the CUDA-core kernels
// (scalar and vectorised) issue about 130 instructions per key and KV head (QK^T and PV on CUDA
// cores for every query head of the GQA group, the dot products' reductions by shuffles, per-key
// softmax), which ncu showed as 56% issue-slot use at 42% of DRAM bandwidth on an H200
// (docs/gpu.md). Here a warp takes tiles of 16 keys and does QK^T and PV with mma.sync m16n8k16
// (fp32 accumulation): the GQA group's query heads are the 16 rows of M (up to 16 heads per block;
// a group of 4 uses 4 and the rest are zeros: the tensor cores have room to spare, the loads are
// what counts), about 32 mma and 16 16-byte loads per tile and lane.
//
// Layout tricks (no shared memory in the loop, every load 16 bytes):
// - QK^T: S^T[q, key] = Q[q, :] . K[key, :]. The head dimension is the mma's k; a dot product does
//   not depend on the order of k, so k is permuted: lane (g, t) (g = lane / 4, t = lane % 4) holds,
//   for k-step kk, dims 32 (kk / 2) + 8 t + 4 (kk % 2) + {0, 1, 2, 3} of its query rows g and g + 8
//   (A fragment) and of key row g of the n-block (B fragment). Each lane then loads 8 contiguous
//   dims (16 bytes) per row and load, the four lanes of a quad 64 contiguous bytes.
// - The two n-blocks of 8 keys give S in the C layout, which is the A layout of P for PV (keys
//   2t, 2t + 1, 2t + 8, 2t + 9 of rows g and g + 8), as in FlashAttention-2: no shuffle.
// - PV: O[q, dim] += P[q, key] V[key, dim]. The n index (dims) is permuted: n-block nb, column g is
//   dim (head_dim / 8) g + nb, so that lane (g, t) loads a contiguous run of head_dim / 8 dims of
//   value rows 2t, 2t + 1, 2t + 8, 2t + 9, and packs the B fragments with byte permutes.
// - P is rounded to the cache type for PV (as FlashAttention does); S, the softmax state and O
//   stay fp32.
//
// Thread-safety: stateless (the merge counters are per stream: paged_attention.cu). Ownership:
// writes p.partial, and with p.merge_counters the merged rows of p.out.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/norm_rope.cuh"
#include "kernels/cuda/split_attention.cuh"

namespace dysco::kernels {
namespace {

using cuda::kWarpSize;

constexpr int kTileKeys = 16;  // keys per warp and iteration (the mma's k for PV)
constexpr int kMmaRows = 16;   // query heads per block (the mma's m)

template <typename T>
struct Mma;
template <>
struct Mma<c10::BFloat16> {
  __device__ static uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  // d += a (16 x 16, row) * b (16 x 8, col), fp32 accumulation.
  __device__ static void Run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<c10::Half> {
  __device__ static uint32_t Pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static void Run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint4 Load16(const void* src) {
  return __ldg(reinterpret_cast<const uint4*>(src));
}

// A 16-byte global load through the coherent path, for the cache rows that this kernel itself
// wrote (AttentionParams::qkv: the newest key), which the read-only path (__ldg) must not read.
// Volatile: kept after the barrier that follows the write.
__device__ __forceinline__ uint4 LoadCoherent16(const void* src) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
}

// Word w (0..3) of a 16-byte load; w is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t Word(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// How a warp gets its tiles of K and V (the kernel's kPipeline):
// - kNoPrefetch: the query rows as the mma's M; each tile's loads (K, V and the bias pairs, all
//   issued before any arithmetic), then its arithmetic. Two blocks of four warps per
//   multiprocessor hide the latency. The default for query groups of more than 8 (kSwapRows), and
//   for every group with DYSCO_CUDA_MMA_PREFETCH=0 (the default until the twentieth increment).
// - kRegisterPrefetch: the next tile's loads into a second set of registers before the current
//   tile's arithmetic (the fifth increment's default; DYSCO_CUDA_MMA_PREFETCH=1). Once a tile's
//   instructions were cut (a page-table read per tile, O rescaled only when a maximum grows) it
//   lost: 0.146 against 0.142 ms at 128K keys on the H200 (docs/gpu.md "Measured: the decode
//   kernels", with the cp.async rings that were tried and dropped).
// - kSwapOperands (the default for query groups of at most 8; DYSCO_CUDA_MMA_PREFETCH unset or
//   =swap): as kNoPrefetch, with the mma's operands swapped: S^T = K Q^T with the tile's 16 keys
//   as the mma's M and the group's query rows as its N (8), and O^T = V^T P^T with the head's dims
//   as M. The K and V words a lane loads are the same; Q takes half the registers (the B operand)
//   and O half (8 rows instead of 16, of which a group of 4 fills 4), and a tile takes half the
//   mma instructions. P^T's B fragments come from S^T's accumulators by an 8x8 transpose in
//   registers (movmatrix). Why: with Qwen3's and Llama's groups of 4, 3/4 of kNoPrefetch's Q and
//   O registers hold zero rows; 158 registers instead of 222 at head_dim 128 give three blocks a
//   multiprocessor. Measured on the H200 (docs/gpu.md "The swapped operands for small query
//   groups"): 0.129 against 0.141 ms a call at 128K keys, 0.0388 against 0.0440 at 32K; the
//   Qwen3-8B decode step 8.50 against 8.93 ms at 128K. Not kNoPrefetch's bits (the mma sums its
//   products in its own order either way; another operand order may round differently).
constexpr int kNoPrefetch = 0;
constexpr int kRegisterPrefetch = 1;
constexpr int kSwapOperands = 2;
// - kSwapPrefetch: kSwapOperands with kRegisterPrefetch's two register sets
//   (DYSCO_CUDA_MMA_PREFETCH=swap-prefetch, opt-in): the swapped operands' registers saved spent
//   on a second tile in flight a warp instead of a third block. Faster alone at 8K keys (0.0123
//   against 0.0143 ms a call) but not in the step, and slower at 128K (0.130 ms).
constexpr int kSwapPrefetch = 3;
// Query rows a block of the kSwapOperands pipeline takes (the mma's n).
constexpr int kSwapRows = 8;

// An 8x8 matrix of 16-bit pairs in the mma's fragment layout (lane: row lane / 4, columns
// 2 (lane % 4) and + 1), transposed across the warp.
__device__ __forceinline__ uint32_t Transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// The warps' softmax states and accumulators combined at the end (WriteSplitPartials); a row of
// accumulators is padded by one float, so that a warp's C-layout stores spread over the banks
// (4-way instead of 32-way conflicts).
template <int kHeadDim>
constexpr int kAccStride = kHeadDim + 1;

// Grid: x = query token, y = split, z = KV head * row_chunks + chunk (16 query heads a chunk).
// Block: kAttentionThreads (4 warps, each its own tiles of keys; combined at the end).
// kProbes: the instance for calls with p.probe_logits (its own instance, so that the probe code's
// registers, 236 against 222 at head_dim 128 and 168 against 128 at 64, stay out of every other
// call's kernel).
template <typename T, int kHeadDim, int kPipeline, bool kProbes = false>
__global__ void __launch_bounds__(kAttentionThreads)
    MmaSplitAttentionKernel(const AttentionParams<T> p) {
  // The o_proj GEMV after it may start: its blocks take the multiprocessors this grid's blocks
  // leave (and, with linear.cu GemvRingSplits, issue their weight copies under this grid's tail).
  cuda::AllowDependentLaunch();
  constexpr int kKSteps = kHeadDim / 16;      // k-steps of QK^T
  constexpr int kRowLoads = kHeadDim / 32;    // 16-byte loads per Q or K row and lane
  constexpr int kDimsPerLane = kHeadDim / 8;  // value dims per lane (PV's n-blocks)
  constexpr int kValueLoads = kDimsPerLane / 8;
  constexpr int kStride = kAccStride<kHeadDim>;
  const int64_t token = blockIdx.x;
  const int split = blockIdx.y;
  const int kv_head = blockIdx.z / p.row_chunks;
  const int head0 = kv_head * p.group + (blockIdx.z % p.row_chunks) * kMmaRows;
  const int rows = min(kMmaRows, kv_head * p.group + p.group - head0);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int kv_heads = p.num_heads / p.group;
  const int64_t token_stride = static_cast<int64_t>(kv_heads) * kHeadDim;
  const int64_t page_stride = p.page_size * token_stride;
  const int page_size = static_cast<int>(p.page_size);

  int64_t b = 0;
  int64_t limit = 0;
  TokenSequence(p, token, &b, &limit);
  int64_t split_begin = 0;
  int64_t split_end = 0;
  SplitKeys(p, limit, split, &split_begin, &split_end);
  const int key_begin = static_cast<int>(split_begin);
  const int key_end = static_cast<int>(split_end);

  // Q as A fragments: rows g and g + 8 of the chunk (zeros past `rows`), dims permuted as above.
  // Read after the wait for the kernel ahead, which writes it (AttentionParams::early_keys).
  // kSwapOperands: B fragments instead (row g, dims as above), two registers a k-step.
  constexpr bool kSwap = kPipeline == kSwapOperands || kPipeline == kSwapPrefetch;
  uint32_t qa[kKSteps][kSwap ? 2 : 4];
  // The warps' softmax states and accumulators, combined at the end; with p.qkv its first
  // kMmaRows * kHeadDim elements of T first hold the query rows this block makes (make_query).
  __shared__ float s_m[kAttentionWarps * kMmaRows];
  __shared__ float s_l[kAttentionWarps * kMmaRows];
  __shared__ alignas(16) float s_acc[kAttentionWarps * kMmaRows * kStride];
  static_assert(kMmaRows * kHeadDim * sizeof(T) <= sizeof(s_acc), "the query rows fit s_acc");
  T* const s_query = reinterpret_cast<T*>(s_acc);
  auto load_query = [&] {
    if constexpr (kSwap) {
#pragma unroll
      for (int i = 0; i < kRowLoads; ++i) {
        uint4 w = make_uint4(0, 0, 0, 0);
        if (g < rows) {
          w = p.qkv != nullptr
                  ? *reinterpret_cast<const uint4*>(s_query + g * kHeadDim + 32 * i + 8 * t)
                  : Load16(p.query + (token * p.num_heads + head0 + g) * kHeadDim + 32 * i + 8 * t);
        }
        qa[2 * i][0] = w.x;
        qa[2 * i][1] = w.y;
        qa[2 * i + 1][0] = w.z;
        qa[2 * i + 1][1] = w.w;
      }
    } else {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = g + 8 * half;
#pragma unroll
        for (int i = 0; i < kRowLoads; ++i) {
          uint4 w = make_uint4(0, 0, 0, 0);
          if (row < rows) {
            w = p.qkv != nullptr
                    ? *reinterpret_cast<const uint4*>(s_query + row * kHeadDim + 32 * i + 8 * t)
                    : Load16(p.query + (token * p.num_heads + head0 + row) * kHeadDim + 32 * i +
                             8 * t);
          }
          qa[2 * i][half] = w.x;
          qa[2 * i][2 + half] = w.y;
          qa[2 * i + 1][half] = w.z;
          qa[2 * i + 1][2 + half] = w.w;
        }
      }
    }
  };

  // With p.qkv (qk_norm_rope_attention_decode), after the wait for the q/k/v projection: the
  // chunk's query rows normed and rotated into s_query, warp w making rows w, w + 4, ...; the split
  // that holds the token's newest key writes that key (normed, rotated) and its value to the cache
  // first, which only its tiles read (after the barrier). The same device function as
  // qk_norm_rope_kv_write's kernel (WarpNormRopeHead), so the same bits.
  const bool holds_newest = limit > 0 && key_begin <= limit - 1 && limit - 1 < key_end;
  auto make_query = [&] {
    const int64_t qkv_row = static_cast<int64_t>(p.num_heads + 2 * kv_heads) * kHeadDim;
    const T* x = p.qkv + token * qkv_row;
    const T* rope_cos = p.rope_cos + token * kHeadDim;
    const T* rope_sin = p.rope_sin + token * kHeadDim;
    for (int r = warp; r < rows; r += kAttentionWarps) {
      WarpNormRopeHead(x + static_cast<int64_t>(head0 + r) * kHeadDim, p.q_norm, rope_cos, rope_sin,
                       kHeadDim, lane, p.eps, s_query + r * kHeadDim);
    }
    if (holds_newest && warp == kAttentionWarps - 1) {
      const int64_t slot = p.slots[token];
      if (slot >= 0 && slot < p.num_slots) {
        const int64_t at = (slot * kv_heads + kv_head) * kHeadDim;
        const T* value = x + static_cast<int64_t>(p.num_heads + kv_heads + kv_head) * kHeadDim;
        T* v_row = const_cast<T*>(p.v_cache) + at;
        for (int i = lane; i < kHeadDim; i += kWarpSize) v_row[i] = value[i];
        WarpNormRopeHead(x + static_cast<int64_t>(p.num_heads + kv_head) * kHeadDim, p.k_norm,
                         rope_cos, rope_sin, kHeadDim, lane, p.eps, const_cast<T*>(p.k_cache) + at);
      }
    }
    __syncthreads();
  };
  // Split 0's copy of its query rows out of s_query into p.query_out (for attention_probs), then
  // the barrier that frees s_acc again.
  auto write_query = [&] {
    if (split == 0) {
      constexpr int kRowWords = kHeadDim / 8;  // 16-byte words of a row
      for (int i = threadIdx.x; i < rows * kRowWords; i += kAttentionThreads) {
        const int r = i / kRowWords;
        const int w = i % kRowWords;
        *reinterpret_cast<uint4*>(p.query_out + (token * p.num_heads + head0 + r) * kHeadDim +
                                  8 * w) =
            *reinterpret_cast<const uint4*>(s_query + r * kHeadDim + 8 * w);
      }
    }
    __syncthreads();
  };

  const int32_t* pages = p.tables + b * p.max_pages;
  const float* bias = p.bias == nullptr ? nullptr : p.bias + b * p.bias_width;
  // The bias of keys (2t, 2t + 1) of a tile as one 8-byte load when the rows allow it (even width,
  // 8-byte aligned start; tiles start at even keys: the launcher's split_len is a multiple of 16).
  const bool paired_bias = bias != nullptr && (p.bias_width % 2) == 0 &&
                           (reinterpret_cast<uintptr_t>(p.bias) % 8) == 0 && (key_begin % 2) == 0;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim;
  auto row_offset = [&](int key) {
    const int page_index = key / page_size;
    const int64_t page = cuda::Clamp(pages[page_index], 0, p.num_pages - 1);
    return page * page_stride + (key - page_index * page_size) * token_stride + head_offset;
  };

  // With probes: each row's slot in probe_heads (its first; -1: not probed), read before the wait
  // (the host writes probe_heads, not the kernel ahead). probe_row[h]: rows g and g + 8's logit
  // rows (kSwapOperands: rows 2t and 2t + 1's).
  __shared__ int s_probe_slot[kMmaRows];
  float* probe_row[2] = {nullptr, nullptr};
  if constexpr (kProbes) {
    if (threadIdx.x < kMmaRows) {
      s_probe_slot[threadIdx.x] = static_cast<int>(threadIdx.x) < rows
                                      ? FirstProbeSlot(p.probe_heads, p.num_probe, p.num_heads,
                                                       head0 + static_cast<int>(threadIdx.x))
                                      : -1;
    }
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int slot = s_probe_slot[kSwap ? 2 * t + half : g + 8 * half];
      if (slot >= 0) probe_row[half] = p.probe_logits + (b * p.num_probe + slot) * p.probe_len;
    }
  }

  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (uniform over a quad)
  float l[2] = {0.0f, 0.0f};            // this lane's part of their running sums
  // O in the C layout of PV's n-blocks; kSwapOperands: O^T in the C layout of its m-tiles (rows 2t
  // and 2t + 1, dims kDimsPerLane g + 2 mb and + 1), and m, l are rows 2t and 2t + 1's.
  constexpr int kAccBlocks = kSwap ? kDimsPerLane / 2 : kDimsPerLane;
  float o[kAccBlocks][4];
#pragma unroll
  for (int nb = 0; nb < kAccBlocks; ++nb) {
#pragma unroll
    for (int c = 0; c < 4; ++c) o[nb][c] = 0.0f;
  }

  // Where row r (0..15) of the tile starting at `tile` (< key_end) lies in the cache. When the page
  // size is a multiple of 16 a tile lies in one page (tiles start at multiples of 16: split_len is
  // one), so the page table is read and the key divided once per tile instead of once per row.
  const bool tile_in_one_page = page_size % kTileKeys == 0;
  auto tile_rows = [&](int tile) { return tile_in_one_page ? row_offset(tile) : int64_t{0}; };
  auto offset = [&](int tile, int64_t tile_base, int r) {
    return tile_in_one_page ? tile_base + r * token_stride : row_offset(tile + r);
  };

  // The bias of keys pair = tile + 8 nbk + 2t and pair + 1 (zeros past key_end), read with the
  // tile's K and V so that its latency overlaps theirs.
  auto load_bias = [&](int tile, float2(&tile_bias)[2]) {
    if constexpr (kSwap) {
      // Keys tile + g and tile + g + 8 (S^T's rows), in tile_bias[0].x and .y.
      tile_bias[0] = make_float2(0.0f, 0.0f);
      tile_bias[1] = make_float2(0.0f, 0.0f);
      if (bias != nullptr) {
        if (tile + g < key_end) tile_bias[0].x = bias[tile + g];
        if (tile + g + 8 < key_end) tile_bias[0].y = bias[tile + g + 8];
      }
    } else {
#pragma unroll
      for (int nbk = 0; nbk < 2; ++nbk) {
        const int pair = tile + 8 * nbk + 2 * t;
        tile_bias[nbk] = make_float2(0.0f, 0.0f);
        if (paired_bias) {
          // pair is even and the width even, so pair < key_end <= width puts pair + 1 in the row.
          if (pair < key_end) tile_bias[nbk] = *reinterpret_cast<const float2*>(bias + pair);
        } else if (bias != nullptr) {
          if (pair < key_end) tile_bias[nbk].x = bias[pair];
          if (pair + 1 < key_end) tile_bias[nbk].y = bias[pair + 1];
        }
      }
    }
  };

  // K rows g and 8 + g of the tile (B fragments of QK^T's two n-blocks); V rows 2t, 2t + 1, 2t + 8,
  // 2t + 9 of the tile, dims [kDimsPerLane g, kDimsPerLane (g + 1)); the tile's bias pairs. Zeros
  // past key_end.
  auto load_tile = [&](int tile, uint4(&kw)[2][kRowLoads], uint4(&vw)[4][kValueLoads],
                       float2(&tile_bias)[2]) {
    load_bias(tile, tile_bias);
    const int64_t tile_base = tile_rows(tile);
    // The tile of the newest key when this kernel wrote it (make_query): coherent loads.
    const bool fresh = p.qkv != nullptr && tile + kTileKeys >= limit;
    auto load = [&](const T* src) { return fresh ? LoadCoherent16(src) : Load16(src); };
#pragma unroll
    for (int nbk = 0; nbk < 2; ++nbk) {
      const int r = 8 * nbk + g;
      if (tile + r < key_end) {
        const T* row = p.k_cache + offset(tile, tile_base, r) + 8 * t;
#pragma unroll
        for (int i = 0; i < kRowLoads; ++i) kw[nbk][i] = load(row + 32 * i);
      } else {
#pragma unroll
        for (int i = 0; i < kRowLoads; ++i) kw[nbk][i] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int vr = 0; vr < 4; ++vr) {
      const int r = 2 * t + (vr & 1) + 8 * (vr >> 1);
      if (tile + r < key_end) {
        const T* row = p.v_cache + offset(tile, tile_base, r) + kDimsPerLane * g;
#pragma unroll
        for (int i = 0; i < kValueLoads; ++i) vw[vr][i] = load(row + 8 * i);
      } else {
#pragma unroll
        for (int i = 0; i < kValueLoads; ++i) vw[vr][i] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  // One tile's arithmetic: S = Q K^T (+ bias), the online softmax, O += P V.
  auto process_tile = [&](int tile, const uint4(&kw)[2][kRowLoads],
                          const uint4(&vw)[4][kValueLoads], const float2(&tile_bias)[2]) {
    if constexpr (kSwap) {
      // S^T (C layout): st[c] is key tile + g + 8 (c / 2), row 2t + c % 2. A fragments: K rows g
      // and g + 8, the dims permuted as Q's.
      float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint4& w0 = kw[0][kk / 2];
        const uint4& w1 = kw[1][kk / 2];
        const bool even = (kk % 2) == 0;
        const uint32_t a[4] = {even ? w0.x : w0.z, even ? w1.x : w1.z, even ? w0.y : w0.w,
                               even ? w1.y : w1.w};
        Mma<T>::Run(st, a, qa[kk][0], qa[kk][1]);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int key = tile + g + 8 * (c / 2);
        st[c] = key < key_end ? st[c] * p.scale + ((c / 2) == 0 ? tile_bias[0].x : tile_bias[0].y)
                              : -INFINITY;
        // A probed row's logit (row 2t + c % 2), as its softmax below takes it.
        if constexpr (kProbes) {
          float* const probe = probe_row[c % 2];
          if (probe != nullptr && key < key_end && key < p.probe_len) probe[key] = st[c];
        }
      }
      // Online softmax of rows 2t + e: the row's 16 keys are over the 8 lanes of this t.
      float correction[2];
      bool grew = false;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float tile_max = fmaxf(st[e], st[2 + e]);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 8));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
        const float m_new = fmaxf(m[e], tile_max);
        grew = grew || m_new > m[e];
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        correction[e] = expf(m[e] - m_use);
        st[e] = expf(st[e] - m_use);
        st[2 + e] = expf(st[2 + e] - m_use);
        l[e] = l[e] * correction[e] + (st[e] + st[2 + e]);
        m[e] = m_new;
      }
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int mb = 0; mb < kAccBlocks; ++mb) {
#pragma unroll
          for (int c = 0; c < 4; ++c) o[mb][c] *= correction[c % 2];
        }
      }
      // P^T's B fragments (keys 2t, 2t + 1 and 2t + 8, 2t + 9 of row g): the two 8x8 halves of
      // S^T (keys g, rows 2t, 2t + 1), transposed.
      const uint32_t b0 = Transpose8x8(Mma<T>::Pack(st[0], st[1]));
      const uint32_t b1 = Transpose8x8(Mma<T>::Pack(st[2], st[3]));
#pragma unroll
      for (int mb = 0; mb < kAccBlocks; ++mb) {
        // V^T's A fragment of m-tile mb: dims kDimsPerLane g + 2 mb (row g) and + 1 (row g + 8),
        // keys 2t, 2t + 1 (a[0], a[1]) and 2t + 8, 2t + 9 (a[2], a[3]); element 2 mb + x of this
        // lane's run of each value row.
        const int load = (2 * mb) / 8;
        const int word = mb % 4;
        const uint32_t a[4] = {
            __byte_perm(Word(vw[0][load], word), Word(vw[1][load], word), 0x5410u),
            __byte_perm(Word(vw[0][load], word), Word(vw[1][load], word), 0x7632u),
            __byte_perm(Word(vw[2][load], word), Word(vw[3][load], word), 0x5410u),
            __byte_perm(Word(vw[2][load], word), Word(vw[3][load], word), 0x7632u)};
        Mma<T>::Run(o[mb], a, b0, b1);
      }
    } else {
      // S (C layout): s[nbk][c] is row g + 8 (c / 2), key tile + 8 nbk + 2t + c % 2.
      float s[2][4];
#pragma unroll
      for (int nbk = 0; nbk < 2; ++nbk) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nbk][c] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          const uint4& w = kw[nbk][kk / 2];
          Mma<T>::Run(s[nbk], qa[kk], (kk % 2) == 0 ? w.x : w.z, (kk % 2) == 0 ? w.y : w.w);
        }
        // Keys pair = tile + 8 nbk + 2t and pair + 1 (C layout columns c % 2 of rows g, g + 8).
        const int pair = tile + 8 * nbk + 2 * t;
        const float2 key_bias = tile_bias[nbk];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int key = pair + (c % 2);
          s[nbk][c] = key < key_end ? s[nbk][c] * p.scale + ((c % 2) == 0 ? key_bias.x : key_bias.y)
                                    : -INFINITY;
          // A probed row's logit, as its softmax below takes it (each key is in one split only).
          if constexpr (kProbes) {
            float* const probe = probe_row[c / 2];
            if (probe != nullptr && key < key_end && key < p.probe_len) probe[key] = s[nbk][c];
          }
        }
      }

      // Online softmax per row; the quad's four lanes hold the row's 16 keys. O is rescaled only
      // when some row's maximum of the warp grew: otherwise every correction is exp(0) = 1 (and
      // while a maximum is still -inf, O is 0), so skipping the 64 multiplies changes no bit.
      float correction[2];
      bool grew = false;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = fmaxf(fmaxf(s[0][2 * half], s[0][2 * half + 1]),
                               fmaxf(s[1][2 * half], s[1][2 * half + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(m[half], tile_max);
        grew = grew || m_new > m[half];
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // every key so far masked
        correction[half] = expf(m[half] - m_use);               // 0 while m is -inf
        float sum = 0.0f;
#pragma unroll
        for (int nbk = 0; nbk < 2; ++nbk) {
#pragma unroll
          for (int c = 2 * half; c < 2 * half + 2; ++c) {
            s[nbk][c] = expf(s[nbk][c] - m_use);  // 0 for a masked key
            sum += s[nbk][c];
          }
        }
        l[half] = l[half] * correction[half] + sum;
        m[half] = m_new;
      }
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int nb = 0; nb < kDimsPerLane; ++nb) {
#pragma unroll
          for (int c = 0; c < 4; ++c) o[nb][c] *= correction[c / 2];
        }
      }

      // P as the A fragment of PV (rows g, g + 8; keys 2t, 2t + 1, 2t + 8, 2t + 9).
      const uint32_t pa[4] = {Mma<T>::Pack(s[0][0], s[0][1]), Mma<T>::Pack(s[0][2], s[0][3]),
                              Mma<T>::Pack(s[1][0], s[1][1]), Mma<T>::Pack(s[1][2], s[1][3])};
#pragma unroll
      for (int nb = 0; nb < kDimsPerLane; ++nb) {
        // Element nb of this lane's run of each value row: word (nb % 8) / 2 of load nb / 8, low
        // half for even nb. Byte permutes put key 2t (resp. 2t + 8) low and 2t + 1 (2t + 9) high.
        const unsigned selector = (nb % 2) == 0 ? 0x5410u : 0x7632u;
        const int load = nb / 8;
        const int word = (nb % 8) / 2;
        const uint32_t b0 = __byte_perm(Word(vw[0][load], word), Word(vw[1][load], word), selector);
        const uint32_t b1 = __byte_perm(Word(vw[2][load], word), Word(vw[3][load], word), selector);
        Mma<T>::Run(o[nb], pa, b0, b1);
      }
    }
  };

  constexpr int kTileStride = kAttentionWarps * kTileKeys;
  const int first_tile = key_begin + warp * kTileKeys;
  // Whether this warp's first tile is loaded before the wait: its keys all precede the row's newest
  // (a decode row's newest key is limit - 1), so the kernel ahead does not write them.
  const bool early_tile = p.early_tile && first_tile + kTileKeys <= limit - 1;
  // The first tile where it may be loaded before the wait, the wait, then the query.
  auto start = [&](auto& kw, auto& vw, auto& tile_bias) {
    if (early_tile) load_tile(first_tile, kw, vw, tile_bias);
    cuda::WaitForPrerequisiteGrids();
    if (p.qkv != nullptr) make_query();
    load_query();
    if (p.qkv != nullptr) write_query();
  };
  if constexpr (kPipeline == kRegisterPrefetch || kPipeline == kSwapPrefetch) {
    // Two register sets used in turn (the loop unrolled by two), so no set is copied to the other.
    uint4 kw_a[2][kRowLoads];
    uint4 vw_a[4][kValueLoads];
    float2 bias_a[2];
    uint4 kw_b[2][kRowLoads];
    uint4 vw_b[4][kValueLoads];
    float2 bias_b[2];
    start(kw_a, vw_a, bias_a);
    if (!early_tile && first_tile < key_end) load_tile(first_tile, kw_a, vw_a, bias_a);
    for (int tile = first_tile; tile < key_end; tile += 2 * kTileStride) {
      const int second = tile + kTileStride;
      if (second < key_end) load_tile(second, kw_b, vw_b, bias_b);
      process_tile(tile, kw_a, vw_a, bias_a);
      if (second >= key_end) break;
      if (second + kTileStride < key_end) load_tile(second + kTileStride, kw_a, vw_a, bias_a);
      process_tile(second, kw_b, vw_b, bias_b);
    }
  } else {
    uint4 kw[2][kRowLoads];
    uint4 vw[4][kValueLoads];
    float2 tile_bias[2];
    start(kw, vw, tile_bias);
    for (int tile = first_tile; tile < key_end; tile += kTileStride) {
      if (!early_tile || tile != first_tile) load_tile(tile, kw, vw, tile_bias);
      process_tile(tile, kw, vw, tile_bias);
    }
  }

  // The rows' sums over the quad (kSwapOperands: over the 8 lanes of a t).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if constexpr (kSwap) {
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 4);
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 8);
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 16);
    } else {
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
    }
  }

  // Combine the warps in shared memory; warp w writes row w (and w + warps, ...) of the partials.
  if constexpr (kSwap) {
    if (g == 0) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s_m[warp * kMmaRows + 2 * t + e] = m[e];
        s_l[warp * kMmaRows + 2 * t + e] = l[e];
      }
    }
#pragma unroll
    for (int mb = 0; mb < kAccBlocks; ++mb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s_acc[(warp * kMmaRows + 2 * t + c % 2) * kStride + kDimsPerLane * g + 2 * mb + c / 2] =
            o[mb][c];
      }
    }
  } else {
    if (t == 0) {
      s_m[warp * kMmaRows + g] = m[0];
      s_m[warp * kMmaRows + g + 8] = m[1];
      s_l[warp * kMmaRows + g] = l[0];
      s_l[warp * kMmaRows + g + 8] = l[1];
    }
#pragma unroll
    for (int nb = 0; nb < kDimsPerLane; ++nb) {
      // C layout of PV: columns 2t, 2t + 1 of n-block nb are dims kDimsPerLane (2t + x) + nb.
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s_acc[(warp * kMmaRows + g + 8 * (c / 2)) * kStride + kDimsPerLane * (2 * t + c % 2) + nb] =
            o[nb][c];
      }
    }
  }
  __syncthreads();
  WriteSplitPartials(p, token, split, head0, rows, kMmaRows, kStride, s_m, s_l, s_acc);
  if (p.merge_counters == nullptr) return;  // MergeSplitsKernel merges

  // The merge, by the chunk's last split block to finish (the threadfence reduction pattern):
  // every thread's partial stores are made visible device-wide before thread 0 takes a ticket;
  // the block that takes the last one reads every split's partial back through L2 and merges the
  // chunk's rows, a warp per row, then leaves the counter at zero for the next launch.
  // Why: one merge kernel (~3.5 us, plus its gap in the graph) less per layer and pass
  // (docs/gpu.md "The split merge in the split kernel").
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  unsigned* counter = p.merge_counters + token * gridDim.z + blockIdx.z;
  if (threadIdx.x == 0) s_last = atomicAdd(counter, 1u) == static_cast<unsigned>(p.num_splits - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // s_acc is free (WriteSplitPartials read it before the barrier above): each warp's weights.
  constexpr int kWeights = kMmaRows * kStride;  // s_acc's floats per warp
  for (int r = warp; r < rows; r += kAttentionWarps) {
    // A probed row's final max and sum, for the probabilities of its logits.
    float2* stats = nullptr;
    if constexpr (kProbes) {
      if (s_probe_slot[r] >= 0) stats = p.probe_stats + b * p.num_probe + s_probe_slot[r];
    }
    WarpMergeSplits(p.out, p.partial, token * p.num_heads + head0 + r, p.num_splits, kHeadDim,
                    s_acc + warp * kWeights, kWeights, stats);
  }
  if (threadIdx.x == 0) *counter = 0;
}

// DYSCO_CUDA_MMA_PREFETCH (read per launch, for A/B timing): "0" kNoPrefetch, "1"
// kRegisterPrefetch, "swap-prefetch" kSwapPrefetch, else (unset, "swap") kSwapOperands.
int MmaPipeline() {
  if (cuda::EnvIs("DYSCO_CUDA_MMA_PREFETCH", "0")) return kNoPrefetch;
  if (cuda::EnvIs("DYSCO_CUDA_MMA_PREFETCH", "1")) return kRegisterPrefetch;
  if (cuda::EnvIs("DYSCO_CUDA_MMA_PREFETCH", "swap-prefetch")) return kSwapPrefetch;
  return kSwapOperands;
}

// The pipeline of a call without probes: kSwapOperands only for groups of at most kSwapRows query
// rows (one block holds them all, as the default's row chunk does for groups of up to 16).
template <typename T>
int PlainPipeline(const AttentionParams<T>& p) {
  const int pipeline = MmaPipeline();
  const bool swapped = pipeline == kSwapOperands || pipeline == kSwapPrefetch;
  return swapped && p.group > kSwapRows ? kNoPrefetch : pipeline;
}

// The pipeline of a probed call: the swapped operands when the plain calls' are swapped (without
// the prefetch: the probe code's registers stay out of a second tile's), else the default.
template <typename T>
int ProbedPipeline(const AttentionParams<T>& p) {
  const int pipeline = PlainPipeline(p);
  return pipeline == kSwapOperands || pipeline == kSwapPrefetch ? kSwapOperands : kNoPrefetch;
}

template <typename T, int kHeadDim>
auto* PlainKernel(int pipeline) {
  return pipeline == kSwapPrefetch       ? MmaSplitAttentionKernel<T, kHeadDim, kSwapPrefetch>
         : pipeline == kSwapOperands     ? MmaSplitAttentionKernel<T, kHeadDim, kSwapOperands>
         : pipeline == kRegisterPrefetch ? MmaSplitAttentionKernel<T, kHeadDim, kRegisterPrefetch>
                                         : MmaSplitAttentionKernel<T, kHeadDim, kNoPrefetch>;
}

template <typename T, int kHeadDim, int kPipeline>
int Occupancy() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, MmaSplitAttentionKernel<T, kHeadDim, kPipeline>, kAttentionThreads, 0));
    return n;
  }();
  return blocks;
}

template <typename T>
constexpr bool kSixteenBit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

}  // namespace

template <typename T>
int MmaSplitAttentionOccupancy(const AttentionParams<T>& p) {
  if constexpr (!kSixteenBit<T>) {
    return 0;
  } else {
    if (p.max_pages * p.page_size > (int64_t{1} << 31) - 1) return 0;  // int key indices
    // A probed call's grid is sized as the plain calls' (its instance fits as many blocks or more:
    // 232 registers with probes at head_dim 128 against the query rows' 222, 163 against the
    // swapped operands' 158), so that a call's splits, hence its bits, do not depend on whether it
    // is probed.
    const int pipeline = PlainPipeline(p);
    if (p.head_dim != 64 && p.head_dim != 128) return 0;
    if (pipeline == kSwapPrefetch) {
      return p.head_dim == 64 ? Occupancy<T, 64, kSwapPrefetch>()
                              : Occupancy<T, 128, kSwapPrefetch>();
    }
    if (pipeline == kSwapOperands) {
      return p.head_dim == 64 ? Occupancy<T, 64, kSwapOperands>()
                              : Occupancy<T, 128, kSwapOperands>();
    }
    if (pipeline == kRegisterPrefetch) {
      return p.head_dim == 64 ? Occupancy<T, 64, kRegisterPrefetch>()
                              : Occupancy<T, 128, kRegisterPrefetch>();
    }
    return p.head_dim == 64 ? Occupancy<T, 64, kNoPrefetch>() : Occupancy<T, 128, kNoPrefetch>();
  }
}

template <typename T>
void LaunchMmaSplitAttention(const AttentionParams<T>& p, int64_t tokens, int kv_heads,
                             cudaStream_t stream) {
  if constexpr (!kSixteenBit<T>) {
    TORCH_CHECK(false, "tensor-core split attention called for a 32-bit cache");
  } else {
    const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(p.num_splits),
                    static_cast<unsigned>(kv_heads * p.row_chunks));
    TORCH_CHECK(p.head_dim == 64 || p.head_dim == 128,
                "tensor-core split attention called for head_dim ", p.head_dim);
    // With probes, the pipeline without register prefetch (its own instance: kProbes), swapped
    // when the plain calls' are (ProbedPipeline).
    const bool swapped_probes = ProbedPipeline(p) == kSwapOperands;
    auto* kernel =
        p.probe_logits != nullptr
            ? (p.head_dim == 64
                   ? (swapped_probes ? MmaSplitAttentionKernel<T, 64, kSwapOperands, true>
                                     : MmaSplitAttentionKernel<T, 64, kNoPrefetch, true>)
                   : (swapped_probes ? MmaSplitAttentionKernel<T, 128, kSwapOperands, true>
                                     : MmaSplitAttentionKernel<T, 128, kNoPrefetch, true>))
        : p.head_dim == 64 ? PlainKernel<T, 64>(PlainPipeline(p))
                           : PlainKernel<T, 128>(PlainPipeline(p));
    cuda::LaunchOnStream(p.early_keys, kernel, grid, dim3(kAttentionThreads), stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template int MmaSplitAttentionOccupancy<float>(const AttentionParams<float>&);
template int MmaSplitAttentionOccupancy<c10::BFloat16>(const AttentionParams<c10::BFloat16>&);
template int MmaSplitAttentionOccupancy<c10::Half>(const AttentionParams<c10::Half>&);
template void LaunchMmaSplitAttention<float>(const AttentionParams<float>&, int64_t, int,
                                             cudaStream_t);
template void LaunchMmaSplitAttention<c10::BFloat16>(const AttentionParams<c10::BFloat16>&, int64_t,
                                                     int, cudaStream_t);
template void LaunchMmaSplitAttention<c10::Half>(const AttentionParams<c10::Half>&, int64_t, int,
                                                 cudaStream_t);

}  // namespace dysco::kernels
