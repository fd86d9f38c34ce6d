// CUDA rms_norm and rotary_embedding (semantics: kernels/ops.h). Each replaces a chain of ATen
// element-wise kernels in the model (a norm was seven: casts, pow, mean, add, rsqrt, two products;
// the rope five), which in a decode step are launches of a few microseconds each over small rows:
// about 2 ms of a 36-layer 8B step on the H200 (docs/gpu.md "Element-wise kernels").
// Rounding follows the ATen chain: fp32 statistics, the normalised value rounded to the dtype
// before the weight's product, each rope product and the sum rounded (tested against kernels/cpu/).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/op_checks.h"

namespace dysco::kernels {
namespace {

constexpr int kNormThreads = 1024;    // rows wider than kWarpRowMax: one block per row
constexpr int kWarpRowMax = 1024;     // rows up to this width: one warp per row
constexpr int kWarpRowThreads = 256;  // 8 rows per block
constexpr int kRopeThreads = 256;

// One warp per row, for the per-head q/k norms (32 + 8 rows of 128 per token in the 8B models): a
// block per row of 128 left most of its threads idle and paid two barriers.
// Grid: ceil(rows / 8) blocks of kWarpRowThreads.
template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads)
    RmsNormWarpKernel(T* out, const T* input, const T* weight, int64_t rows, int64_t d, float eps) {
  using C = cuda::Convert<T>;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRowThreads / cuda::kWarpSize) +
                      threadIdx.x / cuda::kWarpSize;
  if (row >= rows) return;  // whole warps leave: the shuffles below see full warps
  const int lane = threadIdx.x % cuda::kWarpSize;
  const T* x = input + row * d;
  T* y = out + row * d;
  float sum = 0.0f;
  for (int64_t j = lane; j < d; j += cuda::kWarpSize) {
    const float v = C::ToFloat(x[j]);
    sum += v * v;
  }
#pragma unroll
  for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  const float inv = rsqrtf(sum / static_cast<float>(d) + eps);
  for (int64_t j = lane; j < d; j += cuda::kWarpSize) {
    const float normalised = C::ToFloat(C::FromFloat(C::ToFloat(x[j]) * inv));
    y[j] = C::FromFloat(C::ToFloat(weight[j]) * normalised);
  }
}

// One block per row (the hidden-size norms; 1024 threads so that a decode step's single row of
// 4096 is four loads per thread).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(T* out, const T* input, const T* weight, int64_t d, float eps) {
  __shared__ float shared[kNormThreads / cuda::kWarpSize];
  using C = cuda::Convert<T>;
  const T* x = input + blockIdx.x * d;
  T* y = out + blockIdx.x * d;
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = C::ToFloat(x[j]);
    sum += v * v;
  }
  sum = cuda::BlockReduce(sum, shared, [](float a, float b) { return a + b; });
  const float inv = rsqrtf(sum / static_cast<float>(d) + eps);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float normalised = C::ToFloat(C::FromFloat(C::ToFloat(x[j]) * inv));
    y[j] = C::FromFloat(C::ToFloat(weight[j]) * normalised);
  }
}

// One thread per pair (j, j + D/2) of a row of [T, H, D].
template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    RotaryKernel(T* out, const T* input, const T* cos, const T* sin, int64_t pairs, int64_t heads,
                 int64_t d) {
  using C = cuda::Convert<T>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= pairs) return;
  const int64_t half = d / 2;
  const int64_t row = i / half;
  const int64_t j = i % half;
  const int64_t t = row / heads;
  const T* x = input + row * d;
  const T* c = cos + t * d;
  const T* s = sin + t * d;
  const float lo = C::ToFloat(x[j]), hi = C::ToFloat(x[j + half]);
  // Each product rounded on its own (__fmul_rn: no fused multiply-add, also in fp32), as ATen's
  // separate kernels do: the CPU op equals the chain exactly and this kernel equals the CPU op.
  auto product = [](float a, float b) { return C::ToFloat(C::FromFloat(__fmul_rn(a, b))); };
  out[row * d + j] =
      C::FromFloat(__fadd_rn(product(lo, C::ToFloat(c[j])), product(-hi, C::ToFloat(s[j]))));
  out[row * d + j + half] = C::FromFloat(
      __fadd_rn(product(hi, C::ToFloat(c[j + half])), product(lo, C::ToFloat(s[j + half]))));
}

}  // namespace

void rms_norm_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                   double eps) {
  CheckRmsNormArgs(out, input, weight, eps);
  TORCH_CHECK(out.is_cuda(), kRmsNormOp, ": the CUDA implementation got tensors on ", out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = input.size(0);
  const int64_t d = input.size(1);
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(input.scalar_type(), kRmsNormOp, [&] {
    if (d <= kWarpRowMax) {
      const int64_t rows_per_block = kWarpRowThreads / cuda::kWarpSize;
      RmsNormWarpKernel<scalar_t><<<static_cast<unsigned>(cuda::CeilDiv(rows, rows_per_block)),
                                    kWarpRowThreads, 0, cuda::CurrentStream()>>>(
          out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rows,
          d, static_cast<float>(eps));
    } else {
      RmsNormKernel<scalar_t>
          <<<static_cast<unsigned>(rows), kNormThreads, 0, cuda::CurrentStream()>>>(
              out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d,
              static_cast<float>(eps));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rotary_embedding_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                           const at::Tensor& sin) {
  CheckRotaryEmbeddingArgs(out, input, cos, sin);
  TORCH_CHECK(out.is_cuda(), kRotaryEmbeddingOp, ": the CUDA implementation got tensors on ",
              out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t pairs = input.numel() / 2;
  const auto blocks = static_cast<unsigned>(cuda::CeilDiv(pairs, int64_t{kRopeThreads}));
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(input.scalar_type(), kRotaryEmbeddingOp, [&] {
    RotaryKernel<scalar_t><<<blocks, kRopeThreads, 0, cuda::CurrentStream()>>>(
        out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
        sin.data_ptr<scalar_t>(), pairs, input.size(1), input.size(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dysco::kernels
