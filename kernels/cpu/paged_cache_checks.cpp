#include "kernels/cpu/paged_cache_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace dysco::kernels::cpu {

void CheckTensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 int64_t dim) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ",
              tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous (shape ", tensor.sizes(),
              ", strides ", tensor.strides(), ")");
}

PagedCacheShape CheckKvCache(const char* op, const at::Tensor& kv_cache_layer) {
  TORCH_CHECK(kv_cache_layer.defined(), op, ": kv_cache_layer is undefined");
  const auto dtype = kv_cache_layer.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": kv_cache_layer must be float32, bfloat16 or float16, got ", dtype);
  CheckTensor(op, "kv_cache_layer", kv_cache_layer, dtype, 5);
  TORCH_CHECK(kv_cache_layer.size(0) == 2, op,
              ": kv_cache_layer must be [2, num_pages, page_size, Hkv, D], got ",
              kv_cache_layer.sizes());
  PagedCacheShape shape;
  shape.num_pages = kv_cache_layer.size(1);
  shape.page_size = kv_cache_layer.size(2);
  shape.num_kv_heads = kv_cache_layer.size(3);
  shape.head_dim = kv_cache_layer.size(4);
  TORCH_CHECK(
      shape.page_size > 0 && shape.num_kv_heads > 0 && shape.head_dim > 0, op,
      ": kv_cache_layer has an empty page, head or head_dim dimension: ", kv_cache_layer.sizes());
  return shape;
}

int64_t CheckSequences(const char* op, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       int64_t batch, const PagedCacheShape& cache, int64_t min_len) {
  CheckTensor(op, "block_tables", block_tables, at::kInt, 2);
  CheckTensor(op, "seq_lens", seq_lens, at::kLong, 1);
  TORCH_CHECK(block_tables.size(0) == batch, op, ": block_tables must have ", batch,
              " rows (one per sequence), got shape ", block_tables.sizes());
  TORCH_CHECK(seq_lens.size(0) == batch, op, ": seq_lens must have ", batch,
              " entries (one per sequence), got shape ", seq_lens.sizes());
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

void CheckKeyBias(const char* op, const c10::optional<at::Tensor>& key_bias, int64_t batch,
                  int64_t max_seq_len) {
  if (!key_bias.has_value() || !key_bias->defined()) return;
  CheckTensor(op, "key_bias", *key_bias, at::kFloat, 2);
  TORCH_CHECK(key_bias->size(0) == batch && key_bias->size(1) >= max_seq_len, op,
              ": key_bias must be [B, S] with B = ", batch,
              " and S >= max(seq_lens) = ", max_seq_len, ", got ", key_bias->sizes());
}

}  // namespace dysco::kernels::cpu
