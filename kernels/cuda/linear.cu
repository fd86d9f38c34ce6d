// dysco::linear on CUDA: out [M, N] = input [M, K] @ weight [N, K]^T.
//
// Decode batches of bf16/fp16 (M <= kGemvMaxRows) run a GEMV kernel of our own: each warp streams
// kGemvRowsPerWarp weight rows with 16-byte loads, several in flight per lane, and reduces its fp32
// sums with shuffles; one kernel per call, no split-K reduction pass. cuBLAS (through at::mm_out)
// ran a decode step's GEMVs at 1.1-2.7x their bytes on the H200: the small k/v projections worst,
// and the split-K kernels of the q/o/down projections plus their reduction kernels, 180 launches a
// step (docs/gpu.md "Linear layers"). Everything else (fp32, more rows, K not a multiple of 8,
// unaligned pointers) goes to cuBLAS, with tensor cores for bf16/fp16.
// DYSCO_CUDA_LINEAR=cublas forces cuBLAS (read per call, for A/B timing in tests and benches).
// The GEMV is launched to start while the kernel ahead of it finishes (programmatic dependent
// launch, cuda_common.cuh): the norm, SwiGLU and split-merge kernels that precede a decode step's
// GEMVs allow that early start. DYSCO_CUDA_PDL=0 turns it off (docs/gpu.md "Linear layers").
//
// dysco::add_rms_norm_linear: the same GEMV with the residual add and the RMSNorm in front of it
// (docs/gpu.md "The norm in the GEMV"): each block forms the normed row in shared memory under its
// first weight loads, then streams its rows as the GEMV does; one kernel and its gap fewer than
// add_rms_norm then linear. DYSCO_CUDA_NORM_LINEAR=separate runs those two instead (A/B timing).
//
// The 8B models' one-row q/k/v GEMV stages its weights through a ring of asynchronous copies in
// shared memory instead of registers (GemvAsyncKernel, AddNormGemvAsyncKernel: docs/gpu.md "The
// q/k/v GEMV through a ring of asynchronous copies"); DYSCO_CUDA_GEMV_ASYNC=0|1 for A/B timing.
//
// dysco::o_proj_mlp: linear, add_rms_norm_swiglu and linear; DYSCO_CUDA_MLP=persistent runs one
// persistent kernel over the four stages for one row (DecodeMlpKernel: slower on the H200, kept as
// the base of the next attempt, docs/gpu.md "What a layer's dependencies cost").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/stream_counters.h"
#include "kernels/op_checks.h"
#include "kernels/op_steps.h"

namespace dysco::kernels {
namespace {

// Input rows (decode batch) the GEMV takes. At 4 rows cuBLAS was faster on the large shapes
// (qkv 1.38x against 1.58x the weight bytes, gate_up 1.08x / 1.20x, down 1.29x / 1.46x), at 1 row
// the GEMV everywhere (docs/gpu.md "Linear layers").
constexpr int kGemvMaxRows = 2;
constexpr int kGemvRowsPerWarp = 2;  // weight rows each warp streams
constexpr int kGemvWarps = 8;        // per block
constexpr int kGemvUnroll = 4;       // 16-byte loads per weight row in flight per lane
// Blocks per SM the GEMV runs at (64 registers a thread): the fused-norm kernel is held to it.
constexpr int kGemvBlocksPerSm = 4;
// Warps that share a pair of weight rows (kSplits): with 2, each sums every other chunk of the rows
// and the two partial sums meet in shared memory. A grid of one warp per row pair fills at most
// half of the H200's warp slots for the 32-100 MB projections (o_proj, down_proj: 256 blocks, 1-2
// an SM), which then read at 47-60% of the DRAM peak (ncu) against 83-86% for gate/up's three
// waves; two warps a pair double the loads in flight (GemvSplits picks it).
constexpr int kGemvMaxSplits = 2;

// 16 bytes of weights, streamed: read once per step, so they should not displace the input rows
// (reused by every warp) from L1.
__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// wr[u][r] <- the 16-byte words base + u * 32 (u < kGemvUnroll) of the R weight rows wv[r], zero
// past k8: one chunk of a lane's loads, all in flight together.
template <int R>
__device__ __forceinline__ void LoadWeightChunk(uint4 (&wr)[kGemvUnroll][R],
                                                const uint4* const (&wv)[R], int64_t base,
                                                int64_t k8) {
#pragma unroll
  for (int u = 0; u < kGemvUnroll; ++u) {
    const int64_t i = base + u * cuda::kWarpSize;
#pragma unroll
    for (int r = 0; r < R; ++r) wr[u][r] = i < k8 ? LoadStreaming(wv[r] + i) : uint4{0, 0, 0, 0};
  }
}

// acc[m][r] += the dot products of word i of the R weight rows (w) with word i of the input rows;
// load_x(m, i, xf) gives word i of input row m as 8 floats.
template <typename T, int M, int R, typename LoadX>
__device__ __forceinline__ void DotWord(float (&acc)[M][R], const uint4 (&w)[R], int64_t i,
                                        LoadX&& load_x) {
  float wf[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) cuda::UnpackEight(w[r], T(), wf[r]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float xf[8];
    load_x(m, i, xf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
    }
  }
}

// acc[m][r] += the dot products of the chunk wr (LoadWeightChunk at base) with the input rows'
// words at the same positions (DotWord, word by word).
template <typename T, int M, int R, typename LoadX>
__device__ __forceinline__ void DotChunk(float (&acc)[M][R], const uint4 (&wr)[kGemvUnroll][R],
                                         int64_t base, int64_t k8, LoadX&& load_x) {
#pragma unroll
  for (int u = 0; u < kGemvUnroll; ++u) {
    const int64_t i = base + u * cuda::kWarpSize;
    if (i >= k8) break;
    DotWord<T, M, R>(acc, wr[u], i, load_x);
  }
}

// The R weight rows a warp streams from n0: a row past N (odd N, last warp) re-reads row n0, and a
// warp wholly past N (the norm kernel keeps it for the block's barrier) reads row 0; their sums are
// never stored.
template <int R>
__device__ __forceinline__ void WeightRows(const uint4* (&wv)[R], const void* w, int64_t n0,
                                           int64_t n, int64_t k8) {
  const int64_t first = n0 < n ? n0 : 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wv[r] = reinterpret_cast<const uint4*>(w) + (n0 + r < n ? n0 + r : first) * k8;
  }
}

// Blocks of a GEMV over N weight rows with `splits` warps a row pair (kGemvWarps / splits pairs a
// block): the launch grid (GemvGrid) and the GEMV blocks a persistent kernel runs (RunGemvStage).
__host__ __device__ constexpr int64_t GemvBlockCount(int64_t n, int splits) {
  const int64_t rows_per_block = int64_t{kGemvWarps / splits} * kGemvRowsPerWarp;
  return (n + rows_per_block - 1) / rows_per_block;
}

// A warp's place in a GEMV block of kGemvWarps warps, kSplits of them per pair of weight rows: the
// pair's first row n0, and which of the pair's warps it is (it takes the chunks split, split +
// kSplits, ... of the rows, a chunk being kGemvUnroll 16-byte words a lane).
template <int kSplits>
struct GemvWarpPlace {
  static constexpr int kPairsPerBlock = kGemvWarps / kSplits;
  static constexpr int64_t kChunkStride = int64_t{kSplits} * cuda::kWarpSize * kGemvUnroll;
  int64_t n0;
  int split;
  __device__ GemvWarpPlace() : GemvWarpPlace(blockIdx.x) {}
  // In block `block` of the GEMV's grid (a persistent kernel runs several: DecodeMlpKernel).
  __device__ explicit GemvWarpPlace(int64_t block) {
    const int warp = threadIdx.x / cuda::kWarpSize;
    split = warp % kSplits;
    n0 = (block * kPairsPerBlock + warp / kSplits) * kGemvRowsPerWarp;
  }
  // The word at which the warp's lane `lane` starts.
  __device__ int64_t FirstWord(int lane) const {
    return lane + int64_t{split} * cuda::kWarpSize * kGemvUnroll;
  }
};

// out[m * n + n0 + r] = to_T(scale[m] * sum), sum being acc[m][r] summed over the warp and then
// over the pair's kSplits warps in split order (shared memory and one barrier when kSplits > 1, so
// every warp of the block calls it, also a warp past N, which stores nothing).
template <typename T, int M, int kSplits>
__device__ __forceinline__ void StoreGemvRows(T* __restrict__ out,
                                              const float (&acc)[M][kGemvRowsPerWarp],
                                              const float (&scale)[M],
                                              const GemvWarpPlace<kSplits>& place, int64_t n) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x % cuda::kWarpSize;
  if constexpr (kSplits == 1) {  // each sum stored as it is formed: fewer live registers
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float sum = cuda::WarpSum(acc[m][r]);
        if (lane == 0 && place.n0 + r < n) {
          out[m * n + place.n0 + r] = cuda::Convert<T>::FromFloat(sum * scale[m]);
        }
      }
    }
  } else {
    float sums[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) sums[m][r] = cuda::WarpSum(acc[m][r]);
    }
    __shared__ float partials[kGemvWarps][M][R];
    const int warp = threadIdx.x / cuda::kWarpSize;
    if (lane == 0 && place.split != 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int r = 0; r < R; ++r) partials[warp][m][r] = sums[m][r];
      }
    }
    __syncthreads();
    if (lane != 0 || place.split != 0) return;
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float sum = sums[m][r];
#pragma unroll
        for (int s = 1; s < kSplits; ++s) sum += partials[warp + s][m][r];
        if (place.n0 + r < n)
          out[m * n + place.n0 + r] = cuda::Convert<T>::FromFloat(sum * scale[m]);
      }
    }
  }
}

