// CUDA DySCO ops (docs/dysco.md "Ops"): dysco_relevance_update, dysco_select_bias,
// dysco_bias_from_selection and dysco_template_mask. Semantics: kernels/ops.h, the same as
// kernels/cpu/dysco_relevance.cpp and kernels/cpu/dysco_select.cpp.
//
// Selection without a sort and without a host synchronisation: every entry gets the CPU's 64-bit
// sort key (relevance descending, then position ascending: a total order, so ties are broken the
// same way), and a radix select over that key (up to 8 passes of 8 bits) finds
//   - top_p: the entry whose running sum first exceeds top_p (per-bucket masses in float64), i.e.
//     the nucleus size m_p = max(rank of that entry, 1), or n when no entry crosses;
//   - then the entry of rank m - 1, m = min(m_p, top_k) (or min(top_k, n) for top-k alone);
// and the row keeps the keys <= that entry's key. The float64 nucleus sum is added per bucket here
// and entry by entry on the CPU, so the two can differ only when a prefix sum lies within float64
// rounding (~1e-16 relative) of top_p.
//
// Rows of 8K keys and up are searched by many blocks each, in one cooperative launch whose blocks
// meet after each radix pass (SelectFusedKernel below), or one launch per pass where that does not
// fit (SelectPassKernel); shorter rows by one block. docs/gpu.md "The DySCO selection's passes".
#include <algorithm>
#include <atomic>

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
// Rows of this many keys and more are selected by many blocks (since the twenty-first increment;
// 16384 before): at 8192 keys one 1024-thread block took 0.046 ms a call on the H200 and 16 blocks
// of 512 keys in one cooperative launch 0.029 ms (CudaTiming.DyscoSelectionAtDecodeWidths).
constexpr int64_t kMultiBlockSelectWidth = 8192;

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

// ---- dysco_select_bias: a radix select over the sort keys, by one block per row (short rows) or
// by many blocks per row (long rows: kMultiBlockSelectWidth keys and up).

// Where a radix select stands: the high digits chosen so far and what ranks before them.
struct RadixCursor {
  uint64_t prefix;    // the high digits chosen so far (the whole key once found)
  int64_t above;      // entries whose key is below the chosen prefix range (ranked before it)
  double above_mass;  // their relevance, float64
  int found;          // mass search: 1 when some entry's running sum crosses the threshold
  int unique;         // the chosen bucket holds one entry: the key is found by one more scan
};

__device__ __forceinline__ RadixCursor StartCursor() { return RadixCursor{0, 0, 0.0, 1, 0}; }

// State of a one-block radix select, in shared memory.
struct RadixState {
  unsigned int count[kRadixBuckets];
  double mass[kRadixBuckets];
  RadixCursor cur;
};

// Adds the entries j in [begin, end) of row whose sort key matches `prefix` on `mask` to
// count[digit] (and mass[digit] when by_mass), digit = the key's kRadixBits bits at `shift`, with
// shared-memory atomics. Every thread of the block calls it; whole warps step together.
//
// Why warp aggregation: relevance values share their high bits, so early passes send most entries
// to one or two buckets, and a float64 atomic on shared memory is a compare-and-swap loop
// (ATOMS.CAST.SPIN.64 on sm_90) that every warp of the block would spin on for the same bucket.
// So a warp whose lanes all have one digit keeps that digit's count, and each lane its mass, in
// registers while the next steps bring the same digit (a run), and adds them once the digit changes
// or the range ends; lanes of mixed digits add up each digit's count and mass first (over the
// largest group's size in shuffles), and one lane per digit does the atomics.
__device__ void AccumulateDigits(const float* row, int64_t begin, int64_t end, uint64_t prefix,
                                 uint64_t mask, int shift, bool by_mass, unsigned* count,
                                 double* mass) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x % cuda::kWarpSize;
  int run_digit = -1;      // warp-uniform: the digit of the current run (-1: none)
  unsigned run_count = 0;  // warp-uniform: its entries
  double run_mass = 0.0;   // this lane's part of its mass
  // Adds the run to the histogram (warp-uniform call).
  auto end_run = [&] {
    if (run_digit < 0) return;
    if (by_mass) {
#pragma unroll
      for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
        run_mass += __shfl_xor_sync(kAll, run_mass, offset);
      }
    }
    if (lane == 0) {
      atomicAdd(&count[run_digit], run_count);
      if (by_mass) atomicAdd(&mass[run_digit], run_mass);
    }
    run_digit = -1;
    run_count = 0;
    run_mass = 0.0;
  };
  for (int64_t base = begin + threadIdx.x - lane; base < end; base += blockDim.x) {
    const int64_t j = base + lane;
    int digit = -1;
    double value = 0.0;
    if (j < end) {
      const float v = row[j];
      const uint64_t key = cuda::SortKey(v, j);
      if ((key & mask) == prefix) {
        digit = static_cast<int>((key >> shift) & (kRadixBuckets - 1));
        value = v;
      }
    }
    // Past the first passes almost no entry matches the prefix: a warp with none skips the
    // aggregation (the condition is warp-uniform, so every lane skips together).
    if (!__any_sync(kAll, digit >= 0)) continue;
    const int first = __shfl_sync(kAll, digit, 0);
    if (__all_sync(kAll, digit == first)) {
      // One digit for the whole warp (first >= 0 here): the run goes on, or a new one starts.
      if (first != run_digit) {
        end_run();
        run_digit = first;
      }
      run_count += cuda::kWarpSize;
      run_mass += value;
      continue;
    }
    const unsigned peers = __match_any_sync(kAll, digit);
    if (by_mass) {
      // Each lane adds its digit's values in lane order; as many rounds as the largest group.
      const int rounds = static_cast<int>(__reduce_max_sync(kAll, __popc(peers)));
      unsigned rest = peers;
      double sum = 0.0;
      for (int r = 0; r < rounds; ++r) {
        const double x = __shfl_sync(kAll, value, rest != 0 ? __ffs(rest) - 1 : lane);
        if (rest != 0) {
          sum += x;
          rest &= rest - 1;
        }
      }
      value = sum;
    }
    if (digit >= 0 && lane == __ffs(peers) - 1) {
      atomicAdd(&count[digit], static_cast<unsigned>(__popc(peers)));
      if (by_mass) atomicAdd(&mass[digit], value);
    }
  }
  end_run();
}

