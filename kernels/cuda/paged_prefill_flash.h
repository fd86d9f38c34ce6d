// The flash-attention path of paged_attention_prefill on CUDA
// (kernels/cuda/paged_prefill_flash.cu): the sequences' K and V gathered from their pages into
// packed tensors, then ATen's flash-attention-2 varlen forward (causal, aligned bottom-right), or
// for chunks of >= 1024 new tokens ATen's cuDNN attention, two calls a chunk merged by log-sum-exp
// (paged_prefill_flash.cu says why and when; that path synchronises with the host once a call and
// is never taken during CUDA graph capture).
// Internal to kernels/cuda: paged_attention_prefill_cuda (paged_attention.cu) takes it when
// FlashPrefillApplies, and the split-KV kernel otherwise (fp32 caches, a key bias, head_dim not a
// multiple of 8 or above 256, a gather upper bound above 8 GiB or 2^31 keys, a K/V row above 2^20
// elements, a GPU older than sm80).
//
// Thread-safety: stateless but for two process-wide atomics (cuDNN failed once: flash from then on;
// a count of cuDNN sequences for tests). Ownership: scratch (offsets, gathered K/V, flash's output)
// comes from the caching allocator per call, on the current stream; nothing is kept.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "kernels/op_checks.h"

namespace dysco::kernels {

// Metadata only (dtype, key_bias presence, head_dim, the device's compute capability, the gather
// bound B x block_table_width x page_size): no value is read, nothing synchronises.
bool FlashPrefillApplies(const at::Tensor& query, const PagedCacheShape& cache,
                         const at::Tensor& block_tables, const c10::optional<at::Tensor>& key_bias);

// out [T, Hq, D] <- paged_attention_prefill without key bias, for arguments already checked
// (kernels/op_checks.h, CUDA tensors) on which FlashPrefillApplies.
void FlashPrefill(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
                  const PagedCacheShape& cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale);

}  // namespace dysco::kernels