// out[m, n0 .. n0 + R) for m < M. Grid: ceil(N / (kPairsPerBlock * R)) blocks of kGemvWarps warps
// (GemvGrid). k8 = K / 8 (16-byte words per row); x, w 16-byte aligned.
// Held to 64 registers a thread (kGemvBlocksPerSm), which GemvSplits' choice counts on.
template <typename T, int M, int kSplits>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize, kGemvBlocksPerSm)
    GemvKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w, int64_t n,
               int64_t k8) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const GemvWarpPlace<kSplits> place;
  // Whole warps past N leave (the shuffles below see full warps); with split warps they stay for
  // the barrier in StoreGemvRows, streaming nothing.
  if (kSplits == 1 && place.n0 >= n) return;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4* wv[R];
  WeightRows<R>(wv, w, place.n0, n, k8);
  // Launched to start early (cuda_common.cuh): wait for the kernel that writes x before reading
  // it or writing out; under a plain launch the wait returns at once. The kernel after may start
  // (DYSCO_CUDA_PDL=all). (Issuing the first chunk's loads before the wait, as AddNormGemvKernel
  // does, was A/B'd on the H200 on 2026-12-01: no change in a step or in the graph test.)
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();
  float acc[M][R] = {};
  const int64_t end = place.n0 < n ? k8 : 0;
  for (int64_t base = place.FirstWord(lane); base < end; base += place.kChunkStride) {
    uint4 wr[kGemvUnroll][R];
    LoadWeightChunk<R>(wr, wv, base, k8);
    DotChunk<T, M, R>(acc, wr, base, k8, [&](int m, int64_t i, float(&xf)[8]) {
      cuda::UnpackEight(__ldg(xv + m * k8 + i), T(), xf);
    });
  }
  float ones[M];
#pragma unroll
  for (int m = 0; m < M; ++m) ones[m] = 1.0f;
  StoreGemvRows<T, M, kSplits>(out, acc, ones, place, n);
}

// GemvKernel for one input row and one warp a row pair, its weight words staged through shared
// memory by asynchronous copies (cp.async, 16 bytes a lane, L2 only) instead of registers: a ring
// of kGemvAsyncStages words a row a lane, refilled as each is summed, so that what a warp has in
// flight is bounded by shared memory (6 KB a warp) rather than by the 64-register cap (4 KB a warp
// in GemvKernel: ~12.3 MB chip-wide for the q/k/v GEMV however its rows are grouped, docs/gpu.md
// "The q/k/v GEMV through a ring of asynchronous copies"). A lane sums the same words in the same
// order as GemvKernel<T, 1, 1>, so the outputs are the same bits. The ring's first copies are
// issued before the wait for the kernel ahead (the weights do not depend on it). Taken where
// GemvAsync says.
constexpr int kGemvAsyncStages = 6;  // 6 KB a warp, 48 KB a block of 8 warps: static shared memory

