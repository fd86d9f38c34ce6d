// Device-neutral argument checks of the `dysco` ops: what every backend (kernels/cpu, later
// kernels/cuda) checks before it launches anything. They read only tensor metadata (defined, dtype,
// number of dimensions, sizes, contiguity, device), never tensor values, so they cost no host
// synchronisation on a device. The checks that read values on the host, and the "must be a CPU
// tensor" requirement, belong to the CPU backend (kernels/cpu/cpu_checks.h).
//
// Every check raises c10::Error (TORCH_CHECK) with a message that names the op, the argument and
// what was expected. One Check<Op>Args per op checks all of its arguments; a backend calls it
// first. Shapes and semantics of the ops: kernels/ops.h.
//
// Thread-safety: pure functions of their arguments.
// Ownership: nothing is kept; tensors are only inspected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>

namespace dysco::kernels {

// The qualified op names, as in the schemas (kernels/torch_bindings.cpp) and in error messages.
inline constexpr const char* kPagedKvWriteOp = "dysco::paged_kv_write";
inline constexpr const char* kPagedAttentionDecodeOp = "dysco::paged_attention_decode";
inline constexpr const char* kPagedAttentionPrefillOp = "dysco::paged_attention_prefill";
inline constexpr const char* kAttentionProbsOp = "dysco::attention_probs";
inline constexpr const char* kLinearOp = "dysco::linear";
inline constexpr const char* kRmsNormOp = "dysco::rms_norm";
inline constexpr const char* kRotaryEmbeddingOp = "dysco::rotary_embedding";
inline constexpr const char* kAddRmsNormOp = "dysco::add_rms_norm";
inline constexpr const char* kSiluMulOp = "dysco::silu_mul";
inline constexpr const char* kAddRmsNormLinearOp = "dysco::add_rms_norm_linear";
inline constexpr const char* kAddRmsNormSwigluOp = "dysco::add_rms_norm_swiglu";
inline constexpr const char* kOProjMlpOp = "dysco::o_proj_mlp";
inline constexpr const char* kQkNormRopeKvWriteOp = "dysco::qk_norm_rope_kv_write";
inline constexpr const char* kQkNormRopeAttentionDecodeOp = "dysco::qk_norm_rope_attention_decode";
inline constexpr const char* kDyscoRelevanceUpdateOp = "dysco::dysco_relevance_update";
inline constexpr const char* kDyscoSelectBiasOp = "dysco::dysco_select_bias";
inline constexpr const char* kDyscoBiasFromSelectionOp = "dysco::dysco_bias_from_selection";
inline constexpr const char* kDyscoTemplateMaskOp = "dysco::dysco_template_mask";
inline constexpr const char* kDyscoProbeMeanOp = "dysco::dysco_probe_mean";
inline constexpr const char* kRopeTablesOp = "dysco::rope_tables";

// ---- building blocks

// Sizes of a kv_cache_layer [2, num_pages, page_size, Hkv, D].
struct PagedCacheShape {
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
};

// An argument of an op, for CheckSameDevice.
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// tensor: defined, contiguous, with the given dtype and number of dimensions.
void CheckTensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 int64_t dim);

// tensor: as CheckTensor, with shape exactly `sizes`.
void CheckShaped(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 at::IntArrayRef sizes);

// Every tensor of `inputs` (all defined) is on the device of `out` (the op's first output).
void CheckSameDevice(const char* op, const char* out_name, const at::Tensor& out,
                     std::initializer_list<NamedTensor> inputs);

// The memory of `out` (an output) and of `other` do not overlap (an empty tensor overlaps nothing).
// Both contiguous: compares the byte ranges [data_ptr, data_ptr + nbytes), metadata only.
void CheckNoOverlap(const char* op, const char* out_name, const at::Tensor& out,
                    const char* other_name, const at::Tensor& other);

// CheckNoOverlap for every pair of `written` (in order), then for every written tensor against
// every tensor of `read`.
void CheckWrittenApart(const char* op, std::initializer_list<NamedTensor> written,
                       std::initializer_list<NamedTensor> read);

