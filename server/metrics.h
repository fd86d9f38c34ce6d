// Prometheus metrics of dysco-server: ServerMetrics turns the Scheduler's observations into series
// (a prometheus-cpp registry, rendered in the text exposition format), MetricsEndpoint serves them
// over HTTP at /metrics (cpp-httplib; prometheus-cpp's own civetweb exposer is not used).
//
// Series (label dysco="on|off": the session used DySCO, or for per-step series the step had DySCO
// rows):
//   dysco_time_to_first_token_seconds{dysco}   histogram  submit -> first token
//       buckets 5ms 10ms 25ms 50ms 100ms 250ms 500ms 1s 2.5s 5s 10s 30s 60s
//   dysco_inter_token_latency_seconds{dysco}   histogram  between consecutive tokens of a session
//       buckets 1ms 2.5ms 5ms 10ms 20ms 40ms 60ms 80ms 100ms 150ms 200ms 300ms 500ms 1s 2.5s
//   dysco_e2e_request_latency_seconds{dysco}   histogram  submit -> final event
//       buckets 50ms 100ms 250ms 500ms 1s 2.5s 5s 10s 20s 40s 80s 160s 320s
//   dysco_request_queue_time_seconds{dysco}    histogram  submit -> admitted
//       buckets 1ms 5ms 10ms 25ms 50ms 100ms 250ms 500ms 1s 2.5s 5s 10s 30s 60s
//   dysco_step_seconds{pass,dysco}             histogram  one engine step's pass: speculative and
//       select (DySCO steps only), real, sample; buckets 100us 250us 500us 1ms 2.5ms 5ms 10ms 25ms
//       50ms 100ms 250ms 500ms 1s 2.5s
//   dysco_selected_tokens                      histogram  context tokens selected per DySCO
//       intervention row; buckets powers of two 1 .. 131072
//   dysco_prompt_tokens_total{dysco}, dysco_generation_tokens_total{dysco}   counters
//   dysco_requests_total{finish_reason,dysco}  counter    finished sessions (FinishReasonName)
//   dysco_callback_errors_total                 counter    callback/observer exceptions caught
//   dysco_requests_refused_total{code}          counter    requests refused with that gRPC code
//       (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, ...), Generate and Tokenize alike
//   dysco_requests_running, dysco_requests_waiting, dysco_kv_cache_usage_ratio   gauges, refreshed
//       from Scheduler::stats() at every scrape (and after every step)
//
// Thread-safety: every method may be called from any thread (prometheus-cpp metrics are
// thread-safe); OnStep / OnSessionEnd run on the engine thread and never block on I/O.
// Ownership: ServerMetrics owns its registry. The observer returned by MakeObserver references the
// ServerMetrics, which must outlive the Scheduler it is given to. MetricsEndpoint owns its HTTP
// server and thread, stopped by its destructor; the render function must stay valid until then.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/support/status.h>
#include "core/base/status.h"

#include "core/engine/scheduler.h"

namespace httplib {
class Server;
}

namespace dysco::server {

class ServerMetrics {
 public:
  ServerMetrics();
  ~ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  SchedulerObserver MakeObserver();
  void OnStep(const StepObservation& step);
  void OnSessionEnd(const SessionObservation& session);
  void SetSchedulerStats(const SchedulerStats& stats);
  // A request refused before (or instead of) generating, by its gRPC status code.
  void OnRefused(grpc::StatusCode code);
  // Every series in the Prometheus text exposition format (version 0.0.4).
  std::string Render() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

class MetricsEndpoint {
 public:
  // Serves GET /metrics with `render()` on host:port (port 0 = any free port). UNAVAILABLE when the
  // port cannot be bound.
  static StatusOr<std::unique_ptr<MetricsEndpoint>> Start(const std::string& host, int port,
                                                          std::function<std::string()> render);
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  int port() const { return port_; }

 private:
  MetricsEndpoint(std::unique_ptr<httplib::Server> server, int port);

  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace dysco::server
