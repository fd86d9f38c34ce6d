// bench-dysco-ops: microseconds per call of the DySCO CPU ops (docs/dysco.md "Ops") for B = 1..8
// sequences of n = 4K, 32K and 128K keys, 16 retrieval heads, the reference defaults (top_p 0.975,
// top_k 4096, strength 2). Usage: bench-dysco-ops [--threads N] [--cpu-time]
// --cpu-time times the calling thread's CPU time instead of wall time (see bench-kernels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bench/micro_timer.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "kernels/op_calls.h"

namespace {

constexpr int64_t kHeads = 16;

// A relevance-like distribution: most mass on a few hundred keys, a long flat tail.
at::Tensor PeakedRelevance(int64_t batch, int64_t n) {
  at::Tensor r = at::rand({batch, n}).pow(8.0) + 1e-3 * at::rand({batch, n});
  return r / r.sum(1, true);
}

}  // namespace

int main(int argc, char** argv) {
  bool cpu_time = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      at::set_num_threads(std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--cpu-time") == 0) {
      cpu_time = true;
    } else if (std::strcmp(argv[i], "--help") == 0) {
      std::printf("usage: %s [--threads N] [--cpu-time]\n", argv[0]);
      return 0;
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--cpu-time]\n", argv[0]);
      return 2;
    }
  }
  const dysco::bench::MicroTimer timer(cpu_time, /*repetitions=*/7);
  std::printf("threads %d, %s time, us per call\n", at::get_num_threads(),
              cpu_time ? "thread CPU" : "wall");

  const std::vector<int64_t> lens = {4096, 32768, 131072};
  struct Mode {
    const char* name;
    float top_p;
    int64_t top_k;
  };
  const std::vector<Mode> modes = {
      {"select_bias hybrid p=0.975 k=4096", 0.975f, 4096},
      {"select_bias top_p=0.975", 0.975f, 0},
      {"select_bias top_k=4096", 0.0f, 4096},
  };
  std::printf("\n%-36s %4s", "op", "B");
  for (int64_t n : lens) std::printf("%12lld", static_cast<long long>(n));
  std::printf("\n");
  for (int64_t batch : {1, 2, 4, 8}) {
    std::vector<double> us_update, us_update_mean, us_bias;
    std::vector<std::vector<double>> us_select(modes.size());
    std::vector<double> nucleus(lens.size());
    for (size_t li = 0; li < lens.size(); ++li) {
      const int64_t n = lens[li];
      const at::Tensor num_keys = at::full({batch}, n, at::kLong);
      const at::Tensor probs = at::softmax(at::randn({batch, kHeads, n}) * 3.0, -1);
      const at::Tensor decay = at::full({batch}, 0.75f);
      const at::Tensor relevance = PeakedRelevance(batch, n);
      const at::Tensor scratch = relevance.clone();
      us_update.push_back(timer.MinMicros(
          [&] { dysco::ops::dysco_relevance_update(scratch, probs, num_keys, decay); }));
      // One head: the head mean the model runner takes on the device (docs/gpu.md "DySCO on the
      // device"), what a GPU step's update reads.
      const at::Tensor mean = probs.mean(1, /*keepdim=*/true);
      us_update_mean.push_back(timer.MinMicros(
          [&] { dysco::ops::dysco_relevance_update(scratch, mean, num_keys, decay); }));
      const at::Tensor tmpl = at::rand({batch, n}) < 0.01;
      const at::Tensor bias = at::empty({batch, n});
      const at::Tensor selected = at::empty({batch, n}, at::kBool);
      const at::Tensor stats = at::empty({batch, 2});
      const at::Tensor strength = at::full({batch}, 2.0f);
      for (size_t m = 0; m < modes.size(); ++m) {
        const at::Tensor top_p = at::full({batch}, modes[m].top_p);
        const at::Tensor top_k = at::full({batch}, modes[m].top_k, at::kLong);
        us_select[m].push_back(timer.MinMicros([&] {
          dysco::ops::dysco_select_bias(bias, selected, stats, relevance, num_keys, tmpl, top_p,
                                        top_k, strength);
        }));
        if (modes[m].top_k == 0) nucleus[li] = stats[0][0].item<float>();
      }
      us_bias.push_back(timer.MinMicros([&] {
        dysco::ops::dysco_bias_from_selection(bias, selected, num_keys, tmpl, strength);
      }));
    }
    auto row = [&](const char* name, const std::vector<double>& us) {
      std::printf("%-36s %4lld", name, static_cast<long long>(batch));
      for (double v : us) std::printf("%12.1f", v);
      std::printf("\n");
    };
    row("relevance_update (16 heads)", us_update);
    row("relevance_update (1 head: the mean)", us_update_mean);
    for (size_t m = 0; m < modes.size(); ++m) row(modes[m].name, us_select[m]);
    row("bias_from_selection", us_bias);
    if (batch == 1) {
      std::printf("%-36s %4s", "  (nucleus size at top_p=0.975)", "");
      for (double v : nucleus) std::printf("%12.0f", v);
      std::printf("\n");
    }
  }

  std::printf("\ntemplate_mask, 3 sequences of 3-5 tokens, vocabulary 1000\n");
  const at::Tensor sequences = at::tensor({1, 9690, 198, 1, 520, 9690, 198, 2, 198}, at::kLong);
  const at::Tensor offsets = at::tensor({0, 3, 7, 9}, at::kLong);
  for (int64_t n : lens) {
    const at::Tensor tokens = at::randint(0, 1000, {n}, at::kLong);
    const at::Tensor mask = at::empty({n}, at::kBool);
    std::printf("  P %6lld: %10.1f\n", static_cast<long long>(n), timer.MinMicros([&] {
      dysco::ops::dysco_template_mask(mask, tokens, sequences, offsets);
    }));
  }
  return 0;
}
