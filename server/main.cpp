// dysco-server: serves a model package over gRPC (dysco.v1.Generation) with Prometheus metrics.
// See server/server_options.h for the flags. SIGTERM / SIGINT drain (new requests UNAVAILABLE,
// running ones finish within --drain-timeout, the rest are cancelled) and then stop the server; a
// second signal exits at once (Ctrl-C twice). SIGHUP re-reads --auth-token-file.
// Exit codes: 0 after a drain, 1 when the server cannot start or load the model (or on a second
// signal), 2 for bad flags.
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "server/dysco_server.h"
#include "server/server_options.h"

namespace {

// A handler rather than sigwait: libraries start threads before main (OpenBLAS), which would not
// inherit a blocked mask, so a signal could land on one of them. The handler only does
// async-signal-safe things: it hands the signal to the main thread through a pipe.
int g_signal_pipe[2] = {-1, -1};
std::atomic<int> g_signals{0};

extern "C" void OnSignal(int signal_number) {
  if (signal_number != SIGHUP && g_signals.fetch_add(1) > 0) {
    static const char kMessage[] = "dysco-server: second signal, exiting now\n";
    const ssize_t written = write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
    (void)written;
    _exit(1);
  }
  const unsigned char byte = static_cast<unsigned char>(signal_number);
  const ssize_t written = write(g_signal_pipe[1], &byte, 1);
  (void)written;
}

bool InstallSignalHandlers() {
  if (pipe(g_signal_pipe) != 0) return false;
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  return sigaction(SIGINT, &action, nullptr) == 0 && sigaction(SIGTERM, &action, nullptr) == 0 &&
         sigaction(SIGHUP, &action, nullptr) == 0;
}

int WaitForSignal() {
  unsigned char byte = 0;
  while (read(g_signal_pipe[0], &byte, 1) != 1) {
    if (errno != EINTR) return 0;
  }
  return byte;
}

}  // namespace

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
  if (!InstallSignalHandlers()) {
    spdlog::error("start_failed status=\"cannot install the signal handlers\"");
    return 1;
  }

  // A signal during the model load is acted on once the load is over.
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

  int signal_number = WaitForSignal();
  while (signal_number == SIGHUP) {
    spdlog::info("signal_received signal=SIGHUP");
    (*server)->ReloadTokens();
    signal_number = WaitForSignal();
  }
  spdlog::info("signal_received signal={}", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Drain(std::chrono::duration<double>(options->drain_timeout_seconds));
  (*server)->Shutdown();
  return 0;
}
