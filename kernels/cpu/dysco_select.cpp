// CPU DySCO selection and bias (docs/dysco.md "Ops"): dysco_select_bias,
// dysco_bias_from_selection and dysco_template_mask.
//
// Selection works on one 64-bit sort key per entry, (relevance descending, position ascending):
// a total order, so top-k by nth_element and the nucleus by a sorted prefix are exact and
// deterministic, ties included, and integer compares keep the sort fast at 128K keys. The nucleus
// sorts only as far as it must: chunks of the order are produced (nth_element on the rest, then
// sort of the chunk) until the running sum crosses top_p, or in hybrid mode until top_k entries: a
// nucleus of more than top_k entries is replaced by the top_k set, and one of exactly top_k entries
// is that same set, so neither needs the order past top_k.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_checks.h"
#include "kernels/dysco_constants.h"
#include "kernels/ops.h"

namespace dysco::kernels {
namespace {

// First chunk of the sorted order the nucleus produces; later chunks double. One chunk covers the
// default top_k = 4096 in hybrid mode.
constexpr int64_t kFirstSortedChunk = 4096;
constexpr uint64_t kPositionMask = 0xffffffffULL;
static_assert(static_cast<uint64_t>(cpu::kMaxSelectWidth) == kPositionMask,
              "CheckDyscoSelectBias must reject rows whose positions do not fit the sort key");

// Ascending order of keys = relevance descending, then position ascending. -0 ties with +0; NaN
// sorts after every number (never preferred).
uint64_t SortKey(float value, int64_t position) {
  uint32_t ascending = 0;  // NaN
  if (!std::isnan(value)) {
    uint32_t bits = 0;
    if (value != 0.0f) std::memcpy(&bits, &value, sizeof(bits));
    ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  }
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint64_t>(position);
}

// Sorts keys[0, m) and returns m: the nucleus size (at least 1, the entry whose running sum
// crosses top_p excluded), or `limit` when none of the first `limit` entries crosses.
int64_t NucleusPrefix(const float* relevance, int64_t n, float top_p, int64_t limit,
                      uint64_t* keys) {
  const double p = top_p;
  double sum = 0.0;
  int64_t sorted = 0;
  int64_t chunk = kFirstSortedChunk;
  while (sorted < limit) {
    const int64_t end = std::min(limit, sorted + chunk);
    if (end < n) std::nth_element(keys + sorted, keys + end, keys + n);
    std::sort(keys + sorted, keys + end);
    for (int64_t i = sorted; i < end; ++i) {
      sum += relevance[keys[i] & kPositionMask];
      if (sum > p) return std::max<int64_t>(i, 1);
    }
    sorted = end;
    chunk *= 2;
  }
  return limit;
}

// Leaves the selected entries of relevance[0, n) in keys[0, m) (in no particular order); returns m.
int64_t SelectRow(const float* relevance, int64_t n, float top_p, int64_t top_k,
                  std::vector<uint64_t>& keys) {
  if (n == 0) return 0;
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = SortKey(relevance[j], j);
  if (top_p <= 0.0f) {
    const int64_t m = std::min(top_k, n);
    if (m < n) std::nth_element(keys.begin(), keys.begin() + m, keys.end());
    return m;
  }
  const int64_t limit = top_k <= 0 ? n : std::min(top_k, n);
  return NucleusPrefix(relevance, n, top_p, limit, keys.data());
}

// bias[0, width) of one row, from selected[0, n) (docs/dysco.md "Ops").
void BiasRow(float* bias, const bool* selected, const bool* template_mask, int64_t n, int64_t width,
             float strength) {
  // Hard sparse attention from kHardMaskStrength (kernels/dysco_constants.h) up.
  if (static_cast<double>(strength) >= kHardMaskStrength) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) bias[j] = selected[j] ? 0.0f : neg_inf;
    if (n > 0) bias[n - 1] = 0.0f;
  } else {
    const float boost = static_cast<float>(std::log(static_cast<double>(strength)));
    for (int64_t j = 0; j < n; ++j) bias[j] = selected[j] && !template_mask[j] ? boost : 0.0f;
    if (n > 0) bias[n - 1] = boost;
  }
  std::fill(bias + n, bias + width, 0.0f);
}

}  // namespace

