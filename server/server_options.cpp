#include "server/server_options.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <vector>

#include <yaml-cpp/yaml.h>

namespace dysco::server {
namespace {

const char kUsage[] =
    "usage: dysco-server --model DIR [--config FILE.yaml] [--host ADDR] [--port N]\n"
    "         [--metrics-host ADDR] [--metrics-port N] [--device cpu|cuda:0]\n"
    "         [--cuda-graphs true|false]\n"
    "         [--kv-pages N | --kv-cache-mb MB | --kv-cache-fraction F]\n"
    "         [--page-size N] [--max-batch N] [--max-queued N] [--max-context N]\n"
    "         [--prefill-chunk N] [--max-step-tokens N] [--threads N]\n"
    "         [--max-new-tokens-default N] [--max-new-tokens-limit N] [--drain-timeout SECONDS]\n"
    "         [--log-level trace|debug|info|warn|error|off]\n"
    "         [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--auth-token-file FILE]\n"
    "         [--reflection true|false] [--max-request-bytes N]\n"
    "  --config: a YAML map whose keys are these flag names without the dashes ('-' or '_'),\n"
    "            e.g. `kv_cache_mb: 512`; flags given on the command line win.\n"
    "  --kv-cache-fraction: CUDA devices only, in (0, 0.95]: the KV cache takes this fraction of\n"
    "            the device memory free once the model is loaded (e.g. 0.9).\n"
    "  --prefill-chunk / --max-step-tokens default to 256 / 256 on cpu, 8192 / 8192 + max-batch\n"
    "            on cuda.\n"
    "  --port 0 / --metrics-port 0 pick a free port; --metrics-port -1 disables /metrics;\n"
    "  --metrics-host defaults to --host (127.0.0.1 keeps /metrics local).\n"
    "  --tls-client-ca: mutual TLS, clients must present a certificate signed by this CA.\n"
    "  --auth-token-file: one bearer token per line ('#' comments); Generate, GetModelInfo and\n"
    "            Tokenize need `authorization: Bearer <token>` (health and reflection stay open);\n"
    "            SIGHUP re-reads the file.\n";

// `where` names the flag (or file: key) in errors.
Status ParseInt(const std::string& where, const std::string& value, int64_t lo, int64_t hi,
                int64_t* out) {
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE) {
    return InvalidArgumentError(where + " needs an integer, got \"" + value + "\"");
  }
  if (x < lo || x > hi) {
    return InvalidArgumentError(where + " must be in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "], got " + value);
  }
  *out = x;
  return OkStatus();
}

template <typename T>
std::function<Status(ServerOptions*, const std::string&, const std::string&)> IntSetter(
    T ServerOptions::*field, int64_t lo, int64_t hi) {
  return [field, lo, hi](ServerOptions* o, const std::string& where, const std::string& value) {
    int64_t x = 0;
    DYSCO_RETURN_IF_ERROR(ParseInt(where, value, lo, hi, &x));
    o->*field = static_cast<T>(x);
    return OkStatus();
  };
}

std::function<Status(ServerOptions*, const std::string&, const std::string&)> StringSetter(
    std::string ServerOptions::*field) {
  return [field](ServerOptions* o, const std::string& where, const std::string& value) {
    if (value.empty()) return InvalidArgumentError(where + " must not be empty");
    o->*field = value;
    return OkStatus();
  };
}

std::function<Status(ServerOptions*, const std::string&, const std::string&)> BoolSetter(
    bool ServerOptions::*field) {
  return [field](ServerOptions* o, const std::string& where, const std::string& value) {
    if (value == "true" || value == "1" || value == "yes") {
      o->*field = true;
    } else if (value == "false" || value == "0" || value == "no") {
      o->*field = false;
    } else {
      return InvalidArgumentError(where + " must be true or false, got \"" + value + "\"");
    }
    return OkStatus();
  };
}

using Setter = std::function<Status(ServerOptions*, const std::string&, const std::string&)>;

std::string FormatFraction(double x) {
  std::string s = std::to_string(x);  // "0.950000"
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

// Flag name (without "--") -> setter. The YAML keys are the same names.
const std::map<std::string, Setter>& Setters() {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  static const std::map<std::string, Setter> setters = {
      {"model", StringSetter(&ServerOptions::model)},
      {"host", StringSetter(&ServerOptions::host)},
      {"port", IntSetter(&ServerOptions::port, 0, 65535)},
      {"metrics-port", IntSetter(&ServerOptions::metrics_port, -1, 65535)},
      {"metrics-host", StringSetter(&ServerOptions::metrics_host)},
      {"tls-cert", StringSetter(&ServerOptions::tls_cert)},
      {"tls-key", StringSetter(&ServerOptions::tls_key)},
      {"tls-client-ca", StringSetter(&ServerOptions::tls_client_ca)},
      {"auth-token-file", StringSetter(&ServerOptions::auth_token_file)},
      {"reflection", BoolSetter(&ServerOptions::reflection)},
      {"max-request-bytes", IntSetter(&ServerOptions::max_request_bytes, 1024, 1 << 30)},
      {"device", StringSetter(&ServerOptions::device)},
      {"cuda-graphs", BoolSetter(&ServerOptions::cuda_graphs)},
      {"kv-pages", IntSetter(&ServerOptions::kv_pages, 1, kIntMax - 1)},
      {"kv-cache-mb", IntSetter(&ServerOptions::kv_cache_mb, 1, int64_t{1} << 24)},
      {"kv-cache-fraction",
       [](ServerOptions* o, const std::string& where, const std::string& value) {
         errno = 0;
         char* end = nullptr;
         const double x = std::strtod(value.c_str(), &end);
         if (value.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x) || x <= 0 ||
             x > kMaxKvCacheFraction) {
           return InvalidArgumentError(where + " needs a fraction in (0, " +
                                       FormatFraction(kMaxKvCacheFraction) + "], got \"" + value +
                                       "\"");
         }
         o->kv_cache_fraction = x;
         return OkStatus();
       }},
      {"page-size", IntSetter(&ServerOptions::page_size, 1, 4096)},
      {"max-batch", IntSetter(&ServerOptions::max_batch, 1, 4096)},
      {"max-queued", IntSetter(&ServerOptions::max_queued, 0, 1 << 20)},
      {"max-context", IntSetter(&ServerOptions::max_context, 0, kIntMax)},
      {"prefill-chunk", IntSetter(&ServerOptions::prefill_chunk, 1, kIntMax)},
      {"max-step-tokens", IntSetter(&ServerOptions::max_step_tokens, 1, kIntMax)},
      {"threads", IntSetter(&ServerOptions::threads, 0, 1024)},
      {"max-new-tokens-default", IntSetter(&ServerOptions::max_new_tokens_default, 1, kIntMax)},
      {"max-new-tokens-limit", IntSetter(&ServerOptions::max_new_tokens_limit, 1, kIntMax)},
      {"drain-timeout",
       [](ServerOptions* o, const std::string& where, const std::string& value) {
         errno = 0;
         char* end = nullptr;
         const double x = std::strtod(value.c_str(), &end);
         if (value.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x) || x < 0) {
           return InvalidArgumentError(where + " needs a number of seconds >= 0, got \"" + value +
                                       "\"");
         }
         o->drain_timeout_seconds = x;
         return OkStatus();
       }},
      {"log-level",
       [](ServerOptions* o, const std::string& where, const std::string& value) {
         static const char* const kLevels[] = {"trace", "debug", "info", "warn", "error", "off"};
         for (const char* level : kLevels) {
           if (value == level) {
             o->log_level = value;
             return OkStatus();
           }
         }
         return InvalidArgumentError(
             where + " must be one of trace, debug, info, warn, error, off, got \"" + value + "\"");
       }},
  };
  return setters;
}

