// FinishReason: why a generation ended, the one type for it from the Sequence up to the server's
// metrics and the proto mapping.
//
// Thread-safety: a value type and a pure function.
#pragma once

namespace dysco {

enum class FinishReason {
  kNone,              // still running
  kStop,              // an eos token or a stop token id was generated
  kLength,            // max_new_tokens reached, or the context is full
  kStopString,        // a stop string appeared; the text ends right before it
  kCancelled,         // the caller cancelled it (or the engine shut down)
  kDeadlineExceeded,  // its deadline passed
  kError,             // the engine failed while stepping it
};

// "none", "stop", "length", "stop_string", "cancelled", "deadline_exceeded", "error": the
// `finish_reason` label of the metrics and the trace.
const char* FinishReasonName(FinishReason reason);

}  // namespace dysco
