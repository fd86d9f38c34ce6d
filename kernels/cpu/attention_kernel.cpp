// The instances of the attention loops of attention_kernel.h, per cache dtype and ISA, and the
// choice between them.
#include "kernels/cpu/attention_kernel.h"

namespace dysco::kernels::cpu {
namespace {

#ifdef DYSCO_CPU_X86_64_V3
#define DYSCO_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define DYSCO_TARGET_V3
#endif

// Whether the vector kernels run: on x86-64 when the CPU has AVX2 and FMA; elsewhere (e.g. aarch64,
// 32 vector registers) always, unless built with DYSCO_CPU_BASELINE_ONLY.
bool UseVectorKernels() {
#if defined(DYSCO_CPU_X86_64_V3)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#elif defined(DYSCO_CPU_BASELINE_ONLY)
  return false;
#else
  return true;
#endif
}

// head_dim 64 and 128 (nearly every model) get the vector kernels; other sizes the plain loops.
template <typename T>
DYSCO_TARGET_V3 void AttendKeysVector(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,
                                      int64_t key_begin, int64_t key_end, const float* bias,
                                      AttentionScratch& scratch) {
  switch (head_dim) {
    case 64:
      return AttendKeysImpl<T, 64>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
    case 128:
      return AttendKeysImpl<T, 128>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
    default:
      return AttendKeysImpl<T, 0>(seq, rows, head_dim, key_begin, key_end, bias, scratch);
  }
}

template <typename T>
DYSCO_TARGET_V3 void ProbsRowVector(const PagedSequence<T>& seq, const float* q, int64_t head_dim,
                                    int64_t len, const float* bias, float* key_buffer,
                                    float* probs) {
  switch (head_dim) {
    case 64:
      return ProbsRowImpl<T, 64>(seq, q, head_dim, len, bias, key_buffer, probs);
    case 128:
      return ProbsRowImpl<T, 128>(seq, q, head_dim, len, bias, key_buffer, probs);
    default:
      return ProbsRowImpl<T, 0>(seq, q, head_dim, len, bias, key_buffer, probs);
  }
}

// The blocked prefill loops for head_dim 64 and 128; false (nothing done) for other sizes.
template <typename T>
DYSCO_TARGET_V3 bool AttendKeysBlockedVector(const PagedSequence<T>& seq, int64_t rows,
                                             int64_t head_dim, int64_t key_begin, int64_t key_end,
                                             const float* bias, AttentionScratch& scratch) {
  switch (head_dim) {
    case 64:
      AttendKeysBlockedImpl<T, 64>(seq, rows, key_begin, key_end, bias, scratch);
      return true;
    case 128:
      AttendKeysBlockedImpl<T, 128>(seq, rows, key_begin, key_end, bias, scratch);
      return true;
    default:
      return false;
  }
}

}  // namespace

#define DYSCO_DEFINE_ATTENTION_KERNELS(T)                                                         \
  void AttendKeys(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim, int64_t key_begin, \
                  int64_t key_end, const float* bias, AttentionScratch& scratch) {                \
    if (UseVectorKernels()) {                                                                     \
      AttendKeysVector(seq, rows, head_dim, key_begin, key_end, bias, scratch);                   \
    } else {                                                                                      \
      AttendKeysImpl<T, 0>(seq, rows, head_dim, key_begin, key_end, bias, scratch);               \
    }                                                                                             \
  }                                                                                               \
  void ProbsRow(const PagedSequence<T>& seq, const float* q, int64_t head_dim, int64_t len,       \
                const float* bias, float* key_buffer, float* probs) {                             \
    if (UseVectorKernels()) {                                                                     \
      ProbsRowVector(seq, q, head_dim, len, bias, key_buffer, probs);                             \
    } else {                                                                                      \
      ProbsRowImpl<T, 0>(seq, q, head_dim, len, bias, key_buffer, probs);                         \
    }                                                                                             \
  }                                                                                               \
  bool AttendKeysBlocked(const PagedSequence<T>& seq, int64_t rows, int64_t head_dim,             \
                         int64_t key_begin, int64_t key_end, const float* bias,                   \
                         AttentionScratch& scratch) {                                             \
    /* The baseline build keeps the row-at-a-time loops: 12 accumulators spill on SSE. */         \
    return UseVectorKernels() &&                                                                  \
           AttendKeysBlockedVector(seq, rows, head_dim, key_begin, key_end, bias, scratch);       \
  }
DYSCO_DEFINE_ATTENTION_KERNELS(float)
DYSCO_DEFINE_ATTENTION_KERNELS(c10::BFloat16)
DYSCO_DEFINE_ATTENTION_KERNELS(c10::Half)
#undef DYSCO_DEFINE_ATTENTION_KERNELS

}  // namespace dysco::kernels::cpu