// `given` receives the option names (flag spelling) the file sets.
Status ApplyConfigFile(const std::string& path, ServerOptions* options,
                       std::set<std::string>* given) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return NotFoundError(path + ": cannot open the config file");
  } catch (const YAML::Exception& e) {
    return InvalidArgumentError(path + ": " + e.what());
  }
  if (root.IsNull()) return OkStatus();  // an empty file
  if (!root.IsMap()) return InvalidArgumentError(path + ": must be a map of option: value");
  for (const auto& item : root) {
    std::string key;
    try {
      key = item.first.as<std::string>();
    } catch (const YAML::Exception&) {
      return InvalidArgumentError(path + ": keys must be option names");
    }
    std::string name = key;
    for (char& c : name) {
      if (c == '_') c = '-';
    }
    const std::string where = path + ": " + key;
    const auto it = Setters().find(name);
    if (it == Setters().end() || name == "config") {
      return InvalidArgumentError(where + ": unknown option");
    }
    if (!item.second.IsScalar()) return InvalidArgumentError(where + " must be a scalar");
    DYSCO_RETURN_IF_ERROR(it->second(options, where, item.second.Scalar()));
    given->insert(name);
  }
  return OkStatus();
}

// The KV cache is sized by one of kv-pages, kv-cache-mb, kv-cache-fraction. Two in one source are
// an error; the command line's choice replaces the file's (so an overlay's flag works over a
// config that sets kv_cache_mb).
constexpr const char* kKvSizingOptions[] = {"kv-pages", "kv-cache-mb", "kv-cache-fraction"};

