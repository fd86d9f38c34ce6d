#include "server/dysco_server.h"

#include <algorithm>
#include <fstream>
#include <future>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

#include <google/protobuf/stubs/common.h>
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

#include "core/base/format.h"
#include "grpc/health/v1/health.pb.h"
#include "server/grpc_status.h"

namespace dysco::server {
namespace {

// In-flight RPCs get this long to send their last messages when the gRPC server stops.
constexpr auto kShutdownGrace = std::chrono::seconds(5);

#if GOOGLE_PROTOBUF_VERSION < 4022000
// Protobuf's own log lines (e.g. "String field ... contains invalid UTF-8 data" when a request does
// not parse) become one structured line each instead of free text on stderr.
void ProtobufLog(google::protobuf::LogLevel level, const char* file, int line,
                 const std::string& message) {
  spdlog::warn("protobuf_log level={} source={}:{} message={}", static_cast<int>(level), file, line,
               QuoteUntrusted(message, kMaxStatusMessageBytes));
}
#endif

void InstallProtobufLogHandler() {
#if GOOGLE_PROTOBUF_VERSION < 4022000
  static std::once_flag once;
  std::call_once(once, [] { google::protobuf::SetLogHandler(&ProtobufLog); });
#endif
}

// --reflection for this server: linking grpc++_reflection registers its plugin with every
// ServerBuilder of the process (a static initialiser), so turning reflection off means taking the
// plugin out of this builder's list; turning it on puts exactly one in (whether or not that
// initialiser ran).
class ReflectionOption final : public grpc::ServerBuilderOption {
 public:
  explicit ReflectionOption(bool enabled) : enabled_(enabled) {}
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    auto ours = std::make_unique<grpc::reflection::ProtoServerReflectionPlugin>();
    const std::string name = ours->name();
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [&](const auto& plugin) { return plugin->name() == name; }),
                   plugins->end());
    if (enabled_) plugins->push_back(std::move(ours));
  }

 private:
  const bool enabled_;
};

StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (!in || !(text << in.rdbuf()))
    return NotFoundError(std::string(flag) + ": cannot read " + path);
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return InvalidArgumentError(std::string(flag) + ": " + path + " is not a PEM file");
  }
  return text.str();
}

// Plaintext, TLS, or mutual TLS (a client certificate signed by --tls-client-ca is required).
StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(const ServerOptions& options) {
  if (options.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                    : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  DYSCO_ASSIGN_OR_RETURN(pair.private_key, ReadPem("--tls-key", options.tls_key));
  DYSCO_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem("--tls-cert", options.tls_cert));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.tls_client_ca.empty()) {
    DYSCO_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem("--tls-client-ca", options.tls_client_ca));
  }
  return grpc::SslServerCredentials(ssl);
}

std::string HostPort(const std::string& host, int port) {
  const bool ipv6 = host.find(':') != std::string::npos && host.front() != '[';
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace

DyscoServer::DyscoServer(const ServerOptions& options) : options_(options) {}

DyscoServer::~DyscoServer() { Shutdown(); }

StatusOr<std::unique_ptr<DyscoServer>> DyscoServer::Start(const ServerOptions& options) {
  std::unique_ptr<DyscoServer> s(new DyscoServer(options));
  InstallProtobufLogHandler();

  DYSCO_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                         MakeCredentials(options));
  if (!options.auth_token_file.empty()) {
    DYSCO_ASSIGN_OR_RETURN(s->tokens_, BearerTokens::Load(options.auth_token_file));
    s->service_.SetTokens(s->tokens_.get());
  }

  grpc::EnableDefaultHealthCheckService(true);
  // The default health service answers from gRPC's own (upb) code, so without this the protobuf
  // descriptor of grpc.health.v1 is never linked in and reflection lists Health but cannot
  // describe it (FileContainingSymbol: NOT_FOUND): reflection-driven tools could not call it.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<ReflectionOption>(options.reflection));
  const std::string address = HostPort(options.host, options.port);
  builder.AddListeningPort(address, credentials, &s->port_);
  // Checked by gRPC before the message is parsed or reaches us (RESOURCE_EXHAUSTED).
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_request_bytes));
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
    const std::string& metrics_host =
        options.metrics_host.empty() ? options.host : options.metrics_host;
    auto endpoint = MetricsEndpoint::Start(metrics_host, options.metrics_port,
                                           [self] { return self->RenderMetrics(); });
    if (!endpoint.ok()) return endpoint.status();  // the destructor stops gRPC
    s->metrics_endpoint_ = std::move(endpoint).value();
  }
  spdlog::info("server_listening grpc={} grpc_port={} metrics_port={} tls={} auth={} reflection={}",
               address, s->port_, s->metrics_port(),
               options.tls_cert.empty() ? "off" : (options.tls_client_ca.empty() ? "on" : "mutual"),
               s->tokens_ != nullptr ? "bearer" : "off", options.reflection ? "on" : "off");
  return s;
}

