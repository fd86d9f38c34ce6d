// ModelRunner: loads a model package (config.json, TorchScript model.pt whose parameters are bound
// at load to the tensors of weights.safetensors: docs/model-interface.md) and runs one forward step
// over a batch of sequences, each bringing a prefill chunk or one decode token, against a
// KvPagePool (docs/model-interface.md "forward"). It knows nothing of sampling or scheduling: the
// caller decides which sequences step together and owns their pages.
//
// Thread-safety: Load is safe from any thread. Forward serialises itself with an internal mutex
// (one forward at a time per runner); the accessors are const and safe concurrently.
//
// Ownership: Load returns a runner owned by the caller (it owns the TorchScript module). Forward
// reads the caller's buffers (the spans in ForwardBatch) only during the call and writes the KV
// cache of the pages it is given; ForwardOutput is owned by the caller and is overwritten. On
// failure nothing is returned / the output is unspecified, but the pages written before an error
// may hold partial K/V (their tokens must be recomputed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_config.h"

namespace dysco {

// A read-only view of contiguous elements (C++17 has no std::span). Does not own; the viewed buffer
// must outlive every use of the span.
template <typename T>
struct ConstSpan {
  const T* data = nullptr;
  size_t size = 0;
  ConstSpan() = default;
  ConstSpan(const T* d, size_t n) : data(d), size(n) {}
  ConstSpan(const std::vector<T>& v)
      : data(v.data()), size(v.size()) {}  // NOLINT: implicit by design
  const T& operator[](size_t i) const { return data[i]; }
  bool empty() const { return size == 0; }
  const T* begin() const { return data; }
  const T* end() const { return data + size; }
};

// The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a Kubernetes
// CPU limit: cgroup v2 cpu.max, v1 cpu.cfs_quota_us) rounded up; at least 1. What
// ModelRunnerOptions::num_threads = 0 uses. Thread-safe (reads the system each call).
int AvailableCpus();

struct ModelRunnerOptions {
  // Intra-op threads, process-wide: at::set_num_threads. When the BLAS is OpenBLAS, its own pool
  // is set to one thread (process-wide too): dysco::linear splits GEMMs over torch's threads, and
  // a second pool spins against torch's (4x slower prefill, 3x slower decode measured on a 2-core
  // machine). 0 = AvailableCpus() (torch's own default is one thread on some builds, Debian's
  // among them: half of a 2-core machine idle).
  int num_threads = 0;
  std::string device = "cpu";  // where the module and the inputs live ("cpu", "cuda:0")
  // TorchScript graph-executor optimisation. Off by default: shapes change every step, so the
  // profiling executor keeps re-specialising, and on CPU the attention runs in our ops anyway.
  // TorchScript keeps the flag per thread: Load and every Forward set it on their thread (it
  // stays set there for other TorchScript code on that thread). On CUDA, true disables graphs.
  bool jit_optimize = false;
  // On the CPU, a step whose every sequence brings one token, with no probe heads and all layers,
  // runs the package's layer loop from C++ (the same ops on the module's bound parameters, in the
  // TorchScript code's order: the same logits bit for bit) instead of through the TorchScript
  // interpreter. Why: the interpreter's ~0.6 ms of a ~15 ms SmolLM2 step on 2 cores is serial time
  // the weight-streaming floor does not have (docs/performance.md "Where the batch-1 step's excess
  // is"). Other steps, other devices and packages whose module lacks the expected layout run
  // through TorchScript.
  bool native_cpu_decode = true;
  // CUDA graphs for decode steps (docs/gpu.md "CUDA graphs"): on a CUDA device, a step whose every
  // sequence brings one token is padded to a bucket (batch and block-table width rounded up to
  // powers of two) whose forward is captured once and replayed. Prefill and mixed steps, the CPU,
  // and builds without CUDA run eagerly whatever this says.
  bool cuda_graphs = true;
  // Largest padded batch that is captured (rounded up to a power of two); larger decode steps run
  // eagerly. Each bucket's graph keeps its own memory in the graph pool: cap it at the scheduler's
  // largest batch.
  int cuda_graph_max_batch = 32;
  // Receives one line per captured bucket (its key, the capture's milliseconds, the graph pool's
  // growth). Called on the forward's thread, with the runner's lock held; null = no log.
  std::function<void(const std::string&)> log_info;
  // A step that mixes rows with a key bias (DySCO decode) and prefill chunks without one runs as
  // two forwards, the biased rows and then the others, when this says so. Why: on CUDA a prefill
  // chunk takes flash attention only without a bias (kernels/cuda/paged_prefill_flash.cu); one
  // biased row would send the whole chunk to the split-KV kernel, 30-70x slower for an 8K chunk
  // (docs/gpu.md). Each row's K/V writes and outputs are its own, so the result is the single
  // forward's up to the rounding of matrix products over fewer rows. kAuto: on CUDA devices only.
  enum class MixedBiasSplit { kAuto, kNever, kAlways };
  MixedBiasSplit mixed_bias_split = MixedBiasSplit::kAuto;
};

// Opaque to the torch-free parts of core/ (core/model/device_tensor.h).
struct DeviceTensor;

// One sequence's part of a step.
struct ForwardRow {
  // The new tokens (a prefill chunk, or one decode token). Non-empty.
  ConstSpan<int32_t> token_ids;
  // Tokens of this sequence already in the KV cache: the new tokens sit at positions
  // start_position .. start_position + token_ids.size - 1.
  int64_t start_position = 0;
  // The sequence's pages in order; they must cover start_position + token_ids.size tokens.
  ConstSpan<int32_t> page_ids;
  // Optional additive bias on attention logits per key position (DySCO); empty = none. When set,
  // its length must be >= start_position + token_ids.size.
  ConstSpan<float> key_bias;
  // Instead of key_bias (which must then be empty): the bias where a GPU op left it, fp32 [>=
  // start_position + token_ids.size] on the runner's device, written by work queued before the
  // forward on the device's current stream (DySCO's selection: DyscoBatchOps::DeviceBias). Why:
  // the real pass then needs nothing from the host between the two passes of a DySCO step
  // (docs/gpu.md "The DySCO stage without a wait").
  // (A default member initializer: the rows' aggregate initialisations may leave it out.)
  std::shared_ptr<const DeviceTensor> key_bias_device = nullptr;
  bool has_key_bias() const { return !key_bias.empty() || key_bias_device != nullptr; }
};

struct ForwardBatch {
  std::vector<ForwardRow> sequences;
  KvPagePool* kv_pool = nullptr;  // the cache the pages belong to
  // -1: all layers, return logits. k >= 0: run layers 0..k only (DySCO's speculative pass); logits
  // empty unless k is the last layer.
  int last_layer = -1;
  // (layer, query head) pairs whose attention probabilities of each sequence's last new token to
  // return.
  std::vector<std::pair<int, int>> probe_heads;
  // Optional: empty, or one list per sequence of indices into probe_heads. When set, the forward
  // returns ForwardOutput::probe_mean (each row's mean over its listed heads: the first head's
  // probabilities, plus each next one in the listed order, times 1/count, all in fp32: DySCO's
  // head mean, docs/dysco.md) and no per-head probs. Why: on a GPU the mean is taken where the
  // probabilities are, and only 1/count of them is copied back (docs/gpu.md "DySCO on the
  // device"). An empty list gives that row zeros.
  std::vector<std::vector<int>> probe_mean_heads;
  // With probe_mean_heads on a GPU runner: leave the head means on the device
  // (ForwardOutput::probe_mean_device) instead of copying them into ForwardOutput::probe_mean, and
  // return without waiting for the step when it has no logits. Why: DySCO's relevance update runs
  // on the device (DyscoSelectStaging::RunWithRelevanceUpdate), and the host then packs the
  // selection's inputs while the speculative pass still runs (docs/gpu.md "DySCO on the device").
  // Ignored on the CPU, and where a step runs as two forwards (ModelRunnerOptions::MixedBiasSplit).
  bool probe_mean_on_device = false;
  // false: the step's logits stay where they are computed; ForwardOutput::logits is left empty and
  // ForwardOutput::greedy_tokens holds each row's GreedyTokenId, picked there. Why: a greedy
  // sequence without a repetition penalty needs nothing else, and on a GPU the copy of B x vocab
  // floats (0.6 MB a row for a 152K vocabulary) and the host's pass over them are ~0.1-0.2 ms of
  // a ~5 ms decode step that the bandwidth floor does not have (docs/gpu.md "The token picked on
  // the device"). BatchStepper sets it when no row that samples in the step needs its logits.
  bool logits_to_host = true;
};

struct ForwardOutput {
  int64_t batch_size = 0;
  int64_t vocab_size = 0;     // 0 when the step returned no logits
  std::vector<float> logits;  // [batch_size, vocab_size], logits of each sequence's last new token
                              // (empty when ForwardBatch::logits_to_host was false)
  // [batch_size] when ForwardBatch::logits_to_host was false and the step had logits: each row's
  // GreedyTokenId over its logits. Empty otherwise.
  std::vector<int32_t> greedy_tokens;
  int64_t num_probe_heads = 0;
  int64_t probs_len = 0;     // S' = max over the batch of (start_position + number of new tokens)
  std::vector<float> probs;  // [batch_size, num_probe_heads, probs_len], zero past each sequence's
                             // length; empty when ForwardBatch::probe_mean_heads is set
  std::vector<float>
      probe_mean;  // [batch_size, probs_len] when probe_mean_heads is set, else empty
  // Instead of probe_mean when ForwardBatch::probe_mean_on_device was honoured: fp32 [batch_size,
  // probs_len] on the runner's device, written once the step's work on its stream is done (ops
  // queued on that stream after the forward may read it). Null otherwise.
  std::shared_ptr<const DeviceTensor> probe_mean_device;

