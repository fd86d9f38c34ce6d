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
#include <string>
#include <vector>

#include "core/base/status.h"

namespace dysco {

// relevance [batch, width] in: r_{t-1} over [0, n_b - 1); out: r_t over [0, n_b) (zeros after).
// probs [batch, num_heads, probs_len]; decay [batch].
Status DyscoRelevanceUpdate(float* relevance, int64_t batch, int64_t width, const float* probs,
                            int64_t num_heads, int64_t probs_len, const int64_t* num_keys,
                            const float* decay);

// Selection of relevance [batch, width] and its bias: bias [batch, width], selected [batch, width],
// stats [batch, 2] = (number selected, relevance mass selected). template_mask [batch, width];
// top_p [batch] (<= 0: unset); top_k [batch] (<= 0: unset); strength [batch].
// `device` other than "cpu": the op runs there (inputs copied over, results copied back; the
// buffers stay on the host). Same results: the CUDA op equals the CPU op (sets and biases exact).
Status DyscoSelectBias(float* bias, uint8_t* selected, float* stats, const float* relevance,
                       int64_t batch, int64_t width, const int64_t* num_keys,
                       const uint8_t* template_mask, const float* top_p, const int64_t* top_k,
                       const float* strength, const std::string& device = "cpu");

// bias [batch, width] of a given selection [batch, width].
Status DyscoBiasFromSelection(float* bias, const uint8_t* selected, int64_t batch, int64_t width,
                              const int64_t* num_keys, const uint8_t* template_mask,
                              const float* strength);

// mask [len]: 1 where tokens[i] lies inside an occurrence of any of `sequences`.
Status DyscoTemplateMask(uint8_t* mask, const int32_t* tokens, int64_t len,
                         const std::vector<std::vector<int32_t>>& sequences);

}  // namespace dysco
