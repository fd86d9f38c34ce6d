// bench-kernels: microseconds per call of the dysco CPU attention ops at decode and prefill shapes
// of SmolLM2-135M (Hq = 9, Hkv = 3, D = 64, page size 16), fp32; the decode call also with its
// caches cold, as a decode step leaves them (docs/performance.md "The step's parts, timed from
// inside"). Usage: bench-kernels [--threads N]
// [--cpu-time] [--max-isa 0|1|2]
// --cpu-time times the calling thread's CPU time instead of wall time: with --threads 1 on a busy
// machine it leaves out the time the benchmark was not scheduled.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bench/micro_timer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "kernels/cpu/attention_kernel.h"
#include "kernels/op_calls.h"

namespace {

constexpr int64_t kQueryHeads = 9;
constexpr int64_t kKvHeads = 3;
constexpr int64_t kHeadDim = 64;
constexpr int64_t kPageSize = 16;

struct Cache {
  at::Tensor kv;            // [2, NP, 16, 3, 64]
  at::Tensor block_tables;  // int32 [B, P], shuffled pages
  at::Tensor seq_lens;      // int64 [B]
};

Cache MakeCache(int64_t batch, int64_t seq_len) {
  const int64_t pages_per_seq = (seq_len + kPageSize - 1) / kPageSize;
  Cache cache;
  cache.kv = at::randn({2, batch * pages_per_seq, kPageSize, kKvHeads, kHeadDim});
  cache.block_tables =
      at::randperm(batch * pages_per_seq, at::kLong).to(at::kInt).reshape({batch, pages_per_seq});
  cache.seq_lens = at::full({batch}, seq_len, at::kLong);
  return cache;
}

}  // namespace

