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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/op_checks.h"

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

// acc[m][r] += the dot products of the chunk wr (LoadWeightChunk at base) with the input rows'
// words at the same positions; load_x(m, i, xf) gives word i of input row m as 8 floats.
template <typename T, int M, int R, typename LoadX>
__device__ __forceinline__ void DotChunk(float (&acc)[M][R], const uint4 (&wr)[kGemvUnroll][R],
                                         int64_t base, int64_t k8, LoadX&& load_x) {
#pragma unroll
  for (int u = 0; u < kGemvUnroll; ++u) {
    const int64_t i = base + u * cuda::kWarpSize;
    if (i >= k8) break;
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) cuda::UnpackEight(wr[u][r], T(), wf[r]);
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

// A warp's place in a GEMV block of kGemvWarps warps, kSplits of them per pair of weight rows: the
// pair's first row n0, and which of the pair's warps it is (it takes the chunks split, split +
// kSplits, ... of the rows, a chunk being kGemvUnroll 16-byte words a lane).
template <int kSplits>
struct GemvWarpPlace {
  static constexpr int kPairsPerBlock = kGemvWarps / kSplits;
  static constexpr int64_t kChunkStride = int64_t{kSplits} * cuda::kWarpSize * kGemvUnroll;
  int64_t n0;
  int split;
  __device__ GemvWarpPlace() {
    const int warp = threadIdx.x / cuda::kWarpSize;
    split = warp % kSplits;
    n0 = (static_cast<int64_t>(blockIdx.x) * kPairsPerBlock + warp / kSplits) * kGemvRowsPerWarp;
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
  // (DYSCO_CUDA_PDL=all).
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

// The residual add and RMSNorm in front of a GEMV (add_rms_norm_linear).
template <typename T>
struct AddNormArgs {
  T* sum;             // [M, K] <- x + residual, rounded to T
  const T* residual;  // [M, K], 16-byte aligned
  const T* weight;    // [K], 16-byte aligned
  float eps;
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
  using C = cuda::Convert<T>;
  extern __shared__ float4 normed[];  // [M][2][k8]
  __shared__ float warp_squares[kGemvWarps][M];
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int warp = threadIdx.x / cuda::kWarpSize;
  const GemvWarpPlace<kSplits> place;
  const uint4* wv[R];
  WeightRows<R>(wv, w, place.n0, n, k8);
  uint4 wr[kGemvUnroll][R];
  // The weights do not depend on the kernels ahead.
  LoadWeightChunk<R>(wr, wv, place.FirstWord(lane), k8);
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();

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
      cuda::UnpackEight(__ldg(xv + m * k8 + i), T(), a);
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
  float scale[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < kGemvWarps; ++v) total += warp_squares[v][m];
    scale[m] = rsqrtf(total / static_cast<float>(k8 * 8) + norm.eps);
  }
  auto load_normed = [&](int m, int64_t i, float(&xf)[8]) {
    const float4 lo = normed[(2 * m) * k8 + i];
    const float4 hi = normed[(2 * m + 1) * k8 + i];
    xf[0] = lo.x, xf[1] = lo.y, xf[2] = lo.z, xf[3] = lo.w;
    xf[4] = hi.x, xf[5] = hi.y, xf[6] = hi.z, xf[7] = hi.w;
  };
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

bool ForcedCublas() { return cuda::EnvIs("DYSCO_CUDA_LINEAR", "cublas"); }

// Warps per row pair for a GEMV over N weight rows (GemvWarpPlace): two where the grid of one warp
// a pair would fill at most half of the SMs' block slots, so that two still fit in one wave (the
// 32-100 MB projections of an 8B model: o_proj, down_proj), else one. DYSCO_CUDA_GEMV_SPLITS = "1"
// or "2" forces it (A/B timing).
int GemvSplits(int64_t n) {
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_SPLITS", "1")) return 1;
  if (cuda::EnvIs("DYSCO_CUDA_GEMV_SPLITS", "2")) return 2;
  const int64_t blocks = cuda::CeilDiv(n, int64_t{kGemvWarps} * kGemvRowsPerWarp);
  const int64_t slots = int64_t{kGemvBlocksPerSm} * cuda::MultiprocessorCount();
  return kGemvMaxSplits * blocks <= slots ? kGemvMaxSplits : 1;
}

// Blocks of a GEMV over N weight rows with `splits` warps a row pair.
dim3 GemvGrid(int64_t n, int splits) {
  const int64_t rows_per_block = int64_t{kGemvWarps / splits} * kGemvRowsPerWarp;
  return dim3(static_cast<unsigned>(cuda::CeilDiv(n, rows_per_block)));
}

template <typename T>
void LaunchGemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  static_assert(kGemvMaxRows == 2 && kGemvMaxSplits == 2, "one instantiation per row count");
  const int64_t n = weight.size(0);
  const bool early = cuda::EarlyStartLevel() != cuda::EarlyStart::kNone;
  const int splits = GemvSplits(n);
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
  auto* kernel = splits == 1
                     ? (rows == 1 ? AddNormGemvKernel<T, 1, 1> : AddNormGemvKernel<T, 2, 1>)
                     : (rows == 1 ? AddNormGemvKernel<T, 1, 2> : AddNormGemvKernel<T, 2, 2>);
  const AddNormArgs<T> norm{sum.data_ptr<T>(), residual.data_ptr<T>(), norm_weight.data_ptr<T>(),
                            static_cast<float>(eps)};
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
  const at::Tensor gate_up = at::empty({input.size(0), weight.size(0)}, input.options());
  add_rms_norm_linear_cuda(gate_up, sum, input, residual, norm_weight, eps, weight);
  silu_mul_cuda(out, gate_up);
}

}  // namespace dysco::kernels
