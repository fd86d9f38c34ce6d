// Input validation shared by the CPU ops: every check raises c10::Error (TORCH_CHECK) with a
// message that names the op, the argument and what was expected, before any output is written.
// Thread-safety: pure functions of their arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace dysco::kernels::cpu {

// Sizes of a kv_cache_layer [2, num_pages, page_size, Hkv, D].
struct PagedCacheShape {
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
};

// kv_cache_layer: CPU, contiguous, 5-D with size(0) == 2, float32 | bfloat16 | float16.
PagedCacheShape CheckKvCache(const char* op, const at::Tensor& kv_cache_layer);

// tensor: CPU and contiguous, with the given dtype and number of dimensions.
void CheckTensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 int64_t dim);

// block_tables int32 [B, P] and seq_lens int64 [B]: every sequence length is in [min_len, P *
// page_size] and every page id it uses is in [0, num_pages). Returns max(seq_lens) (0 when B == 0).
int64_t CheckSequences(const char* op, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       int64_t batch, const PagedCacheShape& cache, int64_t min_len);

// key_bias, when present: fp32 [B, S] with S >= max_seq_len, CPU, contiguous.
void CheckKeyBias(const char* op, const c10::optional<at::Tensor>& key_bias, int64_t batch,
                  int64_t max_seq_len);

}  // namespace dysco::kernels::cpu
