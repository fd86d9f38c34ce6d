// The vectorised split-KV attention kernel (decode, and prefill when it is not served by flash
// attention): the same contract and output (the split partials of kernels/cuda/split_attention.cuh,
// merged by paged_attention.cu's MergeSplitsKernel) as the scalar kernel, for head_dim of 4 to 32
// lanes of 16 bytes.
//
// Why another kernel: decode is bound by reading the cache once (docs/gpu.md "Measured: the ops"),
// and the scalar kernel reached 2.5x that floor at 128K keys because of how it reads: QK^T with one
// lane per key (each lane walks its own 256-byte row), PV with 2-byte loads over head_dim, and the
// values read only after the tile's softmax. Here every load is 16 bytes and coalesced: a row of
// head_dim is read by kLanesPerRow lanes (16 for bf16 x 128), a warp reads 32 / kLanesPerRow rows
// per instruction, and each lane issues the K and V loads of kUnroll keys before using any of them
// (V no longer waits for the softmax), so about 4 KiB per warp are in flight. QK^T is a partial dot
// product per lane added over the row's lanes by xor-shuffles (every lane of a row ends with the
// same bits: each step adds the same two values); the softmax state is per lane group, combined
// over the warp's groups and then over the block's warps at the end. No shared memory in the loop.
//
// Thread-safety: stateless. Ownership: writes only p.partial.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/split_attention.cuh"

namespace dysco::kernels {
namespace {

using cuda::kWarpSize;

// Keys per lane group per loop iteration whose K and V loads are issued together.
constexpr int kUnroll = 4;

// 16 bytes of T as floats.
template <typename T>  // bf16 and fp16
struct Vec16 {
  static constexpr int kSize = 8;
  __device__ static void ToFloats(const uint4& raw, float (&dst)[kSize]) {
    cuda::UnpackEight(raw, T(), dst);
  }
};
template <>
struct Vec16<float> {
  static constexpr int kSize = 4;
  __device__ static void ToFloats(const uint4& raw, float (&dst)[kSize]) {
    dst[0] = __uint_as_float(raw.x), dst[1] = __uint_as_float(raw.y);
    dst[2] = __uint_as_float(raw.z), dst[3] = __uint_as_float(raw.w);
  }
};

__device__ __forceinline__ uint4 Load16(const void* src) {
  return __ldg(reinterpret_cast<const uint4*>(src));
}

// Grid: x = query token, y = split, z = KV head * row_chunks + chunk. Block: kAttentionThreads.
// head_dim == kLanesPerRow * Vec16<T>::kSize.
template <typename T, int kRows, int kLanesPerRow>
__global__ void __launch_bounds__(kAttentionThreads)
    VectorSplitAttentionKernel(const AttentionParams<T> p) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kHeadDim = kLanesPerRow * kVec;
  constexpr int kGroups = kWarpSize / kLanesPerRow;  // rows a warp reads per load instruction
  constexpr int kWarpKeys = kGroups * kUnroll;       // keys a warp takes per iteration
  const int64_t token = blockIdx.x;
  const int split = blockIdx.y;
  const int kv_head = blockIdx.z / p.row_chunks;
  const int head0 = kv_head * p.group + (blockIdx.z % p.row_chunks) * kRows;
  const int rows = min(kRows, kv_head * p.group + p.group - head0);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int group = lane / kLanesPerRow;  // which of the warp's rows this lane reads
  const int part = lane % kLanesPerRow;   // which 16 bytes of the row
  const int kv_heads = p.num_heads / p.group;
  const int64_t token_stride = static_cast<int64_t>(kv_heads) * kHeadDim;
  const int64_t page_stride = p.page_size * token_stride;
  const int page_size = static_cast<int>(p.page_size);

  int64_t b = 0;
  int64_t limit = 0;
  TokenSequence(p, token, &b, &limit);
  int64_t key_begin = 0;
  int64_t key_end = 0;
  SplitKeys(p, limit, split, &key_begin, &key_end);

