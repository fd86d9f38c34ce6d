// The `dysco` op library: paged KV-cache write and paged attention (decode, prefill,
// probabilities), and the DySCO relevance / selection / bias ops.
//
// These free functions are the C++ entry points behind `torch.ops.dysco.*` (schemas in
// kernels/torch_bindings.cpp, contract in docs/model-interface.md "Ops"). Each backend registers
// its own implementation (suffix _cpu, _cuda) with the dispatcher; callers go through the
// dispatcher with the typed calls of kernels/op_calls.h. Backends check their arguments with
// kernels/op_checks.h (device-neutral) before their own checks (CPU: kernels/cpu/cpu_checks.h).
//
// Conventions: the output comes first and is written in place; every element of it is written.
// Shapes:
//   kv_cache_layer [2, num_pages, page_size, Hkv, D]   (index 0 = K, 1 = V), contiguous
//   block_tables   int32 [B, P]   page ids of each sequence (entries past its length are ignored)
//   seq_lens       int64 [B]      context length of each sequence, new tokens included
//   key_bias       fp32  [B, S]   S >= max(seq_lens), additive bias on logits of key j; -inf
//   allowed
// Thread-safety: the ops hold no state; concurrent calls are safe as long as they do not write the
// same output or cache pages. Invalid inputs raise c10::Error before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dysco::kernels {

// kv_cache_layer [2, NP, PS, Hkv, D] <- key, value [T, Hkv, D] at slot_mapping int64 [T]
// (slot = page * PS + offset; a negative slot skips the token).
void paged_kv_write_cpu(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                        const at::Tensor& value, const at::Tensor& slot_mapping);

// out [B, Hq, D] <- attention of query [B, Hq, D] (one token per sequence, at position
// seq_lens[b]-1) over keys 0..seq_lens[b]-1. Hq % Hkv == 0 (GQA: query head h reads KV head h / (Hq
// / Hkv)).
void paged_attention_decode_cpu(const at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale,
                                const c10::optional<at::Tensor>& key_bias);

// out [T, Hq, D] <- causal attention of query [T, Hq, D]; sequence b owns tokens
// query_start_loc[b] .. query_start_loc[b+1]-1 (int64 [B+1]); its j-th of q_len new tokens sits at
// position seq_lens[b]-q_len+j and attends keys 0..that position.
void paged_attention_prefill_cpu(const at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                 double scale, const c10::optional<at::Tensor>& key_bias);

// out fp32 [B, H, S'] <- softmax probabilities (after bias) of query [B, Hq, D] for the query heads
// heads int64 [H] over keys 0..seq_lens[b]-1; zeros past seq_lens[b]. S' >= max(seq_lens).
void attention_probs_cpu(const at::Tensor& out, const at::Tensor& query,
                         const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& heads, double scale,
                         const c10::optional<at::Tensor>& key_bias);

// out [M, N] <- input [M, K] @ weight [N, K]^T (torch.nn.functional.linear without bias), all three
// contiguous, one dtype (fp32, bf16, fp16). The model's weight matmuls: on the CPU, inputs of at
// most 8 rows (decode batches) take a GEMV kernel that reads each weight once at memory
// speed (a one-row GEMM in BLAS is about twice slower), longer ones (prefill) BLAS GEMM.
void linear_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

// out [M, D] <- weight [D] * to_dtype(x * rsqrt(mean(x^2) + eps)) per row of input [M, D], x and
// the statistics in fp32, the normalised row rounded to the dtype before the product with the
// weight (rounded again): the model's rms_norm (transformers' LlamaRMSNorm) as one pass. The CPU
// version sums the squares in ATen's order, so it equals the ATen expression bit for bit.
void rms_norm_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double eps);

// out [T, H, D] <- input * cos + rotate_half(input) * sin, cos and sin [T, D] broadcast over the
// H heads; rotate_half(x) = cat(-x[D/2:], x[:D/2]). Each product and the sum rounded to the dtype,
// as the three tensor operations it replaces.
void rotary_embedding_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                          const at::Tensor& sin);

