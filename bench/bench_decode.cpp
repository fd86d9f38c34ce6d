// bench-decode: CPU time to first token (TTFT) of long prompts and decode time per token at batch 1
// and larger batches, each next to a floor measured in the same run (so that the ratios hold on a
// shared or throttled machine, where absolute times do not):
//   GEMM rate    at::linear over the model's weight shapes with 256 rows (a prefill chunk), in
//                FLOP/s. FLOP floor of a prompt of T tokens = (weight matmul FLOPs of T tokens +
//                causal attention FLOPs, QK^T and PV, of T tokens) / GEMM rate.
//   streaming    the model's weight bytes over the faster of: one at::mv pass over all weights
//                (BLAS GEMV) and a plain read of a weight-sized buffer (at::sum). Weight-streaming
//                floor of a decode step at batch b = max(that, 2 * b * params / GEMM rate).
// Also at::linear with b rows over the same weights (what a step's matmuls cost through a BLAS
// GEMM). Prompts are prefilled in chunks of --chunk tokens (the scheduler's prefill_chunk_tokens,
// 256), as the server does; no DySCO (plain attention), random tokens.
//
// usage: bench-decode --model DIR [--prompt-tokens N] [--decode-tokens N] [--batch B] [--threads N]
//                     [--jit-optimize 0|1] [--native-decode 0|1] [--ttft N,N,...] [--chunk N]
//                     [--max-isa 0|1|2]
//   --batch B measures batch 1 and B (default: 1, 4 and 8). --ttft: prompt lengths (default
//   1024,4096,7168; 0 skips TTFT). --jit-optimize 1 turns TorchScript's profiling graph executor on
//   (ModelRunnerOptions::jit_optimize). --native-decode 0 runs decode steps through the TorchScript
//   interpreter instead of the runner's C++ layer loop (ModelRunnerOptions::native_cpu_decode).
//   --max-isa caps the CPU attention kernels' instruction set (0 baseline, 1 x86-64-v3, 2
//   x86-64-v4: kernels/cpu/attention_kernel.h), to compare them in one build.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/script.h>

#include "core/engine/engine.h"
#include "core/model/safetensors_file.h"
#include "core/model/torch_dtype.h"
#include "kernels/cpu/attention_kernel.h"
#include "kernels/op_calls.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

[[noreturn]] void Usage(const std::string& message) {
  std::cerr
      << "bench-decode: " << message
      << "\nusage: bench-decode --model DIR [--prompt-tokens N] [--decode-tokens N] [--batch B] "
         "[--threads N] [--jit-optimize 0|1] [--native-decode 0|1] [--ttft N,N,...] [--chunk N] "
         "[--max-isa 0|1|2]\n";
  std::exit(2);
}

int ParsePositive(const std::string& flag, const char* value) {
  char* end = nullptr;
  const long x = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || x <= 0 || x > 1000000)
    Usage(flag + " needs a positive integer");
  return static_cast<int>(x);
}

// OpenBLAS's own thread count (a no-op with another BLAS), as core/model/model_runner.cpp sets it.
void SetOpenBlasThreads(int n) {
  using SetThreads = void (*)(int);
  if (auto fn = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    fn(n);
}

// Reads `size` bytes once: 16-byte vector sums, split over the ATen threads (one parallel region,
// as the GEMV opens one per matrix).
void ReadBytes(const char* bytes, int64_t size) {
  typedef float Vec4 __attribute__((vector_size(16)));
  std::atomic<float> sink{0.0f};
  const int64_t vectors = size / 16;
  at::parallel_for(0, vectors, 4096, [&](int64_t begin, int64_t end) {
    Vec4 a = {0, 0, 0, 0}, b = a, c = a, d = a;
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
      Vec4 v[4];
      std::memcpy(v, bytes + i * 16, sizeof(v));
      a += v[0];
      b += v[1];
      c += v[2];
      d += v[3];
    }
    const Vec4 s = a + b + c + d;
    sink.store(sink.load(std::memory_order_relaxed) + s[0], std::memory_order_relaxed);
  });
}