__device__ __forceinline__ void CopyAsync16(void* shared, const void* global, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  // src-size 0 fills the 16 bytes with zeros and reads nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CommitAsyncCopies() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's most recent copy groups are still in flight.
template <int N>
__device__ __forceinline__ void WaitAsyncCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A warp's ring of asynchronous weight copies (GemvAsyncKernel): [stage][row][lane] 16-byte words.
using GemvRing = uint4[kGemvAsyncStages][kGemvRowsPerWarp][cuda::kWarpSize];
constexpr int64_t kGemvRingBytes = int64_t{kGemvWarps} * static_cast<int64_t>(sizeof(GemvRing));

// Word q (0, 1, ...) of the words a lane sums, in its order, for warp `split` of kSplits warps a
// row pair: the lane's words of the chunks split, split + kSplits, ... (a chunk being kGemvUnroll
// words a lane, as GemvWarpPlace and DotChunk take them); lane + 32 q for one warp a pair.
template <int kSplits>
__device__ __forceinline__ int64_t RingWord(int64_t q, int split, int lane) {
  return ((q / kGemvUnroll) * kSplits + split) * (int64_t{kGemvUnroll} * cuda::kWarpSize) +
         (q % kGemvUnroll) * cuda::kWarpSize + lane;
}

// Issues the ring's first copies: word RingWord(s) of each row into stage s, a group per stage.
template <int R, int kSplits = 1>
__device__ __forceinline__ void StartGemvRing(GemvRing& ring, const uint4* const (&wv)[R], int lane,
                                              int64_t k8, int split = 0) {
#pragma unroll
  for (int s = 0; s < kGemvAsyncStages; ++s) {
    const int64_t i = RingWord<kSplits>(s, split, lane);
#pragma unroll
    for (int r = 0; r < R; ++r) CopyAsync16(&ring[s][r][lane], wv[r] + (i < k8 ? i : 0), i < k8);
    CommitAsyncCopies();
  }
}

// acc += the lane's words RingWord(0), RingWord(1), ... of the R rows against load_x, in that
// order (as GemvKernel with kSplits warps a pair sums them), each taken from the ring as its group
// lands and its stage refilled with the word kGemvAsyncStages on. Returns with no copy in flight.
template <typename T, int M, int R, int kSplits = 1, typename LoadX>
__device__ __forceinline__ void StreamGemvRing(float (&acc)[M][R], GemvRing& ring,
                                               const uint4* const (&wv)[R], int lane, int64_t k8,
                                               LoadX&& load_x, int split = 0) {
  int stage = 0;
  for (int64_t q = 0;; ++q) {
    const int64_t i = RingWord<kSplits>(q, split, lane);
    if (i >= k8) break;
    WaitAsyncCopies<kGemvAsyncStages - 1>();  // this word's group (groups complete in order)
    uint4 words[R];
#pragma unroll
    for (int r = 0; r < R; ++r) words[r] = ring[stage][r][lane];
    DotWord<T, M, R>(acc, words, i, load_x);
    // The stage's next word, issued after the sums above have read this one.
    const int64_t next = RingWord<kSplits>(q + kGemvAsyncStages, split, lane);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      CopyAsync16(&ring[stage][r][lane], wv[r] + (next < k8 ? next : 0), next < k8);
    }
    CommitAsyncCopies();
    stage = stage + 1 == kGemvAsyncStages ? 0 : stage + 1;
  }
  WaitAsyncCopies<0>();  // no copy outlives the block's shared memory
}

// Dynamic shared memory: the warps' rings (kGemvRingBytes), set up by LaunchGemv. With kSplits
// warps a row pair (GemvRingSplits, opt-in: o_proj and down_proj of the 8B models, 512 blocks, one
// wave of four an SM) the pair's partial sums meet as in GemvKernel: the same bits as GemvKernel<T,
// 1, kSplits>.
template <typename T, int kSplits>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize, kGemvBlocksPerSm)
    GemvAsyncKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                    int64_t n, int64_t k8) {
  constexpr int R = kGemvRowsPerWarp;
  extern __shared__ uint4 dynamic_rings[];
  GemvRing* rings = reinterpret_cast<GemvRing*>(dynamic_rings);
  const int lane = threadIdx.x % cuda::kWarpSize;
  GemvRing& ring = rings[threadIdx.x / cuda::kWarpSize];
  const GemvWarpPlace<kSplits> place;
  // Whole warps past N leave (the shuffles below see full warps); with split warps they stay for
  // StoreGemvRows' barrier, streaming nothing.
  if (kSplits == 1 && place.n0 >= n) return;
  const bool streams = place.n0 < n;
  const uint4* wv[R];
  WeightRows<R>(wv, w, place.n0, n, k8);
  // The weights do not depend on the kernel ahead.
  if (streams) StartGemvRing<R, kSplits>(ring, wv, lane, k8, place.split);
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  float acc[1][R] = {};
  if (streams) {
    StreamGemvRing<T, 1, R, kSplits>(
        acc, ring, wv, lane, k8,
        [&](int, int64_t i, float(&xf)[8]) { cuda::UnpackEight(__ldg(xv + i), T(), xf); },
        place.split);
  }
  const float ones[1] = {1.0f};
  StoreGemvRows<T, 1, kSplits>(out, acc, ones, place, n);
}

// The residual add and RMSNorm in front of a GEMV (add_rms_norm_linear).
template <typename T>
struct AddNormArgs {
  T* sum;             // [M, K] <- x + residual, rounded to T
  const T* residual;  // [M, K], 16-byte aligned
  const T* weight;    // [K], 16-byte aligned
  float eps;
};

// The prologue of add_rms_norm_linear's GEMV blocks, run by every thread of a block after the wait
// for the kernel ahead: normed <- y = s * norm.weight in fp32, s = to_dtype(x + residual) (as
// add_rms_norm; block 0 stores s to norm.sum), as two planes of float4 per row ([M][2][k8]: the
// first and second four elements of each 16-byte word, so that a warp's reads of consecutive words
// hit distinct banks); scale[m] <- rsqrt(mean(s^2) + eps). Ends with a barrier.
// kCoherentX: x was written by other blocks of the same kernel (DecodeMlpKernel), so it is read
// through the coherent path (ld.global.ca after the grid barrier's acquire), not the read-only one.
template <typename T, int M, bool kCoherentX = false>
__device__ __forceinline__ void FormNormedRows(float4* normed, float (&warp_squares)[kGemvWarps][M],
                                               const T* __restrict__ x, const AddNormArgs<T>& norm,
                                               int64_t k8, float (&scale)[M]) {
  using C = cuda::Convert<T>;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int warp = threadIdx.x / cuda::kWarpSize;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4* rv = reinterpret_cast<const uint4*>(norm.residual);
  const uint4* gv = reinterpret_cast<const uint4*>(norm.weight);
  uint4* sv = reinterpret_cast<uint4*>(norm.sum);
  float squares[M] = {};
  for (int64_t i = threadIdx.x; i < k8; i += blockDim.x) {
    float g[8];
    cuda::UnpackEight(__ldg(gv + i), T(), g);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float a[8], b[8], y[8];
      cuda::UnpackEight(kCoherentX ? __ldca(xv + m * k8 + i) : __ldg(xv + m * k8 + i), T(), a);
      cuda::UnpackEight(__ldg(rv + m * k8 + i), T(), b);
      T s[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j] = C::FromFloat(__fadd_rn(a[j], b[j]));  // ATen's add, as add_rms_norm
        const float v = C::ToFloat(s[j]);
        squares[m] = fmaf(v, v, squares[m]);
        y[j] = v * g[j];
      }
      normed[(2 * m) * k8 + i] = make_float4(y[0], y[1], y[2], y[3]);
      normed[(2 * m + 1) * k8 + i] = make_float4(y[4], y[5], y[6], y[7]);
      if (blockIdx.x == 0) {
        uint4 raw;
        memcpy(&raw, s, sizeof(raw));
        sv[m * k8 + i] = raw;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float total = cuda::WarpSum(squares[m]);
    if (lane == 0) warp_squares[warp][m] = total;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < kGemvWarps; ++v) total += warp_squares[v][m];
    scale[m] = rsqrtf(total / static_cast<float>(k8 * 8) + norm.eps);
  }
}

