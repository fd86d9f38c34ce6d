// Constants of the DySCO ops that torch-free code (core/) needs too: one home for each.
// Thread-safety: compile-time constants.
#pragma once

namespace dysco::kernels {

// A DySCO strength at or above this is hard sparse attention: the bias is 0 at the selected keys
// and -inf elsewhere instead of log(strength) (docs/dysco.md "Bias vector").
inline constexpr double kHardMaskStrength = 99.0;

}  // namespace dysco::kernels
