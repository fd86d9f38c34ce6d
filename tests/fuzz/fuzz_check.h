// What the libFuzzer targets of tests/fuzz share: FUZZ_CHECK, an invariant that aborts when it
// fails (libFuzzer then reports a crash and saves the input), and the paths of the test data.
//
// Thread-safety: libFuzzer runs a target on one thread. Ownership: nothing is allocated here.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace dysco::fuzz {

// The tokenizers the targets load once (tests/data).
inline std::string DataPath(const std::string& relative) {
  return std::string(DYSCO_SOURCE_DIR) + "/tests/data/" + relative;
}

[[noreturn]] inline void CheckFailed(const char* file, int line, const char* condition,
                                     const std::string& detail) {
  std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n  %s\n", file, line, condition,
               detail.c_str());
  std::abort();
}

}  // namespace dysco::fuzz

// FUZZ_CHECK(condition, detail): `detail` (a std::string expression) is evaluated only on failure.
#define FUZZ_CHECK(condition, detail)                                       \
  do {                                                                      \
    if (!(condition)) {                                                     \
      ::dysco::fuzz::CheckFailed(__FILE__, __LINE__, #condition, (detail)); \
    }                                                                       \
  } while (0)
