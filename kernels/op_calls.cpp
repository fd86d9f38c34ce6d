// Typed calls of the `dysco` ops through the dispatcher (kernels/op_calls.h).
#include "kernels/op_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "kernels/op_checks.h"

namespace dysco::ops {
namespace {

using TensorRef = const at::Tensor&;
using OptionalTensorRef = const c10::optional<at::Tensor>&;

// The typed handle of op `name`; raises c10::Error when its schema is not registered. Callers keep
// it in a function-local static: a failed lookup leaves the static unset, so the next call retries.
template <typename Signature>
c10::TypedOperatorHandle<Signature> Handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

void paged_kv_write(TensorRef kv_cache_layer, TensorRef key, TensorRef value,
                    TensorRef slot_mapping) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef)>(kernels::kPagedKvWriteOp);
  op.call(kv_cache_layer, key, value, slot_mapping);
}

void paged_attention_decode(TensorRef out, TensorRef query, TensorRef kv_cache_layer,
                            TensorRef block_tables, TensorRef seq_lens, double scale,
                            OptionalTensorRef key_bias) {
  static const auto op = Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double,
                                     OptionalTensorRef)>(kernels::kPagedAttentionDecodeOp);
  op.call(out, query, kv_cache_layer, block_tables, seq_lens, scale, key_bias);
}

void paged_attention_prefill(TensorRef out, TensorRef query, TensorRef kv_cache_layer,
                             TensorRef block_tables, TensorRef seq_lens, TensorRef query_start_loc,
                             double scale, OptionalTensorRef key_bias) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double,
                  OptionalTensorRef)>(kernels::kPagedAttentionPrefillOp);
  op.call(out, query, kv_cache_layer, block_tables, seq_lens, query_start_loc, scale, key_bias);
}

void attention_probs(TensorRef out, TensorRef query, TensorRef kv_cache_layer,
                     TensorRef block_tables, TensorRef seq_lens, TensorRef heads, double scale,
                     OptionalTensorRef key_bias) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double,
                  OptionalTensorRef)>(kernels::kAttentionProbsOp);
  op.call(out, query, kv_cache_layer, block_tables, seq_lens, heads, scale, key_bias);
}

void linear(TensorRef out, TensorRef input, TensorRef weight) {
  static const auto op = Handle<void(TensorRef, TensorRef, TensorRef)>(kernels::kLinearOp);
  op.call(out, input, weight);
}

void rms_norm(TensorRef out, TensorRef input, TensorRef weight, double eps) {
  static const auto op = Handle<void(TensorRef, TensorRef, TensorRef, double)>(kernels::kRmsNormOp);
  op.call(out, input, weight, eps);
}

void rotary_embedding(TensorRef out, TensorRef input, TensorRef cos, TensorRef sin) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef)>(kernels::kRotaryEmbeddingOp);
  op.call(out, input, cos, sin);
}

void rope_tables(TensorRef cos, TensorRef sin, TensorRef positions, TensorRef inv_freq,
                 double scaling) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, double)>(kernels::kRopeTablesOp);
  op.call(cos, sin, positions, inv_freq, scaling);
}

void add_rms_norm(TensorRef out, TensorRef sum, TensorRef input, TensorRef residual,
                  TensorRef weight, double eps) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double)>(
          kernels::kAddRmsNormOp);
  op.call(out, sum, input, residual, weight, eps);
}

void add_rms_norm_linear(TensorRef out, TensorRef sum, TensorRef input, TensorRef residual,
                         TensorRef norm_weight, double eps, TensorRef weight) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double, TensorRef)>(
          kernels::kAddRmsNormLinearOp);
  op.call(out, sum, input, residual, norm_weight, eps, weight);
}

void add_rms_norm_swiglu(TensorRef out, TensorRef sum, TensorRef input, TensorRef residual,
                         TensorRef norm_weight, double eps, TensorRef weight) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double, TensorRef)>(
          kernels::kAddRmsNormSwigluOp);
  op.call(out, sum, input, residual, norm_weight, eps, weight);
}

void o_proj_mlp(TensorRef out, TensorRef sum, TensorRef attn, TensorRef residual,
                TensorRef o_weight, TensorRef norm_weight, double eps, TensorRef gate_up_weight,
                TensorRef down_weight) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, double,
                  TensorRef, TensorRef)>(kernels::kOProjMlpOp);
  op.call(out, sum, attn, residual, o_weight, norm_weight, eps, gate_up_weight, down_weight);
}

void silu_mul(TensorRef out, TensorRef input) {
  static const auto op = Handle<void(TensorRef, TensorRef)>(kernels::kSiluMulOp);
  op.call(out, input);
}