// One warp (every lane calls it, with the same arguments): the bucket of this pass (the first, in
// ascending key order, where the running mass exceeds threshold (by_mass) or the running count
// exceeds rank), appended to c.prefix; the buckets before it added to c.above / c.above_mass.
// c.found = 0 when the first pass finds no crossing of the mass (the whole row's mass stays <=
// threshold); c.unique when the bucket holds one entry. Returns the new cursor to every lane.
//
// Lane l takes buckets [8l, 8l + 8): the lanes' counts and masses are scanned across the warp
// (exclusive, in lane order), each lane walks its own buckets from there as one thread walked them
// all, and the first lane that crosses decides. Why: one thread walking 256 buckets took a few
// microseconds a pass, ~10 passes a selection, with the rest of the block waiting. The float64
// running mass is added per lane group and then per bucket instead of bucket by bucket: it can
// differ from one thread's sum only within float64 rounding, as the per-bucket sums already differ
// from the CPU's entry-by-entry sum (the file's head).
__device__ RadixCursor ChooseDigit(const unsigned* count, const double* mass, bool by_mass,
                                   double threshold, int64_t rank, int shift, RadixCursor c) {
  constexpr unsigned kAll = 0xffffffffu;
  constexpr int kPerLane = kRadixBuckets / cuda::kWarpSize;
  static_assert(kPerLane * cuda::kWarpSize == kRadixBuckets, "buckets split evenly over a warp");
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int first = lane * kPerLane;
  int64_t lane_count = 0;
  double lane_mass = 0.0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    lane_count += count[first + i];
    if (by_mass) lane_mass += mass[first + i];
  }
  // Inclusive scans in lane order, then each lane's start: what the lanes before it hold.
  int64_t count_incl = lane_count;
  double mass_incl = lane_mass;
#pragma unroll
  for (int offset = 1; offset < cuda::kWarpSize; offset *= 2) {
    const int64_t n = __shfl_up_sync(kAll, count_incl, offset);
    const double m = __shfl_up_sync(kAll, mass_incl, offset);
    if (lane >= offset) {
      count_incl += n;
      mass_incl = m + mass_incl;
    }
  }
  int64_t above = __shfl_up_sync(kAll, count_incl, 1);
  double above_mass = __shfl_up_sync(kAll, mass_incl, 1);
  if (lane == 0) {
    above = 0;
    above_mass = 0.0;
  }
  above += c.above;
  above_mass = c.above_mass + above_mass;
  // This lane's walk: its crossing bucket, else its last non-empty one with the state before it.
  int chosen = -1, last = -1;
  int64_t chosen_above = 0, last_above = 0;
  double chosen_mass = 0.0, last_mass = 0.0;
  for (int i = 0; i < kPerLane; ++i) {
    const int d = first + i;
    if (count[d] == 0) continue;
    const bool here =
        by_mass ? above_mass + mass[d] > threshold : above + static_cast<int64_t>(count[d]) > rank;
    if (here) {
      chosen = d;
      chosen_above = above;
      chosen_mass = above_mass;
      break;
    }
    last = d;
    last_above = above;
    last_mass = above_mass;
    above += count[d];
    above_mass += mass[d];
  }
  const unsigned crossing = __ballot_sync(kAll, chosen >= 0);
  int from = -1;  // the deciding lane
  if (crossing != 0) {
    from = __ffs(crossing) - 1;
  } else {
    const unsigned nonempty = __ballot_sync(kAll, last >= 0);
    if (by_mass && shift == 64 - kRadixBits) {
      c.found = 0;
      return c;
    }
    // Only float64 rounding of the bucket sums (or a rank out of range) gets here: descend into
    // the last non-empty bucket.
    if (nonempty != 0) {
      from = 31 - __clz(nonempty);
      chosen = last;
      chosen_above = last_above;
      chosen_mass = last_mass;
    }
  }
  if (from < 0) return c;  // no entry in any bucket
  chosen = __shfl_sync(kAll, chosen, from);
  c.above = __shfl_sync(kAll, chosen_above, from);
  c.above_mass = __shfl_sync(kAll, chosen_mass, from);
  c.prefix |= static_cast<uint64_t>(chosen) << shift;
  c.unique = count[chosen] == 1;
  return c;
}

