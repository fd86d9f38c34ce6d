// The one core/ file that calls the DySCO ops: wraps the caller's host buffers in CPU tensors
// (from_blob, no copy) and calls the op's typed call (kernels/op_calls.h); c10 errors become
// INTERNAL.
#include "core/model/dysco_host_ops.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

#include <torch/script.h>
#ifdef DYSCO_CUDA
#include <optional>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "core/model/device_tensor.h"
#include "kernels/op_calls.h"

namespace dysco {

namespace {

at::Tensor View(const void* data, at::IntArrayRef sizes, at::ScalarType type) {
  return torch::from_blob(const_cast<void*>(data), sizes, torch::TensorOptions().dtype(type));
}

// Byte offsets of the parts of one staging buffer, each part 256-byte aligned (the CUDA kernels'
// vector loads want 16).
struct PackedBuffer {
  int64_t size = 0;
  int64_t Add(int64_t bytes) {
    const int64_t at = size;
    size += (bytes + 255) / 256 * 256;
    return at;
  }
};

template <typename Fn>
Status Guard(const char* op, Fn&& fn) {
  try {
    c10::InferenceMode inference_mode;
    fn();
    return OkStatus();
  } catch (const c10::Error& e) {
    return InternalError(std::string(op) + " failed: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError(std::string(op) + " failed: " + e.what());
  }
}

bool OnHost(const std::string& device) { return device == "cpu" || at::Device(device).is_cpu(); }

}  // namespace

Status DyscoRelevanceUpdate(float* relevance, int64_t batch, int64_t width, const float* probs,
                            int64_t num_heads, int64_t probs_len, const int64_t* num_keys,
                            const float* decay) {
  return Guard("dysco::dysco_relevance_update", [&] {
    ops::dysco_relevance_update(View(relevance, {batch, width}, at::kFloat),
                                View(probs, {batch, num_heads, probs_len}, at::kFloat),
                                View(num_keys, {batch}, at::kLong),
                                View(decay, {batch}, at::kFloat));
  });
}

// The staging buffer: one byte tensor (pinned for a GPU), parts at 256-byte aligned offsets (the
// CUDA kernels' vector loads want 16), in the order in which they cross, so that each direction is
// one copy: the relevance update's inputs (head means, decays), the selection's inputs, the
// relevance (r_{t-1} in, r_t out when updated), the selection's results.
struct DyscoSelectStaging::Buffer {
  at::Tensor host;
  int64_t probs_at = 0, decay_at = 0;
  int64_t template_at = 0, keys_at = 0, top_k_at = 0, top_p_at = 0, strength_at = 0;
  int64_t relevance_at = 0;
  int64_t bias_at = 0, selected_at = 0, stats_at = 0, end = 0;
  // The device's copy of the parts from the last run on a GPU (bytes from `device_base` on), and
  // whether its results' copy back into `host` may still be running (`copied` then marks its end).
  at::Tensor device;
  int64_t device_base = 0;
  bool pending = false;
#ifdef DYSCO_CUDA
  c10::cuda::CUDAEvent copied;
  // Start's copy back runs on its own stream behind `selected` (the ops' end on the current
  // stream), so that what is queued next there, the real pass, does not wait for it.
  c10::cuda::CUDAEvent selected;
  std::optional<c10::cuda::CUDAStream> copy_stream;
#endif
  uint8_t* Part(int64_t offset) const { return host.data_ptr<uint8_t>() + offset; }
};

DyscoSelectStaging::DyscoSelectStaging(std::string device)
    : device_(std::move(device)), buffer_(std::make_unique<Buffer>()) {}

DyscoSelectStaging::~DyscoSelectStaging() {
  // A copy back may still target the pinned buffer.
  if (buffer_ != nullptr) (void)Wait();
}
DyscoSelectStaging::DyscoSelectStaging(DyscoSelectStaging&&) noexcept = default;
DyscoSelectStaging& DyscoSelectStaging::operator=(DyscoSelectStaging&&) noexcept = default;

Status DyscoSelectStaging::Resize(int64_t batch, int64_t width) {
  DYSCO_RETURN_IF_ERROR(Wait());
  return Guard("dysco::DyscoSelectStaging", [&] {
    const int64_t n = batch * width;
    PackedBuffer layout;
    Buffer& b = *buffer_;
    // The last run's device copy was laid out for the old shape: DeviceBias has nothing until the
    // next run (the rows it handed out keep their own views).
    b.device = at::Tensor();
    b.probs_at = layout.Add(n * 4);
    b.decay_at = layout.Add(batch * 4);
    b.template_at = layout.Add(n);
    b.keys_at = layout.Add(batch * 8);
    b.top_k_at = layout.Add(batch * 8);
    b.top_p_at = layout.Add(batch * 4);
    b.strength_at = layout.Add(batch * 4);
    b.relevance_at = layout.Add(n * 4);
    b.bias_at = layout.Add(n * 4);
    b.selected_at = layout.Add(n);
    b.stats_at = layout.Add(batch * 8);
    b.end = layout.size;
    if (!b.host.defined() || b.host.numel() < layout.size) {
      // Grown by half again, so that a slowly growing context does not reallocate every step.
      const int64_t bytes =
          std::max<int64_t>(layout.size, b.host.defined() ? b.host.numel() * 3 / 2 : 0);
      b.host =
          at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(!OnHost(device_)));
    }
    batch_ = batch;
    width_ = width;
  });
}

float* DyscoSelectStaging::relevance() {
  return reinterpret_cast<float*>(buffer_->Part(buffer_->relevance_at));
}
float* DyscoSelectStaging::probs() {
  return reinterpret_cast<float*>(buffer_->Part(buffer_->probs_at));
}
float* DyscoSelectStaging::decay() {
  return reinterpret_cast<float*>(buffer_->Part(buffer_->decay_at));
}
uint8_t* DyscoSelectStaging::template_mask() { return buffer_->Part(buffer_->template_at); }
int64_t* DyscoSelectStaging::num_keys() {
  return reinterpret_cast<int64_t*>(buffer_->Part(buffer_->keys_at));
}
float* DyscoSelectStaging::top_p() {
  return reinterpret_cast<float*>(buffer_->Part(buffer_->top_p_at));
}
int64_t* DyscoSelectStaging::top_k() {
  return reinterpret_cast<int64_t*>(buffer_->Part(buffer_->top_k_at));
}
float* DyscoSelectStaging::strength() {
  return reinterpret_cast<float*>(buffer_->Part(buffer_->strength_at));
}
const float* DyscoSelectStaging::bias() const {
  return reinterpret_cast<const float*>(buffer_->Part(buffer_->bias_at));
}
const uint8_t* DyscoSelectStaging::selected() const { return buffer_->Part(buffer_->selected_at); }
const float* DyscoSelectStaging::stats() const {
  return reinterpret_cast<const float*>(buffer_->Part(buffer_->stats_at));
}

bool DyscoSelectStaging::on_device() const { return !OnHost(device_); }

Status DyscoSelectStaging::Run() {
  return RunOps(/*update_relevance=*/false, nullptr, /*wait=*/true);
}

Status DyscoSelectStaging::RunWithRelevanceUpdate(const DeviceTensor* device_probs) {
  return RunOps(/*update_relevance=*/true, device_probs, /*wait=*/true);
}

Status DyscoSelectStaging::StartWithRelevanceUpdate(const DeviceTensor* device_probs) {
  return RunOps(/*update_relevance=*/true, device_probs, /*wait=*/false);
}

Status DyscoSelectStaging::Wait() {
  Buffer& b = *buffer_;
  if (!b.pending) return OkStatus();
  b.pending = false;
#ifdef DYSCO_CUDA
  return Guard("dysco::DyscoSelectStaging::Wait", [&] { b.copied.synchronize(); });
#else
  return OkStatus();
#endif
}

std::shared_ptr<const DeviceTensor> DyscoSelectStaging::DeviceBias(int64_t row) const {
  const Buffer& b = *buffer_;
  if (!b.device.defined() || row < 0 || row >= batch_) return nullptr;
  const at::Tensor bias = b.device.narrow(0, b.bias_at - b.device_base, batch_ * width_ * 4)
                              .view(at::kFloat)
                              .view({batch_, width_})
                              .select(0, row);
  return std::make_shared<const DeviceTensor>(DeviceTensor{bias});
}

Status DyscoSelectStaging::RunOps(bool update_relevance, const DeviceTensor* device_probs,
                                  bool wait) {
  DYSCO_RETURN_IF_ERROR(Wait());
  Buffer& b = *buffer_;
  b.device = at::Tensor();
  const int64_t batch = batch_;
  const int64_t width = width_;
  // The two ops over the parts of `buffer`, a copy of the staging buffer's bytes from `base` on.
  auto run = [&](const at::Tensor& buffer, int64_t base) {
    const at::TensorOptions options = at::TensorOptions().device(buffer.device());
    auto part = [&](int64_t offset, at::IntArrayRef sizes, at::ScalarType type) {
      return torch::from_blob(static_cast<uint8_t*>(buffer.data_ptr()) + offset - base, sizes,
                              options.dtype(type));
    };
    const at::Tensor relevance = part(b.relevance_at, {batch, width}, at::kFloat);
    const at::Tensor num_keys = part(b.keys_at, {batch}, at::kLong);
    if (update_relevance) {
      const at::Tensor probs = device_probs != nullptr
                                   ? device_probs->tensor.unsqueeze(1)
                                   : part(b.probs_at, {batch, 1, width}, at::kFloat);
      ops::dysco_relevance_update(relevance, probs, num_keys,
                                  part(b.decay_at, {batch}, at::kFloat));
    }
    ops::dysco_select_bias(
        part(b.bias_at, {batch, width}, at::kFloat), part(b.selected_at, {batch, width}, at::kBool),
        part(b.stats_at, {batch, 2}, at::kFloat), relevance, num_keys,
        part(b.template_at, {batch, width}, at::kBool), part(b.top_p_at, {batch}, at::kFloat),
        part(b.top_k_at, {batch}, at::kLong), part(b.strength_at, {batch}, at::kFloat));
  };
  const char* op = update_relevance ? "dysco::dysco_relevance_update + dysco::dysco_select_bias"
                                    : "dysco::dysco_select_bias";
  if (device_probs != nullptr) {
    const at::Tensor& t = device_probs->tensor;
    if (OnHost(device_) || !IsOnDevice(t, at::Device(device_)) || t.dim() != 2 ||
        t.size(0) != batch || t.size(1) < width || t.scalar_type() != at::kFloat ||
        !t.is_contiguous()) {
      return InternalError(std::string(op) + ": the head means on the device are " +
                           c10::str(t.sizes(), " ", t.scalar_type(), " on ", t.device()) +
                           ", expected float [" + std::to_string(batch) +
                           ", >= " + std::to_string(width) + "] on " + device_);
    }
  }
  if (OnHost(device_)) {
    return Guard(op, [&] { run(b.host, 0); });
  }
  return Guard(op, [&] {
    // The inputs cross with one DMA and the outputs come back with one: six pageable copies in and
    // three out (each staged by the driver and waited for) took about half of the DySCO stage's
    // ~1.8 ms of host-side time at 128K keys on the H200.
    // The head means cross too unless they are on the device already.
    const int64_t in_begin = !update_relevance         ? b.template_at
                             : device_probs != nullptr ? b.decay_at
                                                       : b.probs_at;
    const int64_t out_begin = update_relevance ? b.relevance_at : b.bias_at;
    const at::Tensor on_device = at::empty(
        {b.end - in_begin}, at::TensorOptions().dtype(at::kByte).device(at::Device(device_)));
    on_device.narrow(0, 0, b.bias_at - in_begin)
        .copy_(b.host.narrow(0, in_begin, b.bias_at - in_begin), /*non_blocking=*/true);
    run(on_device, in_begin);
    b.device = on_device;
    b.device_base = in_begin;
#ifdef DYSCO_CUDA
    if (!wait) {
      // Behind the ops, on the copy stream: the real pass queued next on the current stream does
      // not wait for the ~1 MB at 128K keys to cross (docs/gpu.md "The DySCO stage without a
      // wait"). Wait() waits for it; the device buffer is marked as used there too, so that it is
      // not handed out again before the copy has read it.
      // DYSCO_SELECT_COPY_STREAM=0: the copy on the current stream instead (A/B timing).
      const c10::DeviceIndex index = on_device.device().index();
      const char* knob = std::getenv("DYSCO_SELECT_COPY_STREAM");
      const bool own_stream = knob == nullptr || std::string(knob) != "0";
      if (!b.copy_stream || b.copy_stream->device_index() != index) {
        b.copy_stream = c10::cuda::getStreamFromPool(false, index);
      }
      const c10::cuda::CUDAStream copy_stream =
          own_stream ? *b.copy_stream : c10::cuda::getCurrentCUDAStream(index);
      b.selected.record(c10::cuda::getCurrentCUDAStream(index));
      b.selected.block(copy_stream);
      {
        const c10::cuda::CUDAStreamGuard on_copy_stream(copy_stream);
        b.host.narrow(0, out_begin, b.end - out_begin)
            .copy_(on_device.narrow(0, out_begin - in_begin, b.end - out_begin),
                   /*non_blocking=*/true);
      }
      c10::cuda::CUDACachingAllocator::recordStream(on_device.storage().data_ptr(), copy_stream);
      b.copied.record(copy_stream);
      b.pending = true;
      return;
    }
#endif
    (void)wait;
    // Waits for the ops (the stream's order).
    b.host.narrow(0, out_begin, b.end - out_begin)
        .copy_(on_device.narrow(0, out_begin - in_begin, b.end - out_begin));
  });
}

Status DyscoBiasFromSelection(float* bias, const uint8_t* selected, int64_t batch, int64_t width,
                              const int64_t* num_keys, const uint8_t* template_mask,
                              const float* strength) {
  return Guard("dysco::dysco_bias_from_selection", [&] {
    ops::dysco_bias_from_selection(
        View(bias, {batch, width}, at::kFloat), View(selected, {batch, width}, at::kBool),
        View(num_keys, {batch}, at::kLong), View(template_mask, {batch, width}, at::kBool),
        View(strength, {batch}, at::kFloat));
  });
}

Status DyscoTemplateMask(uint8_t* mask, const int32_t* tokens, int64_t len,
                         const std::vector<std::vector<int32_t>>& sequences) {
  std::vector<int64_t> tokens64(tokens, tokens + len);
  std::vector<int64_t> flat;
  std::vector<int64_t> offsets{0};
  for (const auto& s : sequences) {
    flat.insert(flat.end(), s.begin(), s.end());
    offsets.push_back(static_cast<int64_t>(flat.size()));
  }
  return Guard("dysco::dysco_template_mask", [&] {
    ops::dysco_template_mask(
        View(mask, {len}, at::kBool), View(tokens64.data(), {len}, at::kLong),
        View(flat.data(), {static_cast<int64_t>(flat.size())}, at::kLong),
        View(offsets.data(), {static_cast<int64_t>(offsets.size())}, at::kLong));
  });
}

}  // namespace dysco
