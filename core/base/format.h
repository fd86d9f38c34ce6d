// Number formatting for messages that a person reads (status messages, logs, traces): one home, so
// that "got 1.5" reads the same from every validator.
//
// Thread-safety: pure functions. Ownership: returns a new string.
#pragma once

#include <string>

namespace dysco {

// The shortest decimal text that reads back as the same double: "1.5", "0.975", "1e-05", "inf".
std::string FormatNumber(double x);

}  // namespace dysco
