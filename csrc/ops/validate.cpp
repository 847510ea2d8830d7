// Data-dependent checks of the CUDA bindings: the CPU kernels' checks
// (csrc/cpu/checks.cpp) run on host copies of the index tensors.
#include <string>

#include "ops/prepare.h"

namespace kvcomp {

void validate_slots(const Tensor& slots, int64_t num_slots) {
  Tensor s = to_host(slots);
  check_slots(s.const_data_ptr<int64_t>(), s.numel(), num_slots);
}

void validate_block_ids(const Tensor& ids, int64_t num_blocks, const char* name) {
  Tensor h = to_host(ids);
  check_block_ids(h.const_data_ptr<int32_t>(), h.numel(), num_blocks, name);
}

void validate_seq_lens(const Tensor& seq_lens, int64_t limit, const char* what) {
  Tensor h = to_host(seq_lens);
  check_seq_lens(h.const_data_ptr<int32_t>(), h.numel(), limit, what);
}

void validate_paged(const Pool& pool, const BlockTables& bt, const Tensor& block_tables,
                    const Tensor& seq_lens) {
  Tensor ids = to_host(block_tables), sl = to_host(seq_lens);
  BlockTables h = bt;
  h.ids = ids.const_data_ptr<int32_t>();
  check_paged(pool, h, sl.const_data_ptr<int32_t>());
}

void validate_keep(const Pool& pool, const BlockTables& bt, const Tensor& block_tables,
                   const Tensor& keep) {
  Tensor ids = to_host(block_tables), kp = to_host(keep);
  BlockTables h = bt;
  h.ids = ids.const_data_ptr<int32_t>();
  check_keep(pool, h, kp.const_data_ptr<int32_t>(), keep.size(2));
}

}  // namespace kvcomp
