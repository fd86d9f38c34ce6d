#include "server/request_workers.h"

#include <utility>

namespace dysco::server {

RequestWorkers::RequestWorkers(int num_threads, size_t max_queued) : max_queued_(max_queued) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Loop(); });
}

RequestWorkers::~RequestWorkers() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.NotifyAll();
  for (std::thread& t : threads_) t.join();
}

bool RequestWorkers::Post(std::function<void()> task) {
  {
    MutexLock lock(&mu_);
    if (stop_ || tasks_.size() >= max_queued_) return false;
    tasks_.push_back(std::move(task));
  }
  work_cv_.NotifyOne();
  return true;
}

void RequestWorkers::Loop() {
  for (;;) {
    std::function<void()> task;
    {
      MutexLock lock(&mu_);
      while (!stop_ && tasks_.empty()) work_cv_.Wait(&mu_);
      if (tasks_.empty()) return;  // stopping, and nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

}  // namespace dysco::server
