#include "core/dysco/batch_ops.h"

#include <algorithm>
#include <string>

#include "core/base/scoped_timer.h"
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

// INTERNAL (a bug) unless the row of `c` can be updated at n keys: its relevance has n - 1 entries
// and its head mean, row out_row of out.probe_mean, covers the n keys.
Status CheckRelevanceInputs(const DyscoController& c, int64_t n, const ForwardOutput& out,
                            int64_t out_row) {
  const bool mean_row =
      out.probe_mean_device != nullptr
          ? out_row < out.batch_size
          : static_cast<int64_t>(out.probe_mean.size()) >= (out_row + 1) * out.probs_len;
  if (static_cast<int64_t>(c.relevance().size()) == n - 1 && out.probs_len >= n && mean_row) {
    return OkStatus();
  }
  return InternalError("DySCO relevance of a sequence at position " + std::to_string(n - 1) +
                       " has " + std::to_string(c.relevance().size()) + " entries, its head mean " +
                       std::to_string(mean_row ? out.probs_len : 0));
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
    DYSCO_RETURN_IF_ERROR(CheckRelevanceInputs(c, n, out, out_rows[d]));
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

Status DyscoBatchOps::StageSelection(const std::vector<const DyscoController*>& rows,
                                     const std::vector<int64_t>& num_keys, int64_t width) {
  const int64_t D = static_cast<int64_t>(rows.size());
  DYSCO_RETURN_IF_ERROR(staging_.Resize(D, width));
  for (int64_t d = 0; d < D; ++d) {
    const DyscoParams& p = rows[d]->params();
    PackRow(rows[d]->template_mask(), num_keys[d], staging_.template_mask() + d * width, width);
    staging_.num_keys()[d] = num_keys[d];
    staging_.top_p()[d] = p.top_p ? static_cast<float>(*p.top_p) : 0.0f;
    staging_.top_k()[d] = p.top_k ? *p.top_k : 0;
    staging_.strength()[d] = static_cast<float>(p.strength);
  }
  return OkStatus();
}

Status DyscoBatchOps::RunStagedSelection(const std::vector<int64_t>& num_keys, int64_t width,
                                         std::vector<DyscoSelection>* selections) {
  DYSCO_RETURN_IF_ERROR(staging_.Run());
  SelectionsOut(num_keys, width, selections);
  return OkStatus();
}

void DyscoBatchOps::SelectionsOut(const std::vector<int64_t>& num_keys, int64_t width,
                                  std::vector<DyscoSelection>* selections) const {
  const int64_t D = static_cast<int64_t>(num_keys.size());
  selections->resize(D);
  for (int64_t d = 0; d < D; ++d) {
    DyscoSelection& s = (*selections)[d];
    const int64_t n = num_keys[d];
    s.selected.assign(staging_.selected() + d * width, staging_.selected() + d * width + n);
    s.bias.assign(staging_.bias() + d * width, staging_.bias() + d * width + n);
    s.num_selected = static_cast<int64_t>(staging_.stats()[2 * d]);
    s.selected_mass = staging_.stats()[2 * d + 1];
  }
}

Status DyscoBatchOps::Select(const std::vector<const DyscoController*>& rows,
                             const std::vector<const std::vector<float>*>& relevance,
                             const std::vector<int64_t>& num_keys,
                             std::vector<DyscoSelection>* selections) {
  const int64_t w = MaxOf(num_keys);
  DYSCO_RETURN_IF_ERROR(StageSelection(rows, num_keys, w));
  for (size_t d = 0; d < rows.size(); ++d) {
    PackRow(*relevance[d], num_keys[d], staging_.relevance() + d * w, w);
  }
  return RunStagedSelection(num_keys, w, selections);
}

Status DyscoBatchOps::UpdateRelevanceAndSelect(const std::vector<const DyscoController*>& rows,
                                               const std::vector<int64_t>& num_keys,
                                               const ForwardOutput& out,
                                               std::vector<std::vector<float>>* relevance,
                                               std::vector<DyscoSelection>* selections) {
  DYSCO_RETURN_IF_ERROR(StartUpdateRelevanceAndSelect(rows, num_keys, out));
  return FinishUpdateRelevanceAndSelect(relevance, selections);
}

Status DyscoBatchOps::StartUpdateRelevanceAndSelect(const std::vector<const DyscoController*>& rows,
                                                    const std::vector<int64_t>& num_keys,
                                                    const ForwardOutput& out) {
  started_ = false;
  const int64_t D = static_cast<int64_t>(rows.size());
  const int64_t width = MaxOf(num_keys);
  // On a GPU the relevance update runs there, ahead of the selection: r_{t-1} and the head means
  // cross with the selection's inputs and r_t comes back with its results. On the host it runs in
  // place over the staged r_{t-1}, reading the head means where the forward left them.
  const bool on_device = staging_.on_device();
  // The head means where the forward left them on the device: the whole batch's, rows 0..D-1.
  const DeviceTensor* device_means = out.probe_mean_device.get();
  if (device_means != nullptr && (!on_device || out.batch_size != D)) {
    return InternalError("DySCO head means of " + std::to_string(out.batch_size) +
                         " rows left on the device for a relevance update of " + std::to_string(D) +
                         " rows on " + (on_device ? "the device" : "the host"));
  }
  StageSeconds& seconds = stage_seconds_;
  ++seconds.calls;
  {
    ScopedTimer timer(&seconds.pack);
    DYSCO_RETURN_IF_ERROR(StageSelection(rows, num_keys, width));
    for (int64_t d = 0; d < D; ++d) {
      const DyscoController& c = *rows[d];
      const int64_t n = num_keys[d];
      DYSCO_RETURN_IF_ERROR(CheckRelevanceInputs(c, n, out, d));
      PackRow(c.relevance(), n - 1, staging_.relevance() + d * width, width);
      staging_.decay()[d] = static_cast<float>(c.params().decay_factor);
      if (on_device && device_means == nullptr) {
        // Each row's head mean as a single head, as on the host.
        const float* mean = out.probe_mean_row(d);
        float* to = staging_.probs() + d * width;
        std::copy(mean, mean + n, to);
        std::fill(to + n, to + width, 0.0f);
      }
    }
  }
  if (!on_device) {
    // r_t in place over the staged r_{t-1}, the head means read where the forward left them (row
    // d of out.probe_mean, each a single head), then the selection over r_t: no copy in between.
    ScopedTimer timer(&seconds.update);
    DYSCO_RETURN_IF_ERROR(DyscoRelevanceUpdate(staging_.relevance(), D, width,
                                               out.probe_mean.data(), 1, out.probs_len,
                                               num_keys.data(), staging_.decay()));
  }
  {
    ScopedTimer timer(&seconds.select);
    DYSCO_RETURN_IF_ERROR(on_device ? staging_.StartWithRelevanceUpdate(device_means)
                                    : staging_.Run());
  }
  started_keys_ = num_keys;
  started_ = true;
  return OkStatus();
}

Status DyscoBatchOps::FinishUpdateRelevanceAndSelect(std::vector<std::vector<float>>* relevance,
                                                     std::vector<DyscoSelection>* selections) {
  if (!started_) return InternalError("DySCO selection finished without a start");
  started_ = false;
  StageSeconds& seconds = stage_seconds_;
  const std::vector<int64_t>& num_keys = started_keys_;
  const int64_t width = MaxOf(num_keys);  // Start's staging width
  {
    ScopedTimer timer(&seconds.results_out);
    DYSCO_RETURN_IF_ERROR(staging_.Wait());
    SelectionsOut(num_keys, width, selections);
  }
  ScopedTimer timer(&seconds.relevance_out);
  const int64_t D = static_cast<int64_t>(num_keys.size());
  relevance->resize(D);
  for (int64_t d = 0; d < D; ++d) {
    const float* row = staging_.relevance() + d * width;
    (*relevance)[d].assign(row, row + num_keys[d]);
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