// key_bias, when present: fp32 [batch, S], contiguous, on the device of `out`. (S >= max(seq_lens)
// reads seq_lens: left to the backend.)
void CheckKeyBiasArg(const char* op, const c10::optional<at::Tensor>& key_bias, int64_t batch,
                     const at::Tensor& out);

// kv_cache_layer: contiguous, 5-D with size(0) == 2 and no empty page, head or head_dim dimension,
// float32 | bfloat16 | float16.
PagedCacheShape CheckKvCache(const char* op, const at::Tensor& kv_cache_layer);

// ---- one per op: every metadata check of its arguments, all tensors on the device of the output.

// paged_kv_write; returns the cache's sizes.
PagedCacheShape CheckPagedKvWriteArgs(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& slot_mapping);

// paged_attention_decode; returns the cache's sizes. Left to the backend: seq_lens values, page
// ids, key_bias S >= max(seq_lens).
PagedCacheShape CheckPagedAttentionDecodeArgs(const at::Tensor& out, const at::Tensor& query,
                                              const at::Tensor& kv_cache_layer,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& seq_lens,
                                              const c10::optional<at::Tensor>& key_bias);

// paged_attention_prefill; returns the cache's sizes. Left to the backend: the values of seq_lens,
// block_tables and query_start_loc, key_bias S >= max(seq_lens).
PagedCacheShape CheckPagedAttentionPrefillArgs(const at::Tensor& out, const at::Tensor& query,
                                               const at::Tensor& kv_cache_layer,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start_loc,
                                               const c10::optional<at::Tensor>& key_bias);

// attention_probs; returns the cache's sizes. Left to the backend: the values of seq_lens,
// block_tables and heads, S' and key_bias S >= max(seq_lens).
PagedCacheShape CheckAttentionProbsArgs(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& kv_cache_layer,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& heads,
                                        const c10::optional<at::Tensor>& key_bias);

// linear: out [M, N], input [M, K], weight [N, K], contiguous, one dtype (fp32 | bf16 | fp16), one
// device.
void CheckLinearArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

// rms_norm: out and input [M, D], weight [D], contiguous, one dtype (fp32 | bf16 | fp16), one
// device; eps > 0.
void CheckRmsNormArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      double eps);

// rotary_embedding: out and input [T, H, D] (D even), cos and sin [T, D], contiguous, one dtype,
// one device.
void CheckRotaryEmbeddingArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                              const at::Tensor& sin);

// add_rms_norm: out, sum, input and residual [M, D], weight [D], contiguous, one dtype (fp32 | bf16
// | fp16), one device; eps > 0; out and sum overlap neither each other nor input, residual, weight.
void CheckAddRmsNormArgs(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                         const at::Tensor& residual, const at::Tensor& weight, double eps);

// add_rms_norm_linear: sum, input and residual [M, D], norm_weight [D], weight [N, D], out [M, N],
// contiguous, one dtype (fp32 | bf16 | fp16), one device; eps > 0; out and sum overlap neither
// each other nor any input.
void CheckAddRmsNormLinearArgs(const at::Tensor& out, const at::Tensor& sum,
                               const at::Tensor& input, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps, const at::Tensor& weight);

// add_rms_norm_swiglu: as add_rms_norm_linear with weight [2N, D] (an even number of rows: the gate
// rows, then the up rows) and out [M, N].
void CheckAddRmsNormSwigluArgs(const at::Tensor& out, const at::Tensor& sum,
                               const at::Tensor& input, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps, const at::Tensor& weight);

// o_proj_mlp: attn [M, A], o_weight [D, A], residual and sum [M, D], norm_weight [D],
// gate_up_weight [2I, D] (gate rows, then up rows), down_weight [D, I], out [M, D]; contiguous, one
// dtype (fp32 | bf16 | fp16), one device; eps > 0; out and sum overlap neither each other nor any
// input.
void CheckOProjMlpArgs(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                       const at::Tensor& residual, const at::Tensor& o_weight,
                       const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                       const at::Tensor& down_weight);

