// Temporary files and directories for tests, with POSIX calls only: code linked with the torch 2.11
// wheel must not rely on std::filesystem (remove_all in particular), so the tests do not use it.
// MakeTempDir creates a fresh directory (mkdtemp under $TMPDIR or /tmp), RemoveTree deletes a
// directory and everything in it (nftw, depth-first, symlinks not followed), PathExists says
// whether a path exists.
//
// Thread-safety: the functions keep no state; nftw is not re-entrant, so RemoveTree must not be
// called from two threads at once. Ownership: the caller owns what MakeTempDir creates and removes
// it with RemoveTree.
#pragma once

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace dysco {

// "<TMPDIR or /tmp>/<prefix>XXXXXX", created with mode 0700; "" when mkdtemp fails.
inline std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string path =
      std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/" + prefix + "XXXXXX";
  std::vector<char> buf(path.begin(), path.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) return "";
  return std::string(buf.data());
}

inline bool PathExists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// Deletes `path` and, when it is a directory, everything under it. True when nothing is left
// (a missing path is not an error).
inline bool RemoveTree(const std::string& path) {
  if (!PathExists(path)) return true;
  const auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) -> int {
    return std::remove(p) == 0 || errno == ENOENT ? 0 : -1;
  };
  return ::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) == 0;
}

}  // namespace dysco
