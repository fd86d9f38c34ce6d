// CUDA DySCO ops (docs/dysco.md "Ops"): dysco_relevance_update, dysco_select_bias,
// dysco_bias_from_selection and dysco_template_mask. Semantics: kernels/ops.h, the same as
// kernels/cpu/dysco_relevance.cpp and kernels/cpu/dysco_select.cpp.
//
// Selection without a sort and without a host synchronisation: every entry gets the CPU's 64-bit
// sort key (relevance descending, then position ascending: a total order, so ties are broken the
// same way), and a radix select over that key (8 passes of 8 bits, one block per row) finds
//   - top_p: the entry whose running sum first exceeds top_p (per-bucket masses in float64), i.e.
//     the nucleus size m_p = max(rank of that entry, 1), or n when no entry crosses;
//   - then the entry of rank m - 1, m = min(m_p, top_k) (or min(top_k, n) for top-k alone);
// and the row keeps the keys <= that entry's key. The float64 nucleus sum is added per bucket here
// and entry by entry on the CPU, so the two can differ only when a prefix sum lies within float64
// rounding (~1e-16 relative) of top_p.
//
// Speed work left (docs/gpu.md): one block per row (a batch of 1 uses one multiprocessor); a
// multi-block radix pass would spread a 128K-key row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/dysco_constants.h"
#include "kernels/op_checks.h"

