#include "core/text/tokenizer_bpe.h"

#include <cstdio>
#include <functional>
#include <queue>

#include "core/text/unicode_text.h"

namespace dysco::tokenizer_internal {

StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(
    std::unordered_map<std::string, int32_t> vocab,
    const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
    const std::string& origin) {
  std::unique_ptr<BpeModel> model(new BpeModel());
  model->vocab_ = std::move(vocab);
  model->options_ = std::move(options);
  if (model->options_.unk_token) {
    auto it = model->vocab_.find(*model->options_.unk_token);
    if (it == model->vocab_.end()) {
      return InvalidArgumentError(origin + ": model.unk_token '" + *model->options_.unk_token +
                                  "' is not in model.vocab");
    }
    model->unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = model->vocab_.find(name);
    model->byte_fallback_ids_[b] = it == model->vocab_.end() ? -1 : it->second;
  }
  const size_t prefix_len = model->options_.continuing_subword_prefix.size();
  model->merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = model->vocab_.find(a);
    auto ib = model->vocab_.find(b);
    if (ia == model->vocab_.end() || ib == model->vocab_.end()) {
      return InvalidArgumentError(origin + ": model.merges[" + std::to_string(rank) + "] ('" + a +
                                  "' '" + b + "') uses a token that is not in model.vocab");
    }
    // As `tokenizers` does: the continuing-subword prefix of the right part is not repeated in the
    // result.
    const std::string merged = a + (b.size() >= prefix_len ? b.substr(prefix_len) : b);
    auto im = model->vocab_.find(merged);
    if (im == model->vocab_.end()) {
      return InvalidArgumentError(origin + ": model.merges[" + std::to_string(rank) + "] gives '" +
                                  merged + "', which is not in model.vocab");
    }
    // Later duplicates overwrite earlier ones, as collecting into a HashMap does in `tokenizers`.
    model->merges_[PairKey(ia->second, ib->second)] =
        MergeInfo{static_cast<uint32_t>(rank), im->second};
  }
  return model;
}

const BpeModel::MergeInfo* BpeModel::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    MergeWord(word, out);
    return;
  }
  std::string key(word);
  CacheShard& shard = cache_[std::hash<std::string>()(key) % kCacheShards];
  {
    MutexLock lock(&shard.mu);
    auto it = shard.words.find(key);
    if (it != shard.words.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out->size();
  MergeWord(word, out);
  MutexLock lock(&shard.mu);
  if (shard.words.size() < kCacheEntriesPerShard) {
    shard.words.emplace(std::move(key), std::vector<int32_t>(out->begin() + first, out->end()));
  }
}

void BpeModel::MergeWord(std::string_view word, std::vector<int32_t>* out) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t len;  // bytes of the word it covers; 0 once merged into its left neighbour
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](int32_t id, uint32_t len) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{id, index - 1, -1, len});
    if (index > 0) symbols[index - 1].next = index;
  };

  // A pending unknown character (several when fused): its id and byte length.
  bool has_unk = false;
  int32_t unk_id = -1;
  uint32_t unk_len = 0;
  std::string piece;
  for (size_t pos = 0; pos < word.size();) {
    size_t len;
    unicode::DecodeValidUtf8(word, pos, &len);
    const bool is_first = pos == 0, is_last = pos + len == word.size();
    piece.clear();
    if (!is_first) piece += options_.continuing_subword_prefix;
    piece.append(word.data() + pos, len);
    if (is_last) piece += options_.end_of_word_suffix;
    pos += len;

    if (auto it = vocab_.find(piece); it != vocab_.end()) {
      if (has_unk) {
        add(unk_id, unk_len);
        has_unk = false;
      }
      add(it->second, static_cast<uint32_t>(len));
      continue;
    }
    if (options_.byte_fallback) {
      bool all_known = true;
      for (char c : piece)
        all_known = all_known && byte_fallback_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all_known) {
        // `tokenizers` does not flush a pending unk here; the byte tokens go first.
        for (char c : piece) add(byte_fallback_ids_[static_cast<unsigned char>(c)], 1);
        continue;
      }
    }
    if (unk_id_) {
      if (has_unk && options_.fuse_unk) {
        unk_len += static_cast<uint32_t>(len);
      } else {
        if (has_unk) add(unk_id, unk_len);
        has_unk = true;
        unk_id = *unk_id_;
        unk_len = static_cast<uint32_t>(len);
      }
    }
    // Without an unk token an unknown character is dropped, as in `tokenizers`.
  }
  if (has_unk) add(unk_id, unk_len);

  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  // Lowest rank first; among equal ranks the leftmost.
  const auto lower_priority = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> queue(
      lower_priority);
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeInfo* m = FindMerge(symbols[i].id, symbols[i + 1].id)) {
      queue.push(Candidate{m->rank, static_cast<int32_t>(i), m->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next < 0) continue;
    const Symbol right = symbols[left.next];
    // A stale entry: the pair at this position changed since it was queued (checked by result, like
    // `tokenizers`).
    const MergeInfo* current = FindMerge(left.id, right.id);
    if (current == nullptr || current->new_id != top.new_id) continue;
    symbols[left.next].len = 0;
    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const MergeInfo* m = FindMerge(symbols[left.prev].id, left.id)) {
        queue.push(Candidate{m->rank, left.prev, m->new_id});
      }
    }
    if (left.next >= 0) {
      if (const MergeInfo* m = FindMerge(left.id, symbols[left.next].id)) {
        queue.push(Candidate{m->rank, top.pos, m->new_id});
      }
    }
  }
  for (const Symbol& s : symbols) {
    if (s.len != 0) out->push_back(s.id);
  }
}

}  // namespace dysco::tokenizer_internal
