#include "server/dysco_server.h"

#include <future>
#include <thread>
#include <utility>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

namespace dysco::server {
namespace {

// Long prompts as text or token ids: 16 MiB is ~4M token ids, far beyond any context we serve.
constexpr int kMaxReceiveMessageBytes = 16 << 20;
// In-flight RPCs get this long to send their last messages when the gRPC server stops.
constexpr auto kShutdownGrace = std::chrono::seconds(5);

std::string HostPort(const std::string& host, int port) {
  const bool ipv6 = host.find(':') != std::string::npos && host.front() != '[';
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace

DyscoServer::DyscoServer(const ServerOptions& options) : options_(options) {}

DyscoServer::~DyscoServer() { Shutdown(); }

StatusOr<std::unique_ptr<DyscoServer>> DyscoServer::Start(const ServerOptions& options) {
  std::unique_ptr<DyscoServer> s(new DyscoServer(options));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = HostPort(options.host, options.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &s->port_);
  builder.SetMaxReceiveMessageSize(kMaxReceiveMessageBytes);
  builder.RegisterService(&s->service_);
  s->grpc_server_ = builder.BuildAndStart();
  if (s->grpc_server_ == nullptr || s->port_ == 0) {
    s->grpc_server_.reset();
    return UnavailableError("grpc: cannot listen on " + address);
  }
  grpc::HealthCheckServiceInterface* health = s->grpc_server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kReadinessService, false);

  if (options.metrics_port >= 0) {
    DyscoServer* self = s.get();
    auto endpoint = MetricsEndpoint::Start(options.host, options.metrics_port,
                                           [self] { return self->RenderMetrics(); });
    if (!endpoint.ok()) return endpoint.status();  // the destructor stops gRPC
    s->metrics_endpoint_ = std::move(endpoint).value();
  }
  spdlog::info("server_listening grpc={} grpc_port={} metrics_port={}", address, s->port_,
               s->metrics_port());
  return s;
}

Status DyscoServer::LoadModel() {
  if (engine_ != nullptr) return FailedPreconditionError("the model is already loaded");
  const auto t0 = std::chrono::steady_clock::now();
  auto engine = std::make_unique<Engine>();

  ModelRunnerOptions runner_options;
  runner_options.num_threads = options_.threads;
  runner_options.device = options_.device;
  DYSCO_ASSIGN_OR_RETURN(engine->runner, ModelRunner::Load(options_.model, runner_options));
  const ModelConfig& config = engine->runner->config();
  DYSCO_ASSIGN_OR_RETURN(engine->tokenizer,
                         Tokenizer::FromFile(options_.model + "/tokenizer.json"));

  KvPagePoolOptions pool_options;
  pool_options.page_size = options_.page_size;
  pool_options.device = options_.device;
  if (options_.kv_pages > 0) {
    pool_options.num_pages = options_.kv_pages;
  } else {
    pool_options.max_bytes = options_.kv_cache_mb << 20;
  }
  DYSCO_ASSIGN_OR_RETURN(engine->pool, KvPagePool::Create(config, pool_options));

  SchedulerOptions& so = engine->scheduler_options;
  so.max_batch_size = options_.max_batch;
  so.max_queued = options_.max_queued;
  so.prefill_chunk_tokens = options_.prefill_chunk;
  so.max_step_tokens = options_.max_step_tokens;
  so.max_new_tokens_default = options_.max_new_tokens_default;
  so.max_new_tokens_limit = options_.max_new_tokens_limit;
  so.max_context_tokens = options_.max_context;
  DYSCO_ASSIGN_OR_RETURN(engine->scheduler,
                         Scheduler::Create(engine->runner.get(), engine->pool.get(),
                                           engine->tokenizer.get(), so, metrics_.MakeObserver()));

  engine->limits.vocab_size = config.vocab_size;
  engine->limits.num_layers = config.num_layers;
  engine->limits.num_attention_heads = config.num_attention_heads;
  engine->limits.max_new_tokens_limit = so.max_new_tokens_limit;

  engine_ = std::move(engine);
  service_.SetEngine(engine_.get());
  loaded_engine_.store(engine_.get(), std::memory_order_release);
  grpc_server_->GetHealthCheckService()->SetServingStatus(kReadinessService, true);
  spdlog::info(
      "model_loaded model={} name={} device={} kv_pages={} page_size={} kv_cache_mb={:.1f} "
      "max_batch={} max_queued={} seconds={:.2f}",
      options_.model, config.model_name, engine_->runner->device(), engine_->pool->num_total(),
      engine_->pool->page_size(), engine_->pool->tensor_bytes() / 1048576.0, so.max_batch_size,
      so.max_queued, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return OkStatus();
}

void DyscoServer::Drain(std::chrono::duration<double> timeout) {
  service_.BeginDrain();
  if (grpc_server_ != nullptr) {
    grpc_server_->GetHealthCheckService()->SetServingStatus(kReadinessService, false);
  }
  if (engine_ == nullptr) return;
  spdlog::info("drain_start open_sessions={} timeout_s={:.1f}", service_.open_sessions(),
               timeout.count());
  Scheduler* scheduler = engine_->scheduler.get();
  std::promise<void> drained;
  std::future<void> done = drained.get_future();
  std::thread waiter([scheduler, &drained] {
    scheduler->Drain();
    drained.set_value();
  });
  if (done.wait_for(timeout) == std::future_status::timeout) {
    spdlog::warn("drain_timeout cancelling={}", service_.open_sessions());
    // Repeated: a session submitted just before the drain may register after the first pass.
    while (done.wait_for(std::chrono::milliseconds(100)) == std::future_status::timeout) {
      service_.CancelAllSessions();
    }
  }
  waiter.join();
  spdlog::info("drain_done");
}

void DyscoServer::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  if (grpc_server_ != nullptr) {
    // Cancels what is still open after the grace period; their sessions end on the (still
    // running) engine, so every reactor finishes before Wait returns.
    grpc_server_->Shutdown(std::chrono::system_clock::now() + kShutdownGrace);
    grpc_server_->Wait();
  }
  metrics_endpoint_.reset();
  loaded_engine_.store(nullptr, std::memory_order_release);
  engine_.reset();
  grpc_server_.reset();
  spdlog::info("server_stopped");
}

int DyscoServer::metrics_port() const {
  return metrics_endpoint_ != nullptr ? metrics_endpoint_->port() : -1;
}

std::string DyscoServer::RenderMetrics() {
  if (Engine* engine = loaded_engine_.load(std::memory_order_acquire)) {
    // Gauges from the scheduler itself: after the last step they would otherwise keep that step's
    // values while the server is idle.
    metrics_.SetSchedulerStats(engine->scheduler->stats());
  }
  return metrics_.Render();
}

}  // namespace dysco::server
