// Shared device helpers of the CUDA `dysco` ops (kernels/cuda/*.cu): element conversion, warp and
// block reductions, the selection sort key, the dtype dispatch of the cache and launch checks.
// Internal to kernels/cuda.
//
// Why the CUDA ops clamp instead of checking values: a value check (sequence lengths, page ids,
// num_keys, offsets) would copy the value to the host and synchronise the stream, which the ops
// must never do (CUDA graphs, issue 9). The device-neutral metadata checks (kernels/op_checks.h)
// still run first; values out of range are clamped into range on the device, so a bad call cannot
// read or write out of bounds, and its results are unspecified. The CPU ops check every value and
// raise, so a caller's bug shows on the CPU build.
//
// Thread-safety: stateless device functions and host helpers.
// Ownership: nothing is kept.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

// The cache dtypes the CPU ops support: float32, bfloat16 and float16.
#define DYSCO_CUDA_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace dysco::kernels::cuda {

constexpr int kWarpSize = 32;

// The stream every op launches on: the caller's current stream (graph capture, overlap).
inline cudaStream_t CurrentStream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Element <-> float. c10's types are layout-compatible with CUDA's __nv_bfloat16 / __half; the
// conversions go through the raw bits so that device code needs neither c10 operator.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ static float ToFloat(float x) { return x; }
  __device__ static float FromFloat(float x) { return x; }
};
template <>
struct Convert<c10::BFloat16> {
  __device__ static float ToFloat(c10::BFloat16 x) {
    return __uint_as_float(static_cast<uint32_t>(x.x) << 16);
  }
  __device__ static c10::BFloat16 FromFloat(float x) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    return c10::BFloat16(*reinterpret_cast<const uint16_t*>(&h), c10::BFloat16::from_bits());
  }
};
template <>
struct Convert<c10::Half> {
  __device__ static float ToFloat(c10::Half x) {
    return __half2float(*reinterpret_cast<const __half*>(&x.x));
  }
  __device__ static c10::Half FromFloat(float x) {
    const __half h = __float2half_rn(x);
    return c10::Half(*reinterpret_cast<const uint16_t*>(&h), c10::Half::from_bits());
  }
};

