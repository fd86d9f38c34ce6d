// The one core/ file that calls the DySCO ops: wraps the caller's host buffers in CPU tensors
// (from_blob, no copy) and calls the op's typed call (kernels/op_calls.h); c10 errors become
// INTERNAL.
#include "core/model/dysco_host_ops.h"

#include <cstring>
#include <string>

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

Status DyscoSelectBias(float* bias, uint8_t* selected, float* stats, const float* relevance,
                       int64_t batch, int64_t width, const int64_t* num_keys,
                       const uint8_t* template_mask, const float* top_p, const int64_t* top_k,
                       const float* strength, const std::string& device) {
  if (device != "cpu" && !at::Device(device).is_cpu()) {
    return Guard("dysco::dysco_select_bias", [&] {
      // Inputs packed into one pinned buffer and copied with one DMA, outputs copied back with one:
      // six pageable copies in and three out (each staged by the driver and waited for) took
      // about half of the DySCO stage's ~1.8 ms of host-side time at 128K keys on the H200.
      const at::Device dev(device);
      const int64_t n = batch * width;
      PackedBuffer in;
      const int64_t relevance_at = in.Add(n * 4), template_at = in.Add(n),
                    keys_at = in.Add(batch * 8), top_k_at = in.Add(batch * 8),
                    top_p_at = in.Add(batch * 4), strength_at = in.Add(batch * 4);
      PackedBuffer out;
      const int64_t bias_at = out.Add(n * 4), selected_at = out.Add(n),
                    stats_at = out.Add(batch * 8);
      const auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
      at::Tensor host_in = at::empty({in.size}, pinned);
      uint8_t* h = host_in.data_ptr<uint8_t>();
      std::memcpy(h + relevance_at, relevance, n * 4);
      std::memcpy(h + template_at, template_mask, n);
      std::memcpy(h + keys_at, num_keys, batch * 8);
      std::memcpy(h + top_k_at, top_k, batch * 8);
      std::memcpy(h + top_p_at, top_p, batch * 4);
      std::memcpy(h + strength_at, strength, batch * 4);
      const at::Tensor d_in = host_in.to(dev, /*non_blocking=*/true);
      const at::Tensor d_out =
          at::empty({out.size}, at::TensorOptions().dtype(at::kByte).device(dev));
      auto on = [&](const at::Tensor& buffer, int64_t at, at::IntArrayRef sizes,
                    at::ScalarType type) {
        return torch::from_blob(static_cast<uint8_t*>(buffer.data_ptr()) + at, sizes,
                                torch::TensorOptions().dtype(type).device(dev));
      };
      ops::dysco_select_bias(
          on(d_out, bias_at, {batch, width}, at::kFloat),
          on(d_out, selected_at, {batch, width}, at::kBool),
          on(d_out, stats_at, {batch, 2}, at::kFloat),
          on(d_in, relevance_at, {batch, width}, at::kFloat), on(d_in, keys_at, {batch}, at::kLong),
          on(d_in, template_at, {batch, width}, at::kBool), on(d_in, top_p_at, {batch}, at::kFloat),
          on(d_in, top_k_at, {batch}, at::kLong), on(d_in, strength_at, {batch}, at::kFloat));
      at::Tensor host_out = at::empty({out.size}, pinned);
      host_out.copy_(d_out);  // waits for the op (the stream's order)
      const uint8_t* o = host_out.data_ptr<uint8_t>();
      std::memcpy(bias, o + bias_at, n * 4);
      std::memcpy(selected, o + selected_at, n);
      std::memcpy(stats, o + stats_at, batch * 8);
    });
  }
  return Guard("dysco::dysco_select_bias", [&] {
    ops::dysco_select_bias(
        View(bias, {batch, width}, at::kFloat), View(selected, {batch, width}, at::kBool),
        View(stats, {batch, 2}, at::kFloat), View(relevance, {batch, width}, at::kFloat),
        View(num_keys, {batch}, at::kLong), View(template_mask, {batch, width}, at::kBool),
        View(top_p, {batch}, at::kFloat), View(top_k, {batch}, at::kLong),
        View(strength, {batch}, at::kFloat));
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
