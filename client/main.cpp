// dysco-client: command-line client of the dysco.v1.Generation service (see commands.h).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "commands.h"

namespace {

constexpr char kUsage[] =
    "usage: dysco-client COMMAND [flags]   (dysco-client COMMAND --help for its flags)\n"
    "\n"
    "commands:\n"
    "  generate   stream a completion (text to stdout, usage and timings to stderr)\n"
    "  info       print the served model's info (GetModelInfo)\n"
    "  health     grpc.health.v1 Check; exit 0 only when SERVING\n"
    "  tokenize   print the token ids of a text (Tokenize)\n"
    "  bench      concurrent streaming load: TTFT, inter-token latency, tokens/s\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? dysco::client::kExitUsage : dysco::client::kExitOk;
  }
  std::string command = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "generate") return dysco::client::RunGenerate(args);
  if (command == "info") return dysco::client::RunInfo(args);
  if (command == "health") return dysco::client::RunHealth(args);
  if (command == "tokenize") return dysco::client::RunTokenize(args);
  if (command == "bench") return dysco::client::RunBench(args);
  std::fprintf(stderr, "dysco-client: unknown command '%s'\n\n%s", command.c_str(), kUsage);
  return dysco::client::kExitUsage;
}
