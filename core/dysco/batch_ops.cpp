#include "core/dysco/batch_ops.h"

#include <algorithm>
#include <string>

#include "core/model/dysco_host_ops.h"

namespace dysco {

namespace {

// Fills row [0, width) of `dst` from the first `count` entries of `src` (fewer if shorter), then
// zeros.
template <typename T>
void PackRow(const std::vector<T>& src, int64_t count, T* dst, int64_t width) {
  const int64_t k = std::min<int64_t>(count, static_cast<int64_t>(src.size()));
  std::copy(src.begin(), src.begin() + k, dst);
  std::fill(dst + k, dst + width, T{0});
}

template <typename T>
std::vector<T> RowPrefix(const std::vector<T>& packed, int64_t row, int64_t width, int64_t n) {
  const T* begin = packed.data() + row * width;
  return std::vector<T>(begin, begin + n);
}

int64_t MaxOf(const std::vector<int64_t>& v) {
  int64_t m = 0;
  for (int64_t x : v) m = std::max(m, x);
  return m;
}

}  // namespace

std::vector<std::pair<int, int>> UnionOfHeads(const std::vector<const DyscoController*>& rows) {
  std::vector<std::pair<int, int>> heads;
  for (const DyscoController* c : rows) {
    const auto& h = c->params().selected_heads;
    heads.insert(heads.end(), h.begin(), h.end());
  }
  std::sort(heads.begin(), heads.end());
  heads.erase(std::unique(heads.begin(), heads.end()), heads.end());
  return heads;
}

int DeepestHeadLayer(const std::vector<const DyscoController*>& rows) {
  int layer = 0;
  for (const DyscoController* c : rows) layer = std::max(layer, c->params().max_head_layer());
  return layer;
}

std::vector<std::vector<int>> ProbeMeanHeads(const std::vector<const DyscoController*>& rows,
                                             const std::vector<std::pair<int, int>>& probe_heads) {
  std::vector<std::vector<int>> lists;
  lists.reserve(rows.size());
  for (const DyscoController* c : rows) {
    std::vector<int>& list = lists.emplace_back();
    for (const auto& head : c->params().selected_heads) {
      const auto it = std::lower_bound(probe_heads.begin(), probe_heads.end(), head);
      list.push_back(static_cast<int>(it - probe_heads.begin()));
    }
  }
  return lists;
}

Status DyscoBatchOps::UpdateRelevance(const std::vector<const DyscoController*>& rows,
                                      const std::vector<int64_t>& num_keys,
                                      const ForwardOutput& out,
                                      const std::vector<int64_t>& out_rows,
                                      std::vector<std::vector<float>>* relevance) {
  const int64_t D = static_cast<int64_t>(rows.size());
  const int64_t width = MaxOf(num_keys);
  relevance_.resize(D * width);
  probs_.resize(D * width);
  decay_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const DyscoController& c = *rows[d];
    const int64_t n = num_keys[d];
    if (static_cast<int64_t>(c.relevance().size()) != n - 1 || out.probs_len < n ||
        static_cast<int64_t>(out.probe_mean.size()) < (out_rows[d] + 1) * out.probs_len) {
      return InternalError("DySCO relevance of a sequence at position " + std::to_string(n - 1) +
                           " has " + std::to_string(c.relevance().size()) +
                           " entries, its head mean " +
                           std::to_string(out.probe_mean.empty() ? 0 : out.probs_len));
    }
    // The head mean is handed to the op as a single head: each row is then independent of which
    // heads (and how many) its batch-mates have.
    const float* mean = out.probe_mean_row(out_rows[d]);
    std::copy(mean, mean + n, probs_.data() + d * width);
    std::fill(probs_.data() + d * width + n, probs_.data() + (d + 1) * width, 0.0f);
    PackRow(c.relevance(), n - 1, relevance_.data() + d * width, width);
    decay_[d] = static_cast<float>(c.params().decay_factor);
  }
  DYSCO_RETURN_IF_ERROR(DyscoRelevanceUpdate(relevance_.data(), D, width, probs_.data(), 1, width,
                                             num_keys.data(), decay_.data()));
  relevance->resize(D);
  for (int64_t d = 0; d < D; ++d) (*relevance)[d] = RowPrefix(relevance_, d, width, num_keys[d]);
  return OkStatus();
}

Status DyscoBatchOps::Select(const std::vector<const DyscoController*>& rows,
                             const std::vector<const std::vector<float>*>& relevance,
                             const std::vector<int64_t>& num_keys,
                             std::vector<DyscoSelection>* selections) {
  const int64_t D = static_cast<int64_t>(rows.size());
  const int64_t w = MaxOf(num_keys);
  relevance_.resize(D * w);
  template_.resize(D * w);
  bias_.resize(D * w);
  selected_.resize(D * w);
  stats_.resize(D * 2);
  top_p_.resize(D);
  top_k_.resize(D);
  strength_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const DyscoParams& p = rows[d]->params();
    PackRow(*relevance[d], num_keys[d], relevance_.data() + d * w, w);
    PackRow(rows[d]->template_mask(), num_keys[d], template_.data() + d * w, w);
    top_p_[d] = p.top_p ? static_cast<float>(*p.top_p) : 0.0f;
    top_k_[d] = p.top_k ? *p.top_k : 0;
    strength_[d] = static_cast<float>(p.strength);
  }
  DYSCO_RETURN_IF_ERROR(DyscoSelectBias(bias_.data(), selected_.data(), stats_.data(),
                                        relevance_.data(), D, w, num_keys.data(), template_.data(),
                                        top_p_.data(), top_k_.data(), strength_.data(), device_));
  selections->resize(D);
  for (int64_t d = 0; d < D; ++d) {
    DyscoSelection& s = (*selections)[d];
    s.selected = RowPrefix(selected_, d, w, num_keys[d]);
    s.bias = RowPrefix(bias_, d, w, num_keys[d]);
    s.num_selected = static_cast<int64_t>(stats_[2 * d]);
    s.selected_mass = stats_[2 * d + 1];
  }
  return OkStatus();
}

Status DyscoBatchOps::BiasFromSelection(const std::vector<const DyscoController*>& rows,
                                        const std::vector<const std::vector<uint8_t>*>& selected,
                                        const std::vector<int64_t>& num_keys,
                                        std::vector<std::vector<float>>* bias) {
  const int64_t D = static_cast<int64_t>(rows.size());
  const int64_t width = MaxOf(num_keys);
  selected_.resize(D * width);
  template_.resize(D * width);
  bias_.resize(D * width);
  strength_.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    PackRow(*selected[d], num_keys[d], selected_.data() + d * width, width);
    PackRow(rows[d]->template_mask(), num_keys[d], template_.data() + d * width, width);
    strength_[d] = static_cast<float>(rows[d]->params().strength);
  }
  DYSCO_RETURN_IF_ERROR(DyscoBiasFromSelection(bias_.data(), selected_.data(), D, width,
                                               num_keys.data(), template_.data(),
                                               strength_.data()));
  bias->resize(D);
  for (int64_t d = 0; d < D; ++d) (*bias)[d] = RowPrefix(bias_, d, width, num_keys[d]);
  return OkStatus();
}

}  // namespace dysco
