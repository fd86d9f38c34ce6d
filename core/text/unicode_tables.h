// Unicode data tables for the tokenizer (generated into core/text/unicode_tables.cpp by
// tools/gen_unicode_tables.py): general-category ranges and the canonical normalization data for
// NFC/NFD.
//
// Thread-safety: constant data, freely shared. Ownership: static storage, nothing to free.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dysco::unicode {

struct CodepointRange {
  char32_t first;
  char32_t last;  // inclusive
};

struct CombiningClassRange {
  char32_t first;
  char32_t last;  // inclusive
  uint8_t ccc;
};

// Full canonical decomposition of `cp`: kDecompositionData[offset .. offset + length).
struct Decomposition {
  char32_t cp;
  uint16_t offset;
  uint8_t length;
};

// Primary composite: first + second -> composite (sorted by first, then second).
struct Composition {
  char32_t first;
  char32_t second;
  char32_t composite;
};

extern const char kUnicodeVersion[];
// Sorted, disjoint ranges.
extern const CodepointRange kLetterRanges[];  // \p{L}
extern const size_t kLetterRangesCount;
extern const CodepointRange kNumberRanges[];  // \p{N}
extern const size_t kNumberRangesCount;
extern const CodepointRange kRustNumericRanges[];  // Rust char::is_numeric (\p{N} of Unicode 15)
extern const size_t kRustNumericRangesCount;
extern const CodepointRange
    kWhiteSpaceRanges[];  // White_Space (regex \s, Rust char::is_whitespace)
extern const size_t kWhiteSpaceRangesCount;
extern const CodepointRange
    kWordRanges[];  // Rust regex \w (approximation of Alphabetic|M|Nd|Pc|Join_Control)
extern const size_t kWordRangesCount;

extern const CombiningClassRange kCombiningClassRanges[];  // only non-zero classes
extern const size_t kCombiningClassRangeCount;
extern const char32_t kDecompositionData[];
extern const Decomposition kDecompositions[];  // sorted by cp
extern const size_t kDecompositionCount;
extern const Composition kCompositions[];
extern const size_t kCompositionCount;

}  // namespace dysco::unicode