  const float* logits_row(int64_t b) const { return logits.data() + b * vocab_size; }
  const float* probs_row(int64_t b, int64_t h) const {
    return probs.data() + (b * num_probe_heads + h) * probs_len;
  }
  const float* probe_mean_row(int64_t b) const { return probe_mean.data() + b * probs_len; }
};

// The greedy token of one row of logits: the lowest id among the largest values, where NaN counts
// as larger than every number (so the first NaN, if any). The rule of ATen's argmax on every
// device (NaN propagates, ties go to the lower index), so a GPU runner picks on the device exactly
// what the host's Sampler picks from the same logits.
int32_t GreedyTokenId(const float* logits, int64_t vocab);

class ModelRunner {
 public:
  // NOT_FOUND / INVALID_ARGUMENT for a missing or bad package (a weights file that is malformed or
  // does not hold exactly the tensors config.json implies, with their shapes and dtype: the message
  // names the file and the tensor), FAILED_PRECONDITION for a package of another format_version
  // (re-export it) or when the dysco ops are not registered (libdysco_kernels.so not
  // linked/loaded), INTERNAL when TorchScript fails to load model.pt. On the CPU the parameters are
  // tensors over a read-only mapping of weights.safetensors (the runner keeps it mapped); on
  // another device they are copied there.
  static StatusOr<std::unique_ptr<ModelRunner>> Load(const std::string& package_dir,
                                                     const ModelRunnerOptions& options = {});
  ~ModelRunner();
  ModelRunner(const ModelRunner&) = delete;
  ModelRunner& operator=(const ModelRunner&) = delete;