// The bytes a decode step streams, WHERE THE MODEL READS THEM: the package's weights.safetensors
// mapped again (the same page-cache pages as the runner's zero-copy CPU weights), every matrix
// (2-D tensor) read once. The floors' own random weights live in freshly allocated memory, whose
// read rate on this VM differs from run to run (10.9-20.9 ms for the same 538 MB) and from that of
// the model's pages; a read of the model's own bytes is the floor its step can reach.
class PackageWeightsRead {
 public:
  // nullopt when the package has no readable weights.safetensors (then not measured).
  static std::optional<PackageWeightsRead> Open(const std::string& package_dir) {
    auto file = dysco::SafetensorsFile::Open(package_dir + "/weights.safetensors");
    if (!file.ok()) return std::nullopt;
    PackageWeightsRead read;
    read.file_ = *file;
    for (const dysco::SafetensorsEntry& e : read.file_->entries()) {
      if (e.shape.size() != 2) continue;
      read.spans_.emplace_back(static_cast<const char*>(read.file_->Data(e)),
                               static_cast<int64_t>(e.size));
      read.bytes_ += static_cast<int64_t>(e.size);
    }
    return read;
  }

  // Seconds of one pass over the matrices, no warm-up.
  double ReadOnce() const {
    const auto t0 = Clock::now();
    for (const auto& [bytes, size] : spans_) ReadBytes(bytes, size);
    return Seconds(t0, Clock::now());
  }

  int64_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<const dysco::SafetensorsFile> file_;
  std::vector<std::pair<const char*, int64_t>> spans_;
  int64_t bytes_ = 0;
};

// One decode step's weight matmuls: per layer q, k, v, o, gate, up, down, then the LM head.
// Distinct weight tensors per layer, so that (as in the model) every weight comes from memory, not
// from cache.
class MatmulFloor {
 public:
  // The weights in the model's dtype, or in `dtype` when given (the bf16 comparison below).
  explicit MatmulFloor(const dysco::ModelConfig& c,
                       std::optional<at::ScalarType> dtype = std::nullopt)
      : c_(c) {
    const auto opts = at::TensorOptions().dtype(dtype.value_or(ToScalarType(c.dtype)));
    const int64_t q = int64_t{c.num_attention_heads} * c.head_dim;
    const int64_t kv = int64_t{c.num_kv_heads} * c.head_dim;
    for (int l = 0; l < c.num_layers; ++l) {
      for (auto shape : {std::pair<int64_t, int64_t>{q, c.hidden_size},
                         {kv, c.hidden_size},
                         {kv, c.hidden_size},
                         {c.hidden_size, q},
                         {c.intermediate_size, c.hidden_size},
                         {c.intermediate_size, c.hidden_size},
                         {c.hidden_size, c.intermediate_size}}) {
        weights_.push_back(at::randn({shape.first, shape.second}, opts) * 0.02);
      }
    }
    weights_.push_back(at::randn({c.vocab_size, c.hidden_size}, opts) * 0.02);
  }

  // Median seconds of one pass over all weights with `batch` rows of input.
  double Measure(int64_t batch, int reps) {
    c10::InferenceMode guard;
    const Inputs in = MakeInputs(batch);
    return MedianSeconds(reps, [&] {
      for (const at::Tensor& w : weights_) {
        at::Tensor y = at::linear(in.For(w), w);
        (void)y;
      }
    });
  }

  // The same pass as matrix-vector products (at::mv), batch 1 only: BLAS gemv is often much faster
  // than a one-row gemm, so this shows what a decode step could reach with a gemv path.
  double MeasureGemv(int reps) {
    c10::InferenceMode guard;
    const Inputs in = MakeInputs(0);
    return MedianSeconds(reps, [&] {
      for (const at::Tensor& w : weights_) {
        at::Tensor y = at::mv(w, in.For(w));
        (void)y;
      }
    });
  }

