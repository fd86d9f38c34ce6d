// DeviceTensor: a tensor that a forward leaves on the model's device for a later op of the same
// step (ForwardOutput::probe_mean_device, read by DyscoSelectStaging::RunWithRelevanceUpdate), so
// that it does not cross to the host and back (docs/gpu.md "DySCO on the device"). The torch-free
// parts of core/ hold it by std::shared_ptr<const DeviceTensor> and only hand it on; only torch
// translation units include this header.
//
// Thread-safety: immutable once made. Ownership: shares the tensor's storage (the CUDA caching
// allocator's block, returned in stream order when the last holder lets go).
#pragma once

#include <ATen/Tensor.h>

namespace dysco {

struct DeviceTensor {
  at::Tensor tensor;
};

}  // namespace dysco
