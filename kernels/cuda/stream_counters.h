// Zeroed counters per (device, stream, user) for kernels whose blocks meet through global-memory
// counters: the tensor-core attention's split merge (paged_attention.cu) and the persistent decode
// MLP kernel's grid barriers (linear.cu). Every such kernel must leave its counters at zero when it
// ends, so that the next grid of the same stream finds them zeroed.
//
// Why per stream: the kernels of one stream run one after another, so a buffer per stream is never
// used by two grids at once (a kernel launched to start early, cuda_common.cuh, touches its
// counters only after its wait for the grid ahead). A CUDA graph keeps the buffer of the stream it
// was captured on (the runner replays its graphs on its own stream, in order with that stream's
// captures). Why per user: two kinds of kernel adjacent on a stream could otherwise overlap when
// the second starts early.
//
// Thread-safety: StreamCounters may be called from any thread (one mutex). Ownership: the buffers
// are allocated with cudaMalloc on first use, outside the caching allocator (they outlive every
// graph and pool), and never freed.
#pragma once

#include <cstdint>

namespace dysco::kernels::cuda {

enum class CounterUser { kSplitMerge = 0, kDecodeMlp = 1 };

// `capacity` zeroed unsigned counters for `user` on the current device and stream, or null when
// there are none to give: the stream first meets `user` inside a CUDA graph capture (no allocation
// there; the runner's warm-up before each capture allocates them), or the device is full (a KV pool
// sized from free memory). A caller then runs its kernels that need no counters. The capacity of a
// user must be the same at every call.
unsigned* StreamCounters(CounterUser user, int64_t capacity);

}  // namespace dysco::kernels::cuda