  // Median seconds of the same pass through dysco::linear (the model's op: GEMV up to 8 rows).
  double MeasureOp(int64_t batch, int reps) {
    c10::InferenceMode guard;
    const Inputs in = MakeInputs(batch);
    std::vector<at::Tensor> outs;
    for (const at::Tensor& w : weights_) {
      outs.push_back(at::empty({batch, w.size(0)}, w.options()));
    }
    return MedianSeconds(reps, [&] {
      for (size_t i = 0; i < weights_.size(); ++i) {
        dysco::ops::linear(outs[i], in.For(weights_[i]), weights_[i]);
      }
    });
  }

  // FLOP/s of one pass over all layer weights with `rows` rows of input (best of reps: the rate the
  // machine reaches, not a noisy median), the best of two ways to use the threads: at::linear with
  // OpenBLAS on all threads, and (OpenBLAS on one thread, as ModelRunner sets it) the rows split
  // over the ATen threads as dysco::linear does.
  double GemmRate(int64_t rows, int reps) {
    c10::InferenceMode guard;
    const auto opts = at::TensorOptions().dtype(weights_[0].scalar_type());
    const Inputs in = MakeInputs(rows);
    const int64_t threads = at::get_num_threads();
    double best = 1e30;
    for (int split = 0; split < 2; ++split) {
      SetOpenBlasThreads(split ? 1 : static_cast<int>(threads));
      const int64_t pieces = split ? threads : 1;
      const int64_t piece_rows = (rows + pieces - 1) / pieces;
      for (int r = 0; r < reps + 1; ++r) {
        const auto t0 = Clock::now();
        for (size_t i = 0; i + 1 < weights_.size(); ++i) {  // layer weights; not the LM head
          const at::Tensor& w = weights_[i];
          const at::Tensor& x = in.For(w);
          if (pieces == 1) {
            at::Tensor y = at::linear(x, w);
            (void)y;
            continue;
          }
          at::Tensor y = at::empty({rows, w.size(0)}, opts);
          // InferenceMode (thread-local) on the workers too, as dysco::linear's GEMM split does.
          const at::ThreadLocalState caller_state;
          at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
            const at::ThreadLocalStateGuard state_guard(caller_state);
            for (int64_t p = begin; p < end; ++p) {
              const int64_t r0 = p * piece_rows;
              const int64_t n = std::min(rows, r0 + piece_rows) - r0;
              if (n <= 0) continue;
              at::Tensor part = y.narrow(0, r0, n);
              at::mm_out(part, x.narrow(0, r0, n), w.t());
            }
          });
        }
        if (r >= 1) best = std::min(best, Seconds(t0, Clock::now()));
      }
    }
    SetOpenBlasThreads(1);  // as ModelRunner left it
    return 2.0 * static_cast<double>(rows) * static_cast<double>(layer_params()) / best;
  }

  // Median seconds to read every weight once (a sum over 16-byte vectors, split over the ATen
  // threads per tensor as the GEMV splits its rows): the memory read rate, with no matmul in it.
  // The faster of all threads and one thread: on this 2-core VM one core can already take most of
  // the bandwidth, and a parallel region per tensor costs a wake-up of the other thread.
  double MeasureRead(int reps) {
    const int threads = at::get_num_threads();
    double best = MeasureReadOn(reps);
    if (threads > 1) {
      at::set_num_threads(1);
      best = std::min(best, MeasureReadOn(reps));
      at::set_num_threads(threads);
    }
    return best;
  }

  double MeasureReadOn(int reps) {
    return MedianSeconds(reps, [&] {
      for (const at::Tensor& w : weights_) {
        ReadBytes(static_cast<const char*>(w.data_ptr()), w.numel() * w.element_size());
      }
    });
  }

  int64_t layer_params() const { return num_params() - weights_.back().numel(); }
  int64_t weight_bytes() const { return num_params() * weights_[0].element_size(); }

  int64_t num_params() const {
    int64_t n = 0;
    for (const auto& w : weights_) n += w.numel();
    return n;
  }

 private:
  // Random inputs with `rows` rows (0: vectors) for each input width of the weights.
  struct Inputs {
    int64_t hidden_size = 0, intermediate_size = 0;
    at::Tensor hidden, q, ffn;
    const at::Tensor& For(const at::Tensor& w) const {
      return w.size(1) == hidden_size ? hidden : w.size(1) == intermediate_size ? ffn : q;
    }
  };
  Inputs MakeInputs(int64_t rows) const {
    const auto opts = at::TensorOptions().dtype(weights_[0].scalar_type());
    auto make = [&](int64_t width) {
      return rows > 0 ? at::randn({rows, width}, opts) : at::randn({width}, opts);
    };
    return Inputs{c_.hidden_size, c_.intermediate_size, make(c_.hidden_size),
                  make(int64_t{c_.num_attention_heads} * c_.head_dim), make(c_.intermediate_size)};
  }

  // Median seconds of `pass` over `reps` runs after two warm-up runs.
  template <typename Pass>
  static double MedianSeconds(int reps, Pass&& pass) {
    std::vector<double> times;
    for (int r = 0; r < reps + 2; ++r) {
      const auto t0 = Clock::now();
      pass();
      if (r >= 2) times.push_back(Seconds(t0, Clock::now()));
    }
    return Median(times);
  }

  dysco::ModelConfig c_;
  std::vector<at::Tensor> weights_;
};