// After the mass search (cursor c over a row of n keys): *m, the entries selected: the nucleus size
// (the crossing entry's rank, at least 1, or n when the row's mass never crosses) capped by `limit`
// (top_k). True when that already fixes the selection, with *threshold the last selected key: the
// entries before the crossing one (keys are distinct integers), or that entry alone when it is the
// first. False when top_k cut the nucleus (or nothing crossed): a rank search for entry m - 1
// follows.
__device__ bool CutNucleus(const RadixCursor& c, int64_t n, int64_t limit, int64_t* m,
                           uint64_t* threshold) {
  const int64_t nucleus = c.found ? (c.above > 1 ? c.above : 1) : n;
  *m = min(nucleus, limit);
  if (!c.found || *m != nucleus) return false;
  *threshold = c.above >= 1 ? c.prefix - 1 : c.prefix;
  return true;
}

// Finds, among the keys of row[0, n), either (by_mass) the first key in ascending order at which
// the running sum of relevance exceeds threshold, or (!by_mass) the key of the given rank. Leaves
// it in st.cur.prefix, the number of keys below it in st.cur.above, and st.cur.found = 0 when
// by_mass finds no crossing. Every thread of the block must call it. Once the chosen bucket holds
// a single entry (usually after the 32 relevance bits, ties aside), one scan finds it instead of
// the remaining passes.
__device__ void RadixSelect(const float* row, int64_t n, bool by_mass, double threshold,
                            int64_t rank, RadixState& st) {
  if (threadIdx.x == 0) st.cur = StartCursor();
  uint64_t mask = 0;
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBuckets; i += blockDim.x) {
      st.count[i] = 0;
      st.mass[i] = 0.0;
    }
    __syncthreads();
    AccumulateDigits(row, 0, n, st.cur.prefix, mask, shift, by_mass, st.count, st.mass);
    __syncthreads();
    if (threadIdx.x < cuda::kWarpSize) {
      const RadixCursor cur =
          ChooseDigit(st.count, st.mass, by_mass, threshold, rank, shift, st.cur);
      if (threadIdx.x == 0) st.cur = cur;
    }
    __syncthreads();
    if (st.cur.found == 0) return;
    mask |= static_cast<uint64_t>(kRadixBuckets - 1) << shift;
    if (st.cur.unique) {
      const uint64_t unique_prefix = st.cur.prefix;
      __syncthreads();  // every thread has read st.cur.prefix before its owner rewrites it
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const uint64_t key = cuda::SortKey(row[j], j);
        if ((key & mask) == unique_prefix) st.cur.prefix = key;
      }
      __syncthreads();
      return;
    }
  }
}

// The block's part of a row's outputs: selected[j] and bias[j] of row b for j in [begin, end)
// (strided over the block's threads; the keys <= threshold are selected when m > 0, every one of
// [0, n) when all). Returns this thread's selected relevance mass.
__device__ double WriteSelection(float* bias, bool* selected, const float* row,
                                 const bool* template_mask, int64_t b, int64_t width, int64_t begin,
                                 int64_t end, int64_t n, int64_t m, bool all, uint64_t threshold,
                                 Strength s) {
  double mass = 0.0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    bool sel = false;
    if (j < n && m > 0) {
      const float value = row[j];
      sel = all || cuda::SortKey(value, j) <= threshold;
      if (sel) mass += value;
    }
    selected[b * width + j] = sel;
    bias[b * width + j] = BiasAt(j, n, sel, template_mask[b * width + j], s.hard, s.boost);
  }
  return mass;
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
      known = CutNucleus(st.cur, n, limit, &m, &threshold);
    } else {
      m = k <= 0 ? 0 : limit;  // neither set: rejected on the CPU; selects nothing here
    }
  }
  const bool all = m >= n;
  if (m > 0 && !all && !known) {
    __syncthreads();
    RadixSelect(row, n, /*by_mass=*/false, 0.0, m - 1, st);
    threshold = st.cur.prefix;
  }
  double mass = WriteSelection(bias, selected, row, template_mask, b, width, 0, width, n, m, all,
                               threshold, ReadStrength(strength[b]));
  mass = cuda::BlockReduce(mass, reduce, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) {
    stats[2 * b] = static_cast<float>(m);
    stats[2 * b + 1] = static_cast<float>(mass);
  }
}

