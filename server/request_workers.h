// RequestWorkers: a small fixed pool of threads for the request-sized work of the RPC handlers
// (validating and tokenizing a prompt, Scheduler::Submit, Tokenize), so that gRPC's callback
// threads never run it: the callback API's rule is never to block inside a callback, and a long
// prompt tokenized there would stall every other stream served by that thread.
//
// Thread-safety: Post may be called from any thread. Tasks run on the pool's threads, in order of
// posting per thread. Ownership: the pool owns its threads and the queued tasks; the destructor
// runs the tasks still queued, then joins (so a reactor waiting for its task is never left
// unfinished).
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "core/base/thread_annotations.h"

namespace dysco::server {

class RequestWorkers {
 public:
  RequestWorkers(int num_threads, size_t max_queued);
  ~RequestWorkers();
  RequestWorkers(const RequestWorkers&) = delete;
  RequestWorkers& operator=(const RequestWorkers&) = delete;

  // Queues `task`; false (nothing queued) when max_queued tasks are already waiting.
  bool Post(std::function<void()> task) EXCLUDES(mu_);

 private:
  void Loop() EXCLUDES(mu_);

  const size_t max_queued_;
  Mutex mu_;
  CondVar work_cv_;
  std::deque<std::function<void()>> tasks_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace dysco::server
