// Constants of the DySCO op contract (docs/dysco.md) that both the kernels and the torch-free
// engine code in core/ need, so that each value has one home. Torch-free on purpose: include it
// from anywhere.
// Thread-safety: compile-time constants only. Ownership: nothing to own.
#pragma once

#include <cstdint>

namespace dysco {

// strength >= kHardMaskStrength selects hard sparse attention: the bias is 0 at the selected keys
// and the current one, -inf elsewhere (template_mask not applied); below it, the soft bias
// log(strength) on the selected keys (docs/dysco.md "Per-request parameters" and "Ops").
inline constexpr double kHardMaskStrength = 99.0;

// dysco_probe_mean takes at most this many heads (its CUDA kernel gets them by value); the runner
// reduces longer head lists with ATen ops instead.
inline constexpr int64_t kMaxProbeMeanHeads = 64;

}  // namespace dysco