  // This lane's 16 bytes of each query row, scaled.
  float q[kRows][kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r < rows) {
      const T* row = p.query + (token * p.num_heads + head0 + r) * kHeadDim + part * kVec;
      Vec16<T>::ToFloats(Load16(row), q[r]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[r][e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[r][e] = 0.0f;
    }
  }

  // Softmax state of this lane group's keys (uniform over the group's lanes); acc over this lane's
  // 16 bytes of head_dim.
  float m[kRows];
  float l[kRows];
  float acc[kRows][kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[r][e] = 0.0f;
  }

  const int32_t* pages = p.tables + b * p.max_pages;
  const float* bias = p.bias == nullptr ? nullptr : p.bias + b * p.bias_width;
  const int64_t lane_offset = static_cast<int64_t>(kv_head) * kHeadDim + part * kVec;
  // One iteration's loads: kUnroll keys of this lane group (16 bytes of K and V each).
  struct Stage {
    uint4 k[kUnroll];
    uint4 v[kUnroll];
    float bias[kUnroll];
  };
  auto load = [&](int64_t base, Stage& st) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kGroups + group;
      if (j < key_end) {
        const int jj = static_cast<int>(j);  // keys < 2^31 (checked at launch)
        const int page_index = jj / page_size;
        const int64_t page = cuda::Clamp(pages[page_index], 0, p.num_pages - 1);
        const int64_t offset =
            page * page_stride + (jj - page_index * page_size) * token_stride + lane_offset;
        st.k[u] = Load16(p.k_cache + offset);
        st.v[u] = Load16(p.v_cache + offset);
        st.bias[u] = bias == nullptr ? 0.0f : bias[j];
      } else {
        st.k[u] = make_uint4(0, 0, 0, 0);
        st.v[u] = make_uint4(0, 0, 0, 0);
        st.bias[u] = -INFINITY;
      }
    }
  };
  auto consume = [&](const Stage& st) {
    float s[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[kVec];
      Vec16<T>::ToFloats(st.k[u], k);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += q[r][e] * k[e];
        s[u][r] = dot;
      }
    }
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[u][r] += __shfl_xor_sync(0xffffffffu, s[u][r], offset);
      }
    }
    float v[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) Vec16<T>::ToFloats(st.v[u], v[u]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        s[u][r] += st.bias[u];  // -inf past key_end
        tile_max = fmaxf(tile_max, s[u][r]);
      }
      if (tile_max == -INFINITY) continue;  // uniform over the lane group
      const float m_new = fmaxf(m[r], tile_max);
      const float correction = expf(m[r] - m_new);  // 0 while m is -inf
      l[r] *= correction;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[r][e] *= correction;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float weight = expf(s[u][r] - m_new);  // 0 for a masked key
        l[r] += weight;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r][e] += weight * v[u][e];
      }
      m[r] = m_new;
    }
  };
  // Two stages in registers: the next iteration's loads are issued before this one's arithmetic,
  // so a warp keeps about 2 x kUnroll x 32 bytes per lane in flight while it computes.
  const int64_t step = static_cast<int64_t>(kAttentionWarps) * kWarpKeys;
  int64_t base = key_begin + warp * kWarpKeys;
  Stage a;
  Stage b_stage;
  if (base < key_end) load(base, a);
  while (base < key_end) {
    if (base + step < key_end) load(base + step, b_stage);
    consume(a);
    base += step;
    if (base >= key_end) break;
    if (base + step < key_end) load(base + step, a);
    consume(b_stage);
    base += step;
  }

  // Combine the warp's lane groups (xor over the group bits of the lane id).
#pragma unroll
  for (int offset = kLanesPerRow; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[r], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[r], offset);
      const float m_new = fmaxf(m[r], m_other);
      const float mine = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
      const float theirs = m_other == -INFINITY ? 0.0f : expf(m_other - m_new);
      l[r] = l[r] * mine + l_other * theirs;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float a_other = __shfl_xor_sync(0xffffffffu, acc[r][e], offset);
        acc[r][e] = acc[r][e] * mine + a_other * theirs;
      }
      m[r] = m_new;
    }
  }

  // Combine the warps in shared memory; warp w writes row w (and w + warps, ...) of the partials.
  __shared__ float s_m[kAttentionWarps][kRows];
  __shared__ float s_l[kAttentionWarps][kRows];
  __shared__ float s_acc[kAttentionWarps][kRows][kHeadDim];
  if (group == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (part == 0) {
        s_m[warp][r] = m[r];
        s_l[warp][r] = l[r];
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) s_acc[warp][r][part * kVec + e] = acc[r][e];
    }
  }
  __syncthreads();
  WriteSplitPartials(p, token, split, head0, rows, kRows, kHeadDim, &s_m[0][0], &s_l[0][0],
                     &s_acc[0][0][0]);
}

