// bench-decode: CPU decode throughput of a model package at batch 1 and larger batches, next to a
// floor measured in the same run: the time of the model's weight matmuls alone (at::linear with the
// same weight shapes and dtype, same threads). decode_step_time / matmul_floor says how much the
// rest of a step (our attention ops, norms, RoPE, TorchScript overhead, input building) costs on
// top of the unavoidable weight traffic.
//
// usage: bench-decode --model DIR [--prompt-tokens N] [--decode-tokens N] [--batch B] [--threads N]
//                     [--jit-optimize 0|1]
//   --batch B measures batch 1 and B (default: 1, 4 and 8). --jit-optimize 1 turns TorchScript's
//   profiling graph executor on (ModelRunnerOptions::jit_optimize).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/script.h>

#include "core/engine/engine.h"

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
         "[--threads N] [--jit-optimize 0|1]\n";
  std::exit(2);
}

int ParsePositive(const std::string& flag, const char* value) {
  char* end = nullptr;
  const long x = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || x <= 0 || x > 1000000)
    Usage(flag + " needs a positive integer");
  return static_cast<int>(x);
}

at::ScalarType ToScalarType(dysco::ModelDtype dtype) {
  switch (dtype) {
    case dysco::ModelDtype::kFloat32:
      return at::kFloat;
    case dysco::ModelDtype::kBFloat16:
      return at::kBFloat16;
    case dysco::ModelDtype::kFloat16:
      return at::kHalf;
  }
  return at::kFloat;
}

// One decode step's weight matmuls: per layer q, k, v, o, gate, up, down, then the LM head.
// Distinct weight tensors per layer, so that (as in the model) every weight comes from memory, not
// from cache.
class MatmulFloor {
 public:
  explicit MatmulFloor(const dysco::ModelConfig& c) : c_(c) {
    const auto opts = at::TensorOptions().dtype(ToScalarType(c.dtype));
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
    const auto opts = at::TensorOptions().dtype(weights_[0].scalar_type());
    at::Tensor x_hidden = at::randn({batch, c_.hidden_size}, opts);
    at::Tensor x_q = at::randn({batch, int64_t{c_.num_attention_heads} * c_.head_dim}, opts);
    at::Tensor x_ffn = at::randn({batch, c_.intermediate_size}, opts);
    std::vector<double> times;
    for (int r = 0; r < reps + 2; ++r) {
      const auto t0 = Clock::now();
      for (size_t i = 0; i < weights_.size(); ++i) {
        const at::Tensor& w = weights_[i];
        const at::Tensor& x = w.size(1) == c_.hidden_size         ? x_hidden
                              : w.size(1) == c_.intermediate_size ? x_ffn
                                                                  : x_q;
        at::Tensor y = at::linear(x, w);
        (void)y;
      }
      if (r >= 2) times.push_back(Seconds(t0, Clock::now()));
    }
    return Median(times);
  }

  // The same pass as matrix-vector products (at::mv), batch 1 only: BLAS gemv is often much faster
  // than a one-row gemm, so this shows what a decode step could reach with a gemv path.
  double MeasureGemv(int reps) {
    c10::InferenceMode guard;
    const auto opts = at::TensorOptions().dtype(weights_[0].scalar_type());
    at::Tensor x_hidden = at::randn({c_.hidden_size}, opts);
    at::Tensor x_q = at::randn({int64_t{c_.num_attention_heads} * c_.head_dim}, opts);
    at::Tensor x_ffn = at::randn({c_.intermediate_size}, opts);
    std::vector<double> times;
    for (int r = 0; r < reps + 2; ++r) {
      const auto t0 = Clock::now();
      for (const at::Tensor& w : weights_) {
        const at::Tensor& x = w.size(1) == c_.hidden_size         ? x_hidden
                              : w.size(1) == c_.intermediate_size ? x_ffn
                                                                  : x_q;
        at::Tensor y = at::mv(w, x);
        (void)y;
      }
      if (r >= 2) times.push_back(Seconds(t0, Clock::now()));
    }
    return Median(times);
  }

  int64_t num_params() const {
    int64_t n = 0;
    for (const auto& w : weights_) n += w.numel();
    return n;
  }

 private:
  dysco::ModelConfig c_;
  std::vector<at::Tensor> weights_;
};

struct DecodeResult {
  double prefill_seconds = 0;  // whole batch prefill
  double step_seconds = 0;     // median decode step
};

// Prefills `batch` random prompts (one step each) and then decodes `decode_tokens` greedy steps
// with the whole batch in every step.
DecodeResult RunDecode(dysco::ModelRunner& runner, dysco::KvPagePool& pool, int batch,
                       int prompt_tokens, int decode_tokens, uint64_t seed) {
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

  std::vector<double> times;
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
  }
  if (times.size() > 4) times.erase(times.begin(), times.begin() + 2);  // warm-up steps
  result.step_seconds = Median(times);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  int prompt_tokens = 128, decode_tokens = 64, threads = 0, batch_flag = 0;
  bool jit_optimize = false;
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
    } else {
      Usage("unknown flag " + flag);
    }
  }
  if (model.empty()) Usage("--model is required");
  std::vector<int> batches = {1, 4, 8};
  if (batch_flag > 0)
    batches = batch_flag == 1 ? std::vector<int>{1} : std::vector<int>{1, batch_flag};

  const int max_batch = *std::max_element(batches.begin(), batches.end());
  dysco::EngineOptions options;
  options.runner.num_threads = threads;
  options.runner.jit_optimize = jit_optimize;
  options.kv_pages = int64_t{max_batch} * ((prompt_tokens + decode_tokens + 15) / 16);
  options.start_scheduler = false;
  auto engine = dysco::Engine::Load(model, options);
  if (!engine.ok()) {
    std::cerr << "bench-decode: " << engine.status().ToString() << "\n";
    return 1;
  }
  dysco::ModelRunner& runner = (*engine)->runner();
  dysco::KvPagePool& pool = (*engine)->pool();
  const dysco::ModelConfig& c = runner.config();
  if (prompt_tokens + decode_tokens > c.max_position_embeddings)
    Usage("prompt + decode tokens exceed the context");

  std::printf(
      "model %s (%s, %d layers, hidden %lld, vocab %lld), %d threads, prompt %d tokens, %d decode "
      "steps\n",
      c.model_name.c_str(), dysco::ModelDtypeName(c.dtype), c.num_layers,
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.vocab_size),
      at::get_num_threads(), prompt_tokens, decode_tokens);
  MatmulFloor floor(c);
  const double floor1 = floor.Measure(1, 20);
  const double gemv1 = floor.MeasureGemv(20);
  std::printf("matmul floor (batch 1, %.1fM weight params): at::linear %.2f ms, at::mv %.2f ms\n\n",
              floor.num_params() / 1e6, floor1 * 1e3, gemv1 * 1e3);
  std::printf("%6s %14s %12s %14s %16s %14s\n", "batch", "step_ms", "tokens/s", "floor_b_ms",
              "step/floor(b=1)", "prefill_tok/s");
  for (int b : batches) {
    const DecodeResult r = RunDecode(runner, pool, b, prompt_tokens, decode_tokens, 42 + b);
    const double floor_b = b == 1 ? floor1 : floor.Measure(b, 10);
    std::printf("%6d %14.2f %12.1f %14.2f %16.2f %14.1f\n", b, r.step_seconds * 1e3,
                b / r.step_seconds, floor_b * 1e3, r.step_seconds / floor1,
                b * prompt_tokens / r.prefill_seconds);
    std::fflush(stdout);
  }
  return 0;
}
