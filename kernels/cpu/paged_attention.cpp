// CPU paged attention: decode (one query per sequence), prefill (causal chunks) and the attention
// probabilities of selected heads. Host wrappers validate, then dispatch on the cache dtype; the
// loops are in attention_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "kernels/cpu/attention_kernel.h"
#include "kernels/cpu/cpu_checks.h"
#include "kernels/op_checks.h"
#include "kernels/ops.h"

// The cache dtypes: float32, bfloat16 and float16 (CheckKvCache, kernels/op_checks.h, rejects the
// others).
#define DYSCO_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace dysco::kernels {
namespace {

using cpu::AttentionScratch;
using cpu::PagedSequence;

// Query tokens of one prefill work item: enough rows (times the GQA group) that the gather of each
// key tile (a copy, K transposed, from pages that at 4K keys no longer sit in L2) is small next to
// the blocked products it feeds (32 tokens: 15% slower at 4K keys than 64; 64: 8% slower than 128
// with the AVX-512 tiles, 7% with AVX2, bench-kernels --threads 1 --cpu-time), few enough that a
// 256-token chunk still makes an item per thread for each KV head (SmolLM2: 3 heads, 6 items).
constexpr int64_t kPrefillTokensPerItem = 128;
// Decode splits a sequence over threads only when there are fewer (sequence, KV head) items than
// threads, and never into pieces shorter than this.
constexpr int64_t kMinKeysPerSplit = 256;

template <typename T>
PagedSequence<T> SequenceView(const at::Tensor& kv_cache_layer, const PagedCacheShape& cache,
                              const int32_t* pages, int64_t kv_head) {
  PagedSequence<T> seq;
  const T* base = kv_cache_layer.data_ptr<T>();
  const int64_t half = cache.num_pages * cache.page_size * cache.num_kv_heads * cache.head_dim;
  seq.k = base + kv_head * cache.head_dim;
  seq.v = base + half + kv_head * cache.head_dim;
  seq.pages = pages;
  seq.page_size = cache.page_size;
  seq.token_stride = cache.num_kv_heads * cache.head_dim;
  seq.page_stride = cache.page_size * seq.token_stride;
  return seq;
}

const float* BiasData(const c10::optional<at::Tensor>& key_bias) {
  return key_bias.has_value() && key_bias->defined() ? key_bias->data_ptr<float>() : nullptr;
}

int64_t BiasStride(const c10::optional<at::Tensor>& key_bias) {
  return key_bias.has_value() && key_bias->defined() ? key_bias->size(1) : 0;
}

template <typename T>
void LoadScaledQuery(const T* q, int64_t n, float scale, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(q[i]) * scale;
}

template <typename T>
void DecodeImpl(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
                const PagedCacheShape& cache, const at::Tensor& block_tables,
                const at::Tensor& seq_lens, int64_t max_len, float scale, const float* bias,
                int64_t bias_stride) {
  const int64_t batch = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = cache.head_dim;
  const int64_t kv_heads = cache.num_kv_heads;
  const int64_t group = num_heads / kv_heads;
  const int64_t max_pages = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const T* q_data = query.data_ptr<T>();
  T* out_data = out.data_ptr<T>();

  const int64_t items = batch * kv_heads;
  const int64_t threads = at::get_num_threads();
  int64_t splits = 1;
  if (items < threads) {
    splits =
        std::min((threads + items - 1) / items, std::max<int64_t>(1, max_len / kMinKeysPerSplit));
  }

  // Partial (max, sum, acc) of each split when a sequence is split; combined below.
  const int64_t partial_stride = group * (head_dim + 2);
  std::vector<float> partials(splits > 1 ? items * splits * partial_stride : 0);

  at::parallel_for(0, items * splits, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch;
    scratch.Reserve(group, head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits;
      const int64_t b = item / splits / kv_heads;
      const int64_t kv_head = item / splits % kv_heads;
      const int64_t len = lens[b];
      const int64_t split_len = (len + splits - 1) / splits;
      const int64_t key_begin = std::min(len, split * split_len);
      const int64_t key_end = std::min(len, key_begin + split_len);
      const int64_t head0 = kv_head * group;
      LoadScaledQuery(q_data + (b * num_heads + head0) * head_dim, group * head_dim, scale,
                      scratch.query.data());
      std::fill(scratch.row_end.begin(), scratch.row_end.begin() + group, len);
      scratch.ResetState(group, head_dim);
      const PagedSequence<T> seq =
          SequenceView<T>(kv_cache_layer, cache, tables + b * max_pages, kv_head);
      cpu::AttendKeys(seq, group, head_dim, key_begin, key_end,
                      bias == nullptr ? nullptr : bias + b * bias_stride, scratch);
      if (splits == 1) {
        for (int64_t g = 0; g < group; ++g) {
          cpu::WriteNormalised(scratch, g, head_dim,
                               out_data + (b * num_heads + head0 + g) * head_dim);
        }
      } else {
        float* partial = partials.data() + item * partial_stride;
        for (int64_t g = 0; g < group; ++g) {
          float* p = partial + g * (head_dim + 2);
          p[0] = scratch.max[g];
          p[1] = scratch.sum[g];
          std::copy_n(scratch.acc.data() + g * head_dim, head_dim, p + 2);
        }
      }
    }
  });
  if (splits == 1) return;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads;
      const int64_t head0 = item % kv_heads * group;
      for (int64_t g = 0; g < group; ++g) {
        float max = cpu::kNegInf;
        for (int64_t s = 0; s < splits; ++s) {
          max = std::max(max, partials[(item * splits + s) * partial_stride + g * (head_dim + 2)]);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float sum = 0.0f;
        if (max != cpu::kNegInf) {
          for (int64_t s = 0; s < splits; ++s) {
            const float* p =
                partials.data() + (item * splits + s) * partial_stride + g * (head_dim + 2);
            if (p[0] == cpu::kNegInf) continue;
            const float weight = std::exp(p[0] - max);
            sum += p[1] * weight;
            cpu::Axpy(acc.data(), weight, p + 2, head_dim);
          }
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        T* o = out_data + (b * num_heads + head0 + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

// One prefill work item: up to kPrefillTokensPerItem consecutive new tokens of one sequence.
struct PrefillTile {
  int64_t sequence;
  int64_t token_begin;  // index into query's T dimension
  int64_t token_end;
  int64_t first_position;  // position of token_begin in its sequence
};

template <typename T>
void PrefillImpl(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
                 const PagedCacheShape& cache, const at::Tensor& block_tables,
                 const std::vector<PrefillTile>& tiles, float scale, const float* bias,
                 int64_t bias_stride) {
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = cache.head_dim;
  const int64_t kv_heads = cache.num_kv_heads;
  const int64_t group = num_heads / kv_heads;
  const int64_t max_pages = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const T* q_data = query.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t max_rows = kPrefillTokensPerItem * group;
  const int64_t num_items = static_cast<int64_t>(tiles.size()) * kv_heads;

  // Causal prefill: an item's cost grows with its last position, so a static split of the items
  // would leave the thread with the early tokens idle. Threads take items off a shared counter,
  // the costliest first.
  std::vector<int64_t> order(num_items);
  for (int64_t i = 0; i < num_items; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const PrefillTile& ta = tiles[a / kv_heads];
    const PrefillTile& tb = tiles[b / kv_heads];
    return (ta.first_position + ta.token_end - ta.token_begin) * (ta.token_end - ta.token_begin) >
           (tb.first_position + tb.token_end - tb.token_begin) * (tb.token_end - tb.token_begin);
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);

  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    AttentionScratch scratch;
    scratch.Reserve(max_rows, head_dim);
    for (int64_t index = next++; index < num_items; index = next++) {
      const int64_t item = order[index];
      const PrefillTile& tile = tiles[item / kv_heads];
      const int64_t kv_head = item % kv_heads;
      const int64_t head0 = kv_head * group;
      const int64_t tokens = tile.token_end - tile.token_begin;
      const int64_t rows = tokens * group;
      for (int64_t t = 0; t < tokens; ++t) {
        LoadScaledQuery(q_data + ((tile.token_begin + t) * num_heads + head0) * head_dim,
                        group * head_dim, scale, scratch.query.data() + t * group * head_dim);
        std::fill_n(scratch.row_end.begin() + t * group, group, tile.first_position + t + 1);
      }
      scratch.ResetState(rows, head_dim);
      const PagedSequence<T> seq =
          SequenceView<T>(kv_cache_layer, cache, tables + tile.sequence * max_pages, kv_head);
      const float* seq_bias = bias == nullptr ? nullptr : bias + tile.sequence * bias_stride;
      const int64_t key_end = tile.first_position + tokens;
      if (!cpu::AttendKeysBlocked(seq, rows, head_dim, 0, key_end, seq_bias, scratch)) {
        cpu::AttendKeys(seq, rows, head_dim, 0, key_end, seq_bias, scratch);
      }
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          cpu::WriteNormalised(
              scratch, t * group + g, head_dim,
              out_data + ((tile.token_begin + t) * num_heads + head0 + g) * head_dim);
        }
      }
    }
  });
}

template <typename T>
void ProbsImpl(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
               const PagedCacheShape& cache, const at::Tensor& block_tables,
               const at::Tensor& seq_lens, const at::Tensor& heads, float scale, const float* bias,
               int64_t bias_stride) {
  const int64_t batch = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = cache.head_dim;
  const int64_t group = num_heads / cache.num_kv_heads;
  const int64_t num_probe = heads.size(0);
  const int64_t out_len = out.size(2);
  const int64_t max_pages = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* head_ids = heads.data_ptr<int64_t>();
  const T* q_data = query.data_ptr<T>();
  float* out_data = out.data_ptr<float>();

  at::parallel_for(0, batch * num_probe, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(head_dim);
    std::vector<float> k(cpu::kKeyBlock * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_probe;
      const int64_t head = head_ids[item % num_probe];
      const int64_t len = lens[b];
      float* row = out_data + item * out_len;
      LoadScaledQuery(q_data + (b * num_heads + head) * head_dim, head_dim, scale, q.data());
      const PagedSequence<T> seq =
          SequenceView<T>(kv_cache_layer, cache, tables + b * max_pages, head / group);
      cpu::ProbsRow(seq, q.data(), head_dim, len,
                    bias == nullptr ? nullptr : bias + b * bias_stride, k.data(), row);
      std::fill(row + len, row + out_len, 0.0f);
    }
  });
}

}  // namespace