// cos, sin [T, D] <- the rotary tables of positions int64 [T] (D even, inv_freq fp32 [D/2], one
// dtype for cos and sin): cos[t, i] = to_dtype(cos(float(positions[t]) * inv_freq[i % (D/2)]) *
// (float)scaling), sin likewise: the model's four lines before its layers (freqs, cat, cos/sin
// times attention_scaling, .to(dtype)) as one op, one kernel on a GPU instead of ~9. The CPU
// version IS that ATen composite (kernels/rope_tables.h) copied into cos and sin: its bits are the
// ones the CPU model had, which NativeDecode::RopeOf (core/model/model_runner.cpp) computes with
// the same ATen ops (the native CPU decode equals the TorchScript one bit for bit).
void rope_tables_cpu(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                     const at::Tensor& inv_freq, double scaling);

// sum [M, D] <- input [M, D] + residual [M, D], added in fp32 and rounded to the dtype (ATen's
// `input + residual`); out [M, D] <- rms_norm(sum, weight [D], eps) as rms_norm_cpu, computed from
// the ROUNDED sum: the transformer's residual add fused with the next norm (vLLM's
// fused_add_rms_norm, out of place: the new residual stream is `sum`). All contiguous, one dtype;
// out and sum must not overlap each other or the inputs (checked). The CPU version is
// at::add_out then rms_norm's row kernel on sum, so it equals `s = input + residual;
// rms_norm(s)` bit for bit.
void add_rms_norm_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                      const at::Tensor& residual, const at::Tensor& weight, double eps);

// sum [M, D] <- input + residual and out [M, N] <- rms_norm(sum, norm_weight [D], eps) @ weight
// [N, D]^T: add_rms_norm and the linear layer that reads its output (a layer's q/k/v or gate/up
// projection, the LM head), so that a device can run both as one kernel. The CPU version is
// add_rms_norm_cpu into a scratch row then linear_cpu: bit for bit those two ops (the golden
// tokens and the native CPU decode step keep their bits). out and sum must not overlap each other
// or the inputs (checked).
void add_rms_norm_linear_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                             const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& weight);

// sum [M, D] <- input + residual and out [M, N] <- silu_mul(rms_norm(sum, norm_weight, eps) @
// weight [2N, D]^T): add_rms_norm_linear over the fused gate/up weight with the SwiGLU activation
// after it: one call where a device may fuse the two (CUDA runs them as two kernels: an epilogue
// was slower, docs/gpu.md "The norm in the GEMV"). The CPU version is
// add_rms_norm_linear_cpu into a scratch [M, 2N] then silu_mul_cpu: bit for bit those ops.
void add_rms_norm_swiglu_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                             const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& weight);

// An attention block's output stage (kernels/op_calls.h o_proj_mlp): linear_cpu(o, attn, o_weight),
// add_rms_norm_swiglu_cpu(act, sum, o, residual, ...), linear_cpu(out, act, down_weight) into
// scratch rows: bit for bit those ops.
void o_proj_mlp_cpu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                    const at::Tensor& residual, const at::Tensor& o_weight,
                    const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                    const at::Tensor& down_weight);

// out [M, N] <- silu(g) * u for input [M, 2N] = [g | u] (the SwiGLU activation over a fused
// gate/up projection): silu(g) = g / (1 + exp(-g)) in fp32 rounded to the dtype, then the product
// with u in fp32 rounded again, exactly ATen's `F.silu(g) * u` (two kernels, two roundings). All
// contiguous, one dtype; out must not overlap input (checked). The CPU version IS that ATen
// expression on the two halves (at::silu, at::mul_out), so it equals it bit for bit.
void silu_mul_cpu(const at::Tensor& out, const at::Tensor& input);

// An attention block's input stage (kernels/op_calls.h qk_norm_rope_kv_write): the query heads of
// qkv [T, (H + 2 Hkv) D] per-head rms_norm'ed (when the weights are given) and rotated into query
// [T, H, D], the key heads likewise into the cache at slot_mapping, the value heads copied there.
// The CPU version runs rms_norm_cpu's and rotary_embedding_cpu's row code on each token's heads
// and paged_kv_write_cpu's copy, so it equals those three ops in sequence bit for bit.
void qk_norm_rope_kv_write_cpu(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                               const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& slot_mapping,
                               const c10::optional<at::Tensor>& q_norm_weight,
                               const c10::optional<at::Tensor>& k_norm_weight, double eps);

