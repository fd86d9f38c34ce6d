// rope_tables' ATen composite (kernels/rope_tables.h).
#include "kernels/rope_tables.h"

#include <ATen/ATen.h>

namespace dysco::kernels {

void RopeTablesAten(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                    const at::Tensor& inv_freq, double scaling) {
  // [T, D/2] angles, each an fp32 product of the rounded position and the frequency.
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
  const at::Tensor emb = at::cat({freqs, freqs}, -1);  // [T, D]
  const at::ScalarType dtype = cos.scalar_type();
  // `* scaling` with a double, as the model's `* self.attention_scaling`: ATen's mul by a wrapped
  // scalar, which multiplies in fp32 by (float)scaling.
  at::Tensor cos_out = cos;  // copy_ through a non-const handle; the same TensorImpl
  at::Tensor sin_out = sin;
  cos_out.copy_((emb.cos() * scaling).to(dtype));
  sin_out.copy_((emb.sin() * scaling).to(dtype));
}

}  // namespace dysco::kernels
