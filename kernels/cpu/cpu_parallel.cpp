// See cpu_parallel.h.
#include "kernels/cpu/cpu_parallel.h"

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>

namespace dysco::kernels::cpu {

int ParallelForWidth(int64_t items) {
  std::mutex mu;
  std::set<std::thread::id> threads;
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mu);
    threads.insert(std::this_thread::get_id());
  });
  return static_cast<int>(threads.size());
}

}  // namespace dysco::kernels::cpu