// ---- the many-blocks selection of a long row (seventh increment). The same two searches and the
// same choices as SelectBiasKernel, but each pass over the row is one launch of
// SelectPassKernel, whose blocks take `keys` keys each (SelectKeysPerBlock) and add their digit
// counts to the row's global histogram; the last block to finish (a counter, after a fence) picks
// the bucket, as the one-block kernel's first warp does, and moves the row's state on. Rows whose
// search is over return at once, so a fixed kMaxSelectPasses launches serve every row without the
// host knowing how far each got. Why: one block per row put a 128K-key row on one multiprocessor
// (0.88 ms on the H200, docs/gpu.md "DySCO on the device").
enum SelectSearch : int { kMassSearch = 0, kRankSearch = 1, kSearchDone = 2 };

// One row's selection in global memory: set by SelectInitKernel, moved on by the passes' last
// blocks, read by SelectWriteKernel.
struct SelectRowState {
  RadixCursor cur;
  uint64_t mask;        // the digits of cur.prefix chosen so far
  uint64_t unique_key;  // written by the one entry that matches in a unique scan
  uint64_t selection;   // the selected keys are those <= selection
  double threshold;     // mass search: top_p
  int64_t rank;         // rank search: m - 1
  int64_t n;
  int64_t limit;      // top_k capped by n (n when unset)
  int64_t m;          // entries selected
  int shift;          // of this pass's digit
  int search;         // SelectSearch
  int unique_scan;    // the next pass scans for the unique key instead of counting digits
  int all;            // m >= n
  unsigned arrived;   // blocks of the current launch that are done (the last one moves on)
  unsigned released;  // SelectFusedKernel: passes whose last block has moved the row on
  unsigned count[kRadixBuckets];
  double mass[kRadixBuckets];
};

constexpr int kSelectPassThreads = 256;
// Each search takes at most one pass per digit plus the scan for a unique key.
constexpr int kMaxSelectPasses = 2 * (64 / kRadixBits + 1);

// Starts the rank search for entry m - 1, or ends the row's selection when the mass search already
// fixed it (known), when nothing or everything is selected.
__device__ void StartRankSearchOrFinish(SelectRowState& s, bool known) {
  s.all = s.m >= s.n;
  if (s.m > 0 && !s.all && !known) {
    s.search = kRankSearch;
    s.rank = s.m - 1;
    s.cur = StartCursor();
    s.mask = 0;
    s.shift = 64 - kRadixBits;
    s.unique_scan = 0;
  } else {
    s.search = kSearchDone;
  }
}

// The end of a search: what SelectBiasKernel does between and after its two RadixSelect calls.
__device__ void FinishSearch(SelectRowState& s) {
  if (s.search == kMassSearch) {
    StartRankSearchOrFinish(s, CutNucleus(s.cur, s.n, s.limit, &s.m, &s.selection));
  } else {
    s.selection = s.cur.prefix;
    s.search = kSearchDone;
  }
}

// Grid: x = row. Thread 0 sets the row's state; every thread zeroes its histogram.
__global__ void __launch_bounds__(kSelectPassThreads)
    SelectInitKernel(SelectRowState* states, const int64_t* num_keys, const float* top_p,
                     const int64_t* top_k, int64_t width) {
  const int64_t b = blockIdx.x;
  SelectRowState& s = states[b];
  for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) {
    s.count[d] = 0;
    s.mass[d] = 0.0;
  }
  if (threadIdx.x != 0) return;
  s.n = Clamp(num_keys[b], 0, width);
  const float p = top_p[b];
  const int64_t k = top_k[b];
  s.limit = k <= 0 ? s.n : min(k, s.n);
  s.m = 0;
  s.selection = 0;
  s.arrived = 0;
  s.released = 0;
  s.cur = StartCursor();
  s.mask = 0;
  s.shift = 64 - kRadixBits;
  s.unique_scan = 0;
  if (s.n > 0 && p > 0.0f) {
    s.search = kMassSearch;
    s.threshold = static_cast<double>(p);
    return;
  }
  if (s.n > 0) s.m = k <= 0 ? 0 : s.limit;  // neither set: rejected on the CPU; selects nothing
  StartRankSearchOrFinish(s, /*known=*/false);
}

// Whether this block is the last of the launch to get here for its row (after every block's
// writes to the row's state are visible). Every thread of the block calls it.
__device__ bool LastBlockOfRow(SelectRowState& s) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&s.arrived, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// A pass's inputs from the row's state, as every block of the pass reads them.
struct SelectPassView {
  uint64_t prefix;
  uint64_t mask;
  int64_t n;
  int search;
  int shift;
  bool unique_scan;
};

// Read past L1: SelectFusedKernel's blocks read it again after each pass, once another block has
// moved the state on (there thread 0 reads it into shared memory for the block; each thread of
// SelectPassKernel reads it itself).
__device__ SelectPassView ReadPassView(const SelectRowState& s) {
  return SelectPassView{__ldcg(&s.cur.prefix), __ldcg(&s.mask),  __ldcg(&s.n),
                        __ldcg(&s.search),     __ldcg(&s.shift), __ldcg(&s.unique_scan) != 0};
}

