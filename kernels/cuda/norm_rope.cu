// CUDA rms_norm and rotary_embedding (semantics: kernels/ops.h). Each replaces a chain of ATen
// element-wise kernels in the model (a norm was seven: casts, pow, mean, add, rsqrt, two products;
// the rope five), which in a decode step are launches of a few microseconds each over small rows:
// about 2 ms of a 36-layer 8B step on the H200 (docs/gpu.md "Element-wise kernels").
// Rounding follows the ATen chain: fp32 statistics, the normalised value rounded to the dtype
// before the weight's product, each rope product and the sum rounded (tested against kernels/cpu/).
// qk_norm_rope_kv_write runs both and the K/V store as one kernel: a decode layer's q norm, k norm,
// two ropes and KV write were five launches (docs/gpu.md "Element-wise kernels").
// rope_tables makes a step's rotary tables (cos, sin of every position and frequency) in one kernel
// instead of the model's ~9 ATen kernels, with the same bits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/norm_rope.cuh"
#include "kernels/op_checks.h"
#include "kernels/rope_tables.h"

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
  cuda::AllowDependentLaunch();      // the GEMV after it may start (linear.cu)
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_PDL=all
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRowThreads / cuda::kWarpSize) +
                      threadIdx.x / cuda::kWarpSize;
  if (row >= rows) return;  // whole warps leave: the shuffles below see full warps
  const int lane = threadIdx.x % cuda::kWarpSize;
  const T* x = input + row * d;
  T* y = out + row * d;
  const float inv = WarpInvRms(x, d, lane, eps);
  for (int64_t j = lane; j < d; j += cuda::kWarpSize) y[j] = NormedElement(x[j], weight[j], inv);
}

// One block per row (the hidden-size norms; 1024 threads so that a decode step's single row of
// 4096 is four loads per thread).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(T* out, const T* input, const T* weight, int64_t d, float eps) {
  cuda::AllowDependentLaunch();      // the GEMV after it may start (linear.cu)
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_PDL=all
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
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) y[j] = NormedElement(x[j], weight[j], inv);
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
  RotatePair(C::ToFloat(x[j]), C::ToFloat(x[j + half]), c, s, j, half, out + row * d);
}

// ---- rope_tables

constexpr int kRopeTablesThreads = 256;

// cos, sin [T, D]: one thread per (token t, frequency i < D/2), which writes columns i and i + D/2
// (the model's cat(freqs, freqs)) of both tables. Grid: ceil(T * D/2 / kRopeTablesThreads) blocks.
// Bit for bit the ATen composite on CUDA (kernels/rope_tables.h), one step for each of its kernels:
// - static_cast<float>(position): ATen's int64 -> float32 copy (round to nearest);
// - __fmul_rn(position, inv_freq): ATen's mul, one fp32 rounding; the intrinsic keeps nvcc (which
//   contracts by default, -fmad=true) from fusing the product into an FMA of cosf's reduction;
// - cosf / sinf: the precise libdevice functions, which ATen's CUDA cos and sin kernels call for
//   float (`::cos(a)`, `::sin(a)`). Precise because our CUDA flags have no --use_fast_math (nor
//   -ftz=true: CMakeLists.txt, kernels/CMakeLists.txt); with it nvcc would substitute the
//   approximate __cosf / __sinf and the bits would differ;
// - __fmul_rn(..., scaling): ATen's mul by the wrapped scalar attention_scaling, which it makes
//   (float)scaling and multiplies in fp32;
// - Convert<T>::FromFloat: round to nearest even, as ATen's .to(dtype) (c10's static_cast<T>(float)
//   on the device: __float2bfloat16 / __float2half, both round to nearest even).
template <typename T>
__global__ void __launch_bounds__(kRopeTablesThreads)
    RopeTablesKernel(T* cos, T* sin, const int64_t* positions, const float* inv_freq, int64_t pairs,
                     int64_t half, float scaling) {
  using C = cuda::Convert<T>;
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= pairs) return;
  const int64_t t = k / half;
  const int64_t i = k % half;
  const float angle = __fmul_rn(static_cast<float>(positions[t]), inv_freq[i]);
  const T c = C::FromFloat(__fmul_rn(cosf(angle), scaling));
  const T s = C::FromFloat(__fmul_rn(sinf(angle), scaling));
  T* cos_row = cos + t * 2 * half;
  T* sin_row = sin + t * 2 * half;
  cos_row[i] = c;
  cos_row[i + half] = c;
  sin_row[i] = s;
  sin_row[i + half] = s;
}

