// ScopedEnv: sets an environment variable for a scope (unset for a null value) and unsets it at the
// end. The CUDA ops read their A/B knobs at every call (docs/gpu.md): DYSCO_CUDA_ATTENTION_KERNEL
// ("vector" or "scalar" rule out the faster split kernels, kernels/cuda/split_attention.cuh),
// DYSCO_CUDA_MMA_PREFETCH (the tensor-core kernel's pipeline: "0" the query rows as the mma's M,
// "1" its register prefetch, "swap-prefetch"; unset: the swapped operands), DYSCO_CUDA_SELECT
// ("single" or "multi": one or many blocks per selection row; "fused": many in one launch, with
// DYSCO_CUDA_SELECT_BLOCKS capping its blocks a row), DYSCO_CUDA_SPLIT_WAVES,
// DYSCO_CUDA_LINEAR ("cublas"), DYSCO_CUDA_PREFILL ("flash2": no cuDNN attention for long prefill
// chunks), DYSCO_CUDA_SPLIT_MERGE ("kernel": the separate split-merge kernel after the tensor-core
// kernel), DYSCO_CUDA_NORM_LINEAR ("separate": add_rms_norm then linear instead of the fused GEMV),
// DYSCO_CUDA_GEMV_SPLITS ("1" or "2" warps a GEMV row pair), DYSCO_CUDA_GEMV_ASYNC ("1": the
// GEMV staged by asynchronous copies), DYSCO_CUDA_MLP ("persistent": o_proj_mlp's persistent
// kernel), DYSCO_CUDA_ATTENTION_PDL ("0": the decode attention launched plainly),
// DYSCO_CUDA_QK_PDL ("1": qk_norm_rope_kv_write launched to start early),
// DYSCO_CUDA_QKV_ATTENTION ("0": qk_norm_rope_attention_decode as two kernels),
// DYSCO_CUDA_GEMV_RING_SPLITS ("1": rings for GEMVs with two warps a row pair),
// DYSCO_CUDA_PREFILL_MERGE ("scalar": the cuDNN path's merge one element a thread),
// DYSCO_CUDA_ROPE_TABLES ("aten": rope_tables as the model's ATen composite) and
// DYSCO_CUDA_PDL, so a test can run
// both sides in one process.
//
// Thread-safety: setenv/unsetenv are not thread-safe; use it on the test's own thread while no
// other thread reads the environment. Ownership: keeps the name pointer, which must outlive it
// (string literals).
#pragma once

#include <cstdlib>

namespace dysco {

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() { unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

}  // namespace dysco
