// The one core/ file that calls the DySCO ops: wraps the caller's host buffers in CPU tensors
// (from_blob, no copy) and calls the op's typed call (kernels/op_calls.h); c10 errors become
// INTERNAL.
#include "core/model/dysco_host_ops.h"

#include <algorithm>
#include <string>
#include <utility>

#include <torch/script.h>

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
// CUDA kernels' vector loads want 16); the inputs first, then the outputs, so that each crosses
// with one copy.
struct DyscoSelectStaging::Buffer {
  at::Tensor host;
  int64_t relevance_at = 0, template_at = 0, keys_at = 0, top_k_at = 0, top_p_at = 0,
          strength_at = 0, inputs_end = 0;
  int64_t bias_at = 0, selected_at = 0, stats_at = 0;
  uint8_t* Part(int64_t offset) const { return host.data_ptr<uint8_t>() + offset; }
};

DyscoSelectStaging::DyscoSelectStaging(std::string device)
    : device_(std::move(device)), buffer_(std::make_unique<Buffer>()) {}

DyscoSelectStaging::~DyscoSelectStaging() = default;
DyscoSelectStaging::DyscoSelectStaging(DyscoSelectStaging&&) noexcept = default;
DyscoSelectStaging& DyscoSelectStaging::operator=(DyscoSelectStaging&&) noexcept = default;

Status DyscoSelectStaging::Resize(int64_t batch, int64_t width) {
  return Guard("dysco::DyscoSelectStaging", [&] {
    const int64_t n = batch * width;
    PackedBuffer layout;
    Buffer& b = *buffer_;
    b.relevance_at = layout.Add(n * 4);
    b.template_at = layout.Add(n);
    b.keys_at = layout.Add(batch * 8);
    b.top_k_at = layout.Add(batch * 8);
    b.top_p_at = layout.Add(batch * 4);
    b.strength_at = layout.Add(batch * 4);
    b.inputs_end = layout.size;
    b.bias_at = layout.Add(n * 4);
    b.selected_at = layout.Add(n);
    b.stats_at = layout.Add(batch * 8);
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

Status DyscoSelectStaging::Run() {
  const Buffer& b = *buffer_;
  const int64_t batch = batch_;
  const int64_t width = width_;
  if (OnHost(device_)) {
    return Guard("dysco::dysco_select_bias", [&] {
      ops::dysco_select_bias(View(b.Part(b.bias_at), {batch, width}, at::kFloat),
                             View(b.Part(b.selected_at), {batch, width}, at::kBool),
                             View(b.Part(b.stats_at), {batch, 2}, at::kFloat),
                             View(b.Part(b.relevance_at), {batch, width}, at::kFloat),
                             View(b.Part(b.keys_at), {batch}, at::kLong),
                             View(b.Part(b.template_at), {batch, width}, at::kBool),
                             View(b.Part(b.top_p_at), {batch}, at::kFloat),
                             View(b.Part(b.top_k_at), {batch}, at::kLong),
                             View(b.Part(b.strength_at), {batch}, at::kFloat));
    });
  }
  return Guard("dysco::dysco_select_bias", [&] {
    // The inputs cross with one DMA and the outputs come back with one: six pageable copies in and
    // three out (each staged by the driver and waited for) took about half of the DySCO stage's
    // ~1.8 ms of host-side time at 128K keys on the H200.
    const at::Device dev(device_);
    const int64_t outputs = b.stats_at + batch * 8 - b.bias_at;
    const at::Tensor d_in = b.host.narrow(0, 0, b.inputs_end).to(dev, /*non_blocking=*/true);
    const at::Tensor d_out = at::empty({outputs}, at::TensorOptions().dtype(at::kByte).device(dev));
    auto on = [&](const at::Tensor& buffer, int64_t offset, at::IntArrayRef sizes,
                  at::ScalarType type) {
      return torch::from_blob(static_cast<uint8_t*>(buffer.data_ptr()) + offset, sizes,
                              torch::TensorOptions().dtype(type).device(dev));
    };
    ops::dysco_select_bias(
        on(d_out, 0, {batch, width}, at::kFloat),
        on(d_out, b.selected_at - b.bias_at, {batch, width}, at::kBool),
        on(d_out, b.stats_at - b.bias_at, {batch, 2}, at::kFloat),
        on(d_in, b.relevance_at, {batch, width}, at::kFloat),
        on(d_in, b.keys_at, {batch}, at::kLong), on(d_in, b.template_at, {batch, width}, at::kBool),
        on(d_in, b.top_p_at, {batch}, at::kFloat), on(d_in, b.top_k_at, {batch}, at::kLong),
        on(d_in, b.strength_at, {batch}, at::kFloat));
    b.host.narrow(0, b.bias_at, outputs).copy_(d_out);  // waits for the op (the stream's order)
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