int main(int argc, char** argv) {
  bool cpu_time = false;
  int max_isa = 2;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      at::set_num_threads(std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--cpu-time") == 0) {
      cpu_time = true;
    } else if (std::strcmp(argv[i], "--max-isa") == 0 && i + 1 < argc) {
      // Caps the kernels' instruction set (0 baseline, 1 x86-64-v3, 2 x86-64-v4), to compare the
      // paths of one build back to back.
      max_isa = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--help") == 0) {
      std::printf("usage: %s [--threads N] [--cpu-time] [--max-isa 0|1|2]\n", argv[0]);
      return 0;
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--cpu-time] [--max-isa 0|1|2]\n", argv[0]);
      return 2;
    }
  }
  const dysco::bench::MicroTimer timer(cpu_time, /*repetitions=*/15);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  namespace cpu = dysco::kernels::cpu;
  cpu::SetCpuIsaCapForTesting(static_cast<cpu::CpuIsa>(max_isa));
  std::printf("threads %d, %s time, kernels' instruction set %d (this machine: up to %d)\n",
              at::get_num_threads(), cpu_time ? "thread CPU" : "wall",
              std::min(max_isa, static_cast<int>(cpu::SupportedCpuIsa())),
              static_cast<int>(cpu::SupportedCpuIsa()));

  std::printf("\npaged_attention_decode, fp32, us per call (no bias / with bias)\n%8s", "B\\seq");
  const std::vector<int64_t> lens = {512, 1024, 2048, 4096};
  for (int64_t len : lens) std::printf("%20lld", static_cast<long long>(len));
  std::printf("\n");
  for (int64_t batch : {1, 2, 4, 8}) {
    std::printf("%8lld", static_cast<long long>(batch));
    for (int64_t len : lens) {
      const Cache cache = MakeCache(batch, len);
      const at::Tensor query = at::randn({batch, kQueryHeads, kHeadDim});
      const at::Tensor out = at::empty_like(query);
      const at::Tensor bias = at::randn({batch, len});
      const double plain = timer.MinMicros([&] {
        dysco::ops::paged_attention_decode(out, query, cache.kv, cache.block_tables, cache.seq_lens,
                                           scale, c10::nullopt);
      });
      const double biased = timer.MinMicros([&] {
        dysco::ops::paged_attention_decode(out, query, cache.kv, cache.block_tables, cache.seq_lens,
                                           scale, bias);
      });
      std::printf("%11.1f /%7.1f", plain, biased);
    }
    std::printf("\n");
  }

  // A decode step calls the attention right after its GEMVs have streamed megabytes of weights
  // through the caches. The same call (B = 1, 192 keys) after a 64 MiB sweep read by all threads
  // (code, data and TLB entries evicted; the threads awake, as in a step), after the sweep and a
  // read of the call's K/V and query (its data warm again), and warm. Median of 200 calls each.
  {
    const int64_t len = 192;
    const Cache cache = MakeCache(1, len);
    const at::Tensor query = at::randn({1, kQueryHeads, kHeadDim});
    const at::Tensor out = at::empty_like(query);
    std::vector<float> sweep_buffer((64 << 20) / sizeof(float), 1.0f);
    std::atomic<float> sink{0.0f};
    auto read_all = [&sink](const float* data, int64_t n) {
      at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
        float acc = 0.0f;
        for (int64_t i = begin; i < end; i += 16) acc += data[i];
        sink.store(sink.load(std::memory_order_relaxed) + acc, std::memory_order_relaxed);
      });
    };
    auto median_us = [&](bool sweep, bool warm_data) {
      std::vector<double> samples;
      for (int rep = 0; rep < 200; ++rep) {
        if (sweep) read_all(sweep_buffer.data(), static_cast<int64_t>(sweep_buffer.size()));
        if (warm_data) {
          read_all(cache.kv.data_ptr<float>(), cache.kv.numel());
          read_all(query.data_ptr<float>(), query.numel());
        }
        const double t0 = timer.NowSeconds();
        dysco::ops::paged_attention_decode(out, query, cache.kv, cache.block_tables, cache.seq_lens,
                                           scale, c10::nullopt);
        samples.push_back((timer.NowSeconds() - t0) * 1e6);
      }
      std::nth_element(samples.begin(), samples.begin() + 100, samples.end());
      return samples[100];
    };
    const double cold = median_us(true, false);
    const double data_warm = median_us(true, true);
    const double warm = median_us(false, false);
    std::printf(
        "\npaged_attention_decode, B=1, 192 keys, us per call (median of 200): after a 64 MiB "
        "sweep "
        "%.1f, after the sweep and a read of its K/V %.1f, warm %.1f\n",
        cold, data_warm, warm);
  }

  std::printf("\nattention_probs, 2 heads, B=1, us per call\n");
  for (int64_t len : lens) {
    const Cache cache = MakeCache(1, len);
    const at::Tensor query = at::randn({1, kQueryHeads, kHeadDim});
    const at::Tensor out = at::empty({1, 2, len});
    const at::Tensor heads = at::tensor({3, 0}, at::kLong);
    std::printf("  seq %5lld: %9.1f\n", static_cast<long long>(len), timer.MinMicros([&] {
      dysco::ops::attention_probs(out, query, cache.kv, cache.block_tables, cache.seq_lens, heads,
                                  scale, c10::nullopt);
    }));
  }

  // The floor of the prefill lines: the matmul rate of this run (same threads, same timer), as
  // bench-decode measures it: at::linear with 256 rows (a prefill chunk) through one of the model's
  // weights (SmolLM2-135M's MLP gate, 576 -> 1536), so that the lines read as a fraction of it.
  const at::Tensor gemm_x = at::randn({256, 576});
  const at::Tensor gemm_w = at::randn({1536, 576});
  const double gemm_us = timer.MinMicros([&] { (void)at::linear(gemm_x, gemm_w); });
  const double gemm_gflops = 2.0 * 256 * 576 * 1536 / gemm_us / 1e3;
  std::printf("\nGEMM rate, at::linear 256 x 576 -> 1536: %.1f us (%.2f GFLOP/s)\n", gemm_us,
              gemm_gflops);

  std::printf(
      "\npaged_attention_prefill, one sequence, chunk of new tokens at the end, us per call\n");
  for (auto [len, chunk] :
       std::vector<std::pair<int64_t, int64_t>>{{512, 512}, {2048, 512}, {4096, 512}}) {
    const Cache cache = MakeCache(1, len);
    const at::Tensor query = at::randn({chunk, kQueryHeads, kHeadDim});
    const at::Tensor out = at::empty_like(query);
    const at::Tensor starts = at::tensor({int64_t{0}, chunk}, at::kLong);
    const double us = timer.MinMicros([&] {
      dysco::ops::paged_attention_prefill(out, query, cache.kv, cache.block_tables, cache.seq_lens,
                                          starts, scale, c10::nullopt);
    });
    const double gflops = 4.0 * kQueryHeads * kHeadDim * chunk * (len - chunk / 2.0) / us / 1e3;
    std::printf("  seq %5lld chunk %4lld: %10.1f  (%.2f GFLOP/s, %.2fx the GEMM rate)\n",
                static_cast<long long>(len), static_cast<long long>(chunk), us, gflops,
                gflops / gemm_gflops);
  }
  return 0;
}
