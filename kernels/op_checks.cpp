// Device-neutral argument checks of the `dysco` ops (kernels/op_checks.h).
#include "kernels/op_checks.h"

#include <c10/util/Exception.h>

#include "kernels/dysco_constants.h"

namespace dysco::kernels {
namespace {

// query [N, Hq, D] with the cache's dtype and head_dim, Hq a multiple of the cache's KV heads;
// returns N.
int64_t CheckQuery(const char* op, const at::Tensor& query, const PagedCacheShape& cache,
                   at::ScalarType dtype) {
  CheckTensor(op, "query", query, dtype, 3);
  TORCH_CHECK(query.size(2) == cache.head_dim, op, ": query head_dim ", query.size(2),
              " does not match the cache's head_dim ", cache.head_dim);
  TORCH_CHECK(query.size(1) % cache.num_kv_heads == 0, op, ": query heads ", query.size(1),
              " must be a multiple of the cache's KV heads ", cache.num_kv_heads);
  return query.size(0);
}

void CheckOutLikeQuery(const char* op, const at::Tensor& out, const at::Tensor& query) {
  CheckTensor(op, "out", out, query.scalar_type(), 3);
  TORCH_CHECK(out.sizes() == query.sizes(), op, ": out must have the shape of query ",
              query.sizes(), ", got ", out.sizes());
}

// block_tables int32 [batch, P], seq_lens int64 [batch].
void CheckSequenceShapes(const char* op, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         int64_t batch) {
  CheckTensor(op, "block_tables", block_tables, at::kInt, 2);
  CheckTensor(op, "seq_lens", seq_lens, at::kLong, 1);
  TORCH_CHECK(block_tables.size(0) == batch, op, ": block_tables must have ", batch,
              " rows (one per sequence), got shape ", block_tables.sizes());
  TORCH_CHECK(seq_lens.size(0) == batch, op, ": seq_lens must have ", batch,
              " entries (one per sequence), got shape ", seq_lens.sizes());
}

// The dtype of `tensor`, which must be defined and float32, bfloat16 or float16: the dtypes every
// op takes for its model tensors (cache, weights, activations).
at::ScalarType FloatingDtypeOf(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " is undefined");
  const at::ScalarType dtype = tensor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
  return dtype;
}

}  // namespace

void CheckTensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 int64_t dim) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ",
              tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous (shape ", tensor.sizes(),
              ", strides ", tensor.strides(), ")");
}

void CheckShaped(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                 at::IntArrayRef sizes) {
  CheckTensor(op, name, tensor, dtype, static_cast<int64_t>(sizes.size()));
  TORCH_CHECK(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
              tensor.sizes());
}

void CheckSameDevice(const char* op, const char* out_name, const at::Tensor& out,
                     std::initializer_list<NamedTensor> inputs) {
  TORCH_CHECK(out.defined(), op, ": ", out_name, " is undefined");
  const c10::Device device = out.device();
  for (const NamedTensor& input : inputs) {
    TORCH_CHECK(input.tensor.defined(), op, ": ", input.name, " is undefined");
    TORCH_CHECK(input.tensor.device() == device, op, ": ", input.name, " is on ",
                input.tensor.device(), " but ", out_name, " is on ", device,
                "; all tensors of one call must be on the same device");
  }
}

void CheckNoOverlap(const char* op, const char* out_name, const at::Tensor& out,
                    const char* other_name, const at::Tensor& other) {
  if (out.numel() == 0 || other.numel() == 0) return;
  const auto* out_begin = static_cast<const char*>(out.data_ptr());
  const auto* other_begin = static_cast<const char*>(other.data_ptr());
  const char* out_end = out_begin + out.numel() * static_cast<int64_t>(out.element_size());
  const char* other_end = other_begin + other.numel() * static_cast<int64_t>(other.element_size());
  TORCH_CHECK(out_end <= other_begin || other_end <= out_begin, op, ": ", out_name,
              " must not overlap ", other_name, " in memory (an out-of-place op)");
}

void CheckWrittenApart(const char* op, std::initializer_list<NamedTensor> written,
                       std::initializer_list<NamedTensor> read) {
  for (auto a = written.begin(); a != written.end(); ++a) {
    for (auto b = a + 1; b != written.end(); ++b) {
      CheckNoOverlap(op, a->name, a->tensor, b->name, b->tensor);
    }
  }
  for (const NamedTensor& w : written) {
    for (const NamedTensor& r : read) CheckNoOverlap(op, w.name, w.tensor, r.name, r.tensor);
  }
}

