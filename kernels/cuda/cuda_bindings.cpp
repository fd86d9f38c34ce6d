// Registers the CUDA implementations of the `dysco` ops (kernels/cuda/cuda_ops.h) with the
// dispatcher, against the schemas of kernels/torch_bindings.cpp.
#include <torch/library.h>

#include "kernels/cuda/cuda_ops.h"

TORCH_LIBRARY_IMPL(dysco, CUDA, m) {
  m.impl("paged_kv_write", &dysco::kernels::paged_kv_write_cuda);
  m.impl("paged_attention_decode", &dysco::kernels::paged_attention_decode_cuda);
  m.impl("paged_attention_prefill", &dysco::kernels::paged_attention_prefill_cuda);
  m.impl("attention_probs", &dysco::kernels::attention_probs_cuda);
  m.impl("linear", &dysco::kernels::linear_cuda);
  m.impl("rms_norm", &dysco::kernels::rms_norm_cuda);
  m.impl("rotary_embedding", &dysco::kernels::rotary_embedding_cuda);
  m.impl("rope_tables", &dysco::kernels::rope_tables_cuda);
  m.impl("add_rms_norm", &dysco::kernels::add_rms_norm_cuda);
  m.impl("silu_mul", &dysco::kernels::silu_mul_cuda);
  m.impl("add_rms_norm_linear", &dysco::kernels::add_rms_norm_linear_cuda);
  m.impl("add_rms_norm_swiglu", &dysco::kernels::add_rms_norm_swiglu_cuda);
  m.impl("o_proj_mlp", &dysco::kernels::o_proj_mlp_cuda);
  m.impl("qk_norm_rope_kv_write", &dysco::kernels::qk_norm_rope_kv_write_cuda);
  m.impl("qk_norm_rope_attention_decode", &dysco::kernels::qk_norm_rope_attention_decode_cuda);
  m.impl("dysco_relevance_update", &dysco::kernels::dysco_relevance_update_cuda);
  m.impl("dysco_probe_mean", &dysco::kernels::dysco_probe_mean_cuda);
  m.impl("dysco_select_bias", &dysco::kernels::dysco_select_bias_cuda);
  m.impl("dysco_bias_from_selection", &dysco::kernels::dysco_bias_from_selection_cuda);
  m.impl("dysco_template_mask", &dysco::kernels::dysco_template_mask_cuda);
}