// Word i of normed row m (FormNormedRows' layout) as 8 floats: the GEMV's load_x.
template <int M>
struct NormedRowWords {
  const float4* normed;
  int64_t k8;
  __device__ __forceinline__ void operator()(int m, int64_t i, float (&xf)[8]) const {
    const float4 lo = normed[(2 * m) * k8 + i];
    const float4 hi = normed[(2 * m + 1) * k8 + i];
    xf[0] = lo.x, xf[1] = lo.y, xf[2] = lo.z, xf[3] = lo.w;
    xf[4] = hi.x, xf[5] = hi.y, xf[6] = hi.z, xf[7] = hi.w;
  }
};

// Dynamic shared memory of AddNormGemvKernel (the M normed input rows in fp32) at most: a block
// gets 48 KB without opting in to more, its static warp_squares and StoreGemvRows' partials
// included.
constexpr int64_t kNormRowBytesMax = 48 * 1024 - int64_t{kGemvWarps} * kGemvMaxRows *
                                                     (1 + kGemvRowsPerWarp) *
                                                     static_cast<int64_t>(sizeof(float));

// GemvKernel with the input row rms_norm(x + residual) (norm.weight, norm.eps), formed by each
// block in a prologue: its threads read x, residual and the norm weight, form s = to_dtype(x +
// residual) as add_rms_norm does (block 0 stores it to norm.sum), sum s^2 over the block and keep
// y = s * weight in fp32 in shared memory; the warps then stream their weight rows against y as
// GemvKernel does against x and scale each dot product by rsqrt(mean(s^2) + eps). The normed row
// is never rounded to the dtype (add_rms_norm rounds it twice), so out equals add_rms_norm then
// linear within the dtype's rounding, not bit for bit. Each warp's first chunk of weight loads is
// issued before the block waits for the kernel ahead, so the prologue runs under those loads.
// y is stored as two planes of float4 (the first and second four elements of each 16-byte input
// word), so that a warp's 16-byte reads of consecutive words hit distinct banks.
// A block per group of kPairsPerBlock * R weight rows, as GemvKernel (kSplits warps a row pair):
// blocks that each took several groups (one prologue per SM slot instead of one per group) were
// slower on the H200 (docs/gpu.md "The norm in the GEMV").
// A SwiGLU epilogue (a warp taking gate row a and up row H + a and writing silu(gate) * up: one
// kernel fewer) was slower on the H200 and was removed (docs/gpu.md "The norm in the GEMV").
// Dynamic shared memory: M * K * 4 bytes (<= kNormRowBytesMax).
template <typename T, int M, int kSplits>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize, kGemvBlocksPerSm)
    AddNormGemvKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                      int64_t n, int64_t k8, AddNormArgs<T> norm) {
  constexpr int R = kGemvRowsPerWarp;
  extern __shared__ float4 normed[];  // [M][2][k8]
  __shared__ float warp_squares[kGemvWarps][M];
  const int lane = threadIdx.x % cuda::kWarpSize;
  const GemvWarpPlace<kSplits> place;
  const uint4* wv[R];
  WeightRows<R>(wv, w, place.n0, n, k8);
  uint4 wr[kGemvUnroll][R];
  // The weights do not depend on the kernels ahead.
  LoadWeightChunk<R>(wr, wv, place.FirstWord(lane), k8);
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();

  float scale[M];
  FormNormedRows<T, M>(normed, warp_squares, x, norm, k8, scale);
  const auto load_normed = NormedRowWords<M>{normed, k8};
  // After the barrier, whole warps past N leave (the shuffles below see full warps); with split
  // warps they stay for StoreGemvRows' barrier, streaming nothing.
  if (kSplits == 1 && place.n0 >= n) return;
  float acc[M][R] = {};
  const int64_t first = place.FirstWord(lane);
  // (One warp a pair: only warps within N are here; DotChunk stops at k8.)
  const int64_t end = kSplits == 1 || place.n0 < n ? k8 : 0;
  if (kSplits == 1 || first < end) {
    DotChunk<T, M, R>(acc, wr, first, k8, load_normed);  // the chunk loaded before the wait
  }
  for (int64_t base = first + place.kChunkStride; base < end; base += place.kChunkStride) {
    LoadWeightChunk<R>(wr, wv, base, k8);
    DotChunk<T, M, R>(acc, wr, base, k8, load_normed);
  }
  StoreGemvRows<T, M, kSplits>(out, acc, scale, place, n);
}

// AddNormGemvKernel for one input row and one warp a row pair with GemvAsyncKernel's ring: the
// ring's first copies are issued before the wait for the kernel ahead, the block forms the normed
// row under them (FormNormedRows), then each warp streams its ring against it. The same sums in the
// same order as AddNormGemvKernel<T, 1, 1>: the same bits. Dynamic shared memory: the rings
// (kGemvRingBytes), then the normed row (K * 4 bytes), set up by LaunchAddNormGemv.
template <typename T>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize, kGemvBlocksPerSm)
    AddNormGemvAsyncKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                           int64_t n, int64_t k8, AddNormArgs<T> norm) {
  constexpr int R = kGemvRowsPerWarp;
  extern __shared__ uint4 dynamic[];
  GemvRing* rings = reinterpret_cast<GemvRing*>(dynamic);
  float4* normed = reinterpret_cast<float4*>(dynamic + kGemvRingBytes / sizeof(uint4));
  __shared__ float warp_squares[kGemvWarps][1];
  const int lane = threadIdx.x % cuda::kWarpSize;
  GemvRing& ring = rings[threadIdx.x / cuda::kWarpSize];
  const GemvWarpPlace<1> place;
  const uint4* wv[R];
  WeightRows<R>(wv, w, place.n0, n, k8);
  if (place.n0 < n) StartGemvRing<R>(ring, wv, lane, k8);  // independent of the kernel ahead
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();
  float scale[1];
  FormNormedRows<T, 1>(normed, warp_squares, x, norm, k8, scale);
  // After the barrier, whole warps past N leave (they started no copies).
  if (place.n0 >= n) return;
  float acc[1][R] = {};
  StreamGemvRing<T, 1, R>(acc, ring, wv, lane, k8, NormedRowWords<1>{normed, k8});
  StoreGemvRows<T, 1, 1>(out, acc, scale, place, n);
}

