// Tokenizer: byte-level BPE that reads a Hugging Face `tokenizer.json` and reproduces the
// `tokenizers` library's ids (normalizer, Split/Digits/ByteLevel pre-tokenizers, BPE merges, added
// and special tokens, byte fallback). StreamingDecoder turns ids into text incrementally, never
// emitting half a UTF-8 character.
//
// Thread-safety: a Tokenizer is immutable after construction; Encode/Decode may be called from any
// number of threads at once. A StreamingDecoder belongs to one sequence and is not thread-safe.
// Ownership: FromFile/FromJson return a Tokenizer owned by the caller; on failure nothing is
// allocated. A StreamingDecoder holds a reference to its Tokenizer, which must outlive it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/base/status.h"

namespace dysco {

class Tokenizer {
 public:
  // Errors name the file and what is wrong with it (NOT_FOUND, INVALID_ARGUMENT, UNIMPLEMENTED for
  // a tokenizer kind that is not byte-level BPE).
  static StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text,
                                                       const std::string& origin = "<memory>");
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encodes text. With parse_special, added tokens written in the text (e.g. "<|im_start|>") become
  // their ids, as `tokenizers` does by default; without it they are encoded as plain text. Text
  // that is not valid UTF-8 is first repaired (invalid bytes become U+FFFD, as in Rust's
  // String::from_utf8_lossy). Characters with no token (and no unk / byte fallback) are dropped,
  // as `tokenizers` does.
  std::vector<int32_t> Encode(std::string_view text, bool parse_special = true) const;
  // Encodes text with special-token parsing on, except for special tokens that overlap one of
  // `plain_spans` (sorted half-open byte ranges): a chat prompt's message contents, so that a
  // client's "<|im_start|>" is text and only the template itself opens and closes turns. Text that
  // is not valid UTF-8 is repaired and encoded with no special token.
  std::vector<int32_t> EncodeWithPlainSpans(
      std::string_view text, const std::vector<std::pair<size_t, size_t>>& plain_spans) const;
  // Decodes ids to text (invalid UTF-8 from partial byte sequences becomes U+FFFD, as `tokenizers`
  // does).
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::string IdToToken(int32_t id) const;  // empty for an out-of-range id
  int32_t vocab_size() const;               // largest id + 1, added tokens included
  bool IsSpecial(int32_t id) const;         // an added token marked "special"
  // Raw bytes this id stands for (the byte-level alphabet undone); special tokens give their
  // content.
  std::string TokenBytes(int32_t id) const;
  // An upper bound on the input bytes one token of Encode's output can stand for (the longest
  // token's bytes, times 3 where a normalizer can compose up to three UTF-8 sequences into one
  // character, e.g. Hangul jamo): text longer than n times this cannot encode to n tokens or fewer,
  // which lets a request be refused before it is tokenized. SIZE_MAX / 4 when an added token strips
  // surrounding whitespace (it can swallow any amount).
  size_t max_input_bytes_per_token() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer for one sequence.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special = true);
  // Appends one id; returns the text that became complete (possibly empty while a UTF-8 character
  // is split across tokens).
  std::string Push(int32_t id);
  // Returns whatever is left (incomplete bytes become U+FFFD) and resets.
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete UTF-8 character
};

}  // namespace dysco
