// KvPagePool: the paged KV cache of one model. Owns the single kv_cache tensor [num_layers, 2,
// num_pages, page_size, num_kv_heads, head_dim] (model dtype, on the model's device) and hands out
// page ids to sequences; a sequence's pages, in order, hold its tokens (token i of a sequence lives
// in page pages[i / page_size] at offset i % page_size). Page 0 may be reserved as a padding page:
// block tables are padded with it and it is never handed out.
//
// Thread-safety: Allocate/Free/num_free/usage_ratio may be called from any number of threads at
// once (a mutex guards the free list). The tensor itself is written by ModelRunner::Forward;
// callers must not run two steps that write the same pages at once.
//
// Ownership: the pool owns the tensor; pages belong to whoever allocated them until freed. PageList
// frees its pages when destroyed, so every exit path returns them. The pool must outlive every
// PageList.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/status.h"
#include "core/model/model_config.h"

namespace at {
class Tensor;
}

namespace dysco {

struct KvPagePoolOptions {
  int page_size = 16;  // tokens per page
  // Size: num_pages when > 0 (usable pages, the padding page not counted); otherwise, when
  // memory_fraction > 0, the largest number of pages that fits in memory_fraction x the device's
  // free memory; otherwise the largest number that fits in max_bytes.
  int64_t num_pages = 0;
  int64_t max_bytes = 0;
  // In (0, 1]; CUDA devices of a CUDA build only (INVALID_ARGUMENT elsewhere). The free memory is
  // read at Create, after the caching allocator has returned its cached blocks to the driver, so
  // that memory freed while loading the model counts as free (create the pool after the model).
  double memory_fraction = 0.0;
  bool reserve_padding_page = true;
  std::string device = "cpu";  // a torch device string: "cpu", "cuda", "cuda:1"
};

class KvPagePool {
 public:
  // INVALID_ARGUMENT for a bad size/page_size/device, RESOURCE_EXHAUSTED when the tensor cannot be
  // allocated.
  static StatusOr<std::unique_ptr<KvPagePool>> Create(const ModelConfig& config,
                                                      const KvPagePoolOptions& options);
  ~KvPagePool();
  KvPagePool(const KvPagePool&) = delete;
  KvPagePool& operator=(const KvPagePool&) = delete;

  // All-or-nothing: n page ids, or RESOURCE_EXHAUSTED (and nothing taken) when fewer than n are
  // free.
  StatusOr<std::vector<int32_t>> Allocate(int64_t n);
  // Returns pages to the pool. INVALID_ARGUMENT (and nothing freed) for an id that is out of range,
  // the padding page, not allocated, or listed twice.
  Status Free(const std::vector<int32_t>& pages);

  int64_t num_free() const;
  int64_t num_total() const { return num_usable_; }  // pages that can be handed out
  double usage_ratio() const;                        // allocated / total, in [0, 1]
  int64_t pages_for_tokens(int64_t num_tokens) const {
    return (num_tokens + page_size_ - 1) / page_size_;
  }
  int page_size() const { return page_size_; }
  // Pages in the tensor, padding page included: valid page ids are [0, num_pages_in_tensor()).
  int64_t num_pages_in_tensor() const { return num_pages_in_tensor_; }
  int32_t padding_page() const { return 0; }  // meaningful when reserve_padding_page
  int64_t bytes_per_page() const { return bytes_per_page_; }
  int64_t tensor_bytes() const { return bytes_per_page_ * num_pages_in_tensor_; }
  // The device's free memory in bytes that memory_fraction was applied to; 0 when the pool was not
  // sized from memory_fraction.
  int64_t device_free_bytes() const { return device_free_bytes_; }
  const ModelConfig& config() const { return config_; }

  // The cache tensor, for ModelRunner (and tests). Defined in kv_page_pool.cpp so this header stays
  // torch-free.
  const at::Tensor& kv_cache() const;

  struct Impl;

 private:
  KvPagePool(const ModelConfig& config, int page_size, int64_t num_pages_in_tensor,
             int64_t num_usable, int64_t bytes_per_page, int64_t device_free_bytes,
             std::unique_ptr<Impl> impl);

  const ModelConfig config_;
  const int page_size_;
  const int64_t num_pages_in_tensor_;
  const int64_t num_usable_;
  const int64_t bytes_per_page_;
  const int64_t device_free_bytes_;
  std::unique_ptr<Impl> impl_;
};

// The pages of one sequence, in token order; returns them to the pool when destroyed (RAII).
// Move-only. Thread-safety: one owner at a time, like the sequence that holds it.
class PageList {
 public:
  PageList() = default;
  explicit PageList(KvPagePool* pool) : pool_(pool) {}
  ~PageList() { Release(); }
  PageList(PageList&& other) noexcept;
  PageList& operator=(PageList&& other) noexcept;
  PageList(const PageList&) = delete;
  PageList& operator=(const PageList&) = delete;

  // Allocates pages so that at least num_tokens tokens fit; RESOURCE_EXHAUSTED (nothing taken)
  // otherwise.
  Status EnsureCapacity(int64_t num_tokens);
  // Returns every page to the pool.
  void Release();

  const std::vector<int32_t>& ids() const { return ids_; }
  int64_t capacity_tokens() const;
  KvPagePool* pool() const { return pool_; }

 private:
  KvPagePool* pool_ = nullptr;
  std::vector<int32_t> ids_;
};

}  // namespace dysco