// attention_probs' logits pass, vectorised as the split kernel: lane groups of kLanesPerRow read a
// key row with 16-byte loads, kUnroll rows per group in flight. Grid: x = block of
// kProbsKeysPerBlock keys, y = probed head, z = sequence. Block: kAttentionThreads.
template <typename T, int kLanesPerRow>
__global__ void __launch_bounds__(kAttentionThreads)
    VectorProbsLogitsKernel(const ProbsLogitsParams<T> p) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kHeadDim = kLanesPerRow * kVec;
  constexpr int kGroups = kWarpSize / kLanesPerRow;
  constexpr int kWarpKeys = kGroups * kUnroll;
  const int64_t b = blockIdx.z;
  const int probe = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int group = lane / kLanesPerRow;
  const int part = lane % kLanesPerRow;
  const int head = static_cast<int>(cuda::Clamp(p.heads[probe], 0, p.num_heads - 1));
  const int kv_head = head / p.group;
  const int64_t token_stride = static_cast<int64_t>(p.num_heads / p.group) * kHeadDim;
  const int page_size = static_cast<int>(p.page_size);
  int64_t len = min(cuda::Clamp(p.seq_lens[b], 0, p.max_pages * p.page_size), p.out_len);
  if (p.bias != nullptr) len = min(len, p.bias_width);
  float q[kVec];
  Vec16<T>::ToFloats(Load16(p.query + (b * p.num_heads + head) * kHeadDim + part * kVec), q);
#pragma unroll
  for (int e = 0; e < kVec; ++e) q[e] *= p.scale;
  const int32_t* pages = p.tables + b * p.max_pages;
  float* row = p.out + (b * p.num_probe + probe) * p.out_len;
  const int64_t lane_offset = static_cast<int64_t>(kv_head) * kHeadDim + part * kVec;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.keys_per_block;
  const int64_t end = min(len, begin + p.keys_per_block);
  for (int64_t base = begin + warp * kWarpKeys; base < end; base += kAttentionWarps * kWarpKeys) {
    uint4 k_raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kGroups + group;
      if (j < end) {
        const int jj = static_cast<int>(j);
        const int page_index = jj / page_size;
        const int64_t page = cuda::Clamp(pages[page_index], 0, p.num_pages - 1);
        k_raw[u] = Load16(p.k_cache + page * page_size * token_stride +
                          (jj - page_index * page_size) * token_stride + lane_offset);
      } else {
        k_raw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[kVec];
      Vec16<T>::ToFloats(k_raw[u], k);
      s[u] = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) s[u] += q[e] * k[e];
    }
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], offset);
    }
    if (part == 0) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = base + u * kGroups + group;
        if (j < end) row[j] = s[u] + (p.bias == nullptr ? 0.0f : p.bias[b * p.bias_width + j]);
      }
    }
  }
}

template <typename T, int kLanesPerRow>
void LaunchProbs(const ProbsLogitsParams<T>& p, dim3 grid, cudaStream_t stream) {
  VectorProbsLogitsKernel<T, kLanesPerRow><<<grid, kAttentionThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kRows, int kLanesPerRow>
void Launch(const AttentionParams<T>& p, int64_t tokens, int kv_heads, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(kv_heads * p.row_chunks));
  VectorSplitAttentionKernel<T, kRows, kLanesPerRow><<<grid, kAttentionThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kRows, int kLanesPerRow>
int Occupancy() {
  // Per device and instantiation; the device is fixed for a process in practice, so one cached
  // value per instantiation (cudaOccupancy* is a host query, not a stream operation).
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, VectorSplitAttentionKernel<T, kRows, kLanesPerRow>, kAttentionThreads, 0));
    return n;
  }();
  return blocks;
}