// ---- o_proj_mlp for one row as a persistent kernel over the four stages (o_proj, the residual add
// and norm with gate/up, SwiGLU, down_proj), the blocks meeting at grid barriers in between. Not
// the default (DYSCO_CUDA_MLP=persistent): on the H200 it was slower than the four kernels it
// replaces (docs/gpu.md "What a layer's dependencies cost, and the MLP as one kernel").
//
// Why it was tried: the dependencies of a decode layer cost ~3.7 us each on the H200 even with the
// GEMVs starting early (CudaTiming.DecodeLayersWithGemvsStartingEarly: a layer's four GEMVs
// chained take 0.0998-0.1011 ms, one GEMV over the same bytes 0.0887-0.0895 ms); a barrier inside
// one grid, each block issuing its next stage's first weight loads before it waits, might cost less
// than the end of a grid and the ramp of the next. It costs more: 0.1286 against 0.1219 ms a layer
// (three barriers, ~2.2 us more each). Kept, tested, as the base of the next attempt (each block's
// share of the next stage staged through a shared-memory ring before the barrier). Each GEMV stage
// runs the blocks of the GEMV kernel it replaces (GemvGrid of its N and warps a row pair), block b
// on persistent block b % gridDim.x, with the same sums in the same order, and SwiGLU is
// cuda::SiluTimes as silu_mul: the outputs are the bits of linear, add_rms_norm_swiglu and linear
// run one after another.
template <typename T>
struct DecodeMlpArgs {
  const T* attn;           // [k_o8 * 8]: o_proj's input
  const T* w_o;            // [h, k_o8 * 8]
  T* o;                    // [h] scratch: o_proj's output, the norm's input
  AddNormArgs<T> norm;     // sum [h] <- o + residual (an output of the op), its weight and eps
  const T* w_gate_up;      // [2 inter, h]
  T* gate_up;              // [2 inter] scratch
  T* act;                  // [inter] scratch: silu(gate) * up
  const T* w_down;         // [h, inter]
  T* out;                  // [h]
  int64_t h, inter, k_o8;  // inter % 8 == 0, h % 8 == 0
  unsigned* counters;      // [2]: barrier arrivals, exits; zero at launch, left at zero
};

// Every block arrives at barrier `target / gridDim.x` (targets 1, 2, 3 times the grid) once its
// stores are done and returns when all have: thread 0 publishes the block's stores (fence) and
// counts it in, polls with relaxed loads (an acquire load per poll would also invalidate the SM's
// L1 under the blocks still streaming there), then fences once, so that the block's later weak
// loads see every block's stores.
// (Polling with acquire loads, no sleep, measured the same: 0.1292 against 0.1286 ms a layer.)
__device__ __forceinline__ void GridBarrier(unsigned* arrivals, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrivals, 1u);
    unsigned seen = 0;
    while (true) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrivals) : "memory");
      if (seen >= target) break;
      __nanosleep(64);
    }
    __threadfence();
  }
  __syncthreads();
}

// Issues the first chunk of this block's first GEMV block's loads into wr (none when the stage has
// fewer blocks than the grid): what RunGemvStage(..., preloaded = true) starts from.
template <int kSplits>
__device__ __forceinline__ void PreloadGemvStage(uint4 (&wr)[kGemvUnroll][kGemvRowsPerWarp],
                                                 const void* w, int64_t n, int64_t k8) {
  if (blockIdx.x >= GemvBlockCount(n, kSplits)) return;
  const GemvWarpPlace<kSplits> place(blockIdx.x);
  const uint4* wv[kGemvRowsPerWarp];
  WeightRows<kGemvRowsPerWarp>(wv, w, place.n0, n, k8);
  LoadWeightChunk<kGemvRowsPerWarp>(wr, wv, place.FirstWord(threadIdx.x % cuda::kWarpSize), k8);
}

// out [n] <- to_T(scale * x @ w^T) for one row, as GemvKernel<T, 1, kSplits> (or the fused-norm
// kernel) sums it, over the GEMV blocks blockIdx.x, + gridDim.x, ...; load_x gives x's words.
// Reached by every thread of the block (StoreGemvRows' barrier when kSplits > 1).
template <typename T, int kSplits, typename LoadX>
__device__ __forceinline__ void RunGemvStage(T* out, const void* w, int64_t n, int64_t k8,
                                             float scale, bool preloaded,
                                             uint4 (&wr)[kGemvUnroll][kGemvRowsPerWarp],
                                             LoadX&& load_x) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const float scales[1] = {scale};
  const int64_t blocks = GemvBlockCount(n, kSplits);
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const GemvWarpPlace<kSplits> place(block);
    const uint4* wv[R];
    WeightRows<R>(wv, w, place.n0, n, k8);
    float acc[1][R] = {};
    const int64_t first = place.FirstWord(lane);
    const int64_t end = place.n0 < n ? k8 : 0;
    for (int64_t base = first; base < end; base += place.kChunkStride) {
      if (!preloaded || base != first) LoadWeightChunk<R>(wr, wv, base, k8);
      DotChunk<T, 1, R>(acc, wr, base, k8, load_x);
    }
    preloaded = false;
    StoreGemvRows<T, 1, kSplits>(out, acc, scales, place, n);
    // The pair partials of StoreGemvRows are rewritten by the next block.
    if constexpr (kSplits > 1) __syncthreads();
  }
}

