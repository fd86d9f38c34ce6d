// bench-gpu: the GPU benchmark of issue 9 (docs/performance.md "GPU (issue 9)"), batch 1, on a
// model package (the exporter's `synthetic` Qwen3-8B / Llama-3.1-8B shapes on the H200; any
// package, e.g. the tiny one, on the CPU build, which runs the same code with small sizes to test
// its logic):
//
//   TTFT         one chunked prefill (--chunk tokens per forward, as the scheduler chunks) of the
//                longest context's random token ids, timed to the first token's logits on the host.
//   decode       per-token latency at each --contexts length L, reusing that one prefill: a step at
//                context L is a row with start_position L - 1 over the first ceil(L / page) pages
//                of the long sequence (it rewrites position L - 1's slot with the same token:
//                harmless). plain: one forward. DySCO: what BatchStepper runs for a dynamic row
//                (speculative pass over layers 0..deepest probe layer with the probe heads,
//                DyscoBatchOps relevance update + selection + bias, real pass with the bias), with
//                the package's reference DySCO parameters and the core's own DyscoController /
//                DyscoBatchOps, after the sequence's real warm-up steps at positions L - 1 - T .. L
//                - 2 (T = context + intervention warm-up), so the relevance it selects from is the
//                model's. The timed step is repeated at position L - 1 without committing its
//                results, so every repeat does the same work. --warmup untimed steps, then --steps
//                timed ones: mean and p50.
//   floors       measured in the same run:
//                bandwidth  a --copy-mib device-to-device copy (bytes read + written / time, best
//                           of 10);
//                decode     bytes a step must read / bandwidth: every weight once (layer matrices,
//                           norms, the LM head, the one embedding row) plus the KV cache of L
//                           tokens over all layers; the DySCO floor adds the speculative pass's
//                           re-read of layers 0..last probe layer - 1 (their weights and their KV
//                           of L tokens) and of the last probe layer's input norm, q/k/v weights
//                           and the keys of the KV heads its probes read (all that layer runs);
//                prefill    FLOPs / the matmul rate of at::mm in the model's dtype over the
//                           model's own matrix shapes with --chunk rows (best of several); FLOPs =
//                           2 x layer matrix params x tokens + 2 x LM head params x chunks +
//                           causal attention (4 D per query head and visible key).
//
// Output: a markdown table on stdout (context, plain ms, plain floor, ratio, DySCO ms, DySCO floor,
// ratio, DySCO/plain; then the TTFT line) and, with --json PATH, every number as JSON
// (bench/plot_gpu.py reads it). Timings are wall-clock around ModelRunner::Forward, which returns
// logits (and probe probabilities) on the host, so each step ends synchronised; the floor
// measurements synchronise the device explicitly.
//
// usage: bench-gpu --model DIR [--device cuda:0|cpu] [--contexts 8192,32768,131072] [--chunk N]
//                  [--warmup N] [--steps N] [--copy-mib N] [--max-prefill-s S] [--no-dysco]
//                  [--cuda-graphs 0|1] [--profile-steps N] [--check-dysco] [--json PATH]
//                  [--label S] [--logits-to-host 0|1] [--timeline-json PATH]
// --check-dysco: at the shortest context, also run the product's own loop (a Generator: Sequence +
// BatchStepper) on the same prompt and require the same selections at the dynamic warm-up steps
// as the benchmark's (exit 1 otherwise): the timed DySCO step is the product's.
// --profile-steps N (0): then N plain and N DySCO steps at the longest context run under the Kineto
// profiler, and the device time per kernel name (per step) is printed and written to the JSON
// ("profile"): where a step's time goes, next to its wall time (the gap is host time), and the
// same events as one timeline (busy time, and the idle stretches by the events around them:
// "span_ms_per_step", "busy_ms_per_step", "gaps"); and once the prompt's last full prefill chunk
// ("prefill_chunk").
// --timeline-json PATH: with --profile-steps, every device event of the plain and DySCO profiles in
// start order (name, start and duration in us from the profile's first event), for reading a
// step's critical path offline (e.g. the DySCO stage between the passes: docs/performance.md
// "Where the time goes").
// --logits-to-host (0): 0 = each step's token is picked where the logits are and only its id is
// read back (ForwardBatch::logits_to_host = false: what BatchStepper does for a greedy sequence),
// 1 = the logits are copied to the host and the token picked there (A/B of the two).
// --cuda-graphs sets ModelRunnerOptions::cuda_graphs where the runner has that option (CUDA graphs
// for decode steps; the JSON's "cuda_graphs" is null without it).
// --max-prefill-s (300): the prefill stops after the chunk that passes it (a far too slow prefill
// kernel must not eat the run); the TTFT is then that of the tokens prefilled ("cut" in the JSON)
// and the contexts past them are skipped.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include "core/dysco/batch_ops.h"
#include "core/dysco/controller.h"
#include "core/dysco/params.h"
#include "core/engine/engine.h"
#include "core/model/torch_dtype.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

[[noreturn]] void Usage(const std::string& message) {
  std::cerr
      << "bench-gpu: " << message
      << "\nusage: bench-gpu --model DIR [--device cuda:0|cpu] [--contexts N,N,...] "
         "[--chunk N] [--warmup N] [--steps N] [--copy-mib N] [--max-prefill-s S] [--no-dysco] "
         "[--json PATH] [--label S] [--timeline-json PATH]\n";
  std::exit(2);
}

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "bench-gpu: " << message << "\n";
  std::exit(1);
}

void Check(const dysco::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::cerr << "bench-gpu: " << what << ": " << s.ToString() << "\n";
    std::exit(1);
  }
}

int64_t ParseInt(const std::string& flag, const std::string& value, int64_t lo, int64_t hi) {
  char* end = nullptr;
  const long long x = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || x < lo || x > hi)
    Usage(flag + " needs an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

std::vector<int64_t> ParseList(const std::string& flag, const std::string& value) {
  std::vector<int64_t> out;
  std::stringstream in(value);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(ParseInt(flag, item, 16, 1 << 24));
  if (out.empty()) Usage(flag + " needs comma-separated integers");
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string Json(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", x);
  return buf;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) continue;
    out += ch;
  }
  return out + "\"";
}

struct Stats {
  double mean = 0, p50 = 0, min = 0;
};

Stats Summarise(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  s.p50 = v[v.size() / 2];
  s.min = v.front();
  return s;
}

