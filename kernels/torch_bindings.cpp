// The schemas of the `dysco` op library (the one TORCH_LIBRARY block); backends register their
// implementations with TORCH_LIBRARY_IMPL (kernels/cpu/cpu_bindings.cpp, kernels/cuda/...).
// Shapes and semantics: docs/model-interface.md "Ops" and kernels/ops.h.
#include <torch/library.h>

TORCH_LIBRARY(dysco, m) {
  m.def(
      "paged_kv_write(Tensor(a!) kv_cache_layer, Tensor key, Tensor value, Tensor slot_mapping) -> "
      "()");
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor kv_cache_layer, "
      "Tensor block_tables, Tensor seq_lens, float scale, Tensor? key_bias) -> ()");
  m.def(
      "paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor kv_cache_layer, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, "
      "Tensor? key_bias) -> ()");
  m.def(
      "attention_probs(Tensor(a!) out, Tensor query, Tensor kv_cache_layer, Tensor block_tables, "
      "Tensor seq_lens, Tensor heads, float scale, Tensor? key_bias) -> ()");
}
