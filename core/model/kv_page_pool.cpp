#include "core/model/kv_page_pool.h"

#include <limits>

#include <torch/script.h>
#if defined(DYSCO_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "core/base/thread_annotations.h"
#include "core/model/torch_dtype.h"

namespace dysco {

struct KvPagePool::Impl {
  at::Tensor kv_cache;
  mutable Mutex mu;
  std::vector<int32_t> free_list GUARDED_BY(mu);  // popped from the back
  std::vector<uint8_t> allocated GUARDED_BY(mu);  // by page id
};

namespace {

// The free memory of a CUDA device in bytes, after the caching allocator has released its unused
// cached blocks (which the driver counts as used). Only CUDA builds can read it: CPU builds link a
// libtorch without CUDA.
StatusOr<int64_t> FreeDeviceBytes(const std::string& device_name) {
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(device_name);
  } catch (const std::exception& e) {
    return InvalidArgumentError("kv_pool.device \"" + device_name + "\": " + e.what());
  }
  if (!device.is_cuda()) {
    return InvalidArgumentError(
        "kv_pool.memory_fraction sizes the cache from a CUDA device's free " +
        std::string("memory; the pool is on \"") + device_name + "\"");
  }
#if defined(DYSCO_CUDA)
  try {
    const c10::DeviceIndex index =
        device.has_index() ? device.index() : c10::cuda::current_device();
    if (index >= c10::cuda::device_count()) {
      return InvalidArgumentError("kv_pool.device \"" + device_name + "\": no such CUDA device (" +
                                  std::to_string(c10::cuda::device_count()) + " present)");
    }
    c10::cuda::CUDACachingAllocator::emptyCache();
    const auto [free_bytes, total_bytes] =
        c10::cuda::CUDACachingAllocator::get()->getMemoryInfo(index);
    (void)total_bytes;
    return static_cast<int64_t>(free_bytes);
  } catch (const c10::Error& e) {
    return UnavailableError("kv_pool: cannot read the free memory of \"" + device_name +
                            "\": " + e.what_without_backtrace());
  }
#else
  return InvalidArgumentError(
      "kv_pool.memory_fraction needs a CUDA build (-DDYSCO_CUDA=ON); this build has no CUDA");
#endif
}

}  // namespace

StatusOr<std::unique_ptr<KvPagePool>> KvPagePool::Create(const ModelConfig& config,
                                                         const KvPagePoolOptions& options) {
  if (options.page_size <= 0 || options.page_size > 4096) {
    return InvalidArgumentError("kv_pool.page_size must be in [1, 4096], got " +
                                std::to_string(options.page_size));
  }
  const int64_t bytes_per_page = int64_t{config.num_layers} * 2 * options.page_size *
                                 config.num_kv_heads * config.head_dim *
                                 ModelDtypeSize(config.dtype);
  const int64_t reserved = options.reserve_padding_page ? 1 : 0;
  int64_t usable = options.num_pages;
  if (usable < 0) {
    return InvalidArgumentError("kv_pool.num_pages must be >= 0, got " + std::to_string(usable));
  }
  int64_t device_free_bytes = 0;
  if (usable == 0 && options.memory_fraction != 0.0) {
    if (!(options.memory_fraction > 0.0 && options.memory_fraction <= 1.0)) {
      return InvalidArgumentError("kv_pool.memory_fraction must be in (0, 1], got " +
                                  std::to_string(options.memory_fraction));
    }
    DYSCO_ASSIGN_OR_RETURN(device_free_bytes, FreeDeviceBytes(options.device));
    const int64_t budget =
        static_cast<int64_t>(options.memory_fraction * static_cast<double>(device_free_bytes));
    usable = budget / bytes_per_page - reserved;
    if (usable <= 0) {
      return ResourceExhaustedError(
          "kv_pool: memory_fraction " + std::to_string(options.memory_fraction) + " of the " +
          std::to_string(device_free_bytes) + " bytes free on \"" + options.device +
          "\" is smaller than " + std::to_string(1 + reserved) + " pages of " +
          std::to_string(bytes_per_page) + " bytes");
    }
  } else if (usable == 0) {
    if (options.max_bytes <= 0) {
      return InvalidArgumentError("kv_pool: set num_pages or max_bytes (both are 0)");
    }
    usable = options.max_bytes / bytes_per_page - reserved;
    if (usable <= 0) {
      return InvalidArgumentError("kv_pool.max_bytes (" + std::to_string(options.max_bytes) +
                                  ") is smaller than " + std::to_string(1 + reserved) +
                                  " pages of " + std::to_string(bytes_per_page) + " bytes");
    }
  }
  if (usable + reserved > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("kv_pool: too many pages (" + std::to_string(usable) + ")");
  }
  const int64_t pages_in_tensor = usable + reserved;

  auto impl = std::make_unique<Impl>();
  try {
    const c10::Device device(options.device);
    impl->kv_cache =
        torch::zeros({config.num_layers, 2, pages_in_tensor, options.page_size, config.num_kv_heads,
                      config.head_dim},
                     torch::TensorOptions().dtype(ToScalarType(config.dtype)).device(device));
  } catch (const c10::Error& e) {
    return ResourceExhaustedError(
        "kv_pool: cannot allocate " + std::to_string(bytes_per_page * pages_in_tensor) +
        " bytes on \"" + options.device + "\": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InvalidArgumentError("kv_pool.device \"" + options.device + "\": " + e.what());
  }
  {
    MutexLock lock(&impl->mu);  // not shared yet: for the analysis, and cheap
    impl->allocated.assign(pages_in_tensor, 0);
    impl->free_list.reserve(usable);
    // Lowest ids at the back, so they are handed out first (keeps small workloads in a compact
    // region).
    for (int64_t p = pages_in_tensor - 1; p >= reserved; --p)
      impl->free_list.push_back(static_cast<int32_t>(p));
  }
  return std::unique_ptr<KvPagePool>(new KvPagePool(config, options.page_size, pages_in_tensor,
                                                    usable, bytes_per_page, device_free_bytes,
                                                    std::move(impl)));
}

