// Constants of the DySCO op contract (docs/dysco.md) that both the kernels and the torch-free
// engine code in core/ need, so that each value has one home. Torch-free on purpose: include it
// from anywhere.
// Thread-safety: compile-time constants only. Ownership: nothing to own.
#pragma once

namespace dysco {

// strength >= kHardMaskStrength selects hard sparse attention: the bias is 0 at the selected keys
// and the current one, -inf elsewhere (template_mask not applied); below it, the soft bias
// log(strength) on the selected keys (docs/dysco.md "Per-request parameters" and "Ops").
inline constexpr double kHardMaskStrength = 99.0;

}  // namespace dysco
