// BpeModel: the BPE model of a Hugging Face tokenizer.json, turning one pre-tokenized word into ids
// exactly as `tokenizers`' BPE::tokenize does (rank-ordered merges through a priority queue, byte
// fallback, unk fusing, ignore_merges, continuing-subword prefix / end-of-word suffix). Dropout is
// not supported.
//
// Thread-safety: Tokenize may be called concurrently; the model is immutable after construction
// except for the word cache, which is sharded and mutex-protected. Ownership: BpeModel owns its
// vocabulary, merges and cache.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/base/status.h"
#include "core/base/thread_annotations.h"

namespace dysco::tokenizer_internal {

struct BpeOptions {
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
};

class BpeModel {
 public:
  // `merges` are pairs of token strings in rank order. Errors (INVALID_ARGUMENT) name the offending
  // merge or token; `origin` names the file.
  static StatusOr<std::unique_ptr<BpeModel>> Create(
      std::unordered_map<std::string, int32_t> vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
      const std::string& origin);

  // Appends the ids of `word` (valid UTF-8) to *out.
  void Tokenize(std::string_view word, std::vector<int32_t>* out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  struct MergeInfo {
    uint32_t rank;
    int32_t new_id;
  };
  struct CacheShard {
    Mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>> words GUARDED_BY(mu);
  };
  static constexpr size_t kCacheShards = 32;
  static constexpr size_t kCacheEntriesPerShard = 4096;
  static constexpr size_t kMaxCachedWordBytes = 128;

  BpeModel() = default;
  void MergeWord(std::string_view word, std::vector<int32_t>* out) const;
  const MergeInfo* FindMerge(int32_t left, int32_t right) const;
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, MergeInfo> merges_;
  BpeOptions options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_fallback_ids_{};  // -1 where <0xXX> is not in the vocabulary
  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace dysco::tokenizer_internal
