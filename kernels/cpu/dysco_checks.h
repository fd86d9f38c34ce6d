// Input validation shared by the CPU DySCO ops (dysco_relevance.cpp, dysco_select.cpp): raises
// c10::Error (TORCH_CHECK) naming the op and the argument, before any output is written.
// Thread-safety: pure functions of their arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kernels/cpu/paged_cache_checks.h"

namespace dysco::kernels::cpu {

// tensor: CPU, contiguous, the given dtype, shape exactly `sizes`.
inline void CheckShaped(const char* op, const char* name, const at::Tensor& tensor,
                        at::ScalarType dtype, at::IntArrayRef sizes) {
  CheckTensor(op, name, tensor, dtype, static_cast<int64_t>(sizes.size()));
  TORCH_CHECK(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
              tensor.sizes());
}

// num_keys int64 [batch] with every entry in [0, max_keys]; returns its data.
inline const int64_t* CheckNumKeys(const char* op, const at::Tensor& num_keys, int64_t batch,
                                   int64_t max_keys, const char* bound) {
  CheckShaped(op, "num_keys", num_keys, at::kLong, {batch});
  const int64_t* keys = num_keys.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(keys[b] >= 0 && keys[b] <= max_keys, op, ": num_keys[", b, "] = ", keys[b],
                " must be in [0, ", max_keys, "] (", bound, ")");
  }
  return keys;
}

}  // namespace dysco::kernels::cpu