// The block's part of one pass over keys [lo, hi) of row: the unique key's scan, or the digit
// counts (and masses) added to the block's shared histogram. Every thread calls it.
__device__ void PassOverKeys(SelectRowState& s, const SelectPassView& v, const float* row,
                             int64_t lo, int64_t hi, unsigned* count, double* mass) {
  if (v.unique_scan) {
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      const uint64_t key = cuda::SortKey(row[j], j);
      if ((key & v.mask) == v.prefix) s.unique_key = key;  // exactly one entry matches
    }
  } else {
    AccumulateDigits(row, lo, hi, v.prefix, v.mask, v.shift, v.search == kMassSearch, count, mass);
  }
}

// Zeroes the block's shared histogram (before a pass's PassOverKeys calls).
__device__ void ZeroHistogram(unsigned* count, double* mass) {
  for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) {
    count[d] = 0;
    mass[d] = 0.0;
  }
  __syncthreads();
}

// Adds the block's shared histogram to the row's (after the pass's PassOverKeys calls).
__device__ void AddHistogramToRow(SelectRowState& s, const SelectPassView& v, const unsigned* count,
                                  const double* mass) {
  __syncthreads();
  if (v.unique_scan) return;
  const bool by_mass = v.search == kMassSearch;
  for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) {
    if (count[d] == 0) continue;
    atomicAdd(&s.count[d], count[d]);
    if (by_mass) atomicAdd(&s.mass[d], mass[d]);
  }
}

// Run by every thread of the pass's last block (LastBlockOfRow): the row's histogram (read past
// L1: other blocks' atomics) zeroed for the next pass, the bucket chosen by the first warp, the
// row's state moved on by thread 0 (the next digit, the unique key's scan, the end of a search) and
// the arrival count reset.
__device__ void MoveRowOn(SelectRowState& s, const SelectPassView& v, unsigned* count,
                          double* mass) {
  if (!v.unique_scan) {
    for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) {
      count[d] = __ldcg(&s.count[d]);
      mass[d] = __ldcg(&s.mass[d]);
      s.count[d] = 0;
      s.mass[d] = 0.0;
    }
    __syncthreads();
  }
  if (threadIdx.x >= cuda::kWarpSize) return;
  if (v.unique_scan) {
    if (threadIdx.x != 0) return;
    s.arrived = 0;
    s.cur.prefix = __ldcg(&s.unique_key);
    FinishSearch(s);
    return;
  }
  const RadixCursor cur =
      ChooseDigit(count, mass, v.search == kMassSearch, s.threshold, s.rank, v.shift, s.cur);
  if (threadIdx.x != 0) return;
  s.arrived = 0;
  s.cur = cur;
  if (s.cur.found == 0) {
    FinishSearch(s);
    return;
  }
  s.mask |= static_cast<uint64_t>(kRadixBuckets - 1) << v.shift;
  if (s.cur.unique) {
    s.unique_scan = 1;  // the next pass finds the key
    s.cur.unique = 0;
  } else if (v.shift == 0) {
    FinishSearch(s);  // every digit chosen: cur.prefix is the key
  } else {
    s.shift -= kRadixBits;
  }
}

// Grid: x = key block, y = row. One pass of the row's current search (above).
__global__ void __launch_bounds__(kSelectPassThreads)
    SelectPassKernel(SelectRowState* states, const float* relevance, int64_t width, int64_t keys) {
  __shared__ unsigned count[kRadixBuckets];
  __shared__ double mass[kRadixBuckets];
  const int64_t b = blockIdx.y;
  SelectRowState& s = states[b];
  if (s.search == kSearchDone) return;  // the same for every block of the row
  const SelectPassView v = ReadPassView(s);
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * keys;
  ZeroHistogram(count, mass);
  PassOverKeys(s, v, relevance + b * width, lo, min(v.n, lo + keys), count, mass);
  AddHistogramToRow(s, v, count, mass);
  if (LastBlockOfRow(s)) MoveRowOn(s, v, count, mass);
}

// The selection's outcome from the row's state (read past L1, as ReadPassView).
struct SelectOutcome {
  int64_t n;
  int64_t m;
  uint64_t selection;
  bool all;
};

__device__ SelectOutcome ReadOutcome(const SelectRowState& s) {
  return SelectOutcome{__ldcg(&s.n), __ldcg(&s.m), __ldcg(&s.selection), __ldcg(&s.all) != 0};
}

