// How many threads the CPU kernels' at::parallel_for regions really run on.
//
// Why this exists: ATen's at::parallel_for is a header template whose OpenMP backend is a
// `#pragma omp parallel` compiled into the CALLER. A translation unit built without -fopenmp
// ignores the pragma and runs every region on the calling thread, whatever at::get_num_threads()
// says: until the kernels library was built with OpenMP (kernels/CMakeLists.txt), the CPU model ran
// its GEMVs, attention and norms on one thread while "2 threads" were configured
// (docs/performance.md "One thread, not two"). The test of this function keeps that from coming
// back.
//
// Thread-safety: call it from one thread at a time (it runs a parallel region). Ownership: none.
#pragma once

#include <cstdint>

namespace dysco::kernels::cpu {

// The number of distinct threads that ran the bodies of one at::parallel_for over `items` items
// (grain 1) from this library: min(at::get_num_threads(), items) in a build with OpenMP, 1 without.
int ParallelForWidth(int64_t items);

}  // namespace dysco::kernels::cpu