// ---- qk_norm_rope_kv_write

constexpr int kQkvThreads = 128;  // four (token, head) warps per block

// One warp per (token t, head h) with h < H a query head and H <= h < H + Hkv key head h - H:
// the head's D elements of qkv [T, (H + 2 Hkv) D] normed (when w is given: WarpInvRms and
// NormedElement, as RmsNormWarpKernel), then rotated (RotatePair, as RotaryKernel), into query or
// into the cache's K row of slot_mapping[t]; a key head's warp also copies its value head into
// the V row. A negative slot (or one past the cache, which the CPU op rejects) writes no K/V.
// Grid: ceil(T * (H + Hkv) / 4) blocks of kQkvThreads. kM > 0 (D = 32 kM): the head through
// WarpNormRopeHeadInRegisters, its loads first, and a key head's value row loaded before the norm
// (the default; DYSCO_CUDA_QK_WRITE=chain takes kM = 0: the same bits).
template <typename T, int kM>
__global__ void __launch_bounds__(kQkvThreads)
    QkNormRopeKvWriteKernel(T* query, T* k_cache, T* v_cache, const T* qkv, const T* cos,
                            const T* sin, const int64_t* slots, const T* q_w, const T* k_w,
                            int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d,
                            int64_t num_slots, float eps) {
  // The decode attention after it may start now: it reads only the cache's older keys (and its
  // metadata) before it waits for this kernel (split_attention_mma.cu,
  // AttentionParams::early_keys).
  cuda::AllowDependentLaunch();
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_QK_PDL=1
  const int64_t heads_per_token = heads + kv_heads;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kQkvThreads / cuda::kWarpSize) +
                       threadIdx.x / cuda::kWarpSize;
  if (warp >= tokens * heads_per_token) return;  // whole warps leave: the shuffles see full warps
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t t = warp / heads_per_token;
  const int64_t h = warp % heads_per_token;
  const T* row = qkv + t * (heads + 2 * kv_heads) * d;
  const T* x = row + h * d;  // query heads, then key heads
  T* y;
  const T* w;
  if (h < heads) {
    y = query + (t * heads + h) * d;
    w = q_w;
  } else {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots) return;
    const int64_t j = h - heads;
    y = k_cache + (slot * kv_heads + j) * d;
    w = k_w;
    const T* v = row + (heads + kv_heads + j) * d;
    T* v_out = v_cache + (slot * kv_heads + j) * d;
    if constexpr (kM > 0) {
      T vv[kM];
#pragma unroll
      for (int k = 0; k < kM; ++k) vv[k] = v[lane + k * cuda::kWarpSize];
#pragma unroll
      for (int k = 0; k < kM; ++k) v_out[lane + k * cuda::kWarpSize] = vv[k];
    } else {
      for (int64_t i = lane; i < d; i += cuda::kWarpSize) v_out[i] = v[i];
    }
  }
  if constexpr (kM > 0) {
    WarpNormRopeHeadInRegisters<T, kM>(x, w, cos + t * d, sin + t * d, lane, eps, y);
  } else {
    WarpNormRopeHead(x, w, cos + t * d, sin + t * d, d, lane, eps, y);
  }
}

// ---- add_rms_norm and silu_mul

