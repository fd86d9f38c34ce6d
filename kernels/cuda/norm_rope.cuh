// The per-element and per-head steps of the model's norms and ropes on the GPU, shared by the
// kernels that must round exactly alike: norm_rope.cu's norm, rope and qk_norm_rope_kv_write
// kernels and the tensor-core decode attention that makes its own query rows from the fused q/k/v
// projection (split_attention_mma.cu, qk_norm_rope_attention_decode). Rounding follows the ATen
// chain (docs/gpu.md "Element-wise kernels").
//
// Thread-safety: device functions without state. Ownership: none.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"

namespace dysco::kernels {

// One element of the model's rms_norm: x * inv rounded to the dtype, then times the weight and
// rounded again (transformers' order). Every norm kernel here computes it so, which keeps them
// equal to each other and to the CPU op.
template <typename T>
__device__ __forceinline__ T NormedElement(T x, T w, float inv) {
  using C = cuda::Convert<T>;
  const float normalised = C::ToFloat(C::FromFloat(C::ToFloat(x) * inv));
  return C::FromFloat(C::ToFloat(w) * normalised);
}

// rsqrt(mean(x^2) + eps) of a row of d elements from each lane's sum of its squares (the warp's
// shuffle sum, then the mean): the last step of WarpInvRms and WarpNormRopeHeadInRegisters.
__device__ __forceinline__ float InvRmsOfLaneSums(float lane_sum, int64_t d, float eps) {
  return rsqrtf(cuda::WarpSum(lane_sum) / static_cast<float>(d) + eps);
}

// rsqrt(mean(x^2) + eps) of the row x[0, d), summed by one warp: lane-strided squares in fp32, then
// the shuffle sum (the per-row warp kernels share it, so that they normalise alike).
template <typename T>
__device__ __forceinline__ float WarpInvRms(const T* x, int64_t d, int lane, float eps) {
  using C = cuda::Convert<T>;
  float sum = 0.0f;
  for (int64_t j = lane; j < d; j += cuda::kWarpSize) {
    const float v = C::ToFloat(x[j]);
    sum += v * v;
  }
  return InvRmsOfLaneSums(sum, d, eps);
}

// One output of the rope, a c + b s: each product rounded to the dtype on its own, then the sum
// (RotatePair's two outputs, below, and WarpNormRopeHeadInRegisters'). c and s by reference: the
// loads stay where the callers' expressions put them (RotatePair's SASS unchanged).
template <typename T>
__device__ __forceinline__ T RopeElement(float a, const T& c, float b, const T& s) {
  using C = cuda::Convert<T>;
  auto product = [](float x, float y) { return C::ToFloat(C::FromFloat(__fmul_rn(x, y))); };
  return C::FromFloat(__fadd_rn(product(a, C::ToFloat(c)), product(b, C::ToFloat(s))));
}
// The rope of the pair (lo, hi) = (x[j], x[j + half]) into y[j] and y[j + half], with c and s the
// token's cos and sin rows: each product rounded on its own (__fmul_rn: no fused multiply-add,
// also in fp32), then the sum, as ATen's separate kernels do, so that the CPU op equals that chain
// exactly and this equals the CPU op.
template <typename T>
__device__ __forceinline__ void RotatePair(float lo, float hi, const T* c, const T* s, int64_t j,
                                           int64_t half, T* y) {
  y[j] = RopeElement(lo, c[j], -hi, s[j]);
  y[j + half] = RopeElement(hi, c[j + half], lo, s[j + half]);
}

// One head of qk_norm_rope_kv_write, by one warp: x[0, d) normed per head with w (when given:
// WarpInvRms and NormedElement, as the norm kernels), then rotated with the token's cos and sin
// rows (RotatePair, as the rope kernel), into y[0, d) (global or shared memory). Every caller
// computes a head so, which keeps them equal bit for bit.
template <typename T>
__device__ __forceinline__ void WarpNormRopeHead(const T* x, const T* w, const T* cos_row,
                                                 const T* sin_row, int64_t d, int lane, float eps,
                                                 T* y) {
  using C = cuda::Convert<T>;
  const float inv = w != nullptr ? WarpInvRms(x, d, lane, eps) : 1.0f;
  // Element i of the rope's input: the normed value rounded to the dtype (what rms_norm stores).
  auto input = [&](int64_t i) {
    return C::ToFloat(w == nullptr ? x[i] : NormedElement(x[i], w[i], inv));
  };
  const int64_t half = d / 2;
  for (int64_t i = lane; i < half; i += cuda::kWarpSize) {
    RotatePair(input(i), input(i + half), cos_row, sin_row, i, half, y);
  }
}

// WarpNormRopeHead for D = 32 kM (kM even: 2, 4, 8), with everything a lane reads loaded into
// registers first: its elements lane + 32 k of x, w and the token's cos and sin rows (k < kM), so
// that a lane has 4 kM independent loads in flight instead of a chain of dependent ones (a prefill
// chunk runs ~300K such warps: qk_norm_rope_kv_write's default). Element
// lane + 32 k pairs with lane + 32 (k + kM / 2), in the same lane. The arithmetic is
// WarpNormRopeHead's, in its order: the squares summed over k ascending (WarpInvRms's loop), then
// the same helpers (InvRmsOfLaneSums, NormedElement, RopeElement); so the same bits.
template <typename T, int kM>
__device__ __forceinline__ void WarpNormRopeHeadInRegisters(const T* x, const T* w,
                                                            const T* cos_row, const T* sin_row,
                                                            int lane, float eps, T* y) {
  static_assert(kM >= 2 && kM % 2 == 0, "D = 32 kM with kM even");
  using C = cuda::Convert<T>;
  constexpr int kD = kM * cuda::kWarpSize;
  constexpr int kHalf = kD / 2;
  T xv[kM], wv[kM], cv[kM], sv[kM];
#pragma unroll
  for (int k = 0; k < kM; ++k) {
    const int j = lane + k * cuda::kWarpSize;
    xv[k] = x[j];
    if (w != nullptr) wv[k] = w[j];
    cv[k] = cos_row[j];
    sv[k] = sin_row[j];
  }
  float inv = 1.0f;
  if (w != nullptr) {
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kM; ++k) {
      const float v = C::ToFloat(xv[k]);
      sum += v * v;
    }
    inv = InvRmsOfLaneSums(sum, kD, eps);
  }
  float in[kM];
#pragma unroll
  for (int k = 0; k < kM; ++k) {
    in[k] = C::ToFloat(w == nullptr ? xv[k] : NormedElement(xv[k], wv[k], inv));
  }
#pragma unroll
  for (int k = 0; k < kM / 2; ++k) {
    const int j = lane + k * cuda::kWarpSize;
    const float lo = in[k];
    const float hi = in[k + kM / 2];
    y[j] = RopeElement(lo, cv[k], -hi, sv[k]);
    y[j + kHalf] = RopeElement(hi, cv[k + kM / 2], lo, sv[k + kM / 2]);
  }
}

}  // namespace dysco::kernels
