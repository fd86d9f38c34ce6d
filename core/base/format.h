// Text for messages that a person reads (status messages, logs, traces): numbers, and text that
// came from a client. One home, so that "got 1.5" reads the same from every validator and no client
// text reaches a status message or a log line unescaped.
//
// Thread-safety: pure functions. Ownership: returns a new string.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace dysco {

// The shortest decimal text that reads back as the same double: "1.5", "0.975", "1e-05", "inf".
std::string FormatNumber(double x);

// Client-supplied text made safe for one log line or a status message: in double quotes, with `"`,
// `\`, control characters and every byte >= 0x80 escaped (\n, \t, \xNN), and cut after
// `max_bytes` input bytes with the full length noted: "abc..." (1048576 bytes). A forged log line
// ("x\nts=... event=...") stays inside one quoted value; a 1 MB field gives a short message.
std::string QuoteUntrusted(std::string_view text, size_t max_bytes = 64);

}  // namespace dysco
