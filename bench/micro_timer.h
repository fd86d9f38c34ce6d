// MicroTimer: the microbenchmark clock shared by bench-kernels and bench-dysco-ops.
//
// Reports the fastest of several repetitions, each averaging enough calls to last about 10 ms: on a
// shared machine the minimum is the figure least disturbed by other processes. With thread CPU time
// (CLOCK_THREAD_CPUTIME_ID) the figures also ignore time spent descheduled.
// Thread-safety: one MicroTimer per benchmarking thread. Ownership: holds no resources.
// Header-only because bench/CMakeLists.txt turns every bench/*.cpp into its own executable.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace dysco::bench {

class MicroTimer {
 public:
  MicroTimer(bool thread_cpu_time, int repetitions)
      : clock_(thread_cpu_time ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC),
        repetitions_(repetitions) {}

  double NowSeconds() const {
    timespec ts;
    clock_gettime(clock_, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }

  // Microseconds per call of `call`, the minimum over the repetitions.
  double MinMicros(const std::function<void()>& call) const {
    call();
    double start = NowSeconds();
    int64_t calls = 0;
    while (NowSeconds() - start < 0.01) {
      call();
      ++calls;
    }
    std::vector<double> samples;
    for (int rep = 0; rep < repetitions_; ++rep) {
      start = NowSeconds();
      for (int64_t i = 0; i < calls; ++i) call();
      samples.push_back((NowSeconds() - start) * 1e6 / static_cast<double>(calls));
    }
    return *std::min_element(samples.begin(), samples.end());
  }

 private:
  clockid_t clock_;
  int repetitions_;
};

}  // namespace dysco::bench