void CheckKeyBiasArg(const char* op, const c10::optional<at::Tensor>& key_bias, int64_t batch,
                     const at::Tensor& out) {
  if (!key_bias.has_value() || !key_bias->defined()) return;
  CheckTensor(op, "key_bias", *key_bias, at::kFloat, 2);
  TORCH_CHECK(key_bias->size(0) == batch, op, ": key_bias must be [B, S] with B = ", batch,
              ", got ", key_bias->sizes());
  CheckSameDevice(op, "out", out, {{"key_bias", *key_bias}});
}

PagedCacheShape CheckKvCache(const char* op, const at::Tensor& kv_cache_layer) {
  const at::ScalarType dtype = FloatingDtypeOf(op, "kv_cache_layer", kv_cache_layer);
  CheckTensor(op, "kv_cache_layer", kv_cache_layer, dtype, 5);
  TORCH_CHECK(kv_cache_layer.size(0) == 2, op,
              ": kv_cache_layer must be [2, num_pages, page_size, Hkv, D], got ",
              kv_cache_layer.sizes());
  PagedCacheShape shape;
  shape.num_pages = kv_cache_layer.size(1);
  shape.page_size = kv_cache_layer.size(2);
  shape.num_kv_heads = kv_cache_layer.size(3);
  shape.head_dim = kv_cache_layer.size(4);
  TORCH_CHECK(
      shape.page_size > 0 && shape.num_kv_heads > 0 && shape.head_dim > 0, op,
      ": kv_cache_layer has an empty page, head or head_dim dimension: ", kv_cache_layer.sizes());
  return shape;
}

void CheckLinearArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  constexpr const char* kOp = kLinearOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "weight", weight);
  CheckTensor(kOp, "weight", weight, dtype, 2);
  CheckTensor(kOp, "input", input, dtype, 2);
  CheckTensor(kOp, "out", out, dtype, 2);
  TORCH_CHECK(input.size(1) == weight.size(1), kOp, ": input must be [M, K = ", weight.size(1),
              "], got ", input.sizes());
  TORCH_CHECK(out.size(0) == input.size(0) && out.size(1) == weight.size(0), kOp,
              ": out must be [M = ", input.size(0), ", N = ", weight.size(0), "], got ",
              out.sizes());
  CheckSameDevice(kOp, "out", out, {{"input", input}, {"weight", weight}});
}

void CheckRmsNormArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      double eps) {
  constexpr const char* kOp = kRmsNormOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "weight", weight);
  CheckTensor(kOp, "weight", weight, dtype, 1);
  CheckShaped(kOp, "input", input, dtype, {input.defined() ? input.size(0) : 0, weight.size(0)});
  CheckShaped(kOp, "out", out, dtype, input.sizes());
  TORCH_CHECK(eps > 0.0, kOp, ": eps must be > 0, got ", eps);
  CheckSameDevice(kOp, "out", out, {{"input", input}, {"weight", weight}});
}

void CheckRotaryEmbeddingArgs(const at::Tensor& out, const at::Tensor& input, const at::Tensor& cos,
                              const at::Tensor& sin) {
  constexpr const char* kOp = kRotaryEmbeddingOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "input", input);
  CheckTensor(kOp, "input", input, dtype, 3);
  TORCH_CHECK(input.size(2) % 2 == 0, kOp, ": input's last dimension D must be even, got ",
              input.sizes());
  CheckShaped(kOp, "out", out, dtype, input.sizes());
  CheckShaped(kOp, "cos", cos, dtype, {input.size(0), input.size(2)});
  CheckShaped(kOp, "sin", sin, dtype, {input.size(0), input.size(2)});
  CheckSameDevice(kOp, "out", out, {{"input", input}, {"cos", cos}, {"sin", sin}});
}

