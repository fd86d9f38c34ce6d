#include "kernels/cuda/stream_counters.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

namespace dysco::kernels::cuda {

unsigned* StreamCounters(CounterUser user, int64_t capacity) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  // By device too: every device's default stream is the same handle.
  const std::tuple<int, cudaStream_t, int> key(device, stream, static_cast<int>(user));
  static std::mutex mu;
  static std::map<std::tuple<int, cudaStream_t, int>, unsigned*> buffers;
  std::lock_guard<std::mutex> lock(mu);
  auto it = buffers.find(key);
  if (it != buffers.end()) return it->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  unsigned* counters = nullptr;
  const size_t bytes = static_cast<size_t>(capacity) * sizeof(unsigned);
  if (cudaMalloc(&counters, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // an allocation failure is not sticky: clear it
    counters = nullptr;
  } else {
    C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, bytes, stream));
  }
  buffers.emplace(key, counters);
  return counters;
}

}  // namespace dysco::kernels::cuda
