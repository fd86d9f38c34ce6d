// The plain reference of the rope_tables op, shared by the CPU and CUDA kernel tests
// (test_kernels, test_kernels_cuda): the model's rotary-table lines that the op replaces, and a
// model's inverse frequencies (docs/model-interface.md "Ops" rope_tables).
//
// Thread-safety: pure functions of their arguments. Ownership: returns new tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace dysco {

// cos and sin [T, 2 * inv_freq's length] in dtype of positions int64 [T], on the tensors' device:
// tools/dysco_export/model.py DecoderModel.forward's lines before the layers (before rope_tables;
// NativeDecode::RopeOf still runs them).
inline std::pair<at::Tensor, at::Tensor> ModelRopeTables(const at::Tensor& positions,
                                                         const at::Tensor& inv_freq, double scaling,
                                                         at::ScalarType dtype) {
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {(emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)};
}

// A model's inv_freq for head size d: theta^(-2i/d), i < d/2, fp32 [d / 2] on the CPU.
inline at::Tensor RopeInvFreq(int64_t d, double theta) {
  return at::pow(theta, -at::arange(0, d, 2, at::kDouble) / static_cast<double>(d)).to(at::kFloat);
}

}  // namespace dysco