void CheckAddRmsNormArgs(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& input,
                         const at::Tensor& residual, const at::Tensor& weight, double eps) {
  constexpr const char* kOp = kAddRmsNormOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "weight", weight);
  CheckTensor(kOp, "weight", weight, dtype, 1);
  CheckShaped(kOp, "input", input, dtype, {input.defined() ? input.size(0) : 0, weight.size(0)});
  CheckShaped(kOp, "residual", residual, dtype, input.sizes());
  CheckShaped(kOp, "sum", sum, dtype, input.sizes());
  CheckShaped(kOp, "out", out, dtype, input.sizes());
  TORCH_CHECK(eps > 0.0, kOp, ": eps must be > 0, got ", eps);
  CheckSameDevice(kOp, "out", out,
                  {{"sum", sum}, {"input", input}, {"residual", residual}, {"weight", weight}});
  CheckWrittenApart(kOp, {{"out", out}, {"sum", sum}},
                    {{"input", input}, {"residual", residual}, {"weight", weight}});
}

namespace {

// add_rms_norm_linear's checks, or add_rms_norm_swiglu's (swiglu: weight has an even number of
// rows 2N and out is [M, N]); op names the op in the messages.
void CheckAddRmsNormProjectionArgs(const char* op, bool swiglu, const at::Tensor& out,
                                   const at::Tensor& sum, const at::Tensor& input,
                                   const at::Tensor& residual, const at::Tensor& norm_weight,
                                   double eps, const at::Tensor& weight) {
  const at::ScalarType dtype = FloatingDtypeOf(op, "norm_weight", norm_weight);
  CheckTensor(op, "norm_weight", norm_weight, dtype, 1);
  const int64_t d = norm_weight.size(0);
  CheckShaped(op, "input", input, dtype, {input.defined() ? input.size(0) : 0, d});
  CheckShaped(op, "residual", residual, dtype, input.sizes());
  CheckShaped(op, "sum", sum, dtype, input.sizes());
  CheckTensor(op, "weight", weight, dtype, 2);
  TORCH_CHECK(weight.size(1) == d, op, ": weight must be [N, D = ", d, "], got ", weight.sizes());
  TORCH_CHECK(!swiglu || weight.size(0) % 2 == 0, op,
              ": weight must be [2N, D] (the gate rows, then the up rows), got ", weight.sizes());
  CheckShaped(op, "out", out, dtype, {input.size(0), weight.size(0) / (swiglu ? 2 : 1)});
  TORCH_CHECK(eps > 0.0, op, ": eps must be > 0, got ", eps);
  CheckSameDevice(op, "out", out,
                  {{"sum", sum},
                   {"input", input},
                   {"residual", residual},
                   {"norm_weight", norm_weight},
                   {"weight", weight}});
  CheckWrittenApart(
      op, {{"out", out}, {"sum", sum}},
      {{"input", input}, {"residual", residual}, {"norm_weight", norm_weight}, {"weight", weight}});
}

}  // namespace

void CheckAddRmsNormLinearArgs(const at::Tensor& out, const at::Tensor& sum,
                               const at::Tensor& input, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight) {
  CheckAddRmsNormProjectionArgs(kAddRmsNormLinearOp, /*swiglu=*/false, out, sum, input, residual,
                                norm_weight, eps, weight);
}

void CheckAddRmsNormSwigluArgs(const at::Tensor& out, const at::Tensor& sum,
                               const at::Tensor& input, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight) {
  CheckAddRmsNormProjectionArgs(kAddRmsNormSwigluOp, /*swiglu=*/true, out, sum, input, residual,
                                norm_weight, eps, weight);
}

void CheckOProjMlpArgs(const at::Tensor& out, const at::Tensor& sum, const at::Tensor& attn,
                       const at::Tensor& residual, const at::Tensor& o_weight,
                       const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
                       const at::Tensor& down_weight) {
  const char* op = kOProjMlpOp;
  const at::ScalarType dtype = FloatingDtypeOf(op, "norm_weight", norm_weight);
  CheckTensor(op, "norm_weight", norm_weight, dtype, 1);
  const int64_t d = norm_weight.size(0);
  CheckTensor(op, "attn", attn, dtype, 2);
  CheckShaped(op, "o_weight", o_weight, dtype, {d, attn.size(1)});
  CheckShaped(op, "residual", residual, dtype, {attn.size(0), d});
  CheckShaped(op, "sum", sum, dtype, residual.sizes());
  CheckTensor(op, "gate_up_weight", gate_up_weight, dtype, 2);
  TORCH_CHECK(gate_up_weight.size(1) == d && gate_up_weight.size(0) % 2 == 0, op,
              ": gate_up_weight must be [2I, D = ", d, "] (the gate rows, then the up rows), got ",
              gate_up_weight.sizes());
  CheckShaped(op, "down_weight", down_weight, dtype, {d, gate_up_weight.size(0) / 2});
  CheckShaped(op, "out", out, dtype, residual.sizes());
  TORCH_CHECK(eps > 0.0, op, ": eps must be > 0, got ", eps);
  CheckSameDevice(op, "out", out,
                  {{"sum", sum},
                   {"attn", attn},
                   {"residual", residual},
                   {"o_weight", o_weight},
                   {"norm_weight", norm_weight},
                   {"gate_up_weight", gate_up_weight},
                   {"down_weight", down_weight}});
  CheckWrittenApart(op, {{"out", out}, {"sum", sum}},
                    {{"attn", attn},
                     {"residual", residual},
                     {"o_weight", o_weight},
                     {"norm_weight", norm_weight},
                     {"gate_up_weight", gate_up_weight},
                     {"down_weight", down_weight}});
}

