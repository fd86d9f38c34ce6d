#include "server/bearer_tokens.h"

#include <fstream>
#include <sstream>

namespace dysco::server {
namespace {

// Equal-length inputs compare in constant time; a length mismatch is not secret (tokens of one
// deployment share a length) but still walks the candidate so that timing says little.
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  }
  return diff == 0;
}

std::string_view Trim(std::string_view s) {
  const size_t begin = s.find_first_not_of(" \t\r");
  if (begin == std::string_view::npos) return {};
  const size_t end = s.find_last_not_of(" \t\r");
  return s.substr(begin, end - begin + 1);
}

}  // namespace

StatusOr<std::shared_ptr<const BearerTokens::TokenList>> BearerTokens::ReadFile(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("--auth-token-file: cannot read " + path);
  auto tokens = std::make_shared<TokenList>();
  std::string line;
  while (std::getline(in, line)) {
    const std::string_view token = Trim(line);
    if (token.empty() || token.front() == '#') continue;
    if (token.find_first_of(" \t") != std::string_view::npos) {
      return InvalidArgumentError("--auth-token-file: " + path +
                                  ": a line holds more than one word (one token per line)");
    }
    tokens->emplace_back(token);
  }
  if (in.bad()) return NotFoundError("--auth-token-file: cannot read " + path);
  if (tokens->empty()) return InvalidArgumentError("--auth-token-file: " + path + " has no token");
  return std::shared_ptr<const TokenList>(std::move(tokens));
}

StatusOr<std::unique_ptr<BearerTokens>> BearerTokens::Load(const std::string& path) {
  DYSCO_ASSIGN_OR_RETURN(std::shared_ptr<const TokenList> tokens, ReadFile(path));
  std::unique_ptr<BearerTokens> set(new BearerTokens(path));
  MutexLock lock(&set->mu_);
  set->tokens_ = std::move(tokens);
  return set;
}

StatusOr<size_t> BearerTokens::Reload() {
  DYSCO_ASSIGN_OR_RETURN(std::shared_ptr<const TokenList> tokens, ReadFile(path_));
  const size_t n = tokens->size();
  MutexLock lock(&mu_);
  tokens_ = std::move(tokens);
  return n;
}

std::shared_ptr<const BearerTokens::TokenList> BearerTokens::Snapshot() const {
  MutexLock lock(&mu_);
  return tokens_;
}

Status BearerTokens::Check(const std::string_view* authorization) const {
  if (authorization == nullptr) {
    return UnauthenticatedError(
        "missing credentials: send metadata `authorization: Bearer <token>`");
  }
  constexpr std::string_view kScheme = "Bearer ";
  if (authorization->size() <= kScheme.size() ||
      authorization->substr(0, kScheme.size()) != kScheme) {
    return UnauthenticatedError("the authorization metadata is not `Bearer <token>`");
  }
  const std::string_view presented = Trim(authorization->substr(kScheme.size()));
  bool match = false;
  for (const std::string& token : *Snapshot()) match |= ConstantTimeEquals(presented, token);
  if (!match) return UnauthenticatedError("invalid bearer token");
  return OkStatus();
}

}  // namespace dysco::server