void paged_attention_decode_cpu(const at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale,
                                const c10::optional<at::Tensor>& key_bias) {
  const cpu::PagedAttentionShape shape =
      cpu::CheckPagedAttentionDecode(out, query, kv_cache_layer, block_tables, seq_lens, key_bias);
  if (out.numel() == 0) return;
  DYSCO_DISPATCH_CACHE_TYPES(query.scalar_type(), kPagedAttentionDecodeOp, [&] {
    DecodeImpl<scalar_t>(out, query, kv_cache_layer, shape.cache, block_tables, seq_lens,
                         shape.max_seq_len, static_cast<float>(scale), BiasData(key_bias),
                         BiasStride(key_bias));
  });
}

void qk_norm_rope_attention_decode_cpu(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, double scale, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& probe_heads) {
  // Every argument checked before anything is written (the ops check their own again).
  CheckQkNormRopeAttentionDecodeArgs(out, query, kv_cache_layer, qkv, cos, sin, slot_mapping,
                                     q_norm_weight, k_norm_weight, eps, block_tables, seq_lens,
                                     key_bias, probs, probe_heads);
  qk_norm_rope_kv_write_cpu(query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight,
                            k_norm_weight, eps);
  paged_attention_decode_cpu(out, query, kv_cache_layer, block_tables, seq_lens, scale, key_bias);
  if (probs.has_value() && probs->defined()) {
    attention_probs_cpu(*probs, query, kv_cache_layer, block_tables, seq_lens, *probe_heads, scale,
                        key_bias);
  }
}