void CheckSiluMulArgs(const at::Tensor& out, const at::Tensor& input) {
  constexpr const char* kOp = kSiluMulOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "input", input);
  CheckTensor(kOp, "input", input, dtype, 2);
  TORCH_CHECK(input.size(1) % 2 == 0, kOp,
              ": input must be [M, 2N] (the gate and up halves), its width must be even, got ",
              input.sizes());
  CheckShaped(kOp, "out", out, dtype, {input.size(0), input.size(1) / 2});
  CheckSameDevice(kOp, "out", out, {{"input", input}});
  CheckNoOverlap(kOp, "out", out, "input", input);
}

void CheckRopeTablesArgs(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                         const at::Tensor& inv_freq) {
  constexpr const char* kOp = kRopeTablesOp;
  const at::ScalarType dtype = FloatingDtypeOf(kOp, "cos", cos);
  CheckTensor(kOp, "cos", cos, dtype, 2);
  const int64_t tokens = cos.size(0), d = cos.size(1);
  TORCH_CHECK(d % 2 == 0, kOp,
              ": cos must be [T, D] with D even (its two halves repeat the D/2 frequencies), got ",
              cos.sizes());
  CheckShaped(kOp, "sin", sin, dtype, cos.sizes());
  CheckShaped(kOp, "positions", positions, at::kLong, {tokens});
  CheckShaped(kOp, "inv_freq", inv_freq, at::kFloat, {d / 2});
  CheckSameDevice(kOp, "cos", cos,
                  {{"sin", sin}, {"positions", positions}, {"inv_freq", inv_freq}});
  CheckWrittenApart(kOp, {{"cos", cos}, {"sin", sin}},
                    {{"positions", positions}, {"inv_freq", inv_freq}});
}

PagedCacheShape CheckQkNormRopeKvWriteArgs(const at::Tensor& query,
                                           const at::Tensor& kv_cache_layer, const at::Tensor& qkv,
                                           const at::Tensor& cos, const at::Tensor& sin,
                                           const at::Tensor& slot_mapping,
                                           const c10::optional<at::Tensor>& q_norm_weight,
                                           const c10::optional<at::Tensor>& k_norm_weight,
                                           double eps) {
  constexpr const char* kOp = kQkNormRopeKvWriteOp;
  const PagedCacheShape cache = CheckKvCache(kOp, kv_cache_layer);
  const at::ScalarType dtype = kv_cache_layer.scalar_type();
  CheckTensor(kOp, "query", query, dtype, 3);
  const int64_t tokens = query.size(0), heads = query.size(1), d = cache.head_dim;
  TORCH_CHECK(query.size(2) == d, kOp, ": query head_dim ", query.size(2),
              " does not match the cache's head_dim ", d);
  TORCH_CHECK(d % 2 == 0, kOp, ": head_dim must be even (the rotary halves), got ", d);
  CheckShaped(kOp, "qkv", qkv, dtype, {tokens, (heads + 2 * cache.num_kv_heads) * d});
  CheckShaped(kOp, "cos", cos, dtype, {tokens, d});
  CheckShaped(kOp, "sin", sin, dtype, {tokens, d});
  CheckShaped(kOp, "slot_mapping", slot_mapping, at::kLong, {tokens});
  const bool q_norm = q_norm_weight.has_value() && q_norm_weight->defined();
  const bool k_norm = k_norm_weight.has_value() && k_norm_weight->defined();
  TORCH_CHECK(q_norm == k_norm, kOp,
              ": q_norm_weight and k_norm_weight must be given together (or neither)");
  CheckSameDevice(kOp, "query", query,
                  {{"kv_cache_layer", kv_cache_layer},
                   {"qkv", qkv},
                   {"cos", cos},
                   {"sin", sin},
                   {"slot_mapping", slot_mapping}});
  if (q_norm) {
    CheckShaped(kOp, "q_norm_weight", *q_norm_weight, dtype, {d});
    CheckShaped(kOp, "k_norm_weight", *k_norm_weight, dtype, {d});
    TORCH_CHECK(eps > 0.0, kOp, ": eps must be > 0, got ", eps);
    CheckSameDevice(kOp, "query", query,
                    {{"q_norm_weight", *q_norm_weight}, {"k_norm_weight", *k_norm_weight}});
  }
  CheckNoOverlap(kOp, "query", query, "qkv", qkv);
  CheckNoOverlap(kOp, "query", query, "kv_cache_layer", kv_cache_layer);
  CheckNoOverlap(kOp, "kv_cache_layer", kv_cache_layer, "qkv", qkv);
  return cache;
}