namespace dysco::kernels {
namespace {

using cuda::Clamp;

constexpr int kRowThreads = 256;
// Keys per block of the element-wise row kernels (relevance, bias).
constexpr int64_t kKeysPerBlock = 4096;
constexpr int kSelectThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kRadixBuckets = 1 << kRadixBits;

// ---- dysco_relevance_update. Pass 1 writes the unnormalised a (in place: a[j] reads only
// r_{t-1}[j]) and each block's float64 partial sum; pass 2 adds the row's partials in block order
// and divides. The float arithmetic of a is the CPU's, operation by operation (no FMA contraction):
// heads summed in order, times 1/H, plus decay * r.
__global__ void __launch_bounds__(kRowThreads)
    RelevanceAccumulateKernel(float* relevance, const float* probs, const int64_t* num_keys,
                              const float* decay, double* partial, int64_t width, int64_t probs_len,
                              int num_heads, float inv_heads) {
  __shared__ double shared[kRowThreads / cuda::kWarpSize];
  const int64_t b = blockIdx.y;
  const int64_t n = Clamp(num_keys[b], 0, min(width, probs_len));
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kKeysPerBlock;
  const int64_t hi = min(width, lo + kKeysPerBlock);
  const float d = decay[b];
  float* row = relevance + b * width;
  const float* p = probs + b * num_heads * probs_len;
  double sum = 0.0;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    if (j >= n) {
      row[j] = 0.0f;
      continue;
    }
    float mean = p[j];
    for (int h = 1; h < num_heads; ++h) mean = __fadd_rn(mean, p[h * probs_len + j]);
    float a = __fmul_rn(mean, inv_heads);
    if (j < n - 1) a = __fadd_rn(a, __fmul_rn(d, row[j]));
    row[j] = a;
    sum += a;
  }
  sum = cuda::BlockReduce(sum, shared, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kRowThreads)
    RelevanceNormaliseKernel(float* relevance, const int64_t* num_keys, const double* partial,
                             int64_t width, int64_t probs_len) {
  const int64_t b = blockIdx.y;
  const int64_t n = Clamp(num_keys[b], 0, min(width, probs_len));
  double total = 0.0;
  for (unsigned c = 0; c < gridDim.x; ++c) total += partial[b * gridDim.x + c];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kKeysPerBlock;
  const int64_t hi = min(n, lo + kKeysPerBlock);
  float* row = relevance + b * width;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    // A zero sum (all probabilities and previous relevance zero) leaves no distribution.
    row[j] = total > 0.0 ? static_cast<float>(static_cast<double>(row[j]) / total) : 0.0f;
  }
}

// ---- the bias of one entry (kernels/ops.h, dysco_bias_from_selection).
__device__ __forceinline__ float BiasAt(int64_t j, int64_t n, bool selected, bool in_template,
                                        bool hard, float boost) {
  if (j >= n) return 0.0f;
  if (hard) return selected || j == n - 1 ? 0.0f : -INFINITY;
  return (selected && !in_template) || j == n - 1 ? boost : 0.0f;
}

struct Strength {
  bool hard;
  float boost;
};

__device__ __forceinline__ Strength ReadStrength(float strength) {
  // Hard sparse attention from kHardMaskStrength (kernels/dysco_constants.h) up; the soft boost is
  // log(strength) in float64, rounded to float, as on the CPU.
  const double s = strength;
  return {s >= kHardMaskStrength, static_cast<float>(log(s))};
}

// ---- dysco_select_bias: one block per row.

// State of a radix select, in shared memory.
struct RadixState {
  unsigned int count[kRadixBuckets];
  double mass[kRadixBuckets];
  uint64_t prefix;    // the high digits chosen so far (the whole key once found)
  int64_t above;      // entries whose key is below the chosen prefix range (ranked before it)
  double above_mass;  // their relevance, float64
  int found;          // mass search: 1 when some entry's running sum crosses the threshold
  int unique;         // the chosen bucket holds one entry: the key is found by one more scan
};

// Finds, among the keys of row[0, n), either (by_mass) the first key in ascending order at which
// the running sum of relevance exceeds threshold, or (!by_mass) the key of the given rank. Leaves
// it in st.prefix, the number of keys below it in st.above, and st.found = 0 when by_mass finds no
// crossing. Every thread of the block must call it.
//
// Why warp aggregation: relevance values share their high bits, so early passes send most entries
// to one or two buckets; lanes with the same digit add up their count and mass first, and one lane
// per digit does the shared-memory atomics. Once the chosen bucket holds a single entry (usually
// after the 32 relevance bits, ties aside), one scan finds it instead of the remaining passes.
__device__ void RadixSelect(const float* row, int64_t n, bool by_mass, double threshold,
                            int64_t rank, RadixState& st) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  if (threadIdx.x == 0) {
    st.prefix = 0;
    st.above = 0;
    st.above_mass = 0.0;
    st.found = 1;
    st.unique = 0;
  }
  uint64_t mask = 0;
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBuckets; i += blockDim.x) {
      st.count[i] = 0;
      st.mass[i] = 0.0;
    }
    __syncthreads();
    const uint64_t prefix = st.prefix;
    // Whole warps step together (the aggregation below needs every lane).
    for (int64_t base = threadIdx.x - lane; base < n; base += blockDim.x) {
      const int64_t j = base + lane;
      int digit = -1;
      double value = 0.0;
      if (j < n) {
        const float v = row[j];
        const uint64_t key = cuda::SortKey(v, j);
        if ((key & mask) == prefix) {
          digit = static_cast<int>((key >> shift) & (kRadixBuckets - 1));
          value = v;
        }
      }
      // Past the first passes almost no entry matches the prefix: a warp with none skips the
      // aggregation (the condition is warp-uniform, so every lane skips together).
      if (!__any_sync(0xffffffffu, digit >= 0)) continue;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (by_mass) {
        if (peers == 0xffffffffu) {
          // One digit for the whole warp (the first passes: relevance values share their high
          // bits): a butterfly sum, 5 steps instead of 32.
#pragma unroll
          for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
            value += __shfl_xor_sync(0xffffffffu, value, offset);
          }
        } else if (!__all_sync(0xffffffffu, peers == (1u << lane))) {
          double sum = 0.0;
          for (int src = 0; src < cuda::kWarpSize; ++src) {
            const double x = __shfl_sync(0xffffffffu, value, src);
            if ((peers >> src) & 1u) sum += x;
          }
          value = sum;
        }
      }
      if (digit >= 0 && lane == __ffs(peers) - 1) {
        atomicAdd(&st.count[digit], static_cast<unsigned>(__popc(peers)));
        if (by_mass) atomicAdd(&st.mass[digit], value);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1;
      int last = -1;  // last non-empty bucket, with the state before it
      int64_t last_above = 0;
      double last_mass = 0.0;
      for (int d = 0; d < kRadixBuckets; ++d) {
        if (st.count[d] == 0) continue;
        const bool here = by_mass ? st.above_mass + st.mass[d] > threshold
                                  : st.above + static_cast<int64_t>(st.count[d]) > rank;
        if (here) {
          chosen = d;
          break;
        }
        last = d;
        last_above = st.above;
        last_mass = st.above_mass;
        st.above += st.count[d];
        st.above_mass += st.mass[d];
      }
      if (chosen < 0) {
        if (by_mass && shift == 64 - kRadixBits) {
          st.found = 0;  // the whole row's mass stays <= threshold
        } else {
          // Only float64 rounding of the bucket sums (or a rank out of range) gets here: descend
          // into the last non-empty bucket.
          chosen = last;
          st.above = last_above;
          st.above_mass = last_mass;
        }
      }
      if (chosen >= 0) {
        st.prefix |= static_cast<uint64_t>(chosen) << shift;
        st.unique = st.count[chosen] == 1;
      }
    }
    __syncthreads();
    if (st.found == 0) return;
    mask |= static_cast<uint64_t>(kRadixBuckets - 1) << shift;
    if (st.unique) {
      const uint64_t unique_prefix = st.prefix;
      __syncthreads();  // every thread has read st.prefix before its owner rewrites it
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const uint64_t key = cuda::SortKey(row[j], j);
        if ((key & mask) == unique_prefix) st.prefix = key;
      }
      __syncthreads();
      return;
    }
  }
}

