// LatencySummary: count, mean and p50/p90/p99/max of a set of latency samples (seconds), for bench
// output.
//
// Percentiles interpolate linearly between the two nearest ranks of the sorted samples (numpy's
// default), so p50 of {1, 2} is 1.5. An empty sample set gives count 0 and zeros everywhere.
// Thread-safety: a value type. Summarize takes its samples by value and keeps nothing.
#pragma once

#include <cstddef>
#include <vector>

namespace dysco::client {

struct LatencySummary {
  size_t count = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double max = 0;
};

// q in [0, 1]; samples must be sorted ascending and non-empty.
double PercentileOfSorted(const std::vector<double>& samples, double q);

LatencySummary Summarize(std::vector<double> samples);

}  // namespace dysco::client