// A decode step's attention from the fused q/k/v projection (kernels/op_calls.h
// qk_norm_rope_attention_decode): qk_norm_rope_kv_write_cpu then paged_attention_decode_cpu, so
// bit for bit those two ops.
void qk_norm_rope_attention_decode_cpu(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, double scale, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& probe_heads);

// ---- DySCO (docs/dysco.md "Ops"): relevance, selection, bias, template positions. fp32; each op
// writes fixed-shape outputs, so that a device version needs no host synchronisation.
// Row b of every [B, S] tensor belongs to sequence b with n_b = num_keys[b] keys (int64 [B], the
// current token included, in [0, S]; n_b = 0 is an idle row, written as zeros / false). Entries at
// j >= n_b are written as 0 (bias, relevance) / false (selected). The CPU versions check every
// value they read (num_keys, top_p, top_k, strength, offsets) before writing anything.

// dysco_probe_mean (kernels/op_calls.h): the rows' sums in the order of `heads`, then the multiply.
void dysco_probe_mean_cpu(const at::Tensor& mean, const at::Tensor& probs, c10::IntArrayRef heads);

// relevance fp32 [B, S] <- r_t, in place: r_{t-1} in [0, n_b - 1) in, r_t in [0, n_b) out.
// probs fp32 [B, H, S'] (H >= 1, S' >= n_b): the selected heads' attention of the current query;
// decay fp32 [B]. a = mean_h probs[b, h, :n_b]; a[:n_b-1] += decay[b] * r_{t-1}; r_t = a / sum(a)
// (sum in float64; a row whose sum is 0 is written as zeros).
void dysco_relevance_update_cpu(const at::Tensor& relevance, const at::Tensor& probs,
                                const at::Tensor& num_keys, const at::Tensor& decay);

// bias fp32 [B, S], selected bool [B, S], stats fp32 [B, 2] <- the selection of relevance fp32
// [B, S] and its bias (as dysco_bias_from_selection); stats[b] = (number selected, sum of the
// relevance selected, summed in float64 in position order). template_mask bool [B, S]; top_p fp32
// [B] (<= 0: unset, else in (0, 1]); top_k int64 [B] (<= 0: unset); strength fp32 [B] (> 0); at
// least one of top_p[b], top_k[b] set. Order: relevance descending, ties lower position first.
//   top_k: the min(k, n_b) first entries in that order.
//   top_p: the longest prefix whose running sum (float64, in that order) is <= top_p, at least one
//          entry; the entry whose running sum crosses top_p is not selected.
//   both:  the top_p set, unless it has more than top_k entries: then the top_k set.
// Selection ignores template_mask (it only shapes the bias).
void dysco_select_bias_cpu(const at::Tensor& bias, const at::Tensor& selected,
                           const at::Tensor& stats, const at::Tensor& relevance,
                           const at::Tensor& num_keys, const at::Tensor& template_mask,
                           const at::Tensor& top_p, const at::Tensor& top_k,
                           const at::Tensor& strength);

// bias fp32 [B, S] <- the DySCO attention bias of selected bool [B, S]; template_mask bool [B, S];
// strength fp32 [B] (> 0). In [0, n_b), with kHardMaskStrength = 99 (kernels/dysco_constants.h):
//   strength < 99:  log(strength) at (selected & !template_mask) and at n_b - 1; 0 elsewhere.
//   strength >= 99: 0 at selected and at n_b - 1; -inf elsewhere (template_mask not applied).
void dysco_bias_from_selection_cpu(const at::Tensor& bias, const at::Tensor& selected,
                                   const at::Tensor& num_keys, const at::Tensor& template_mask,
                                   const at::Tensor& strength);

// mask bool [P] <- true iff position i lies inside an occurrence (exact match, overlaps included)
// of any template sequence in tokens int64 [P]. sequences int64 [M] holds the K sequences
// concatenated; sequence k is sequences[sequence_offsets[k] : sequence_offsets[k+1]]
// (sequence_offsets int64 [K+1], non-decreasing, from 0 to M; an empty sequence marks nothing).
void dysco_template_mask_cpu(const at::Tensor& mask, const at::Tensor& tokens,
                             const at::Tensor& sequences, const at::Tensor& sequence_offsets);

}  // namespace dysco::kernels
