// Registers the CPU implementations of the `dysco` ops (kernels/ops.h) with the dispatcher.
#include <torch/library.h>

#include "kernels/ops.h"

TORCH_LIBRARY_IMPL(dysco, CPU, m) {
  m.impl("paged_kv_write", &dysco::kernels::paged_kv_write_cpu);
  m.impl("paged_attention_decode", &dysco::kernels::paged_attention_decode_cpu);
  m.impl("paged_attention_prefill", &dysco::kernels::paged_attention_prefill_cpu);
  m.impl("attention_probs", &dysco::kernels::attention_probs_cpu);
  m.impl("linear", &dysco::kernels::linear_cpu);
  m.impl("rms_norm", &dysco::kernels::rms_norm_cpu);
  m.impl("rotary_embedding", &dysco::kernels::rotary_embedding_cpu);
  m.impl("rope_tables", &dysco::kernels::rope_tables_cpu);
  m.impl("add_rms_norm", &dysco::kernels::add_rms_norm_cpu);
  m.impl("silu_mul", &dysco::kernels::silu_mul_cpu);
  m.impl("add_rms_norm_linear", &dysco::kernels::add_rms_norm_linear_cpu);
  m.impl("add_rms_norm_swiglu", &dysco::kernels::add_rms_norm_swiglu_cpu);
  m.impl("o_proj_mlp", &dysco::kernels::o_proj_mlp_cpu);
  m.impl("qk_norm_rope_kv_write", &dysco::kernels::qk_norm_rope_kv_write_cpu);
  m.impl("qk_norm_rope_attention_decode", &dysco::kernels::qk_norm_rope_attention_decode_cpu);
  m.impl("dysco_relevance_update", &dysco::kernels::dysco_relevance_update_cpu);
  m.impl("dysco_probe_mean", &dysco::kernels::dysco_probe_mean_cpu);
  m.impl("dysco_select_bias", &dysco::kernels::dysco_select_bias_cpu);
  m.impl("dysco_bias_from_selection", &dysco::kernels::dysco_bias_from_selection_cpu);
  m.impl("dysco_template_mask", &dysco::kernels::dysco_template_mask_cpu);
}
