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
#include <c10/core/Device.h>

namespace dysco {

struct DeviceTensor {
  at::Tensor tensor;
};

// Whether `t` lies on `device`, where a device named without an index ("cuda") stands for every
// device of its type: the check of a DeviceTensor handed to the runner or to the DySCO staging,
// whose own device may be named either way.
inline bool IsOnDevice(const at::Tensor& t, const at::Device& device) {
  return t.defined() && t.device().type() == device.type() &&
         (!device.has_index() || t.device().index() == device.index());
}

}  // namespace dysco
