// The instruction-set clones of the CPU kernels (kernels/cpu): hot loops are compiled for the
// baseline the library is built for and, on x86-64 with GCC, a second time for x86-64-v3 (AVX2 +
// FMA; DYSCO_TARGET_V3 marks those functions). Each caller picks a clone per call from the CPU's
// features (CpuRunsX86_64_V3). -DDYSCO_CPU_BASELINE_ONLY builds the baseline only (to test it on a
// machine with AVX2). The blocked prefill attention has a third clone, x86-64-v4 (AVX-512), where
// GCC knows the level (11 and later); -DDYSCO_CPU_NO_AVX512 leaves it out (attention_kernel.cpp).
// Internal to kernels/cpu. Thread-safety: the feature check is computed once, then read only.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(DYSCO_CPU_BASELINE_ONLY)
#define DYSCO_CPU_X86_64_V3 1
#define DYSCO_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#if __GNUC__ >= 11 && !defined(DYSCO_CPU_NO_AVX512)
#define DYSCO_CPU_X86_64_V4 1
#endif
#else
#define DYSCO_TARGET_V3
#endif
#define DYSCO_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dysco::kernels::cpu {

// Whether this build has the x86-64-v3 clones and this CPU runs them (AVX2 and FMA).
inline bool CpuRunsX86_64_V3() {
#if defined(DYSCO_CPU_X86_64_V3)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace dysco::kernels::cpu