// dst[0, 8) <- src[0, 8) as floats, with 16-byte loads; src must be 16-byte aligned.
__device__ __forceinline__ void LoadEight(const float* src, float (&dst)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(src);
  const float4 b = *reinterpret_cast<const float4*>(src + 4);
  dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w;
  dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
}
// Eight bf16 / fp16 values packed in 16 bytes, as floats.
__device__ __forceinline__ void UnpackEight(const uint4& raw, c10::BFloat16 /*type*/,
                                            float (&dst)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    dst[2 * i] = __uint_as_float(words[i] << 16);
    dst[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void UnpackEight(const uint4& raw, c10::Half /*type*/, float (&dst)[8]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    dst[2 * i] = f.x;
    dst[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void LoadEight(const c10::BFloat16* src, float (&dst)[8]) {
  UnpackEight(*reinterpret_cast<const uint4*>(src), c10::BFloat16(), dst);
}
__device__ __forceinline__ void LoadEight(const c10::Half* src, float (&dst)[8]) {
  UnpackEight(*reinterpret_cast<const uint4*>(src), c10::Half(), dst);
}

// silu(g) * u as ATen's CUDA `F.silu(g) * u`: silu in fp32 (x / (1 + expf(-x)), IEEE division,
// ActivationSiluKernel.cu) rounded to T, then the product in fp32 rounded to T (silu_mul's kernel).
template <typename T>
__device__ __forceinline__ T SiluTimes(T g, T u) {
  const float x = Convert<T>::ToFloat(g);
  const float silu = Convert<T>::ToFloat(Convert<T>::FromFloat(__fdiv_rn(x, 1.0f + expf(-x))));
  return Convert<T>::FromFloat(__fmul_rn(silu, Convert<T>::ToFloat(u)));
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Block-wide reduction of one value per thread; every thread gets the result. shared: at least
// blockDim.x / 32 entries of T. Must be reached by every thread of the block.
template <typename T, typename Op>
__device__ T BlockReduce(T v, T* shared, Op op) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = shared[0];
  for (int w = 1; w < warps; ++w) r = op(r, shared[w]);
  return r;
}

// Clamps x into [lo, hi] (see the header comment: values are clamped, not checked).
__host__ __device__ __forceinline__ int64_t Clamp(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// The selection order of dysco_select_bias as one 64-bit key, ascending = relevance descending,
// then position ascending; -0 ties with +0 and NaN sorts after every number. Bit for bit the key of
// kernels/cpu/dysco_select.cpp, so that both backends select the same set, ties included.
__device__ __forceinline__ uint64_t SortKey(float value, int64_t position) {
  uint32_t ascending = 0;  // NaN
  if (!isnan(value)) {
    const uint32_t bits = value != 0.0f ? __float_as_uint(value) : 0u;
    ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  }
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint64_t>(position);
}

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- Programmatic dependent launch (sm_90; docs/gpu.md "Linear layers"). A kernel launched with
// LaunchOnStream(early = true) may start before the kernel ahead of it on the stream has finished,
// once every block of that kernel has called AllowDependentLaunch (or exited), so that its launch
// and block scheduling overlap the tail of the kernel ahead; it must call WaitForPrerequisiteGrids
// before it reads anything that kernel writes or writes anything it reads (the wait returns once
// the kernel ahead has completed and its writes are visible). In a kernel launched without the
// attribute both calls are no-ops, so the kernels work under any launch; a CUDA graph captures the
// early start as a programmatic edge.
__device__ __forceinline__ void AllowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void WaitForPrerequisiteGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The current device's streaming multiprocessors, from ATen's per-device cache of its properties
// (no driver call per kernel launch).
inline int MultiprocessorCount() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Whether the environment variable `name` is set to `value`: the ops' A/B knobs (DYSCO_CUDA_*),
// read at every call so that a test or benchmark can time both sides in one process.
inline bool EnvIs(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// The integer the environment variable `name` holds (strtol's reading) when it is set, in
// [lo, hi] and a multiple of `multiple`; else nothing (the knob's default applies). Read per call,
// as EnvIs.
inline std::optional<int64_t> EnvInt(const char* name, int64_t lo, int64_t hi,
                                     int64_t multiple = 1) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  const int64_t n = std::strtol(v, nullptr, 10);
  if (n < lo || n > hi || n % multiple != 0) return std::nullopt;
  return n;
}

// Which kernels start early: the environment variable DYSCO_CUDA_PDL = "0" (none), unset or "1"
// (linear's GEMV and the tensor-core decode attention: the default), "all" (also add_rms_norm,
// rms_norm and silu_mul). Read per call,
// for A/B timing in one process (test_kernels_cuda, bench-gpu).
enum class EarlyStart { kNone = 0, kGemv = 1, kAll = 2 };
inline EarlyStart EarlyStartLevel() {
  if (EnvIs("DYSCO_CUDA_PDL", "0")) return EarlyStart::kNone;
  return EnvIs("DYSCO_CUDA_PDL", "all") ? EarlyStart::kAll : EarlyStart::kGemv;
}
// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...) with one launch attribute
// (cudaLaunchKernelEx) and returns the launch's error for the caller to check or handle.
template <typename... KernelArgs, typename... Args>
cudaError_t LaunchWithAttribute(const cudaLaunchAttribute& attribute, void (*kernel)(KernelArgs...),
                                dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                                Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[1] = {attribute};
  config.attrs = attributes;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);
}
// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...), allowed to start early (above)
// when `early`, else as a plain launch.
template <typename... KernelArgs, typename... Args>
void LaunchOnStreamWithSharedMemory(bool early, void (*kernel)(KernelArgs...), dim3 grid,
                                    dim3 block, size_t shared_bytes, cudaStream_t stream,
                                    Args... args) {
  if (!early) {
    kernel<<<grid, block, shared_bytes, stream>>>(args...);
    return;
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  C10_CUDA_CHECK(
      LaunchWithAttribute(attribute, kernel, grid, block, shared_bytes, stream, args...));
}
// The same without dynamic shared memory.
template <typename... KernelArgs, typename... Args>
void LaunchOnStream(bool early, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                    cudaStream_t stream, Args... args) {
  LaunchOnStreamWithSharedMemory(early, kernel, grid, block, 0, stream, args...);
}

// Whether p may be read and written in 16-byte words (the vectorised paths' precondition).
inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace dysco::kernels::cuda