// silu_mul: input [M, 2N] (even width), out [M, N], contiguous, one dtype (fp32 | bf16 | fp16),
// one device; out does not overlap input.
void CheckSiluMulArgs(const at::Tensor& out, const at::Tensor& input);

// rope_tables: cos and sin [T, D] (D even), contiguous, one dtype (fp32 | bf16 | fp16); positions
// int64 [T] and inv_freq fp32 [D/2], contiguous; one device; cos and sin overlap neither each other
// nor an input.
void CheckRopeTablesArgs(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                         const at::Tensor& inv_freq);

// qk_norm_rope_kv_write: query [T, H, D] and qkv [T, (H + 2 Hkv) D] in the cache's dtype, D the
// cache's head_dim (even), cos and sin [T, D], slot_mapping int64 [T], q_norm_weight and
// k_norm_weight [D] both given (then eps > 0) or both absent; all contiguous, on the cache's
// device; query overlaps neither qkv nor the cache, the cache not qkv. Returns the cache's sizes.
// Left to the backend: the slot values.
PagedCacheShape CheckQkNormRopeKvWriteArgs(const at::Tensor& query,
                                           const at::Tensor& kv_cache_layer, const at::Tensor& qkv,
                                           const at::Tensor& cos, const at::Tensor& sin,
                                           const at::Tensor& slot_mapping,
                                           const c10::optional<at::Tensor>& q_norm_weight,
                                           const c10::optional<at::Tensor>& k_norm_weight,
                                           double eps);

// qk_norm_rope_attention_decode: qk_norm_rope_kv_write's arguments (query, the cache, qkv, cos,
// sin, slot_mapping, the norm weights, eps) and paged_attention_decode's (out, query, the cache,
// block_tables, seq_lens, key_bias), each checked as by its op (the message names that op), and out
// overlapping none of qkv, cos, sin; with probs, probe_heads (both or neither) attention_probs'
// (probs, query, the cache, block_tables, seq_lens, probe_heads, key_bias), probs overlapping none
// of out, query, qkv. Returns the cache's sizes.
PagedCacheShape CheckQkNormRopeAttentionDecodeArgs(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs = c10::nullopt,
    const c10::optional<at::Tensor>& probe_heads = c10::nullopt);

// dysco_probe_mean: mean fp32 [B, S], probs fp32 [B' >= B, P, S' >= S] contiguous, heads 1 ..
// kMaxProbeMeanHeads entries, each in [0, P); the same device. Everything is checked here (heads
// are host values).
void CheckDyscoProbeMeanArgs(const at::Tensor& mean, const at::Tensor& probs,
                             c10::IntArrayRef heads);

// dysco_relevance_update. Left to the backend: num_keys values (in [0, min(S, S')]).
void CheckDyscoRelevanceUpdateArgs(const at::Tensor& relevance, const at::Tensor& probs,
                                   const at::Tensor& num_keys, const at::Tensor& decay);

// dysco_select_bias. Left to the backend: the values of num_keys, top_p, top_k and strength.
void CheckDyscoSelectBiasArgs(const at::Tensor& bias, const at::Tensor& selected,
                              const at::Tensor& stats, const at::Tensor& relevance,
                              const at::Tensor& num_keys, const at::Tensor& template_mask,
                              const at::Tensor& top_p, const at::Tensor& top_k,
                              const at::Tensor& strength);

// dysco_bias_from_selection. Left to the backend: the values of num_keys and strength.
void CheckDyscoBiasFromSelectionArgs(const at::Tensor& bias, const at::Tensor& selected,
                                     const at::Tensor& num_keys, const at::Tensor& template_mask,
                                     const at::Tensor& strength);

// dysco_template_mask (sequence_offsets has K + 1 >= 1 entries). Left to the backend: the values
// of sequence_offsets.
void CheckDyscoTemplateMaskArgs(const at::Tensor& mask, const at::Tensor& tokens,
                                const at::Tensor& sequences, const at::Tensor& sequence_offsets);

}  // namespace dysco::kernels
