// Unicode text helpers for the tokenizer: UTF-8 decoding/encoding, character classes (\p{L}, \p{N},
// \s, \w, Rust's char::is_numeric), NFC/NFD normalization, and lossy UTF-8 repair with the exact
// rules of Rust's `String::from_utf8_lossy` (one U+FFFD per maximal invalid subpart), which
// `tokenizers` uses when decoding.
//
// Thread-safety: all functions are pure; the lookup tables are built once, thread-safely, on first
// use. Ownership: results are returned by value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dysco::unicode {

enum CharClass : uint8_t {
  kLetter = 1,      // \p{L}
  kNumber = 2,      // \p{N} (also Rust char::is_numeric)
  kWhiteSpace = 4,  // \s, White_Space
  kWord = 8,        // Rust regex \w
  kRustNumeric =
      16,  // Rust char::is_numeric, used by the Digits pre-tokenizer (one Unicode version newer)
};

uint8_t ClassesOf(char32_t cp);
inline bool IsLetter(char32_t cp) { return ClassesOf(cp) & kLetter; }
inline bool IsNumber(char32_t cp) { return ClassesOf(cp) & kNumber; }
inline bool IsWhiteSpace(char32_t cp) { return ClassesOf(cp) & kWhiteSpace; }
inline bool IsWordChar(char32_t cp) { return ClassesOf(cp) & kWord; }
inline bool IsRustNumeric(char32_t cp) { return ClassesOf(cp) & kRustNumeric; }

// Decodes the character at s[pos] of VALID UTF-8; stores its length in *len.
inline char32_t DecodeValidUtf8(std::string_view s, size_t pos, size_t* len) {
  const auto b0 = static_cast<unsigned char>(s[pos]);
  if (b0 < 0x80) {
    *len = 1;
    return b0;
  }
  if (b0 < 0xE0) {
    *len = 2;
    return ((b0 & 0x1Fu) << 6) | (static_cast<unsigned char>(s[pos + 1]) & 0x3Fu);
  }
  if (b0 < 0xF0) {
    *len = 3;
    return ((b0 & 0x0Fu) << 12) | ((static_cast<unsigned char>(s[pos + 1]) & 0x3Fu) << 6) |
           (static_cast<unsigned char>(s[pos + 2]) & 0x3Fu);
  }
  *len = 4;
  return ((b0 & 0x07u) << 18) | ((static_cast<unsigned char>(s[pos + 1]) & 0x3Fu) << 12) |
         ((static_cast<unsigned char>(s[pos + 2]) & 0x3Fu) << 6) |
         (static_cast<unsigned char>(s[pos + 3]) & 0x3Fu);
}

void AppendUtf8(char32_t cp, std::string* out);

// Length of the valid UTF-8 sequence starting at s[pos], or 0 if the bytes there are not one.
size_t ValidUtf8SequenceLength(std::string_view s, size_t pos);
bool IsValidUtf8(std::string_view s);

// Rust's String::from_utf8_lossy.
std::string Utf8Lossy(std::string_view bytes);
// Number of bytes at the end of `bytes` that are a valid but incomplete UTF-8 sequence (0..3): what
// a streaming decoder must hold back because later bytes may complete it.
size_t IncompleteUtf8Tail(std::string_view bytes);

// Canonical normalization of valid UTF-8 (unchanged fast path for text that cannot change).
std::string Nfc(std::string_view utf8);
std::string Nfd(std::string_view utf8);

}  // namespace dysco::unicode