// Writes the selection and bias of row b's key block `chunk` and leaves its selected mass in
// partial[b][chunk] (thread 0). Every thread calls it.
__device__ void WriteChunk(float* bias, bool* selected, double* partial, double* reduce,
                           const SelectOutcome& o, const float* relevance,
                           const bool* template_mask, const float* strength, int64_t b,
                           int64_t width, int64_t keys, int64_t chunk, int64_t chunks) {
  const int64_t lo = chunk * keys;
  const int64_t hi = min(width, lo + keys);
  double mass = WriteSelection(bias, selected, relevance + b * width, template_mask, b, width, lo,
                               hi, o.n, o.m, o.all, o.selection, ReadStrength(strength[b]));
  mass = cuda::BlockReduce(mass, reduce, [](double x, double y) { return x + y; });
  if (threadIdx.x == 0) partial[b * chunks + chunk] = mass;
}

// Run by thread 0 of the write's last block: the row's stats, the key blocks' masses added in
// block order (the same bits however many blocks wrote them).
__device__ void FinishWrite(float* stats, SelectRowState& s, const SelectOutcome& o,
                            const double* partial, int64_t b, int64_t chunks) {
  s.arrived = 0;
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += __ldcg(&partial[b * chunks + c]);
  stats[2 * b] = static_cast<float>(o.m);
  stats[2 * b + 1] = static_cast<float>(total);
}

// Grid: x = key block, y = row. Writes the row's selection and bias; each block's selected mass
// goes to partial[row][block], and the last block adds them in block order into stats.
__global__ void __launch_bounds__(kSelectPassThreads)
    SelectWriteKernel(float* bias, bool* selected, float* stats, double* partial,
                      SelectRowState* states, const float* relevance, const bool* template_mask,
                      const float* strength, int64_t width, int64_t keys) {
  __shared__ double reduce[kSelectPassThreads / cuda::kWarpSize];
  const int64_t b = blockIdx.y;
  SelectRowState& s = states[b];
  const SelectOutcome o = ReadOutcome(s);
  WriteChunk(bias, selected, partial, reduce, o, relevance, template_mask, strength, b, width, keys,
             blockIdx.x, gridDim.x);
  if (LastBlockOfRow(s) && threadIdx.x == 0) FinishWrite(stats, s, o, partial, b, gridDim.x);
}

// ---- the fused many-blocks selection (twentieth increment, opt-in): SelectPassKernel's passes and
// SelectWriteKernel in one launch (after SelectInitKernel), the row's blocks meeting after each
// pass instead of the launches ending. Each block takes the key blocks x, x + gridDim.x, ... of its
// row; the pass's last block moves the row on (MoveRowOn, as SelectPassKernel's) and releases the
// others, which poll the row's `released` count. The same buckets, the same state and the same
// write (its masses added in key-block order), so the same sets, biases and stats as the launches.
// Why: the fixed 18 pass launches cost ~0.125 ms a 128K DySCO step on the H200 (bench-gpu's
// profile, ~7 us each), most of them after the row's search is over (docs/gpu.md "The DySCO
// selection in one launch"). Every block of a row must be resident at once (a block that polls
// waits for all the others): the host caps the grid at what the multiprocessors hold
// (FusedSelectBlocksPerRow).
__global__ void __launch_bounds__(kSelectPassThreads)
    SelectFusedKernel(float* bias, bool* selected, float* stats, double* partial,
                      SelectRowState* states, const float* relevance, const bool* template_mask,
                      const float* strength, int64_t width, int64_t keys, int64_t chunks) {
  __shared__ unsigned count[kRadixBuckets];
  __shared__ double mass[kRadixBuckets];
  __shared__ double reduce[kSelectPassThreads / cuda::kWarpSize];
  __shared__ SelectPassView view;
  const int64_t b = blockIdx.y;
  SelectRowState& s = states[b];
  const float* row = relevance + b * width;
  for (unsigned pass = 0;; ++pass) {
    if (threadIdx.x == 0) view = ReadPassView(s);
    __syncthreads();
    const SelectPassView v = view;
    if (v.search == kSearchDone) break;  // the same for every block of the row
    ZeroHistogram(count, mass);
    for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
      const int64_t lo = c * keys;
      PassOverKeys(s, v, row, lo, min(v.n, lo + keys), count, mass);
    }
    AddHistogramToRow(s, v, count, mass);
    if (LastBlockOfRow(s)) {
      MoveRowOn(s, v, count, mass);
      if (threadIdx.x == 0) {
        __threadfence();  // the moved-on state before the release
        atomicAdd(&s.released, 1u);
      }
    } else if (threadIdx.x == 0) {
      // Relaxed polls (an acquire per poll would also invalidate this multiprocessor's L1), then
      // one fence, as linear.cu's GridBarrier; the state is then read past L1 (ReadPassView).
      unsigned seen = 0;
      do {
        __nanosleep(32);
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];"
                     : "=r"(seen)
                     : "l"(&s.released)
                     : "memory");
      } while (seen <= pass);
      __threadfence();
    }
    __syncthreads();  // every thread reads the view again only after the release
  }
  const SelectOutcome o = ReadOutcome(s);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    WriteChunk(bias, selected, partial, reduce, o, relevance, template_mask, strength, b, width,
               keys, c, chunks);
  }
  if (LastBlockOfRow(s) && threadIdx.x == 0) FinishWrite(stats, s, o, partial, b, chunks);
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

