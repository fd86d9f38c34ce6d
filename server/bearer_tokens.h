// BearerTokens: the set of API tokens dysco-server accepts (`--auth-token-file`), checked against a
// request's `authorization: Bearer <token>` metadata by GenerationService before any work.
//
// The file holds one token per line; blank lines and lines starting with '#' are ignored, spaces
// around a token are trimmed. Several tokens let operators rotate: add the new one, roll the
// clients, remove the old one, each time followed by SIGHUP (Reload) instead of a restart.
//
// Thread-safety: Check may run on any number of gRPC threads while Reload runs on the signal
// thread: the set is an immutable snapshot swapped under `mu_`. Ownership: owns its snapshot; the
// tokens never leave this class (never logged, never in a status message).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/status.h"
#include "core/base/thread_annotations.h"

namespace dysco::server {

class BearerTokens {
 public:
  // Reads `path`: NOT_FOUND when it cannot be read, INVALID_ARGUMENT when it holds no token.
  static StatusOr<std::unique_ptr<BearerTokens>> Load(const std::string& path);

  // Re-reads the file; on failure keeps the current tokens and says why. Returns the new count.
  StatusOr<size_t> Reload();

  // OK, or UNAUTHENTICATED naming what is wrong (missing header, not a Bearer token, unknown
  // token). `authorization` is the metadata value, or null when the header is absent. Compares in
  // time independent of where a wrong token differs.
  Status Check(const std::string_view* authorization) const;

  const std::string& path() const { return path_; }

 private:
  using TokenList = std::vector<std::string>;
  explicit BearerTokens(std::string path) : path_(std::move(path)) {}
  static StatusOr<std::shared_ptr<const TokenList>> ReadFile(const std::string& path);
  std::shared_ptr<const TokenList> Snapshot() const;

  const std::string path_;
  mutable Mutex mu_;
  std::shared_ptr<const TokenList> tokens_ GUARDED_BY(mu_);
};

}  // namespace dysco::server