PagedCacheShape CheckQkNormRopeAttentionDecodeArgs(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache_layer,
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& q_norm_weight,
    const c10::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const c10::optional<at::Tensor>& key_bias,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& probe_heads) {
  constexpr const char* kOp = kQkNormRopeAttentionDecodeOp;
  const PagedCacheShape cache = CheckQkNormRopeKvWriteArgs(
      query, kv_cache_layer, qkv, cos, sin, slot_mapping, q_norm_weight, k_norm_weight, eps);
  CheckPagedAttentionDecodeArgs(out, query, kv_cache_layer, block_tables, seq_lens, key_bias);
  CheckNoOverlap(kOp, "out", out, "qkv", qkv);
  CheckNoOverlap(kOp, "out", out, "cos", cos);
  CheckNoOverlap(kOp, "out", out, "sin", sin);
  const bool has_probs = probs.has_value() && probs->defined();
  const bool has_heads = probe_heads.has_value() && probe_heads->defined();
  TORCH_CHECK(has_probs == has_heads, kOp, ": probs and probe_heads come together, got ",
              has_probs ? "probs without probe_heads" : "probe_heads without probs");
  if (has_probs) {
    CheckAttentionProbsArgs(*probs, query, kv_cache_layer, block_tables, seq_lens, *probe_heads,
                            key_bias);
    CheckNoOverlap(kOp, "probs", *probs, "out", out);
    CheckNoOverlap(kOp, "probs", *probs, "query", query);
    CheckNoOverlap(kOp, "probs", *probs, "qkv", qkv);
  }
  return cache;
}

PagedCacheShape CheckPagedKvWriteArgs(const at::Tensor& kv_cache_layer, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& slot_mapping) {
  constexpr const char* kOp = kPagedKvWriteOp;
  const PagedCacheShape cache = CheckKvCache(kOp, kv_cache_layer);
  CheckTensor(kOp, "key", key, kv_cache_layer.scalar_type(), 3);
  CheckTensor(kOp, "value", value, kv_cache_layer.scalar_type(), 3);
  CheckTensor(kOp, "slot_mapping", slot_mapping, at::kLong, 1);
  const int64_t num_tokens = key.size(0);
  TORCH_CHECK(key.size(1) == cache.num_kv_heads && key.size(2) == cache.head_dim, kOp,
              ": key must be [T, Hkv = ", cache.num_kv_heads, ", D = ", cache.head_dim, "], got ",
              key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), kOp, ": value must have the shape of key ", key.sizes(),
              ", got ", value.sizes());
  TORCH_CHECK(slot_mapping.size(0) == num_tokens, kOp, ": slot_mapping must have T = ", num_tokens,
              " entries, got ", slot_mapping.size(0));
  CheckSameDevice(kOp, "kv_cache_layer", kv_cache_layer,
                  {{"key", key}, {"value", value}, {"slot_mapping", slot_mapping}});
  return cache;
}

