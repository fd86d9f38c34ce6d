#include "server/metrics.h"

#include "proto/support/grpc_code_names.h"

#include <atomic>
#include <chrono>

#include <array>
#include <map>
#include <utility>
#include <vector>

#include <httplib.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace dysco::server {
namespace {

using prometheus::Histogram;

const Histogram::BucketBoundaries& TtftBuckets() {
  static const Histogram::BucketBoundaries b = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                1,     2.5,  5,     10,   30,  60};
  return b;
}
const Histogram::BucketBoundaries& ItlBuckets() {
  static const Histogram::BucketBoundaries b = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                                0.1,   0.15,   0.2,   0.3,  0.5,  1,    2.5};
  return b;
}
const Histogram::BucketBoundaries& E2eBuckets() {
  static const Histogram::BucketBoundaries b = {0.05, 0.1, 0.25, 0.5, 1,   2.5, 5,
                                                10,   20,  40,   80,  160, 320};
  return b;
}
const Histogram::BucketBoundaries& QueueBuckets() {
  static const Histogram::BucketBoundaries b = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                0.5,   1,     2.5,  5,     10,   30,  60};
  return b;
}
const Histogram::BucketBoundaries& StepBuckets() {
  static const Histogram::BucketBoundaries b = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
  return b;
}
Histogram::BucketBoundaries SelectedBuckets() {
  Histogram::BucketBoundaries b;
  for (double x = 1; x <= 131072; x *= 2) b.push_back(x);
  return b;
}

constexpr std::array<FinishReason, 6> kFinishes = {
    FinishReason::kStop,      FinishReason::kLength,           FinishReason::kStopString,
    FinishReason::kCancelled, FinishReason::kDeadlineExceeded, FinishReason::kError};

// One child per value of the dysco label: [0] = "off", [1] = "on".
template <typename T>
using ByDysco = std::array<T*, 2>;

}  // namespace

struct ServerMetrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  ByDysco<Histogram> ttft{}, itl{}, e2e{}, queue{};
  ByDysco<Histogram> step_real{}, step_sample{};
  Histogram* step_speculative = nullptr;  // DySCO steps only: dysco="on"
  Histogram* step_select = nullptr;
  Histogram* selected_tokens = nullptr;
  ByDysco<prometheus::Counter> prompt_tokens{}, generation_tokens{};
  std::map<std::pair<FinishReason, bool>, prometheus::Counter*> requests;
  prometheus::Gauge* running = nullptr;
  prometheus::Gauge* waiting = nullptr;
  prometheus::Gauge* kv_usage = nullptr;
  prometheus::Counter* callback_errors = nullptr;
  prometheus::Family<prometheus::Counter>* refused = nullptr;
  std::atomic<int64_t> callback_errors_seen{0};  // the scheduler's count at the last refresh
};

ServerMetrics::ServerMetrics() : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  prometheus::Registry& r = *m.registry;
  const char* const kDysco[2] = {"off", "on"};

  auto& ttft = prometheus::BuildHistogram()
                   .Name("dysco_time_to_first_token_seconds")
                   .Help("Time from submission to the first generated token")
                   .Register(r);
  auto& itl = prometheus::BuildHistogram()
                  .Name("dysco_inter_token_latency_seconds")
                  .Help("Time between consecutive generated tokens of a request")
                  .Register(r);
  auto& e2e = prometheus::BuildHistogram()
                  .Name("dysco_e2e_request_latency_seconds")
                  .Help("Time from submission to the end of the request")
                  .Register(r);
  auto& queue = prometheus::BuildHistogram()
                    .Name("dysco_request_queue_time_seconds")
                    .Help("Time a request waited before it was admitted to the running batch")
                    .Register(r);
  auto& step = prometheus::BuildHistogram()
                   .Name("dysco_step_seconds")
                   .Help(
                       "Wall time of one engine step's pass: speculative (DySCO probe pass), "
                       "select (relevance update, selection, bias), real (the model pass), "
                       "sample")
                   .Register(r);
  auto& selected = prometheus::BuildHistogram()
                       .Name("dysco_selected_tokens")
                       .Help("Context tokens DySCO selected for one sequence at one step")
                       .Register(r);
  auto& prompt = prometheus::BuildCounter()
                     .Name("dysco_prompt_tokens_total")
                     .Help("Prompt tokens of finished requests")
                     .Register(r);
  auto& generation = prometheus::BuildCounter()
                         .Name("dysco_generation_tokens_total")
                         .Help("Generated tokens of finished requests")
                         .Register(r);
  auto& requests = prometheus::BuildCounter()
                       .Name("dysco_requests_total")
                       .Help("Finished requests by finish reason")
                       .Register(r);
  m.running = &prometheus::BuildGauge()
                   .Name("dysco_requests_running")
                   .Help("Requests in the running batch")
                   .Register(r)
                   .Add({});
  m.waiting = &prometheus::BuildGauge()
                   .Name("dysco_requests_waiting")
                   .Help("Requests waiting for admission")
                   .Register(r)
                   .Add({});
  m.kv_usage = &prometheus::BuildGauge()
                    .Name("dysco_kv_cache_usage_ratio")
                    .Help("Fraction of KV cache pages in use")
                    .Register(r)
                    .Add({});

  m.callback_errors = &prometheus::BuildCounter()
                           .Name("dysco_callback_errors_total")
                           .Help(
                               "Exceptions thrown by session callbacks or metric observers on "
                               "the engine thread (caught; the engine goes on)")
                           .Register(r)
                           .Add({});

  m.refused = &prometheus::BuildCounter()
                   .Name("dysco_requests_refused_total")
                   .Help("Requests refused before generating, by gRPC status code")
                   .Register(r);

  for (int d = 0; d < 2; ++d) {
    const prometheus::Labels labels = {{"dysco", kDysco[d]}};
    m.ttft[d] = &ttft.Add(labels, TtftBuckets());
    m.itl[d] = &itl.Add(labels, ItlBuckets());
    m.e2e[d] = &e2e.Add(labels, E2eBuckets());
    m.queue[d] = &queue.Add(labels, QueueBuckets());
    m.step_real[d] = &step.Add({{"pass", "real"}, {"dysco", kDysco[d]}}, StepBuckets());
    m.step_sample[d] = &step.Add({{"pass", "sample"}, {"dysco", kDysco[d]}}, StepBuckets());
    m.prompt_tokens[d] = &prompt.Add(labels);
    m.generation_tokens[d] = &generation.Add(labels);
    for (const FinishReason f : kFinishes) {
      m.requests[{f, d == 1}] =
          &requests.Add({{"finish_reason", FinishReasonName(f)}, {"dysco", kDysco[d]}});
    }
  }
  m.step_speculative = &step.Add({{"pass", "speculative"}, {"dysco", "on"}}, StepBuckets());
  m.step_select = &step.Add({{"pass", "select"}, {"dysco", "on"}}, StepBuckets());
  m.selected_tokens = &selected.Add({}, SelectedBuckets());
}