  // Runs one forward over the batch. INVALID_ARGUMENT (naming sequences[i] and the field) for
  // inputs that do not fit the model or the pool, OUT_OF_RANGE past max_position_embeddings,
  // INTERNAL for a failure inside the model.
  Status Forward(const ForwardBatch& batch, ForwardOutput* out);

  const ModelConfig& config() const;
  const std::string& package_dir() const;
  const std::string& device() const;
  // The intra-op CPU threads Load set (ModelRunnerOptions::num_threads, or AvailableCpus() for 0).
  int cpu_threads() const;

  // What the CUDA-graph path has done so far (all zero on the CPU or without graphs). For tests
  // and logs; takes the forward lock.
  struct CudaGraphStats {
    int64_t graphs = 0;          // buckets captured, each once
    int64_t replays = 0;         // decode steps replayed from a graph (the capturing step included)
    int64_t eager_forwards = 0;  // forwards that ran the module directly
    // Of those, CPU decode steps that ran the layer loop from C++ (native_cpu_decode).
    int64_t native_decode_forwards = 0;
    int64_t pool_bytes = 0;  // the graph pool's growth over all captures (reserved bytes)
    // Host wall seconds of the replays, by phase (benchmarks: where a step's time beyond its
    // kernels goes): packing the batch and staging the graph's inputs, the replay call, then
    // waiting for the step and copying its outputs back.
    double prepare_seconds = 0;
    double replay_seconds = 0;
    double read_seconds = 0;
  };
  CudaGraphStats cuda_graph_stats() const;

  struct Impl;

 private:
  explicit ModelRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// FAILED_PRECONDITION naming the first missing op unless all sixteen torch.ops.dysco ops (the
// model's and the DySCO stages') are registered.
Status CheckDyscoOpsRegistered();

}  // namespace dysco
