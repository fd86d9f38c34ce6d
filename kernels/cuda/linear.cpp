// dysco::linear on CUDA: out = input @ weight^T through ATen's matrix multiply, i.e. cuBLAS (with
// tensor cores for bf16/fp16), on the current stream. The CPU op exists for its few-row GEMV path
// (kernels/cpu/linear.cpp); on the GPU cuBLAS already picks GEMV-like kernels for few rows, so this
// only keeps the op's contract (output first, written in place, no host synchronisation) for
// packages whose linear layers call dysco::linear (tools/dysco_export/model.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/op_checks.h"

namespace dysco::kernels {

void linear_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  CheckLinearArgs(out, input, weight);
  TORCH_CHECK(out.is_cuda(), kLinearOp, ": tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(out.device());
  // mm_out writes every element of out ([M, N]); weight.t() is a view, no copy.
  at::Tensor out_view = out;  // at::mm_out takes a non-const reference to the same tensor
  at::mm_out(out_view, input, weight.t());
}

}  // namespace dysco::kernels
