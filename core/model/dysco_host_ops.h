// Host-buffer entry points of the DySCO ops (torch.ops.dysco.*, schemas and semantics in
// docs/dysco.md "Ops"), called through the dispatcher so that the rest of core/ stays torch-free.
// Every buffer is row-major and viewed (not copied) for the duration of the call; bool tensors are
// uint8_t buffers holding 0 or 1. Row b of a [batch, width] buffer is sequence b, with
// num_keys[b] <= width keys.
//
// Thread-safety: the ops keep no state; distinct buffers may be processed from distinct threads.
// Ownership: the caller owns every buffer; outputs are written in place. On failure (INTERNAL, the
// op's message included) the outputs are unspecified.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/status.h"

namespace dysco {

struct DeviceTensor;  // core/model/device_tensor.h

// relevance [batch, width] in: r_{t-1} over [0, n_b - 1); out: r_t over [0, n_b) (zeros after).
// probs [batch, num_heads, probs_len]; decay [batch].
Status DyscoRelevanceUpdate(float* relevance, int64_t batch, int64_t width, const float* probs,
                            int64_t num_heads, int64_t probs_len, const int64_t* num_keys,
                            const float* decay);

// The inputs and outputs of one dysco_select_bias call in one host buffer, page-locked when the op
// runs on a GPU, so that a caller packs its rows straight into it (and may run the relevance update
// in place on relevance() first) and reads its results straight out of it: one copy to the device
// and one back, instead of packing into private buffers and copying again around the call.
// The op: the selection of relevance [batch, width] and its bias: bias [batch, width], selected
// [batch, width], stats [batch, 2] = (number selected, relevance mass selected); template_mask
// [batch, width]; top_p [batch] (<= 0: unset); top_k [batch] (<= 0: unset); strength [batch]. On a
// GPU the results equal the CPU op's (sets and biases exact).
//
// Why: at 128K keys the host copies around the selection were most of the DySCO stage between the
// two passes on the H200 (docs/gpu.md "DySCO on the device").
//
// Thread-safety: none (one per stepping thread). Ownership: owns the buffer; the pointers it hands
// out stay valid until the next Resize. DeviceBias rows share the device buffer's storage, which
// stays allocated while a row is held.
class DyscoSelectStaging {
 public:
  // `device`: where Run() runs the op ("cpu" or a CUDA device).
  explicit DyscoSelectStaging(std::string device = "cpu");
  ~DyscoSelectStaging();
  DyscoSelectStaging(DyscoSelectStaging&&) noexcept;
  DyscoSelectStaging& operator=(DyscoSelectStaging&&) noexcept;

  // Lays the buffer out for [batch, width] rows, growing it when needed (the contents are then
  // unspecified).
  Status Resize(int64_t batch, int64_t width);

  // Inputs, written by the caller.
  float* relevance();        // [batch, width]; r_{t-1} in and r_t out with the relevance update
  float* probs();            // [batch, width]: each row's head mean, for the relevance update only
  float* decay();            // [batch], for the relevance update only
  uint8_t* template_mask();  // [batch, width]
  int64_t* num_keys();       // [batch]
  float* top_p();            // [batch]
  int64_t* top_k();          // [batch]
  float* strength();         // [batch]
  // Outputs of Run().
  const float* bias() const;        // [batch, width]
  const uint8_t* selected() const;  // [batch, width]
  const float* stats() const;       // [batch, 2]

  // dysco_select_bias over the staged inputs, on the device given at construction.
  Status Run();
  // dysco_relevance_update of relevance() (r_{t-1} over [0, num_keys - 1) in, r_t out) with
  // probs() as one head and decay(), then Run()'s selection over r_t, both on the device: on a GPU
  // r_{t-1} and the head means cross with the selection's inputs and r_t comes back with its
  // results (one copy each way). Why: the host update was the largest part of the DySCO stage at
  // 128K keys on the H200, 0.42 of 0.96 ms, against ~0.02 ms on the device (docs/gpu.md "DySCO on
  // the device").
  // `device_probs`: when given, fp32 [batch, >= width] on the staging's device, the head means in
  // place of probs() (a forward's ForwardOutput::probe_mean_device), read there without a copy.
  Status RunWithRelevanceUpdate(const DeviceTensor* device_probs = nullptr);
  // RunWithRelevanceUpdate without its wait: on a GPU the ops and the copy of their results back
  // are queued on the device's current stream and it returns; Wait() then waits for the results,
  // and until then the results (relevance(), bias(), selected(), stats()) must not be read nor the
  // inputs written. DeviceBias() meanwhile hands out the bias rows where the op wrote them, for a
  // forward queued after them on the same stream. On the host it runs to completion. Why: the real
  // pass of a DySCO step then starts on the device right after the selection, without the host's
  // round trip in between (docs/gpu.md "The DySCO stage without a wait").
  Status StartWithRelevanceUpdate(const DeviceTensor* device_probs = nullptr);
  // Waits for the results of the last StartWithRelevanceUpdate (no-op when none is pending).
  // Resize, Run and the Start calls wait first too, so a step that failed in between leaves
  // nothing behind.
  Status Wait();
  // Row `b`'s bias from the last run on a GPU: fp32 [width] on the device, valid for work queued
  // after that run on the device's current stream. Null on the host, and after a Resize until the
  // next run.
  std::shared_ptr<const DeviceTensor> DeviceBias(int64_t b) const;
  // Whether Run() runs on a GPU (the caller then packs the head means into probs() instead of
  // running the relevance update on the host).
  bool on_device() const;

 private:
  struct Buffer;
  Status RunOps(bool update_relevance, const DeviceTensor* device_probs, bool wait);

  std::string device_;
  int64_t batch_ = 0;
  int64_t width_ = 0;
  std::unique_ptr<Buffer> buffer_;
};

// bias [batch, width] of a given selection [batch, width].
Status DyscoBiasFromSelection(float* bias, const uint8_t* selected, int64_t batch, int64_t width,
                              const int64_t* num_keys, const uint8_t* template_mask,
                              const float* strength);

// mask [len]: 1 where tokens[i] lies inside an occurrence of any of `sequences`.
Status DyscoTemplateMask(uint8_t* mask, const int32_t* tokens, int64_t len,
                         const std::vector<std::vector<int32_t>>& sequences);

}  // namespace dysco