void paged_attention_prefill_cpu(const at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                 double scale, const c10::optional<at::Tensor>& key_bias) {
  const cpu::PagedAttentionShape shape = cpu::CheckPagedAttentionPrefill(
      out, query, kv_cache_layer, block_tables, seq_lens, query_start_loc, key_bias);
  const int64_t batch = seq_lens.size(0);
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  std::vector<PrefillTile> tiles;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = starts[b + 1] - starts[b];
    for (int64_t t = 0; t < q_len; t += kPrefillTokensPerItem) {
      const int64_t tokens = std::min(kPrefillTokensPerItem, q_len - t);
      tiles.push_back({b, starts[b] + t, starts[b] + t + tokens, lens[b] - q_len + t});
    }
  }
  if (out.numel() == 0) return;
  DYSCO_DISPATCH_CACHE_TYPES(query.scalar_type(), kPagedAttentionPrefillOp, [&] {
    PrefillImpl<scalar_t>(out, query, kv_cache_layer, shape.cache, block_tables, tiles,
                          static_cast<float>(scale), BiasData(key_bias), BiasStride(key_bias));
  });
}

void attention_probs_cpu(const at::Tensor& out, const at::Tensor& query,
                         const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& heads, double scale,
                         const c10::optional<at::Tensor>& key_bias) {
  const cpu::PagedAttentionShape shape =
      cpu::CheckAttentionProbs(out, query, kv_cache_layer, block_tables, seq_lens, heads, key_bias);
  if (out.numel() == 0) return;
  DYSCO_DISPATCH_CACHE_TYPES(query.scalar_type(), kAttentionProbsOp, [&] {
    ProbsImpl<scalar_t>(out, query, kv_cache_layer, shape.cache, block_tables, seq_lens, heads,
                        static_cast<float>(scale), BiasData(key_bias), BiasStride(key_bias));
  });
}

}  // namespace dysco::kernels