// Waits for the device's queued work (a no-op on the CPU).
void Sync(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// ModelRunnerOptions::cuda_graphs (CUDA graphs for decode steps) where this tree's runner has it:
// --cuda-graphs 0|1 sets it; without the option the flag is refused. Detected at compile time so
// that the benchmark builds with and without it.
template <typename T, typename = void>
struct HasCudaGraphs : std::false_type {};
template <typename T>
struct HasCudaGraphs<T, std::void_t<decltype(std::declval<T&>().cuda_graphs)>> : std::true_type {};

// -1: the runner has no such option; else the value now set (0/1). `want` < 0 keeps the default.
template <typename Options>
int SetCudaGraphs(Options* options, int want) {
  if constexpr (HasCudaGraphs<Options>::value) {
    if (want >= 0) options->cuda_graphs = want != 0;
    return options->cuda_graphs ? 1 : 0;
  } else {
    if (want >= 0) Usage("--cuda-graphs: this build's ModelRunnerOptions has no cuda_graphs");
    return -1;
  }
}

// ---- What a step must read, from the config (every tensor of the model's forward, by shape).
struct ModelBytes {
  double layer_matrix_params = 0;  // q, k, v, o, gate, up, down of every layer
  double layer_norm_params = 0;    // per layer: two RMSNorms (+ q/k norms with qk_norm)
  double lm_head_params = 0;       // vocab x hidden (read once per step, tied or not)
  double other_params = 0;         // final norm + the one embedding row a step reads
  double element_bytes = 0;
  double kv_bytes_per_token = 0;  // K and V of one token over all layers, from the pool
  int num_layers = 0;

  double per_layer_params() const { return (layer_matrix_params + layer_norm_params) / num_layers; }
  // Plain step: every weight once + the KV of `tokens` keys over all layers.
  double PlainStep(int64_t tokens) const {
    return (layer_matrix_params + layer_norm_params + lm_head_params + other_params) *
               element_bytes +
           kv_bytes_per_token * static_cast<double>(tokens);
  }
  // The speculative pass's extra reads: layers 0..last_layer - 1 whole (weights and their KV of
  // `tokens`), and of the last one (when it is not the model's last) what its probes need: its
  // input norm (and q/k norms), its q/k/v weights and the K half of the KV heads its probes read
  // (the model runs nothing else there: docs/model-interface.md "forward").
  double SpeculativePass(int64_t tokens, int last_layer, int64_t last_layer_kv_heads) const {
    const bool whole_model = last_layer >= num_layers - 1;
    const double weights = whole_model ? num_layers * per_layer_params()
                                       : last_layer * per_layer_params() + qkv_params_per_layer +
                                             probe_layer_norm_params;
    return (weights + other_params) * element_bytes +
           SpeculativeKvLayers(last_layer, last_layer_kv_heads) / num_layers * kv_bytes_per_token *
               static_cast<double>(tokens);
  }
  // Layers' worth of KV (K and V of every KV head) the speculative pass reads per key: the whole
  // layers, and the K half of the last layer's probed KV heads.
  double SpeculativeKvLayers(int last_layer, int64_t last_layer_kv_heads) const {
    if (last_layer >= num_layers - 1) return num_layers;
    return last_layer + 0.5 * static_cast<double>(last_layer_kv_heads) / num_kv_heads;
  }
  double qkv_params_per_layer = 0;     // (Hq + 2 Hkv) D x hidden
  double probe_layer_norm_params = 0;  // the input norm (and the q/k norms) of one layer
  int num_kv_heads = 1;
};

ModelBytes CountBytes(const dysco::ModelConfig& c, const dysco::KvPagePool& pool) {
  ModelBytes b;
  const double hidden = static_cast<double>(c.hidden_size);
  const double q = static_cast<double>(c.num_attention_heads) * c.head_dim;
  const double kv = static_cast<double>(c.num_kv_heads) * c.head_dim;
  const double inter = static_cast<double>(c.intermediate_size);
  b.num_layers = c.num_layers;
  b.layer_matrix_params = c.num_layers * (2 * q * hidden + 2 * kv * hidden + 3 * inter * hidden);
  b.layer_norm_params = c.num_layers * (2 * hidden + (c.qk_norm ? 2.0 * c.head_dim : 0.0));
  b.lm_head_params = static_cast<double>(c.vocab_size) * hidden;
  b.other_params = 2 * hidden;
  b.element_bytes = dysco::ModelDtypeSize(c.dtype);
  b.kv_bytes_per_token = static_cast<double>(pool.bytes_per_page()) / pool.page_size();
  b.qkv_params_per_layer = (q + 2 * kv) * hidden;
  b.probe_layer_norm_params = hidden + (c.qk_norm ? 2.0 * c.head_dim : 0.0);
  b.num_kv_heads = c.num_kv_heads;
  return b;
}

// FLOPs of a T-token prefill in chunks of `chunk` (as bench-decode): layer matmuls of every token,
// the LM head of each chunk's last token, causal attention (QK^T and PV).
double PrefillFlops(const dysco::ModelConfig& c, const ModelBytes& b, int64_t tokens,
                    int64_t chunk) {
  const double t = static_cast<double>(tokens);
  const double chunks = static_cast<double>((tokens + chunk - 1) / chunk);
  const double attention = static_cast<double>(c.num_layers) * c.num_attention_heads * 4.0 *
                           c.head_dim * t * (t + 1) / 2;
  return 2 * t * b.layer_matrix_params + 2 * chunks * b.lm_head_params + attention;
}

// ---- Floors measured on the device.
// Bytes read + written per second by a `bytes` device-to-device copy: best of `reps`.
double MeasureBandwidth(const at::Device& device, int64_t bytes, int reps) {
  c10::InferenceMode guard;
  const auto opts = at::TensorOptions().dtype(at::kByte).device(device);
  at::Tensor src = at::empty({bytes}, opts).fill_(1);
  at::Tensor dst = at::empty({bytes}, opts);
  double best = 1e30;
  for (int r = 0; r < reps + 2; ++r) {
    Sync(device);
    const auto t0 = Clock::now();
    dst.copy_(src);
    Sync(device);
    if (r >= 2) best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

// FLOP/s of at::mm in the model's dtype over its layer matrix shapes with `rows` rows (the prefill
// chunk): q/o (hidden x hidden-ish), gate/up, down; the best of `reps` passes over all three.
double MeasureMatmulRate(const dysco::ModelConfig& c, const at::Device& device, int64_t rows,
                         int reps) {
  c10::InferenceMode guard;
  const auto opts = at::TensorOptions().dtype(ToScalarType(c.dtype)).device(device);
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {// (in, out)
                                                           {c.hidden_size, q},
                                                           {c.hidden_size, c.intermediate_size},
                                                           {c.intermediate_size, c.hidden_size}};
  std::vector<at::Tensor> x, w;
  double flops = 0;
  for (auto [in, out] : shapes) {
    x.push_back(at::randn({rows, in}, opts));
    w.push_back(at::randn({in, out}, opts) * 0.02);
    flops += 2.0 * rows * in * out;
  }
  double best = 1e30;
  for (int r = 0; r < reps + 2; ++r) {
    Sync(device);
    const auto t0 = Clock::now();
    for (size_t i = 0; i < shapes.size(); ++i) {
      at::Tensor y = at::mm(x[i], w[i]);
      (void)y;
    }
    Sync(device);
    if (r >= 2) best = std::min(best, Seconds(t0, Clock::now()));
  }
  return flops / best;
}

// ---- The benchmark proper.
class Bench {
 public:
  Bench(dysco::ModelRunner* runner, dysco::KvPagePool* pool, int64_t max_context, uint64_t seed,
        bool logits_to_host)
      : runner_(runner),
        pool_(pool),
        pages_(pool),
        ops_(runner->device()),
        logits_to_host_(logits_to_host) {
    const auto& c = runner->config();
    std::mt19937_64 rng(seed);
    // Ids from 3 up (below are the usual special ids) and below the vocabulary.
    std::uniform_int_distribution<int32_t> token(
        static_cast<int32_t>(std::min<int64_t>(3, c.vocab_size - 1)),
        static_cast<int32_t>(c.vocab_size) - 1);
    tokens_.resize(max_context);
    for (int32_t& t : tokens_) t = token(rng);
    Check(pages_.EnsureCapacity(max_context), "allocating the pages of the long sequence");
  }

  // Chunked prefill of the tokens; seconds to the last chunk's logits on the host and the tokens
  // prefilled. One untimed chunk first (lazy initialisation: cuBLAS handles, allocator growth).
  // Stops after the chunk that passes `max_seconds` (a prefill kernel that is far too slow must not
  // eat the whole run): then fewer tokens than asked are prefilled.
  std::pair<double, int64_t> Prefill(int64_t chunk, double max_seconds) {
    const int64_t n = static_cast<int64_t>(tokens_.size());
    Forward(0, std::min(chunk, n), {}, -1, {});
    const auto t0 = Clock::now();
    int64_t done = 0;
    while (done < n) {
      const int64_t m = std::min(chunk, n - done);
      Forward(done, m, {}, -1, {});
      done += m;
      if (done < n && Seconds(t0, Clock::now()) > max_seconds) break;
    }
    volatile int64_t next = Argmax(out_);
    (void)next;
    return {Seconds(t0, Clock::now()), done};
  }

  // One prefill chunk: tokens [start, start + m) of the prompt after the first `start` in the
  // cache.
  void PrefillChunk(int64_t start, int64_t m) { Forward(start, m, {}, -1, {}); }

  // One plain decode step at context L.
  void PlainStep(int64_t L) {
    Forward(L - 1, 1, {}, -1, {});
    volatile int64_t next = Argmax(out_);
    (void)next;
  }

  // A DySCO sequence whose prompt is the first L - 1 tokens and whose first generated token sits
  // at position L - 1: its warm-up steps (positions L - 1 - T .. L - 2) run here, as BatchStepper
  // runs them, and commit their results; then StepAt(L - 1) is a dynamic (generation) step.
  void PrepareDysco(const dysco::ModelConfig& c, int64_t L) {
    const int64_t prompt_len = L - 1;
    auto params = dysco::ResolveDyscoParams(c, {}, /*chat_formatted=*/false, prompt_len,
                                            /*generation_prompt_tokens=*/0);
    Check(params.status(), "DySCO parameters");
    std::vector<int32_t> prompt(tokens_.begin(), tokens_.begin() + prompt_len);
    auto controller = dysco::DyscoController::Create(*params, prompt, dysco::DyscoTraceMode::kOff);
    Check(controller.status(), "DyscoController::Create");
    controller_ = std::move(*controller);
    warmup_selections_.clear();
    for (int64_t pos = controller_->params().prefill_len(); pos < prompt_len; ++pos) {
      const dysco::DyscoStepKind kind = controller_->StepKindAt(pos);
      const std::vector<const dysco::DyscoController*> rows = {controller_.get()};
      if (kind == dysco::DyscoStepKind::kContextWarmup) {
        // BatchStepper::RealForward for a warm-up row: full pass with its probe heads, no bias,
        // then the relevance update.
        const auto heads = dysco::UnionOfHeads(rows);
        Forward(pos, 1, {}, -1, heads);
        std::vector<std::vector<float>> relevance;
        Check(ops_.UpdateRelevance(rows, {pos + 1}, out_, {0}, &relevance),
              "relevance update (context warm-up)");
        Check(controller_->ApplyRelevance(std::move(relevance[0])), "ApplyRelevance");
      } else if (kind == dysco::DyscoStepKind::kDynamic) {
        DyscoStep(pos);
        warmup_selections_.push_back(
            {pos, selections_[0].num_selected, selections_[0].selected_mass});
        Check(controller_->ApplyRelevance(std::move(relevance_[0])), "ApplyRelevance");
        Check(controller_->ApplySelection(std::move(selections_[0])), "ApplySelection");
      } else {
        Fail("the package's DySCO parameters are not the dynamic variant at warm-up");
      }
    }
    if (controller_->StepKindAt(L - 1) != dysco::DyscoStepKind::kDynamic)
      Fail("position L - 1 is not a dynamic DySCO step with the package's parameters");
  }

  // One dynamic DySCO step at `pos` (BatchStepper::InterveneDynamic + RealForward for one row);
  // results left in relevance_ / selections_, not committed. Adds its phases' seconds to *spec_s,
  // *select_s and *real_s when given.
  void DyscoStep(int64_t pos, double* spec_s = nullptr, double* select_s = nullptr,
                 double* real_s = nullptr) {
    const std::vector<const dysco::DyscoController*> rows = {controller_.get()};
    const auto heads = dysco::UnionOfHeads(rows);
    const auto t0 = Clock::now();
    Forward(pos, 1, {}, dysco::DeepestHeadLayer(rows), heads);
    const auto t1 = Clock::now();
    // As BatchStepper: on a GPU the real pass reads the bias where the selection wrote it and the
    // results are copied out after it (docs/gpu.md "The DySCO stage without a wait");
    // DYSCO_BENCH_SELECT_WAIT=1 waits for them first and hands the real pass the host's bias (the
    // fourteenth increment's step, for an A/B).
    Check(ops_.StartUpdateRelevanceAndSelect(rows, {pos + 1}, out_),
          "relevance update and selection");
    std::shared_ptr<const dysco::DeviceTensor> device_bias = ops_.DeviceBias(0);
    if (device_bias == nullptr || select_wait_) {
      device_bias.reset();
      Check(ops_.FinishUpdateRelevanceAndSelect(&relevance_, &selections_),
            "relevance update and selection");
    }
    const auto t2 = Clock::now();
    if (device_bias != nullptr) {
      Forward(pos, 1, {}, -1, {}, device_bias);
    } else {
      Forward(pos, 1, selections_[0].bias, -1, {});
    }
    volatile int64_t next = Argmax(out_);
    (void)next;
    if (device_bias != nullptr) {
      Check(ops_.FinishUpdateRelevanceAndSelect(&relevance_, &selections_),
            "relevance update and selection");
    }
    const auto t3 = Clock::now();
    if (spec_s) *spec_s += Seconds(t0, t1);
    if (select_s) *select_s += Seconds(t1, t2);
    if (real_s) *real_s += Seconds(t2, t3);
  }

  const dysco::DyscoController& controller() const { return *controller_; }
  // The relevance update and selection's phases (DyscoBatchOps::StageSeconds), summed over calls.
  const dysco::DyscoBatchOps::StageSeconds& stage_seconds() const { return ops_.stage_seconds(); }
  // The dynamic warm-up steps of the last PrepareDysco: (position, keys selected, their mass).
  struct WarmupSelection {
    int64_t position;
    int64_t num_selected;
    double mass;
  };
  const std::vector<WarmupSelection>& warmup_selections() const { return warmup_selections_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  const dysco::DyscoSelection& last_selection() const { return selections_[0]; }

 private:
  void Forward(int64_t start, int64_t n, const std::vector<float>& bias, int last_layer,
               const std::vector<std::pair<int, int>>& heads,
               std::shared_ptr<const dysco::DeviceTensor> device_bias = nullptr) {
    const int64_t pages = pool_->pages_for_tokens(start + n);
    batch_.kv_pool = pool_;
    batch_.last_layer = last_layer;
    batch_.probe_heads = heads;
    // As BatchStepper asks: the DySCO row's head mean, reduced where the probabilities are.
    batch_.probe_mean_heads.clear();
    if (!heads.empty()) batch_.probe_mean_heads = dysco::ProbeMeanHeads({controller_.get()}, heads);
    // As BatchStepper::InterveneDynamic: a speculative pass leaves them on the GPU for the
    // relevance update there (the warm-up's full passes update on the host).
    batch_.probe_mean_on_device = last_layer >= 0 && ops_.on_device();
    batch_.logits_to_host = logits_to_host_;
    batch_.sequences.assign(
        1, {dysco::ConstSpan<int32_t>(tokens_.data() + start, static_cast<size_t>(n)), start,
            dysco::ConstSpan<int32_t>(pages_.ids().data(), static_cast<size_t>(pages)),
            dysco::ConstSpan<float>(bias), std::move(device_bias)});
    Check(runner_->Forward(batch_, &out_), "forward at position " + std::to_string(start));
  }

  // The step's greedy token, as the product's Sampler picks it (dysco::GreedyTokenId).
  static int64_t Argmax(const dysco::ForwardOutput& out) {
    if (out.vocab_size == 0) return -1;
    if (!out.greedy_tokens.empty()) return out.greedy_tokens[0];
    const float* row = out.logits_row(0);
    return dysco::GreedyTokenId(row, out.vocab_size);
  }

  dysco::ModelRunner* runner_;
  dysco::KvPagePool* pool_;
  dysco::PageList pages_;
  std::vector<int32_t> tokens_;
  dysco::ForwardBatch batch_;
  dysco::ForwardOutput out_;
  dysco::DyscoBatchOps ops_;
  bool logits_to_host_;
  std::unique_ptr<dysco::DyscoController> controller_;
  std::vector<std::vector<float>> relevance_;
  std::vector<dysco::DyscoSelection> selections_;
  const bool select_wait_ = [] {
    const char* v = std::getenv("DYSCO_BENCH_SELECT_WAIT");
    return v != nullptr && std::string(v) == "1";
  }();
  std::vector<WarmupSelection> warmup_selections_;
};

// --check-dysco: the product's own loop (a Generator: Sequence + BatchStepper) on the same prompt
// (the first L - 1 tokens, prefilled in the same chunks) must make the same selections at the
// dynamic warm-up steps as PrepareDysco did: evidence that the timed step is the product's step.
// Exits with an error when they differ.
void CheckDyscoAgainstGenerator(dysco::Engine& engine, const Bench& bench, int64_t L,
                                int64_t chunk) {
  dysco::GenerateRequest request;
  request.prompt_token_ids.assign(bench.tokens().begin(), bench.tokens().begin() + (L - 1));
  request.max_new_tokens = 1;
  request.dysco = true;
  request.dysco_trace = dysco::DyscoTraceMode::kSteps;
  dysco::GeneratorOptions options;
  options.prefill_chunk_tokens = chunk;
  auto result = engine.MakeGenerator(options).Generate(request);
  Check(result.status(), "--check-dysco: the Generator's DySCO run");
  std::vector<const dysco::DyscoTraceRecord*> dynamic;
  for (const auto& r : result->dysco_trace) {
    if (r.phase == dysco::DyscoPhase::kInterventionWarmup) dynamic.push_back(&r);
  }
  const auto& ours = bench.warmup_selections();
  bool same = dynamic.size() == ours.size() && !ours.empty();
  for (size_t i = 0; same && i < ours.size(); ++i) {
    same = dynamic[i]->position == ours[i].position &&
           dynamic[i]->num_selected == ours[i].num_selected &&
           std::fabs(dynamic[i]->nucleus_mass - ours[i].mass) <= 1e-6;
  }
  if (!same) {
    std::string detail;
    for (size_t i = 0; i < std::max(dynamic.size(), ours.size()); ++i) {
      detail +=
          "\n  step " + std::to_string(i) + ": generator " +
          (i < dynamic.size()
               ? std::to_string(dynamic[i]->position) + "/" +
                     std::to_string(dynamic[i]->num_selected) + "/" + Json(dynamic[i]->nucleus_mass)
               : std::string("-")) +
          ", bench " +
          (i < ours.size() ? std::to_string(ours[i].position) + "/" +
                                 std::to_string(ours[i].num_selected) + "/" + Json(ours[i].mass)
                           : std::string("-"));
    }
    Fail("--check-dysco at context " + std::to_string(L) +
         ": the dynamic warm-up selections differ from the Generator's (position/selected/mass):" +
         detail);
  }
  std::printf(
      "check-dysco at %lld: %zu dynamic warm-up steps select as the Generator's "
      "(BatchStepper) do (%lld keys at the last)\n",
      static_cast<long long>(L), ours.size(), static_cast<long long>(ours.back().num_selected));
  std::fflush(stdout);
}

// ---- Where the time goes: per-kernel device time of a few steps under the Kineto profiler.
struct KernelTime {
  std::string name;
  double ms_per_step = 0;
  double calls_per_step = 0;
};

// An idle stretch of the profiled timeline (no event running), by the names around it: `after`
// the event whose end opened it, `before` the event whose start closed it.
struct TimelineGap {
  std::string after, before;
  double ms_per_step = 0;
  double count_per_step = 0;
};

struct StepProfile {
  bool ok = false;
  std::string error;
  int64_t steps = 0;
  double device_ms_per_step = 0;  // sum of all device events (kernels, copies)
  double wall_ms_per_step = 0;
  std::vector<KernelTime> kernels;  // by time, descending
  // Each name's calls' durations (ms) in the order the calls started, all steps in a row.
  std::map<std::string, std::vector<double>> call_ms_in_order;
  // The timeline of the same events: from the first start to the last end (span), the time some
  // event was running (busy: the union of their intervals; a kernel launched to start early counts
  // from its start, its wait for the kernel ahead included), and the idle stretches in between by
  // the names around them, longest in total first. Where a step's boundaries cost: a gap is time
  // with nothing on the device (on the CPU: no op running), including the host's time between
  // steps.
  double span_ms_per_step = 0;
  double busy_ms_per_step = 0;
  std::vector<TimelineGap> gaps;
  // Every event in start order (ns from the first event's start), for --timeline-json.
  std::vector<std::tuple<std::string, double, double>> events_in_order;
};

struct TimelineEvent {
  double start_ns = 0, end_ns = 0;
  std::string name;
};

// Fills p's span, busy time and gaps (per step) from the profiled events.
void AddTimeline(StepProfile& p, std::vector<TimelineEvent> events, int64_t steps) {
  if (events.empty() || steps <= 0) return;
  std::stable_sort(
      events.begin(), events.end(),
      [](const TimelineEvent& a, const TimelineEvent& b) { return a.start_ns < b.start_ns; });
  for (const TimelineEvent& e : events) {
    p.events_in_order.emplace_back(e.name, e.start_ns - events[0].start_ns, e.end_ns - e.start_ns);
  }
  std::map<std::pair<std::string, std::string>, std::pair<double, int64_t>> gaps;  // ns, count
  double busy_ns = 0;
  double begin = events[0].start_ns, end = events[0].end_ns;  // the current busy stretch
  const std::string* last_to_end = &events[0].name;
  for (size_t i = 1; i < events.size(); ++i) {
    const TimelineEvent& e = events[i];
    if (e.start_ns > end) {
      busy_ns += end - begin;
      auto& gap = gaps[{*last_to_end, e.name}];
      gap.first += e.start_ns - end;
      gap.second += 1;
      begin = e.start_ns;
      end = e.end_ns;
      last_to_end = &e.name;
    } else if (e.end_ns > end) {
      end = e.end_ns;
      last_to_end = &e.name;
    }
  }
  busy_ns += end - begin;
  const auto per_step = static_cast<double>(steps);
  // The last busy stretch ends where the last event does (one ending later would have joined it).
  p.span_ms_per_step = (end - events[0].start_ns) / 1e6 / per_step;
  p.busy_ms_per_step = busy_ns / 1e6 / per_step;
  for (const auto& [names, total] : gaps) {
    p.gaps.push_back({names.first, names.second, total.first / 1e6 / per_step,
                      static_cast<double>(total.second) / per_step});
  }
  std::sort(p.gaps.begin(), p.gaps.end(), [](const TimelineGap& a, const TimelineGap& b) {
    return a.ms_per_step > b.ms_per_step;
  });
}

// A kernel of both a DySCO and a plain step, called more often in the DySCO step: its calls of each
// DySCO step split by pass, the first (DySCO calls - plain calls) of a step taken as the
// speculative pass's (it runs first; a per-layer kernel runs once a layer of each pass) and the
// rest as the real pass's, against the plain step's calls. Says which pass a DySCO step's extra
// device time is in (e.g. whether the real pass's biased attention costs more a call than the
// plain step's).
struct PassSplit {
  std::string name;
  int64_t speculative_calls = 0, real_calls = 0;         // per step
  double speculative_ms = 0, real_ms = 0, plain_ms = 0;  // mean per call
  // The plain step's mean per call again, profiled after the DySCO steps (0: not profiled): a
  // control for drift between the profiles (a DySCO call slower than both plain profiles' is the
  // DySCO step's; slower than the first only is the order's).
  double plain_after_ms = 0;
};

// Mean duration (ms) of a kernel's calls in a profile; 0 when it has none.
double MeanCallMs(const StepProfile& profile, const std::string& name) {
  const auto it = profile.call_ms_in_order.find(name);
  if (it == profile.call_ms_in_order.end() || it->second.empty()) return 0.0;
  double sum = 0.0;
  for (const double ms : it->second) sum += ms;
  return sum / static_cast<double>(it->second.size());
}

// PassSplit of the DySCO profile's `top` kernels by time that qualify (whole calls per step in
// both profiles, more in the DySCO step).
std::vector<PassSplit> SplitByPass(const StepProfile& plain, const StepProfile& dysco,
                                   const StepProfile& plain_after, size_t top) {
  std::vector<PassSplit> out;
  if (!plain.ok || !dysco.ok || plain.steps <= 0 || dysco.steps <= 0) return out;
  for (size_t i = 0; i < dysco.kernels.size() && i < top; ++i) {
    const std::string& name = dysco.kernels[i].name;
    const auto d = dysco.call_ms_in_order.find(name);
    const auto p = plain.call_ms_in_order.find(name);
    if (d == dysco.call_ms_in_order.end() || p == plain.call_ms_in_order.end()) continue;
    const auto nd = static_cast<int64_t>(d->second.size()),
               np = static_cast<int64_t>(p->second.size());
    if (nd % dysco.steps != 0 || np % plain.steps != 0) continue;
    const int64_t per_step = nd / dysco.steps, plain_per_step = np / plain.steps;
    if (plain_per_step <= 0 || per_step <= plain_per_step) continue;
    PassSplit split;
    split.name = name;
    split.speculative_calls = per_step - plain_per_step;
    split.real_calls = plain_per_step;
    for (int64_t c = 0; c < nd; ++c) {
      ((c % per_step) < split.speculative_calls ? split.speculative_ms : split.real_ms) +=
          d->second[static_cast<size_t>(c)];
    }
    split.speculative_ms /= static_cast<double>(split.speculative_calls * dysco.steps);
    split.real_ms /= static_cast<double>(split.real_calls * dysco.steps);
    split.plain_ms = MeanCallMs(plain, name);
    if (plain_after.ok) split.plain_after_ms = MeanCallMs(plain_after, name);
    out.push_back(split);
  }
  return out;
}

// Runs `step` `steps` times under the profiler. On CUDA: the device's events (kernels, memcpy,
// memset), aggregated by name. On the CPU (a test of this code): every CPU op, nested ops
// included (so their times overlap).
StepProfile ProfileSteps(const at::Device& device, int64_t steps,
                         const std::function<void()>& step) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  StepProfile p;
  const c10::DeviceType want = device.is_cuda() ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
  try {
    const std::set<ActivityType> activities = {device.is_cuda() ? ActivityType::CUDA
                                                                : ActivityType::CPU};
    const ProfilerConfig config(ProfilerState::KINETO);
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) step();
    Sync(device);
    p.wall_ms_per_step = Seconds(t0, Clock::now()) * 1e3 / steps;
    std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    // Each name's calls: (start, duration), in ns; and every event on one timeline.
    std::map<std::string, std::vector<std::pair<double, double>>> calls_by_name;
    std::vector<TimelineEvent> timeline;
    for (const auto& e : result->events()) {
      if (e.deviceType() != want) continue;
#if TORCH_VERSION_MAJOR >= 2
      const double ns = static_cast<double>(e.durationNs());
      const double start = static_cast<double>(e.startNs());
#else
      const double ns = 1e3 * static_cast<double>(e.durationUs());
      const double start = 1e3 * static_cast<double>(e.startUs());
#endif
      calls_by_name[e.name()].emplace_back(start, ns);
      timeline.push_back({start, start + ns, e.name()});
    }
    AddTimeline(p, std::move(timeline), steps);
    p.steps = steps;
    for (auto& [name, calls] : calls_by_name) {
      double ns = 0;
      for (const auto& call : calls) ns += call.second;
      p.kernels.push_back({name, ns / 1e6 / steps, static_cast<double>(calls.size()) / steps});
      p.device_ms_per_step += ns / 1e6 / steps;
      std::stable_sort(calls.begin(), calls.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      std::vector<double>& ms = p.call_ms_in_order[name];
      for (const auto& call : calls) ms.push_back(call.second / 1e6);
    }
    std::sort(p.kernels.begin(), p.kernels.end(), [](const KernelTime& a, const KernelTime& b) {
      return a.ms_per_step > b.ms_per_step;
    });
    p.ok = true;
  } catch (const std::exception& e) {
    p.error = e.what();
    p.error = p.error.substr(0, p.error.find('\n'));
  }
  return p;
}

struct ContextResult {
  int64_t context = 0;
  Stats plain, dysco;
  double plain_floor_s = 0, dysco_floor_s = 0;
  double plain_bytes = 0, dysco_bytes = 0;
  double spec_s = 0, select_s = 0, real_s = 0;  // mean per DySCO step
  // Mean per DySCO step: select_s by phase (DyscoBatchOps::StageSeconds).
  double stage_pack_s = 0, stage_update_s = 0, stage_relevance_out_s = 0, stage_select_s = 0,
         stage_results_out_s = 0;
  // Mean per plain step's graph replay: ModelRunner::CudaGraphStats' host phases.
  double host_prepare_s = 0, host_replay_s = 0, host_read_s = 0;
  int64_t num_selected = 0;
  double selected_mass = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::string model, device_name = "cuda:0", json_path, label, timeline_json_path;
  std::vector<int64_t> contexts = {8192, 32768, 131072};
  int64_t chunk = 0, warmup = 3, steps = 20, copy_mib = 0;
  double max_prefill_s = 300;
  int cuda_graphs_flag = -1;
  int64_t profile_steps = 0;
  bool with_dysco = true, check_dysco = false, logits_to_host = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    // "--flag=value" as well as "--flag value": one word, so that a setting of scripts/gpu-ab.sh
    // can carry it (GPU_BENCH_EXTRA_ARGS=--chunk=16384).
    std::string inline_value;
    bool has_inline_value = false;
    if (const size_t eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = flag.substr(eq + 1);
      flag.resize(eq);
      has_inline_value = true;
    }
    if (flag == "--no-dysco") {
      with_dysco = false;
      continue;
    }
    if (flag == "--check-dysco") {
      check_dysco = true;
      continue;
    }
    if (!has_inline_value && i + 1 >= argc) Usage("unknown flag or missing value: " + flag);
    const std::string value = has_inline_value ? inline_value : argv[++i];
    if (flag == "--model") {
      model = value;
    } else if (flag == "--device") {
      device_name = value;
    } else if (flag == "--contexts") {
      contexts = ParseList(flag, value);
    } else if (flag == "--chunk") {
      chunk = ParseInt(flag, value, 1, 1 << 20);
    } else if (flag == "--warmup") {
      warmup = ParseInt(flag, value, 0, 100000);
    } else if (flag == "--steps") {
      steps = ParseInt(flag, value, 1, 100000);
    } else if (flag == "--copy-mib") {
      copy_mib = ParseInt(flag, value, 1, 1 << 20);
    } else if (flag == "--max-prefill-s") {
      max_prefill_s = static_cast<double>(ParseInt(flag, value, 1, 1 << 20));
    } else if (flag == "--profile-steps") {
      profile_steps = ParseInt(flag, value, 0, 1000);
    } else if (flag == "--cuda-graphs") {
      cuda_graphs_flag = static_cast<int>(ParseInt(flag, value, 0, 1));
    } else if (flag == "--logits-to-host") {
      logits_to_host = ParseInt(flag, value, 0, 1) != 0;
    } else if (flag == "--json") {
      json_path = value;
    } else if (flag == "--timeline-json") {
      timeline_json_path = value;
    } else if (flag == "--label") {
      label = value;
    } else {
      Usage("unknown flag " + flag);
    }
  }
  if (model.empty()) Usage("--model is required");
  const at::Device device(device_name);
  if (device.is_cuda() && !torch::cuda::is_available())
    Usage("--device " + device_name + " but torch sees no CUDA device");
  if (chunk == 0) chunk = device.is_cuda() ? 8192 : 256;
  if (copy_mib == 0) copy_mib = device.is_cuda() ? 4096 : 256;
  auto config = dysco::LoadModelConfig(model);
  Check(config.status(), "config");
  // A context past the model's window is dropped (with a warning) rather than failing the run:
  // the other contexts still measure.
  std::vector<int64_t> fitting;
  for (int64_t L : contexts) {
    if (L <= config->max_position_embeddings) {
      fitting.push_back(L);
    } else {
      std::fprintf(stderr, "bench-gpu: context %lld skipped: max_position_embeddings is %lld\n",
                   static_cast<long long>(L),
                   static_cast<long long>(config->max_position_embeddings));
    }
  }
  if (fitting.empty()) Usage("no --contexts length fits max_position_embeddings");
  contexts = fitting;
  const int64_t max_context = contexts.back();
  const int page_size = 16;
  dysco::EngineOptions options;
  options.runner.device = device_name;
  options.page_size = page_size;
  options.kv_pages = (max_context + page_size - 1) / page_size + 1;
  // --check-dysco: room for the Generator's own sequence at the shortest context.
  if (check_dysco) options.kv_pages += (contexts.front() + page_size - 1) / page_size + 1;
  options.start_scheduler = false;
  const int cuda_graphs = SetCudaGraphs(&options.runner, cuda_graphs_flag);
  const auto load0 = Clock::now();
  auto engine = dysco::Engine::Load(model, options);
  Check(engine.status(), "loading " + model);
  const double load_s = Seconds(load0, Clock::now());
  dysco::ModelRunner& runner = (*engine)->runner();
  dysco::KvPagePool& pool = (*engine)->pool();
  const dysco::ModelConfig& c = runner.config();
  if (with_dysco && c.dysco.selected_heads.empty()) {
    std::fprintf(stderr, "bench-gpu: the package has no DySCO heads: DySCO not measured\n");
    with_dysco = false;
  }
  const ModelBytes bytes = CountBytes(c, pool);
  std::printf(
      "bench-gpu: %s (%s, %s, %d layers, hidden %lld, %.2fB params) on %s, loaded in %.1f s, CUDA "
      "graphs %s, tokens picked on the %s\n",
      c.model_name.c_str(), c.architecture.c_str(), dysco::ModelDtypeName(c.dtype), c.num_layers,
      static_cast<long long>(c.hidden_size),
      (bytes.layer_matrix_params + bytes.layer_norm_params + bytes.lm_head_params) / 1e9,
      device_name.c_str(), load_s,
      cuda_graphs < 0 ? "(no option)"
      : cuda_graphs   ? "on"
                      : "off",
      logits_to_host ? "host" : "device");
  std::fflush(stdout);

  // Floors.
  const auto f0 = Clock::now();
  const double bandwidth = MeasureBandwidth(device, copy_mib << 20, 10);
  const double matmul_rate = MeasureMatmulRate(c, device, chunk, 5);
  std::printf(
      "floors: copy bandwidth %.1f GB/s (%lld MiB device-to-device copy, read + write), "
      "at::mm %.1f TFLOP/s (%s, %lld rows) [%.1f s]\n",
      bandwidth / 1e9, static_cast<long long>(copy_mib), matmul_rate / 1e12,
      dysco::ModelDtypeName(c.dtype), static_cast<long long>(chunk), Seconds(f0, Clock::now()));
  std::fflush(stdout);

  // TTFT: the one long prefill.
  Bench bench(&runner, &pool, max_context, 1234, logits_to_host);
  // Twice: the TTFT is the second prefill of the prompt. The first also built cuDNN's execution
  // plans for the chunk shapes (~50 ms each, cached for the process: docs/gpu.md "Prefill through
  // cuDNN"), which a server pays once per shape, not per request; it is reported beside.
  const auto [first_ttft_s, first_ttft_tokens] = bench.Prefill(chunk, max_prefill_s);
  double ttft_s = first_ttft_s;
  int64_t ttft_tokens = first_ttft_tokens;
  if (first_ttft_tokens == max_context) {
    std::tie(ttft_s, ttft_tokens) = bench.Prefill(chunk, max_prefill_s);
  }
  const bool ttft_cut = ttft_tokens < max_context;
  const double prefill_flops = PrefillFlops(c, bytes, ttft_tokens, chunk);
  const double ttft_floor_s = prefill_flops / matmul_rate;
  if (ttft_cut) {
    std::fprintf(
        stderr,
        "bench-gpu: prefill cut after %lld of %lld tokens (%.1f s > --max-prefill-s %.0f); "
        "contexts past it are skipped\n",
        static_cast<long long>(ttft_tokens), static_cast<long long>(max_context), ttft_s,
        max_prefill_s);
    std::vector<int64_t> kept;
    for (int64_t L : contexts) {
      if (L - 1 <= ttft_tokens) kept.push_back(L);
    }
    contexts = kept;
  }
  std::printf(
      "TTFT %lld tokens (chunks of %lld): %.3f s, FLOP floor %.3f s (%.3g FLOP), %.2fx, "
      "%.0f tokens/s (first prefill of the process %.3f s)\n",
      static_cast<long long>(ttft_tokens), static_cast<long long>(chunk), ttft_s, ttft_floor_s,
      prefill_flops, ttft_s / ttft_floor_s, ttft_tokens / ttft_s, first_ttft_s);
  std::fflush(stdout);

  std::vector<ContextResult> results;
  int probe_last_layer = -1;
  int64_t probe_last_layer_kv_heads = 0;
  int64_t num_probe_heads = 0;
  for (int64_t L : contexts) {
    ContextResult r;
    r.context = L;
    const auto c0 = Clock::now();
    for (int64_t s = 0; s < warmup; ++s) bench.PlainStep(L);
    std::vector<double> times;
    const dysco::ModelRunner::CudaGraphStats before = runner.cuda_graph_stats();
    for (int64_t s = 0; s < steps; ++s) {
      const auto t0 = Clock::now();
      bench.PlainStep(L);
      times.push_back(Seconds(t0, Clock::now()));
    }
    r.plain = Summarise(times);
    {
      // The runner's host phases of these steps' graph replays (zeros without graphs).
      const dysco::ModelRunner::CudaGraphStats after = runner.cuda_graph_stats();
      const double n = static_cast<double>(std::max<int64_t>(1, after.replays - before.replays));
      r.host_prepare_s = (after.prepare_seconds - before.prepare_seconds) / n;
      r.host_replay_s = (after.replay_seconds - before.replay_seconds) / n;
      r.host_read_s = (after.read_seconds - before.read_seconds) / n;
    }
    r.plain_bytes = bytes.PlainStep(L);
    r.plain_floor_s = r.plain_bytes / bandwidth;
    if (with_dysco) {
      bench.PrepareDysco(c, L);
      if (check_dysco && L == contexts.front())
        CheckDyscoAgainstGenerator(**engine, bench, L, chunk);
      const auto& params = bench.controller().params();
      probe_last_layer = params.max_head_layer();
      num_probe_heads = static_cast<int64_t>(params.selected_heads.size());
      std::set<int> last_layer_kv_heads;  // the KV heads the last probe layer's probes read
      for (const auto& [layer, head] : params.selected_heads) {
        if (layer == probe_last_layer)
          last_layer_kv_heads.insert(head / (c.num_attention_heads / c.num_kv_heads));
      }
      probe_last_layer_kv_heads = static_cast<int64_t>(last_layer_kv_heads.size());
      for (int64_t s = 0; s < warmup; ++s) bench.DyscoStep(L - 1);
      times.clear();
      const dysco::DyscoBatchOps::StageSeconds stage0 = bench.stage_seconds();
      for (int64_t s = 0; s < steps; ++s) {
        const auto t0 = Clock::now();
        bench.DyscoStep(L - 1, &r.spec_s, &r.select_s, &r.real_s);
        times.push_back(Seconds(t0, Clock::now()));
      }
      r.spec_s /= steps;
      r.select_s /= steps;
      r.real_s /= steps;
      const dysco::DyscoBatchOps::StageSeconds& stage1 = bench.stage_seconds();
      r.stage_pack_s = (stage1.pack - stage0.pack) / steps;
      r.stage_update_s = (stage1.update - stage0.update) / steps;
      r.stage_relevance_out_s = (stage1.relevance_out - stage0.relevance_out) / steps;
      r.stage_select_s = (stage1.select - stage0.select) / steps;
      r.stage_results_out_s = (stage1.results_out - stage0.results_out) / steps;
      r.dysco = Summarise(times);
      r.dysco_bytes =
          r.plain_bytes + bytes.SpeculativePass(L, probe_last_layer, probe_last_layer_kv_heads);
      r.dysco_floor_s = r.dysco_bytes / bandwidth;
      r.num_selected = bench.last_selection().num_selected;
      r.selected_mass = bench.last_selection().selected_mass;
    }
    std::printf(
        "context %lld: plain %.3f ms (p50 %.3f; runner host phases per replay: prepare %.3f, "
        "replay call %.3f, wait + read back %.3f), DySCO %.3f ms (p50 %.3f; speculative "
        "%.3f, relevance + selection %.3f, real %.3f; %lld keys selected) [%.1f s]\n",
        static_cast<long long>(L), r.plain.mean * 1e3, r.plain.p50 * 1e3, r.host_prepare_s * 1e3,
        r.host_replay_s * 1e3, r.host_read_s * 1e3, r.dysco.mean * 1e3, r.dysco.p50 * 1e3,
        r.spec_s * 1e3, r.select_s * 1e3, r.real_s * 1e3, static_cast<long long>(r.num_selected),
        Seconds(c0, Clock::now()));
    if (with_dysco) {
      std::printf(
          "context %lld: DySCO relevance + selection by phase (ms per step): pack %.3f, relevance "
          "update %.3f, relevance out %.3f, selection %.3f, sets and biases out %.3f\n",
          static_cast<long long>(L), r.stage_pack_s * 1e3, r.stage_update_s * 1e3,
          r.stage_relevance_out_s * 1e3, r.stage_select_s * 1e3, r.stage_results_out_s * 1e3);
    }
    std::fflush(stdout);
    results.push_back(r);
  }

  // The table (p50 per token; ratios to the floors of this run).
  std::printf(
      "\n%s%s, %s, batch 1, %s; ms per token (p50 of %lld steps); floors: %.0f GB/s "
      "copy, %.3g TFLOP/s at::mm\n\n",
      label.empty() ? "" : (label + ": ").c_str(), c.model_name.c_str(),
      dysco::ModelDtypeName(c.dtype), device_name.c_str(), static_cast<long long>(steps),
      bandwidth / 1e9, matmul_rate / 1e12);
  std::printf(
      "| context | plain ms | plain floor | ratio | DySCO ms | DySCO floor | ratio | "
      "DySCO/plain |\n|---|---|---|---|---|---|---|---|\n");
  for (const ContextResult& r : results) {
    if (with_dysco) {
      std::printf("| %lld | %.2f | %.2f | %.2fx | %.2f | %.2f | %.2fx | %.2fx |\n",
                  static_cast<long long>(r.context), r.plain.p50 * 1e3, r.plain_floor_s * 1e3,
                  r.plain.p50 / r.plain_floor_s, r.dysco.p50 * 1e3, r.dysco_floor_s * 1e3,
                  r.dysco.p50 / r.dysco_floor_s, r.dysco.p50 / r.plain.p50);
    } else {
      std::printf("| %lld | %.2f | %.2f | %.2fx | - | - | - | - |\n",
                  static_cast<long long>(r.context), r.plain.p50 * 1e3, r.plain_floor_s * 1e3,
                  r.plain.p50 / r.plain_floor_s);
    }
  }
  std::printf(
      "\n| TTFT tokens | seconds | FLOP floor s | ratio | tokens/s |\n|---|---|---|---|---|\n"
      "| %lld | %.3f | %.3f | %.2fx | %.0f |\n",
      static_cast<long long>(ttft_tokens), ttft_s, ttft_floor_s, ttft_s / ttft_floor_s,
      ttft_tokens / ttft_s);
  std::fflush(stdout);

  // Where the time goes at the longest context: per-kernel device time of a few steps.
  StepProfile plain_profile, dysco_profile, prefill_profile, plain_after_profile;
  // The DySCO step by pass (SplitByPass): computed once, printed and written to the JSON.
  std::vector<PassSplit> pass_splits;
  const int64_t profiled_context = results.empty() ? 0 : results.back().context;
  if (profile_steps > 0 && profiled_context > 0) {
    const int64_t L = profiled_context;
    plain_profile = ProfileSteps(device, profile_steps, [&] { bench.PlainStep(L); });
    // The prompt's last full chunk (its keys all in the cache from the TTFT run): where the
    // prefill's time goes.
    if (ttft_tokens >= chunk) {
      const int64_t start = (ttft_tokens / chunk - 1) * chunk;
      prefill_profile = ProfileSteps(device, 1, [&] { bench.PrefillChunk(start, chunk); });
    }
    if (with_dysco) {
      dysco_profile = ProfileSteps(device, profile_steps, [&] { bench.DyscoStep(L - 1); });
      // The plain step again: the by-pass table's control for drift between the profiles.
      plain_after_profile = ProfileSteps(device, profile_steps, [&] { bench.PlainStep(L); });
    }
    for (const auto* prof : {&plain_profile, &dysco_profile, &prefill_profile}) {
      if (prof == &dysco_profile && !with_dysco) continue;
      if (prof == &prefill_profile && ttft_tokens < chunk) continue;
      const char* what = prof == &plain_profile   ? "plain"
                         : prof == &dysco_profile ? "DySCO"
                                                  : "prefill chunk";
      const int64_t at = prof == &prefill_profile ? (ttft_tokens / chunk) * chunk : L;
      const int64_t steps = prof == &prefill_profile ? 1 : profile_steps;
      if (!prof->ok) {
        std::printf("\nprofile (%s, %lld): profiler unavailable: %s\n", what,
                    static_cast<long long>(at), prof->error.c_str());
        continue;
      }
      std::printf(
          "\nprofile (%s step at %lld, %lld steps): %.3f ms wall, %.3f ms of %s events per "
          "step; top by time:\n| ms/step | calls/step | share of wall | name "
          "|\n|---|---|---|---|\n",
          what, static_cast<long long>(at), static_cast<long long>(steps), prof->wall_ms_per_step,
          prof->device_ms_per_step, device.is_cuda() ? "device" : "CPU-op (nested)");
      for (size_t i = 0; i < prof->kernels.size() && i < 12; ++i) {
        const KernelTime& k = prof->kernels[i];
        std::printf("| %.3f | %.1f | %.1f%% | %s |\n", k.ms_per_step, k.calls_per_step,
                    100.0 * k.ms_per_step / prof->wall_ms_per_step, k.name.substr(0, 100).c_str());
      }
      std::printf(
          "timeline: %.3f ms busy of a %.3f ms span per step (%.3f ms idle); longest idle, by the "
          "events around it:\n| ms/step | gaps/step | after | before |\n|---|---|---|---|\n",
          prof->busy_ms_per_step, prof->span_ms_per_step,
          prof->span_ms_per_step - prof->busy_ms_per_step);
      for (size_t i = 0; i < prof->gaps.size() && i < 8; ++i) {
        const TimelineGap& g = prof->gaps[i];
        std::printf("| %.4f | %.1f | %s | %s |\n", g.ms_per_step, g.count_per_step,
                    g.after.substr(0, 60).c_str(), g.before.substr(0, 60).c_str());
      }
    }
    if (with_dysco) {
      pass_splits = SplitByPass(plain_profile, dysco_profile, plain_after_profile, 12);
      if (!pass_splits.empty()) {
        std::printf(
            "\nDySCO step by pass at %lld (a kernel's calls in start order; the first DySCO calls -"
            " plain calls of a step taken as the speculative pass's):\n| name | speculative "
            "calls/step | ms/call | real calls/step | ms/call | plain step ms/call | plain step "
            "after "
            "ms/call |\n|---|---|---|---|---|---|---|\n",
            static_cast<long long>(L));
        for (const PassSplit& sp : pass_splits) {
          std::printf("| %s | %lld | %.4f | %lld | %.4f | %.4f | %.4f |\n",
                      sp.name.substr(0, 100).c_str(), static_cast<long long>(sp.speculative_calls),
                      sp.speculative_ms, static_cast<long long>(sp.real_calls), sp.real_ms,
                      sp.plain_ms, sp.plain_after_ms);
        }
      }
    }
    std::fflush(stdout);
  }

  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\n  \"bench\": \"bench-gpu\",\n  \"label\": " << JsonString(label)
        << ",\n  \"model_dir\": " << JsonString(model)
        << ",\n  \"model_name\": " << JsonString(c.model_name)
        << ",\n  \"architecture\": " << JsonString(c.architecture)
        << ",\n  \"dtype\": " << JsonString(dysco::ModelDtypeName(c.dtype))
        << ",\n  \"device\": " << JsonString(device_name) << ",\n  \"batch\": 1"
        << ",\n  \"cuda_graphs\": "
        << (cuda_graphs < 0 ? "null"
            : cuda_graphs   ? "true"
                            : "false")
        << ",\n  \"logits_to_host\": " << (logits_to_host ? "true" : "false")
        << ",\n  \"load_s\": " << Json(load_s) << ",\n  \"num_layers\": " << c.num_layers
        << ",\n  \"layer_matrix_params\": " << Json(bytes.layer_matrix_params)
        << ",\n  \"lm_head_params\": " << Json(bytes.lm_head_params)
        << ",\n  \"weight_bytes\": " << Json(bytes.PlainStep(0))
        << ",\n  \"kv_bytes_per_token\": " << Json(bytes.kv_bytes_per_token)
        << ",\n  \"bandwidth_bytes_per_s\": " << Json(bandwidth)
        << ",\n  \"copy_bytes\": " << (copy_mib << 20)
        << ",\n  \"matmul_flops_per_s\": " << Json(matmul_rate) << ",\n  \"chunk\": " << chunk
        << ",\n  \"warmup_steps\": " << warmup << ",\n  \"timed_steps\": " << steps
        << ",\n  \"dysco\": " << (with_dysco ? "true" : "false") << ",\n  \"probe_last_layer\": "
        << probe_last_layer
        // The KV a DySCO step reads per key, in passes over every layer's KV (plain = 1): what its
        // floor counts, so that bench/plot_gpu.py's bandwidth ceiling splits bytes the same way.
        << ",\n  \"dysco_kv_passes\": "
        << Json(probe_last_layer < 0
                    ? 1.0
                    : 1.0 + bytes.SpeculativeKvLayers(probe_last_layer, probe_last_layer_kv_heads) /
                                c.num_layers)
        << ",\n  \"num_probe_heads\": " << num_probe_heads
        << ",\n  \"ttft\": {\"tokens\": " << ttft_tokens
        << ", \"cut\": " << (ttft_cut ? "true" : "false") << ", \"seconds\": " << Json(ttft_s)
        << ", \"first_seconds\": " << Json(first_ttft_s) << ", \"flops\": " << Json(prefill_flops)
        << ", \"floor_s\": " << Json(ttft_floor_s) << ", \"ratio\": " << Json(ttft_s / ttft_floor_s)
        << "},\n  \"contexts\": [";
    for (size_t i = 0; i < results.size(); ++i) {
      const ContextResult& r = results[i];
      out << (i ? "," : "") << "\n    {\"context\": " << r.context
          << ", \"plain_ms_mean\": " << Json(r.plain.mean * 1e3)
          << ", \"plain_ms_p50\": " << Json(r.plain.p50 * 1e3)
          << ", \"plain_ms_min\": " << Json(r.plain.min * 1e3)
          << ", \"plain_bytes\": " << Json(r.plain_bytes)
          << ", \"plain_floor_ms\": " << Json(r.plain_floor_s * 1e3)
          << ", \"plain_ratio\": " << Json(r.plain.p50 / r.plain_floor_s);
      if (with_dysco) {
        out << ", \"dysco_ms_mean\": " << Json(r.dysco.mean * 1e3)
            << ", \"dysco_ms_p50\": " << Json(r.dysco.p50 * 1e3)
            << ", \"dysco_ms_min\": " << Json(r.dysco.min * 1e3)
            << ", \"dysco_bytes\": " << Json(r.dysco_bytes)
            << ", \"dysco_floor_ms\": " << Json(r.dysco_floor_s * 1e3)
            << ", \"dysco_ratio\": " << Json(r.dysco.p50 / r.dysco_floor_s)
            << ", \"dysco_over_plain\": " << Json(r.dysco.p50 / r.plain.p50)
            << ", \"dysco_speculative_ms\": " << Json(r.spec_s * 1e3)
            << ", \"dysco_select_ms\": " << Json(r.select_s * 1e3)
            << ", \"dysco_real_ms\": " << Json(r.real_s * 1e3)
            << ", \"dysco_stage_pack_ms\": " << Json(r.stage_pack_s * 1e3)
            << ", \"dysco_stage_update_ms\": " << Json(r.stage_update_s * 1e3)
            << ", \"dysco_stage_relevance_out_ms\": " << Json(r.stage_relevance_out_s * 1e3)
            << ", \"dysco_stage_select_ms\": " << Json(r.stage_select_s * 1e3)
            << ", \"dysco_stage_results_out_ms\": " << Json(r.stage_results_out_s * 1e3)
            << ", \"plain_host_prepare_ms\": " << Json(r.host_prepare_s * 1e3)
            << ", \"plain_host_replay_ms\": " << Json(r.host_replay_s * 1e3)
            << ", \"plain_host_read_ms\": " << Json(r.host_read_s * 1e3)
            << ", \"num_selected\": " << r.num_selected
            << ", \"selected_mass\": " << Json(r.selected_mass);
      }
      out << "}";
    }
    out << "\n  ]";
    auto profile_json = [&](const StepProfile& prof) {
      if (!prof.ok) {
        out << "{\"error\": " << JsonString(prof.error) << "}";
        return;
      }
      out << "{\"wall_ms_per_step\": " << Json(prof.wall_ms_per_step)
          << ", \"device_ms_per_step\": " << Json(prof.device_ms_per_step) << ", \"top\": [";
      for (size_t i = 0; i < prof.kernels.size() && i < 30; ++i) {
        out << (i ? ", " : "") << "{\"name\": " << JsonString(prof.kernels[i].name.substr(0, 200))
            << ", \"ms_per_step\": " << Json(prof.kernels[i].ms_per_step)
            << ", \"calls_per_step\": " << Json(prof.kernels[i].calls_per_step) << "}";
      }
      out << "], \"span_ms_per_step\": " << Json(prof.span_ms_per_step)
          << ", \"busy_ms_per_step\": " << Json(prof.busy_ms_per_step) << ", \"gaps\": [";
      for (size_t i = 0; i < prof.gaps.size() && i < 12; ++i) {
        const TimelineGap& g = prof.gaps[i];
        out << (i ? ", " : "") << "{\"after\": " << JsonString(g.after.substr(0, 200))
            << ", \"before\": " << JsonString(g.before.substr(0, 200))
            << ", \"ms_per_step\": " << Json(g.ms_per_step)
            << ", \"count_per_step\": " << Json(g.count_per_step) << "}";
      }
      out << "]}";
    };
    if (profile_steps > 0 && profiled_context > 0) {
      out << ",\n  \"profile\": {\"context\": " << profiled_context
          << ", \"steps\": " << profile_steps
          << ", \"device_events\": " << (device.is_cuda() ? "true" : "false")
          << ",\n    \"plain\": ";
      profile_json(plain_profile);
      if (with_dysco) {
        out << ",\n    \"dysco\": ";
        profile_json(dysco_profile);
        out << ",\n    \"dysco_by_pass\": [";
        for (size_t i = 0; i < pass_splits.size(); ++i) {
          const PassSplit& sp = pass_splits[i];
          out << (i ? ", " : "") << "{\"name\": " << JsonString(sp.name.substr(0, 200))
              << ", \"speculative_calls_per_step\": " << sp.speculative_calls
              << ", \"speculative_ms_per_call\": " << Json(sp.speculative_ms)
              << ", \"real_calls_per_step\": " << sp.real_calls
              << ", \"real_ms_per_call\": " << Json(sp.real_ms)
              << ", \"plain_ms_per_call\": " << Json(sp.plain_ms)
              << ", \"plain_after_ms_per_call\": " << Json(sp.plain_after_ms) << "}";
        }
        out << "]";
      }
      if (ttft_tokens >= chunk) {
        out << ",\n    \"prefill_chunk\": ";
        profile_json(prefill_profile);
      }
      out << "}";
    }
    out << "\n}\n";
    if (!out) {
      std::cerr << "bench-gpu: cannot write " << json_path << "\n";
      return 1;
    }
  }
  if (!timeline_json_path.empty()) {
    std::ofstream out(timeline_json_path);
    out << "{\"context\": " << profiled_context << ", \"steps\": " << profile_steps;
    for (const auto& [key, prof] :
         {std::pair<const char*, const StepProfile*>{"plain", &plain_profile},
          {"dysco", &dysco_profile}}) {
      out << ",\n \"" << key << "\": [";
      for (size_t i = 0; i < prof->events_in_order.size(); ++i) {
        const auto& [name, start_ns, ns] = prof->events_in_order[i];
        out << (i ? ",\n  " : "\n  ") << "[" << JsonString(name.substr(0, 80)) << ", "
            << Json(start_ns / 1e3) << ", " << Json(ns / 1e3) << "]";
      }
      out << "]";
    }
    out << "}\n";
    if (!out) {
      std::cerr << "bench-gpu: cannot write " << timeline_json_path << "\n";
      return 1;
    }
  }
  return 0;
}
