// DyscoBatchOps: the DySCO computations of one engine step, run for many sequences at once with one
// op call each (relevance update, selection + bias, bias of a frozen set; docs/dysco.md "Ops").
// Each reads its rows' state through their DyscoControllers' const views (or values the caller
// staged), calls the op on packed host buffers, and returns every row's result as a value. Nothing
// here writes a controller: the caller applies the results (DyscoController::Apply*) once the whole
// step has succeeded, so a failed step leaves every sequence's DySCO state as it was.
//
// Every computation is per row: a row's result does not depend on its batch-mates (their heads,
// parameters or lengths), which is what lets DySCO sequences with different parameters share a
// step and still equal their solo runs.
//
// Thread-safety: one DyscoBatchOps per stepping thread (it keeps staging buffers). Ownership:
// borrows the controllers, views and forward output for the call only; results are the caller's.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/dysco/controller.h"
#include "core/model/dysco_host_ops.h"
#include "core/model/model_runner.h"

namespace dysco {

// Sorted, duplicate-free union of the selected heads of `rows`: the probe heads of a pass.
std::vector<std::pair<int, int>> UnionOfHeads(const std::vector<const DyscoController*>& rows);
// The deepest selected-head layer of `rows`: the last layer a speculative pass must run.
int DeepestHeadLayer(const std::vector<const DyscoController*>& rows);
// ForwardBatch::probe_mean_heads of `rows`: each row's selected heads, in its own order, as
// indices into `probe_heads` (which must hold them all, e.g. UnionOfHeads of the rows).
std::vector<std::vector<int>> ProbeMeanHeads(const std::vector<const DyscoController*>& rows,
                                             const std::vector<std::pair<int, int>>& probe_heads);

class DyscoBatchOps {
 public:
  // `device`: where the selection op runs ("cpu", "cuda:0": the model's device). On a GPU the
  // selection is one kernel for all rows instead of a host sort per row; its inputs and results
  // cross as [rows, keys] buffers (docs/gpu.md "DySCO on the device").
  explicit DyscoBatchOps(std::string device = "cpu") : staging_(std::move(device)) {}

  // Whether the ops run on a GPU: a speculative pass may then leave its head means there
  // (ForwardBatch::probe_mean_on_device) for UpdateRelevanceAndSelect.
  bool on_device() const { return staging_.on_device(); }

  // r_t of each row: row d fed the token at position num_keys[d] - 1 with r_{t-1} =
  // rows[d]->relevance(); the mean of its heads' attention probabilities is row out_rows[d] of
  // out.probe_mean (the forward ran with ProbeMeanHeads of its rows).
  Status UpdateRelevance(const std::vector<const DyscoController*>& rows,
                         const std::vector<int64_t>& num_keys, const ForwardOutput& out,
                         const std::vector<int64_t>& out_rows,
                         std::vector<std::vector<float>>* relevance);
  // Selection (and its bias) of each row over the first num_keys[d] entries of *relevance[d].
  Status Select(const std::vector<const DyscoController*>& rows,
                const std::vector<const std::vector<float>*>& relevance,
                const std::vector<int64_t>& num_keys, std::vector<DyscoSelection>* selections);
  // UpdateRelevance with out_rows = 0, 1, ..., then Select over the new relevance, with the
  // relevance updated in place in the selection's staging buffer (one copy of each row in and one
  // of each result out; on a GPU one transfer each way, and the update runs there too). The head
  // means are read from out.probe_mean_device when the forward left them on the GPU (INTERNAL on
  // the host), else from out.probe_mean. The same results as the two calls; on a GPU r_t may
  // differ from the host op's in the last bit (the float64 sum's order, docs/dysco.md "Ops").
  Status UpdateRelevanceAndSelect(const std::vector<const DyscoController*>& rows,
                                  const std::vector<int64_t>& num_keys, const ForwardOutput& out,
                                  std::vector<std::vector<float>>* relevance,
                                  std::vector<DyscoSelection>* selections);
  // UpdateRelevanceAndSelect in two halves. Start packs the inputs and, on a GPU, queues the ops
  // and the copy of their results back without waiting for them; DeviceBias(d) then gives row d's
  // bias where the op wrote it (null on the host), for the real pass queued after it
  // (ForwardRow::key_bias_device), and Finish waits for the results and copies them out. Why: the
  // device then runs the speculative pass, the selection and the real pass back to back, and the
  // host copies the results out while the real pass runs (docs/gpu.md "The DySCO stage without a
  // wait"). The rows, keys and forward output are read by Start only. A Start without its Finish
  // (a failed step) is waited for by the next call.
  Status StartUpdateRelevanceAndSelect(const std::vector<const DyscoController*>& rows,
                                       const std::vector<int64_t>& num_keys,
                                       const ForwardOutput& out);
  std::shared_ptr<const DeviceTensor> DeviceBias(int64_t d) const { return staging_.DeviceBias(d); }
  Status FinishUpdateRelevanceAndSelect(std::vector<std::vector<float>>* relevance,
                                        std::vector<DyscoSelection>* selections);
  // Where UpdateRelevanceAndSelect's wall time went, summed over its calls (bench-gpu prints it per
  // step; docs/gpu.md "DySCO on the device"): packing the inputs into the staging buffer (template
  // masks, parameters, r_{t-1}; on a GPU also the head means), the relevance update on the host
  // (zero on a GPU, where it runs with the selection), copying r_t out, the selection (on a GPU:
  // the copy in, the relevance update's and the selection's kernels, the copy back and the wait),
  // copying the sets and biases out. With Start / Finish, `select` is the time to queue the ops on
  // a GPU and the wait is in Finish's `results_out`.
  struct StageSeconds {
    double pack = 0.0;
    double update = 0.0;
    double relevance_out = 0.0;
    double select = 0.0;
    double results_out = 0.0;
    int64_t calls = 0;
  };
  const StageSeconds& stage_seconds() const { return stage_seconds_; }

  // The bias of each row's set *selected[d] over num_keys[d] keys (new keys unselected; the
  // current one still gets the bias from the op).
  Status BiasFromSelection(const std::vector<const DyscoController*>& rows,
                           const std::vector<const std::vector<uint8_t>*>& selected,
                           const std::vector<int64_t>& num_keys,
                           std::vector<std::vector<float>>* bias);

 private:
  // Packs the selection inputs but the relevance (template masks, num_keys, parameters) of [rows,
  // width] into staging_.
  Status StageSelection(const std::vector<const DyscoController*>& rows,
                        const std::vector<int64_t>& num_keys, int64_t width);
  // Runs the staged selection and copies each row's results out.
  Status RunStagedSelection(const std::vector<int64_t>& num_keys, int64_t width,
                            std::vector<DyscoSelection>* selections);
  // Copies each row's selection out of the staging buffer (its results must be there).
  void SelectionsOut(const std::vector<int64_t>& num_keys, int64_t width,
                     std::vector<DyscoSelection>* selections) const;

  DyscoSelectStaging staging_;
  std::vector<float> relevance_, probs_, bias_, decay_, strength_;
  std::vector<uint8_t> selected_, template_;
  StageSeconds stage_seconds_;
  // The rows' keys of the started update and selection, for Finish (the staging width is their
  // maximum, as Start computed it).
  std::vector<int64_t> started_keys_;
  bool started_ = false;
};

}  // namespace dysco