struct DecodeResult {
  double prefill_seconds = 0;  // whole batch prefill
  double step_seconds = 0;     // median decode step
  // With a floor probe: the median over steps of (step / the floor measured right after it), and
  // the median of those floors.
  double paired_ratio = 0;
  double paired_floor_seconds = 0;
};

// Prefills `batch` random prompts (one step each) and then decodes `decode_tokens` greedy steps
// with the whole batch in every step. floor_probe, when given, runs after every step (outside its
// time) and returns that moment's floor in seconds.
DecodeResult RunDecode(dysco::ModelRunner& runner, dysco::KvPagePool& pool, int batch,
                       int prompt_tokens, int decode_tokens, uint64_t seed,
                       const std::function<double()>& floor_probe = nullptr) {
  const auto& c = runner.config();
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size) - 1);
  std::vector<std::vector<int32_t>> tokens(batch);
  std::vector<dysco::PageList> pages;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < prompt_tokens; ++i) tokens[b].push_back(token(rng));
    pages.emplace_back(&pool);
    dysco::Status s = pages.back().EnsureCapacity(prompt_tokens + decode_tokens);
    if (!s.ok()) {
      std::cerr << "bench-decode: " << s.ToString() << "\n";
      std::exit(1);
    }
  }
  auto check = [](const dysco::Status& s) {
    if (!s.ok()) {
      std::cerr << "bench-decode: " << s.ToString() << "\n";
      std::exit(1);
    }
  };
  DecodeResult result;
  dysco::ForwardBatch step;
  step.kv_pool = &pool;
  dysco::ForwardOutput out;
  const auto t0 = Clock::now();
  step.sequences.resize(1);
  std::vector<int32_t> next(batch);
  for (int b = 0; b < batch; ++b) {
    step.sequences[0] = {tokens[b], 0, pages[b].ids(), {}};
    check(runner.Forward(step, &out));
    next[b] = static_cast<int32_t>(
        std::max_element(out.logits_row(0), out.logits_row(0) + c.vocab_size) - out.logits_row(0));
  }
  result.prefill_seconds = Seconds(t0, Clock::now());

  std::vector<double> times, floors;
  step.sequences.resize(batch);
  for (int t = 0; t < decode_tokens; ++t) {
    for (int b = 0; b < batch; ++b) tokens[b].push_back(next[b]);
    for (int b = 0; b < batch; ++b) {
      const int64_t pos = static_cast<int64_t>(tokens[b].size()) - 1;
      step.sequences[b] = {
          dysco::ConstSpan<int32_t>(tokens[b].data() + pos, 1), pos, pages[b].ids(), {}};
    }
    const auto s0 = Clock::now();
    check(runner.Forward(step, &out));
    times.push_back(Seconds(s0, Clock::now()));
    for (int b = 0; b < batch; ++b) {
      next[b] = static_cast<int32_t>(
          std::max_element(out.logits_row(b), out.logits_row(b) + c.vocab_size) -
          out.logits_row(b));
    }
    if (floor_probe) floors.push_back(floor_probe());
  }
  if (times.size() > 4) {  // warm-up steps
    times.erase(times.begin(), times.begin() + 2);
    if (!floors.empty()) floors.erase(floors.begin(), floors.begin() + 2);
  }
  result.step_seconds = Median(times);
  if (!floors.empty()) {
    std::vector<double> ratios;
    for (size_t i = 0; i < times.size(); ++i) ratios.push_back(times[i] / floors[i]);
    result.paired_ratio = Median(ratios);
    result.paired_floor_seconds = Median(floors);
  }
  return result;
}

