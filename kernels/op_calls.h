// Typed C++ calls of the `dysco` ops (the C++ counterpart of vLLM's _custom_ops.py): one function
// per op, with the schema's argument list (output first, written in place), that calls the op
// THROUGH THE DISPATCHER, exactly as a scripted model does. The dispatcher picks the kernel from
// the tensors' device (CPU: kernels/cpu, CUDA: kernels/cuda when built), so callers never name a
// backend. Shapes and semantics: kernels/ops.h, docs/model-interface.md "Ops", docs/dysco.md "Ops".
//
// Errors: invalid arguments, or an op (or a kernel for the tensors' device) that is not registered,
// raise c10::Error; nothing is written then. Callers catch it.
// Also: AllOpNames(), MissingOps() and MissingKernels(), for a startup check that
// libdysco_kernels.so is loaded and registered all twenty ops (and their kernels).
// Thread-safety: every function may be called from any thread; each op's operator handle is looked
// up once (function-local static) and is immutable afterwards. Concurrent calls must not write the
// same output or cache pages (kernels/ops.h).
// Ownership: the functions keep no reference to the tensors they are given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKey.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "kernels/host_lengths.h"

namespace dysco::ops {

// ---- a forward's host lengths: its caller publishes the host vectors it built query_start_loc and
// seq_lens from, for the ops that plan on the host (the CUDA prefill's cuDNN path), which then
// need not read the device tensors back (kernels/host_lengths.h).
using kernels::ScopedHostLengths;

// ---- paged KV cache and attention. Shapes shared by these ops:
//   kv_cache_layer [2, num_pages, page_size, Hkv, D]   (index 0 = K, 1 = V), contiguous
//   block_tables   int32 [B, P]   page ids of each sequence (entries past its length are ignored)
//   seq_lens       int64 [B]      context length of each sequence, new tokens included
//   key_bias       fp32  [B, S]   S >= max(seq_lens), additive bias on logits of key j; -inf
//                                 allowed; c10::nullopt for none

// kv_cache_layer [2, NP, PS, Hkv, D] <- key, value [T, Hkv, D] at slot_mapping int64 [T]
// (slot = page * PS + offset; a negative slot skips the token).
void paged_kv_write(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                    const at::Tensor& value, const at::Tensor& slot_mapping);

// out [B, Hq, D] <- attention of query [B, Hq, D] (one token per sequence, at position
// seq_lens[b]-1) over keys 0..seq_lens[b]-1. Hq % Hkv == 0 (GQA: query head h reads KV head h / (Hq
// / Hkv)).
void paged_attention_decode(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale,
                            const c10::optional<at::Tensor>& key_bias);

// out [T, Hq, D] <- causal attention of query [T, Hq, D]; sequence b owns tokens
// query_start_loc[b] .. query_start_loc[b+1]-1 (int64 [B+1]); its j-th of q_len new tokens sits at
// position seq_lens[b]-q_len+j and attends keys 0..that position.
void paged_attention_prefill(const at::Tensor& out, const at::Tensor& query,
                             const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                             double scale, const c10::optional<at::Tensor>& key_bias);

// out fp32 [B, H, S'] <- softmax probabilities (after bias) of query [B, Hq, D] for the query heads
// heads int64 [H] over keys 0..seq_lens[b]-1; zeros past seq_lens[b]. S' >= max(seq_lens).
void attention_probs(const at::Tensor& out, const at::Tensor& query,
                     const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const at::Tensor& heads, double scale,
                     const c10::optional<at::Tensor>& key_bias);

// out [M, N] <- input [M, K] @ weight [N, K]^T (F.linear without bias), contiguous, one dtype.
void linear(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

// out [M, D] <- RMSNorm of input [M, D] times weight [D] (kernels/ops.h rms_norm_cpu).
void rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);

// out [T, H, D] <- input [T, H, D] * cos + rotate_half(input) * sin, cos and sin [T, D].
void rotary_embedding(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                      const at::Tensor& sin);

// cos, sin [T, D] <- to_dtype(cos / sin(float(positions[t]) * inv_freq[i % (D/2)]) * scaling) for
// positions int64 [T], inv_freq fp32 [D/2]: the model's rotary tables (kernels/ops.h
// rope_tables_cpu).
void rope_tables(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                 const at::Tensor& inv_freq, double scaling);

// sum [M, D] <- input + residual [M, D] (rounded to the dtype); out [M, D] <- rms_norm(sum, weight
// [D], eps) (kernels/ops.h add_rms_norm_cpu). out and sum must not overlap the inputs.
void add_rms_norm(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                  const at::Tensor& residual, const at::Tensor& weight, double eps);

// sum [M, D] <- input + residual; out [M, N] <- rms_norm(sum, norm_weight [D], eps) @ weight
// [N, D]^T (kernels/ops.h add_rms_norm_linear_cpu). out and sum must not overlap the inputs.
void add_rms_norm_linear(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                         const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                         const at::Tensor& weight);

// sum [M, D] <- input + residual; out [M, N] <- silu_mul(rms_norm(sum, norm_weight [D], eps) @
// weight [2N, D]^T) (kernels/ops.h add_rms_norm_swiglu_cpu).
void add_rms_norm_swiglu(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                         const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                         const at::Tensor& weight);

// sum [M, D] <- residual + attn [M, A] @ o_weight [D, A]^T; out [M, D] <- silu_mul(rms_norm(sum,
// norm_weight, eps) @ gate_up_weight [2I, D]^T) @ down_weight [D, I]^T (kernels/ops.h
// o_proj_mlp_cpu). out and sum must not overlap the inputs.
void o_proj_mlp(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                const at::Tensor& residual, const at::Tensor& o_weight,
                const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                const at::Tensor& down_weight);

// out [M, N] <- silu(input[:, :N]) * input[:, N:] for input [M, 2N] (kernels/ops.h silu_mul_cpu).
void silu_mul(const at::Tensor& out, const at::Tensor& input);

// An attention block's input stage: with q, k, v the column blocks [H D | Hkv D | Hkv D] of qkv
// [T, (H + 2 Hkv) D] (the fused q/k/v projection's output), query [T, H, D] <- rope(q_norm(q)) and
// kv_cache_layer at slot_mapping int64 [T] <- K = rope(k_norm(k)), V = v (a negative slot writes
// no K/V; its query is still written). The norms are rms_norm per head with weights [D], applied
// only when both are given; rope is rotary_embedding with cos, sin [T, D]. Each stage rounds as
// the op it replaces: equal to rms_norm, rotary_embedding and paged_kv_write in sequence.
void qk_norm_rope_kv_write(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                           const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& slot_mapping,
                           const c10::optional<at::Tensor>& q_norm_weight,
                           const c10::optional<at::Tensor>& k_norm_weight, double eps);

// A decode step's attention from the fused q/k/v projection: qk_norm_rope_kv_write(query,
// kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps) then
// paged_attention_decode(out, query, kv_cache_layer, block_tables, seq_lens, scale, key_bias), bit
// for bit, in one call (kernels/ops.h qk_norm_rope_attention_decode_cpu; on CUDA one kernel where
// the tensor-core decode attention applies). query is written too (attention_probs reads it).
void qk_norm_rope_attention_decode(const at::Tensor& out, const at::Tensor& query,
                                   const at::Tensor& kv_cache_layer, const at::Tensor& qkv,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& slot_mapping,
                                   const c10::optional<at::Tensor>& q_norm_weight,
                                   const c10::optional<at::Tensor>& k_norm_weight, double eps,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   double scale, const c10::optional<at::Tensor>& key_bias,
                                   const c10::optional<at::Tensor>& probs = c10::nullopt,
                                   const c10::optional<at::Tensor>& probe_heads = c10::nullopt);

// ---- DySCO (docs/dysco.md "Ops"): relevance, selection, bias, template positions. fp32; each op
// writes fixed-shape outputs. Row b of every [B, S] tensor belongs to sequence b with
// n_b = num_keys[b] keys (int64 [B], the current token included, in [0, S]; n_b = 0 is an idle row,
// written as zeros / false). Entries at j >= n_b are written as 0 (bias, relevance) / false
// (selected).

// mean fp32 [B, S] <- the mean of probs' rows `heads` (fp32 [B' >= B, P, S' >= S], contiguous;
// heads: 1 .. 64 row indices, repeats allowed): mean[b, j] = (probs[b, heads[0], j] + probs[b,
// heads[1], j] + ...) * (1.0f / H), added in fp32 in the order of `heads`, so the bits of ATen's
// clone, add_ ... add_, mul_ sequence that it replaces (the runner's head mean of a DySCO step, one
// kernel on a GPU instead of H + 1: docs/dysco.md "Ops").
void dysco_probe_mean(const at::Tensor& mean, const at::Tensor& probs, c10::IntArrayRef heads);

// relevance fp32 [B, S] <- r_t, in place: r_{t-1} in [0, n_b - 1) in, r_t in [0, n_b) out.
// probs fp32 [B, H, S'] (H >= 1, S' >= n_b): the selected heads' attention of the current query;
// decay fp32 [B]. a = mean_h probs[b, h, :n_b]; a[:n_b-1] += decay[b] * r_{t-1}; r_t = a / sum(a)
// (sum in float64; a row whose sum is 0 is written as zeros).
void dysco_relevance_update(const at::Tensor& relevance, const at::Tensor& probs,
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
void dysco_select_bias(const at::Tensor& bias, const at::Tensor& selected, const at::Tensor& stats,
                       const at::Tensor& relevance, const at::Tensor& num_keys,
                       const at::Tensor& template_mask, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& strength);

// bias fp32 [B, S] <- the DySCO attention bias of selected bool [B, S]; template_mask bool [B, S];
// strength fp32 [B] (> 0). In [0, n_b), with kHardMaskStrength = 99 (kernels/dysco_constants.h):
//   strength < 99:  log(strength) at (selected & !template_mask) and at n_b - 1; 0 elsewhere.
//   strength >= 99: 0 at selected and at n_b - 1; -inf elsewhere (template_mask not applied).
void dysco_bias_from_selection(const at::Tensor& bias, const at::Tensor& selected,
                               const at::Tensor& num_keys, const at::Tensor& template_mask,
                               const at::Tensor& strength);

// mask bool [P] <- true iff position i lies inside an occurrence (exact match, overlaps included)
// of any template sequence in tokens int64 [P]. sequences int64 [M] holds the K sequences
// concatenated; sequence k is sequences[sequence_offsets[k] : sequence_offsets[k+1]]
// (sequence_offsets int64 [K+1], non-decreasing, from 0 to M; an empty sequence marks nothing).
void dysco_template_mask(const at::Tensor& mask, const at::Tensor& tokens,
                         const at::Tensor& sequences, const at::Tensor& sequence_offsets);

// ---- registration

// The qualified names of the twenty ops, in schema order: "dysco::paged_kv_write",
// "dysco::paged_attention_decode", ..., "dysco::dysco_template_mask".
const std::vector<std::string>& AllOpNames();

// The names of AllOpNames() whose schema is not registered with the dispatcher (empty when all
// twenty are: libdysco_kernels.so is loaded and current).
std::vector<std::string> MissingOps();

// The names of `names` whose schema is not registered with the dispatcher.
std::vector<std::string> MissingOps(const std::vector<std::string>& names);

// The names of AllOpNames() that have no kernel for `backend` (c10::DispatchKey::CPU, ::CUDA), a
// missing schema included.
std::vector<std::string> MissingKernels(c10::DispatchKey backend);

}  // namespace dysco::ops
