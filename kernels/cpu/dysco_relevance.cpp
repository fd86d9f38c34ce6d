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
        for (int64_t j = 0; j < len; ++j) {
          float a = mean[j] * inv_heads;
          if (lo + j < old_hi) a += d * row[lo + j];
          row[lo + j] = a;
          sum += a;
        }
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
      for (int64_t j = lo; j < hi; ++j) {
        // A zero sum (all probabilities and previous relevance zero) leaves no distribution.
        row[j] = sum > 0.0 ? static_cast<float>(static_cast<double>(row[j]) / sum) : 0.0f;
      }
    }
  });
}

}  // namespace dysco::kernels
