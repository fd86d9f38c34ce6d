// The dysco-client subcommands. Each takes the words after its name and returns the process exit
// code: 0 success, 1 an RPC failed (the gRPC code name and message go to stderr), 2 bad usage, and
// for health 1 also when the server answered but is not SERVING. Output for people or scripts goes
// to stdout; progress, usage and timings go to stderr. Thread-safety: call from the main thread
// only (generate installs a SIGINT handler).
#pragma once

#include <string>
#include <vector>

namespace dysco::client {

int RunGenerate(const std::vector<std::string>& args);
int RunInfo(const std::vector<std::string>& args);
int RunHealth(const std::vector<std::string>& args);
int RunTokenize(const std::vector<std::string>& args);
int RunBench(const std::vector<std::string>& args);

inline constexpr int kExitOk = 0;
inline constexpr int kExitRpcError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitInterrupted = 130;

}  // namespace dysco::client
