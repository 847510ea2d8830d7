// Data-dependent checks, run on the host for every device (see prepare.h).
#include <string>

#include "ops/prepare.h"

namespace kvcomp {

namespace {

// The tensor's data on the host (a copy, and a sync, when it is on a GPU).
at::Tensor host(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

std::string at3(int64_t b, int64_t h, int64_t j) {
  return "[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(j) + "]";
}

}  // namespace

void validate_slots(const at::Tensor& slots, int64_t num_slots) {
  at::Tensor s = host(slots);
  const int64_t* p = s.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] < num_slots, "slot_mapping[", i, "] = ", p[i], " is beyond the pool's ",
                      num_slots, " slots");
}

void validate_block_ids(const at::Tensor& ids, int64_t num_blocks, const char* name) {
  at::Tensor h = host(ids);
  const int32_t* p = h.data_ptr<int32_t>();
  for (int64_t i = 0; i < h.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < num_blocks, name, "[", i, "] = ", p[i],
                      " is not a block of the pool (num_blocks = ", num_blocks, ")");
}

void validate_seq_lens(const at::Tensor& seq_lens, int64_t limit, const char* what) {
  at::Tensor h = host(seq_lens);
  const int32_t* p = h.data_ptr<int32_t>();
  for (int64_t b = 0; b < h.numel(); ++b)
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= limit, "seq_lens[", b, "] = ", p[b],
                      " is outside [0, ", limit, "] (", what, ")");
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
  at::Tensor ids_t = host(block_tables), keep_t = host(keep);
  const int32_t* ids = ids_t.data_ptr<int32_t>();
  const int32_t* kp = keep_t.data_ptr<int32_t>();
  const int64_t k = keep.size(2), bs = pool.layout.block_size, cap = bt.max_blocks * bs;
  auto block_ok = [&](int64_t b, int64_t pos) {
    int32_t id = ids[b * bt.max_blocks + pos / bs];
    return id >= 0 && id < pool.num_blocks;
  };
  for (int64_t b = 0; b < bt.batch; ++b)
    for (int64_t h = 0; h < pool.num_heads; ++h) {
      const int32_t* row = kp + (b * pool.num_heads + h) * k;
      int64_t n = 0, prev = -1;
      for (int64_t j = 0; j < k; ++j) {
        int64_t p = row[j];
        if (p < 0) continue;
        TORCH_CHECK_VALUE(p > prev, "keep", at3(b, h, j), " = ", p,
                          ": positions must be strictly ascending");
        TORCH_CHECK_VALUE(p < cap, "keep", at3(b, h, j), " = ", p, " is beyond the sequence's ",
                          cap, " slots");
        TORCH_CHECK_VALUE(block_ok(b, p) && block_ok(b, n), "block_tables[", b,
                          "] names no valid block for keep", at3(b, h, j),
                          " (num_blocks = ", pool.num_blocks, ")");
        prev = p;
        ++n;
      }
    }
}

}  // namespace kvcomp
