// dysco-server: serves a model package over gRPC (dysco.v1.Generation) with Prometheus metrics.
// See server/server_options.h for the flags; SIGTERM / SIGINT drain (new requests UNAVAILABLE,
// running ones finish within --drain-timeout, the rest are cancelled) and then stop the server.
// Exit codes: 0 after a drain, 1 when the server cannot start or load the model, 2 for bad flags.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "server/dysco_server.h"
#include "server/server_options.h"

int main(int argc, char** argv) {
  namespace srv = dysco::server;
  const std::vector<std::string> args(argv + 1, argv + argc);
  bool help = false;
  auto options = srv::ParseServerFlags(args, &help);
  if (help) {
    std::fputs(srv::ServerUsage(), stdout);
    return 0;
  }
  if (!options.ok()) {
    std::fprintf(stderr, "dysco-server: %s\n%s", options.status().message().c_str(),
                 srv::ServerUsage());
    return 2;
  }

  // logfmt-style lines: every message starts with its event name, then key=value pairs.
  spdlog::set_pattern("ts=%Y-%m-%dT%H:%M:%S.%e%z level=%l event=%v");
  spdlog::set_level(spdlog::level::from_str(options->log_level));

  // Blocked before any thread starts, so that every thread inherits the mask and only sigwait below
  // sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = srv::DyscoServer::Start(*options);
  if (!server.ok()) {
    spdlog::error("start_failed status=\"{}\"", server.status().ToString());
    return 1;
  }
  const dysco::Status loaded = (*server)->LoadModel();
  if (!loaded.ok()) {
    spdlog::error("load_failed status=\"{}\"", loaded.ToString());
    return 1;
  }
  spdlog::info("ready grpc_port={} metrics_port={}", (*server)->port(), (*server)->metrics_port());

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("signal_received signal={}", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Drain(std::chrono::duration<double>(options->drain_timeout_seconds));
  (*server)->Shutdown();
  return 0;
}