Status CheckOneKvSizing(const std::set<std::string>& given, const std::string& source) {
  std::vector<std::string> set;
  for (const char* name : kKvSizingOptions) {
    if (given.count(name) > 0) set.push_back(name);
  }
  if (set.size() <= 1) return OkStatus();
  return InvalidArgumentError(source + " sets " + set[0] + " and " + set[1] +
                              ": the KV cache size is one of --kv-pages, --kv-cache-mb, "
                              "--kv-cache-fraction");
}

bool GivesKvSizing(const std::set<std::string>& given) {
  for (const char* name : kKvSizingOptions) {
    if (given.count(name) > 0) return true;
  }
  return false;
}

bool IsCudaDevice(const std::string& device) { return device.rfind("cuda", 0) == 0; }

}  // namespace

const char* ServerUsage() { return kUsage; }

StatusOr<ServerOptions> ParseServerFlags(const std::vector<std::string>& args, bool* help) {
  ServerOptions options;
  *help = false;
  // Flags win over the file: read the file first, then apply every flag.
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") {
      *help = true;
      return options;
    }
    if (args[i] == "--config") {
      if (i + 1 >= args.size()) return InvalidArgumentError("--config needs a file");
      options.config_file = args[i + 1];
    } else if (args[i].rfind("--config=", 0) == 0) {
      options.config_file = args[i].substr(9);
    }
  }
  std::set<std::string> from_file;
  if (!options.config_file.empty()) {
    DYSCO_RETURN_IF_ERROR(ApplyConfigFile(options.config_file, &options, &from_file));
    DYSCO_RETURN_IF_ERROR(CheckOneKvSizing(from_file, options.config_file));
  }
  const ServerOptions defaults;
  std::set<std::string> from_flags;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag.rfind("--", 0) != 0)
      return InvalidArgumentError("unexpected argument \"" + flag + "\"");
    std::string name = flag.substr(2);
    std::string value;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else {
      if (i + 1 >= args.size()) return InvalidArgumentError(flag + " needs a value");
      value = args[++i];
    }
    if (name == "config") continue;
    const auto it = Setters().find(name);
    if (it == Setters().end()) return InvalidArgumentError("unknown flag --" + name);
    // A sizing flag replaces the file's sizing (the one read before any flag).
    if (!GivesKvSizing(from_flags) && GivesKvSizing(from_file) &&
        std::find(std::begin(kKvSizingOptions), std::end(kKvSizingOptions), name) !=
            std::end(kKvSizingOptions)) {
      options.kv_pages = defaults.kv_pages;
      options.kv_cache_mb = defaults.kv_cache_mb;
      options.kv_cache_fraction = defaults.kv_cache_fraction;
    }
    DYSCO_RETURN_IF_ERROR(it->second(&options, "--" + name, value));
    from_flags.insert(name);
  }
  DYSCO_RETURN_IF_ERROR(CheckOneKvSizing(from_flags, "the command line"));
  const bool cuda = IsCudaDevice(options.device);
  if (options.kv_cache_fraction > 0 && !cuda) {
    return InvalidArgumentError(
        "--kv-cache-fraction sizes the KV cache from a CUDA device's free "
        "memory; --device is " +
        options.device + " (use --kv-cache-mb or --kv-pages)");
  }
  auto given = [&](const char* name) {
    return from_flags.count(name) > 0 || from_file.count(name) > 0;
  };
  if (cuda && !given("prefill-chunk")) options.prefill_chunk = kCudaPrefillChunk;
  if (cuda && !given("max-step-tokens")) {
    options.max_step_tokens = options.prefill_chunk + options.max_batch;
  }
  if (options.model.empty()) return InvalidArgumentError("--model is required");
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return InvalidArgumentError("--tls-cert and --tls-key must be given together");
  }
  if (!options.tls_client_ca.empty() && options.tls_cert.empty()) {
    return InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if (options.max_new_tokens_default > options.max_new_tokens_limit) {
    return InvalidArgumentError("--max-new-tokens-default (" +
                                std::to_string(options.max_new_tokens_default) +
                                ") must be <= --max-new-tokens-limit (" +
                                std::to_string(options.max_new_tokens_limit) + ")");
  }
  return options;
}

}  // namespace dysco::server