ServerMetrics::~ServerMetrics() = default;

SchedulerObserver ServerMetrics::MakeObserver() {
  SchedulerObserver observer;
  observer.on_step = [this](const StepObservation& step) { OnStep(step); };
  observer.on_session_end = [this](const SessionObservation& s) { OnSessionEnd(s); };
  return observer;
}

void ServerMetrics::OnStep(const StepObservation& step) {
  Impl& m = *impl_;
  m.running->Set(static_cast<double>(step.running));
  m.waiting->Set(static_cast<double>(step.waiting));
  m.kv_usage->Set(step.kv_usage_ratio);
  if (step.batch_rows <= 0) return;
  const int d = step.dysco_rows > 0 ? 1 : 0;
  if (step.speculative_rows > 0) m.step_speculative->Observe(step.timings.speculative_seconds);
  if (step.dysco_rows > 0) m.step_select->Observe(step.timings.select_seconds);
  m.step_real[d]->Observe(step.timings.real_seconds);
  m.step_sample[d]->Observe(step.timings.sample_seconds);
  for (const int64_t n : step.selected_tokens) m.selected_tokens->Observe(static_cast<double>(n));
}

void ServerMetrics::OnSessionEnd(const SessionObservation& s) {
  Impl& m = *impl_;
  const int d = s.dysco ? 1 : 0;
  if (s.usage.generated_tokens > 0) m.ttft[d]->Observe(s.usage.time_to_first_token_seconds);
  m.e2e[d]->Observe(s.usage.total_seconds);
  m.queue[d]->Observe(s.usage.queue_seconds);
  for (const double x : s.inter_token_seconds) m.itl[d]->Observe(x);
  m.prompt_tokens[d]->Increment(static_cast<double>(s.usage.prompt_tokens));
  m.generation_tokens[d]->Increment(static_cast<double>(s.usage.generated_tokens));
  const auto it = m.requests.find({s.finish, s.dysco});
  if (it != m.requests.end()) it->second->Increment();
}

void ServerMetrics::SetSchedulerStats(const SchedulerStats& stats) {
  impl_->running->Set(static_cast<double>(stats.running));
  impl_->waiting->Set(static_cast<double>(stats.waiting));
  impl_->kv_usage->Set(stats.kv_usage_ratio);
  // A counter follows the scheduler's running count: add what is new since the last refresh.
  const int64_t seen = impl_->callback_errors_seen.exchange(stats.callback_errors);
  if (stats.callback_errors > seen) {
    impl_->callback_errors->Increment(static_cast<double>(stats.callback_errors - seen));
  }
}

void ServerMetrics::OnRefused(grpc::StatusCode code) {
  impl_->refused->Add({{"code", GrpcCodeName(code)}}).Increment();
}

std::string ServerMetrics::Render() const {
  return prometheus::TextSerializer().Serialize(impl_->registry->Collect());
}

MetricsEndpoint::MetricsEndpoint(std::unique_ptr<httplib::Server> server, int port)
    : server_(std::move(server)), port_(port) {
  thread_ = std::thread([s = server_.get()] { s->listen_after_bind(); });
  // httplib's stop() does nothing before the listen loop is running, and the loop would then never
  // end: a server that fails right after starting (a bad model package) hung in its destructor.
  // Wait (bounded) until it runs, so that the destructor's stop() always reaches it.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!server_->is_running() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

MetricsEndpoint::~MetricsEndpoint() {
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& host, int port, std::function<std::string()> render) {
  auto server = std::make_unique<httplib::Server>();
  server->Get("/metrics",
              [render = std::move(render)](const httplib::Request&, httplib::Response& response) {
                response.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
              });
  int bound = port;
  if (port == 0) {
    bound = server->bind_to_any_port(host);
  } else if (!server->bind_to_port(host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    return UnavailableError("metrics: cannot listen on " + host + ":" + std::to_string(port));
  }
  return std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint(std::move(server), bound));
}

}  // namespace dysco::server
