#include "core/base/format.h"

#include <algorithm>
#include <cstdlib>
#include <sstream>

namespace dysco {

std::string FormatNumber(double x) {
  for (int precision = 1; precision <= 17; ++precision) {
    std::ostringstream os;
    os.precision(precision);
    os << x;
    // Every finite double reads back exactly at precision 17; inf and nan at precision 1.
    if (std::strtod(os.str().c_str(), nullptr) == x) return os.str();
  }
  std::ostringstream os;
  os << x;  // nan: never equal to itself
  return os.str();
}

std::string QuoteUntrusted(std::string_view text, size_t max_bytes) {
  static const char kHex[] = "0123456789abcdef";
  const size_t n = std::min(text.size(), max_bytes);
  std::string out = "\"";
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          out += "\\x";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  if (n < text.size()) return out + "...\" (" + std::to_string(text.size()) + " bytes)";
  return out + "\"";
}

}  // namespace dysco