PagedCacheShape CheckPagedAttentionDecodeArgs(const at::Tensor& out, const at::Tensor& query,
                                              const at::Tensor& kv_cache_layer,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& seq_lens,
                                              const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kPagedAttentionDecodeOp;
  const PagedCacheShape cache = CheckKvCache(kOp, kv_cache_layer);
  const int64_t batch = CheckQuery(kOp, query, cache, kv_cache_layer.scalar_type());
  CheckOutLikeQuery(kOp, out, query);
  CheckSequenceShapes(kOp, block_tables, seq_lens, batch);
  CheckKeyBiasArg(kOp, key_bias, batch, out);
  CheckSameDevice(kOp, "out", out,
                  {{"query", query},
                   {"kv_cache_layer", kv_cache_layer},
                   {"block_tables", block_tables},
                   {"seq_lens", seq_lens}});
  return cache;
}

PagedCacheShape CheckPagedAttentionPrefillArgs(const at::Tensor& out, const at::Tensor& query,
                                               const at::Tensor& kv_cache_layer,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start_loc,
                                               const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kPagedAttentionPrefillOp;
  const PagedCacheShape cache = CheckKvCache(kOp, kv_cache_layer);
  CheckQuery(kOp, query, cache, kv_cache_layer.scalar_type());
  CheckOutLikeQuery(kOp, out, query);
  CheckTensor(kOp, "block_tables", block_tables, at::kInt, 2);
  const int64_t batch = block_tables.size(0);
  CheckSequenceShapes(kOp, block_tables, seq_lens, batch);
  CheckTensor(kOp, "query_start_loc", query_start_loc, at::kLong, 1);
  TORCH_CHECK(query_start_loc.size(0) == batch + 1, kOp,
              ": query_start_loc must have B + 1 = ", batch + 1, " entries, got ",
              query_start_loc.size(0));
  CheckKeyBiasArg(kOp, key_bias, batch, out);
  CheckSameDevice(kOp, "out", out,
                  {{"query", query},
                   {"kv_cache_layer", kv_cache_layer},
                   {"block_tables", block_tables},
                   {"seq_lens", seq_lens},
                   {"query_start_loc", query_start_loc}});
  return cache;
}

PagedCacheShape CheckAttentionProbsArgs(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& kv_cache_layer,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& heads,
                                        const c10::optional<at::Tensor>& key_bias) {
  constexpr const char* kOp = kAttentionProbsOp;
  const PagedCacheShape cache = CheckKvCache(kOp, kv_cache_layer);
  const int64_t batch = CheckQuery(kOp, query, cache, kv_cache_layer.scalar_type());
  CheckSequenceShapes(kOp, block_tables, seq_lens, batch);
  CheckTensor(kOp, "heads", heads, at::kLong, 1);
  CheckTensor(kOp, "out", out, at::kFloat, 3);
  TORCH_CHECK(out.size(0) == batch && out.size(1) == heads.size(0), kOp,
              ": out must be [B = ", batch, ", H = ", heads.size(0), ", S'], got ", out.sizes());
  CheckKeyBiasArg(kOp, key_bias, batch, out);
  CheckSameDevice(kOp, "out", out,
                  {{"query", query},
                   {"kv_cache_layer", kv_cache_layer},
                   {"block_tables", block_tables},
                   {"seq_lens", seq_lens},
                   {"heads", heads}});
  return cache;
}

void CheckDyscoProbeMeanArgs(const at::Tensor& mean, const at::Tensor& probs,
                             c10::IntArrayRef heads) {
  constexpr const char* kOp = kDyscoProbeMeanOp;
  CheckTensor(kOp, "mean", mean, at::kFloat, 2);
  CheckTensor(kOp, "probs", probs, at::kFloat, 3);
  TORCH_CHECK(probs.is_contiguous(), kOp, ": probs must be contiguous");
  TORCH_CHECK(probs.size(0) >= mean.size(0) && probs.size(2) >= mean.size(1), kOp,
              ": probs must be [B' >= B = ", mean.size(0), ", P, S' >= S = ", mean.size(1),
              "], got ", probs.sizes());
  TORCH_CHECK(!heads.empty() && static_cast<int64_t>(heads.size()) <= kMaxProbeMeanHeads, kOp,
              ": heads must have 1 to ", kMaxProbeMeanHeads, " entries, got ", heads.size());
  for (size_t k = 0; k < heads.size(); ++k) {
    TORCH_CHECK(heads[k] >= 0 && heads[k] < probs.size(1), kOp, ": heads[", k, "] = ", heads[k],
                " is not a row of probs (P = ", probs.size(1), ")");
  }
  CheckSameDevice(kOp, "mean", mean, {{"probs", probs}});
}