// Grid: at most as many blocks of kGemvWarps warps as fit the GPU at once (DecodeMlpGrid: the
// barriers need every block resident); dynamic shared memory h * 4 bytes (the normed row).
template <typename T, int kSplitsO, int kSplitsGateUp, int kSplitsDown>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize, kGemvBlocksPerSm)
    DecodeMlpKernel(DecodeMlpArgs<T> a) {
  extern __shared__ float4 normed[];  // [2][h / 8]
  __shared__ float warp_squares[kGemvWarps][1];
  const int64_t h8 = a.h / 8, inter8 = a.inter / 8;
  uint4 wr[kGemvUnroll][kGemvRowsPerWarp];
  // o_proj: its first loads before the wait for the attention ahead (launched to start early).
  PreloadGemvStage<kSplitsO>(wr, a.w_o, a.h, a.k_o8);
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();
  const uint4* attn = reinterpret_cast<const uint4*>(a.attn);
  RunGemvStage<T, kSplitsO>(
      a.o, a.w_o, a.h, a.k_o8, 1.0f, true, wr,
      [&](int, int64_t i, float(&xf)[8]) { cuda::UnpackEight(__ldg(attn + i), T(), xf); });
  // gate/up over rms_norm(o + residual), formed by every block once o is whole.
  PreloadGemvStage<kSplitsGateUp>(wr, a.w_gate_up, 2 * a.inter, h8);
  GridBarrier(a.counters, gridDim.x);
  float scale[1];
  FormNormedRows<T, 1, /*kCoherentX=*/true>(normed, warp_squares, a.o, a.norm, h8, scale);
  RunGemvStage<T, kSplitsGateUp>(a.gate_up, a.w_gate_up, 2 * a.inter, h8, scale[0], true, wr,
                                 NormedRowWords<1>{normed, h8});
  // SwiGLU, 8 elements a thread, once gate/up is whole; down_proj's first loads are in flight.
  PreloadGemvStage<kSplitsDown>(wr, a.w_down, a.h, inter8);
  GridBarrier(a.counters, 2 * gridDim.x);
  const uint4* gate_up = reinterpret_cast<const uint4*>(a.gate_up);
  uint4* act = reinterpret_cast<uint4*>(a.act);
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < inter8;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 g = __ldca(gate_up + u), up = __ldca(gate_up + inter8 + u);
    T gs[8], us[8], ys[8];
    memcpy(gs, &g, sizeof(g));
    memcpy(us, &up, sizeof(up));
#pragma unroll
    for (int j = 0; j < 8; ++j) ys[j] = cuda::SiluTimes(gs[j], us[j]);
    uint4 y;
    memcpy(&y, ys, sizeof(y));
    act[u] = y;
  }
  GridBarrier(a.counters, 3 * gridDim.x);
  const uint4* actv = reinterpret_cast<const uint4*>(a.act);
  RunGemvStage<T, kSplitsDown>(
      a.out, a.w_down, a.h, inter8, 1.0f, true, wr,
      [&](int, int64_t i, float(&xf)[8]) { cuda::UnpackEight(__ldca(actv + i), T(), xf); });
  // The last block out zeroes the counters for the next grid of the stream: every block has
  // passed every barrier by then.
  __syncthreads();
  if (threadIdx.x == 0) {
    if (atomicAdd(&a.counters[1], 1u) + 1 == gridDim.x) {
      a.counters[0] = 0;
      a.counters[1] = 0;
    }
  }
}

bool ForcedCublas() { return cuda::EnvIs("DYSCO_CUDA_LINEAR", "cublas"); }

// Warps per row pair for a GEMV over N weight rows (GemvWarpPlace): two where the grid of one warp
// a pair would fill at most half of the SMs' block slots, so that two still fit in one wave (the
// 32-100 MB projections of an 8B model: o_proj, down_proj), else one. DYSCO_CUDA_GEMV_SPLITS = "1"
// or "2" forces it (A/B timing).
int GemvSplits(int64_t n) {
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_SPLITS", "1")) return 1;
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_SPLITS", "2")) return 2;
  const int64_t slots = int64_t{kGemvBlocksPerSm} * cuda::MultiprocessorCount();
  return kGemvMaxSplits * GemvBlockCount(n, 1) <= slots ? kGemvMaxSplits : 1;
}

// Blocks of AddNormGemvAsyncKernel an SM holds: 64 KB of shared memory each at K = 4096 (the rings'
// 48 KB and the normed row).
constexpr int kGemvAsyncBlocksPerSm = 3;

// Whether a one-row GEMV over N weight rows, `splits` warps a row pair by GemvSplits, takes the
// asynchronous-copy kernels (GemvAsyncKernel, AddNormGemvAsyncKernel) instead of the register ones:
// where one warp a pair fills at most one wave of the async kernel's blocks (the 8B models' q/k/v,
// 384 blocks: 1.15-1.18x its bytes standalone against 1.45x on the H200, ~0.1 ms off an 8K step,
// docs/gpu.md "The q/k/v GEMV through a ring of asynchronous copies"); the larger GEMVs run several
// waves, where the register kernels already read at 1.0-1.05x. DYSCO_CUDA_GEMV_ASYNC = "0" or "1"
// forces either for every one-row GEMV (A/B timing; the same bits as one warp a row pair).
bool GemvAsync(int64_t n, int splits) {
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_ASYNC", "0")) return false;
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_ASYNC", "1")) return true;
  return splits == 1 &&
         GemvBlockCount(n, 1) <= int64_t{kGemvAsyncBlocksPerSm} * cuda::MultiprocessorCount();
}

// Whether a one-row GEMV that GemvSplits gives two warps a row pair reads through the rings too
// (GemvAsyncKernel<T, 2>): opt-in, DYSCO_CUDA_GEMV_RING_SPLITS=1, where its grid is one wave of
// four such blocks an SM (the 8B models' o_proj and down_proj, 512 blocks). Their ring copies are
// issued before the wait for the kernel ahead, so they overlap the tail of the attention kernel
// (o_proj) and silu_mul (down_proj). Measured on the H200 (docs/gpu.md "The decode attention starts
// early, and rings for o_proj and down_proj"): 0.2-0.3 ms slower an 8K step than the register
// kernel, so not the default. The same bits as the register kernel; DYSCO_CUDA_GEMV_ASYNC = "0" /
// "1" as for GemvAsync.
bool GemvRingSplits(int64_t n, int splits) {
  if (splits != 2 || cuda::EnvIs("DYSCO_CUDA_GEMV_ASYNC", "0")) return false;
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_ASYNC", "1")) return true;
  return cuda::EnvIs("DYSCO_CUDA_GEMV_RING_SPLITS", "1") &&
         GemvBlockCount(n, 2) <= int64_t{kGemvBlocksPerSm} * cuda::MultiprocessorCount();
}

// Lets `kernel` take more than 48 KB of dynamic shared memory (up to its ring and the widest normed
// row) and asks for the largest shared-memory carveout, so that three such blocks fit an SM (the
// ring kernels; DecodeMlpGrid for the carveout its occupancy query counts on). Once per kernel and
// device (the attributes are the current device's), before the kernel's first launch there (not a
// stream operation: allowed under graph capture too).
template <typename Kernel>
void AllowLargeSharedMemory(Kernel* kernel) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> configured;
  const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mu);
  if (configured.count(key) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(kGemvRingBytes + kNormRowBytesMax)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
  configured.insert(key);
}

