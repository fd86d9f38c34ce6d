#include "core/model/model_runner.h"

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include <ATen/Parallel.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/script.h>

#ifdef DYSCO_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <chrono>
#include <map>
#include <tuple>
#endif

#include "core/base/thread_annotations.h"
#include "core/model/device_tensor.h"
#include "core/model/safetensors_file.h"
#include "core/model/torch_dtype.h"
#include "kernels/dysco_constants.h"
#include "kernels/op_calls.h"

namespace dysco {

namespace {

std::string Seq(size_t i) { return "sequences[" + std::to_string(i) + "]"; }

// Copies a (device, any float dtype) tensor into a host float vector.
void CopyToHost(const at::Tensor& t, std::vector<float>* out) {
  at::Tensor host;
  if (t.is_cuda()) {
    // Through pinned memory: a copy into pageable memory (what `.to(kCPU)` allocates, 0.6 MB of
    // fresh pages per step for a 152K vocabulary) is staged by the driver and faults its pages in;
    // into the caching host allocator's pinned blocks it is one DMA (docs/gpu.md "CUDA graphs").
    host = at::empty(t.sizes(), at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
    host.copy_(t);  // synchronous: the step's one wait
  } else {
    host = t.to(at::kCPU, at::kFloat).contiguous();
  }
  out->resize(static_cast<size_t>(host.numel()));
  if (host.numel() > 0)
    std::memcpy(out->data(), host.data_ptr<float>(), out->size() * sizeof(float));
}

// Each row's GreedyTokenId, picked where the logits [B, vocab] are: on a GPU by ATen's argmax (its
// rule is GreedyTokenId's: NaN counts as largest, ties go to the lower index), and only the B ids
// are copied back (the step's one wait); on the CPU by GreedyTokenId over the tensor's rows.
void ReadGreedyTokens(const at::Tensor& logits, std::vector<int32_t>* out) {
  const int64_t B = logits.size(0);
  out->resize(static_cast<size_t>(B));
  if (logits.is_cuda()) {
    at::Tensor host = at::empty({B}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    host.copy_(at::argmax(logits, /*dim=*/1));  // synchronous
    const int64_t* ids = host.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) (*out)[static_cast<size_t>(b)] = static_cast<int32_t>(ids[b]);
    return;
  }
  const at::Tensor rows = logits.to(at::kFloat).contiguous();
  const int64_t vocab = rows.size(1);
  for (int64_t b = 0; b < B; ++b) {
    (*out)[static_cast<size_t>(b)] = GreedyTokenId(rows.data_ptr<float>() + b * vocab, vocab);
  }
}

// OpenBLAS (Debian's libblas.so.3 alternative) keeps its own thread pool that at::set_num_threads
// does not reach. Looked up at run time, so any other BLAS works unchanged. The runner gives it one
// thread: the model's matmuls (dysco::linear, kernels/cpu/linear.cpp) split their rows over the
// ATen (OpenMP) threads themselves, so that one pool runs everything. Two pools of N threads on N
// cores wait on each other's spinning threads (libgomp's idle threads spin after each parallel
// region): prefill ran at a quarter of its GEMM rate that way.
void SetBlasThreads(int n) {
  using SetThreads = void (*)(int);
  if (auto fn = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    fn(n);
}

#ifdef DYSCO_CUDA_GRAPHS
int64_t RoundUpToPowerOfTwo(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// What a captured decode step depends on beyond its input values: shapes, the layers run, the
// probes, whether a bias is passed, and the cache's address (the graph holds it).
struct GraphKey {
  int64_t batch = 0;  // padded: a power of two
  int64_t pages = 0;  // padded block-table width: a power of two
  int last_layer = -1;
  bool bias = false;
  std::vector<std::pair<int, int>> probes;
  const void* kv_cache = nullptr;
  int64_t kv_pages = 0;

  bool operator<(const GraphKey& o) const {
    return std::tie(batch, pages, last_layer, bias, probes, kv_cache, kv_pages) <
           std::tie(o.batch, o.pages, o.last_layer, o.bias, o.probes, o.kv_cache, o.kv_pages);
  }
  std::string ToString() const {
    std::string p;
    for (const auto& [layer, head] : probes) {
      p += (p.empty() ? "" : ",") + std::to_string(layer) + ":" + std::to_string(head);
    }
    return "batch=" + std::to_string(batch) + " pages=" + std::to_string(pages) +
           " last_layer=" + std::to_string(last_layer) + " bias=" + (bias ? "yes" : "no") +
           " probes=[" + p + "]";
  }
};

// One bucket's captured decode step. Its inputs live in one device byte buffer (`device`) whose
// views the graph reads; `host` (pinned) has the same layout and is copied in with one
// non-blocking copy per step. Its outputs (logits, probs) live in the graph pool and are
// overwritten by every replay of any graph that shares the pool: they are read right after the
// replay, before another graph runs.
struct DecodeGraph {
  at::cuda::CUDAGraph graph;
  bool captured = false;
  at::Tensor host, device;
  // Recorded after each host -> device copy: `host` may be rewritten once it has completed.
  c10::cuda::CUDAEvent copied;
  int64_t off_token_ids = 0, off_positions = 0, off_query_start_loc = 0, off_seq_lens = 0,
          off_slot_mapping = 0, off_probe_heads = 0, off_block_tables = 0, off_attn_bias = 0;
  std::vector<c10::IValue> inputs;  // the module's arguments: views of `device`, the cache, ...
  at::Tensor logits, probs;
};

// The graphs of a runner: one pool for all buckets (they never run concurrently), a side stream
// for warm-up and capture.
struct DecodeGraphs {
  c10::MempoolId_t pool;
  c10::cuda::CUDAStream capture_stream;
  // A null graph marks a bucket whose capture failed: it runs eagerly.
  std::map<GraphKey, std::unique_ptr<DecodeGraph>> by_key;
  // The cache the graphs were captured against. Graphs hold the cache tensor (their inputs), so a
  // new cache (dysco-generate sizes one per run) drops them all: otherwise every old cache would
  // stay allocated. Alternating between two caches would recapture every step; nothing does that.
  const void* kv_cache = nullptr;
  DecodeGraphs(c10::MempoolId_t p, c10::cuda::CUDAStream s) : pool(p), capture_stream(s) {}
};

int64_t ReservedBytes(c10::DeviceIndex index) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  return stats.reserved_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
      .current;
}
#endif  // DYSCO_CUDA_GRAPHS

// Package weights files put every tensor at a multiple of this
// (tools/dysco_export/safetensors_io.py).
constexpr uint64_t kWeightsAlignment = 64;
// Entries that only pad the next tensor to the alignment (U8, never bound).
constexpr char kPaddingPrefix[] = "__padding__.";

const char* SafetensorsDtypeOf(ModelDtype dtype) {
  switch (dtype) {
    case ModelDtype::kFloat32:
      return "F32";
    case ModelDtype::kBFloat16:
      return "BF16";
    case ModelDtype::kFloat16:
      return "F16";
  }
  return "?";
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Binds every parameter of `module` named in its weight_names attribute (module path -> a list of
// tensor names) to those tensors of `file`, concatenated along dim 0 when there are several (the
// fused q/k/v and gate/up weights), after checking the file against the config: exactly the tensors
// PackageWeightShapes implies (padding entries aside), each with its shape and the config dtype;
// every one bound at least once, every named path an existing parameter, bound once; a parameter
// left unbound must be an empty placeholder. On the CPU the parameter is a tensor over the mapping
// (zero-copy; it keeps the file alive), also for a concatenation whose tensors follow each other in
// the file (the exporter writes them so), else a copy; elsewhere a copy on the module's device.
Status BindWeights(torch::jit::Module& module, const ModelConfig& config,
                   const std::shared_ptr<const SafetensorsFile>& file,
                   const std::string& model_path, const c10::Device& device) {
  const std::string& path = file->path();
  std::map<std::string, std::vector<int64_t>> expected;
  for (auto& [name, shape] : PackageWeightShapes(config)) expected[name] = shape;
  const std::string dtype = SafetensorsDtypeOf(config.dtype);
  for (const SafetensorsEntry& e : file->entries()) {
    if (e.name.rfind(kPaddingPrefix, 0) == 0 && e.dtype == "U8") continue;
    auto it = expected.find(e.name);
    if (it == expected.end()) {
      return InvalidArgumentError(path + ": tensor '" + e.name +
                                  "' is not a weight of this model (config.json)");
    }
    if (e.dtype != dtype) {
      return InvalidArgumentError(path + ": tensor '" + e.name + "' has dtype " + e.dtype +
                                  ", config.json dtype " + ModelDtypeName(config.dtype) +
                                  " needs " + dtype);
    }
    // The padding entries that follow odd-sized tensors are not aligned themselves: the rule is
    // checked here, on the tensors that are bound, rather than by the parser on every entry.
    if (e.offset % kWeightsAlignment != 0) {
      return InvalidArgumentError(path + ": tensor '" + e.name + "' starts at file offset " +
                                  std::to_string(e.offset) + ", not a multiple of " +
                                  std::to_string(kWeightsAlignment) + " (re-export the package)");
    }
    if (e.shape != it->second) {
      return InvalidArgumentError(path + ": tensor '" + e.name + "' has shape " +
                                  ShapeText(e.shape) + ", config.json implies " +
                                  ShapeText(it->second));
    }
  }
  for (const auto& [name, shape] : expected) {
    if (file->Find(name) == nullptr) {
      return InvalidArgumentError(path + ": missing tensor '" + name + "' (shape " +
                                  ShapeText(shape) + ")");
    }
  }
  if (!module.hasattr("weight_names")) {
    return FailedPreconditionError(model_path +
                                   ": has no weight_names (not a format-2 package): re-export it");
  }
  const c10::IValue names = module.attr("weight_names");
  const std::string not_a_dict = model_path + ": weight_names is not a Dict[str, List[str]]";
  if (!names.isGenericDict()) return InvalidArgumentError(not_a_dict);
  std::map<std::string, std::vector<std::string>> bindings;  // sorted: deterministic errors
  for (const auto& item : names.toGenericDict()) {
    if (!item.key().isString() || !item.value().isList()) return InvalidArgumentError(not_a_dict);
    std::vector<std::string>& parts = bindings[item.key().toStringRef()];
    for (const c10::IValue& part : item.value().toListRef()) {
      if (!part.isString()) return InvalidArgumentError(not_a_dict);
      parts.push_back(part.toStringRef());
    }
  }
  const at::TensorOptions cpu_options =
      at::TensorOptions().dtype(ToScalarType(config.dtype)).device(at::kCPU);
  // A tensor over the mapped bytes [offset, offset + rows * row bytes) of the file. The mapping is
  // read-only: nothing writes a parameter (they do not require grad, and the model never updates
  // them in place); a write would fault rather than corrupt the file.
  auto mapped = [&](const SafetensorsEntry& first, std::vector<int64_t> shape) {
    std::shared_ptr<const SafetensorsFile> keep = file;
    return torch::from_blob(
        const_cast<void*>(file->Data(first)), shape, [keep](void*) {}, cpu_options);
  };
  std::set<std::string> bound;  // the file's tensors bound at least once
  // One tensor per distinct list: tied paths (embed_tokens, lm_head) share it.
  std::map<std::vector<std::string>, at::Tensor> tensors;
  for (const auto& [param_path, parts] : bindings) {
    if (parts.empty()) {
      return InvalidArgumentError(model_path + ": weight_names binds " + param_path +
                                  " to no tensor");
    }
    std::vector<const SafetensorsEntry*> entries;
    for (const std::string& name : parts) {
      if (expected.count(name) == 0) {
        return InvalidArgumentError(model_path + ": weight_names binds " + param_path + " to '" +
                                    name + "', not a weight of this model");
      }
      entries.push_back(file->Find(name));
    }
    // Parts are concatenated along dim 0: their other dims must agree.
    for (const SafetensorsEntry* e : entries) {
      if (e->shape.empty() || !std::equal(e->shape.begin() + 1, e->shape.end(),
                                          entries[0]->shape.begin() + 1, entries[0]->shape.end())) {
        return InvalidArgumentError(model_path + ": weight_names concatenates " + param_path +
                                    " from tensors whose shapes differ past dim 0 ('" + parts[0] +
                                    "' " + ShapeText(entries[0]->shape) + ", '" + e->name + "' " +
                                    ShapeText(e->shape) + ")");
      }
    }
    // Walk to the owning submodule; the last component must be a parameter slot.
    torch::jit::Module owner = module;
    std::string leaf = param_path;
    for (size_t dot; (dot = leaf.find('.')) != std::string::npos; leaf = leaf.substr(dot + 1)) {
      const std::string part = leaf.substr(0, dot);
      if (!owner.hasattr(part) || !owner.attr(part).isModule()) {
        return InvalidArgumentError(model_path + ": weight_names names " + param_path +
                                    ", which is not a parameter of the module");
      }
      owner = owner.attr(part).toModule();
    }
    const auto slot = owner.type()->findAttributeSlot(leaf);
    if (!slot || !owner.type()->is_parameter(*slot)) {
      return InvalidArgumentError(model_path + ": weight_names names " + param_path +
                                  ", which is not a parameter of the module");
    }
    auto t = tensors.find(parts);
    if (t == tensors.end()) {
      bool adjacent = true;
      int64_t rows = 0;
      for (size_t i = 0; i < entries.size(); ++i) {
        rows += entries[i]->shape[0];
        if (i > 0 && entries[i]->offset != entries[i - 1]->offset + entries[i - 1]->size) {
          adjacent = false;
        }
      }
      std::vector<int64_t> shape = entries[0]->shape;
      shape[0] = rows;
      at::Tensor value;
      if (adjacent) {
        const at::Tensor whole = mapped(*entries[0], shape);
        value = device.is_cpu() ? whole : whole.to(device);
      } else {
        // Not one run of the file (a package written by other means): one copy, made where the
        // parameter lives.
        value = at::empty(shape, cpu_options.device(device));
        int64_t row = 0;
        for (const SafetensorsEntry* e : entries) {
          value.narrow(0, row, e->shape[0]).copy_(mapped(*e, e->shape));
          row += e->shape[0];
        }
      }
      t = tensors.emplace(parts, value).first;
    }
    bound.insert(parts.begin(), parts.end());
    owner.setattr(leaf, t->second);
  }
  for (const auto& [name, shape] : expected) {
    if (bound.count(name) == 0) {
      return InvalidArgumentError(model_path + ": weight_names binds no parameter to tensor '" +
                                  name + "' of " + path);
    }
  }
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    if (bindings.count(p.name) == 0 && p.value.numel() != 0) {
      return InvalidArgumentError(model_path + ": parameter " + p.name +
                                  " holds weights but is not bound by weight_names");
    }
  }
  return OkStatus();
}

// Quota / period of the cgroup's CPU limit, or 0 when there is none (or no cgroup file to read).
double CgroupCpuLimit() {
  std::ifstream v2("/sys/fs/cgroup/cpu.max");  // "max 100000" or "200000 100000"
  std::string quota;
  double period = 0;
  if (v2 >> quota >> period) {
    return quota == "max" || period <= 0 ? 0.0 : std::strtod(quota.c_str(), nullptr) / period;
  }
  std::ifstream q1("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
      p1("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  double q = 0;
  if (q1 >> q && p1 >> period && q > 0 && period > 0) return q / period;
  return 0.0;
}

}  // namespace

int32_t GreedyTokenId(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) return static_cast<int32_t>(i);
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

int AvailableCpus() {
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  const double limit = CgroupCpuLimit();
  if (limit > 0) cpus = std::min(cpus, static_cast<int>(std::ceil(limit)));
  return std::max(cpus, 1);
}

Status CheckDyscoOpsRegistered() {
  const std::vector<std::string> missing = ops::MissingOps();
  if (missing.empty()) return OkStatus();
  return FailedPreconditionError("op " + missing.front() +
                                 " is not registered: libdysco_kernels.so is not linked or loaded "
                                 "(link it with -Wl,--no-as-needed, or use dysco_kernels_linked)");
}

struct ModelRunner::Impl {
  ModelConfig config;
  std::string package_dir;
  std::string device_name;
  int cpu_threads = 1;
  c10::Device device{c10::kCPU};
  torch::jit::Module module;
  // Fault injection for tests (docs/architecture.md "Failure handling"): with the environment
  // variable DYSCO_FAILPOINT_FORWARD_TOKEN=<id> at load, every forward that feeds token <id> fails
  // as an op failure would. Unset in production: one branch per forward.
  std::optional<int64_t> failpoint_token;

  // ModelRunnerOptions::native_cpu_decode: the module's parameters and constants that the decode
  // loop reads, taken once at load (null when the option is off, the device is not the CPU or the
  // module lacks them).
  struct NativeDecode;
  std::unique_ptr<NativeDecode> native_decode;

  bool jit_optimize = false;
  bool split_mixed_bias = false;  // ModelRunnerOptions::mixed_bias_split, resolved for the device
  bool cuda_graphs = false;       // options.cuda_graphs on a CUDA device, in a CUDA build
  int64_t cuda_graph_max_batch = 0;
  std::function<void(const std::string&)> log_info;

  mutable Mutex mu;  // one Forward at a time; guards the module's use and the buffers below
  // Host staging buffers, reused across forwards so a decode step allocates no vectors.
  // probe_layers / probe_heads: the layer and the query head of each probe, grouped by layer (a
  // stable sort of the batch's probes, so the model makes one attention_probs call per layer);
  // probe_order[k] = the batch's index of the k-th of them.
  std::vector<int64_t> token_ids GUARDED_BY(mu), positions GUARDED_BY(mu),
      query_start_loc GUARDED_BY(mu), seq_lens GUARDED_BY(mu), slot_mapping GUARDED_BY(mu),
      probe_layers GUARDED_BY(mu), probe_heads GUARDED_BY(mu);
  std::vector<size_t> probe_order GUARDED_BY(mu);
  bool probes_reordered GUARDED_BY(mu) = false;
  std::vector<float> probs_scratch GUARDED_BY(mu);  // the model's probe order, before un-permuting
  std::vector<int32_t> block_tables GUARDED_BY(mu);
  std::vector<float> attn_bias GUARDED_BY(mu);
  int64_t max_seq_len GUARDED_BY(mu) = 0;  // of the packed batch
  int64_t max_pages GUARDED_BY(mu) = 0;
  bool any_bias GUARDED_BY(mu) = false;
  CudaGraphStats stats GUARDED_BY(mu);
#ifdef DYSCO_CUDA_GRAPHS
  std::unique_ptr<DecodeGraphs> graphs GUARDED_BY(mu);
  // The graph of this decode step's bucket (captured on first use), or null: run eagerly.
  DecodeGraph* GraphForLocked(const ForwardBatch& batch) REQUIRES(mu);
  void FillGraphInputsLocked(const ForwardBatch& batch, const GraphKey& key, DecodeGraph* g)
      REQUIRES(mu);
  // Warm-up run and capture on the side stream; false (and the bucket marked eager) on failure.
  bool CaptureLocked(const GraphKey& key, DecodeGraph* g) REQUIRES(mu);
#endif

  Status Validate(const ForwardBatch& batch) const;
  Status ValidateRow(const ForwardRow& row, size_t i, int64_t page_size, int64_t num_pages) const;
  // A forward is: pack the rows into the staging buffers, view them as the module's inputs, run,
  // check and copy the outputs to the host.
  Status RunLocked(const ForwardBatch& batch, ForwardOutput* out) REQUIRES(mu);
  // ModelRunnerOptions::mixed_bias_split: whether `batch` mixes biased rows with unbiased prefill
  // chunks, and its two forwards, the outputs merged back in the batch's row order.
  bool IsMixedBiasStep(const ForwardBatch& batch) const;
  Status RunSplitLocked(const ForwardBatch& batch, ForwardOutput* out) REQUIRES(mu);
  void PackLocked(const ForwardBatch& batch) REQUIRES(mu);
  std::vector<c10::IValue> InputsLocked(const ForwardBatch& batch) REQUIRES(mu);
  // logits [>= B, vocab] (or empty), probs [>= B, H, >= max_seq_len]: rows past B (a graph's
  // padding) and columns past max_seq_len are not copied.
  Status ReadOutputsLocked(const ForwardBatch& batch, const at::Tensor& logits,
                           const at::Tensor& probs, ForwardOutput* out) REQUIRES(mu);
  // ForwardBatch::probe_mean_heads: each row's head mean, taken on the probs' device.
  void ReadProbeMeanLocked(const ForwardBatch& batch, const at::Tensor& probs, ForwardOutput* out)
      REQUIRES(mu);
  // ModelRunnerOptions::native_cpu_decode: whether `batch` is such a step, and the step itself on
  // the module's inputs (InputsLocked), returning what module.forward would: (logits, probs).
  bool IsNativeDecodeStep(const ForwardBatch& batch) const;
  std::pair<at::Tensor, at::Tensor> NativeDecodeForward(const std::vector<c10::IValue>& inputs)
      REQUIRES(mu);
};

// What the CPU decode loop reads of the module (tools/dysco_export/model.py, package format 4:
// DecoderModel and its DecoderLayers), taken by attribute name at load.
struct ModelRunner::Impl::NativeDecode {
  struct Layer {
    at::Tensor input_layernorm, qkv_proj, o_proj, post_attention_layernorm, gate_up_proj, down_proj;
    c10::optional<at::Tensor> q_norm, k_norm;  // set when the layer has qk_norm (Qwen3)
    double scale = 0.0;
    int64_t num_heads = 0, head_dim = 0;
  };
  std::vector<Layer> layers;
  at::Tensor inv_freq, embed_tokens, norm, lm_head;
  double attention_scaling = 1.0, eps = 0.0;
  // cos and sin of every position below rope_cos.size(0), [positions, width] in the model's dtype,
  // or undefined. Why: the TorchScript code derives them from the step's positions (rope_tables,
  // on the CPU ~8 small ATen ops), ~0.15 ms of a ~20 ms SmolLM2 step on 2 cores
  // (docs/performance.md "The step's parts, timed from inside"); a decode step now takes its rows.
  // The table is built by the same op, in blocks of rows small enough that ATen runs them on one
  // thread, and only for widths that are a multiple of 32: then every element goes through ATen's
  // vector loop whatever the row count, so each row equals the code's for any batch, bit for bit
  // (NativeCpuDecodeTest).
  at::Tensor rope_cos, rope_sin;

  // cos, sin [B, width] of `positions` (int64 [B]) as the TorchScript code computes them: its own
  // op, rope_tables (on the CPU the ATen expression that older packages' code runs, so the same
  // bits for both).
  std::pair<at::Tensor, at::Tensor> RopeOf(const at::Tensor& positions) const {
    at::Tensor cos = at::empty({positions.size(0), 2 * inv_freq.size(0)}, embed_tokens.options());
    at::Tensor sin = at::empty_like(cos);
    ops::rope_tables(cos, sin, positions, inv_freq, attention_scaling);
    return {cos, sin};
  }

  // The table for positions [0, max_positions) when its width allows and it takes at most 64 MiB.
  void BuildRopeTable(int64_t max_positions) {
    const int64_t width = 2 * inv_freq.size(0);
    const int64_t bytes = 2 * max_positions * width * embed_tokens.element_size();
    if (width % 32 != 0 || max_positions <= 0 || bytes > (64LL << 20)) return;
    at::Tensor cos = at::empty({max_positions, width}, embed_tokens.options());
    at::Tensor sin = at::empty_like(cos);
    // ATen's element-wise ops stay on one thread below 32768 elements (at::internal::GRAIN_SIZE).
    const int64_t rows = std::max<int64_t>(1, 16384 / width);
    for (int64_t r = 0; r < max_positions; r += rows) {
      const int64_t n = std::min(rows, max_positions - r);
      const auto [c, s] = RopeOf(at::arange(r, r + n, at::kLong));
      cos.narrow(0, r, n).copy_(c);
      sin.narrow(0, r, n).copy_(s);
    }
    rope_cos = cos;
    rope_sin = sin;
  }

  // Null when an attribute is missing or of another type (an older or foreign module).
  static std::unique_ptr<NativeDecode> From(const torch::jit::Module& m, int64_t num_layers) {
    auto n = std::make_unique<NativeDecode>();
    try {
      n->inv_freq = m.attr("inv_freq").toTensor();
      n->embed_tokens = m.attr("embed_tokens").toTensor();
      n->norm = m.attr("norm").toTensor();
      n->lm_head = m.attr("lm_head").toTensor();
      n->attention_scaling = m.attr("attention_scaling").toDouble();
      n->eps = m.attr("eps").toDouble();
      const torch::jit::Module layers = m.attr("layers").toModule();
      for (int64_t i = 0; i < num_layers; ++i) {
        const torch::jit::Module l = layers.attr(std::to_string(i)).toModule();
        Layer& w = n->layers.emplace_back();
        w.input_layernorm = l.attr("input_layernorm").toTensor();
        w.qkv_proj = l.attr("qkv_proj").toTensor();
        w.o_proj = l.attr("o_proj").toTensor();
        w.post_attention_layernorm = l.attr("post_attention_layernorm").toTensor();
        w.gate_up_proj = l.attr("gate_up_proj").toTensor();
        w.down_proj = l.attr("down_proj").toTensor();
        if (l.attr("qk_norm").toBool()) {
          w.q_norm = l.attr("q_norm").toTensor();
          w.k_norm = l.attr("k_norm").toTensor();
        }
        w.scale = l.attr("scale").toDouble();
        w.num_heads = l.attr("num_heads").toInt();
        w.head_dim = l.attr("head_dim").toInt();
        if (l.attr("eps").toDouble() != n->eps) return nullptr;
      }
    } catch (const c10::Error&) {
      return nullptr;
    }
    return n;
  }
};

StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Load(const std::string& package_dir,
                                                         const ModelRunnerOptions& options) {
  if (options.cuda_graph_max_batch < 1) {
    return InvalidArgumentError("cuda_graph_max_batch must be >= 1, got " +
                                std::to_string(options.cuda_graph_max_batch));
  }
  auto impl = std::make_unique<Impl>();
  DYSCO_ASSIGN_OR_RETURN(impl->config, LoadModelConfig(package_dir));
  impl->package_dir = package_dir;
  impl->device_name = options.device;
  impl->log_info = options.log_info;
  impl->jit_optimize = options.jit_optimize;
  impl->cuda_graph_max_batch = options.cuda_graph_max_batch;
  if (const char* token = std::getenv("DYSCO_FAILPOINT_FORWARD_TOKEN")) {
    impl->failpoint_token = static_cast<int64_t>(std::strtoll(token, nullptr, 10));
  }
  if (impl->config.format_version != kPackageFormatVersion) {
    return FailedPreconditionError(
        package_dir + "/config.json: package format_version " +
        std::to_string(impl->config.format_version) + ", this server loads " +
        std::to_string(kPackageFormatVersion) +
        " (weights in a safetensors file, fused q/k/v and gate/up): re-export the package with "
        "tools/dysco_export");
  }
  DYSCO_RETURN_IF_ERROR(CheckDyscoOpsRegistered());
  if (options.num_threads < 0) {
    return InvalidArgumentError("num_threads must be >= 0, got " +
                                std::to_string(options.num_threads));
  }
  const std::string model_path = package_dir + "/model.pt";
  if (!std::ifstream(model_path).good()) return NotFoundError(model_path + ": cannot open");
  try {
    impl->device = c10::Device(options.device);
  } catch (const std::exception& e) {
    return InvalidArgumentError("device \"" + options.device + "\": " + e.what());
  }
  using Split = ModelRunnerOptions::MixedBiasSplit;
  impl->split_mixed_bias = options.mixed_bias_split == Split::kAlways ||
                           (options.mixed_bias_split == Split::kAuto && impl->device.is_cuda());
  try {
    impl->cpu_threads = options.num_threads > 0 ? options.num_threads : AvailableCpus();
    at::set_num_threads(impl->cpu_threads);
    SetBlasThreads(1);
    torch::jit::setGraphExecutorOptimize(options.jit_optimize);
    impl->module = torch::jit::load(model_path, impl->device);
    impl->module.eval();
#ifdef DYSCO_CUDA_GRAPHS
    // Capture needs an interpreter that only launches the module's ops: without optimisation the
    // graph executor runs one plan, with no profiling runs or re-specialisation (Load's
    // jit_optimize option, set on the forward's thread by Forward); with it on, no graphs.
    impl->cuda_graphs = options.cuda_graphs && impl->device.is_cuda() && !options.jit_optimize;
    if (impl->device.is_cuda() && !impl->device.has_index()) {
      // "cuda" means the current device; its tensors (the pool's) carry the index.
      impl->device = c10::Device(c10::kCUDA, c10::cuda::current_device());
    }
    if (impl->cuda_graphs) {
      MutexLock lock(&impl->mu);
      const c10::DeviceIndex index = impl->device.index();
      impl->graphs = std::make_unique<DecodeGraphs>(at::cuda::graph_pool_handle(),
                                                    c10::cuda::getStreamFromPool(false, index));
    }
#endif
  } catch (const c10::Error& e) {
    return InternalError(model_path + ": TorchScript load failed: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError(model_path + ": TorchScript load failed: " + e.what());
  }
  const std::string weights_path = package_dir + "/" + impl->config.weights_file;
  DYSCO_ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> weights,
                         SafetensorsFile::Open(weights_path));
  try {
    DYSCO_RETURN_IF_ERROR(
        BindWeights(impl->module, impl->config, weights, model_path, impl->device));
  } catch (const c10::Error& e) {
    return InternalError(weights_path +
                         ": binding the weights failed: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError(weights_path + ": binding the weights failed: " + e.what());
  }
  if (options.native_cpu_decode && impl->device.is_cpu()) {
    // After the binding: the parameters are the weights' tensors by now.
    impl->native_decode = Impl::NativeDecode::From(impl->module, impl->config.num_layers);
    if (impl->native_decode != nullptr) {
      try {
        impl->native_decode->BuildRopeTable(impl->config.max_position_embeddings);
      } catch (const c10::Error&) {
        // No table (BuildRopeTable sets it only once built): the step computes its rows as the
        // TorchScript code does.
      }
    }
  }
  return std::unique_ptr<ModelRunner>(new ModelRunner(std::move(impl)));
}

ModelRunner::ModelRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelRunner::~ModelRunner() = default;

const ModelConfig& ModelRunner::config() const { return impl_->config; }
const std::string& ModelRunner::package_dir() const { return impl_->package_dir; }
const std::string& ModelRunner::device() const { return impl_->device_name; }

int ModelRunner::cpu_threads() const { return impl_->cpu_threads; }

ModelRunner::CudaGraphStats ModelRunner::cuda_graph_stats() const {
  MutexLock lock(&impl_->mu);
  return impl_->stats;
}

Status ModelRunner::Impl::Validate(const ForwardBatch& batch) const {
  const ModelConfig& c = config;
  if (batch.sequences.empty()) return InvalidArgumentError("step batch has no sequences");
  if (batch.kv_pool == nullptr) return InvalidArgumentError("step batch has no kv_pool");
  const ModelConfig& pc = batch.kv_pool->config();
  if (pc.num_layers != c.num_layers || pc.num_kv_heads != c.num_kv_heads ||
      pc.head_dim != c.head_dim || pc.dtype != c.dtype) {
    return InvalidArgumentError(
        "kv_pool was built for another model shape (layers/kv heads/head_dim/dtype)");
  }
  // The ops take the cache as it is: a pool on another device than the module would fail deep
  // inside the model (or, CPU cache with CUDA inputs, read host memory as device memory).
  if (batch.kv_pool->kv_cache().device() != device) {
    return InvalidArgumentError("kv_pool is on " + batch.kv_pool->kv_cache().device().str() +
                                ", the model on " + device.str());
  }
  if (batch.last_layer < -1 || batch.last_layer >= c.num_layers) {
    return InvalidArgumentError("last_layer must be in [-1, " + std::to_string(c.num_layers - 1) +
                                "], got " + std::to_string(batch.last_layer));
  }
  const int top_layer = batch.last_layer < 0 ? c.num_layers - 1 : batch.last_layer;
  for (size_t h = 0; h < batch.probe_heads.size(); ++h) {
    const auto& [layer, head] = batch.probe_heads[h];
    if (layer < 0 || layer > top_layer || head < 0 || head >= c.num_attention_heads) {
      return InvalidArgumentError(
          "probe_heads[" + std::to_string(h) + "] = (" + std::to_string(layer) + ", " +
          std::to_string(head) + ") is out of range (layers 0.." + std::to_string(top_layer) +
          " run, " + std::to_string(c.num_attention_heads) + " query heads)");
    }
  }
  if (!batch.probe_mean_heads.empty()) {
    if (batch.probe_mean_heads.size() != batch.sequences.size()) {
      return InvalidArgumentError("probe_mean_heads has " +
                                  std::to_string(batch.probe_mean_heads.size()) + " lists for " +
                                  std::to_string(batch.sequences.size()) + " sequences");
    }
    for (size_t i = 0; i < batch.probe_mean_heads.size(); ++i) {
      for (int k : batch.probe_mean_heads[i]) {
        if (k < 0 || k >= static_cast<int>(batch.probe_heads.size())) {
          return InvalidArgumentError("probe_mean_heads[" + std::to_string(i) + "] has index " +
                                      std::to_string(k) + ", outside the " +
                                      std::to_string(batch.probe_heads.size()) + " probe_heads");
        }
      }
    }
  }
  const int64_t page_size = batch.kv_pool->page_size();
  const int64_t num_pages = batch.kv_pool->num_pages_in_tensor();
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    DYSCO_RETURN_IF_ERROR(ValidateRow(batch.sequences[i], i, page_size, num_pages));
  }
  return OkStatus();
}

Status ModelRunner::Impl::ValidateRow(const ForwardRow& s, size_t i, int64_t page_size,
                                      int64_t num_pages) const {
  const ModelConfig& c = config;
  if (s.token_ids.empty()) return InvalidArgumentError(Seq(i) + ".token_ids is empty");
  for (int32_t t : s.token_ids) {
    if (t < 0 || t >= c.vocab_size) {
      return InvalidArgumentError(Seq(i) + ".token_ids has id " + std::to_string(t) +
                                  " outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                                  ")");
    }
  }
  if (s.start_position < 0) return InvalidArgumentError(Seq(i) + ".start_position is negative");
  const int64_t seq_len = s.start_position + static_cast<int64_t>(s.token_ids.size);
  if (seq_len > c.max_position_embeddings) {
    return OutOfRangeError(Seq(i) + " would reach " + std::to_string(seq_len) +
                           " tokens, past max_position_embeddings " +
                           std::to_string(c.max_position_embeddings));
  }
  if (static_cast<int64_t>(s.page_ids.size) * page_size < seq_len) {
    return InvalidArgumentError(Seq(i) + ".page_ids: " + std::to_string(s.page_ids.size) +
                                " pages cannot hold " + std::to_string(seq_len) + " tokens");
  }
  const int64_t pages_used = (seq_len + page_size - 1) / page_size;
  for (int64_t p = 0; p < pages_used; ++p) {
    if (s.page_ids[p] < 0 || s.page_ids[p] >= num_pages) {
      return InvalidArgumentError(Seq(i) + ".page_ids[" + std::to_string(p) + "] = " +
                                  std::to_string(s.page_ids[p]) + " is not a page of the pool");
    }
  }
  if (!s.key_bias.empty() && static_cast<int64_t>(s.key_bias.size) < seq_len) {
    return InvalidArgumentError(Seq(i) + ".key_bias has " + std::to_string(s.key_bias.size) +
                                " entries, fewer than the " + std::to_string(seq_len) +
                                " context tokens");
  }
  if (s.key_bias_device != nullptr) {
    const at::Tensor& t = s.key_bias_device->tensor;
    if (!s.key_bias.empty()) {
      return InvalidArgumentError(Seq(i) + " has both key_bias and key_bias_device");
    }
    if (!IsOnDevice(t, device) || t.scalar_type() != at::kFloat || t.dim() != 1 ||
        t.size(0) < seq_len) {
      return InvalidArgumentError(
          Seq(i) + ".key_bias_device is " +
          (t.defined() ? c10::str(t.scalar_type(), " ", t.sizes(), " on ", t.device())
                       : std::string("undefined")) +
          ", expected float [>= " + std::to_string(seq_len) + "] on " + device.str());
    }
  }
  return OkStatus();
}

void ModelRunner::Impl::PackLocked(const ForwardBatch& batch) {
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  const int64_t page_size = batch.kv_pool->page_size();
  token_ids.clear();
  positions.clear();
  slot_mapping.clear();
  query_start_loc.assign(1, 0);
  seq_lens.clear();
  max_seq_len = 0;
  max_pages = 0;
  any_bias = false;
  for (const ForwardRow& s : batch.sequences) {
    const int64_t n = static_cast<int64_t>(s.token_ids.size);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = s.start_position + j;
      token_ids.push_back(s.token_ids[j]);
      positions.push_back(pos);
      slot_mapping.push_back(int64_t{s.page_ids[pos / page_size]} * page_size + pos % page_size);
    }
    query_start_loc.push_back(query_start_loc.back() + n);
    const int64_t len = s.start_position + n;
    seq_lens.push_back(len);
    max_seq_len = std::max(max_seq_len, len);
    max_pages = std::max(max_pages, (len + page_size - 1) / page_size);
    any_bias = any_bias || s.has_key_bias();
  }
  // Rows are padded with the padding page (0); the ops ignore entries past a sequence's length.
  block_tables.assign(static_cast<size_t>(B * max_pages), 0);
  for (int64_t b = 0; b < B; ++b) {
    const ForwardRow& s = batch.sequences[b];
    const int64_t used = (seq_lens[b] + page_size - 1) / page_size;
    std::copy(s.page_ids.begin(), s.page_ids.begin() + used, block_tables.begin() + b * max_pages);
  }
  // The key biases are packed where they are used: InputsLocked (eager) into attn_bias,
  // FillGraphInputsLocked straight into the graph's pinned inputs (at 128K keys each pass over a
  // [B, S] float buffer is ~0.05 ms of the host's time between the DySCO passes).
  probe_order.resize(batch.probe_heads.size());
  for (size_t h = 0; h < probe_order.size(); ++h) probe_order[h] = h;
  std::stable_sort(probe_order.begin(), probe_order.end(), [&](size_t x, size_t y) {
    return batch.probe_heads[x].first < batch.probe_heads[y].first;
  });
  probes_reordered = false;
  probe_layers.clear();
  probe_heads.clear();
  for (size_t k = 0; k < probe_order.size(); ++k) {
    probes_reordered = probes_reordered || probe_order[k] != k;
    probe_layers.push_back(batch.probe_heads[probe_order[k]].first);
    probe_heads.push_back(batch.probe_heads[probe_order[k]].second);
  }
}

namespace {

// Copies each row's ForwardRow::key_bias_device (DySCO's selection output) into row b of `bias`
// ([>= B, >= seq_len] on the same device), keys 0 .. seq_lens[b] - 1, queued on the current
// stream: the rows whose bias is on the device already never cross to the host.
void CopyDeviceKeyBiases(const ForwardBatch& batch, const std::vector<int64_t>& seq_lens,
                         const at::Tensor& bias) {
  for (size_t b = 0; b < batch.sequences.size(); ++b) {
    const ForwardRow& row = batch.sequences[b];
    if (row.key_bias_device == nullptr) continue;
    const int64_t len = seq_lens[b];
    bias.select(0, static_cast<int64_t>(b))
        .narrow(0, 0, len)
        .copy_(row.key_bias_device->tensor.narrow(0, 0, len), /*non_blocking=*/true);
  }
}

}  // namespace

std::vector<c10::IValue> ModelRunner::Impl::InputsLocked(const ForwardBatch& batch) {
  // from_blob views the staging buffers without a copy; .to() is a no-op on CPU and a synchronous
  // host-to-device copy (pageable memory) on CUDA, so the buffers may be reused right after.
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  const int64_t T = static_cast<int64_t>(token_ids.size());
  auto view = [&](void* data, at::IntArrayRef sizes, at::ScalarType type) {
    return torch::from_blob(data, sizes, torch::TensorOptions().dtype(type)).to(device);
  };
  std::vector<c10::IValue> inputs;
  inputs.reserve(10);
  inputs.emplace_back(view(token_ids.data(), {T}, at::kLong));
  inputs.emplace_back(view(positions.data(), {T}, at::kLong));
  inputs.emplace_back(view(query_start_loc.data(), {B + 1}, at::kLong));
  inputs.emplace_back(view(seq_lens.data(), {B}, at::kLong));
  inputs.emplace_back(view(slot_mapping.data(), {T}, at::kLong));
  inputs.emplace_back(view(block_tables.data(), {B, max_pages}, at::kInt));
  inputs.emplace_back(batch.kv_pool->kv_cache());
  if (any_bias) {
    attn_bias.assign(static_cast<size_t>(B * max_seq_len), 0.0f);
    for (int64_t b = 0; b < B; ++b) {
      const ForwardRow& s = batch.sequences[b];
      if (!s.key_bias.empty()) {
        std::copy(s.key_bias.begin(), s.key_bias.begin() + seq_lens[b],
                  attn_bias.begin() + b * max_seq_len);
      }
    }
    at::Tensor bias = view(attn_bias.data(), {B, max_seq_len}, at::kFloat);
    CopyDeviceKeyBiases(batch, seq_lens, bias);
    inputs.emplace_back(bias);
  } else {
    inputs.emplace_back(c10::IValue());
  }
  inputs.emplace_back(static_cast<int64_t>(batch.last_layer));
  inputs.emplace_back(c10::List<int64_t>(probe_layers));
  if (!probe_heads.empty()) {
    inputs.emplace_back(
        view(probe_heads.data(), {static_cast<int64_t>(probe_heads.size())}, at::kLong));
  } else {
    inputs.emplace_back(c10::IValue());
  }
  return inputs;
}

namespace {

// Unpacks the module's (logits, probs) result.
Status UnpackResult(const c10::IValue& result, at::Tensor* logits, at::Tensor* probs) {
  if (!result.isTuple() || result.toTupleRef().elements().size() != 2) {
    return InternalError("model forward must return a (logits, probs) tuple");
  }
  *logits = result.toTupleRef().elements()[0].toTensor();
  *probs = result.toTupleRef().elements()[1].toTensor();
  return OkStatus();
}

}  // namespace

Status ModelRunner::Impl::ReadOutputsLocked(const ForwardBatch& batch, const at::Tensor& logits,
                                            const at::Tensor& probs, ForwardOutput* out) {
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  out->batch_size = B;
  // These copies are the step's one read back to the host (on CUDA, it waits for the step).
  if (logits.numel() == 0) {
    out->vocab_size = 0;
    out->logits.clear();
    out->greedy_tokens.clear();
  } else {
    if (logits.dim() != 2 || logits.size(0) < B || logits.size(1) != config.vocab_size) {
      return InternalError("model returned logits of shape " + c10::str(logits.sizes()) +
                           ", expected [" + std::to_string(B) + ", " +
                           std::to_string(config.vocab_size) + "]");
    }
    out->vocab_size = config.vocab_size;
    if (batch.logits_to_host) {
      out->greedy_tokens.clear();
      CopyToHost(logits.narrow(0, 0, B), &out->logits);
    } else {
      out->logits.clear();
      ReadGreedyTokens(logits.narrow(0, 0, B), &out->greedy_tokens);
    }
  }
  const int64_t H = static_cast<int64_t>(batch.probe_heads.size());
  if (probs.dim() != 3 || probs.size(0) < B || probs.size(1) != H ||
      (H > 0 && probs.size(2) < max_seq_len)) {
    return InternalError("model returned probs of shape " + c10::str(probs.sizes()) +
                         ", expected [" + std::to_string(B) + ", " + std::to_string(H) +
                         ", >= " + std::to_string(max_seq_len) + "]");
  }
  // The model's probs span the block tables' capacity (pages x page size); ForwardOutput's span
  // the batch's longest sequence, as before.
  out->num_probe_heads = H;
  out->probs_len = max_seq_len;
  out->probe_mean.clear();
  out->probe_mean_device.reset();
  if (!batch.probe_mean_heads.empty()) {
    out->probs.clear();
    ReadProbeMeanLocked(batch, probs, out);
  } else if (H > 0 && !probes_reordered) {
    CopyToHost(probs.narrow(0, 0, B).narrow(2, 0, max_seq_len), &out->probs);
  } else if (H > 0) {
    // Back to the batch's probe order: row k of the model's probs is probe probe_order[k].
    CopyToHost(probs.narrow(0, 0, B).narrow(2, 0, max_seq_len), &probs_scratch);
    out->probs.resize(probs_scratch.size());
    const size_t row = static_cast<size_t>(max_seq_len), nh = static_cast<size_t>(H);
    for (size_t b = 0; b < static_cast<size_t>(B); ++b) {
      for (size_t k = 0; k < nh; ++k) {
        const float* from = probs_scratch.data() + (b * nh + k) * row;
        std::copy(from, from + row, out->probs.data() + (b * nh + probe_order[k]) * row);
      }
    }
  } else {
    out->probs.clear();
  }
  return OkStatus();
}

void ModelRunner::Impl::ReadProbeMeanLocked(const ForwardBatch& batch, const at::Tensor& probs,
                                            ForwardOutput* out) {
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  // Row k of the model's probs is the batch's probe probe_order[k].
  std::vector<int64_t> model_index(probe_order.size());
  for (size_t k = 0; k < probe_order.size(); ++k) model_index[probe_order[k]] = int64_t(k);
  // Every row with the same heads (one DySCO configuration: always at batch 1): the mean in one
  // dysco_probe_mean call, the bits of the loop below, one kernel on a GPU instead of H + 2
  // (docs/dysco.md "Ops"). DYSCO_PROBE_MEAN_OP=0: the loop below instead (A/B timing).
  const std::vector<int>& first_heads = batch.probe_mean_heads[0];
  static const bool use_op = [] {
    const char* knob = std::getenv("DYSCO_PROBE_MEAN_OP");
    return knob == nullptr || std::string(knob) != "0";
  }();
  bool uniform = use_op && !first_heads.empty() &&
                 static_cast<int64_t>(first_heads.size()) <= kMaxProbeMeanHeads &&
                 probs.scalar_type() == at::kFloat && probs.is_contiguous();
  for (int64_t b = 1; b < B && uniform; ++b) uniform = batch.probe_mean_heads[b] == first_heads;
  if (uniform) {
    std::vector<int64_t> rows;
    for (const int h : first_heads) rows.push_back(model_index[h]);
    at::Tensor mean = at::empty({B, max_seq_len}, probs.options());
    ops::dysco_probe_mean(mean, probs, rows);
    if (batch.probe_mean_on_device && mean.is_cuda()) {
      out->probe_mean_device = std::make_shared<const DeviceTensor>(DeviceTensor{mean});
      return;
    }
    CopyToHost(mean, &out->probe_mean);
    return;
  }
  const at::Tensor p = probs.narrow(0, 0, B).narrow(2, 0, max_seq_len);
  at::Tensor mean = at::zeros({B, max_seq_len}, p.options().dtype(at::kFloat));
  // Rows with the same head list (every row of one DySCO configuration) are reduced together:
  // count element-wise kernels for the group instead of count per row. Each kernel is an fp32
  // add (or the final multiply) element by element, the order of the host loop this replaced,
  // so the CPU result is bit for bit what it was.
  std::vector<bool> done(static_cast<size_t>(B), false);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int>& heads = batch.probe_mean_heads[b];
    if (done[b] || heads.empty()) continue;
    std::vector<int64_t> rows;
    for (int64_t r = b; r < B; ++r) {
      if (!done[r] && batch.probe_mean_heads[r] == heads) {
        rows.push_back(r);
        done[r] = true;
      }
    }
    const bool all_rows = static_cast<int64_t>(rows.size()) == B;
    at::Tensor index;
    at::Tensor group = p;
    if (!all_rows) {
      index = at::tensor(rows, at::kLong).to(p.device());
      group = p.index_select(0, index);
    }
    at::Tensor acc = group.select(1, model_index[heads[0]]).to(at::kFloat).clone();
    for (size_t h = 1; h < heads.size(); ++h) acc.add_(group.select(1, model_index[heads[h]]));
    acc.mul_(static_cast<double>(1.0f / static_cast<float>(heads.size())));
    if (all_rows) {
      mean = acc;
    } else {
      mean.index_copy_(0, index, acc);
    }
  }
  if (batch.probe_mean_on_device && mean.is_cuda()) {
    out->probe_mean_device = std::make_shared<const DeviceTensor>(DeviceTensor{mean});
    return;
  }
  CopyToHost(mean, &out->probe_mean);
}

#ifdef DYSCO_CUDA_GRAPHS
DecodeGraph* ModelRunner::Impl::GraphForLocked(const ForwardBatch& batch) {
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  if (!cuda_graphs || static_cast<int64_t>(token_ids.size()) != B) return nullptr;  // not decode
  GraphKey key;
  key.batch = RoundUpToPowerOfTwo(B);
  if (key.batch > RoundUpToPowerOfTwo(cuda_graph_max_batch)) return nullptr;
  // A power-of-two width fixes the decode kernels' split count (it depends on width x page size).
  key.pages = RoundUpToPowerOfTwo(max_pages);
  key.last_layer = batch.last_layer;
  key.bias = any_bias;
  key.probes = batch.probe_heads;
  key.kv_cache = batch.kv_pool->kv_cache().data_ptr();
  key.kv_pages = batch.kv_pool->num_pages_in_tensor();
  if (graphs->kv_cache != key.kv_cache) {
    graphs->by_key.clear();
    graphs->kv_cache = key.kv_cache;
  }
  auto it = graphs->by_key.find(key);
  if (it != graphs->by_key.end()) {
    if (it->second != nullptr) FillGraphInputsLocked(batch, key, it->second.get());
    return it->second.get();
  }

  // A new bucket: its input buffers (int64 sections, then the int32 block tables, then the fp32
  // bias), 16-byte aligned sections.
  auto g = std::make_unique<DecodeGraph>();
  const int64_t Bp = key.batch, H = static_cast<int64_t>(key.probes.size());
  const int64_t S = key.pages * batch.kv_pool->page_size();
  int64_t off = 0;
  auto section = [&](int64_t bytes) {
    const int64_t at = off;
    off = AlignUp(off + bytes, 16);
    return at;
  };
  g->off_token_ids = section(Bp * 8);
  g->off_positions = section(Bp * 8);
  g->off_query_start_loc = section((Bp + 1) * 8);
  g->off_seq_lens = section(Bp * 8);
  g->off_slot_mapping = section(Bp * 8);
  g->off_probe_heads = section(H * 8);
  g->off_block_tables = section(Bp * key.pages * 4);
  g->off_attn_bias = section(key.bias ? Bp * S * 4 : 0);
  const int64_t bytes = std::max<int64_t>(off, 16);
  g->host = at::zeros({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  g->device = at::zeros({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  auto view = [&](int64_t at_byte, at::IntArrayRef sizes, at::ScalarType type) {
    int64_t n = 1;
    for (int64_t d : sizes) n *= d;
    return g->device.narrow(0, at_byte, n * static_cast<int64_t>(c10::elementSize(type)))
        .view(type)
        .view(sizes);
  };
  g->inputs.reserve(11);
  g->inputs.emplace_back(view(g->off_token_ids, {Bp}, at::kLong));
  g->inputs.emplace_back(view(g->off_positions, {Bp}, at::kLong));
  g->inputs.emplace_back(view(g->off_query_start_loc, {Bp + 1}, at::kLong));
  g->inputs.emplace_back(view(g->off_seq_lens, {Bp}, at::kLong));
  g->inputs.emplace_back(view(g->off_slot_mapping, {Bp}, at::kLong));
  g->inputs.emplace_back(view(g->off_block_tables, {Bp, key.pages}, at::kInt));
  g->inputs.emplace_back(batch.kv_pool->kv_cache());
  if (key.bias) {
    g->inputs.emplace_back(view(g->off_attn_bias, {Bp, S}, at::kFloat));
  } else {
    g->inputs.emplace_back(c10::IValue());
  }
  g->inputs.emplace_back(static_cast<int64_t>(key.last_layer));
  g->inputs.emplace_back(c10::List<int64_t>(probe_layers));
  if (H > 0) {
    g->inputs.emplace_back(view(g->off_probe_heads, {H}, at::kLong));
  } else {
    g->inputs.emplace_back(c10::IValue());
  }
  FillGraphInputsLocked(batch, key, g.get());
  if (!CaptureLocked(key, g.get())) g.reset();
  DecodeGraph* result = g.get();
  graphs->by_key.emplace(key, std::move(g));
  return result;
}

void ModelRunner::Impl::FillGraphInputsLocked(const ForwardBatch& batch, const GraphKey& key,
                                              DecodeGraph* g) {
  // The previous step's copy out of `host` must be done before it is rewritten (a step with no
  // outputs to read, e.g. a speculative pass without probes, does not wait for its copy).
  g->copied.synchronize();
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  const int64_t Bp = key.batch, P = key.pages;
  const int64_t S = P * batch.kv_pool->page_size();
  uint8_t* base = g->host.data_ptr<uint8_t>();
  auto* tokens = reinterpret_cast<int64_t*>(base + g->off_token_ids);
  auto* pos = reinterpret_cast<int64_t*>(base + g->off_positions);
  auto* qsl = reinterpret_cast<int64_t*>(base + g->off_query_start_loc);
  auto* lens = reinterpret_cast<int64_t*>(base + g->off_seq_lens);
  auto* slots = reinterpret_cast<int64_t*>(base + g->off_slot_mapping);
  auto* heads = reinterpret_cast<int64_t*>(base + g->off_probe_heads);
  auto* tables = reinterpret_cast<int32_t*>(base + g->off_block_tables);
  auto* bias = reinterpret_cast<float*>(base + g->off_attn_bias);
  // Padding rows: token 0 at position 0 of a one-token sequence on the padding page (page 0,
  // which the pool reserves: they write their K/V there and attend to it; their outputs are not
  // read). Without a reserved page they write nothing (slot -1) and read page 0's slot 0 as it is.
  const bool padding_page = batch.kv_pool->num_pages_in_tensor() > batch.kv_pool->num_total();
  for (int64_t b = 0; b < Bp; ++b) {
    const bool real = b < B;
    tokens[b] = real ? token_ids[b] : 0;
    pos[b] = real ? positions[b] : 0;
    lens[b] = real ? seq_lens[b] : 1;
    slots[b] = real ? slot_mapping[b] : (padding_page ? 0 : -1);
    qsl[b] = b;
    int32_t* row = tables + b * P;
    if (real) {
      std::copy(block_tables.begin() + b * max_pages, block_tables.begin() + (b + 1) * max_pages,
                row);
      std::fill(row + max_pages, row + P, 0);
    } else {
      std::fill(row, row + P, 0);
    }
    if (key.bias) {
      // Only keys 0 .. seq_len - 1 are read: the rest of a row keeps what it held.
      float* bias_row = bias + b * S;
      if (real) {
        const ConstSpan<float>& row_bias = batch.sequences[b].key_bias;
        if (batch.sequences[b].key_bias_device != nullptr) {
          // Copied on the device below.
        } else if (row_bias.empty()) {
          std::fill(bias_row, bias_row + seq_lens[b], 0.0f);
        } else {
          std::copy(row_bias.begin(), row_bias.begin() + seq_lens[b], bias_row);
        }
      } else {
        bias_row[0] = 0.0f;
      }
    }
  }
  qsl[Bp] = Bp;
  std::copy(probe_heads.begin(), probe_heads.end(), heads);
  g->device.copy_(g->host, /*non_blocking=*/true);
  g->copied.record(c10::cuda::getCurrentCUDAStream(device.index()));
  if (key.bias) {
    // After the inputs' copy, in the stream's order, ahead of the replay.
    CopyDeviceKeyBiases(
        batch, seq_lens,
        g->device.narrow(0, g->off_attn_bias, Bp * S * 4).view(at::kFloat).view({Bp, S}));
  }
}

bool ModelRunner::Impl::CaptureLocked(const GraphKey& key, DecodeGraph* g) {
  const auto t0 = std::chrono::steady_clock::now();
  const c10::DeviceIndex index = device.index();
  int64_t growth = 0;  // of the allocator's reserved bytes during the capture: the graph pool's
  c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(index);
  c10::cuda::CUDAStream side = graphs->capture_stream;
  std::string error;
  {
    // The side stream starts after the inputs' copy and every earlier step on `current`.
    c10::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    c10::cuda::CUDAStreamGuard guard(side);
    try {
      // Warm-up on the capture stream: the interpreter's plan, cuBLAS's workspace for the stream
      // and the allocator's blocks exist before the capture. It writes the same K/V as the
      // replay that follows.
      module.forward(g->inputs);
      side.synchronize();
      const int64_t reserved_before = ReservedBytes(index);
      g->graph.capture_begin(graphs->pool, cudaStreamCaptureModeThreadLocal);
      c10::IValue result;
      try {
        result = module.forward(g->inputs);
      } catch (...) {
        try {
          g->graph.capture_end();
        } catch (...) {  // the capture is invalid anyway: the forward's error is the one to report
        }
        throw;
      }
      g->graph.capture_end();
      growth = ReservedBytes(index) - reserved_before;
      const Status unpacked = UnpackResult(result, &g->logits, &g->probs);
      if (!unpacked.ok()) error = unpacked.message();
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    }
    side.synchronize();
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!error.empty()) {
    if (log_info) log_info("cuda_graph_capture_failed " + key.ToString() + " error=" + error);
    return false;
  }
  g->captured = true;
  ++stats.graphs;
  stats.pool_bytes += growth;
  if (log_info) {
    char line[128];
    std::snprintf(
        line, sizeof(line), " capture_ms=%.1f pool_mb=%.1f graphs=%lld total_pool_mb=%.1f", ms,
        growth / 1048576.0, static_cast<long long>(stats.graphs), stats.pool_bytes / 1048576.0);
    log_info("cuda_graph_captured " + key.ToString() + line);
  }
  return true;
}
#endif  // DYSCO_CUDA_GRAPHS

Status ModelRunner::Impl::RunLocked(const ForwardBatch& batch, ForwardOutput* out) {
#ifdef DYSCO_CUDA_GRAPHS
  const auto start = std::chrono::steady_clock::now();
#endif
  PackLocked(batch);
  if (failpoint_token &&
      std::find(token_ids.begin(), token_ids.end(), *failpoint_token) != token_ids.end()) {
    // Thrown where an op would throw: the same path as a real failure inside the model.
    throw std::runtime_error("failpoint: a forward fed token " + std::to_string(*failpoint_token));
  }
#ifdef DYSCO_CUDA_GRAPHS
  if (cuda_graphs) {
    c10::cuda::CUDAGuard guard(device);
    if (DecodeGraph* g = GraphForLocked(batch)) {
      using Clock = std::chrono::steady_clock;
      const auto staged = Clock::now();
      g->graph.replay();
      const auto replayed = Clock::now();
      ++stats.replays;
      const Status status = ReadOutputsLocked(batch, g->logits, g->probs, out);
      const auto read = Clock::now();
      stats.prepare_seconds += std::chrono::duration<double>(staged - start).count();
      stats.replay_seconds += std::chrono::duration<double>(replayed - staged).count();
      stats.read_seconds += std::chrono::duration<double>(read - replayed).count();
      return status;
    }
  }
#endif
  ++stats.eager_forwards;
  at::Tensor logits, probs;
  if (IsNativeDecodeStep(batch)) {
    ++stats.native_decode_forwards;
    std::tie(logits, probs) = NativeDecodeForward(InputsLocked(batch));
    return ReadOutputsLocked(batch, logits, probs, out);
  }
  std::vector<c10::IValue> inputs = InputsLocked(batch);
  // The CUDA prefill plans its cuDNN calls from these host copies instead of reading the device
  // tensors back a layer (kernels/op_calls.h; docs/gpu.md "Prefill without a read-back a
  // layer"). Both tensors were just made from these vectors and stay in `inputs` for the forward.
  const ops::ScopedHostLengths host_lengths(inputs[2].toTensor(), inputs[3].toTensor(),
                                            query_start_loc, seq_lens);
  DYSCO_RETURN_IF_ERROR(UnpackResult(module.forward(inputs), &logits, &probs));
  return ReadOutputsLocked(batch, logits, probs, out);
}

bool ModelRunner::Impl::IsNativeDecodeStep(const ForwardBatch& batch) const {
  if (native_decode == nullptr || batch.last_layer >= 0 || !batch.probe_heads.empty()) {
    return false;
  }
  for (const ForwardRow& row : batch.sequences) {
    if (row.token_ids.size != 1) return false;
  }
  return true;
}

// DecoderModel.forward and DecoderLayer.forward (tools/dysco_export/model.py) for a decode step
// of all layers without probes: the same ops and ATen calls in the same order, so the same bits.
// Each op's output is allocated as the TorchScript code allocates it.
std::pair<at::Tensor, at::Tensor> ModelRunner::Impl::NativeDecodeForward(
    const std::vector<c10::IValue>& inputs) {
  const NativeDecode& n = *native_decode;
  const at::Tensor& token_ids = inputs[0].toTensor();
  const at::Tensor& positions = inputs[1].toTensor();
  const at::Tensor& seq_lens = inputs[3].toTensor();
  const at::Tensor& slot_mapping = inputs[4].toTensor();
  const at::Tensor& block_tables = inputs[5].toTensor();
  const at::Tensor& kv_cache = inputs[6].toTensor();
  c10::optional<at::Tensor> attn_bias;
  if (!inputs[7].isNone()) attn_bias = inputs[7].toTensor();
  const int64_t batch = seq_lens.size(0);
  const int64_t probs_len = block_tables.size(1) * kv_cache.size(3);

  at::Tensor cos;
  at::Tensor sin;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t table_rows = n.rope_cos.defined() ? n.rope_cos.size(0) : 0;
  const bool in_table = std::all_of(pos, pos + positions.numel(),
                                    [&](int64_t p) { return p >= 0 && p < table_rows; });
  if (in_table && batch == 1) {
    cos = n.rope_cos.narrow(0, pos[0], 1);
    sin = n.rope_sin.narrow(0, pos[0], 1);
  } else if (in_table) {
    cos = n.rope_cos.index_select(0, positions);
    sin = n.rope_sin.index_select(0, positions);
  } else {
    std::tie(cos, sin) = n.RopeOf(positions);
  }
  // One row is a view of the table (the layers read h and never write it); more rows are gathered.
  at::Tensor h = batch == 1 ? n.embed_tokens.narrow(0, token_ids.data_ptr<int64_t>()[0], 1)
                            : at::embedding(n.embed_tokens, token_ids);
  at::Tensor pending;  // the last layer's MLP output, added by the next norm
  for (size_t i = 0; i < n.layers.size(); ++i) {
    const NativeDecode::Layer& w = n.layers[i];
    const at::Tensor kv_layer = kv_cache[static_cast<int64_t>(i)];
    at::Tensor qkv = at::empty({batch, w.qkv_proj.size(0)}, h.options());
    if (!pending.defined()) {
      at::Tensor x = at::empty_like(h);
      ops::rms_norm(x, h, w.input_layernorm, n.eps);
      ops::linear(qkv, x, w.qkv_proj);
    } else {
      at::Tensor total = at::empty_like(h);
      ops::add_rms_norm_linear(qkv, total, pending, h, w.input_layernorm, n.eps, w.qkv_proj);
      h = total;
    }
    at::Tensor q = at::empty({batch, w.num_heads, w.head_dim}, qkv.options());
    at::Tensor attn = at::empty_like(q);
    ops::qk_norm_rope_attention_decode(attn, q, kv_layer, qkv, cos, sin, slot_mapping, w.q_norm,
                                       w.k_norm, n.eps, block_tables, seq_lens, w.scale, attn_bias);
    at::Tensor total = at::empty_like(h);
    pending = at::empty_like(h);
    ops::o_proj_mlp(pending, total, attn.view({batch, w.num_heads * w.head_dim}), h, w.o_proj,
                    w.post_attention_layernorm, n.eps, w.gate_up_proj, w.down_proj);
    h = total;
  }
  at::Tensor total = at::empty_like(h);
  at::Tensor logits = at::empty({batch, n.lm_head.size(0)}, h.options());
  ops::add_rms_norm_linear(logits, total, pending, h, n.norm, n.eps, n.lm_head);
  return {logits.to(at::kFloat),
          at::zeros({batch, 0, probs_len}, kv_cache.options().dtype(at::kFloat))};
}

bool ModelRunner::Impl::IsMixedBiasStep(const ForwardBatch& batch) const {
  if (!split_mixed_bias) return false;
  bool biased = false;
  bool unbiased_chunk = false;
  for (const ForwardRow& row : batch.sequences) {
    biased = biased || row.has_key_bias();
    unbiased_chunk = unbiased_chunk || (!row.has_key_bias() && row.token_ids.size > 1);
  }
  return biased && unbiased_chunk;
}

Status ModelRunner::Impl::RunSplitLocked(const ForwardBatch& batch, ForwardOutput* out) {
  ForwardBatch parts[2];
  std::vector<size_t> rows[2];  // the batch's row index of each part's rows
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    const int part = batch.sequences[i].has_key_bias() ? 0 : 1;
    parts[part].sequences.push_back(batch.sequences[i]);
    if (!batch.probe_mean_heads.empty()) {
      parts[part].probe_mean_heads.push_back(batch.probe_mean_heads[i]);
    }
    rows[part].push_back(i);
  }
  ForwardOutput outs[2];
  for (int part = 0; part < 2; ++part) {
    parts[part].kv_pool = batch.kv_pool;
    parts[part].last_layer = batch.last_layer;
    parts[part].probe_heads = batch.probe_heads;
    // The parts' head means are merged on the host below.
    parts[part].probe_mean_on_device = false;
    parts[part].logits_to_host = batch.logits_to_host;
    DYSCO_RETURN_IF_ERROR(RunLocked(parts[part], &outs[part]));
  }
  const int64_t B = static_cast<int64_t>(batch.sequences.size());
  out->batch_size = B;
  out->vocab_size = outs[0].vocab_size;
  const bool greedy = out->vocab_size > 0 && !batch.logits_to_host;
  out->logits.assign(greedy ? 0 : static_cast<size_t>(B * out->vocab_size), 0.0f);
  out->greedy_tokens.assign(greedy ? static_cast<size_t>(B) : 0, 0);
  out->num_probe_heads = outs[0].num_probe_heads;
  out->probs_len = std::max(outs[0].probs_len, outs[1].probs_len);
  const int64_t H = out->num_probe_heads;
  const bool means = !batch.probe_mean_heads.empty();
  out->probs.assign(means ? 0 : static_cast<size_t>(B * H * out->probs_len), 0.0f);
  out->probe_mean.assign(means ? static_cast<size_t>(B * out->probs_len) : 0, 0.0f);
  out->probe_mean_device.reset();
  for (int part = 0; part < 2; ++part) {
    const ForwardOutput& o = outs[part];
    for (size_t r = 0; r < rows[part].size(); ++r) {
      const int64_t b = static_cast<int64_t>(rows[part][r]);
      if (greedy) {
        out->greedy_tokens[static_cast<size_t>(b)] = o.greedy_tokens[r];
      } else if (out->vocab_size > 0) {
        std::copy(o.logits_row(static_cast<int64_t>(r)),
                  o.logits_row(static_cast<int64_t>(r)) + out->vocab_size,
                  out->logits.begin() + b * out->vocab_size);
      }
      if (means) {
        const float* src = o.probe_mean_row(static_cast<int64_t>(r));
        std::copy(src, src + o.probs_len, out->probe_mean.begin() + b * out->probs_len);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* src = o.probs_row(static_cast<int64_t>(r), h);
        std::copy(src, src + o.probs_len, out->probs.begin() + (b * H + h) * out->probs_len);
      }
    }
  }
  return OkStatus();
}

Status ModelRunner::Forward(const ForwardBatch& batch, ForwardOutput* out) {
  DYSCO_RETURN_IF_ERROR(impl_->Validate(batch));
  MutexLock lock(&impl_->mu);
  try {
    // TorchScript's executor optimisation flag is thread-local: Load set it on its own thread;
    // the forward may run on another (the scheduler's), which would otherwise profile and
    // re-specialise (and, on CUDA, a captured step must run the unoptimised plan).
    torch::jit::setGraphExecutorOptimize(impl_->jit_optimize);
    c10::InferenceMode inference_mode;
    if (impl_->IsMixedBiasStep(batch)) return impl_->RunSplitLocked(batch, out);
    return impl_->RunLocked(batch, out);
  } catch (const c10::Error& e) {
    return InternalError(std::string("model forward failed: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError(std::string("model forward failed: ") + e.what());
  }
}

}  // namespace dysco