__global__ void __launch_bounds__(kSelectThreads)
    SelectBiasKernel(float* bias, bool* selected, float* stats, const float* relevance,
                     const int64_t* num_keys, const bool* template_mask, const float* top_p,
                     const int64_t* top_k, const float* strength, int64_t width) {
  __shared__ RadixState st;
  __shared__ double reduce[kSelectThreads / cuda::kWarpSize];
  const int64_t b = blockIdx.x;
  const int64_t n = Clamp(num_keys[b], 0, width);
  const float* row = relevance + b * width;
  const float p = top_p[b];
  const int64_t k = top_k[b];

  // m: the number of entries selected (kernels/ops.h): the top_p prefix, capped by top_k. The
  // selected entries are those whose key is <= threshold.
  int64_t m = 0;
  uint64_t threshold = 0;
  bool known = false;  // threshold already known from the nucleus search
  if (n > 0) {
    const int64_t limit = k <= 0 ? n : min(k, n);
    if (p > 0.0f) {
      RadixSelect(row, n, /*by_mass=*/true, static_cast<double>(p), 0, st);
      const int64_t nucleus = st.found ? (st.above > 1 ? st.above : 1) : n;
      m = min(nucleus, limit);
      if (st.found && m == nucleus) {
        // The entries before the crossing one (keys are distinct integers), or that entry alone
        // when it is the first.
        threshold = st.above >= 1 ? st.prefix - 1 : st.prefix;
        known = true;
      }
    } else {
      m = k <= 0 ? 0 : limit;  // neither set: rejected on the CPU; selects nothing here
    }
  }
  const bool all = m >= n;
  if (m > 0 && !all && !known) {
    __syncthreads();
    RadixSelect(row, n, /*by_mass=*/false, 0.0, m - 1, st);
    threshold = st.prefix;
  }
  const Strength s = ReadStrength(strength[b]);
  double mass = 0.0;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    bool sel = false;
    if (j < n && m > 0) {
      const float value = row[j];
      sel = all || cuda::SortKey(value, j) <= threshold;
      if (sel) mass += value;
    }
    selected[b * width + j] = sel;
    bias[b * width + j] = BiasAt(j, n, sel, template_mask[b * width + j], s.hard, s.boost);
  }
  mass = cuda::BlockReduce(mass, reduce, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) {
    stats[2 * b] = static_cast<float>(m);
    stats[2 * b + 1] = static_cast<float>(mass);
  }
}

// ---- dysco_bias_from_selection: element-wise.
__global__ void __launch_bounds__(kRowThreads)
    BiasFromSelectionKernel(float* bias, const bool* selected, const int64_t* num_keys,
                            const bool* template_mask, const float* strength, int64_t width) {
  const int64_t b = blockIdx.y;
  const int64_t n = Clamp(num_keys[b], 0, width);
  const Strength s = ReadStrength(strength[b]);
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kKeysPerBlock;
  const int64_t hi = min(width, lo + kKeysPerBlock);
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const int64_t i = b * width + j;
    bias[i] = BiasAt(j, n, selected[i], template_mask[i], s.hard, s.boost);
  }
}

// ---- dysco_template_mask: mask was zeroed; each position marks the occurrences starting there
// (threads writing the same `true` to overlapping occurrences is harmless).
__global__ void __launch_bounds__(kRowThreads)
    TemplateMaskKernel(bool* mask, const int64_t* tokens, int64_t length, const int64_t* sequences,
                       int64_t total, const int64_t* offsets, int64_t num_sequences) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= length) return;
  int64_t longest = 0;
  for (int64_t k = 0; k < num_sequences; ++k) {
    const int64_t begin = Clamp(offsets[k], 0, total);
    const int64_t end = Clamp(offsets[k + 1], begin, total);
    const int64_t len = end - begin;
    if (len == 0 || len <= longest || i + len > length) continue;
    bool match = true;
    for (int64_t t = 0; t < len && match; ++t) match = tokens[i + t] == sequences[begin + t];
    if (match) longest = len;
  }
  for (int64_t t = 0; t < longest; ++t) mask[i + t] = true;
}

void CheckCuda(const char* op, const at::Tensor& out) {
  TORCH_CHECK(out.is_cuda(), op, ": the CUDA implementation got tensors on ", out.device());
}

unsigned Blocks(int64_t width) {
  return static_cast<unsigned>(std::max<int64_t>(1, cuda::CeilDiv(width, kKeysPerBlock)));
}

}  // namespace

