// The composite ops that a backend runs as a sequence of its own ops (add_rms_norm_swiglu,
// o_proj_mlp: kernels/op_calls.h), written once: the order of the steps and their intermediates,
// with each backend's step functions passed in (kernels/cpu/linear.cpp, kernels/cuda/linear.cu), so
// the CPU and CUDA versions cannot drift apart. Arguments are checked by the caller
// (kernels/op_checks.h).
//
// Thread-safety: stateless. Ownership: the intermediates are allocated per call on the inputs'
// device and released on return.
#pragma once

#include <ATen/ATen.h>

namespace dysco::kernels {

// add_rms_norm_swiglu as add_rms_norm_linear into a [M, 2N] scratch, then silu_mul into out.
template <typename AddRmsNormLinear, typename SiluMul>
void AddRmsNormSwigluSteps(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                           const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                           const at::Tensor& weight, AddRmsNormLinear add_rms_norm_linear,
                           SiluMul silu_mul) {
  const at::Tensor gate_up = at::empty({input.size(0), weight.size(0)}, input.options());
  add_rms_norm_linear(gate_up, sum, input, residual, norm_weight, eps, weight);
  silu_mul(out, gate_up);
}

// o_proj_mlp as linear (the output projection), add_rms_norm_swiglu and linear (down_proj).
template <typename Linear, typename AddRmsNormSwiglu>
void OProjMlpSteps(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                   const at::Tensor& residual, const at::Tensor& o_weight,
                   const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                   const at::Tensor& down_weight, Linear linear,
                   AddRmsNormSwiglu add_rms_norm_swiglu) {
  const at::Tensor o = at::empty_like(residual);
  linear(o, attn, o_weight);
  const at::Tensor act = at::empty({attn.size(0), down_weight.size(1)}, attn.options());
  add_rms_norm_swiglu(act, sum, o, residual, norm_weight, eps, gate_up_weight);
  linear(out, act, down_weight);
}

}  // namespace dysco::kernels
