// Registers the CPU implementations of the `dysco` ops (kernels/ops.h) with the dispatcher.
#include <torch/library.h>

#include "kernels/ops.h"

TORCH_LIBRARY_IMPL(dysco, CPU, m) {
  m.impl("paged_kv_write", &dysco::kernels::paged_kv_write_cpu);
  m.impl("paged_attention_decode", &dysco::kernels::paged_attention_decode_cpu);
  m.impl("paged_attention_prefill", &dysco::kernels::paged_attention_prefill_cpu);
  m.impl("attention_probs", &dysco::kernels::attention_probs_cpu);
}
