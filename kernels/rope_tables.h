// rope_tables' ATen composite (kernels/ops.h rope_tables_cpu), device-neutral: the CPU op is this
// function, and the CUDA op runs it instead of its kernel under DYSCO_CUDA_ROPE_TABLES=aten (A/B
// timing; kernels/cuda/norm_rope.cu). One definition, so that the two backends' "ATen" sides are
// the same expression.
//
// Thread-safety: a pure function of its arguments (it writes only cos and sin).
// Ownership: nothing is kept; temporaries come from the tensors' device allocator.
#pragma once

#include <ATen/core/Tensor.h>

namespace dysco::kernels {

// cos, sin [T, D] <- the model's rotary tables of positions int64 [T] over inv_freq fp32 [D/2],
// with ATen's ops on the tensors' device, in tools/dysco_export/model.py's order:
//   freqs = positions.to(float32).unsqueeze(1) * inv_freq.unsqueeze(0); emb = cat(freqs, freqs)
//   cos = (emb.cos() * scaling).to(dtype); sin = (emb.sin() * scaling).to(dtype)
// then copied into cos and sin. Arguments as CheckRopeTablesArgs (kernels/op_checks.h), checked by
// the caller.
void RopeTablesAten(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                    const at::Tensor& inv_freq, double scaling);

}  // namespace dysco::kernels