void dysco_relevance_update_cuda(const at::Tensor& relevance, const at::Tensor& probs,
                                 const at::Tensor& num_keys, const at::Tensor& decay) {
  CheckDyscoRelevanceUpdateArgs(relevance, probs, num_keys, decay);
  CheckCuda(kDyscoRelevanceUpdateOp, relevance);
  if (relevance.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(relevance.device());
  const int64_t batch = relevance.size(0);
  const int64_t width = relevance.size(1);
  const int num_heads = static_cast<int>(probs.size(1));
  const dim3 grid(Blocks(width), static_cast<unsigned>(batch));
  at::Tensor partial =
      at::empty({batch, static_cast<int64_t>(grid.x)}, relevance.options().dtype(at::kDouble));
  const cudaStream_t stream = cuda::CurrentStream();
  RelevanceAccumulateKernel<<<grid, kRowThreads, 0, stream>>>(
      relevance.data_ptr<float>(), probs.data_ptr<float>(), num_keys.data_ptr<int64_t>(),
      decay.data_ptr<float>(), partial.data_ptr<double>(), width, probs.size(2), num_heads,
      1.0f / static_cast<float>(num_heads));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  RelevanceNormaliseKernel<<<grid, kRowThreads, 0, stream>>>(
      relevance.data_ptr<float>(), num_keys.data_ptr<int64_t>(), partial.data_ptr<double>(), width,
      probs.size(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dysco_select_bias_cuda(const at::Tensor& bias, const at::Tensor& selected,
                            const at::Tensor& stats, const at::Tensor& relevance,
                            const at::Tensor& num_keys, const at::Tensor& template_mask,
                            const at::Tensor& top_p, const at::Tensor& top_k,
                            const at::Tensor& strength) {
  CheckDyscoSelectBiasArgs(bias, selected, stats, relevance, num_keys, template_mask, top_p, top_k,
                           strength);
  CheckCuda(kDyscoSelectBiasOp, bias);
  const int64_t batch = relevance.size(0);
  const int64_t width = relevance.size(1);
  // Positions live in the sort key's low 32 bits, as on the CPU.
  TORCH_CHECK(width <= 0xffffffffLL, kDyscoSelectBiasOp, ": relevance has ", width,
              " keys per row, more than 2^32 - 1");
  if (relevance.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(bias.device());
  SelectBiasKernel<<<static_cast<unsigned>(batch), kSelectThreads, 0, cuda::CurrentStream()>>>(
      bias.data_ptr<float>(), selected.data_ptr<bool>(), stats.data_ptr<float>(),
      relevance.data_ptr<float>(), num_keys.data_ptr<int64_t>(), template_mask.data_ptr<bool>(),
      top_p.data_ptr<float>(), top_k.data_ptr<int64_t>(), strength.data_ptr<float>(), width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dysco_bias_from_selection_cuda(const at::Tensor& bias, const at::Tensor& selected,
                                    const at::Tensor& num_keys, const at::Tensor& template_mask,
                                    const at::Tensor& strength) {
  CheckDyscoBiasFromSelectionArgs(bias, selected, num_keys, template_mask, strength);
  CheckCuda(kDyscoBiasFromSelectionOp, bias);
  if (bias.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(bias.device());
  const int64_t width = bias.size(1);
  BiasFromSelectionKernel<<<dim3(Blocks(width), static_cast<unsigned>(bias.size(0))), kRowThreads,
                            0, cuda::CurrentStream()>>>(
      bias.data_ptr<float>(), selected.data_ptr<bool>(), num_keys.data_ptr<int64_t>(),
      template_mask.data_ptr<bool>(), strength.data_ptr<float>(), width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dysco_template_mask_cuda(const at::Tensor& mask, const at::Tensor& tokens,
                              const at::Tensor& sequences, const at::Tensor& sequence_offsets) {
  CheckDyscoTemplateMaskArgs(mask, tokens, sequences, sequence_offsets);
  CheckCuda(kDyscoTemplateMaskOp, mask);
  const int64_t length = tokens.size(0);
  if (length == 0) return;
  const c10::cuda::CUDAGuard guard(mask.device());
  const cudaStream_t stream = cuda::CurrentStream();
  C10_CUDA_CHECK(cudaMemsetAsync(mask.data_ptr<bool>(), 0, length, stream));
  TemplateMaskKernel<<<static_cast<unsigned>(cuda::CeilDiv(length, kRowThreads)), kRowThreads, 0,
                       stream>>>(
      mask.data_ptr<bool>(), tokens.data_ptr<int64_t>(), length, sequences.data_ptr<int64_t>(),
      sequences.size(0), sequence_offsets.data_ptr<int64_t>(), sequence_offsets.size(0) - 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dysco::kernels