// Calls f(std::integral_constant<int, kRows>, std::integral_constant<int, kLanesPerRow>) for the
// call's instantiation and returns true, or returns false when there is none.
template <typename T, typename F>
bool Dispatch(const AttentionParams<T>& p, int rows, F&& f) {
  if (p.head_dim % Vec16<T>::kSize != 0) return false;
  if (p.max_pages * p.page_size > (int64_t{1} << 31) - 1) return false;  // int key indices
  auto lanes = [&](auto kr) {
    switch (p.head_dim / Vec16<T>::kSize) {
      case 4:
        f(kr, std::integral_constant<int, 4>());
        return true;
      case 8:
        f(kr, std::integral_constant<int, 8>());
        return true;
      case 16:
        f(kr, std::integral_constant<int, 16>());
        return true;
      case 32:
        f(kr, std::integral_constant<int, 32>());
        return true;
      default:
        return false;
    }
  };
  return rows == 1 ? lanes(std::integral_constant<int, 1>())
                   : lanes(std::integral_constant<int, 4>());
}

}  // namespace

template <typename T>
int VectorSplitAttentionOccupancy(const AttentionParams<T>& p, int rows) {
  int blocks = 0;
  Dispatch(p, rows, [&](auto kr, auto kl) {
    blocks = Occupancy<T, decltype(kr)::value, decltype(kl)::value>();
  });
  return blocks;
}

template <typename T>
void LaunchVectorSplitAttention(const AttentionParams<T>& p, int64_t tokens, int kv_heads, int rows,
                                cudaStream_t stream) {
  const bool launched = Dispatch(p, rows, [&](auto kr, auto kl) {
    Launch<T, decltype(kr)::value, decltype(kl)::value>(p, tokens, kv_heads, stream);
  });
  TORCH_CHECK(launched, "vectorised split attention called for head_dim ", p.head_dim);
}

template int VectorSplitAttentionOccupancy<float>(const AttentionParams<float>&, int);
template int VectorSplitAttentionOccupancy<c10::BFloat16>(const AttentionParams<c10::BFloat16>&,
                                                          int);
template int VectorSplitAttentionOccupancy<c10::Half>(const AttentionParams<c10::Half>&, int);
template void LaunchVectorSplitAttention<float>(const AttentionParams<float>&, int64_t, int, int,
                                                cudaStream_t);
template void LaunchVectorSplitAttention<c10::BFloat16>(const AttentionParams<c10::BFloat16>&,
                                                        int64_t, int, int, cudaStream_t);
template void LaunchVectorSplitAttention<c10::Half>(const AttentionParams<c10::Half>&, int64_t, int,
                                                    int, cudaStream_t);

int64_t SplitWaves() { return cuda::EnvInt("DYSCO_CUDA_SPLIT_WAVES", 1, 64).value_or(1); }

template <typename T>
bool LaunchVectorProbsLogits(const ProbsLogitsParams<T>& p, dim3 grid, cudaStream_t stream) {
  if (p.head_dim % Vec16<T>::kSize != 0) return false;
  if (p.max_pages * p.page_size > (int64_t{1} << 31) - 1) return false;
  switch (p.head_dim / Vec16<T>::kSize) {
    case 4:
      LaunchProbs<T, 4>(p, grid, stream);
      return true;
    case 8:
      LaunchProbs<T, 8>(p, grid, stream);
      return true;
    case 16:
      LaunchProbs<T, 16>(p, grid, stream);
      return true;
    case 32:
      LaunchProbs<T, 32>(p, grid, stream);
      return true;
    default:
      return false;
  }
}

template bool LaunchVectorProbsLogits<float>(const ProbsLogitsParams<float>&, dim3, cudaStream_t);
template bool LaunchVectorProbsLogits<c10::BFloat16>(const ProbsLogitsParams<c10::BFloat16>&, dim3,
                                                     cudaStream_t);
template bool LaunchVectorProbsLogits<c10::Half>(const ProbsLogitsParams<c10::Half>&, dim3,
                                                 cudaStream_t);

AttentionKernel AttentionKernelChoice() {
  if (cuda::EnvIs("DYSCO_CUDA_ATTENTION_KERNEL", "scalar")) return AttentionKernel::kScalar;
  if (cuda::EnvIs("DYSCO_CUDA_ATTENTION_KERNEL", "vector")) return AttentionKernel::kVector;
  return AttentionKernel::kMma;
}

}  // namespace dysco::kernels
