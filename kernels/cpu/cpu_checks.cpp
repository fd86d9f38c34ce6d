// Argument checks of the CPU `dysco` ops (kernels/cpu/cpu_checks.h).
#include "kernels/cpu/cpu_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace dysco::kernels::cpu {
namespace {

// key_bias, when present (shape already checked): S >= max_seq_len.
void CheckKeyBiasLength(const char* op, const c10::optional<at::Tensor>& key_bias,
                        int64_t max_seq_len) {
  if (!key_bias.has_value() || !key_bias->defined()) return;
  TORCH_CHECK(key_bias->size(1) >= max_seq_len, op,
              ": key_bias must be [B, S] with B = ", key_bias->size(0),
              " and S >= max(seq_lens) = ", max_seq_len, ", got ", key_bias->sizes());
}

}  // namespace

void CheckCpu(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
              tensor.device());
}

int64_t CheckSequenceValues(const char* op, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const PagedCacheShape& cache,
                            int64_t min_len) {
  const int64_t batch = seq_lens.size(0);
  const int64_t max_pages = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= min_len && len <= max_pages * cache.page_size, op, ": seq_lens[", b,
                "] = ", len, " must be in [", min_len, ", ", max_pages * cache.page_size,
                "] (block_tables has ", max_pages, " pages of ", cache.page_size, " tokens)");
    const int64_t pages_used = (len + cache.page_size - 1) / cache.page_size;
    for (int64_t p = 0; p < pages_used; ++p) {
      const int32_t page = tables[b * max_pages + p];
      TORCH_CHECK(page >= 0 && page < cache.num_pages, op, ": block_tables[", b, ", ", p,
                  "] = ", page, " is not a page of the cache (num_pages = ", cache.num_pages, ")");
    }
    max_len = std::max(max_len, len);
  }
  return max_len;
}

void CheckNumKeysValues(const char* op, const at::Tensor& num_keys, int64_t max_keys,
                        const char* bound) {
  const int64_t* keys = num_keys.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_keys.size(0); ++b) {
    TORCH_CHECK(keys[b] >= 0 && keys[b] <= max_keys, op, ": num_keys[", b, "] = ", keys[b],
                " must be in [0, ", max_keys, "] (", bound, ")");
  }
}

void CheckStrengthValues(const char* op, const at::Tensor& strength) {
  const float* values = strength.data_ptr<float>();
  for (int64_t b = 0; b < strength.size(0); ++b) {
    TORCH_CHECK(values[b] > 0.0f, op, ": strength[", b, "] = ", values[b], " must be > 0");
  }
}

void CheckLinear(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  CheckLinearArgs(out, input, weight);
  CheckCpu(kLinearOp, "out", out);
}

namespace {

// Every slot of slot_mapping (int64 [T], shape checked) is below the cache's number of slots
// (negative slots are skipped by the ops).
void CheckSlotValues(const char* op, const at::Tensor& slot_mapping, const PagedCacheShape& cache) {
  const int64_t num_slots = cache.num_pages * cache.page_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_slots, op, ": slot_mapping[", t, "] = ", slots[t],
                " is past the cache (", num_slots, " slots)");
  }
}

}  // namespace

PagedCacheShape CheckPagedKvWrite(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& slot_mapping) {
  constexpr const char* kOp = kPagedKvWriteOp;
  const PagedCacheShape cache = CheckPagedKvWriteArgs(kv_cache_layer, key, value, slot_mapping);
  CheckCpu(kOp, "kv_cache_layer", kv_cache_layer);
  CheckSlotValues(kOp, slot_mapping, cache);
  return cache;
}

PagedCacheShape CheckQkNormRopeKvWrite(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                                       const at::Tensor& qkv, const at::Tensor& cos,
                                       const at::Tensor& sin, const at::Tensor& slot_mapping,
                                       const c10::optional<at::Tensor>& q_norm_weight,
                                       const c10::optional<at::Tensor>& k_norm_weight, double eps) {
  constexpr const char* kOp = kQkNormRopeKvWriteOp;
  const PagedCacheShape cache = CheckQkNormRopeKvWriteArgs(
      query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps);
  CheckCpu(kOp, "query", query);
  CheckSlotValues(kOp, slot_mapping, cache);
  return cache;
}

PagedAttentionShape CheckPagedAttentionDecode(const at::Tensor& out, const at::Tensor& query,
                                              const at::Tensor& kv_cache_layer,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& seq_lens,
                                              const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kPagedAttentionDecodeOp;
  PagedAttentionShape shape;
  shape.cache =
      CheckPagedAttentionDecodeArgs(out, query, kv_cache_layer, block_tables, seq_lens, key_bias);
  CheckCpu(kOp, "out", out);
  shape.max_seq_len = CheckSequenceValues(kOp, block_tables, seq_lens, shape.cache, 1);
  CheckKeyBiasLength(kOp, key_bias, shape.max_seq_len);
  return shape;
}

