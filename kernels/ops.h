// The `dysco` op library: paged KV-cache write and paged attention (decode, prefill,
// probabilities).
//
// These free functions are the C++ entry points behind `torch.ops.dysco.*` (schemas in
// kernels/torch_bindings.cpp, contract in docs/model-interface.md "Ops"). Each backend registers
// its own implementation (suffix _cpu, _cuda) with the dispatcher; callers normally go through the
// dispatcher.
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

}  // namespace dysco::kernels