// The launch grid of a GEMV over N weight rows with `splits` warps a row pair.
dim3 GemvGrid(int64_t n, int splits) {
  return dim3(static_cast<unsigned>(GemvBlockCount(n, splits)));
}

template <typename T>
void LaunchGemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  static_assert(kGemvMaxRows == 2 && kGemvMaxSplits == 2, "one instantiation per row count");
  const int64_t n = weight.size(0);
  const bool early = cuda::EarlyStartLevel() != cuda::EarlyStart::kNone;
  const int splits = GemvSplits(n);
  if (input.size(0) == 1 && (GemvRingSplits(n, splits) || GemvAsync(n, splits))) {
    // Two warps a pair where GemvRingSplits says so, else one (GemvAsync, the q/k/v rule).
    auto* ring_kernel = GemvRingSplits(n, splits) ? GemvAsyncKernel<T, 2> : GemvAsyncKernel<T, 1>;
    AllowLargeSharedMemory(ring_kernel);
    cuda::LaunchOnStreamWithSharedMemory(
        early, ring_kernel, GemvGrid(n, GemvRingSplits(n, splits) ? 2 : 1),
        dim3(kGemvWarps * cuda::kWarpSize), static_cast<size_t>(kGemvRingBytes),
        cuda::CurrentStream(), out.data_ptr<T>(), input.data_ptr<T>(), weight.data_ptr<T>(), n,
        input.size(1) / 8);
    return;
  }
  const bool one_row = input.size(0) == 1;
  auto* kernel = splits == 1 ? (one_row ? GemvKernel<T, 1, 1> : GemvKernel<T, 2, 1>)
                             : (one_row ? GemvKernel<T, 1, 2> : GemvKernel<T, 2, 2>);
  cuda::LaunchOnStream(early, kernel, GemvGrid(n, splits), dim3(kGemvWarps * cuda::kWarpSize),
                       cuda::CurrentStream(), out.data_ptr<T>(), input.data_ptr<T>(),
                       weight.data_ptr<T>(), n, input.size(1) / 8);
}

template <typename T>
void LaunchAddNormGemv(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                       const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                       const at::Tensor& weight) {
  const int64_t n = weight.size(0);
  const int64_t rows = input.size(0);
  const bool early = cuda::EarlyStartLevel() != cuda::EarlyStart::kNone;
  const int splits = GemvSplits(n);
  const AddNormArgs<T> norm{sum.data_ptr<T>(), residual.data_ptr<T>(), norm_weight.data_ptr<T>(),
                            static_cast<float>(eps)};
  if (rows == 1 && splits == 1 && GemvAsync(n, splits)) {
    AllowLargeSharedMemory(AddNormGemvAsyncKernel<T>);
    cuda::LaunchOnStreamWithSharedMemory(
        early, AddNormGemvAsyncKernel<T>, GemvGrid(n, 1), dim3(kGemvWarps * cuda::kWarpSize),
        static_cast<size_t>(kGemvRingBytes + input.size(1) * int64_t{sizeof(float)}),
        cuda::CurrentStream(), out.data_ptr<T>(), input.data_ptr<T>(), weight.data_ptr<T>(), n,
        input.size(1) / 8, norm);
    return;
  }
  auto* kernel = splits == 1
                     ? (rows == 1 ? AddNormGemvKernel<T, 1, 1> : AddNormGemvKernel<T, 2, 1>)
                     : (rows == 1 ? AddNormGemvKernel<T, 1, 2> : AddNormGemvKernel<T, 2, 2>);
  cuda::LaunchOnStreamWithSharedMemory(
      early, kernel, GemvGrid(n, splits), dim3(kGemvWarps * cuda::kWarpSize),
      static_cast<size_t>(rows * input.size(1)) * sizeof(float), cuda::CurrentStream(),
      out.data_ptr<T>(), input.data_ptr<T>(), weight.data_ptr<T>(), n, input.size(1) / 8, norm);
}

// LaunchGemv for the input's dtype (bf16 or fp16: TakesGemv admits only those).
void Gemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  if (input.scalar_type() == at::kBFloat16) {
    LaunchGemv<c10::BFloat16>(out, input, weight);
  } else {
    LaunchGemv<c10::Half>(out, input, weight);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// LaunchAddNormGemv for the input's dtype (bf16 or fp16: TakesGemv admits only those).
void AddNormGemv(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                 const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                 const at::Tensor& weight) {
  if (input.scalar_type() == at::kBFloat16) {
    LaunchAddNormGemv<c10::BFloat16>(out, sum, input, residual, norm_weight, eps, weight);
  } else {
    LaunchAddNormGemv<c10::Half>(out, sum, input, residual, norm_weight, eps, weight);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether input [M, K] @ weight^T takes the GEMV: a decode batch of 16-bit rows, whole 16-byte
// words, aligned (the fused path also needs its other row pointers aligned).
bool TakesGemv(const at::Tensor& input, const at::Tensor& weight) {
  const bool half_type = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
  const int64_t k = input.size(1);
  return half_type && input.size(0) <= kGemvMaxRows && k > 0 && k % 8 == 0 &&
         cuda::Aligned16(input.data_ptr()) && cuda::Aligned16(weight.data_ptr()) && !ForcedCublas();
}

}  // namespace

void linear_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  CheckLinearArgs(out, input, weight);
  TORCH_CHECK(out.is_cuda(), kLinearOp, ": tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  if (TakesGemv(input, weight)) return Gemv(out, input, weight);
  // mm_out writes every element of out ([M, N]); weight.t() is a view, no copy.
  at::Tensor out_view = out;  // at::mm_out takes a non-const reference to the same tensor
  at::mm_out(out_view, input, weight.t());
}

namespace {

// Whether add_rms_norm_linear / add_rms_norm_swiglu take AddNormGemvKernel: a GEMV-sized batch
// (TakesGemv), a row that fits its shared memory, aligned rows, and not DYSCO_CUDA_NORM_LINEAR=
// separate.
bool TakesAddNormGemv(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                      const at::Tensor& residual, const at::Tensor& norm_weight,
                      const at::Tensor& weight) {
  const int64_t normed_bytes = input.numel() * static_cast<int64_t>(sizeof(float));
  return TakesGemv(input, weight) && out.numel() > 0 && normed_bytes <= kNormRowBytesMax &&
         cuda::Aligned16(sum.data_ptr()) && cuda::Aligned16(residual.data_ptr()) &&
         cuda::Aligned16(norm_weight.data_ptr()) &&
         !cuda::EnvIs("DYSCO_CUDA_NORM_LINEAR", "separate");
}

}  // namespace

void add_rms_norm_linear_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                              const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& weight) {
  CheckAddRmsNormLinearArgs(out, sum, input, residual, norm_weight, eps, weight);
  TORCH_CHECK(out.is_cuda(), kAddRmsNormLinearOp, ": the CUDA implementation got tensors on ",
              out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  if (TakesAddNormGemv(out, sum, input, residual, norm_weight, weight)) {
    return AddNormGemv(out, sum, input, residual, norm_weight, eps, weight);
  }
  // Prefill chunks, fp32, more rows, rows wider than the kernel's shared memory, an empty weight
  // (N = 0: sum is still written): the two ops, their kernels and cuBLAS's product.
  const at::Tensor normed = at::empty_like(sum);
  add_rms_norm_cuda(normed, sum, input, residual, norm_weight, eps);
  linear_cuda(out, normed, weight);
}

void add_rms_norm_swiglu_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                              const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& weight) {
  CheckAddRmsNormSwigluArgs(out, sum, input, residual, norm_weight, eps, weight);
  TORCH_CHECK(out.is_cuda(), kAddRmsNormSwigluOp, ": the CUDA implementation got tensors on ",
              out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  // add_rms_norm_linear (its fused GEMV for a decode batch) then silu_mul. SwiGLU in the GEMV's
  // epilogue (one kernel fewer) was slower on the H200 (docs/gpu.md "The norm in the GEMV").
  AddRmsNormSwigluSteps(out, sum, input, residual, norm_weight, eps, weight,
                        add_rms_norm_linear_cuda, silu_mul_cuda);
}

namespace {

// Blocks of DecodeMlpKernel<T, ...> for a hidden size h: as many as fit the GPU at once (the grid
// barriers need every block resident; the occupancy API once AllowLargeSharedMemory has asked for
// the largest shared-memory carveout), at most the widest stage's GEMV blocks. Cached per (kernel,
// device, h): the query is a driver call.
template <typename Kernel>
int64_t DecodeMlpGrid(Kernel* kernel, int64_t h, int64_t widest_blocks) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int64_t>, int64_t> cache;
  const std::tuple<const void*, int, int64_t> key(reinterpret_cast<const void*>(kernel), device, h);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    AllowLargeSharedMemory(kernel);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kernel, kGemvWarps * cuda::kWarpSize, static_cast<size_t>(h) * sizeof(float)));
    it = cache.emplace(key, int64_t{per_sm} * cuda::MultiprocessorCount()).first;
  }
  return std::min(it->second, widest_blocks);
}

