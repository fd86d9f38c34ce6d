// The CUDA implementations of the `dysco` ops: the same free functions as kernels/ops.h with the
// suffix _cuda, registered for the CUDA dispatch key in kernels/cuda/cuda_bindings.cpp. Shapes,
// semantics and the output-first convention: kernels/ops.h; the results equal the CPU ops'
// (tests/cpp/test_kernels_cuda.cpp), selection sets included.
//
// Differences from the CPU ops, all for the sake of no host synchronisation (CUDA graphs):
// - only metadata is checked (kernels/op_checks.h, plus: CUDA tensors, head_dim <= 256); values
//   (seq_lens, page ids, num_keys, heads, offsets, top_p/top_k/strength) are clamped into range on
//   the device, never checked, so a bad call stays in bounds but its results are unspecified;
// - they run asynchronously on the current CUDA stream; a kernel fault surfaces at the next
//   synchronising call.
// Thread-safety: stateless; concurrent calls are safe unless they write the same output or pages.
// Ownership: nothing is kept; scratch space comes from the caching allocator per call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dysco::kernels {

void paged_kv_write_cuda(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& slot_mapping);

void paged_attention_decode_cuda(const at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, double scale,
                                 const c10::optional<at::Tensor>& key_bias);

// Two paths: bf16/fp16 caches without key_bias (head_dim a multiple of 8, <= 256) gather the
// sequences' pages into packed K/V and run ATen's flash attention (tensor cores, keys read once
// per tile of query tokens; cuDNN's fused attention instead for each sequence that brings >= 1024
// new tokens); everything else takes the split-KV kernel of decode (keys read once
// per query token). kernels/cuda/paged_prefill_flash.h has the exact rule.
void paged_attention_prefill_cuda(const at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                  double scale, const c10::optional<at::Tensor>& key_bias);

// Whether paged_attention_prefill_cuda takes the flash path for such arguments (metadata only;
// for tests and benchmarks, which must know which path they measure).
bool paged_attention_prefill_cuda_uses_flash(const at::Tensor& query,
                                             const at::Tensor& kv_cache_layer,
                                             const at::Tensor& block_tables,
                                             const c10::optional<at::Tensor>& key_bias);

// How many sequences paged_attention_prefill_cuda has sent through cuDNN attention so far in this
// process (kernels/cuda/paged_prefill_flash.cu: chunks of >= 1024 new tokens on the flash path),
// for tests that must know which path they measured.
int64_t paged_attention_prefill_cuda_cudnn_sequences();

// How many calls of that cuDNN path read the packed offsets back from the device (a host
// synchronisation) because the caller published no host lengths for its query_start_loc and
// seq_lens (kernels/host_lengths.h), for tests; DYSCO_CUDA_PREFILL_HOST_LENGTHS=0 reads back
// always (A/B timing; the same bits).
int64_t paged_attention_prefill_cuda_offset_read_backs();

// How many of dysco_select_bias_cuda's cooperative launches the runtime has refused so far in this
// process (kernels/cuda/dysco_ops.cu: their calls took a launch a pass instead), for tests.
int64_t dysco_select_bias_cuda_refused_launches();

void attention_probs_cuda(const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& kv_cache_layer, const at::Tensor& block_tables,
                          const at::Tensor& seq_lens, const at::Tensor& heads, double scale,
                          const c10::optional<at::Tensor>& key_bias);

// out [M, N] <- input [M, K] @ weight [N, K]^T (cuBLAS through ATen).
void linear_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);
void rms_norm_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                   double eps);
void rotary_embedding_cuda(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                           const at::Tensor& sin);
// One kernel, a thread per (t, i < D/2) writing columns i and i + D/2 of both tables with precise
// cosf / sinf: bit for bit the ATen composite on CUDA (kernels/rope_tables.h), which
// DYSCO_CUDA_ROPE_TABLES=aten runs instead (A/B timing). Within fp32 / the dtype's rounding of the
// CPU op (ATen's CPU cos and sin round differently).
void rope_tables_cuda(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      const at::Tensor& inv_freq, double scaling);
// One kernel each: add_rms_norm rounds the sum to the dtype, stores it and normalises it (the
// sum equals the CPU op's bit for bit, out within the rms_norm tolerance); silu_mul computes silu
// as ATen's CUDA kernel does (x / (1 + expf(-x)) in fp32), rounds it, then the product.
void add_rms_norm_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                       const at::Tensor& residual, const at::Tensor& weight, double eps);
void silu_mul_cuda(const at::Tensor& out, const at::Tensor& input);
// A decode batch of one or two 16-bit rows: one GEMV kernel whose blocks form the sum and the
// normed row in shared memory first (linear.cu): sum equals add_rms_norm_cuda's bit for bit, out
// equals add_rms_norm then linear within the dtype's rounding. Otherwise those two ops.
void add_rms_norm_linear_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                              const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& weight);
// add_rms_norm_linear_cuda then silu_mul_cuda (SwiGLU in the GEMV's epilogue was slower on the
// H200: docs/gpu.md "The norm in the GEMV").
void add_rms_norm_swiglu_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                              const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& weight);
// linear_cuda, add_rms_norm_swiglu_cuda and linear_cuda; with DYSCO_CUDA_MLP=persistent, one row
// of 16-bit values runs one persistent kernel for the four stages instead, its blocks meeting at
// grid barriers (linear.cu DecodeMlpKernel: the same bits, slower on the H200).
void o_proj_mlp_cuda(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                     const at::Tensor& residual, const at::Tensor& o_weight,
                     const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                     const at::Tensor& down_weight);
// One warp per (token, query or key head): norm, rope and the store (the key head's warp also
// copies its value head); the norm sums as rms_norm_cuda's warp kernel, the rope rounds as
// rotary_embedding_cuda, so it equals those two and paged_kv_write_cuda in sequence bit for bit.
void qk_norm_rope_kv_write_cuda(const at::Tensor& query, const at::Tensor& kv_cache_layer,
                                const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& slot_mapping,
                                const c10::optional<at::Tensor>& q_norm_weight,
                                const c10::optional<at::Tensor>& k_norm_weight, double eps);

// qk_norm_rope_kv_write_cuda then paged_attention_decode_cuda, except where the tensor-core decode
// kernel applies with one row chunk a KV head (16-bit caches, head_dim 64 / 128, group <= 16): it
// then makes the query rows and writes the newest keys itself (AttentionParams::qkv), with the
// write kernel's device code, so the same bits and one kernel fewer.
void qk_norm_rope_attention_decode_cuda(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, double scale, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& probe_heads);

// One kernel: a thread a key, the heads by value.
void dysco_probe_mean_cuda(const at::Tensor& mean, const at::Tensor& probs, c10::IntArrayRef heads);

void dysco_relevance_update_cuda(const at::Tensor& relevance, const at::Tensor& probs,
                                 const at::Tensor& num_keys, const at::Tensor& decay);

void dysco_select_bias_cuda(const at::Tensor& bias, const at::Tensor& selected,
                            const at::Tensor& stats, const at::Tensor& relevance,
                            const at::Tensor& num_keys, const at::Tensor& template_mask,
                            const at::Tensor& top_p, const at::Tensor& top_k,
                            const at::Tensor& strength);

void dysco_bias_from_selection_cuda(const at::Tensor& bias, const at::Tensor& selected,
                                    const at::Tensor& num_keys, const at::Tensor& template_mask,
                                    const at::Tensor& strength);

void dysco_template_mask_cuda(const at::Tensor& mask, const at::Tensor& tokens,
                              const at::Tensor& sequences, const at::Tensor& sequence_offsets);

}  // namespace dysco::kernels