void qk_norm_rope_kv_write(TensorRef query, TensorRef kv_cache_layer, TensorRef qkv, TensorRef cos,
                           TensorRef sin, TensorRef slot_mapping, OptionalTensorRef q_norm_weight,
                           OptionalTensorRef k_norm_weight, double eps) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef,
                  OptionalTensorRef, OptionalTensorRef, double)>(kernels::kQkNormRopeKvWriteOp);
  op.call(query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps);
}

void qk_norm_rope_attention_decode(TensorRef out, TensorRef query, TensorRef kv_cache_layer,
                                   TensorRef qkv, TensorRef cos, TensorRef sin,
                                   TensorRef slot_mapping, OptionalTensorRef q_norm_weight,
                                   OptionalTensorRef k_norm_weight, double eps,
                                   TensorRef block_tables, TensorRef seq_lens, double scale,
                                   OptionalTensorRef key_bias, OptionalTensorRef probs,
                                   OptionalTensorRef probe_heads) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef,
                  OptionalTensorRef, OptionalTensorRef, double, TensorRef, TensorRef, double,
                  OptionalTensorRef, OptionalTensorRef, OptionalTensorRef)>(
          kernels::kQkNormRopeAttentionDecodeOp);
  op.call(out, query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight,
          eps, block_tables, seq_lens, scale, key_bias, probs, probe_heads);
}

void dysco_probe_mean(TensorRef mean, TensorRef probs, c10::IntArrayRef heads) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, c10::IntArrayRef)>(kernels::kDyscoProbeMeanOp);
  op.call(mean, probs, heads);
}

void dysco_relevance_update(TensorRef relevance, TensorRef probs, TensorRef num_keys,
                            TensorRef decay) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef)>(kernels::kDyscoRelevanceUpdateOp);
  op.call(relevance, probs, num_keys, decay);
}

void dysco_select_bias(TensorRef bias, TensorRef selected, TensorRef stats, TensorRef relevance,
                       TensorRef num_keys, TensorRef template_mask, TensorRef top_p,
                       TensorRef top_k, TensorRef strength) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef,
                  TensorRef, TensorRef)>(kernels::kDyscoSelectBiasOp);
  op.call(bias, selected, stats, relevance, num_keys, template_mask, top_p, top_k, strength);
}

void dysco_bias_from_selection(TensorRef bias, TensorRef selected, TensorRef num_keys,
                               TensorRef template_mask, TensorRef strength) {
  static const auto op = Handle<void(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef)>(
      kernels::kDyscoBiasFromSelectionOp);
  op.call(bias, selected, num_keys, template_mask, strength);
}

void dysco_template_mask(TensorRef mask, TensorRef tokens, TensorRef sequences,
                         TensorRef sequence_offsets) {
  static const auto op =
      Handle<void(TensorRef, TensorRef, TensorRef, TensorRef)>(kernels::kDyscoTemplateMaskOp);
  op.call(mask, tokens, sequences, sequence_offsets);
}

const std::vector<std::string>& AllOpNames() {
  static const std::vector<std::string> names = {
      kernels::kPagedKvWriteOp,
      kernels::kPagedAttentionDecodeOp,
      kernels::kPagedAttentionPrefillOp,
      kernels::kAttentionProbsOp,
      kernels::kLinearOp,
      kernels::kRmsNormOp,
      kernels::kRotaryEmbeddingOp,
      kernels::kRopeTablesOp,
      kernels::kAddRmsNormOp,
      kernels::kSiluMulOp,
      kernels::kAddRmsNormLinearOp,
      kernels::kAddRmsNormSwigluOp,
      kernels::kOProjMlpOp,
      kernels::kQkNormRopeKvWriteOp,
      kernels::kQkNormRopeAttentionDecodeOp,
      kernels::kDyscoRelevanceUpdateOp,
      kernels::kDyscoSelectBiasOp,
      kernels::kDyscoBiasFromSelectionOp,
      kernels::kDyscoTemplateMaskOp,
      kernels::kDyscoProbeMeanOp,
  };
  return names;
}

std::vector<std::string> MissingOps() { return MissingOps(AllOpNames()); }

std::vector<std::string> MissingOps(const std::vector<std::string>& names) {
  std::vector<std::string> missing;
  for (const std::string& name : names) {
    if (!c10::Dispatcher::singleton().findSchema({name, ""}).has_value()) missing.push_back(name);
  }
  return missing;
}

std::vector<std::string> MissingKernels(c10::DispatchKey backend) {
  std::vector<std::string> missing;
  for (const std::string& name : AllOpNames()) {
    const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(backend)) missing.push_back(name);
  }
  return missing;
}

}  // namespace dysco::ops
