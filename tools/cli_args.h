// CommandLine: the flag-value parsing shared by the command-line tools (header-only, since
// tools/CMakeLists.txt makes every tools/*.cpp an executable). A bad value is a usage error,
// reported the same way by every tool: "<program>: <message>" and the usage text on stderr, exit
// code 2.
//
// Thread-safety: immutable after construction; the parse functions may run on any thread, but an
// error ends the process.
//
// Ownership: program and usage are not copied; they must outlive the CommandLine (string literals).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>

namespace dysco::cli {

class CommandLine {
 public:
  constexpr CommandLine(const char* program, const char* usage)
      : program_(program), usage_(usage) {}

  // --help / -h: prints the usage on stdout and exits 0.
  void ExitIfHelp(const std::string& flag) const {
    if (flag == "--help" || flag == "-h") {
      std::cout << usage_;
      std::exit(0);
    }
  }

  // The value of the flag argv[*i]: the next argument, onto which *i moves. A flag without one
  // (which an unknown flag at the end also looks like) is a usage error.
  std::string TakeValue(int argc, char** argv, int* i) const {
    if (*i + 1 >= argc) Die("unknown flag or missing value: " + std::string(argv[*i]));
    return argv[++*i];
  }

  [[noreturn]] void Die(const std::string& message) const {
    std::cerr << program_ << ": " << message << "\n" << usage_;
    std::exit(2);
  }

  int64_t ParseInt(const std::string& flag, const std::string& value, int64_t lo,
                   int64_t hi) const {
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

  uint64_t ParseUint(const std::string& flag, const std::string& value) const {
    errno = 0;
    char* end = nullptr;
    const unsigned long long x = std::strtoull(value.c_str(), &end, 10);
    if (value.empty() || value[0] == '-' || *end != '\0' || errno == ERANGE) {
      Die(flag + " needs a non-negative integer, got \"" + value + "\"");
    }
    return x;
  }

  double ParseDouble(const std::string& flag, const std::string& value) const {
    errno = 0;
    char* end = nullptr;
    const double x = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || errno == ERANGE)
      Die(flag + " needs a number, got \"" + value + "\"");
    return x;
  }

 private:
  const char* program_;
  const char* usage_;
};

}  // namespace dysco::cli