template <typename T, int kSplitsO, int kSplitsGateUp>
void LaunchDecodeMlp(const DecodeMlpArgs<T>& args) {
  auto* kernel = DecodeMlpKernel<T, kSplitsO, kSplitsGateUp, kSplitsO>;
  const int64_t widest =
      std::max(GemvBlockCount(args.h, kSplitsO), GemvBlockCount(2 * args.inter, kSplitsGateUp));
  const int64_t grid = DecodeMlpGrid(kernel, args.h, widest);
  cuda::LaunchOnStreamWithSharedMemory(
      cuda::EarlyStartLevel() != cuda::EarlyStart::kNone, kernel, dim3(static_cast<unsigned>(grid)),
      dim3(kGemvWarps * cuda::kWarpSize), static_cast<size_t>(args.h) * sizeof(float),
      cuda::CurrentStream(), args);
}

// Runs o_proj_mlp's one-row persistent kernel when it is asked for (DYSCO_CUDA_MLP=persistent) and
// applies (returns false otherwise, having done nothing): one bf16/fp16 row that the GEMVs take
// (TakesGemv, TakesAddNormGemv), SwiGLU widths of whole 16-byte words, the warps a row pair of
// o_proj / down_proj and of gate/up one of the instantiated pairs, the stream's counters at hand.
bool DecodeMlp(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
               const at::Tensor& residual, const at::Tensor& o_weight,
               const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
               const at::Tensor& down_weight) {
  if (attn.size(0) != 1 || !cuda::EnvIs("DYSCO_CUDA_MLP", "persistent")) return false;
  const int64_t h = o_weight.size(0), inter = down_weight.size(1);
  // The norm's input (o_proj's output) has the residual's shape: residual stands for it.
  if (!TakesGemv(attn, o_weight) || h % 8 != 0 || inter % 8 != 0 ||
      !TakesAddNormGemv(out, sum, residual, residual, norm_weight, gate_up_weight) ||
      !cuda::Aligned16(gate_up_weight.data_ptr()) || !cuda::Aligned16(down_weight.data_ptr()) ||
      !cuda::Aligned16(out.data_ptr())) {
    return false;
  }
  const int splits_o = GemvSplits(h), splits_gate_up = GemvSplits(2 * inter);
  if (splits_o < splits_gate_up) return false;  // (1, 2): not instantiated
  unsigned* counters = cuda::StreamCounters(cuda::CounterUser::kDecodeMlp, 2);
  if (counters == nullptr) return false;
  // o, gate/up and the SwiGLU output: one scratch buffer, each part 16-byte aligned.
  const at::Tensor scratch = at::empty({h + 3 * inter}, attn.options());
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    T* base = scratch.data_ptr<T>();
    const DecodeMlpArgs<T> args{attn.data_ptr<T>(),
                                o_weight.data_ptr<T>(),
                                base,
                                {sum.data_ptr<T>(), residual.data_ptr<T>(),
                                 norm_weight.data_ptr<T>(), static_cast<float>(eps)},
                                gate_up_weight.data_ptr<T>(),
                                base + h,
                                base + h + 2 * inter,
                                down_weight.data_ptr<T>(),
                                out.data_ptr<T>(),
                                h,
                                inter,
                                attn.size(1) / 8,
                                counters};
    if (splits_o == 1) {
      LaunchDecodeMlp<T, 1, 1>(args);
    } else if (splits_gate_up == 1) {
      LaunchDecodeMlp<T, 2, 1>(args);
    } else {
      LaunchDecodeMlp<T, 2, 2>(args);
    }
  };
  if (attn.scalar_type() == at::kBFloat16) {
    run(c10::BFloat16());
  } else {
    run(c10::Half());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

void o_proj_mlp_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                     const at::Tensor& residual, const at::Tensor& o_weight,
                     const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                     const at::Tensor& down_weight) {
  CheckOProjMlpArgs(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight,
                    down_weight);
  TORCH_CHECK(out.is_cuda(), kOProjMlpOp, ": the CUDA implementation got tensors on ",
              out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  if (DecodeMlp(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight,
                down_weight)) {
    return;
  }
  // The default, and more rows (prefill, decode batches), fp32, or shapes the persistent kernel
  // does not take: the three ops.
  OProjMlpSteps(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight, down_weight,
                linear_cuda, add_rms_norm_swiglu_cuda);
}

}  // namespace dysco::kernels