// Seconds from the first prompt token to the first token's logits: `prompt_tokens` random tokens
// prefilled in chunks of `chunk` tokens (one Forward each), then the argmax of the last logits.
double RunTtft(dysco::ModelRunner& runner, dysco::KvPagePool& pool, int prompt_tokens, int chunk,
               uint64_t seed) {
  const auto& c = runner.config();
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size) - 1);
  std::vector<int32_t> tokens(prompt_tokens);
  for (int32_t& t : tokens) t = token(rng);
  dysco::PageList pages(&pool);
  dysco::Status s = pages.EnsureCapacity(prompt_tokens);
  if (!s.ok()) {
    std::cerr << "bench-decode: " << s.ToString() << "\n";
    std::exit(1);
  }
  dysco::ForwardBatch step;
  step.kv_pool = &pool;
  step.sequences.resize(1);
  dysco::ForwardOutput out;
  const auto t0 = Clock::now();
  for (int start = 0; start < prompt_tokens; start += chunk) {
    const int n = std::min(chunk, prompt_tokens - start);
    step.sequences[0] = {
        dysco::ConstSpan<int32_t>(tokens.data() + start, n), start, pages.ids(), {}};
    s = runner.Forward(step, &out);
    if (!s.ok()) {
      std::cerr << "bench-decode: " << s.ToString() << "\n";
      std::exit(1);
    }
  }
  volatile int64_t next =
      std::max_element(out.logits_row(0), out.logits_row(0) + c.vocab_size) - out.logits_row(0);
  (void)next;
  return Seconds(t0, Clock::now());
}

// FLOPs of a T-token prefill in chunks: the layer weight matmuls of every token, the LM head of
// each chunk's last token, and causal attention (QK^T and PV: 4 * D FLOPs per query head and
// visible key, token p seeing p + 1 keys).
double PrefillFlops(const dysco::ModelConfig& c, int64_t layer_params, int64_t tokens,
                    int64_t chunk) {
  const double t = static_cast<double>(tokens);
  const double chunks = static_cast<double>((tokens + chunk - 1) / chunk);
  const double weights = 2.0 * t * static_cast<double>(layer_params) +
                         2.0 * chunks * static_cast<double>(c.vocab_size * c.hidden_size);
  const double attention = static_cast<double>(c.num_layers) * c.num_attention_heads * 4.0 *
                           static_cast<double>(c.head_dim) * t * (t + 1) / 2;
  return weights + attention;
}

