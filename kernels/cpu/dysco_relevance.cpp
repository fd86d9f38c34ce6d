// CPU dysco_relevance_update: the decayed, renormalised relevance of DySCO (docs/dysco.md "Ops").
//
// Rows are cut into fixed chunks of keys so that one long sequence still spreads over threads:
// pass 1 writes the unnormalised a into the row (in place: a[j] needs only r_{t-1}[j]) and the
// chunk's float64 partial sum; pass 2 divides by the row's sum, added up in chunk order, so the
// result does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_checks.h"
#include "kernels/ops.h"

namespace dysco::kernels {
namespace {

constexpr int64_t kKeysPerChunk = 8192;

}  // namespace

void dysco_probe_mean_cpu(const at::Tensor& mean, const at::Tensor& probs, c10::IntArrayRef heads) {
  CheckDyscoProbeMeanArgs(mean, probs, heads);
  const int64_t batch = mean.size(0);
  const int64_t width = mean.size(1);
  if (mean.numel() == 0) return;
  const int64_t rows = probs.size(1);
  const int64_t probs_len = probs.size(2);
  const float* prob = probs.data_ptr<float>();
  float* out = mean.data_ptr<float>();
  const int64_t out_stride = mean.stride(0);
  const int64_t out_step = mean.stride(1);
  // The multiplier as ATen's mul_ by the double 1.0f / H takes it: a float.
  const float inv_heads = 1.0f / static_cast<float>(heads.size());
  const std::vector<int64_t> head_rows(heads.begin(), heads.end());
  at::parallel_for(0, batch * width, kKeysPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / width;
      const int64_t j = item % width;
      const float* row = prob + b * rows * probs_len + j;
      float acc = row[head_rows[0] * probs_len];
      for (size_t k = 1; k < head_rows.size(); ++k) acc += row[head_rows[k] * probs_len];
      out[b * out_stride + j * out_step] = acc * inv_heads;
    }
  });
}

void dysco_relevance_update_cpu(const at::Tensor& relevance, const at::Tensor& probs,
                                const at::Tensor& num_keys, const at::Tensor& decay) {
  cpu::CheckDyscoRelevanceUpdate(relevance, probs, num_keys, decay);
  const int64_t batch = relevance.size(0);
  const int64_t width = relevance.size(1);
  const int64_t num_heads = probs.size(1);
  const int64_t probs_len = probs.size(2);
  const int64_t* keys = num_keys.data_ptr<int64_t>();
  if (relevance.numel() == 0) return;

  float* rel = relevance.data_ptr<float>();
  const float* prob = probs.data_ptr<float>();
  const float* decays = decay.data_ptr<float>();
  const int64_t chunks = (width + kKeysPerChunk - 1) / kKeysPerChunk;
  std::vector<double> partial(batch * chunks);
  const float inv_heads = 1.0f / static_cast<float>(num_heads);

  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mean(kKeysPerChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t lo = item % chunks * kKeysPerChunk;
      const int64_t n = keys[b];
      float* row = rel + b * width;
      // Keys of this chunk that exist, and those of them that carry a previous relevance.
      const int64_t hi = std::min(n, std::min(width, lo + kKeysPerChunk));
      const int64_t old_hi = std::min(hi, n - 1);
      double sum = 0.0;
      if (hi > lo) {
        const int64_t len = hi - lo;
        const float* p = prob + b * num_heads * probs_len + lo;
        std::copy_n(p, len, mean.data());
        for (int64_t h = 1; h < num_heads; ++h) {
          const float* ph = p + h * probs_len;
          for (int64_t j = 0; j < len; ++j) mean[j] += ph[j];
        }
        const float d = decays[b];
        float* r = row + lo;
        // a = mean / H (+ decay * r_{t-1} for the keys that had a relevance), written in place;
        // two loops instead of a test per key, so that each vectorises.
        const int64_t old_len = std::max<int64_t>(0, old_hi - lo);
        for (int64_t j = 0; j < old_len; ++j) {
          float a = mean[j] * inv_heads;
          a += d * r[j];
          r[j] = a;
        }
        for (int64_t j = old_len; j < len; ++j) r[j] = mean[j] * inv_heads;
        // The chunk's float64 sum in four interleaved partial sums, added in a fixed order (still
        // independent of the thread count): one running sum was a chain of dependent adds, ~4
        // cycles a key, most of the op's time at 128K keys (docs/gpu.md "DySCO on the device").
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        int64_t j = 0;
        for (; j + 4 <= len; j += 4) {
          s0 += r[j];
          s1 += r[j + 1];
          s2 += r[j + 2];
          s3 += r[j + 3];
        }
        for (; j < len; ++j) s0 += r[j];
        sum = (s0 + s1) + (s2 + s3);
      }
      std::fill(row + std::max(lo, hi), row + std::min(width, lo + kKeysPerChunk), 0.0f);
      partial[item] = sum;
    }
  });

  std::vector<double> total(batch, 0.0);
  for (int64_t item = 0; item < batch * chunks; ++item) total[item / chunks] += partial[item];

  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t lo = item % chunks * kKeysPerChunk;
      const int64_t hi = std::min(keys[b], std::min(width, lo + kKeysPerChunk));
      float* row = rel + b * width;
      const double sum = total[b];
      if (sum > 0.0) {
        for (int64_t j = lo; j < hi; ++j)
          row[j] = static_cast<float>(static_cast<double>(row[j]) / sum);
      } else {
        // A zero sum (all probabilities and previous relevance zero) leaves no distribution.
        std::fill(row + lo, row + std::max(lo, hi), 0.0f);
      }
    }
  });
}

}  // namespace dysco::kernels
