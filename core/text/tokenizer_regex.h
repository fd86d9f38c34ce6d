// Hand-written matchers for the pre-tokenization regexes that byte-level BPE tokenizers actually
// use, with the leftmost-first, backtracking semantics of Oniguruma (what `tokenizers` runs them
// with):
//   GPT-2 (also the ByteLevel pre-tokenizer's built-in regex):
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama-3 (and Qwen2/Qwen3 with \p{N} instead of \p{N}{1,3}):
//     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//     ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+| \s+(?!\S)|\s+
// A regex is recognised by its exact pattern string; anything else is not supported.
//
// Thread-safety: pure functions. Ownership: results returned by value / written to caller-owned
// vectors.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace dysco::tokenizer_internal {

enum class SplitRegex {
  kGpt2,
  kLlama3,  // digits in groups of up to three
  kQwen2,   // digits one at a time
};

std::optional<SplitRegex> RecognizeSplitRegex(std::string_view pattern);

// Byte spans [begin, end) of the successive non-overlapping matches of `regex` in valid UTF-8
// `text`, as Regex::find_iter gives them.
void FindRegexMatches(SplitRegex regex, std::string_view text,
                      std::vector<std::pair<size_t, size_t>>* matches);

}  // namespace dysco::tokenizer_internal
