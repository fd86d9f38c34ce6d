// Argument checks of the CPU `dysco` ops. Each Check<Op> first calls the device-neutral
// Check<Op>Args (kernels/op_checks.h: shapes, dtypes, contiguity, one device), then requires that
// device to be the CPU, then checks the values the CPU kernel reads on the host (sequence lengths,
// page ids, slots, num_keys, top_p / top_k / strength, offsets). Everything is checked before any
// output is written; a failed check raises c10::Error (TORCH_CHECK) naming the op and the argument.
// Internal to kernels/cpu.
// Thread-safety: pure functions of their arguments (they read, never write, the tensors).
// Ownership: nothing is kept.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "kernels/op_checks.h"

namespace dysco::kernels::cpu {

// tensor (defined) lives on the CPU. With CheckSameDevice, checking the output covers every tensor.
void CheckCpu(const char* op, const char* name, const at::Tensor& tensor);

// block_tables int32 [B, P] and seq_lens int64 [B], shapes already checked: every sequence length
// is in [min_len, P * page_size] and every page id it uses is in [0, num_pages). Returns
// max(seq_lens) (0 when B == 0).
int64_t CheckSequenceValues(const char* op, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const PagedCacheShape& cache,
                            int64_t min_len);

// num_keys int64 [B], shape already checked: every entry is in [0, max_keys] (`bound` says why).
void CheckNumKeysValues(const char* op, const at::Tensor& num_keys, int64_t max_keys,
                        const char* bound);

// strength fp32 [B], shape already checked: every entry > 0 (finite or not: +inf is a hard mask).
void CheckStrengthValues(const char* op, const at::Tensor& strength);

// ---- one per op: all of its checks.

// Returns the cache's sizes.
PagedCacheShape CheckPagedKvWrite(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& slot_mapping);

// qk_norm_rope_kv_write: CheckQkNormRopeKvWriteArgs, on the CPU, every slot < the cache's slots.
PagedCacheShape CheckQkNormRopeKvWrite(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                                       const at::Tensor& qkv, const at::Tensor& cos,
                                       const at::Tensor& sin, const at::Tensor& slot_mapping,
                                       const c10::optional<at::Tensor>& q_norm_weight,
                                       const c10::optional<at::Tensor>& k_norm_weight, double eps);

// What the paged attention kernels need from their checks.
struct PagedAttentionShape {
  PagedCacheShape cache;
  int64_t max_seq_len = 0;  // max(seq_lens), 0 for an empty batch
};

PagedAttentionShape CheckPagedAttentionDecode(const at::Tensor& out, const at::Tensor& query,
                                              const at::Tensor& kv_cache_layer,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& seq_lens,
                                              const c10::optional<at::Tensor>& key_bias);

// Also: query_start_loc runs from 0 to T, and sequence b's q_len is in [0, seq_lens[b]].
PagedAttentionShape CheckPagedAttentionPrefill(const at::Tensor& out, const at::Tensor& query,
                                               const at::Tensor& kv_cache_layer,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start_loc,
                                               const c10::optional<at::Tensor>& key_bias);

// Also: every head id is a query head, and S' >= max(seq_lens).
PagedAttentionShape CheckAttentionProbs(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& kv_cache_layer,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& heads,
                                        const c10::optional<at::Tensor>& key_bias);

void CheckLinear(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

void CheckDyscoRelevanceUpdate(const at::Tensor& relevance, const at::Tensor& probs,
                               const at::Tensor& num_keys, const at::Tensor& decay);

// The most keys per row dysco_select_bias_cpu takes: it packs positions in 32 bits.
inline constexpr int64_t kMaxSelectWidth = 0xffffffffLL;

// Also: S <= kMaxSelectWidth.
void CheckDyscoSelectBias(const at::Tensor& bias, const at::Tensor& selected,
                          const at::Tensor& stats, const at::Tensor& relevance,
                          const at::Tensor& num_keys, const at::Tensor& template_mask,
                          const at::Tensor& top_p, const at::Tensor& top_k,
                          const at::Tensor& strength);

void CheckDyscoBiasFromSelection(const at::Tensor& bias, const at::Tensor& selected,
                                 const at::Tensor& num_keys, const at::Tensor& template_mask,
                                 const at::Tensor& strength);

void CheckDyscoTemplateMask(const at::Tensor& mask, const at::Tensor& tokens,
                            const at::Tensor& sequences, const at::Tensor& sequence_offsets);

}  // namespace dysco::kernels::cpu
