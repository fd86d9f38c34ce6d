// CPU paged_kv_write: copies each token's K and V rows into its slot of the paged cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "kernels/cpu/cpu_checks.h"
#include "kernels/ops.h"

namespace dysco::kernels {

void paged_kv_write_cpu(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                        const at::Tensor& value, const at::Tensor& slot_mapping) {
  const PagedCacheShape cache = cpu::CheckPagedKvWrite(kv_cache_layer, key, value, slot_mapping);
  const int64_t num_tokens = key.size(0);
  const int64_t num_slots = cache.num_pages * cache.page_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();

  // A token's K (or V) for all heads is one contiguous run of Hkv * D elements in both tensors.
  const int64_t row_bytes = cache.num_kv_heads * cache.head_dim * kv_cache_layer.element_size();
  const char* key_bytes = static_cast<const char*>(key.data_ptr());
  const char* value_bytes = static_cast<const char*>(value.data_ptr());
  char* k_cache = static_cast<char*>(kv_cache_layer.data_ptr());
  char* v_cache = k_cache + num_slots * row_bytes;
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      std::memcpy(k_cache + slot * row_bytes, key_bytes + t * row_bytes, row_bytes);
      std::memcpy(v_cache + slot * row_bytes, value_bytes + t * row_bytes, row_bytes);
    }
  });
}

}  // namespace dysco::kernels