PagedAttentionShape CheckPagedAttentionPrefill(const at::Tensor& out, const at::Tensor& query,
                                               const at::Tensor& kv_cache_layer,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start_loc,
                                               const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kPagedAttentionPrefillOp;
  PagedAttentionShape shape;
  shape.cache = CheckPagedAttentionPrefillArgs(out, query, kv_cache_layer, block_tables, seq_lens,
                                               query_start_loc, key_bias);
  CheckCpu(kOp, "out", out);
  shape.max_seq_len = CheckSequenceValues(kOp, block_tables, seq_lens, shape.cache, 0);
  CheckKeyBiasLength(kOp, key_bias, shape.max_seq_len);

  const int64_t batch = seq_lens.size(0);
  const int64_t num_tokens = query.size(0);
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[batch] == num_tokens, kOp,
              ": query_start_loc must start at 0 and end at T = ", num_tokens, ", got ", starts[0],
              " .. ", starts[batch]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = starts[b + 1] - starts[b];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[b], kOp, ": sequence ", b, " has ", q_len,
                " new tokens (query_start_loc[", b, "] = ", starts[b], ", query_start_loc[", b + 1,
                "] = ", starts[b + 1], ") but seq_lens[", b, "] = ", lens[b]);
  }
  return shape;
}

PagedAttentionShape CheckAttentionProbs(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& kv_cache_layer,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& heads,
                                        const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kAttentionProbsOp;
  PagedAttentionShape shape;
  shape.cache =
      CheckAttentionProbsArgs(out, query, kv_cache_layer, block_tables, seq_lens, heads, key_bias);
  CheckCpu(kOp, "out", out);
  shape.max_seq_len = CheckSequenceValues(kOp, block_tables, seq_lens, shape.cache, 1);
  TORCH_CHECK(out.size(2) >= shape.max_seq_len, kOp, ": out must be [B = ", out.size(0),
              ", H = ", out.size(1), ", S' >= ", shape.max_seq_len, "], got ", out.sizes());
  const int64_t* head_ids = heads.data_ptr<int64_t>();
  for (int64_t i = 0; i < heads.size(0); ++i) {
    TORCH_CHECK(head_ids[i] >= 0 && head_ids[i] < query.size(1), kOp, ": heads[", i,
                "] = ", head_ids[i], " is not a query head (Hq = ", query.size(1), ")");
  }
  CheckKeyBiasLength(kOp, key_bias, shape.max_seq_len);
  return shape;
}

void CheckDyscoRelevanceUpdate(const at::Tensor& relevance, const at::Tensor& probs,
                               const at::Tensor& num_keys, const at::Tensor& decay) {
  constexpr const char* kOp = kDyscoRelevanceUpdateOp;
  CheckDyscoRelevanceUpdateArgs(relevance, probs, num_keys, decay);
  CheckCpu(kOp, "relevance", relevance);
  CheckNumKeysValues(kOp, num_keys, std::min(relevance.size(1), probs.size(2)),
                     "relevance and probs hold min(S, S') keys");
}

void CheckDyscoSelectBias(const at::Tensor& bias, const at::Tensor& selected,
                          const at::Tensor& stats, const at::Tensor& relevance,
                          const at::Tensor& num_keys, const at::Tensor& template_mask,
                          const at::Tensor& top_p, const at::Tensor& top_k,
                          const at::Tensor& strength) {
  constexpr const char* kOp = kDyscoSelectBiasOp;
  CheckDyscoSelectBiasArgs(bias, selected, stats, relevance, num_keys, template_mask, top_p, top_k,
                           strength);
  CheckCpu(kOp, "bias", bias);
  const int64_t width = relevance.size(1);
  TORCH_CHECK(width <= kMaxSelectWidth, kOp, ": relevance has ", width,
              " keys per row, more than 2^32 - 1");
  CheckNumKeysValues(kOp, num_keys, width, "relevance rows hold S keys");
  CheckStrengthValues(kOp, strength);
  const float* ps = top_p.data_ptr<float>();
  const int64_t* ks = top_k.data_ptr<int64_t>();
  for (int64_t b = 0; b < relevance.size(0); ++b) {
    TORCH_CHECK(ps[b] <= 1.0f, kOp, ": top_p[", b, "] = ", ps[b],
                " must be in (0, 1], or <= 0 for unset");
    TORCH_CHECK(ps[b] > 0.0f || ks[b] > 0, kOp, ": sequence ", b, " sets neither top_p (", ps[b],
                ") nor top_k (", ks[b], ")");
  }
}

void CheckDyscoBiasFromSelection(const at::Tensor& bias, const at::Tensor& selected,
                                 const at::Tensor& num_keys, const at::Tensor& template_mask,
                                 const at::Tensor& strength) {
  constexpr const char* kOp = kDyscoBiasFromSelectionOp;
  CheckDyscoBiasFromSelectionArgs(bias, selected, num_keys, template_mask, strength);
  CheckCpu(kOp, "bias", bias);
  CheckNumKeysValues(kOp, num_keys, bias.size(1), "bias rows hold S keys");
  CheckStrengthValues(kOp, strength);
}

void CheckDyscoTemplateMask(const at::Tensor& mask, const at::Tensor& tokens,
                            const at::Tensor& sequences, const at::Tensor& sequence_offsets) {
  constexpr const char* kOp = kDyscoTemplateMaskOp;
  CheckDyscoTemplateMaskArgs(mask, tokens, sequences, sequence_offsets);
  CheckCpu(kOp, "mask", mask);
  const int64_t num_sequences = sequence_offsets.size(0) - 1;
  const int64_t* offsets = sequence_offsets.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[num_sequences] == sequences.size(0), kOp,
              ": sequence_offsets must run from 0 to M = ", sequences.size(0), ", got ", offsets[0],
              " .. ", offsets[num_sequences]);
  for (int64_t k = 0; k < num_sequences; ++k) {
    TORCH_CHECK(offsets[k] <= offsets[k + 1], kOp,
                ": sequence_offsets must be non-decreasing, got ", offsets[k], " then ",
                offsets[k + 1], " at ", k);
  }
}

}  // namespace dysco::kernels::cpu
