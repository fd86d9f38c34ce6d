// Host copies of a model forward's query_start_loc and seq_lens, published by the caller of the
// forward for the ops it runs: the CUDA prefill's cuDNN path plans its calls (which sequences,
// their chunk and prefix lengths) from them instead of copying the device tensors back, which
// was one host synchronisation a layer of every prefill step (docs/gpu.md "Prefill without a
// read-back a layer").
//
// The model runner builds both device tensors from host vectors (ModelRunner's PackLocked and
// InputsLocked) and publishes those vectors around module.forward with a ScopedHostLengths; an op
// finds them with PublishedHostLengths only for the very tensors they were published for (the
// same data pointers and sizes), which stay alive, and therefore keep their addresses, for the
// scope. Anything else (another caller, a test, a sliced tensor) finds nothing and reads back.
//
// Thread-safety: the publication is thread-local: it is seen by the ops run on the publishing
// thread (TorchScript runs a forward on its caller's thread) and by no other thread.
// Ownership: the scope points at the caller's tensors and vectors, which must outlive it and not
// change while it lives.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace dysco::kernels {

// What a ScopedHostLengths publishes: the device tensors' identities and the host values.
struct HostLengths {
  const void* query_start_loc_data = nullptr;  // int64 [batch + 1] on the device
  const void* seq_lens_data = nullptr;         // int64 [batch] on the device
  int64_t batch = 0;
  const int64_t* query_start_loc = nullptr;  // host copy, batch + 1 values
  const int64_t* seq_lens = nullptr;         // host copy, batch values
};

// Publishes `host_query_start_loc` / `host_seq_lens` as the values of the tensors
// `query_start_loc` / `seq_lens` on this thread until destroyed (scopes nest: the previous one is
// restored). The host vectors must have batch + 1 and batch values, batch = seq_lens.size(0);
// otherwise nothing is published.
class ScopedHostLengths {
 public:
  ScopedHostLengths(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                    const std::vector<int64_t>& host_query_start_loc,
                    const std::vector<int64_t>& host_seq_lens);
  ~ScopedHostLengths();
  ScopedHostLengths(const ScopedHostLengths&) = delete;
  ScopedHostLengths& operator=(const ScopedHostLengths&) = delete;

 private:
  HostLengths lengths_;
  const HostLengths* previous_;
};

// The host values published on this thread for exactly these tensors (int64, one dimension,
// sizes batch + 1 and batch, the published data pointers), or nullptr.
const HostLengths* PublishedHostLengths(const at::Tensor& query_start_loc,
                                        const at::Tensor& seq_lens);

}  // namespace dysco::kernels
