// Data-dependent checks of the CUDA bindings: the CPU kernels' checks
// (csrc/cpu/checks.cpp) run on host copies of the index tensors.
#include <string>

#include "ops/prepare.h"

namespace kvcomp {

namespace {

// The tensor's data on the host (a copy, and a sync, when it is on a GPU).
at::Tensor host(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

}  // namespace

void validate_slots(const at::Tensor& slots, int64_t num_slots) {
  at::Tensor s = host(slots);
  guarded([&] { check_slots(s.data_ptr<int64_t>(), s.numel(), num_slots); });
}

void validate_block_ids(const at::Tensor& ids, int64_t num_blocks, const char* name) {
  at::Tensor h = host(ids);
  guarded([&] { check_block_ids(h.data_ptr<int32_t>(), h.numel(), num_blocks, name); });
}

void validate_seq_lens(const at::Tensor& seq_lens, int64_t limit, const char* what) {
  at::Tensor h = host(seq_lens);
  guarded([&] { check_seq_lens(h.data_ptr<int32_t>(), h.numel(), limit, what); });
}

void validate_paged(const Pool& pool, const BlockTables& bt, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens) {
  at::Tensor ids = host(block_tables), sl = host(seq_lens);
  BlockTables h = bt;
  h.ids = ids.data_ptr<int32_t>();
  guarded([&] { check_paged(pool, h, sl.data_ptr<int32_t>()); });
}

void validate_keep(const Pool& pool, const BlockTables& bt, const at::Tensor& block_tables,
                   const at::Tensor& keep) {
  at::Tensor ids = host(block_tables), kp = host(keep);
  BlockTables h = bt;
  h.ids = ids.data_ptr<int32_t>();
  guarded([&] { check_keep(pool, h, kp.data_ptr<int32_t>(), keep.size(2)); });
}

}  // namespace kvcomp
