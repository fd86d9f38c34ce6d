// The one core/ file that calls the DySCO ops: wraps the caller's host buffers in CPU tensors
// (from_blob, no copy) and calls the op's typed call (kernels/op_calls.h); c10 errors become
// INTERNAL.
#include "core/model/dysco_host_ops.h"

#include <string>

#include <torch/script.h>

#include "kernels/op_calls.h"

namespace dysco {

namespace {

at::Tensor View(const void* data, at::IntArrayRef sizes, at::ScalarType type) {
  return torch::from_blob(const_cast<void*>(data), sizes, torch::TensorOptions().dtype(type));
}

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
      const at::Device dev(device);
      auto to_dev = [&](const void* data, at::IntArrayRef sizes, at::ScalarType type) {
        return View(data, sizes, type).to(dev);
      };
      const auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);
      at::Tensor d_bias = at::empty({batch, width}, f32);
      at::Tensor d_selected = at::empty({batch, width}, f32.dtype(at::kBool));
      at::Tensor d_stats = at::empty({batch, 2}, f32);
      ops::dysco_select_bias(
          d_bias, d_selected, d_stats, to_dev(relevance, {batch, width}, at::kFloat),
          to_dev(num_keys, {batch}, at::kLong), to_dev(template_mask, {batch, width}, at::kBool),
          to_dev(top_p, {batch}, at::kFloat), to_dev(top_k, {batch}, at::kLong),
          to_dev(strength, {batch}, at::kFloat));
      // Each copy back waits for the op (the stream's order); the last one ends the call.
      View(bias, {batch, width}, at::kFloat).copy_(d_bias);
      View(selected, {batch, width}, at::kBool).copy_(d_selected);
      View(stats, {batch, 2}, at::kFloat).copy_(d_stats);
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