std::vector<int> ParseList(const std::string& flag, const std::string& value) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= value.size()) {
    const size_t comma = std::min(value.find(',', pos), value.size());
    const std::string item = value.substr(pos, comma - pos);
    char* end = nullptr;
    const long x = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || x < 0 || x > 1000000)
      Usage(flag + " needs comma-separated non-negative integers");
    if (x > 0) out.push_back(static_cast<int>(x));
    pos = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  int prompt_tokens = 128, decode_tokens = 64, threads = 0, batch_flag = 0, chunk = 256;
  std::vector<int> ttft_lengths = {1024, 4096, 7168};
  bool jit_optimize = false;
  bool native_decode = true;  // ModelRunnerOptions::native_cpu_decode (0: TorchScript, for A/B)
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) Usage("unknown flag or missing value: " + flag);
    const char* value = argv[++i];
    if (flag == "--model") {
      model = value;
    } else if (flag == "--prompt-tokens") {
      prompt_tokens = ParsePositive(flag, value);
    } else if (flag == "--decode-tokens") {
      decode_tokens = ParsePositive(flag, value);
    } else if (flag == "--batch") {
      batch_flag = ParsePositive(flag, value);
    } else if (flag == "--threads") {
      threads = ParsePositive(flag, value);
    } else if (flag == "--jit-optimize") {
      jit_optimize = std::string(value) == "1";
    } else if (flag == "--native-decode") {
      native_decode = std::string(value) == "1";
    } else if (flag == "--ttft") {
      ttft_lengths = ParseList(flag, value);
    } else if (flag == "--chunk") {
      chunk = ParsePositive(flag, value);
    } else if (flag == "--max-isa") {
      dysco::kernels::cpu::SetCpuIsaCapForTesting(
          static_cast<dysco::kernels::cpu::CpuIsa>(std::atoi(value)));
    } else {
      Usage("unknown flag " + flag);
    }
  }
  if (model.empty()) Usage("--model is required");
  std::vector<int> batches = {1, 4, 8};
  if (batch_flag > 0)
    batches = batch_flag == 1 ? std::vector<int>{1} : std::vector<int>{1, batch_flag};

  const int max_batch = *std::max_element(batches.begin(), batches.end());
  int max_ttft = 0;
  for (int t : ttft_lengths) max_ttft = std::max(max_ttft, t);
  dysco::EngineOptions options;
  options.runner.num_threads = threads;
  options.runner.jit_optimize = jit_optimize;
  options.runner.native_cpu_decode = native_decode;
  options.kv_pages = std::max<int64_t>(
      int64_t{max_batch} * ((prompt_tokens + decode_tokens + 15) / 16), (max_ttft + 15) / 16 + 1);
  options.start_scheduler = false;
  auto engine = dysco::Engine::Load(model, options);
  if (!engine.ok()) {
    std::cerr << "bench-decode: " << engine.status().ToString() << "\n";
    return 1;
  }
  dysco::ModelRunner& runner = (*engine)->runner();
  dysco::KvPagePool& pool = (*engine)->pool();
  const dysco::ModelConfig& c = runner.config();
  if (prompt_tokens + decode_tokens > c.max_position_embeddings ||
      max_ttft > c.max_position_embeddings)
    Usage("prompt + decode tokens (or a --ttft length) exceed the context");

  std::printf(
      "model %s (%s, %d layers, hidden %lld, vocab %lld), %d threads, prompt %d tokens, %d decode "
      "steps\n",
      c.model_name.c_str(), dysco::ModelDtypeName(c.dtype), c.num_layers,
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.vocab_size),
      at::get_num_threads(), prompt_tokens, decode_tokens);
  MatmulFloor floor(c);
  const double floor1 = floor.Measure(1, 20);
  const double gemv1 = floor.MeasureGemv(20);
  const double read = floor.MeasureRead(20);
  // (Absent from an older libdysco_kernels.so, which runs older packages: then not measured.)
  const bool have_linear = dysco::ops::MissingOps({"dysco::linear"}).empty();
  const double op1 = have_linear ? floor.MeasureOp(1, 20) : 0.0;
  const double op8 = have_linear ? floor.MeasureOp(8, 10) : 0.0;
  const double gemm_rate = floor.GemmRate(chunk, 3);
  const double stream1 = std::min(gemv1, read);
  std::printf(
      "floors (%.1fM weight params, %.0f MB): at::linear 1 row %.2f ms, at::mv %.2f ms, read %.2f "
      "ms (%.1f GB/s) -> weight-streaming floor %.2f ms; GEMM rate (at::linear, %d rows) %.1f "
      "GFLOP/s\n",
      floor.num_params() / 1e6, floor.weight_bytes() / 1e6, floor1 * 1e3, gemv1 * 1e3, read * 1e3,
      floor.weight_bytes() / read / 1e9, stream1 * 1e3, chunk, gemm_rate / 1e9);
  if (have_linear) {
    std::printf("dysco::linear over the same weights: 1 row %.2f ms, 8 rows %.2f ms\n", op1 * 1e3,
                op8 * 1e3);
  }
  if (have_linear && c.dtype == dysco::ModelDtype::kFloat32) {
    // The same shapes in bf16 (a package exported with --dtype bfloat16), in the same run: what
    // halving the weight bytes gives the decode step's matmuls on this machine.
    MatmulFloor bf16(c, at::kBFloat16);
    const double b1 = bf16.MeasureOp(1, 20);
    const double b8 = bf16.MeasureOp(8, 10);
    std::printf(
        "dysco::linear over the same shapes in bf16 (%.0f MB): 1 row %.2f ms (%.2fx fp32), 8 rows "
        "%.2f ms (%.2fx fp32)\n",
        bf16.weight_bytes() / 1e6, b1 * 1e3, b1 / op1, b8 * 1e3, b8 / op8);
  }
  std::printf("\n");

  double longest_ttft_ratio = 0;  // of the longest prompt
  if (!ttft_lengths.empty()) {
    std::printf("%8s %10s %14s %12s %14s\n", "prompt", "ttft_s", "prompt_tok/s", "floor_s",
                "ttft/floor");
    for (int t : ttft_lengths) {
      const double ttft = RunTtft(runner, pool, t, chunk, 7 + t);
      const double flops = PrefillFlops(c, floor.layer_params(), t, chunk);
      const double floor_s = flops / gemm_rate;
      std::printf("%8d %10.2f %14.1f %12.2f %14.2f\n", t, ttft, t / ttft, floor_s, ttft / floor_s);
      if (t == max_ttft) longest_ttft_ratio = ttft / floor_s;
      std::fflush(stdout);
    }
    std::printf("\n");
  }

  std::printf("%6s %10s %10s %14s %14s %14s %14s\n", "batch", "step_ms", "tokens/s", "linear_b_ms",
              "floor_b_ms", "step/floor_b", "prefill_tok/s");
  // Batch 1: each step paired with a read of the package's own weight bytes right after it.
  const std::optional<PackageWeightsRead> package_read = PackageWeightsRead::Open(model);
  DecodeResult paired;
  for (int b : batches) {
    const DecodeResult r = b == 1 && package_read
                               ? RunDecode(runner, pool, b, prompt_tokens, decode_tokens, 42 + b,
                                           [&package_read] { return package_read->ReadOnce(); })
                               : RunDecode(runner, pool, b, prompt_tokens, decode_tokens, 42 + b);
    if (b == 1) paired = r;
    const double linear_b = b == 1 ? floor1 : floor.Measure(b, 10);
    const double floor_b =
        std::max(stream1, 2.0 * b * static_cast<double>(floor.num_params()) / gemm_rate);
    std::printf("%6d %10.2f %10.1f %14.2f %14.2f %14.2f %14.1f\n", b, r.step_seconds * 1e3,
                b / r.step_seconds, linear_b * 1e3, floor_b * 1e3, r.step_seconds / floor_b,
                b * prompt_tokens / r.prefill_seconds);
    std::fflush(stdout);
  }
  if (paired.paired_ratio > 0) {
    std::printf(
        "\nbatch 1, each step against a read of the package's own %.0f MB of matrices right after "
        "it: median step/read %.2f (reads: median %.2f ms, %.1f GB/s)\n",
        package_read->bytes() / 1e6, paired.paired_ratio, paired.paired_floor_seconds * 1e3,
        package_read->bytes() / paired.paired_floor_seconds / 1e9);
  }
  // Issue 11's targets on this machine's default model, 2 threads (docs/performance.md "CPU").
  std::printf("\ntargets: ");
  if (longest_ttft_ratio > 0) {
    std::printf("%d-token TTFT %.2fx its FLOP floor (<= 1.3x for 7K: %s); ", max_ttft,
                longest_ttft_ratio, longest_ttft_ratio <= 1.3 ? "met" : "missed");
  }
  if (paired.paired_ratio > 0) {
    std::printf("batch-1 decode %.2fx its paired read of the weights (<= 1.2x: %s)",
                paired.paired_ratio, paired.paired_ratio <= 1.2 ? "met" : "missed");
  }
  std::printf("\n");
  return 0;
}