// ---- dysco_probe_mean: a thread a (row, key); the rows by value.
struct ProbeMeanHeads {
  int64_t rows[kMaxProbeMeanHeads];
  int count;
};
constexpr int kProbeMeanThreads = 256;

__global__ void __launch_bounds__(kProbeMeanThreads)
    ProbeMeanKernel(float* mean, const float* probs, const ProbeMeanHeads heads, int64_t width,
                    int64_t mean_stride, int64_t mean_step, int64_t rows, int64_t probs_len,
                    float inv_heads) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kProbeMeanThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (j >= width) return;
  const float* row = probs + b * rows * probs_len + j;
  // In the order of `heads`, in fp32, then one multiply: ATen's clone, add_, ..., mul_ bit for bit.
  float acc = row[heads.rows[0] * probs_len];
  for (int k = 1; k < heads.count; ++k) acc = __fadd_rn(acc, row[heads.rows[k] * probs_len]);
  mean[b * mean_stride + j * mean_step] = __fmul_rn(acc, inv_heads);
}

void CheckCuda(const char* op, const at::Tensor& out) {
  TORCH_CHECK(out.is_cuda(), op, ": the CUDA implementation got tensors on ", out.device());
}

unsigned Blocks(int64_t width) {
  return static_cast<unsigned>(std::max<int64_t>(1, cuda::CeilDiv(width, kKeysPerBlock)));
}

// Rows of kMultiBlockSelectWidth keys and more are selected by many blocks each (in one cooperative
// launch where it fits: FusedSelectBlocksPerRow); shorter rows by one block. DYSCO_CUDA_SELECT=
// single forces one block, =multi many blocks a launch a pass, =fused many blocks in one launch
// (read per call, for tests and A/B timing).
bool MultiBlockSelect(int64_t width) {
  if (cuda::EnvIs("DYSCO_CUDA_SELECT", "single")) return false;
  if (cuda::EnvIs("DYSCO_CUDA_SELECT", "multi") || cuda::EnvIs("DYSCO_CUDA_SELECT", "fused")) {
    return true;
  }
  return width >= kMultiBlockSelectWidth;
}

// Keys a block of the many-blocks selection takes in each pass (and in the write): 512 (2048 until
// the twenty-first increment), or DYSCO_CUDA_SELECT_KEYS_PER_BLOCK (256..16384, a multiple of 256;
// read per call: tests, A/B). Why 512: a pass's cost is its blocks' instructions over their keys
// (the digit, the warp's vote and its shuffles a key), so more, shorter blocks finish each pass
// sooner; on the H200 the fused selection took 0.048 / 0.056 / 0.072 ms a call at 32K keys with
// 512 / 1024 / 2048 keys a block (CudaTiming.DyscoSelectionAtDecodeWidths).
int64_t SelectKeysPerBlock() {
  return cuda::EnvInt("DYSCO_CUDA_SELECT_KEYS_PER_BLOCK", 256, 16384, 256).value_or(512);
}

// Blocks a row of the fused selection (SelectFusedKernel, the default since the twenty-first
// increment; DYSCO_CUDA_SELECT=multi: a launch a pass): one per key block, as many as the
// multiprocessors hold at once for all the rows together (its blocks wait for each other); 0 (the
// launch per pass) when not even one a row fits or with =multi. DYSCO_CUDA_SELECT_BLOCKS (1..1024)
// caps it (tests: several key blocks a block); DYSCO_CUDA_SELECT_RESIDENT_SCALE (2..64, tests)
// multiplies the occupancy count it assumes, as an MPS share with fewer multiprocessors than the
// device's would. It was opt-in in the twentieth increment: its waits relied on that count matching
// the multiprocessors the process really gets (a smaller share would hang it); the cooperative
// launch makes the runtime refuse such a grid instead, and the call then takes a launch a pass
// (dysco_select_bias_cuda_refused_launches counts them; docs/gpu.md "The DySCO selection's
// passes").
std::atomic<int64_t> g_refused_launches{0};
int64_t FusedSelectBlocksPerRow(int64_t rows, int64_t chunks) {
  if (cuda::EnvIs("DYSCO_CUDA_SELECT", "multi")) return 0;
  static const int64_t resident = [] {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SelectFusedKernel,
                                                                 kSelectPassThreads, 0));
    return int64_t{per_sm} * cuda::MultiprocessorCount();
  }();
  int64_t assumed = resident;
  if (const auto scale = cuda::EnvInt("DYSCO_CUDA_SELECT_RESIDENT_SCALE", 2, 64)) {
    assumed *= *scale;
  }
  int64_t blocks = std::min(chunks, assumed / rows);
  if (const auto cap = cuda::EnvInt("DYSCO_CUDA_SELECT_BLOCKS", 1, 1024)) {
    blocks = std::min(blocks, *cap);
  }
  return blocks;
}

}  // namespace

