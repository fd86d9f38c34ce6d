// The schemas of the `dysco` op library (the one TORCH_LIBRARY block); backends register their
// implementations with TORCH_LIBRARY_IMPL (kernels/cpu/cpu_bindings.cpp, kernels/cuda/...).
// Shapes and semantics: docs/model-interface.md "Ops", docs/dysco.md "Ops" and kernels/ops.h.
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
  // out [M, N] <- input [M, K] @ weight [N, K]^T: the model's linear layers, so that few-row inputs
  // (decode) take a GEMV path that streams each weight once (docs/model-interface.md "Ops").
  m.def("linear(Tensor(a!) out, Tensor input, Tensor weight) -> ()");
  // The model's element-wise chains as one kernel each, for a GPU step that is not made of ~10
  // small kernels per norm and rope (docs/model-interface.md "Ops"): out [M, D] <- RMSNorm of input
  // [M, D] times weight [D]; out [T, H, D] <- input [T, H, D] rotated by cos, sin [T, D].
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor(a!) out, Tensor input, Tensor cos, Tensor sin) -> ()");
  // The rotary tables of a step: cos, sin [T, D] <- cos / sin(positions [T] x inv_freq [D/2], both
  // halves) * scaling in the tables' dtype, the model's freqs, cat, cos, sin, products and casts
  // (~9 small kernels at the start of every GPU step) as one op (docs/model-interface.md "Ops").
  m.def(
      "rope_tables(Tensor(a!) cos, Tensor(b!) sin, Tensor positions, Tensor inv_freq, "
      "float scaling) -> ()");
  // The residual add fused with the next norm (vLLM's fused_add_rms_norm, out of place): sum [M, D]
  // <- input + residual (rounded to the dtype), out [M, D] <- rms_norm(sum, weight, eps). And the
  // SwiGLU activation over a fused gate/up projection: out [M, N] <- silu(input[:, :N]) *
  // input[:, N:] for input [M, 2N].
  m.def(
      "add_rms_norm(Tensor(a!) out, Tensor(b!) sum, Tensor input, Tensor residual, Tensor weight, "
      "float eps) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor input) -> ()");
  // add_rms_norm with the linear layer that reads its normed row: sum [M, D] <- input + residual,
  // out [M, N] <- rms_norm(sum, norm_weight, eps) @ weight [N, D]^T. One kernel on the GPU for a
  // decode batch instead of two (docs/gpu.md "The norm in the GEMV").
  m.def(
      "add_rms_norm_linear(Tensor(a!) out, Tensor(b!) sum, Tensor input, Tensor residual, "
      "Tensor norm_weight, float eps, Tensor weight) -> ()");
  // The same with the SwiGLU activation after the fused gate/up projection: out [M, N] <-
  // silu_mul(rms_norm(sum) @ weight [2N, D]^T), one call where a device may fuse the two (CUDA
  // runs add_rms_norm_linear then silu_mul: docs/gpu.md "The norm in the GEMV").
  m.def(
      "add_rms_norm_swiglu(Tensor(a!) out, Tensor(b!) sum, Tensor input, Tensor residual, "
      "Tensor norm_weight, float eps, Tensor weight) -> ()");
  // An attention block's output stage as one op: sum [M, D] <- residual + attn [M, A] @ o_weight
  // [D, A]^T (rounded to the dtype, as linear's output), out [M, D] <- silu_mul(rms_norm(sum,
  // norm_weight, eps) @ gate_up_weight [2I, D]^T) @ down_weight [D, I]^T: linear,
  // add_rms_norm_swiglu and linear in one call, where a device may fuse them (CUDA has a persistent
  // kernel for a decode row, not the default: docs/gpu.md "What a layer's dependencies cost").
  m.def(
      "o_proj_mlp(Tensor(a!) out, Tensor(b!) sum, Tensor attn, Tensor residual, Tensor o_weight, "
      "Tensor norm_weight, float eps, Tensor gate_up_weight, Tensor down_weight) -> ()");
  // An attention block's input stage as one op (a decode step ran five kernels here on the GPU):
  // query [T, H, D] <- rope(q_norm(q)), and K = rope(k_norm(k)), V = v written to the cache at
  // slot_mapping, where q, k, v are the [T, (H + 2 Hkv) D] fused projection's three column blocks;
  // the norms only when their weights [D] are given (Qwen3's per-head norms).
  m.def(
      "qk_norm_rope_kv_write(Tensor(a!) query, Tensor(b!) kv_cache_layer, Tensor qkv, Tensor cos, "
      "Tensor sin, Tensor slot_mapping, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps) "
      "-> ()");
  // A decode step's attention from the fused q/k/v projection: qk_norm_rope_kv_write(query,
  // kv_cache_layer, qkv, ...) then paged_attention_decode(out, query, kv_cache_layer, ...), one
  // call where a device may run both in one kernel (CUDA's tensor-core decode attention makes its
  // query rows and newest keys itself: docs/gpu.md "The q/k norms, rope and KV write in the decode
  // attention").
  m.def(
      "qk_norm_rope_attention_decode(Tensor(a!) out, Tensor(b!) query, Tensor(c!) kv_cache_layer, "
      "Tensor qkv, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor? q_norm_weight, "
      "Tensor? k_norm_weight, float eps, Tensor block_tables, Tensor seq_lens, float scale, "
      "Tensor? key_bias, Tensor(d!)? probs=None, Tensor? probe_heads=None) -> ()");
  // DySCO (docs/dysco.md "Ops").
  m.def(
      "dysco_relevance_update(Tensor(a!) relevance, Tensor probs, Tensor num_keys, Tensor decay) "
      "-> ()");
  m.def("dysco_probe_mean(Tensor(a!) mean, Tensor probs, int[] heads) -> ()");
  m.def(
      "dysco_select_bias(Tensor(a!) bias, Tensor(b!) selected, Tensor(c!) stats, "
      "Tensor relevance, Tensor num_keys, Tensor template_mask, Tensor top_p, Tensor top_k, "
      "Tensor strength) -> ()");
  m.def(
      "dysco_bias_from_selection(Tensor(a!) bias, Tensor selected, Tensor num_keys, "
      "Tensor template_mask, Tensor strength) -> ()");
  m.def(
      "dysco_template_mask(Tensor(a!) mask, Tensor tokens, Tensor sequences, "
      "Tensor sequence_offsets) -> ()");
}
