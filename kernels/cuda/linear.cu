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

// 16 bytes of weights, streamed: read once per step, so they should not displace the input rows
// (reused by every warp) from L1.
__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// out[m, n0 .. n0 + R) for m < M. Grid: ceil(N / (kGemvWarps * R)) blocks of kGemvWarps warps.
// k8 = K / 8 (16-byte words per row); x, w 16-byte aligned.
template <typename T, int M>
__global__ void __launch_bounds__(kGemvWarps* cuda::kWarpSize)
    GemvKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w, int64_t n,
               int64_t k8) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t n0 =
      (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / cuda::kWarpSize) * R;
  if (n0 >= n) return;  // whole warps leave: the shuffles below see full warps
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4* wv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // A row past N (odd N, last warp) re-reads row n0: its sums are never stored.
    wv[r] = reinterpret_cast<const uint4*>(w) + (n0 + r < n ? n0 + r : n0) * k8;
  }
  // Launched to start early (cuda_common.cuh): wait for the kernel that writes x before reading
  // it or writing out; under a plain launch the wait returns at once. The kernel after may start
  // (DYSCO_CUDA_PDL=all).
  cuda::WaitForPrerequisiteGrids();
  cuda::AllowDependentLaunch();
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;
  }
  for (int64_t base = lane; base < k8; base += cuda::kWarpSize * kGemvUnroll) {
    uint4 wr[kGemvUnroll][R];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int64_t i = base + u * cuda::kWarpSize;
#pragma unroll
      for (int r = 0; r < R; ++r) wr[u][r] = i < k8 ? LoadStreaming(wv[r] + i) : uint4{0, 0, 0, 0};
    }
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
        cuda::UnpackEight(__ldg(xv + m * k8 + i), T(), xf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float sum = cuda::WarpSum(acc[m][r]);
      if (lane == 0 && n0 + r < n) out[m * n + n0 + r] = cuda::Convert<T>::FromFloat(sum);
    }
  }
}

bool ForcedCublas() { return cuda::EnvIs("DYSCO_CUDA_LINEAR", "cublas"); }

template <typename T, int M>
void LaunchGemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  const int64_t n = weight.size(0);
  const int64_t rows_per_block = int64_t{kGemvWarps} * kGemvRowsPerWarp;
  cuda::LaunchOnStream(cuda::EarlyStartLevel() != cuda::EarlyStart::kNone, GemvKernel<T, M>,
                       dim3(static_cast<unsigned>(cuda::CeilDiv(n, rows_per_block))),
                       dim3(kGemvWarps * cuda::kWarpSize), cuda::CurrentStream(), out.data_ptr<T>(),
                       input.data_ptr<T>(), weight.data_ptr<T>(), n, input.size(1) / 8);
}

template <typename T>
void Gemv(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  static_assert(kGemvMaxRows == 2, "one instantiation per row count");
  switch (input.size(0)) {
    case 1:
      return LaunchGemv<T, 1>(out, input, weight);
    default:
      return LaunchGemv<T, 2>(out, input, weight);
  }
}

}  // namespace

void linear_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  CheckLinearArgs(out, input, weight);
  TORCH_CHECK(out.is_cuda(), kLinearOp, ": tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  const int64_t m = input.size(0);
  const int64_t k = input.size(1);
  const bool half_type = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
  if (half_type && m <= kGemvMaxRows && k > 0 && k % 8 == 0 && cuda::Aligned16(input.data_ptr()) &&
      cuda::Aligned16(weight.data_ptr()) && !ForcedCublas()) {
    if (input.scalar_type() == at::kBFloat16) {
      Gemv<c10::BFloat16>(out, input, weight);
    } else {
      Gemv<c10::Half>(out, input, weight);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // mm_out writes every element of out ([M, N]); weight.t() is a view, no copy.
  at::Tensor out_view = out;  // at::mm_out takes a non-const reference to the same tensor
  at::mm_out(out_view, input, weight.t());
}

}  // namespace dysco::kernels