int64_t dysco_select_bias_cuda_refused_launches() {
  return g_refused_launches.load(std::memory_order_relaxed);
}

void dysco_probe_mean_cuda(const at::Tensor& mean, const at::Tensor& probs,
                           c10::IntArrayRef heads) {
  CheckDyscoProbeMeanArgs(mean, probs, heads);
  CheckCuda(kDyscoProbeMeanOp, mean);
  if (mean.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  ProbeMeanHeads rows{};
  rows.count = static_cast<int>(heads.size());
  for (size_t k = 0; k < heads.size(); ++k) rows.rows[k] = heads[k];
  const int64_t width = mean.size(1);
  TORCH_CHECK(mean.size(0) <= 65535, kDyscoProbeMeanOp, ": at most 65535 rows, got ", mean.size(0));
  const dim3 grid(static_cast<unsigned>(cuda::CeilDiv(width, kProbeMeanThreads)),
                  static_cast<unsigned>(mean.size(0)));
  ProbeMeanKernel<<<grid, kProbeMeanThreads, 0, cuda::CurrentStream()>>>(
      mean.data_ptr<float>(), probs.data_ptr<float>(), rows, width, mean.stride(0), mean.stride(1),
      probs.size(1), probs.size(2), 1.0f / static_cast<float>(heads.size()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  const cudaStream_t stream = cuda::CurrentStream();
  if (!MultiBlockSelect(width)) {
    SelectBiasKernel<<<static_cast<unsigned>(batch), kSelectThreads, 0, stream>>>(
        bias.data_ptr<float>(), selected.data_ptr<bool>(), stats.data_ptr<float>(),
        relevance.data_ptr<float>(), num_keys.data_ptr<int64_t>(), template_mask.data_ptr<bool>(),
        top_p.data_ptr<float>(), top_k.data_ptr<int64_t>(), strength.data_ptr<float>(), width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // The rows' states and the write pass's per-block sums, from the caching allocator (stream-
  // ordered, and inside a graph's pool when captured).
  const int64_t keys = SelectKeysPerBlock();
  const int64_t blocks = cuda::CeilDiv(width, keys);
  const int64_t state_bytes =
      cuda::CeilDiv(batch * static_cast<int64_t>(sizeof(SelectRowState)), sizeof(double)) *
      static_cast<int64_t>(sizeof(double));
  at::Tensor scratch =
      at::empty({state_bytes + batch * blocks * static_cast<int64_t>(sizeof(double))},
                relevance.options().dtype(at::kByte));
  auto* states = reinterpret_cast<SelectRowState*>(scratch.data_ptr<uint8_t>());
  auto* partial = reinterpret_cast<double*>(scratch.data_ptr<uint8_t>() + state_bytes);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
  SelectInitKernel<<<static_cast<unsigned>(batch), kSelectPassThreads, 0, stream>>>(
      states, num_keys.data_ptr<int64_t>(), top_p.data_ptr<float>(), top_k.data_ptr<int64_t>(),
      width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (const int64_t per_row = FusedSelectBlocksPerRow(batch, blocks); per_row > 0) {
    // A cooperative launch: the runtime refuses it (an error, not a hang) when the grid's blocks
    // could not all be resident at once, which the blocks' waits for each other need.
    cudaLaunchAttribute cooperative{};
    cooperative.id = cudaLaunchAttributeCooperative;
    cooperative.val.cooperative = 1;
    const cudaError_t launched = cuda::LaunchWithAttribute(
        cooperative, SelectFusedKernel,
        dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(batch)),
        dim3(kSelectPassThreads), 0, stream, bias.data_ptr<float>(), selected.data_ptr<bool>(),
        stats.data_ptr<float>(), partial, states, relevance.data_ptr<float>(),
        template_mask.data_ptr<bool>(), strength.data_ptr<float>(), width, keys, blocks);
    if (launched != cudaErrorCooperativeLaunchTooLarge) {
      C10_CUDA_CHECK(launched);
      return;
    }
    // Fewer multiprocessors than the occupancy count assumed (e.g. an MPS share): nothing ran,
    // the state SelectInitKernel set is untouched, and this call takes a launch a pass. Not
    // remembered: the refusal costs a failed launch call on the host, and a later call with fewer
    // rows may fit.
    (void)cudaGetLastError();
    g_refused_launches.fetch_add(1, std::memory_order_relaxed);
  }
  for (int pass = 0; pass < kMaxSelectPasses; ++pass) {
    SelectPassKernel<<<grid, kSelectPassThreads, 0, stream>>>(states, relevance.data_ptr<float>(),
                                                              width, keys);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  SelectWriteKernel<<<grid, kSelectPassThreads, 0, stream>>>(
      bias.data_ptr<float>(), selected.data_ptr<bool>(), stats.data_ptr<float>(), partial, states,
      relevance.data_ptr<float>(), template_mask.data_ptr<bool>(), strength.data_ptr<float>(),
      width, keys);
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