void dysco_select_bias_cpu(const at::Tensor& bias, const at::Tensor& selected,
                           const at::Tensor& stats, const at::Tensor& relevance,
                           const at::Tensor& num_keys, const at::Tensor& template_mask,
                           const at::Tensor& top_p, const at::Tensor& top_k,
                           const at::Tensor& strength) {
  cpu::CheckDyscoSelectBias(bias, selected, stats, relevance, num_keys, template_mask, top_p, top_k,
                            strength);
  const int64_t batch = relevance.size(0);
  const int64_t width = relevance.size(1);
  const int64_t* keys = num_keys.data_ptr<int64_t>();
  const float* strengths = strength.data_ptr<float>();
  const float* ps = top_p.data_ptr<float>();
  const int64_t* ks = top_k.data_ptr<int64_t>();
  if (relevance.numel() == 0) return;

  const float* rel = relevance.data_ptr<float>();
  const bool* tmpl = template_mask.data_ptr<bool>();
  float* bias_data = bias.data_ptr<float>();
  bool* sel_data = selected.data_ptr<bool>();
  float* stat_data = stats.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> sort_keys;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = keys[b];
      const float* row = rel + b * width;
      bool* sel = sel_data + b * width;
      const int64_t m = SelectRow(row, n, ps[b], ks[b], sort_keys);
      std::fill(sel, sel + width, false);
      for (int64_t i = 0; i < m; ++i) sel[sort_keys[i] & kPositionMask] = true;
      double mass = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        if (sel[j]) mass += row[j];
      }
      stat_data[2 * b] = static_cast<float>(m);
      stat_data[2 * b + 1] = static_cast<float>(mass);
      BiasRow(bias_data + b * width, sel, tmpl + b * width, n, width, strengths[b]);
    }
  });
}

void dysco_bias_from_selection_cpu(const at::Tensor& bias, const at::Tensor& selected,
                                   const at::Tensor& num_keys, const at::Tensor& template_mask,
                                   const at::Tensor& strength) {
  cpu::CheckDyscoBiasFromSelection(bias, selected, num_keys, template_mask, strength);
  const int64_t batch = bias.size(0);
  const int64_t width = bias.size(1);
  const int64_t* keys = num_keys.data_ptr<int64_t>();
  const float* strengths = strength.data_ptr<float>();
  if (bias.numel() == 0) return;

  const bool* sel = selected.data_ptr<bool>();
  const bool* tmpl = template_mask.data_ptr<bool>();
  float* bias_data = bias.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      BiasRow(bias_data + b * width, sel + b * width, tmpl + b * width, keys[b], width,
              strengths[b]);
    }
  });
}

void dysco_template_mask_cpu(const at::Tensor& mask, const at::Tensor& tokens,
                             const at::Tensor& sequences, const at::Tensor& sequence_offsets) {
  cpu::CheckDyscoTemplateMask(mask, tokens, sequences, sequence_offsets);
  const int64_t length = tokens.size(0);
  const int64_t num_sequences = sequence_offsets.size(0) - 1;
  const int64_t* offsets = sequence_offsets.data_ptr<int64_t>();
  if (length == 0) return;

  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* seq = sequences.data_ptr<int64_t>();
  // cover[i]: length of the longest template occurrence that starts at i (0: none). Occurrences
  // may overlap, so the marking pass below carries the end of the furthest one seen so far.
  std::vector<int64_t> cover(length, 0);
  at::parallel_for(0, length, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < num_sequences; ++k) {
      const int64_t* first = seq + offsets[k];
      const int64_t len = offsets[k + 1] - offsets[k];
      if (len == 0) continue;
      const int64_t head = first[0];
      const int64_t last_start = std::min(end, length - len + 1);
      for (int64_t i = begin; i < last_start; ++i) {
        if (tok[i] == head && len > cover[i] && std::equal(first + 1, first + len, tok + i + 1)) {
          cover[i] = len;
        }
      }
    }
  });
  bool* out = mask.data_ptr<bool>();
  int64_t covered_until = 0;
  for (int64_t i = 0; i < length; ++i) {
    covered_until = std::max(covered_until, i + cover[i]);
    out[i] = i < covered_until;
  }
}

}  // namespace dysco::kernels