void CheckDyscoRelevanceUpdateArgs(const at::Tensor& relevance, const at::Tensor& probs,
                                   const at::Tensor& num_keys, const at::Tensor& decay) {
  constexpr const char* kOp = kDyscoRelevanceUpdateOp;
  CheckTensor(kOp, "relevance", relevance, at::kFloat, 2);
  const int64_t batch = relevance.size(0);
  CheckTensor(kOp, "probs", probs, at::kFloat, 3);
  TORCH_CHECK(probs.size(0) == batch && probs.size(1) >= 1, kOp, ": probs must be [B = ", batch,
              ", H >= 1, S'], got ", probs.sizes());
  CheckShaped(kOp, "decay", decay, at::kFloat, {batch});
  CheckShaped(kOp, "num_keys", num_keys, at::kLong, {batch});
  CheckSameDevice(kOp, "relevance", relevance,
                  {{"probs", probs}, {"num_keys", num_keys}, {"decay", decay}});
}

void CheckDyscoSelectBiasArgs(const at::Tensor& bias, const at::Tensor& selected,
                              const at::Tensor& stats, const at::Tensor& relevance,
                              const at::Tensor& num_keys, const at::Tensor& template_mask,
                              const at::Tensor& top_p, const at::Tensor& top_k,
                              const at::Tensor& strength) {
  constexpr const char* kOp = kDyscoSelectBiasOp;
  CheckTensor(kOp, "relevance", relevance, at::kFloat, 2);
  const int64_t batch = relevance.size(0);
  CheckShaped(kOp, "bias", bias, at::kFloat, relevance.sizes());
  CheckShaped(kOp, "selected", selected, at::kBool, relevance.sizes());
  CheckShaped(kOp, "stats", stats, at::kFloat, {batch, 2});
  CheckShaped(kOp, "template_mask", template_mask, at::kBool, relevance.sizes());
  CheckShaped(kOp, "top_p", top_p, at::kFloat, {batch});
  CheckShaped(kOp, "top_k", top_k, at::kLong, {batch});
  CheckShaped(kOp, "num_keys", num_keys, at::kLong, {batch});
  CheckShaped(kOp, "strength", strength, at::kFloat, {batch});
  CheckSameDevice(kOp, "bias", bias,
                  {{"selected", selected},
                   {"stats", stats},
                   {"relevance", relevance},
                   {"num_keys", num_keys},
                   {"template_mask", template_mask},
                   {"top_p", top_p},
                   {"top_k", top_k},
                   {"strength", strength}});
}

void CheckDyscoBiasFromSelectionArgs(const at::Tensor& bias, const at::Tensor& selected,
                                     const at::Tensor& num_keys, const at::Tensor& template_mask,
                                     const at::Tensor& strength) {
  constexpr const char* kOp = kDyscoBiasFromSelectionOp;
  CheckTensor(kOp, "bias", bias, at::kFloat, 2);
  const int64_t batch = bias.size(0);
  CheckShaped(kOp, "selected", selected, at::kBool, bias.sizes());
  CheckShaped(kOp, "template_mask", template_mask, at::kBool, bias.sizes());
  CheckShaped(kOp, "num_keys", num_keys, at::kLong, {batch});
  CheckShaped(kOp, "strength", strength, at::kFloat, {batch});
  CheckSameDevice(kOp, "bias", bias,
                  {{"selected", selected},
                   {"num_keys", num_keys},
                   {"template_mask", template_mask},
                   {"strength", strength}});
}

void CheckDyscoTemplateMaskArgs(const at::Tensor& mask, const at::Tensor& tokens,
                                const at::Tensor& sequences, const at::Tensor& sequence_offsets) {
  constexpr const char* kOp = kDyscoTemplateMaskOp;
  CheckTensor(kOp, "tokens", tokens, at::kLong, 1);
  CheckShaped(kOp, "mask", mask, at::kBool, {tokens.size(0)});
  CheckTensor(kOp, "sequences", sequences, at::kLong, 1);
  CheckTensor(kOp, "sequence_offsets", sequence_offsets, at::kLong, 1);
  TORCH_CHECK(sequence_offsets.size(0) >= 1, kOp,
              ": sequence_offsets must have K + 1 >= 1 entries, got 0");
  CheckSameDevice(
      kOp, "mask", mask,
      {{"tokens", tokens}, {"sequences", sequences}, {"sequence_offsets", sequence_offsets}});
}

}  // namespace dysco::kernels
