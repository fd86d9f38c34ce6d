// CPU rms_norm and rotary_embedding (kernels/ops.h): the plain loops the CUDA kernels are tested
// against. The CPU model keeps its ATen expressions (tools/dysco_export/model.py), so these are
// the ops' reference here rather than the model's path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels/op_checks.h"
#include "kernels/ops.h"

namespace dysco::kernels {
namespace {

template <typename T>
float ToFloat(T x) {
  return static_cast<float>(x);
}
template <typename T>
T Round(float x) {
  return static_cast<T>(x);
}

template <typename T>
void RmsNorm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  const int64_t rows = input.size(0);
  const int64_t d = input.size(1);
  const T* x = input.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
      float sum = 0.0f;
      for (int64_t j = 0; j < d; ++j) sum += ToFloat(xr[j]) * ToFloat(xr[j]);
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t j = 0; j < d; ++j) {
        y[r * d + j] = Round<T>(ToFloat(w[j]) * ToFloat(Round<T>(ToFloat(xr[j]) * inv)));
      }
    }
  });
}

template <typename T>
void Rotary(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
            const at::Tensor& sin) {
  const int64_t tokens = input.size(0), heads = input.size(1), d = input.size(2);
  const int64_t half = d / 2;
  const T* x = input.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / heads;
      const T* xr = x + row * d;
      const T* ct = c + t * d;
      const T* st = s + t * d;
      T* yr = y + row * d;
      for (int64_t j = 0; j < d; ++j) {
        const float rotated = j < half ? -ToFloat(xr[j + half]) : ToFloat(xr[j - half]);
        const T a = Round<T>(ToFloat(xr[j]) * ToFloat(ct[j]));
        const T b = Round<T>(rotated * ToFloat(st[j]));
        yr[j] = Round<T>(ToFloat(a) + ToFloat(b));
      }
    }
  });
}

}  // namespace

void rms_norm_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double eps) {
  CheckRmsNormArgs(out, input, weight, eps);
  TORCH_CHECK(out.is_cpu(), kRmsNormOp, ": the CPU implementation got tensors on ", out.device());
  if (out.numel() == 0) return;
  switch (input.scalar_type()) {  // the checks admit these three
    case at::kFloat:
      return RmsNorm<float>(out, input, weight, eps);
    case at::kBFloat16:
      return RmsNorm<at::BFloat16>(out, input, weight, eps);
    default:
      return RmsNorm<at::Half>(out, input, weight, eps);
  }
}

void rotary_embedding_cpu(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                          const at::Tensor& sin) {
  CheckRotaryEmbeddingArgs(out, input, cos, sin);
  TORCH_CHECK(out.is_cpu(), kRotaryEmbeddingOp, ": the CPU implementation got tensors on ",
              out.device());
  if (out.numel() == 0) return;
  switch (input.scalar_type()) {
    case at::kFloat:
      return Rotary<float>(out, input, cos, sin);
    case at::kBFloat16:
      return Rotary<at::BFloat16>(out, input, cos, sin);
    default:
      return Rotary<at::Half>(out, input, cos, sin);
  }
}

}  // namespace dysco::kernels
