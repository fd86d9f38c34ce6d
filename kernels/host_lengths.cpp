// Thread-local publication of a forward's host lengths (kernels/host_lengths.h).
#include "kernels/host_lengths.h"

namespace dysco::kernels {
namespace {

thread_local const HostLengths* t_published = nullptr;

bool IsLengths(const at::Tensor& t, int64_t size) {
  return t.defined() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == size;
}

}  // namespace

ScopedHostLengths::ScopedHostLengths(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                     const std::vector<int64_t>& host_query_start_loc,
                                     const std::vector<int64_t>& host_seq_lens)
    : previous_(t_published) {
  const int64_t batch = static_cast<int64_t>(host_seq_lens.size());
  if (!IsLengths(seq_lens, batch) || !IsLengths(query_start_loc, batch + 1) ||
      static_cast<int64_t>(host_query_start_loc.size()) != batch + 1) {
    return;  // not these tensors' values: publish nothing (the previous scope stays current)
  }
  lengths_.query_start_loc_data = query_start_loc.data_ptr();
  lengths_.seq_lens_data = seq_lens.data_ptr();
  lengths_.batch = batch;
  lengths_.query_start_loc = host_query_start_loc.data();
  lengths_.seq_lens = host_seq_lens.data();
  t_published = &lengths_;
}

ScopedHostLengths::~ScopedHostLengths() { t_published = previous_; }

const HostLengths* PublishedHostLengths(const at::Tensor& query_start_loc,
                                        const at::Tensor& seq_lens) {
  const HostLengths* p = t_published;
  if (p == nullptr || !IsLengths(seq_lens, p->batch) || !IsLengths(query_start_loc, p->batch + 1)) {
    return nullptr;
  }
  if (query_start_loc.data_ptr() != p->query_start_loc_data ||
      seq_lens.data_ptr() != p->seq_lens_data) {
    return nullptr;
  }
  return p;
}

}  // namespace dysco::kernels