// Elements per 16-byte vector: 4 floats, 8 bf16 / fp16.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// v[0, V) <- p[0, V): one element (V == 1) or one 16-byte load (p 16-byte aligned).
template <int V, typename T>
__device__ __forceinline__ void LoadN(const T* p, T (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = p[0];
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(v, &raw, sizeof(raw));
  }
}
template <int V, typename T>
__device__ __forceinline__ void StoreN(T* p, const T (&v)[V]) {
  if constexpr (V == 1) {
    p[0] = v[0];
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    uint4 raw;
    memcpy(&raw, v, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// sum[u] <- to_dtype(input[u] + residual[u]) for the units u = first, first + stride, ... < units
// of V elements of one row; returns the sum of the squares of the rounded values (fp32).
template <int V, typename T>
__device__ __forceinline__ float AddRowPart(T* sum, const T* input, const T* residual,
                                            int64_t units, int64_t first, int64_t stride) {
  using C = cuda::Convert<T>;
  float squares = 0.0f;
  for (int64_t u = first; u < units; u += stride) {
    T a[V], b[V], s[V];
    LoadN<V>(input + u * V, a);
    LoadN<V>(residual + u * V, b);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // ATen's add: a + b in fp32 (exact for fp32 inputs' rounding), rounded to the dtype.
      s[i] = C::FromFloat(__fadd_rn(C::ToFloat(a[i]), C::ToFloat(b[i])));
      const float v = C::ToFloat(s[i]);
      squares += v * v;
    }
    StoreN<V>(sum + u * V, s);
  }
  return squares;
}

// out[u] <- weight[u] * to_dtype(sum[u] * inv) for the same units as AddRowPart: each thread reads
// back only the sum elements it wrote itself (program order, no barrier needed), which also keeps
// the kernel correct if a caller ignored the no-overlap rule for sum and input.
template <int V, typename T>
__device__ __forceinline__ void NormRowPart(T* out, const T* sum, const T* weight, int64_t units,
                                            int64_t first, int64_t stride, float inv) {
  for (int64_t u = first; u < units; u += stride) {
    T s[V], w[V], y[V];
    LoadN<V>(sum + u * V, s);
    LoadN<V>(weight + u * V, w);
#pragma unroll
    for (int i = 0; i < V; ++i) y[i] = NormedElement(s[i], w[i], inv);
    StoreN<V>(out + u * V, y);
  }
}

// add_rms_norm, one warp per row of d = units * V (d <= kWarpRowMax), as RmsNormWarpKernel.
template <int V, typename T>
__global__ void __launch_bounds__(kWarpRowThreads)
    AddRmsNormWarpKernel(T* out, T* sum, const T* input, const T* residual, const T* weight,
                         int64_t rows, int64_t d, float eps) {
  cuda::AllowDependentLaunch();      // the GEMV after it may start (linear.cu)
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_PDL=all
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRowThreads / cuda::kWarpSize) +
                      threadIdx.x / cuda::kWarpSize;
  if (row >= rows) return;  // whole warps leave: the shuffles below see full warps
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t units = d / V;
  const float squares = cuda::WarpSum(AddRowPart<V>(
      sum + row * d, input + row * d, residual + row * d, units, lane, cuda::kWarpSize));
  const float inv = rsqrtf(squares / static_cast<float>(d) + eps);
  NormRowPart<V>(out + row * d, sum + row * d, weight, units, lane, cuda::kWarpSize, inv);
}

// add_rms_norm, one block per row (the hidden-size rows), as RmsNormKernel; blockDim.x a multiple
// of 32, at most kNormThreads.
template <int V, typename T>
__global__ void __launch_bounds__(kNormThreads)
    AddRmsNormKernel(T* out, T* sum, const T* input, const T* residual, const T* weight, int64_t d,
                     float eps) {
  cuda::AllowDependentLaunch();      // the GEMV after it may start (linear.cu)
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_PDL=all
  __shared__ float shared[kNormThreads / cuda::kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t units = d / V;
  float squares = AddRowPart<V>(sum + row * d, input + row * d, residual + row * d, units,
                                threadIdx.x, blockDim.x);
  squares = cuda::BlockReduce(squares, shared, [](float a, float b) { return a + b; });
  const float inv = rsqrtf(squares / static_cast<float>(d) + eps);
  NormRowPart<V>(out + row * d, sum + row * d, weight, units, threadIdx.x, blockDim.x, inv);
}

// Whether the norm and SwiGLU kernels are launched to start early (cuda_common.cuh; they wait for
// the kernel ahead first thing either way): DYSCO_CUDA_PDL=all.
bool EarlyNorm() { return cuda::EarlyStartLevel() == cuda::EarlyStart::kAll; }

template <int V, typename T>
void LaunchAddRmsNorm(T* out, T* sum, const T* input, const T* residual, const T* weight,
                      int64_t rows, int64_t d, float eps) {
  if (d <= kWarpRowMax) {
    const int64_t rows_per_block = kWarpRowThreads / cuda::kWarpSize;
    cuda::LaunchOnStream(EarlyNorm(), AddRmsNormWarpKernel<V, T>,
                         dim3(static_cast<unsigned>(cuda::CeilDiv(rows, rows_per_block))),
                         dim3(kWarpRowThreads), cuda::CurrentStream(), out, sum, input, residual,
                         weight, rows, d, eps);
  } else {
    // Threads for the row's units (d / V), whole warps, at most kNormThreads: a vectorised row of
    // 4096 bf16 is 512 units, one per thread.
    const int64_t units = d / V;
    const auto threads = static_cast<unsigned>(std::min<int64_t>(
        kNormThreads, cuda::CeilDiv(units, int64_t{cuda::kWarpSize}) * cuda::kWarpSize));
    cuda::LaunchOnStream(EarlyNorm(), AddRmsNormKernel<V, T>, dim3(static_cast<unsigned>(rows)),
                         dim3(threads), cuda::CurrentStream(), out, sum, input, residual, weight, d,
                         eps);
  }
}

constexpr int kSiluThreads = 256;

// silu_mul over units of V elements of out [rows, n] (n % V == 0 when V > 1): out = to_dtype(
// to_dtype(silu(g)) * u), silu in fp32 as ATen's CUDA kernel (ActivationSiluKernel.cu:
// x / (1 + exp(-x)) in opmath float, IEEE division), the product as ATen's mul (fp32, rounded).
template <int V, typename T>
__global__ void __launch_bounds__(kSiluThreads)
    SiluMulKernel(T* out, const T* input, int64_t units, int64_t n) {
  cuda::AllowDependentLaunch();      // the GEMV after it may start (linear.cu)
  cuda::WaitForPrerequisiteGrids();  // launched to start early: DYSCO_CUDA_PDL=all
  const int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (unit >= units) return;
  const int64_t i = unit * V;  // flat index into out
  const int64_t row = i / n;
  const int64_t j = i % n;
  const T* gate = input + row * 2 * n + j;
  T g[V], u[V], y[V];
  LoadN<V>(gate, g);
  LoadN<V>(gate + n, u);
#pragma unroll
  for (int k = 0; k < V; ++k) y[k] = cuda::SiluTimes(g[k], u[k]);
  StoreN<V>(out + i, y);
}

}  // namespace

void add_rms_norm_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                       const at::Tensor& residual, const at::Tensor& weight, double eps) {
  CheckAddRmsNormArgs(out, sum, input, residual, weight, eps);
  TORCH_CHECK(out.is_cuda(), kAddRmsNormOp, ": the CUDA implementation got tensors on ",
              out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = input.size(0);
  const int64_t d = input.size(1);
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(input.scalar_type(), kAddRmsNormOp, [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    scalar_t* s = sum.data_ptr<scalar_t>();
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* r = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    constexpr int kV = kVecElems<scalar_t>;
    // 16-byte vectors when every row is whole vectors and every pointer is 16-byte aligned.
    const bool vector = d % kV == 0 && cuda::Aligned16(y) && cuda::Aligned16(s) &&
                        cuda::Aligned16(x) && cuda::Aligned16(r) && cuda::Aligned16(w);
    if (vector) {
      LaunchAddRmsNorm<kV>(y, s, x, r, w, rows, d, static_cast<float>(eps));
    } else {
      LaunchAddRmsNorm<1>(y, s, x, r, w, rows, d, static_cast<float>(eps));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_mul_cuda(const at::Tensor& out, const at::Tensor& input) {
  CheckSiluMulArgs(out, input);
  TORCH_CHECK(out.is_cuda(), kSiluMulOp, ": the CUDA implementation got tensors on ", out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.size(1);
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(input.scalar_type(), kSiluMulOp, [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    const scalar_t* x = input.data_ptr<scalar_t>();
    constexpr int kV = kVecElems<scalar_t>;
    // Rows of whole vectors (n % V == 0 keeps both halves of every row aligned).
    if (n % kV == 0 && cuda::Aligned16(y) && cuda::Aligned16(x)) {
      const int64_t units = out.numel() / kV;
      cuda::LaunchOnStream(EarlyNorm(), SiluMulKernel<kV, scalar_t>,
                           dim3(static_cast<unsigned>(cuda::CeilDiv(units, int64_t{kSiluThreads}))),
                           dim3(kSiluThreads), cuda::CurrentStream(), y, x, units, n);
    } else {
      const int64_t units = out.numel();
      cuda::LaunchOnStream(EarlyNorm(), SiluMulKernel<1, scalar_t>,
                           dim3(static_cast<unsigned>(cuda::CeilDiv(units, int64_t{kSiluThreads}))),
                           dim3(kSiluThreads), cuda::CurrentStream(), y, x, units, n);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
      cuda::LaunchOnStream(EarlyNorm(), RmsNormWarpKernel<scalar_t>,
                           dim3(static_cast<unsigned>(cuda::CeilDiv(rows, rows_per_block))),
                           dim3(kWarpRowThreads), cuda::CurrentStream(), out.data_ptr<scalar_t>(),
                           input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rows, d,
                           static_cast<float>(eps));
    } else {
      cuda::LaunchOnStream(EarlyNorm(), RmsNormKernel<scalar_t>, dim3(static_cast<unsigned>(rows)),
                           dim3(kNormThreads), cuda::CurrentStream(), out.data_ptr<scalar_t>(),
                           input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), d,
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

void rope_tables_cuda(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      const at::Tensor& inv_freq, double scaling) {
  CheckRopeTablesArgs(cos, sin, positions, inv_freq);
  TORCH_CHECK(cos.is_cuda(), kRopeTablesOp, ": the CUDA implementation got tensors on ",
              cos.device());
  if (cos.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(cos.device());
  // DYSCO_CUDA_ROPE_TABLES=aten: the model's ATen composite instead (~9 kernels), for A/B timing in
  // one process; the same bits.
  if (cuda::EnvIs("DYSCO_CUDA_ROPE_TABLES", "aten")) {
    RopeTablesAten(cos, sin, positions, inv_freq, scaling);
    return;
  }
  const int64_t half = cos.size(1) / 2;
  const int64_t pairs = cos.size(0) * half;
  const auto blocks = static_cast<unsigned>(cuda::CeilDiv(pairs, int64_t{kRopeTablesThreads}));
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(cos.scalar_type(), kRopeTablesOp, [&] {
    // A plain launch: the table is the first thing of a step, and its first read (positions) would
    // wait for the work ahead anyway.
    cuda::LaunchOnStream(/*early=*/false, RopeTablesKernel<scalar_t>, dim3(blocks),
                         dim3(kRopeTablesThreads), cuda::CurrentStream(), cos.data_ptr<scalar_t>(),
                         sin.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(),
                         inv_freq.data_ptr<float>(), pairs, half, static_cast<float>(scaling));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void qk_norm_rope_kv_write_cuda(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                                const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& slot_mapping,
                                const c10::optional<at::Tensor>& q_norm_weight,
                                const c10::optional<at::Tensor>& k_norm_weight, double eps) {
  const PagedCacheShape cache = CheckQkNormRopeKvWriteArgs(
      query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps);
  TORCH_CHECK(query.is_cuda(), kQkNormRopeKvWriteOp, ": the CUDA implementation got tensors on ",
              query.device());
  const int64_t tokens = query.size(0), heads = query.size(1);
  const int64_t warps = tokens * (heads + cache.num_kv_heads);
  if (warps == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t num_slots = cache.num_pages * cache.page_size;
  const bool norms = q_norm_weight.has_value() && q_norm_weight->defined();
  const auto blocks =
      static_cast<unsigned>(cuda::CeilDiv(warps, int64_t{kQkvThreads / cuda::kWarpSize}));
  DYSCO_CUDA_DISPATCH_CACHE_TYPES(query.scalar_type(), kQkNormRopeKvWriteOp, [&] {
    scalar_t* k_cache = kv_cache_layer.data_ptr<scalar_t>();
    // Launched plainly unless DYSCO_CUDA_QK_PDL=1 (A/B timing): then it may start while the q/k/v
    // GEMV ahead of it finishes, and waits for it first thing.
    const bool early =
        cuda::EnvIs("DYSCO_CUDA_QK_PDL", "1") && cuda::EarlyStartLevel() != cuda::EarlyStart::kNone;
    // Each lane's loads first, for head sizes of 64, 128 and 256: the same bits in half the time
    // of a warp's chain of 2-byte loads (0.10 against 0.20 ms a layer of an 8192-token chunk,
    // docs/gpu.md "Loads first in qk_norm_rope_kv_write"); DYSCO_CUDA_QK_WRITE=chain (A/B) and
    // other head sizes take the chain.
    const bool registers = !cuda::EnvIs("DYSCO_CUDA_QK_WRITE", "chain");
    const int64_t d = cache.head_dim;
    auto* kernel = !registers ? QkNormRopeKvWriteKernel<scalar_t, 0>
                   : d == 64  ? QkNormRopeKvWriteKernel<scalar_t, 2>
                   : d == 128 ? QkNormRopeKvWriteKernel<scalar_t, 4>
                   : d == 256 ? QkNormRopeKvWriteKernel<scalar_t, 8>
                              : QkNormRopeKvWriteKernel<scalar_t, 0>;
    cuda::LaunchOnStream(
        early, kernel, dim3(blocks), dim3(kQkvThreads), cuda::CurrentStream(),
        query.data_ptr<scalar_t>(), k_cache, k_cache + num_slots * cache.num_kv_heads * d,
        qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
        slot_mapping.data_ptr<int64_t>(), norms ? q_norm_weight->data_ptr<scalar_t>() : nullptr,
        norms ? k_norm_weight->data_ptr<scalar_t>() : nullptr, tokens, heads, cache.num_kv_heads, d,
        num_slots, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dysco::kernels
