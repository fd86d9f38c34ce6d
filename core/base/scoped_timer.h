// ScopedTimer: adds the wall time of a scope to a `double` of seconds when the scope ends, however
// it ends (return, error, exception), so timing code does not shape the control flow around it.
//
// Thread-safety: one timer per scope; the target must not be written by another thread meanwhile.
// Ownership: borrows the target, which must outlive the timer.
#pragma once

#include <chrono>

namespace dysco {

class ScopedTimer {
 public:
  using Clock = std::chrono::steady_clock;

  explicit ScopedTimer(double* seconds) : seconds_(seconds), start_(Clock::now()) {}
  ~ScopedTimer() { *seconds_ += std::chrono::duration<double>(Clock::now() - start_).count(); }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  double* seconds_;
  Clock::time_point start_;
};

}  // namespace dysco