KvPagePool::KvPagePool(const ModelConfig& config, int page_size, int64_t num_pages_in_tensor,
                       int64_t num_usable, int64_t bytes_per_page, int64_t device_free_bytes,
                       std::unique_ptr<Impl> impl)
    : config_(config),
      page_size_(page_size),
      num_pages_in_tensor_(num_pages_in_tensor),
      num_usable_(num_usable),
      bytes_per_page_(bytes_per_page),
      device_free_bytes_(device_free_bytes),
      impl_(std::move(impl)) {}

KvPagePool::~KvPagePool() = default;

StatusOr<std::vector<int32_t>> KvPagePool::Allocate(int64_t n) {
  if (n < 0) return InvalidArgumentError("cannot allocate a negative number of pages");
  MutexLock lock(&impl_->mu);
  const int64_t available = static_cast<int64_t>(impl_->free_list.size());
  if (n > available) {
    return ResourceExhaustedError("KV cache full: " + std::to_string(n) + " pages requested, " +
                                  std::to_string(available) + " of " + std::to_string(num_usable_) +
                                  " free");
  }
  std::vector<int32_t> out(impl_->free_list.end() - n, impl_->free_list.end());
  impl_->free_list.resize(available - n);
  for (int32_t p : out) impl_->allocated[p] = 1;
  return out;
}

Status KvPagePool::Free(const std::vector<int32_t>& pages) {
  MutexLock lock(&impl_->mu);
  for (size_t i = 0; i < pages.size(); ++i) {
    const int32_t p = pages[i];
    if (p < 0 || p >= num_pages_in_tensor_ || !impl_->allocated[p]) {
      // Undo the marks of this call before failing so that nothing is freed.
      for (size_t k = 0; k < i; ++k) impl_->allocated[pages[k]] = 1;
      return InvalidArgumentError("KvPagePool::Free: page " + std::to_string(p) +
                                  " is not an allocated page");
    }
    impl_->allocated[p] = 0;  // a duplicate in `pages` now fails the check above
  }
  impl_->free_list.insert(impl_->free_list.end(), pages.rbegin(), pages.rend());
  return OkStatus();
}

int64_t KvPagePool::num_free() const {
  MutexLock lock(&impl_->mu);
  return static_cast<int64_t>(impl_->free_list.size());
}

double KvPagePool::usage_ratio() const {
  if (num_usable_ == 0) return 0.0;
  return static_cast<double>(num_usable_ - num_free()) / static_cast<double>(num_usable_);
}

const at::Tensor& KvPagePool::kv_cache() const { return impl_->kv_cache; }

PageList::PageList(PageList&& other) noexcept : pool_(other.pool_), ids_(std::move(other.ids_)) {
  other.ids_.clear();
}

PageList& PageList::operator=(PageList&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = other.pool_;
    ids_ = std::move(other.ids_);
    other.ids_.clear();
  }
  return *this;
}

Status PageList::EnsureCapacity(int64_t num_tokens) {
  if (pool_ == nullptr) return FailedPreconditionError("PageList has no pool");
  const int64_t needed = pool_->pages_for_tokens(num_tokens) - static_cast<int64_t>(ids_.size());
  if (needed <= 0) return OkStatus();
  DYSCO_ASSIGN_OR_RETURN(std::vector<int32_t> more, pool_->Allocate(needed));
  ids_.insert(ids_.end(), more.begin(), more.end());
  return OkStatus();
}

void PageList::Release() {
  if (pool_ != nullptr && !ids_.empty()) {
    // Only this list's own, allocated ids are ever stored, so Free cannot fail here.
    Status ignored = pool_->Free(ids_);
    (void)ignored;
  }
  ids_.clear();
}

int64_t PageList::capacity_tokens() const {
  return pool_ == nullptr ? 0 : static_cast<int64_t>(ids_.size()) * pool_->page_size();
}

}  // namespace dysco
