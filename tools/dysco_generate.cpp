// dysco-generate: generates one completion for a prompt with a model package, streaming the text to
// stdout as it is produced, then one summary line:
//   prompt_tokens=N generated_tokens=M tokens_per_second=X.X finish_reason=stop|length|stop_string
// tokens_per_second is the decode rate: tokens after the first over the time after the first.
// Bad flags: a message on stderr and exit code 2. Other failures: the Status on stderr and exit
// code 1.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "core/generator.h"
#include "core/kv_page_pool.h"
#include "core/model_runner.h"
#include "core/tokenizer.h"

namespace {

const char kUsage[] =
    "usage: dysco-generate --model DIR --prompt TEXT --max-new-tokens N\n"
    "         [--chat] [--system TEXT]\n"
    "         [--temperature T] [--top-k K] [--top-p P] [--seed S] [--repetition-penalty R]\n"
    "         [--stop STR]... [--threads N] [--kv-pages N] [--page-size N] [--prefill-chunk N]\n";

struct Flags {
  std::string model;
  std::string prompt;
  bool has_prompt = false;
  bool chat = false;
  std::string system;
  bool has_system = false;
  int64_t max_new_tokens = -1;
  dysco::SamplingParams sampling;
  std::vector<std::string> stops;
  int threads = 0;
  int64_t kv_pages = 0;  // 0: enough for prompt + max_new_tokens
  int page_size = 16;
  int64_t prefill_chunk = 512;
};

[[noreturn]] void Die(const std::string& message) {
  std::cerr << "dysco-generate: " << message << "\n" << kUsage;
  std::exit(2);
}

int64_t ParseInt(const std::string& flag, const std::string& value, int64_t lo, int64_t hi) {
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE)
    Die(flag + " needs an integer, got \"" + value + "\"");
  if (x < lo || x > hi) {
    Die(flag + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
        value);
  }
  return x;
}

uint64_t ParseUint(const std::string& flag, const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(value.c_str(), &end, 10);
  if (value.empty() || value[0] == '-' || *end != '\0' || errno == ERANGE) {
    Die(flag + " needs a non-negative integer, got \"" + value + "\"");
  }
  return x;
}

double ParseDouble(const std::string& flag, const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const double x = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || errno == ERANGE)
    Die(flag + " needs a number, got \"" + value + "\"");
  return x;
}

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (flag == "--chat") {
      f.chat = true;
      continue;
    }
    if (i + 1 >= argc) Die("unknown flag or missing value: " + flag);
    const std::string value = argv[++i];
    if (flag == "--model") {
      f.model = value;
    } else if (flag == "--prompt") {
      f.prompt = value;
      f.has_prompt = true;
    } else if (flag == "--system") {
      f.system = value;
      f.has_system = true;
    } else if (flag == "--max-new-tokens") {
      f.max_new_tokens = ParseInt(flag, value, 1, kIntMax);
    } else if (flag == "--temperature") {
      f.sampling.temperature = ParseDouble(flag, value);
    } else if (flag == "--top-k") {
      f.sampling.top_k = static_cast<int>(ParseInt(flag, value, 0, kIntMax));
    } else if (flag == "--top-p") {
      f.sampling.top_p = ParseDouble(flag, value);
    } else if (flag == "--seed") {
      f.sampling.seed = ParseUint(flag, value);
    } else if (flag == "--repetition-penalty") {
      f.sampling.repetition_penalty = ParseDouble(flag, value);
    } else if (flag == "--stop") {
      if (value.empty()) Die("--stop needs a non-empty string");
      f.stops.push_back(value);
    } else if (flag == "--threads") {
      f.threads = static_cast<int>(ParseInt(flag, value, 1, 1024));
    } else if (flag == "--kv-pages") {
      f.kv_pages = ParseInt(flag, value, 1, kIntMax - 1);
    } else if (flag == "--page-size") {
      f.page_size = static_cast<int>(ParseInt(flag, value, 1, 4096));
    } else if (flag == "--prefill-chunk") {
      f.prefill_chunk = ParseInt(flag, value, 1, kIntMax);
    } else {
      Die("unknown flag " + flag);
    }
  }
  if (f.model.empty()) Die("--model is required");
  if (!f.has_prompt) Die("--prompt is required");
  if (f.max_new_tokens < 0) Die("--max-new-tokens is required");
  if (f.has_system && !f.chat) Die("--system needs --chat");
  const dysco::Status s = f.sampling.Validate();
  if (!s.ok()) Die(s.message());
  return f;
}

int Fail(const dysco::Status& s) {
  std::cerr << "dysco-generate: " << s.ToString() << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);

  dysco::ModelRunnerOptions runner_options;
  runner_options.num_threads = flags.threads;
  auto runner = dysco::ModelRunner::Load(flags.model, runner_options);
  if (!runner.ok()) return Fail(runner.status());
  const dysco::ModelConfig& config = (*runner)->config();
  auto tokenizer = dysco::Tokenizer::FromFile(flags.model + "/tokenizer.json");
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  dysco::GenerateRequest request;
  if (flags.chat) {
    if (flags.has_system) request.messages.push_back({"system", flags.system});
    request.messages.push_back({"user", flags.prompt});
  } else {
    request.prompt = flags.prompt;
  }
  request.max_new_tokens = flags.max_new_tokens;
  request.sampling = flags.sampling;
  request.stop_strings = flags.stops;

  dysco::KvPagePoolOptions pool_options;
  pool_options.page_size = flags.page_size;
  pool_options.num_pages = flags.kv_pages;
  if (pool_options.num_pages == 0) {
    // Just enough for this one request: sizing the cache for the whole context would allocate (and
    // zero) memory the request never touches.
    auto prompt = dysco::BuildPromptTokens(config, **tokenizer, request);
    if (!prompt.ok()) return Fail(prompt.status());
    const int64_t tokens =
        std::min<int64_t>(static_cast<int64_t>(prompt->size()) + flags.max_new_tokens,
                          config.max_position_embeddings);
    pool_options.num_pages = (tokens + flags.page_size - 1) / flags.page_size;
  }
  auto pool = dysco::KvPagePool::Create(config, pool_options);
  if (!pool.ok()) return Fail(pool.status());

  dysco::GeneratorOptions generator_options;
  generator_options.prefill_chunk_tokens = flags.prefill_chunk;
  dysco::Generator generator(runner->get(), pool->get(), tokenizer->get(), generator_options);
  auto result = generator.Generate(request, [](const dysco::TokenDelta& delta) {
    if (!delta.text.empty()) {
      std::fwrite(delta.text.data(), 1, delta.text.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (!result.ok()) {
    std::fputc('\n', stdout);
    return Fail(result.status());
  }
  const double rate = result->generated_tokens > 1 && result->decode_seconds > 0
                          ? (result->generated_tokens - 1) / result->decode_seconds
                          : 0.0;
  std::printf(
      "\nprompt_tokens=%lld generated_tokens=%lld tokens_per_second=%.1f finish_reason=%s\n",
      static_cast<long long>(result->prompt_tokens),
      static_cast<long long>(result->generated_tokens), rate,
      dysco::FinishReasonName(result->finish_reason));
  return 0;
}
