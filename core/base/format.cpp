#include "core/base/format.h"

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

}  // namespace dysco
