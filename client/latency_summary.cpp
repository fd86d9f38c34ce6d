#include "latency_summary.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dysco::client {

double PercentileOfSorted(const std::vector<double>& samples, double q) {
  double rank = q * static_cast<double>(samples.size() - 1);
  size_t lower = static_cast<size_t>(std::floor(rank));
  size_t upper = std::min(lower + 1, samples.size() - 1);
  double fraction = rank - static_cast<double>(lower);
  return samples[lower] + (samples[upper] - samples[lower]) * fraction;
}

LatencySummary Summarize(std::vector<double> samples) {
  LatencySummary summary;
  if (samples.empty()) return summary;
  std::sort(samples.begin(), samples.end());
  summary.count = samples.size();
  summary.mean =
      std::accumulate(samples.begin(), samples.end(), 0.0) / static_cast<double>(samples.size());
  summary.p50 = PercentileOfSorted(samples, 0.50);
  summary.p90 = PercentileOfSorted(samples, 0.90);
  summary.p99 = PercentileOfSorted(samples, 0.99);
  summary.max = samples.back();
  return summary;
}

}  // namespace dysco::client