Status DyscoServer::LoadModel() {
  if (engine_ != nullptr) return FailedPreconditionError("the model is already loaded");
  const auto t0 = std::chrono::steady_clock::now();
  EngineOptions o;
  o.runner.num_threads = options_.threads;
  o.runner.device = options_.device;
  o.runner.cuda_graphs = options_.cuda_graphs;
  // A decode step batches at most max_batch sequences: no bucket past it is ever captured.
  o.runner.cuda_graph_max_batch = options_.max_batch;
  o.runner.log_info = [](const std::string& line) { spdlog::info("{}", line); };
  o.page_size = options_.page_size;
  o.kv_pages = options_.kv_pages;
  o.kv_cache_fraction = options_.kv_cache_fraction;
  o.kv_cache_bytes = options_.kv_cache_mb << 20;
  o.limits.max_new_tokens_default = options_.max_new_tokens_default;
  o.limits.max_new_tokens_limit = options_.max_new_tokens_limit;
  o.limits.max_context_tokens = options_.max_context;
  o.scheduler.max_batch_size = options_.max_batch;
  o.scheduler.max_queued = options_.max_queued;
  o.scheduler.prefill_chunk_tokens = options_.prefill_chunk;
  o.scheduler.max_step_tokens = options_.max_step_tokens;
  o.observer = metrics_.MakeObserver();
  DYSCO_ASSIGN_OR_RETURN(engine_, Engine::Load(options_.model, std::move(o)));

  service_.SetEngine(engine_.get());
  loaded_engine_.store(engine_.get(), std::memory_order_release);
  grpc_server_->GetHealthCheckService()->SetServingStatus(kReadinessService, true);
  const KvPagePool& pool = engine_->pool();
  // kv_sizing: how the pool was sized (--kv-pages, --kv-cache-mb, or --kv-cache-fraction of
  // device_free_mb, the device memory free after the model was loaded).
  const char* sizing = options_.kv_pages > 0              ? "pages"
                       : options_.kv_cache_fraction > 0.0 ? "fraction"
                                                          : "mb";
  spdlog::info(
      "model_loaded model={} name={} device={} kv_pages={} page_size={} kv_cache_mb={:.1f} "
      "kv_sizing={} kv_cache_fraction={} device_free_mb={:.1f} prefill_chunk={} "
      "max_step_tokens={} max_batch={} max_queued={} cpu_threads={} seconds={:.2f}",
      options_.model, engine_->config().model_name, engine_->runner().device(), pool.num_total(),
      pool.page_size(), pool.tensor_bytes() / 1048576.0, sizing, options_.kv_cache_fraction,
      pool.device_free_bytes() / 1048576.0, options_.prefill_chunk, options_.max_step_tokens,
      options_.max_batch, options_.max_queued, engine_->runner().cpu_threads(),
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return OkStatus();
}

void DyscoServer::Drain(std::chrono::duration<double> timeout) {
  service_.BeginDrain();
  if (grpc_server_ != nullptr) {
    grpc_server_->GetHealthCheckService()->SetServingStatus(kReadinessService, false);
  }
  if (engine_ == nullptr) return;
  Scheduler* scheduler = engine_->scheduler();
  const SchedulerStats before = scheduler->stats();
  spdlog::info("drain_start open_sessions={} timeout_s={:.1f}", before.running + before.waiting,
               timeout.count());
  std::promise<void> drained;
  std::future<void> done = drained.get_future();
  std::thread waiter([scheduler, &drained] {
    scheduler->Drain();
    drained.set_value();
  });
  if (done.wait_for(timeout) == std::future_status::timeout) {
    const SchedulerStats now = scheduler->stats();
    spdlog::warn("drain_timeout cancelling={}", now.running + now.waiting);
    // Repeated: a session submitted just before the drain may be queued after the first pass.
    do {
      scheduler->CancelAll();
    } while (done.wait_for(std::chrono::milliseconds(100)) == std::future_status::timeout);
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

void DyscoServer::ReloadTokens() {
  if (tokens_ == nullptr) {
    spdlog::info("auth_reload skipped=\"no --auth-token-file\"");
    return;
  }
  const StatusOr<size_t> n = tokens_->Reload();
  if (n.ok()) {
    spdlog::info("auth_reload tokens={}", *n);
  } else {
    spdlog::error("auth_reload_failed status={} kept=previous tokens",
                  QuoteUntrusted(n.status().ToString(), kMaxStatusMessageBytes));
  }
}

int DyscoServer::metrics_port() const {
  return metrics_endpoint_ != nullptr ? metrics_endpoint_->port() : -1;
}

std::string DyscoServer::RenderMetrics() {
  if (Engine* engine = loaded_engine_.load(std::memory_order_acquire)) {
    // Gauges from the scheduler itself: after the last step they would otherwise keep that step's
    // values while the server is idle.
    metrics_.SetSchedulerStats(engine->scheduler()->stats());
  }
  return metrics_.Render();
}

}  // namespace dysco::server
